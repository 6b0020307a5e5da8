"""FGSM / BIM / PGD / MI-FGSM on tiny linear models with closed-form answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prepdefense import attacks, seeding
from prepdefense.attacks.gradient import BIM, FGSM, MIFGSM, PGD
from prepdefense.draws import DrawKey
from prepdefense.attacks.losses import cross_entropy_loss, margin_loss, objective

from toy_models import C, D, H, W, Linear  # noqa: E402  (tests/ is on sys.path)


def linear_model(k: int = 5, seed: int = 0) -> Linear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, D, generator=g, dtype=torch.float64)
    b = torch.randn(k, generator=g, dtype=torch.float64) * 0.1
    return Linear(w, b).eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # keep away from the box so that clipping does not interfere with closed forms
    return 0.3 + 0.4 * torch.rand(n, C, H, W, generator=g, dtype=torch.float64)


def test_registry_names():
    for name in ("fgsm", "bim", "i-fgsm", "pgd", "mi-fgsm"):
        assert name in attacks.names()
    assert isinstance(attacks.create("i-fgsm"), BIM)
    assert isinstance(attacks.create("pgd", steps=7), PGD)


def test_losses_closed_form():
    z = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    y = torch.tensor([1, 2])
    t = torch.tensor([2, 0])
    assert torch.allclose(margin_loss(z, y, t), torch.tensor([1.0, 5.0]))
    assert torch.allclose(margin_loss(z, y, None), torch.tensor([1.0, 5.0]))
    assert torch.allclose(margin_loss(z, y, t, kappa=0.5), torch.tensor([1.0, 5.0]))
    z2 = torch.tensor([[5.0, 0.0, 1.0]])
    assert torch.allclose(margin_loss(z2, torch.tensor([1]), torch.tensor([0]), kappa=2.0), torch.tensor([-2.0]))
    ce = cross_entropy_loss(z, y, t)
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(z, t, reduction="none"))
    assert torch.allclose(objective("ce", z, y, None), torch.nn.functional.cross_entropy(z, y, reduction="none"))
    with pytest.raises(ValueError):
        objective("nope", z, y, t)


def test_fgsm_linf_step_is_eps_sign_of_weight_difference():
    model = linear_model()
    x = images()
    labels = model(x).argmax(1)
    targets = (labels + 1) % 5
    eps = 0.01
    res = FGSM(eps=eps, loss="margin")(model, x, labels=labels, targets=targets)
    # margin gradient for target t: w_t - w_j* with j* the best other class
    z = model(x).detach()
    other = z.scatter(1, targets[:, None], float("-inf")).argmax(1)
    w = model.weight.detach()
    expected = x + eps * (w[targets] - w[other]).sign().view_as(x)
    assert torch.allclose(res.adversarial, expected, atol=1e-12)
    # two-class CE: gradient is (1 - p_t)(w_t - w_y) -> same sign pattern
    model2 = linear_model(k=2, seed=3)
    y2 = model2(x).argmax(1)
    t2 = 1 - y2
    res2 = FGSM(eps=eps)(model2, x, labels=y2, targets=t2)
    w2 = model2.weight.detach()
    assert torch.allclose(res2.adversarial, x + eps * (w2[t2] - w2[y2]).sign().view_as(x), atol=1e-12)
    # untargeted CE on two classes moves away from y: same direction as toward the other class
    res3 = FGSM(eps=eps)(model2, x, labels=y2)
    assert torch.allclose(res3.adversarial, res2.adversarial)


def test_fgsm_l2_step_has_rms_length_eps():
    """L2 budgets are the paper's normalised (RMS) distance everywhere (issue 9, item 3)."""
    model = linear_model()
    x = images()
    labels = model(x).argmax(1)
    res = FGSM(norm="l2", eps=0.01)(model, x, labels=labels)
    rms = (res.adversarial - x).flatten(1).pow(2).mean(1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 0.01), atol=1e-9)
    d = (res.adversarial - x).flatten(1).norm(dim=1)  # the Euclidean length is eps * sqrt(C*H*W)
    assert torch.allclose(d, torch.full_like(d, 0.01 * math.sqrt(D)), atol=1e-9)
    assert FGSM(norm="l2", eps=0.05).radius(x) == pytest.approx(0.05 * math.sqrt(D))
    with pytest.raises(TypeError):
        FGSM(norm="l2", rms_eps=0.05)  # one name for the budget


@pytest.mark.parametrize("norm,eps", [("linf", 0.02), ("l2", 0.3 / math.sqrt(D))])
def test_projection_respected_exactly(norm, eps):
    model = linear_model()
    x = torch.rand(6, C, H, W, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    labels = model(x).argmax(1)
    atk = PGD(norm=norm, eps=eps, steps=20, rel_stepsize=0.5, random_start=True)
    res = atk(model, x, labels=labels, generator=seeding.make_generator(0))
    d = res.adversarial - x
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-12
        # large steps push most coordinates onto the boundary (or the box)
        at_bound = (d.abs() > eps - 1e-9) | (res.adversarial <= 0) | (res.adversarial >= 1)
        assert at_bound.float().mean() > 0.9
    else:
        norms = d.flatten(1).norm(dim=1) / math.sqrt(D)
        assert (norms <= eps + 1e-9).all()
        assert (norms > 0.5 * eps).all()
    assert res.adversarial.min() >= 0 and res.adversarial.max() <= 1


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.4)])
def test_random_start_in_ball_and_reproducible(norm, eps):
    x = images(8)
    atk = PGD(norm=norm, eps=eps)
    a = atk.random_perturbation(x, eps, DrawKey(11, n=8))
    b = atk.random_perturbation(x, eps, DrawKey(11, n=8))
    c = atk.random_perturbation(x, eps, DrawKey(12, n=8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # per image: image i's start depends on its id alone, not on the rest of the batch
    assert torch.equal(atk.random_perturbation(x[3:5], eps, DrawKey(11, n=8).select(slice(3, 5))), a[3:5])
    if norm == "linf":
        assert a.abs().max() <= eps
        assert a.abs().max() > 0.9 * eps  # uses the whole ball
    else:
        n = a.flatten(1).norm(dim=1)
        assert (n <= eps + 1e-9).all() and (n > 0.8 * eps).all()  # mass near the sphere in 48-d
    model = linear_model()
    labels = model(x).argmax(1)
    one_step = PGD(norm=norm, eps=eps, steps=3)
    r1 = one_step(model, x, labels=labels, generator=seeding.make_generator(4))
    r2 = one_step(model, x, labels=labels, generator=seeding.make_generator(4))
    r3 = one_step(model, x, labels=labels, generator=seeding.make_generator(5))
    assert torch.equal(r1.adversarial, r2.adversarial)
    assert not torch.equal(r1.adversarial, r3.adversarial)


@pytest.mark.parametrize("cls", [FGSM, BIM, MIFGSM])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_batch_size_does_not_change_a_step(cls, norm):
    model = linear_model()
    x = torch.rand(5, C, H, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = model(x).argmax(1)
    targets = (labels + 2) % 5
    eps = 0.05 if norm == "linf" else 0.5
    atk = cls(norm=norm, eps=eps)
    whole = atk(model, x, labels=labels, targets=targets)
    for i in range(5):
        single = atk(model, x[i : i + 1], labels=labels[i : i + 1], targets=targets[i : i + 1])
        assert torch.allclose(single.adversarial, whole.adversarial[i : i + 1], atol=1e-12, rtol=0)
        assert single.success.item() == whole.success[i].item()


def test_pgd_batch_equals_single_without_random_start():
    model = linear_model()
    x = images(3)
    labels = model(x).argmax(1)
    atk = PGD(eps=0.03, steps=5, random_start=False)
    whole = atk(model, x, labels=labels)
    for i in range(3):
        single = atk(model, x[i : i + 1], labels=labels[i : i + 1])
        assert torch.allclose(single.adversarial, whole.adversarial[i : i + 1], atol=1e-12)


@pytest.mark.parametrize("cls", [BIM, PGD, MIFGSM])
def test_targeted_success_on_easy_model(cls):
    model = linear_model(k=5, seed=7)
    x = images(6)
    labels = model(x).argmax(1)
    targets = (labels + 1) % 5
    assert not (model(x).argmax(1) == targets).any()
    res = cls(eps=0.2, record_history=True)(model, x, labels=labels, targets=targets, generator=seeding.make_generator(0))
    assert res.success.all()
    assert torch.equal(model(res.adversarial).argmax(1), targets)
    assert len(res.history) == res.info["hyperparameters"]["steps"]
    assert res.history[-1]["asr"] == 1.0 and res.history[-1]["accuracy"] == 0.0
    assert res.history[0]["round"] == 1


def test_untargeted_success_flag_matches_prediction():
    model = linear_model(k=5, seed=7)
    x = images(6)
    labels = model(x).argmax(1)
    res = BIM(eps=0.005)(model, x, labels=labels)
    assert torch.equal(res.success, model(res.adversarial).argmax(1) != labels)


def test_mifgsm_momentum_differs_from_bim_and_zero_momentum_is_bim():
    # a nonlinear toy model so that the gradient direction changes along the path
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 5)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 2)
    x = images(4)
    labels = model(x).argmax(1)
    targets = (labels + 1) % 5
    bim_res = BIM(eps=0.3, steps=10)(model, x, labels=labels, targets=targets)
    mi_res = MIFGSM(eps=0.3, steps=10)(model, x, labels=labels, targets=targets)
    mi0 = MIFGSM(eps=0.3, steps=10, momentum=0.0)(model, x, labels=labels, targets=targets)
    assert not torch.allclose(bim_res.adversarial, mi_res.adversarial)
    # sign(g / ||g||_1) == sign(g): with no momentum MI-FGSM is BIM
    assert torch.allclose(bim_res.adversarial, mi0.adversarial)


def test_keep_best_returns_a_successful_iterate():
    model = linear_model(k=5, seed=7)
    x = images(6)
    labels = model(x).argmax(1)
    targets = (labels + 1) % 5
    res = PGD(eps=0.2, steps=10, keep_best=True, loss="margin")(model, x, labels=labels, targets=targets,
                                                                 generator=seeding.make_generator(1))
    assert res.success.all()
    assert (res.adversarial - x).abs().max() <= 0.2 + 1e-12


def test_defaults_follow_the_paper():
    assert FGSM().eps == 0.03 and FGSM().steps == 1
    b = BIM()
    assert b.steps == 10 and b.rel_stepsize == pytest.approx(0.1) and not b.random_start
    p = PGD()
    assert p.steps == 50 and p.random_start and p.eps == pytest.approx(8 / 255)
    assert PGD(steps=1000).rel_stepsize == pytest.approx(2.5 / 1000)
    assert PGD(norm="l2").eps == 0.05
    assert MIFGSM().momentum == 1.0
    with pytest.raises(TypeError):
        PGD(0.03)  # keyword-only

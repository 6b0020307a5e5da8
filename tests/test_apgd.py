"""APGD (Croce & Hein 2020): the checkpoints, the DLR loss, the ball, EOT, batch invariance, and
parity with torchattacks' APGD on the default model (issue 10, item 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prepdefense import attacks, defenses
from prepdefense.attacks.apgd import APGD, checkpoint_windows
from prepdefense.attacks.losses import dlr_loss, objective
from prepdefense.defenses import Defended


def _tiny(seed: int = 0, k: int = 10) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, k)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m.eval()


def _batch(n=6, seed=1):
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_checkpoints_are_the_papers():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): at 100 iterations
    # the windows are 22, 19, 16, 13, 10, 7, 6, 6 (the authors' integer rounding).
    w = checkpoint_windows(100)
    sizes = [b - a for a, b in zip([-1] + w[:-1], w)]
    assert sizes == [22, 19, 16, 13, 10, 7, 6, 6]
    assert w[-1] < 100
    assert checkpoint_windows(1) == [0]


def test_dlr_matches_its_definition():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0], [0.5, 4.0, 1.0, 2.0, 0.0]])
    y = torch.tensor([0, 2])
    t = torch.tensor([1, 0])
    # untargeted: (z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3)
    assert dlr_loss(z, y).tolist() == pytest.approx([(3 - 2) / (3 - 1), (1 - 4) / (4 - 1)])
    # targeted: (z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    assert dlr_loss(z, y, t).tolist() == pytest.approx([(3 - 1) / (3 - 0.5), (1 - 0.5) / (4 - 0.75)])
    # shift and scale invariant
    torch.testing.assert_close(dlr_loss(3 * z + 7, y), dlr_loss(z, y))
    assert torch.equal(objective("dlr", z, y), -dlr_loss(z, y))
    with pytest.raises(ValueError, match="at least 3 classes"):
        dlr_loss(z[:, :2], torch.tensor([0, 1]))


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.03)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_stays_in_the_ball_and_fools(norm, eps, loss):
    m = _tiny()
    x = _batch()
    y = m(x).argmax(1)
    res = attacks.create("apgd", norm=norm, eps=eps, steps=20, loss=loss)(m, x, labels=y, generator=0)
    d = res.adversarial - x
    if norm == "linf":
        assert float(d.abs().max()) <= eps + 1e-9
    else:
        assert float((d.flatten(1).norm(dim=1) / (x[0].numel() ** 0.5)).max()) <= eps + 1e-9
    assert res.adversarial.min() >= 0 and res.adversarial.max() <= 1
    with torch.no_grad():
        assert torch.equal(res.success, m(res.adversarial).argmax(1) != y)
    assert res.success.any()
    assert res.info["gradient_stats"]["nonfinite_gradients"] == 0


def test_beats_or_matches_pgd_with_the_same_steps():
    """The point of APGD: no step size to tune, at least as strong as PGD with the same budget."""
    m = _tiny(3)
    x = _batch(16, 5)
    y = m(x).argmax(1)
    apgd = attacks.create("apgd-ce", eps=0.01, steps=30)(m, x, labels=y, generator=0)
    pgd = attacks.create("pgd", eps=0.01, steps=30)(m, x, labels=y, generator=0)
    assert int(apgd.success.sum()) >= int(pgd.success.sum())


def test_targeted_dlr_reaches_targets():
    m = _tiny()
    x = _batch()
    y = m(x).argmax(1)
    t = m(x).topk(2, dim=1).indices[:, 1]  # the runner-up class: reachable
    res = attacks.create("apgd-dlr", eps=0.05, steps=30)(m, x, labels=y, targets=t, generator=0)
    with torch.no_grad():
        assert torch.equal(res.success, m(res.adversarial).argmax(1) == t)
    assert res.success.float().mean() >= 0.5


def test_reproducible_and_batch_size_invariant():
    m = _tiny()
    x = _batch(5)
    y = m(x).argmax(1)
    kw = dict(norm="l2", eps=0.02, steps=12, restarts=2)
    whole = APGD(**kw)(m, x, labels=y, generator=3)
    again = APGD(**kw)(m, x, labels=y, generator=3)
    split = APGD(batch_size=2, **kw)(m, x, labels=y, generator=3)
    assert torch.equal(whole.adversarial, again.adversarial)
    torch.testing.assert_close(split.adversarial, whole.adversarial, rtol=0, atol=1e-9)
    assert torch.equal(split.success, whole.success)
    other = APGD(**kw)(m, x, labels=y, generator=4)
    assert not torch.equal(other.adversarial, whole.adversarial)


def test_eot_over_a_deterministic_model_changes_nothing():
    m = _tiny()
    x = _batch(3)
    y = m(x).argmax(1)
    a = APGD(eps=0.02, steps=8, eot=1)(m, x, labels=y, generator=0)
    b = APGD(eps=0.02, steps=8, eot=4)(m, x, labels=y, generator=0)
    torch.testing.assert_close(a.adversarial, b.adversarial, rtol=0, atol=0)


def test_eot_averages_the_draws_of_a_random_defense():
    """Through a random defense with EOT: draws per step come from the key, so the run repeats,
    and the gradient is the mean of the per-draw gradients (checked against a hand-made mean)."""
    m = _tiny()
    model = Defended(defenses.create("grid-distort"), m)
    x = _batch(3)
    with torch.no_grad():
        y = model(x, generator=0).argmax(1)
    attack = APGD(eps=0.02, steps=4, eot=3)
    r1 = attack(model, x, labels=y, generator=5)
    r2 = attack(model, x, labels=y, generator=5)
    assert torch.equal(r1.adversarial, r2.adversarial)
    from prepdefense.draws import DrawKey

    key = DrawKey.from_seed(9, 3)
    f, g, freq = attack._evaluate(model, x, y, None, key)
    grads = []
    for i in range(3):
        xa = x.clone().requires_grad_(True)
        z = model(xa, generator=key.child("eot", i))
        (gi,) = torch.autograd.grad(objective("ce", z, y).sum(), xa)
        grads.append(gi)
    torch.testing.assert_close(g, torch.stack(grads).mean(0))
    assert freq.shape == (3,)


def test_refuses_a_defense_without_gradient():
    model = Defended(defenses.create("jpeg"), _tiny().float())
    with pytest.raises(ValueError, match="with_bpda"):
        APGD(steps=2)(model, torch.rand(2, 3, 12, 12), labels=torch.zeros(2, dtype=torch.long))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        APGD(loss="hinge")
    with pytest.raises(ValueError, match="steps"):
        APGD(steps=0)
    with pytest.raises(TypeError, match="fixes"):
        attacks.create("apgd-ce", loss="dlr")


# -- parity with torchattacks on the default model ------------------------------------------------

#: Linf radius of the parity runs: a tiny budget, so that success is neither 0 nor 1.
PARITY_EPS = 0.25 / 255


def _parity(model, sample_dir, n, steps, capsys):
    torchattacks = pytest.importorskip("torchattacks", reason="torchattacks is in the test set-up (Makefile venv rule)")
    from prepdefense import data

    torch.set_num_threads(1)
    s = data.protocol_sample(model, sample_dir, n=n, seed=0, batch_size=n)
    x, y = s.x, s.labels
    ours = attacks.create("apgd-ce", norm="linf", eps=PARITY_EPS, steps=steps, restarts=1)(model, x, labels=y, generator=0)
    peer = torchattacks.APGD(model, norm="Linf", eps=PARITY_EPS, steps=steps, n_restarts=1, seed=0, loss="ce", rho=0.75)
    adv = peer(x, y).detach()
    with torch.no_grad():
        peer_pred = model(adv).argmax(1)
        our_pred = model(ours.adversarial).argmax(1)
    peer_success = peer_pred != y
    assert float((adv - x).abs().max()) <= PARITY_EPS + 1e-6
    assert float((ours.adversarial - x).abs().max()) <= PARITY_EPS + 1e-6
    with capsys.disabled():
        print(f"\nAPGD-CE parity, Linf eps {PARITY_EPS:.5f} (0.25/255), {steps} steps, 1 restart, {n} protocol images")
        print(f"{'image':<22}{'label':>6}{'ours':>8}{'pred':>6}{'torchattacks':>14}{'pred':>6}")
        for i in range(n):
            print(f"{s.ids[i]:<22}{int(y[i]):>6}{'fooled' if ours.success[i] else 'robust':>8}{int(our_pred[i]):>6}"
                  f"{'fooled' if peer_success[i] else 'robust':>14}{int(peer_pred[i]):>6}")
        print(f"success: ours {int(ours.success.sum())}/{n}, torchattacks {int(peer_success.sum())}/{n}")
    assert 0 < int(peer_success.sum()) < n, "the budget should make success neither trivial nor impossible"
    assert abs(int(ours.success.sum()) - int(peer_success.sum())) <= 1


def test_parity_with_torchattacks_fast(model, imagenet_sample_dir, capsys):
    """10 images, 5 iterations (checkpoints every iteration at this length)."""
    _parity(model, imagenet_sample_dir, 10, 5, capsys)


@pytest.mark.slow
def test_parity_with_torchattacks_20_images(model, imagenet_sample_dir, capsys):
    """The issue's check: 20 images, 20 iterations, success within 1 image of 20."""
    _parity(model, imagenet_sample_dir, 20, 20, capsys)

"""C&W L2 and L-BFGS on toy linear models: success at (near) minimal L2, binary search over c."""

from __future__ import annotations

import torch

from prepdefense import attacks
from prepdefense.attacks.carlini_wagner import CarliniWagnerL2
from prepdefense.attacks.lbfgs import LBFGS, lbfgs_adversarial_loss

from toy_models import C, D, H, W, Linear  # noqa: E402  (tests/ is on sys.path)


def setup(n: int = 6, k: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, D, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(k, generator=g, dtype=torch.float64)
    model = Linear(weight, bias).eval()
    x = 0.4 + 0.2 * torch.rand(n, C, H, W, generator=g, dtype=torch.float64)
    z = model(x).detach()
    labels = z.argmax(1)
    targets = (labels + 1) % k
    v = weight[targets] - weight[labels]
    # distance to the two-class boundary {z_t = z_y}: a lower bound on any targeted L2
    lower_bound = (z.gather(1, labels[:, None]) - z.gather(1, targets[:, None])).squeeze(1) / v.norm(dim=1)
    return model, x, labels, targets, lower_bound


def test_registered():
    assert isinstance(attacks.create("cw"), CarliniWagnerL2)
    assert isinstance(attacks.create("lbfgs"), LBFGS)
    cw = CarliniWagnerL2()
    assert (cw.binary_search_steps, cw.steps, cw.lr, cw.kappa) == (5, 1000, 0.1, 0.0)
    lb = LBFGS()
    assert (lb.binary_search_steps, lb.max_iterations) == (5, 1000)


def test_cw_targeted_success_with_near_minimal_l2():
    model, x, labels, targets, lower_bound = setup(n=4)
    res = CarliniWagnerL2(steps=200, binary_search_steps=4)(model, x, labels=labels, targets=targets)
    assert res.success.all()
    assert torch.equal(model(res.adversarial).argmax(1), targets)
    l2 = (res.adversarial - x).flatten(1).norm(dim=1)
    assert torch.allclose(l2, res.info["l2"].to(l2.dtype))
    assert (l2 >= lower_bound * (1 - 1e-6)).all()
    assert (l2 <= lower_bound * 1.05).all()
    assert res.adversarial.min() >= 0 and res.adversarial.max() <= 1


def test_cw_untargeted_and_batch_equals_single():
    model, x, labels, _, _ = setup(n=3, seed=1)
    atk = CarliniWagnerL2(steps=100, binary_search_steps=3)
    whole = atk(model, x, labels=labels)
    assert whole.success.all()
    for i in range(3):
        one = atk(model, x[i : i + 1], labels=labels[i : i + 1])
        assert torch.allclose(one.adversarial, whole.adversarial[i : i + 1], atol=1e-12)


def test_cw_binary_search_lowers_c_where_successful():
    model, x, labels, targets, _ = setup(n=4, seed=2)
    big = 100.0
    first = CarliniWagnerL2(steps=100, binary_search_steps=1, initial_const=big)(model, x, labels=labels, targets=targets)
    assert first.success.all()
    searched = CarliniWagnerL2(steps=100, binary_search_steps=5, initial_const=big, record_history=True)(
        model, x, labels=labels, targets=targets)
    assert searched.success.all()
    assert (searched.info["const"] < big).all()
    assert (searched.info["l2"] <= first.info["l2"] + 1e-9).all()
    assert [h["round"] for h in searched.history] == [1, 2, 3, 4, 5]
    assert searched.history[-1]["mean_const"] < big


def test_cw_failure_returns_original_image():
    model, x, labels, targets, _ = setup(n=2, seed=3)
    # one iteration only evaluates x itself (Adam's first step is lr-sized whatever c is)
    res = CarliniWagnerL2(steps=1, binary_search_steps=1, initial_const=1e-6)(model, x, labels=labels, targets=targets)
    assert not res.success.any()
    assert torch.equal(res.adversarial, x)
    assert torch.isinf(res.info["l2"]).all()


def test_lbfgs_targeted_success_and_binary_search():
    model, x, labels, targets, lower_bound = setup(n=4)
    res = LBFGS(max_iterations=200, record_history=True)(model, x, labels=labels, targets=targets)
    assert res.success.all()
    assert torch.equal(model(res.adversarial).argmax(1), targets)
    l2 = (res.adversarial - x).flatten(1).norm(dim=1)
    assert (l2 >= lower_bound * (1 - 1e-6)).all()
    assert (l2 <= 2.5 * lower_bound).all()  # CE asks for some confidence beyond the boundary
    assert res.adversarial.min() >= 0 and res.adversarial.max() <= 1
    # started at 0.01, went up x10 until success, then bisected back down
    first_success_const = 10.0 ** torch.ceil(torch.log10(res.info["const"] / 0.01)) * 0.01
    assert (res.info["const"] <= first_success_const + 1e-12).all()
    big = LBFGS(max_iterations=200, binary_search_steps=3, initial_const=1000.0)(model, x, labels=labels, targets=targets)
    assert big.success.all() and (big.info["const"] < 1000.0).all()


def test_lbfgs_untargeted_loss_and_attack():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    y = torch.tensor([0])
    p = z.softmax(1)[0, 0]
    assert torch.allclose(lbfgs_adversarial_loss(z, y, None), -torch.log1p(-p).view(1))
    model, x, labels, _, _ = setup(n=3, seed=4)
    res = LBFGS(max_iterations=100, binary_search_steps=3)(model, x, labels=labels)
    assert res.success.all()
    assert (model(res.adversarial).argmax(1) != labels).all()

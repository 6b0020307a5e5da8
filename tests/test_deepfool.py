"""DeepFool on linear models: the step is exact (Moosavi-Dezfooli et al. 2016, Eq. 3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prepdefense import attacks
from prepdefense.attacks.deepfool import DeepFool

from toy_models import C, D, H, W, Linear  # noqa: E402  (tests/ is on sys.path)


def test_registered():
    assert "deepfool" in attacks.names()
    assert isinstance(attacks.create("deepfool"), DeepFool)


def test_binary_linear_first_step_reaches_boundary_at_analytic_distance():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, generator=g, dtype=torch.float64) * 0.1
    weight = torch.stack([w, torch.zeros_like(w)])  # z0 = w.x + b, z1 = 0
    x = 0.4 + 0.2 * torch.rand(4, C, H, W, generator=g, dtype=torch.float64)
    s = x.flatten(1) @ w
    b = float(-(s.min()) + 0.05)  # every image classified as 0, margins vary
    model = Linear(weight, torch.tensor([b, 0.0], dtype=torch.float64)).eval()
    labels = torch.zeros(4, dtype=torch.long)
    assert (model(x).argmax(1) == 0).all()
    overshoot = 0.02
    res = DeepFool(overshoot=overshoot)(model, x, labels=labels)
    distance = (s + b) / w.norm()  # analytic distance to the hyperplane
    l2 = (res.adversarial - x).flatten(1).norm(dim=1)
    assert torch.allclose(l2, (distance + 1e-4) * (1 + overshoot), rtol=1e-9, atol=1e-12)
    # along -w: the perturbation is parallel to the normal of the boundary
    d = (res.adversarial - x).flatten(1)
    cos = (d @ -w) / (d.norm(dim=1) * w.norm())
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-12)
    assert res.success.all()
    assert (res.info["iterations"] == 1).all()
    # without overshoot it lands just past the boundary (1e-4), still on the other side
    res0 = DeepFool(overshoot=0.0)(model, x, labels=labels)
    z = model(res0.adversarial).detach()
    assert ((z[:, 1] - z[:, 0]) * 1.0 >= 0).all()
    assert torch.allclose((res0.adversarial - x).flatten(1).norm(dim=1), distance + 1e-4, rtol=1e-9)


def test_multiclass_linear_picks_nearest_boundary():
    g = torch.Generator().manual_seed(1)
    k = 6
    weight = torch.randn(k, D, generator=g, dtype=torch.float64) * 0.2
    bias = torch.randn(k, generator=g, dtype=torch.float64)
    model = Linear(weight, bias).eval()
    x = 0.45 + 0.1 * torch.rand(3, C, H, W, generator=g, dtype=torch.float64)
    labels = model(x).argmax(1)
    res = DeepFool(overshoot=0.0, candidates=k)(model, x, labels=labels)
    z = model(x).detach()
    for i in range(3):
        y = labels[i]
        dists = []
        for j in range(k):
            if j == y:
                continue
            wj = weight[j] - weight[y]
            dists.append(((z[i, y] - z[i, j]) / wj.norm()).item())
        # first linear step can only over-estimate the minimal distance never under it
        assert (res.adversarial[i] - x[i]).norm().item() >= min(dists) - 1e-9
    assert res.success.all()


def test_batch_equals_one_at_a_time_and_misclassified_untouched():
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 12), nn.Tanh(), nn.Linear(12, 5)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.rand(5, C, H, W, generator=g, dtype=torch.float64)
    labels = model(x).argmax(1)
    labels[0] = (labels[0] + 1) % 5  # already misclassified -> left as is
    atk = DeepFool(record_history=True)
    whole = atk(model, x, labels=labels)
    assert torch.equal(whole.adversarial[0], x[0])
    for i in range(5):
        one = atk(model, x[i : i + 1], labels=labels[i : i + 1])
        assert torch.allclose(one.adversarial, whole.adversarial[i : i + 1], atol=1e-10)
    assert whole.success.all()
    assert whole.history and whole.history[-1]["asr"] == 1.0


def test_targets_rejected():
    model = Linear(torch.randn(3, D, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    x = torch.rand(1, C, H, W, dtype=torch.float64)
    with pytest.raises(ValueError, match="untargeted"):
        DeepFool()(model, x, labels=torch.tensor([0]), targets=torch.tensor([1]))

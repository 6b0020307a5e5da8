"""SPSA (Uesato et al. 2018): the gradient estimate, the ball, reproducibility, batch invariance,
the query budget and a non-differentiable defense as deployed (issue 10, item 2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prepdefense import attacks, defenses
from prepdefense.attacks.spsa import SPSA
from prepdefense.defenses import Defended
from prepdefense.draws import DrawKey


class _Linear(nn.Module):
    def __init__(self, seed=0, k=5, d=3 * 6 * 6):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(k, d, generator=g, dtype=torch.float64))

    def forward(self, x):
        return x.flatten(1) @ self.w.t()


def _batch(n=4, seed=1):
    return 0.25 + 0.5 * torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_estimate_of_a_linear_loss_points_along_its_gradient():
    """For a linear loss the finite differences are exact; the estimate is the gradient plus
    zero-mean noise, so with many directions it lines up with the true gradient."""
    m = _Linear()
    bias = torch.tensor([100.0, 50.0, 0.0, -50.0, -100.0], dtype=torch.float64)
    model = lambda x: m(x) + bias  # noqa: E731  (class 0 first, class 1 second, everywhere near x)
    x = _batch(2)
    y = torch.zeros(2, dtype=torch.long)
    a = SPSA(samples=4000, loss="margin", query_batch=4000)
    key = DrawKey.from_seed(0, 2)
    g = a._estimate(model, x, y, None, key.child("spsa").generators(), key, 0)
    true = (m.w[0] - m.w[1]).detach().view(1, -1).expand(2, -1)  # d(z_0 - z_1)/dx
    cos = torch.nn.functional.cosine_similarity(g.flatten(1), true)
    assert (cos > 0.7).all(), cos


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_stays_in_the_ball_and_fools(norm):
    m = _Linear()
    x = _batch(6)
    y = m(x).argmax(1)
    eps = 0.1
    res = SPSA(norm=norm, eps=eps, steps=30, samples=32, lr=0.02)(m, x, labels=y, generator=0)
    d = res.adversarial - x
    if norm == "linf":
        assert float(d.abs().max()) <= eps + 1e-9
    else:
        assert float((d.flatten(1).norm(dim=1) / x[0].numel() ** 0.5).max()) <= eps + 1e-9
    with torch.no_grad():
        assert torch.equal(res.success, m(res.adversarial).argmax(1) != y)
    assert res.success.any()
    assert max(res.info["queries"]) <= 30 * (2 * 32 + 1)


def test_reproducible_batch_invariant_and_budgeted():
    m = _Linear()
    x = _batch(5)
    y = m(x).argmax(1)
    kw = dict(eps=0.03, samples=8, queries=80, query_batch=6)
    whole = SPSA(**kw)(m, x, labels=y, generator=2)
    assert whole.info["hyperparameters"]["steps"] == 5  # 80 // (2 * 8)
    again = SPSA(**kw)(m, x, labels=y, generator=2)
    split = SPSA(batch_size=2, **kw)(m, x, labels=y, generator=2)
    assert torch.equal(whole.adversarial, again.adversarial)
    torch.testing.assert_close(split.adversarial, whole.adversarial, rtol=0, atol=1e-9)
    assert whole.info["queries"] == split.info["queries"]


def test_non_differentiable_and_random_defenses_as_deployed():
    clf = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    for name in ("jpeg", "grid-distort"):
        model = Defended(defenses.create(name), clf)
        with torch.no_grad():
            y = model(x, generator=0).argmax(1)
        a = attacks.create("spsa", steps=2, samples=4)
        r1 = a(model, x, labels=y, generator=1)
        r2 = attacks.create("spsa", steps=2, samples=4, batch_size=2)(model, x, labels=y, generator=1)
        torch.testing.assert_close(r1.adversarial, r2.adversarial, rtol=0, atol=1e-4)  # float32 batching noise
        assert float((r1.adversarial - x).abs().max()) <= 8 / 255 + 1e-6


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="queries"):
        SPSA(samples=128, queries=100)
    with pytest.raises(ValueError, match="delta and lr"):
        SPSA(delta=0)

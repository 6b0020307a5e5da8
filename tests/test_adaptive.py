"""The strong adaptive attack ``adaptive`` (issue 4, item 5; PROTOCOL.md "Strong adaptive attack")
on tiny models: inside the ball, breaks an undefended model, sees through a shattered
gradient with BPDA, expected vs worst case over fresh draws, intervals, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prepdefense import attacks, seeding
from prepdefense.attacks.adaptive import AdaptiveAttack
from prepdefense.attacks.verdict import bootstrap_interval, wilson_interval
from prepdefense.draws import DrawKey, Params
from prepdefense.defenses import Defended
from prepdefense.defenses.base import Defense
from prepdefense.metrics import l2_rms, linf


# Tiny models: one torch thread avoids oversubscription (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


class Quantize(Defense):
    def apply(self, x, params=None):
        return torch.round(x * 8) / 8


class NoisyQuantize(Defense):
    randomized = True

    def draw(self, x, generator):
        return Params(offset=seeding.randn(x.shape, generator, device=x.device) * 0.15)

    def apply(self, x, params):
        return (torch.round(x * 8) / 8 + params["offset"]).clamp(0, 1)


def _problem(n=8, seed=0):
    torch.manual_seed(seed)  # test-only: weights and images of a tiny problem
    clf = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.rand(n, 3, 8, 8)
    labels = clf(x).argmax(1)
    targets = (labels + 1 + torch.arange(n) % 9) % 10
    return clf, x, labels, targets


def test_defaults_follow_the_protocol():
    a = attacks.create("adaptive")
    assert a.steps >= 200 and a.eot >= 30 and a.draws >= 10
    assert set(a.losses) == {"ce", "margin"} and a.norm == "l2" and a.eps == 0.05
    assert attacks.create("adaptive", norm="linf").eps == pytest.approx(8 / 255)


@pytest.mark.parametrize("norm,eps", [("l2", 0.05), ("linf", 8 / 255)])
def test_stays_inside_the_ball(norm, eps):
    clf, x, y, t = _problem()
    a = AdaptiveAttack(norm=norm, eps=eps, steps=15, eot=2, draws=3)
    res = a(Defended(NoisyQuantize(), clf), x, labels=y, targets=t, generator=seeding.make_generator(0))
    d = l2_rms(res.adversarial, x) if norm == "l2" else linf(res.adversarial, x)
    assert float(d.max()) <= eps * (1 + 1e-4)
    assert res.adversarial.min() >= 0 and res.adversarial.max() <= 1


def test_project():
    x = torch.rand(2, 3, 4, 4)
    far = x + 10 * torch.randn(2, 3, 4, 4)
    p = AdaptiveAttack(norm="l2").project(far, x, 0.5)
    assert torch.all((p - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5)
    p = AdaptiveAttack(norm="linf").project(far, x, 0.1)
    assert float((p - x).abs().max()) <= 0.1 + 1e-6 and p.min() >= 0 and p.max() <= 1


@pytest.mark.parametrize("targeted", [False, True])
def test_breaks_an_undefended_model(targeted):
    clf, x, y, t = _problem()
    a = AdaptiveAttack(norm="l2", eps=0.5, steps=30, eot=1, draws=1)
    res = a(clf, x, labels=y, targets=t if targeted else None, generator=seeding.make_generator(0))
    assert res.info["asr_expected"] == 1.0
    pred = clf(res.adversarial).argmax(1)
    assert torch.all(pred == t) if targeted else torch.all(pred != y)


def test_bpda_sees_through_a_shattered_gradient():
    clf, x, y, t = _problem()
    model = Defended(Quantize(), clf)
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(model(xr).sum(), xr, allow_unused=True)
    assert gx is None  # the quantiser runs under no_grad: no gradient reaches the input
    res = AdaptiveAttack(norm="linf", eps=0.3, steps=30, eot=1, draws=1)(model, x, labels=y, generator=seeding.make_generator(0))
    assert res.info["robust_accuracy_expected"] <= 0.25


def test_expected_vs_worst_case_and_intervals():
    clf, x, y, t = _problem(n=12)
    model = Defended(NoisyQuantize(), clf)
    a = AdaptiveAttack(norm="l2", eps=0.08, steps=10, eot=4, draws=10)
    info = a(model, x, labels=y, generator=seeding.make_generator(3)).info
    assert info["draws"] == 10 and info["n"] == 12
    assert info["robust_accuracy_worst"] <= info["robust_accuracy_expected"] + 1e-12
    assert info["asr_worst"] >= info["asr_expected"] - 1e-12
    for k in ("robust_accuracy_expected", "robust_accuracy_worst", "asr_expected", "asr_worst"):
        lo, hi = info[k + "_ci95"]
        assert 0 <= lo <= info[k] <= hi <= 1, k
    # untargeted: accuracy and success are complements draw by draw
    assert info["robust_accuracy_expected"] + info["asr_expected"] == pytest.approx(1.0)
    # per-image fractions average to the expected figures
    assert sum(info["per_image_correct_fraction"]) / 12 == pytest.approx(info["robust_accuracy_expected"])


def test_reproducible_from_the_seed():
    clf, x, y, t = _problem(n=4)
    model = Defended(NoisyQuantize(), clf)
    a = AdaptiveAttack(norm="linf", eps=0.05, steps=6, eot=3, draws=4)
    r1 = a(model, x, labels=y, targets=t, generator=seeding.make_generator(5))
    r2 = a(model, x, labels=y, targets=t, generator=seeding.make_generator(5))
    assert torch.equal(r1.adversarial, r2.adversarial)
    assert r1.info["asr_expected"] == r2.info["asr_expected"]
    r3 = a(model, x, labels=y, targets=t, generator=seeding.make_generator(6))
    assert not torch.equal(r1.adversarial, r3.adversarial)


def test_wilson_and_bootstrap():
    lo, hi = wilson_interval(5, 10)
    assert lo < 0.5 < hi and (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-3)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    v = torch.tensor([0.0, 1.0] * 50)
    lo, hi = bootstrap_interval(v, seed=0)
    assert bootstrap_interval(v, seed=0) == (lo, hi)  # seeded: reports repeat
    assert lo < 0.5 < hi and hi - lo < 0.3
    assert math.isnan(wilson_interval(0, 0)[0])


def test_bootstrap_interval_never_claims_more_certainty_than_the_sample_size_gives():
    """A sample with no spread (every image robust on 0 of 10 draws) does not get the
    percentile bootstrap's point interval: the pseudo-images give it about the width of the
    Wilson interval of the same mean; a sample with spread keeps its bootstrap interval."""
    lo, hi = bootstrap_interval([0.0] * 100)
    assert lo == 0.0 and wilson_interval(0, 100)[1] <= hi <= 0.07
    lo, hi = bootstrap_interval([1.0] * 100)
    assert hi == 1.0 and 0.93 <= lo <= wilson_interval(100, 100)[0]
    lo, hi = bootstrap_interval([0.5] * 100)  # every image fooled on half the draws: narrow, not a point
    assert lo < 0.5 < hi and hi - lo < 0.1
    spread = torch.tensor([0.0, 1.0] * 50)
    assert bootstrap_interval(spread) == pytest.approx(wilson_interval(50, 100), abs=0.03)
    for bad in ([0.0, 1.5], [float("nan")], [-0.1]):
        with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
            bootstrap_interval(bad)

"""Diagnostics of a strong evaluation (issue 4, item 6; Carlini et al. 2019 checklist)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prepdefense import seeding
from prepdefense.attacks.adaptive import AdaptiveAttack
from prepdefense.attacks.diagnostics import format_diagnostics, gradient_agreement, run_diagnostics
from prepdefense.draws import DrawKey, Params
from prepdefense.defenses import Defended
from prepdefense.defenses.base import Defense


# Tiny models: one torch thread avoids oversubscription (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


class NoisyQuantize(Defense):
    randomized = True

    def draw(self, x, generator):
        return Params(offset=seeding.randn(x.shape, generator, device=x.device) * 0.1)

    def apply(self, x, params):
        return (torch.round(x * 8) / 8 + params["offset"]).clamp(0, 1)


class Staircase(nn.Module):
    """A classifier with a masked (all-zero) gradient: it rounds its input internally."""

    def __init__(self, clf):
        super().__init__()
        self.clf = clf

    def forward(self, x):
        return self.clf(torch.round(x * 2) / 2)


class NaNGradient(nn.Module):
    """Finite outputs, NaN gradients (d sqrt(u)/du at u = 0 times 0)."""

    def __init__(self, clf):
        super().__init__()
        self.clf = clf

    def forward(self, x):
        return self.clf(x) + (x * 0).flatten(1).sum(1, keepdim=True).sqrt()


def _problem(n=6):
    torch.manual_seed(0)  # test-only: a tiny problem
    clf = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.rand(n, 3, 8, 8)
    return clf, x, clf(x).argmax(1)


def test_healthy_evaluation_has_every_check_and_no_warning():
    clf, x, y = _problem()
    model = Defended(NoisyQuantize(), clf)
    atk = AdaptiveAttack(norm="l2", eps=0.5, steps=10, eot=3, draws=3)
    main = atk(model, x, labels=y, generator=seeding.make_generator(0))
    d = run_diagnostics(atk, model, clf, x, labels=y, generator=seeding.make_generator(1), n=4, gradient_draws=5, main_result=main)
    assert d["n"] == 4
    assert set(d) >= {"steps", "undefended", "unbounded", "gradients", "randomized", "warnings"}
    assert d["steps"]["k"] == 10 and d["steps"]["2k"] == 20
    assert d["undefended"]["success"] == 1.0 and d["unbounded"]["success"] == 1.0
    g = d["gradients"]
    assert g["draws"] == 5 and 0 < g["mean_cosine_to_mean"] <= 1 + 1e-6 and 0 < g["mean_norm_ratio"] <= 1 + 1e-6
    assert g["zero_fraction"] == 0 and g["nonfinite_fraction"] == 0
    assert d["warnings"] == [], d["warnings"]
    text = format_diagnostics(d)
    assert "no warnings" in text and "undefended" in text and "unbounded" in text


def test_zero_gradients_are_flagged():
    clf, x, y = _problem()
    model = Staircase(clf)
    atk = AdaptiveAttack(norm="l2", eps=0.05, steps=5, eot=1, draws=1)
    t = (y + 3) % 10
    d = run_diagnostics(atk, model, clf, x, labels=y, targets=t, generator=seeding.make_generator(0), n=4, doubling=False, gradient_draws=3)
    assert d["gradients"]["zero_fraction"] == 1.0
    text = format_diagnostics(d)
    assert "WARNING" in text and "zero" in text
    # the masked model resists even an unbounded (targeted) attack: flagged as well
    assert d["unbounded"]["success"] < 0.95 and any("unbounded" in w for w in d["warnings"])


def test_nan_gradients_are_flagged():
    clf, x, y = _problem()
    model = NaNGradient(clf)
    g = gradient_agreement(model, x, y, None, draws=2, generator=seeding.make_generator(0))
    assert g["nonfinite_fraction"] == 1.0
    atk = AdaptiveAttack(norm="linf", eps=0.03, steps=3, eot=1, draws=1)
    main = atk(model, x, labels=y, generator=seeding.make_generator(0))
    assert main.info["gradient_stats"]["nonfinite_gradients"] > 0
    d = run_diagnostics(atk, model, None, x, labels=y, generator=seeding.make_generator(0), n=3,
                        doubling=False, unbounded=False, undefended=False, gradient_draws=2, main_result=main)
    assert any("NaN" in w for w in d["warnings"]) and any("non-finite" in w for w in d["warnings"])


def test_gradient_variance_reflects_randomness():
    clf, x, y = _problem()
    det = gradient_agreement(clf, x, y, None, draws=8, generator=seeding.make_generator(0))
    assert det["draws"] == 1 and abs(det["mean_cosine_to_mean"] - 1) < 1e-5
    rnd = gradient_agreement(Defended(NoisyQuantize(), clf), x, y, None, draws=8, generator=seeding.make_generator(0))
    assert rnd["draws"] == 8 and rnd["mean_cosine_to_mean"] < 0.9999

"""The attack ensemble (``prepdefense.attacks.ensemble``, issue 10 item 4): auto-attack's rule,
the per-image worst case over attacks, which attack broke each image, the checklist flags, the
budgets and their costs, the library boundary. A tiny random-weight 32x32 classifier stands in
for the real model."""

from __future__ import annotations

import pytest
import torch

from prepdefense import defenses
from prepdefense.attacks import ensemble as E
from prepdefense.defenses import Defended
from prepdefense.defenses.base import Defense
from toy_models import TinyConvNet

pytestmark = pytest.mark.usefixtures("one_thread")


class Invert(Defense):
    """``1 - x``: deterministic and declared without a gradient, so identity BPDA points the
    gradient attacks the wrong way while a gradient-free attack, which only queries the
    outputs, is not fooled: gradient masking by construction."""

    def apply(self, x, params):
        return 1.0 - x


def _batch(n=12, seed=3):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _labels(model, x):
    with torch.no_grad():
        return model(x, generator=0).argmax(1) if getattr(model, "randomized", False) else model(x).argmax(1)


def _budget(*attacks, **kw):
    kw = {"check_images": 4, "unbounded_steps": 5, "curve_steps": 3, "curve_fractions": (0.5,), **kw}
    return E.Budget("test", "a test budget", tuple(attacks), **kw)


def _spec(name, eot=1, **params):
    return E.EnsembleAttack(name, tuple(params.items()), eot)


def test_state_keeps_the_per_image_worst_case():
    # Three images, R = 4 draws. Clean: image 2 already misclassified on one draw.
    clean = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    st = E.EnsembleState(clean)
    assert st.robust_rows().tolist() == [0, 1, 2] and st.broken_by == [None, None, "clean"]
    a = E.StepOutcome("a", "white-box", torch.tensor([0, 1, 2]),
                      torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool), None, torch.tensor([0.1, 0.2, 0.3]))
    assert st.apply(a) == {"ran_on": 3, "broke": 1, "lowered": 2}
    assert st.broken_by == [None, "a", "clean"] and st.kept_from == ["clean", "a", "a"]
    assert st.robust_rows().tolist() == [0, 1]  # image 2 is fooled on every draw: never attacked again
    # b: as bad as a on image 1 (a's example stays: ties keep the earlier one), worse on image 0.
    b = E.StepOutcome("b", "gradient-free", torch.tensor([0, 1]), torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.bool),
                      None, torch.tensor([0.4, 0.5]))
    assert st.apply(b) == {"ran_on": 2, "broke": 1, "lowered": 1}
    assert st.broken_by == ["b", "a", "clean"] and st.kept_from == ["b", "a", "a"]
    assert st.distance.tolist() == pytest.approx([0.4, 0.2, 0.3])
    assert not st.robust_worst().any()
    rows, final = E.per_attack_figures(clean, [a, b])
    assert [r["broke"] for r in rows] == [1, 1] and rows[1]["after"]["robust_accuracy_worst"] == 0.0
    assert rows[0]["success_worst"] == pytest.approx(2 / 3) and rows[0]["success_worst_ci95"][0] < 2 / 3 < rows[0]["success_worst_ci95"][1]
    assert torch.equal(final.correct, st.correct)


def test_auto_attack_rule_on_a_random_defense():
    model = Defended(defenses.create("grid-distort"), TinyConvNet())
    x = _batch(6)
    y = _labels(model, x)
    key = E.root_key(0, 6)
    st = E.start(model, x, y, draws=10, key=key)
    assert st.draws == 10
    budget = E.BUDGETS["smoke"]
    ran = []
    for spec in budget.attacks:
        before = st.robust_rows()
        step = E.attack_step(spec, model, x, y, st, key, norm="linf", eps=0.03, num_classes=10)
        assert torch.equal(step.rows, before)  # only the images correct on some verdict draw
        assert step.correct.shape == (before.numel(), 10)
        ran.append(int(before.numel()))
        st.apply(step)
    # The whole run, from the same key, does exactly this.
    res = E.evaluate(model, x, labels=y, norm="linf", eps=0.03, budget=budget, generator=key)
    assert [r["ran_on"] for r in res.per_attack] == ran and ran[0] == int(E.start(model, x, y, draws=10, key=key).correct.any(1).sum())
    assert torch.equal(torch.tensor([p["robust_worst"] for p in res.per_image]), st.robust_worst())
    assert [p["correct_fraction"] for p in res.per_image] == pytest.approx(st.correct.float().mean(1).tolist())
    for p in res.per_image:
        assert (p["broken_by"] is None) == p["robust_worst"]
        assert p["broken_by"] in (None, "clean", *[a.label for a in budget.attacks])
    assert res.draws == 10 and res.robust["draws"] == 10
    assert res.robust["robust_accuracy_worst"] <= res.robust["robust_accuracy_expected"] <= res.clean["robust_accuracy_expected"] + 1e-9
    assert all(0 <= v <= 1 for v in res.robust["robust_accuracy_expected_ci95"] + res.robust["robust_accuracy_worst_ci95"])


def test_masking_flag_when_a_gradient_free_attack_wins():
    clf = TinyConvNet()
    budget = _budget(_spec("apgd-ce", steps=10), _spec("transfer", steps=5), _spec("square", queries=200))
    x = _batch()
    masked = Defended(Invert(), clf)
    res = E.evaluate(masked, x, labels=_labels(masked, x), eps=0.05, budget=budget, generator=0)
    by = {r["attack"]: r for r in res.per_attack}
    assert by["apgd-ce"]["ran_on"] == 12 and by["apgd-ce"]["broke"] == 0
    assert by["square"]["broke"] > 0 and by["square"]["ran_on"] == 12 - by["transfer"]["broke"]
    assert res.flags["masking"]["warning"] and res.flags["masking"]["broke_after_gradient_attacks"] == by["square"]["broke"]
    assert any("gradient masking" in w for w in res.flags["warnings"])
    assert not res.flags["unbounded"]["reached"]  # the unbounded white-box attack fails too
    assert any("unbounded" in w for w in res.flags["warnings"])
    assert {p["broken_by"] for p in res.per_image} >= {"square"}
    # The same classifier without the masking defense: the gradient attack breaks everything first.
    calls = []
    res = E.evaluate(clf, x, labels=_labels(clf, x), eps=0.05, budget=budget, generator=0, progress=lambda d, t: calls.append((d, t)))
    assert calls and all(d <= t + 1e-9 for d, t in calls) and calls[-1][0] == pytest.approx(calls[-1][1])
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert res.per_attack[0]["broke"] == 12 and res.per_attack[2]["ran_on"] == 0
    assert not res.flags["masking"]["warning"] and res.flags["unbounded"]["reached"] and res.flags["warnings"] == []
    assert res.flags["more_steps"]["skipped"].startswith("no image left robust")
    assert res.robust["robust_accuracy_worst"] == 0.0 and res.adversarial.shape == x.shape
    assert float((res.adversarial - x).abs().max()) <= 0.05 + 1e-6
    assert [p["fraction"] for p in res.curve] == [0.0, 0.5, 1.0] and res.curve[-1]["source"] == "ensemble"


def test_checklist_flags_words():
    row = lambda name, kind, broke: {"attack": name, "kind": kind, "broke": broke, "lowered": broke}  # noqa: E731
    flags = E.checklist_flags([row("apgd-ce", "white-box", 3), row("square", "gradient-free", 0)],
                              more_steps={"attack": "apgd-ce", "steps": 10, "steps_doubled": 20, "n": 4, "newly_broken_worst": 2,
                                          "success_k": 0.1, "success_2k": 0.6, "helps": True},
                              unbounded={"attack": "apgd-ce", "eps": 1.0, "steps": 5, "n": 2, "success_expected": 1.0, "reached": True,
                                         "threshold": E.UNBOUNDED_MIN_SUCCESS})
    assert not flags["masking"]["warning"] and flags["transfer"]["skipped"]
    assert len(flags["warnings"]) == 1 and "have not converged" in flags["warnings"][0]
    flags = E.checklist_flags([row("apgd-ce", "white-box", 0), row("transfer", "transfer", 1)])
    assert flags["transfer"]["warning"] and flags["masking"]["skipped"] == "no gradient-free attack in this budget"


def test_budgets_and_their_costs():
    aa = E.BUDGETS["autoattack-rand"]
    assert [(a.name, a.steps, a.eot, a.kwargs.get("restarts")) for a in aa.attacks] == [("apgd-ce", 100, 20, 1), ("apgd-dlr", 100, 20, 1)]
    assert aa.cost(True)["gradient"] == 2 * 101 * 20 and aa.cost(False)["gradient"] == 2 * 101
    assert aa.cost(True)["forward"] == 2 * 1 + 10 * 3 and aa.cost(False)["forward"] == 2 + 3
    for name in E.PUBLIC_BUDGETS:
        b = E.BUDGETS[name]
        assert name in E.budget_help() and "forward+backward" in b.describe()
        kinds = {a.kind for a in b.attacks}
        if name != "autoattack-rand":
            assert kinds == {"white-box", "transfer", "gradient-free"}, name
        assert ("spsa" in [a.name for a in b.attacks]) == (name in ("standard", "paper")), name
    costs = [E.BUDGETS[n].cost(True)["gradient"] + E.BUDGETS[n].cost(True)["forward"] for n in ("quick", "standard", "paper")]
    assert costs == sorted(costs)
    assert E.BUDGETS["quick"].attacks[0].build(norm="linf", eps=0.03, randomized=False).eot == 1  # no point drawing
    with pytest.raises(KeyError, match="known"):
        E.get_budget("huge")
    with pytest.raises(ValueError):
        E.EnsembleAttack("fgsm")


def test_inputs_are_checked_at_the_boundary():
    clf = TinyConvNet()
    x = _batch(2)
    y = _labels(clf, x)
    with pytest.raises(ValueError, match="draws"):
        E.evaluate(clf, x, labels=y, draws=5)
    with pytest.raises(ValueError):
        E.evaluate(clf, x * 255, labels=y)
    with pytest.raises(ValueError):
        E.evaluate(clf, x, labels=y[:1])
    with pytest.raises(ValueError):
        E.evaluate(clf, x, labels=torch.tensor([0, 12]))  # outside the model's 10 classes
    with pytest.raises(ValueError, match="norm"):
        E.evaluate(clf, x, labels=y, norm="l3")
    with pytest.raises(ValueError, match="eps"):
        E.evaluate(clf, x, labels=y, eps=-1.0)
    with pytest.raises(TypeError):
        E.evaluate(lambda t: t, x, labels=y)


def test_two_classes_skip_dlr():
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    x = _batch(3)
    res = E.evaluate(clf, x, labels=_labels(clf, x), budget=_budget(_spec("apgd-dlr", steps=2), _spec("apgd-ce", steps=2)), checks=False,
                     with_curve=False, generator=1)
    assert "3 classes" in res.per_attack[0]["skipped"] and res.per_attack[0]["ran_on"] == 0

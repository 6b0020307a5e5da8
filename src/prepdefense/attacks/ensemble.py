"""The attack ensemble and its verdict: how robust a (defended) model is at one radius
(issue 10, item 4; Croce & Hein 2020's AutoAttack protocol, Carlini et al. 2019's checklist).

:func:`evaluate` attacks ``model`` on ``x`` with every attack of a :class:`Budget`, in order,
untargeted, inside the Linf or L2 ball of radius ``eps`` (L2 in the paper's RMS unit,
:mod:`.ball`):

1. **Clean verdict.** The clean images are judged on ``draws`` (R >= 10) fresh draws of the
   model (the run key's sub-stream ``("verdict", r)``, :mod:`.verdict`; one pass for a
   deterministic model). Each image's *kept example* starts as the clean image.
2. **Auto-attack's rule.** Each attack runs only on the images still robust: those whose kept
   example is classified correctly on at least one of the R verdict draws (for a
   deterministic model: still classified correctly). An image whose kept example is fooled
   on every draw cannot get worse and is not attacked again.
3. **Per-image worst case over attacks.** Every attack's examples are judged on the same R
   verdict draws (the draws never seen while attacking; paired across attacks). An example
   replaces the kept one when it is classified correctly on fewer draws (ties: the earlier
   attack's example stays). So per image the kept example is the one with the lowest
   expected accuracy over the draws, and the image is *broken in the worst case* as soon as
   any attack's example fools any draw. ``broken_by`` names that first attack (``clean``
   when a draw misclassifies the clean image), ``kept_from`` the attack whose example is kept.
4. **Figures** (:func:`~.verdict.summarize`): robust accuracy expected over draws (mean over
   images of the fraction of draws classified correctly) with a percentile-bootstrap 95%
   interval (two pseudo-images at 0 and at 1, :func:`~.verdict.bootstrap_interval`), and worst case (fraction of images classified correctly under every draw) with a
   Wilson 95% interval; the same after every attack (cumulative, as AutoAttack prints), and
   each attack's success on the images it ran on.

The selection among attacks uses the verdict draws (as AutoAttack's evaluation on the fly
does); on a deterministic model it is exact.

Attacks (registry names; :class:`EnsembleAttack`): ``apgd-ce`` / ``apgd-dlr`` (through
``with_bpda(model)``: the real gradient of differentiable defenses, identity BPDA through the
others), ``adaptive`` (EOT-PGD with BPDA), ``transfer`` (PGD on the bare classifier),
``square`` and ``spsa`` (gradient-free: they query the defended model as deployed). On a
deterministic model every EOT is 1 (the mean of identical draws is one draw).

**Checklist flags** (Carlini et al. 2019, Section 5; :func:`checklist_flags`):

* *masking*: a gradient-free attack (Square, SPSA) broke images the gradient attacks before it
  left robust -- the gradient is masked, or the gradient attacks are too weak;
* *transfer*: the transfer attack broke images the white-box attacks left robust (same reading);
  ``transfer_tried`` says whether the budget holds one;
* *unbounded*: the strongest white-box gradient attack with a radius covering the whole box
  (``eps`` 1 in either unit) on a few images (the most robust first) must fool
  (expected over draws) at least :data:`UNBOUNDED_MIN_SUCCESS` of them;
* *more steps*: the strongest white-box gradient attack at twice its steps, on up to
  ``check_images`` images still robust after the ensemble: it must not break more (worst case)
  nor raise the expected success by more than :data:`DOUBLING_TOLERANCE` over the same attack
  at its own steps on those images;
* *gradients*: the attacks' counts of all-zero and non-finite gradients.

The unbounded and more-steps checks together cost at most :data:`CHECK_SHARE` of the
ensemble's counted passes (at least one image each); the result says which images they used.

**Accuracy vs epsilon** (:func:`curve`): the strongest white-box gradient attack at a reduced
budget (``curve_steps``) at the radii ``eps * f`` for ``f`` in ``curve_fractions``, smallest
first, each radius attacking only images still robust at the one below (an example inside a
smaller ball is inside the larger one); the point at 0 is the clean verdict and the point at
``eps`` the ensemble's.

**Cost** is counted in model passes per image: forward+backward passes (a gradient step's
classifier call) and forward-only passes, as upper bounds (every attack on every image;
:meth:`Budget.cost`), and measured (images through the classifier, :class:`PassCounter`).

Shape: x (N, C, H, W) in [0, 1]; labels (N,) int64.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..draws import DrawKey, KeyLike
from ..metrics import l2_rms, linf
from ..model_state import eval_mode
from ..validation import check_int
from .ball import check_eps
from .base import _num_classes, check_attack_inputs, check_model, root_key
from .bpda import with_bpda
from .diagnostics import DOUBLING_TOLERANCE, UNBOUNDED_MIN_SUCCESS
from .transfer import inner_classifier
from .verdict import bootstrap_interval, judge_on_draws, summarize, wilson_interval

__all__ = [
    "MIN_DRAWS", "CHECK_SHARE", "UNBOUNDED_EPS", "GRADIENT_FREE", "WHITE_BOX", "EnsembleAttack", "Budget", "BUDGETS",
    "PUBLIC_BUDGETS", "get_budget", "budget_help", "EnsembleState", "StepOutcome", "EnsembleResult", "PassCounter",
    "start", "attack_step", "run_attack", "curve_probe", "curve_step", "curve_points", "per_image_rows", "annotate", "check_count", "per_attack_figures", "strongest_gradient_attack", "unbounded_check", "more_steps_check",
    "curve", "checklist_flags", "evaluate", "check_inputs", "DOUBLING_TOLERANCE", "UNBOUNDED_MIN_SUCCESS",
]

#: Fewest fresh draws a kept example is judged on (PROTOCOL.md: R >= 10).
MIN_DRAWS = 10
#: Share of the ensemble's counted passes the unbounded and more-steps checks may add.
CHECK_SHARE = 0.25
#: Radius of the unbounded check, in the attack's unit: Linf 1 or RMS L2 1 covers the [0,1] box.
UNBOUNDED_EPS = 1.0

#: Attacks that never use a gradient of the model (they query the defended model as deployed).
GRADIENT_FREE = ("square", "spsa")
#: Attacks that differentiate the defended model (with BPDA through what has no gradient).
WHITE_BOX = ("apgd", "apgd-ce", "apgd-dlr", "adaptive")
_TRANSFER = ("transfer",)
_APGD = ("apgd", "apgd-ce", "apgd-dlr")


# ---------------------------------------------------------------------------------------------
# budgets
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EnsembleAttack:
    """One attack of a budget: its registry ``name``, its hyperparameters and its EOT.

    Attributes:
        name: registry name (``apgd-ce``, ``apgd-dlr``, ``adaptive``, ``transfer``, ``square``,
            ``spsa``).
        params: hyperparameters, as sorted ``(name, value)`` pairs (hashable; see :attr:`kwargs`).
        eot: draws per objective evaluation on a random model (the attack's ``eot``; ignored by
            ``transfer`` and ``spsa``, which have none, and 1 on a deterministic model).
        label: the name it is reported under (default ``name``; unique within a budget).
    """

    name: str
    params: Tuple[Tuple[str, Any], ...] = ()
    eot: int = 1
    label: str = ""

    def __post_init__(self) -> None:
        if self.name not in WHITE_BOX + _TRANSFER + GRADIENT_FREE:
            raise ValueError(f"the ensemble runs {', '.join(WHITE_BOX + _TRANSFER + GRADIENT_FREE)}; got {self.name!r}")
        object.__setattr__(self, "eot", check_int(self.eot, "eot"))
        if not self.label:
            object.__setattr__(self, "label", self.name)
        object.__setattr__(self, "params", tuple(sorted(dict(self.params).items())))

    @property
    def kwargs(self) -> Dict[str, Any]:
        return dict(self.params)

    @property
    def kind(self) -> str:
        """``white-box``, ``transfer`` or ``gradient-free``."""
        return "white-box" if self.name in WHITE_BOX else "transfer" if self.name in _TRANSFER else "gradient-free"

    @property
    def steps_param(self) -> str:
        """The hyperparameter that sets the attack's length (``queries`` for Square)."""
        return "queries" if self.name == "square" else "steps"

    @property
    def steps(self) -> int:
        return int(self.kwargs.get(self.steps_param, _DEFAULT_STEPS[self.name]))

    def replace(self, *, eot: Optional[int] = None, label: Optional[str] = None, **params: Any) -> "EnsembleAttack":
        """A copy with hyperparameters (and ``eot``/``label``) replaced."""
        return EnsembleAttack(self.name, tuple({**self.kwargs, **params}.items()), self.eot if eot is None else eot,
                              self.label if label is None else label)

    def effective_eot(self, randomized: bool) -> int:
        return int(self.eot) if randomized and self.name in _APGD + ("adaptive", "square") else 1

    def build(self, *, norm: str, eps: float, randomized: bool, batch_size: Optional[int] = None,
              progress: Optional[Callable[..., None]] = None):
        """The attack object (``attacks.create``) for this threat model and model kind."""
        from . import create

        kw: Dict[str, Any] = {**self.kwargs, "norm": norm, "eps": eps}
        if self.name in _APGD + ("adaptive", "square"):
            kw["eot"] = self.effective_eot(randomized)
        if self.name == "adaptive":
            kw["draws"] = 1  # the ensemble judges every example on its own verdict draws
        if batch_size is not None:
            kw["batch_size"] = int(batch_size)
        if progress is not None:
            kw["progress"] = progress
        return create(self.name, **kw)

    def cost(self, randomized: bool) -> Tuple[float, float]:
        """Per image, at most: (forward+backward passes, forward-only passes) of the attack
        alone (the ensemble adds the verdict's draws; :meth:`Budget.cost`)."""
        kw, e = self.kwargs, self.effective_eot(randomized)
        if self.name in _APGD:
            return float(int(kw.get("restarts", 1)) * (self.steps + 1) * e), 1.0
        if self.name == "adaptive":
            restarts = kw.get("restarts") or len(_losses(kw.get("losses", ("ce", "margin"))))
            return float(int(restarts) * self.steps * e), 1.0
        if self.name == "transfer":
            return float(self.steps), 1.0
        if self.name == "square":
            return 0.0, float(self.steps * e + 1)
        samples = int(kw.get("samples", 128))
        steps = int(kw["queries"]) // (2 * samples) if kw.get("queries") else self.steps
        return 0.0, float(steps * (2 * samples + (0 if randomized else 1)) + 1)

    def describe(self, randomized: Optional[bool] = None) -> str:
        """``apgd-ce (steps 20, EOT 4)`` -- EOT shown when it applies."""
        parts = [f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in self.params]
        if self.name in _APGD + ("adaptive", "square") and (randomized is None or randomized):
            parts.append(f"EOT {self.eot}" + (" on a random defense" if randomized is None else ""))
        return f"{self.label} ({', '.join(parts)})" if parts else self.label

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "label": self.label, "kind": self.kind, "params": self.kwargs, "eot": self.eot}


_DEFAULT_STEPS = {"apgd": 100, "apgd-ce": 100, "apgd-dlr": 100, "adaptive": 200, "transfer": 50, "square": 5000, "spsa": 100}


def _losses(v: Any) -> Tuple[str, ...]:
    return tuple(s.strip() for s in v.split(",")) if isinstance(v, str) else tuple(v)


def _fmt(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "+".join(map(str, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _a(name: str, eot: int = 1, label: str = "", **params: Any) -> EnsembleAttack:
    return EnsembleAttack(name, tuple(params.items()), eot, label)


@dataclass(frozen=True)
class Budget:
    """A preset of the ensemble: its attacks in order, the checks' and the curve's sizes.

    Attributes:
        name, summary: what it is called and one line on what it is for.
        attacks: the attacks, run in this order (cheap white-box ones first, then transfer,
            then the gradient-free ones, so that what a later kind breaks is what the earlier
            kinds missed).
        check_images: most images the unbounded and more-steps checks run on.
        unbounded_steps: steps of the unbounded check's attack.
        curve_fractions: radii of the accuracy-vs-epsilon curve below ``eps``, as fractions of it.
        curve_steps: steps of the curve's attack (its EOT is the attack's, capped at ``curve_eot``).
        curve_eot: most EOT draws of the curve's attack on a random model.
    """

    name: str
    summary: str
    attacks: Tuple[EnsembleAttack, ...]
    check_images: int = 4
    unbounded_steps: int = 10
    curve_fractions: Tuple[float, ...] = (0.25, 0.5)
    curve_steps: int = 10
    curve_eot: int = 4

    def __post_init__(self) -> None:
        labels = [a.label for a in self.attacks]
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"a budget needs attacks with distinct labels, got {labels}")
        if any(not 0 < f < 1 for f in self.curve_fractions):
            raise ValueError(f"curve_fractions must lie in (0, 1), got {self.curve_fractions}")
        object.__setattr__(self, "curve_fractions", tuple(sorted(self.curve_fractions)))

    def cost(self, randomized: bool, draws: int = MIN_DRAWS) -> Dict[str, Any]:
        """Model passes per image, at most (every attack on every image, no check or curve):
        ``gradient`` (forward+backward), ``forward`` (forward only, the verdict's R draws per
        attack and for the clean images included), per attack and in all."""
        r = int(draws) if randomized else 1
        per = {a.label: a.cost(randomized) for a in self.attacks}
        grad = sum(g for g, _ in per.values())
        fwd = sum(f for _, f in per.values()) + r * (len(self.attacks) + 1)
        return {"randomized": bool(randomized), "draws": r, "gradient": grad, "forward": fwd,
                "per_attack": {k: {"gradient": g, "forward": f + r} for k, (g, f) in per.items()}}

    def describe(self) -> str:
        """The budget in one paragraph: attacks, and cost per image on a deterministic and a
        random defense."""
        d, r = self.cost(False), self.cost(True)
        return (f"{self.name}: {self.summary} Attacks: {'; '.join(a.describe() for a in self.attacks)}. Cost per image, at "
                f"most: {d['gradient']:,.0f} forward+backward + {d['forward']:,.0f} forward passes on a deterministic defense, "
                f"{r['gradient']:,.0f} + {r['forward']:,.0f} on a random one (R = {MIN_DRAWS} verdict draws).")

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "summary": self.summary, "attacks": [a.as_dict() for a in self.attacks],
                "check_images": self.check_images, "unbounded_steps": self.unbounded_steps,
                "curve_fractions": list(self.curve_fractions), "curve_steps": self.curve_steps, "curve_eot": self.curve_eot}

    def with_overrides(self, **fields: Any) -> "Budget":
        return dataclasses.replace(self, **fields)


BUDGETS: Dict[str, Budget] = {
    "quick": Budget(
        "quick",
        "a first look in a minute or two on a CPU (10 images at 224 px); a defense broken here is broken, one that survives is not shown robust.",
        (_a("apgd-ce", 4, steps=20), _a("apgd-dlr", 4, steps=20), _a("adaptive", 4, steps=20, losses=("margin",)),
         _a("transfer", steps=20), _a("square", 2, queries=300)),
        check_images=4, unbounded_steps=10, curve_fractions=(0.25, 0.5), curve_steps=10, curve_eot=2,
    ),
    "standard": Budget(
        "standard",
        "a fuller evaluation: longer white-box attacks, Square with 1000 queries and SPSA.",
        (_a("apgd-ce", 10, steps=50), _a("apgd-dlr", 10, steps=50), _a("adaptive", 10, steps=100, losses=("ce", "margin")),
         _a("transfer", steps=50), _a("square", 4, queries=1000), _a("spsa", steps=20, samples=64)),
        check_images=10, unbounded_steps=20, curve_fractions=(0.25, 0.5), curve_steps=25, curve_eot=4,
    ),
    "autoattack-rand": Budget(
        "autoattack-rand",
        "AutoAttack's version='rand' (Croce & Hein 2020): APGD-CE and APGD-DLR, 100 iterations, EOT 20, one restart each.",
        (_a("apgd-ce", 20, steps=100, restarts=1), _a("apgd-dlr", 20, steps=100, restarts=1)),
        check_images=10, unbounded_steps=25, curve_fractions=(0.25, 0.5), curve_steps=25, curve_eot=4,
    ),
    "paper": Budget(
        "paper",
        "the largest: the protocol's strong attack (EOT-PGD, 200 steps, EOT 30, CE and margin) with AutoAttack's rand APGD, "
        "transfer, Square with 5000 queries and SPSA.",
        (_a("apgd-ce", 20, steps=100), _a("apgd-dlr", 20, steps=100), _a("adaptive", 30, steps=200, losses=("ce", "margin")),
         _a("transfer", steps=100), _a("square", 4, queries=5000), _a("spsa", steps=100, samples=128)),
        check_images=20, unbounded_steps=50, curve_fractions=(0.25, 0.5), curve_steps=50, curve_eot=10,
    ),
    # ``reproduce --preset quick``'s strong-attack section: every kind, short, over many defenses.
    "reproduce-quick": Budget(
        "reproduce-quick",
        "reproduce's quick preset: short runs of every kind (many defenses x 2 norms in about 20 minutes with the rest).",
        (_a("apgd-ce", 2, steps=10), _a("apgd-dlr", 2, steps=10), _a("adaptive", 2, steps=10, losses=("ce",)),
         _a("transfer", steps=10), _a("square", 1, queries=100)),
        check_images=2, unbounded_steps=5, curve_fractions=(0.5,), curve_steps=5, curve_eot=2,
    ),
    # Not for verdicts: a few steps of every kind, for tests and smoke runs.
    "smoke": Budget(
        "smoke",
        "a few steps of every kind, for tests; the numbers mean nothing.",
        (_a("apgd-ce", 2, steps=3), _a("apgd-dlr", 2, steps=3), _a("adaptive", 2, steps=3, losses=("ce",)),
         _a("transfer", steps=3), _a("square", 1, queries=20)),
        check_images=2, unbounded_steps=3, curve_fractions=(0.5,), curve_steps=3, curve_eot=2,
    ),
}

#: The budgets ``prepdefense evaluate --budget`` offers (``reproduce-quick`` serves ``reproduce --preset
#: quick``, ``smoke`` the tests).
PUBLIC_BUDGETS = ("quick", "standard", "autoattack-rand", "paper")


def get_budget(budget: Union[str, Budget]) -> Budget:
    """A :class:`Budget` by name (or itself); KeyError naming the known ones."""
    if isinstance(budget, Budget):
        return budget
    try:
        return BUDGETS[str(budget).strip().lower()]
    except KeyError:
        raise KeyError(f"unknown budget {budget!r}; known: {', '.join(BUDGETS)}") from None


def budget_help(names: Sequence[str] = PUBLIC_BUDGETS) -> str:
    """One paragraph per budget (for ``--help`` and the README)."""
    return "\n".join(BUDGETS[n].describe() for n in names)


# ---------------------------------------------------------------------------------------------
# counting passes
# ---------------------------------------------------------------------------------------------
class PassCounter:
    """Counts images through ``module`` (a forward pre-hook): ``images`` is the running total
    (a gradient step's images are counted once, for their forward; their backward follows)."""

    def __init__(self, module: nn.Module) -> None:
        self.images = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, args) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self.images += int(args[0].shape[0])

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "PassCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# ---------------------------------------------------------------------------------------------
# the state of a run and one attack of it
# ---------------------------------------------------------------------------------------------
@dataclass
class StepOutcome:
    """One attack on the still-robust images: what it ran on and how its examples were judged.

    Attributes:
        label, kind: the attack's label and kind.
        rows: (k,) positions (in the evaluated batch) of the images it ran on.
        correct: (k, R) bool, its examples classified correctly on each verdict draw.
        adversarial: (k, C, H, W) its examples (None when replayed from stored records).
        distance: (k,) their distance to the clean images in the threat model's norm.
        info: what the attack reported (gradient counts...), seconds and counted passes.
    """

    label: str
    kind: str
    rows: torch.Tensor
    correct: torch.Tensor
    adversarial: Optional[torch.Tensor] = None
    distance: Optional[torch.Tensor] = None
    info: Dict[str, Any] = field(default_factory=dict)


class EnsembleState:
    """Per image: the kept example's verdict (N, R), where it came from, what first broke the
    image (module docstring, steps 2-3). ``adversarial`` holds the kept examples when the
    tensors are at hand (None when replaying stored verdicts)."""

    def __init__(self, correct: torch.Tensor, adversarial: Optional[torch.Tensor] = None) -> None:
        self.correct = correct.clone().bool().cpu()
        n = self.correct.shape[0]
        self.adversarial = None if adversarial is None else adversarial.detach().clone()
        self.distance = torch.zeros(n)
        self.kept_from: List[str] = ["clean"] * n
        self.broken_by: List[Optional[str]] = ["clean" if not bool(c.all()) else None for c in self.correct]
        self.history: List[Dict[str, Any]] = []

    def __len__(self) -> int:
        return int(self.correct.shape[0])

    @property
    def draws(self) -> int:
        return int(self.correct.shape[1])

    def robust_rows(self) -> torch.Tensor:
        """Auto-attack's rule: the images classified correctly on at least one verdict draw."""
        return self.correct.any(1).nonzero(as_tuple=True)[0]

    def robust_worst(self) -> torch.Tensor:
        """(N,) bool: classified correctly under every draw."""
        return self.correct.all(1)

    def improves(self, step: StepOutcome) -> torch.Tensor:
        """(k,) bool: which of ``step``'s examples would replace the kept ones (fewer correct draws)."""
        rows = step.rows.cpu().long()
        return step.correct.cpu().bool().float().mean(1) < self.correct[rows].float().mean(1)

    def apply(self, step: StepOutcome) -> Dict[str, int]:
        """Fold one attack's verdicts in: an example with fewer correct draws replaces the kept
        one. Returns ``ran_on``, ``broke`` (images robust in the worst case before, not after)
        and ``lowered`` (images whose kept example it replaced)."""
        rows = step.rows.cpu().long()
        new = step.correct.cpu().bool()
        before_worst = self.robust_worst()
        better = self.improves(step)
        sel = rows[better]
        self.correct[sel] = new[better]
        for j, i in enumerate(rows.tolist()):
            if better[j]:
                self.kept_from[i] = step.label
                if step.distance is not None:
                    self.distance[i] = float(step.distance[j])
                if self.broken_by[i] is None:
                    self.broken_by[i] = step.label
        if self.adversarial is not None and step.adversarial is not None and bool(better.any()):
            self.adversarial[sel.to(self.adversarial.device)] = step.adversarial[better.to(step.adversarial.device)].to(self.adversarial)
        after_worst = self.robust_worst()
        counts = {"ran_on": int(rows.numel()), "broke": int((before_worst & ~after_worst).sum()), "lowered": int(better.sum())}
        self.history.append({"label": step.label, **counts})
        return counts


def check_inputs(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, generator: KeyLike, ids, draws: int):
    """The boundary of the ensemble (as :meth:`Attack.__call__ <.base.Attack.__call__>`):
    returns ``(x, labels, key, num_classes)``; TypeError / ValueError otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module mapping [0,1] NCHW images to logits, got {type(model).__name__}")
    check_model(model)
    if check_int(draws, "draws") < MIN_DRAWS:
        raise ValueError(f"draws must be >= {MIN_DRAWS} (every kept example is judged on at least {MIN_DRAWS} fresh draws), got {draws}")
    x, labels, _ = check_attack_inputs(x, labels, None)
    x = x.detach()
    key = root_key(generator, x.shape[0], ids)
    with eval_mode(model):
        k = _num_classes(model, x, key)
    check_attack_inputs(x, labels, None, num_classes=k)
    return x, labels.to(x.device), key, k


def start(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, draws: int, key: DrawKey, keep_examples: bool = True) -> EnsembleState:
    """The clean verdict: ``x`` judged on ``draws`` fresh draws (module docstring, step 1)."""
    with eval_mode(model):
        judged = judge_on_draws(model, x, labels, None, draws=draws, key=key)
    return EnsembleState(judged["correct"], x if keep_examples else None)


def _distance(norm: str, adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (linf(adv, x) if norm == "linf" else l2_rms(adv, x)).detach().cpu()


def _gradient_model(spec: EnsembleAttack, model: nn.Module) -> nn.Module:
    # APGD refuses a defense without a gradient: BPDA goes on the model side (auto: the real
    # gradient of differentiable defenses and stages, identity through the others).
    return with_bpda(model) if spec.name in _APGD else model


def run_attack(spec: EnsembleAttack, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, key: DrawKey, *,
               norm: str, eps: float, draws: int, batch_size: Optional[int] = None,
               progress: Optional[Callable[..., None]] = None, stream: Tuple[Union[int, str], ...] = ()) -> StepOutcome:
    """Run ``spec`` on every image of ``x`` (no rule applied) and judge its examples on the
    verdict draws of ``key``. The attack draws from ``key``'s sub-stream
    ``("ensemble", label, *stream)``, never from the verdict's."""
    label = spec.label
    randomized = bool(getattr(model, "randomized", False))
    attack = spec.build(norm=norm, eps=eps, randomized=randomized, batch_size=batch_size, progress=progress)
    t0 = time.perf_counter()
    counter = PassCounter(inner_classifier(model))
    try:
        res = attack(_gradient_model(spec, model), x, labels=labels, targets=None, generator=key.child("ensemble", label, *stream))
        adv = res.adversarial.detach()
        with eval_mode(model):
            judged = judge_on_draws(model, adv, labels, None, draws=draws, key=key)
    finally:
        counter.remove()
    info = {"seconds": round(time.perf_counter() - t0, 3), "classifier_images": counter.images,
            "hyperparameters": attack.hyperparameters()}
    if "gradient_stats" in res.info:
        info["gradient_stats"] = {k: int(v) for k, v in res.info["gradient_stats"].items() if k in ("zero_gradients", "nonfinite_gradients", "gradient_evaluations", "images")}
    return StepOutcome(label, spec.kind, torch.arange(x.shape[0]), judged["correct"], adv, _distance(norm, adv, x), info)


def attack_step(spec: EnsembleAttack, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, state: EnsembleState,
                key: DrawKey, *, norm: str, eps: float, num_classes: Optional[int] = None, batch_size: Optional[int] = None,
                progress: Optional[Callable[..., None]] = None) -> StepOutcome:
    """One attack of the ensemble on the images ``state`` still counts robust (auto-attack's
    rule), judged on the same verdict draws; ``state`` is not changed (see
    :meth:`EnsembleState.apply`). ``x``, ``labels``, ``key`` are the whole evaluated batch."""
    rows = state.robust_rows()
    empty = StepOutcome(spec.label, spec.kind, rows, torch.zeros(0, state.draws, dtype=torch.bool), None, torch.zeros(0), {"seconds": 0.0, "classifier_images": 0})
    if spec.name == "apgd-dlr" and num_classes is not None and num_classes < 3:
        empty.rows = rows[:0]
        empty.info["skipped"] = f"DLR needs at least 3 classes; the model has {num_classes}"
        return empty
    if rows.numel() == 0:
        return empty
    dev = rows.to(x.device)
    out = run_attack(spec, model, x[dev], labels[dev], key.select(rows), norm=norm, eps=eps, draws=state.draws,
                     batch_size=batch_size, progress=progress)
    out.rows = rows
    return out


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------
def _figures(correct: torch.Tensor, seed: int) -> Dict[str, Any]:
    s = summarize(correct, ~correct, seed=seed)
    return {k: s[k] for k in ("n", "draws", "robust_accuracy_expected", "robust_accuracy_expected_ci95",
                              "robust_accuracy_worst", "robust_accuracy_worst_ci95")}


def per_attack_figures(clean_correct: torch.Tensor, steps: Sequence[StepOutcome], *, seed: int = 0) -> Tuple[List[Dict[str, Any]], EnsembleState]:
    """Replay the attacks' verdicts over the clean one: per attack, the images it ran on, broke
    and lowered, its success on them (fooled on some draw, Wilson 95%; expected over draws,
    bootstrap 95%) and the robust accuracy after it (cumulative, with intervals). Returns the
    rows and the final state (without tensors)."""
    state = EnsembleState(clean_correct)
    rows = []
    for step in steps:
        counts = state.apply(StepOutcome(step.label, step.kind, step.rows, step.correct, None, step.distance))
        fooled = ~step.correct.bool()
        k = int(step.rows.numel())
        hit = int(fooled.any(1).sum()) if k else 0
        frac = fooled.float().mean(1) if k else torch.zeros(0)
        rows.append({
            "attack": step.label,
            "kind": step.kind,
            **counts,
            "success_worst": hit / k if k else None,
            "success_worst_ci95": wilson_interval(hit, k),
            "success_expected": float(frac.mean()) if k else None,
            "success_expected_ci95": bootstrap_interval(frac, seed=seed),
            "after": _figures(state.correct, seed),
            **{kk: v for kk, v in step.info.items() if kk in ("seconds", "classifier_images", "gradient_stats", "skipped", "hyperparameters")},
        })
    return rows, state


def annotate(per_attack: List[Dict[str, Any]], budget: Budget, randomized: bool) -> List[Dict[str, Any]]:
    """Add each attack's budget settings (``settings``: its hyperparameters and the EOT it ran
    with; ``describe``: the same in words) to the per-attack rows, whether or not it ran."""
    specs = {a.label: a for a in budget.attacks}
    for row in per_attack:
        spec = specs.get(row["attack"])
        if spec is not None:
            row["settings"] = {**spec.kwargs, "eot": spec.effective_eot(randomized)}
            row["describe"] = spec.describe(randomized)
    return per_attack


def strongest_gradient_attack(budget: Budget, per_attack: Sequence[Dict[str, Any]]) -> Optional[EnsembleAttack]:
    """The white-box gradient attack of ``budget`` that broke or lowered the most images
    (ties: the first); None when the budget holds none."""
    white = [a for a in budget.attacks if a.kind == "white-box"]
    if not white:
        return None
    score = {r["attack"]: (r.get("broke", 0), r.get("lowered", 0)) for r in per_attack}
    return max(white, key=lambda a: (score.get(a.label, (0, 0)), -budget.attacks.index(a)))


def _subset(order: torch.Tensor, m: int) -> torch.Tensor:
    return order[: max(0, int(m))]


def check_count(per_image_cost: float, spent: float, limit: int, candidates: int) -> int:
    """Images a check may use: at most ``limit`` and the candidates, and as many as
    :data:`CHECK_SHARE` of ``spent`` passes pays for, but at least one."""
    if candidates <= 0:
        return 0
    afford = int(CHECK_SHARE * spent // max(per_image_cost, 1e-9)) if spent > 0 else limit
    return max(1, min(limit, candidates, afford))


def unbounded_check(spec: EnsembleAttack, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, state: EnsembleState,
                    key: DrawKey, *, norm: str, steps: int, images: int, batch_size: Optional[int] = None) -> Dict[str, Any]:
    """``spec`` with radius :data:`UNBOUNDED_EPS` (the whole box) and ``steps`` steps on the
    ``images`` most robust images (most correct draws first); it must reach
    :data:`UNBOUNDED_MIN_SUCCESS` expected success (Carlini et al. 2019: an unbounded attack
    must reach 100%)."""
    if images <= 0:
        return {"skipped": "no image to run on"}
    frac = state.correct.float().mean(1)
    order = sorted(range(len(state)), key=lambda i: (-float(frac[i]), i))
    rows = _subset(torch.tensor(order, dtype=torch.long), images)
    probe = spec.replace(**{spec.steps_param: int(steps)})
    dev = rows.to(x.device)
    out = run_attack(probe, model, x[dev], labels[dev], key.select(rows), norm=norm, eps=UNBOUNDED_EPS,
                     draws=state.draws, batch_size=batch_size, stream=("unbounded",))
    fooled = ~out.correct
    success = float(fooled.float().mean()) if fooled.numel() else float("nan")
    return {"attack": spec.label, "eps": UNBOUNDED_EPS, "steps": int(steps), "images": rows.tolist(), "n": int(rows.numel()),
            "success_expected": success, "success_worst": float(fooled.any(1).float().mean()),
            "reached": bool(success >= UNBOUNDED_MIN_SUCCESS), "threshold": UNBOUNDED_MIN_SUCCESS,
            "classifier_images": out.info["classifier_images"], "seconds": out.info["seconds"]}


def more_steps_check(spec: EnsembleAttack, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, state: EnsembleState,
                     own: Optional[StepOutcome], key: DrawKey, *, norm: str, eps: float, images: int,
                     batch_size: Optional[int] = None) -> Dict[str, Any]:
    """``spec`` at twice its steps on up to ``images`` images still robust after the ensemble
    (auto-attack's rule); compared with ``spec``'s own examples on them (``own``, the attack's
    step outcome) and with the ensemble. More steps must not help."""
    rows = state.robust_rows()
    if rows.numel() == 0:
        return {"attack": spec.label, "skipped": "no image left robust: more steps cannot lower the robust accuracy", "n": 0, "helps": False}
    rows = _subset(rows, images)
    doubled = spec.replace(**{spec.steps_param: 2 * spec.steps})
    dev = rows.to(x.device)
    # The attack's own stream: the same random start as its run in the ensemble, twice the steps.
    out = run_attack(doubled, model, x[dev], labels[dev], key.select(rows), norm=norm, eps=eps, draws=state.draws,
                     batch_size=batch_size)
    fooled_2k = ~out.correct
    success_2k = float(fooled_2k.float().mean())
    success_k = None
    if own is not None and own.rows.numel():
        pos = {int(r): j for j, r in enumerate(own.rows.tolist())}
        if all(int(r) in pos for r in rows.tolist()):
            idx = torch.tensor([pos[int(r)] for r in rows.tolist()], dtype=torch.long)
            success_k = float((~own.correct[idx]).float().mean())
    robust_before = state.robust_worst()[rows]
    newly = int((robust_before & fooled_2k.any(1)).sum())
    gain = success_2k - (success_k if success_k is not None else 1.0 - float(state.correct[rows].float().mean()))
    helps = newly > 0 or gain > DOUBLING_TOLERANCE
    return {"attack": spec.label, "steps": spec.steps, "steps_doubled": 2 * spec.steps, "images": rows.tolist(), "n": int(rows.numel()),
            "success_k": success_k, "success_2k": success_2k, "newly_broken_worst": newly, "helps": bool(helps),
            "tolerance": DOUBLING_TOLERANCE, "classifier_images": out.info["classifier_images"], "seconds": out.info["seconds"]}


def curve_probe(spec: EnsembleAttack, budget: Budget) -> EnsembleAttack:
    """The curve's attack: ``spec`` with the budget's ``curve_steps`` and at most ``curve_eot`` EOT draws."""
    return spec.replace(eot=min(spec.eot, int(budget.curve_eot)), **{spec.steps_param: int(budget.curve_steps)})


def curve_step(probe: EnsembleAttack, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, state: EnsembleState, key: DrawKey, *,
               norm: str, eps: float, fraction: float, batch_size: Optional[int] = None,
               progress: Optional[Callable[..., None]] = None) -> StepOutcome:
    """One radius of the curve: ``probe`` at ``eps * fraction`` on the images ``state`` (the
    curve's state at the radius below) still counts robust; ``state`` is not changed."""
    rows = state.robust_rows()
    if rows.numel() == 0:
        return StepOutcome(probe.label, probe.kind, rows, torch.zeros(0, state.draws, dtype=torch.bool), None, torch.zeros(0),
                           {"seconds": 0.0, "classifier_images": 0})
    dev = rows.to(x.device)
    step = run_attack(probe, model, x[dev], labels[dev], key.select(rows), norm=norm, eps=eps * fraction, draws=state.draws,
                      batch_size=batch_size, progress=progress, stream=("curve", f"{fraction:g}"))
    step.rows = rows
    return step


def curve(spec: EnsembleAttack, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, clean_correct: torch.Tensor,
          key: DrawKey, *, norm: str, eps: float, budget: Budget, batch_size: Optional[int] = None,
          progress: Optional[Callable[..., None]] = None) -> List[Tuple[float, StepOutcome]]:
    """Accuracy vs epsilon below ``eps`` (module docstring): :func:`curve_probe` at each
    ``eps * f`` of the budget's ``curve_fractions``, smallest first, each radius attacking the
    images still robust at the one below. Returns ``[(f, outcome)]``."""
    probe = curve_probe(spec, budget)
    state = EnsembleState(clean_correct)
    fractions = list(budget.curve_fractions)
    out = []
    for j, f in enumerate(fractions):
        tick = None if progress is None else (lambda d, t, *_r, _j=j: progress(_j + min(1.0, d / max(t, 1)), len(fractions)))
        step = curve_step(probe, model, x, labels, state, key, norm=norm, eps=eps, fraction=f, batch_size=batch_size, progress=tick)
        state.apply(step)
        out.append((f, step))
    return out


def curve_points(clean_correct: torch.Tensor, points: Sequence[Tuple[float, StepOutcome]], final_correct: torch.Tensor, *,
                 eps: float, attack: str, seed: int = 0) -> List[Dict[str, Any]]:
    """The curve's points: 0 (clean), ``eps * f`` (the curve's attack, cumulative), ``eps`` (the ensemble)."""
    state = EnsembleState(clean_correct)
    rows = [{"fraction": 0.0, "eps": 0.0, "source": "clean", **_figures(state.correct, seed)}]
    for f, step in points:
        state.apply(step)
        rows.append({"fraction": float(f), "eps": float(eps * f), "source": attack, **_figures(state.correct, seed)})
    rows.append({"fraction": 1.0, "eps": float(eps), "source": "ensemble", **_figures(final_correct, seed)})
    return rows


def checklist_flags(per_attack: Sequence[Dict[str, Any]], *, unbounded: Optional[Dict[str, Any]] = None,
                    more_steps: Optional[Dict[str, Any]] = None, curve_rows: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The checklist (module docstring) from the per-attack rows and the checks; ``warnings``
    lists what calls for attention, worst first."""
    warnings: List[str] = []
    white = [r for r in per_attack if r["kind"] == "white-box"]
    free = [r for r in per_attack if r["kind"] == "gradient-free"]
    transfer = [r for r in per_attack if r["kind"] == "transfer"]
    free_broke = sum(r["broke"] for r in free)
    free_lowered = sum(r["lowered"] for r in free)
    masking = {"gradient_free_attacks": [r["attack"] for r in free], "broke_after_gradient_attacks": free_broke,
               "lowered_after_gradient_attacks": free_lowered, "warning": bool(free_broke)}
    if not free:
        masking["skipped"] = "no gradient-free attack in this budget"
    elif free_broke:
        names = ", ".join(f"{r['attack']} broke {r['broke']}" for r in free if r["broke"])
        warnings.append(f"gradient masking: a gradient-free attack broke images the gradient attacks left robust ({names}); "
                        "the white-box gradient is masked or its attacks are too weak")
    t_broke = sum(r["broke"] for r in transfer)
    tr = {"transfer_tried": bool(transfer), "broke_after_white_box": t_broke, "warning": bool(t_broke)}
    if not transfer:
        tr["skipped"] = "no transfer attack in this budget"
    elif t_broke:
        warnings.append(f"the transfer attack (made on the bare classifier) broke {t_broke} image(s) the white-box attacks left robust: "
                        "the white-box gradient through the defense is masked or weak")
    flags: Dict[str, Any] = {"masking": masking, "transfer": tr, "white_box_attacks": [r["attack"] for r in white]}
    if unbounded is not None:
        flags["unbounded"] = unbounded
        if "skipped" not in unbounded and not unbounded["reached"]:
            warnings.append(f"an unbounded {unbounded['attack']} (eps {unbounded['eps']:g}, {unbounded['steps']} steps) fooled only "
                            f"{unbounded['success_expected']:.2f} of the draws on {unbounded['n']} image(s) (< {unbounded['threshold']}): "
                            "gradient masking or a broken attack")
    if more_steps is not None:
        flags["more_steps"] = more_steps
        if more_steps.get("helps"):
            warnings.append(f"{more_steps['attack']} with {more_steps['steps_doubled']} steps instead of {more_steps['steps']} broke "
                            f"{more_steps['newly_broken_worst']} more image(s) of {more_steps['n']} (success {more_steps['success_2k']:.2f}"
                            + (f" vs {more_steps['success_k']:.2f}" if more_steps.get("success_k") is not None else "")
                            + "): the attacks have not converged; use a larger budget")
    zero = sum(int((r.get("gradient_stats") or {}).get("zero_gradients", 0)) for r in per_attack)
    bad = sum(int((r.get("gradient_stats") or {}).get("nonfinite_gradients", 0)) for r in per_attack)
    flags["gradients"] = {"zero_gradients": zero, "nonfinite_gradients": bad}
    if bad:
        warnings.append(f"the attacks met {bad} non-finite gradient(s)")
    if zero:
        warnings.append(f"the attacks met {zero} all-zero gradient(s) (shattered or masked gradients)")
    if curve_rows:
        final = curve_rows[-1]
        below = [p for p in curve_rows[1:-1] if p["robust_accuracy_worst"] + 1e-12 < final["robust_accuracy_worst"]]
        flags["curve_monotone"] = not below
        if below:
            warnings.append(f"at eps {below[0]['eps']:.4g} the curve's attack leaves a lower worst-case robust accuracy "
                            f"({below[0]['robust_accuracy_worst']:.2f}) than the whole ensemble at eps {final['eps']:.4g} "
                            f"({final['robust_accuracy_worst']:.2f}): the ensemble is too weak")
    flags["warnings"] = warnings
    return flags


# ---------------------------------------------------------------------------------------------
# the whole evaluation
# ---------------------------------------------------------------------------------------------
@dataclass
class EnsembleResult:
    """What :func:`evaluate` returns.

    Attributes:
        norm, eps, budget, draws, n: the threat model and the run's sizes.
        clean, robust: figures (:func:`~.verdict.summarize`'s accuracy entries) of the clean
            images and of the kept examples (the ensemble's verdict).
        per_attack: one row per attack (:func:`per_attack_figures`).
        per_image: per image: ``robust_worst``, ``correct_fraction``, ``broken_by``,
            ``kept_from``, ``distance``.
        adversarial: (N, C, H, W) the kept examples (the clean image where nothing did better).
        flags: :func:`checklist_flags`.
        curve: accuracy-vs-epsilon points (:func:`curve_points`).
        passes: cost, estimated (:meth:`Budget.cost`, per image, at most) and counted
            (``classifier_images``: images through the classifier, attacks, checks and curve).
    """

    norm: str
    eps: float
    budget: Budget
    draws: int
    n: int
    clean: Dict[str, Any]
    robust: Dict[str, Any]
    per_attack: List[Dict[str, Any]]
    per_image: List[Dict[str, Any]]
    adversarial: Optional[torch.Tensor]
    flags: Dict[str, Any]
    curve: List[Dict[str, Any]]
    passes: Dict[str, Any]
    seconds: float = 0.0

    def as_dict(self) -> Dict[str, Any]:
        """Everything but the tensors, JSON-ready."""
        return {"norm": self.norm, "eps": self.eps, "budget": self.budget.as_dict(), "draws": self.draws, "n": self.n,
                "clean": self.clean, "robust": self.robust, "per_attack": self.per_attack, "per_image": self.per_image,
                "flags": self.flags, "curve": self.curve, "passes": self.passes, "seconds": self.seconds}


def per_image_rows(state: EnsembleState, labels: Optional[torch.Tensor] = None) -> List[Dict[str, Any]]:
    """Per image: position, label, worst-case robustness, fraction of correct draws, what broke
    it first, where its kept example came from and that example's distance."""
    frac = state.correct.float().mean(1)
    worst = state.robust_worst()
    rows = [{"index": i, "robust_worst": bool(worst[i]), "correct_fraction": float(frac[i]), "broken_by": state.broken_by[i],
             "kept_from": state.kept_from[i], "distance": float(state.distance[i])} for i in range(len(state))]
    if labels is not None:
        for row, y in zip(rows, labels.tolist()):
            row["label"] = int(y)
    return rows


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    *,
    labels: torch.Tensor,
    norm: str = "linf",
    eps: Optional[float] = None,
    budget: Union[str, Budget] = "quick",
    generator: KeyLike = 0,
    ids: Union[None, torch.Tensor, Sequence[int]] = None,
    draws: int = MIN_DRAWS,
    checks: bool = True,
    with_curve: bool = True,
    batch_size: Optional[int] = None,
    progress: Optional[Callable[[float, float], None]] = None,
) -> EnsembleResult:
    """Run the ensemble of ``budget`` on ``model`` and return its verdict (module docstring).

    Args:
        model: the deployed model, [0,1] NCHW -> logits: ``Defended(defense, classifier)``
            or a bare classifier (a random one is judged on fresh draws).
        x: (N, C, H, W) images in [0, 1]; labels: (N,) int64 true classes.
        norm: ``"linf"`` or ``"l2"``; eps: the radius (Linf, or the paper's RMS L2; default the
            paper's bounds 8/255 and 0.05).
        budget: a name of :data:`BUDGETS` or a :class:`Budget`.
        generator: the run's seed (int, ``torch.Generator`` or ``DrawKey``); ids: (N,) image
            ids (image ``i``'s draws depend only on the seed and ``ids[i]``).
        draws: fresh draws of the verdict (>= :data:`MIN_DRAWS`; one pass on a deterministic model).
        checks: run the unbounded and more-steps checks.
        with_curve: run the accuracy-vs-epsilon curve's attacks (else the curve has only its
            clean and ``eps`` points).
        batch_size: images attacked together (None: all).
        progress: ``progress(done, total)`` in estimated model passes (the total shrinks as
            the auto-attack rule leaves images out).

    Returns:
        an :class:`EnsembleResult`.

    Example::

        res = evaluate(Defended(defenses.create("jpeg"), classifier), x, labels=y, norm="linf",
                       eps=8 / 255, budget="quick", generator=0)
        res.robust["robust_accuracy_worst"], res.flags["warnings"]
    """
    t0 = time.perf_counter()
    norm, eps = check_eps(norm, eps)
    budget = get_budget(budget)
    x, labels, key, k = check_inputs(model, x, labels, generator, ids, draws)
    randomized = bool(getattr(model, "randomized", False))
    r = int(draws) if randomized else 1
    n = int(x.shape[0])
    seed = key.seed % (2**32)
    bar = _Tally(progress, n * sum(sum(a.cost(randomized)) + r for a in budget.attacks))
    lead = next((a for a in budget.attacks if a.kind == "white-box"), None)
    if lead is not None:  # the checks and the curve, priced with the first white-box attack
        curve_cost = sum(curve_probe(lead, budget).cost(randomized)) + r
        bar.total += (n * len(budget.curve_fractions) * curve_cost if with_curve else 0)
        bar.total += (budget.check_images * (3 * sum(lead.cost(randomized)) + 2 * r) if checks else 0)

    counter = PassCounter(inner_classifier(model))
    try:
        state = start(model, x, labels, draws=draws, key=key)
        clean_correct = state.correct.clone()
        steps: List[StepOutcome] = []
        for spec in budget.attacks:
            per_image = sum(spec.cost(randomized)) + r
            k_rows = int(state.robust_rows().numel())
            bar.total -= (n - k_rows) * per_image
            with bar.span(k_rows * per_image) as tick:
                step = attack_step(spec, model, x, labels, state, key, norm=norm, eps=eps, num_classes=k, batch_size=batch_size, progress=tick)
            state.apply(step)
            steps.append(step)
        # The attacks' own passes (the verdicts' included), as the store's units count them.
        spent = sum(int(st.info.get("classifier_images", 0) or 0) for st in steps)
        per_attack = annotate(per_attack_figures(clean_correct, steps, seed=seed)[0], budget, randomized)
        best = strongest_gradient_attack(budget, per_attack)
        unbounded = more = None
        if checks and best is not None:
            with bar.span(budget.check_images * (sum(best.cost(randomized)) + r)):
                u_cost = best.replace(**{best.steps_param: budget.unbounded_steps}).cost(randomized)[0] + r
                unbounded = unbounded_check(best, model, x, labels, state, key, norm=norm, steps=budget.unbounded_steps,
                                            images=check_count(u_cost, spent / 2, budget.check_images, n), batch_size=batch_size)
            with bar.span(budget.check_images * (2 * sum(best.cost(randomized)) + r)):
                m_cost = 2 * best.cost(randomized)[0] + r
                own = next((s for s in steps if s.label == best.label), None)
                more = more_steps_check(best, model, x, labels, state, own, key, norm=norm, eps=eps,
                                        images=check_count(m_cost, spent / 2, budget.check_images, int(state.robust_rows().numel())),
                                        batch_size=batch_size)
        pts: List[Tuple[float, StepOutcome]] = []
        if best is not None and with_curve:
            span = bar.total - bar.done
            with bar.span(span) as tick:
                pts = curve(best, model, x, labels, clean_correct, key, norm=norm, eps=eps, budget=budget, batch_size=batch_size,
                            progress=tick)
        curve_rows = curve_points(clean_correct, pts, state.correct, eps=eps, attack=best.label if best else "-", seed=seed)
        flags = checklist_flags(per_attack, unbounded=unbounded, more_steps=more, curve_rows=curve_rows)
        measured = counter.images
    finally:
        counter.remove()
    return EnsembleResult(
        norm=norm, eps=eps, budget=budget, draws=r, n=n,
        clean=_figures(clean_correct, seed), robust=_figures(state.correct, seed),
        per_attack=per_attack, per_image=per_image_rows(state, labels), adversarial=state.adversarial, flags=flags, curve=curve_rows,
        passes={"estimated_per_image": {**budget.cost(randomized, draws), "ensemble": int(getattr(model, "ensemble", 1) or 1)},
                "classifier_images": measured,
                "classifier_images_attacks": spent},
        seconds=round(time.perf_counter() - t0, 3),
    )


class _Tally:
    """Progress in estimated passes: ``span(cost)`` covers one piece of work, whose attack
    reports ``tick(done, total)``; the total can shrink (auto-attack's rule)."""

    def __init__(self, progress: Optional[Callable[[float, float], None]], total: float) -> None:
        self.progress, self.total, self.done = progress, float(total), 0.0

    def emit(self) -> None:
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done))

    def span(self, cost: float):
        tally = self

        class _Span:
            def __enter__(self_inner):
                self_inner.base = tally.done
                tally.emit()

                def tick(d, t, *_rest):
                    tally.done = self_inner.base + cost * min(1.0, float(d) / max(float(t), 1.0))
                    tally.emit()

                return tick

            def __exit__(self_inner, *exc):
                tally.done = self_inner.base + cost
                tally.emit()

        return _Span()

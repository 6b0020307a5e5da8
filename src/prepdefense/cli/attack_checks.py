"""The checks ``prepdefense attack`` runs after an attack, priced in model passes (issue 9, item 4).

The checklist is that of :mod:`prepdefense.attacks.diagnostics` (Carlini et al. 2019): the
same attack on the undefended classifier, an unbounded run, 2x the steps, single-draw
gradients against their EOT mean, zero/NaN gradients, and whether two draws disagree. What
this module adds is the price. Cost is counted in *model passes*: images through the
classifier (each forward that takes a gradient has its backward), counted by a hook on the
classifier, so the attack's own cost ``P`` is measured, not guessed.

``default`` (what an adaptive attack runs unless told otherwise) spends at most
:data:`BUDGET` x ``P``. Checks run in this order, each on the first ``m`` images of the
sample, ``m`` the most of ``--diag-n`` (default 10) whose estimated cost still fits in what
is left of the budget; a check for which not even one image fits is skipped, and the output
says so:

1. ``randomized``: two draws of the defended model (2 passes per image);
2. ``gradients``: single-draw gradients over ``min(30, max(4, eot))`` draws of a random
   defense (that many passes per image; one for a deterministic one);
3. ``undefended``: the attack at its own settings on the bare classifier (about 1/eot of the
   attack's per-image cost: one draw suffices for a deterministic model);
4. ``unbounded``: the attack with a radius covering the [0,1] box, at a quarter of the
   steps (at least 10) and a quarter of the EOT draws (at least 2): it must reach ~100%,
   which a box-sized radius does in few steps;
5. ``steps``: the attack at 2x the steps (twice the attack's per-image cost), compared with the
   main run's own success on the same images (free).

``full`` runs every check on ``--diag-n`` images at the attack's own settings, with no
budget: about ``(3 + 1/eot) * diag_n / n`` times the attack's cost. ``off`` runs none.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .. import attacks
from ..attacks.ensemble import PassCounter
from ..attacks.verdict import evaluate_on_draws
from ..attacks.diagnostics import DOUBLING_TOLERANCE, UNBOUNDED_MIN_SUCCESS, describe_randomness, gradient_agreement, gradient_warnings
from ..seeding import child_seed, make_generator
from .attack_flags import attack_flags

MODES = ("default", "full", "off")
#: Share of the attack's model passes the default checks may add.
BUDGET = 0.25
#: Most images a check runs on by default (``--diag-n``).
DEFAULT_SUBSET = 10

HELP = (
    "checks after the attack (Carlini et al. 2019 checklist). 'default' (adaptive's default; "
    f"other attacks: off) adds at most {BUDGET:.0%} of the attack's model passes (forward+backward, "
    "counted): two draws (2 passes/image) and single-draw gradients (min(30, max(4, eot)) passes/image) on "
    "--diag-n images; the undefended-model run (~1/eot of the attack's cost per image), an unbounded "
    "run at 1/4 of the steps and draws, and a 2x-steps run (2x the attack's cost per image) on as "
    "many of --diag-n images as the budget holds, skipped with a note when not one fits. 'full': all "
    "of them at the attack's own settings on --diag-n images, about (3 + 1/eot) x diag_n/n of the "
    "attack's cost. 'off': none. Bare --diagnostics means 'default'."
)


AttackRunner = Callable[[Any, nn.Module, torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Generator], Any]


class Checks:
    """The checklist for one attack run, priced against the attack's measured passes.

    Args:
        name, kwargs: the attack's registry name and the hyperparameters it was built with.
        model_eot: draws of the model-side EOT wrapper (attacks without an ``eot`` of their own).
        attacked_model: ``attacked_model(eot)`` -> the model the attack differentiates.
        run_attack: ``run_attack(attack, model, x, labels, targets, generator)`` -> AttackResult.
        defended, classifier: the deployed model and the bare classifier.
        counter: the pass counter on the classifier; attack_passes: its count for the attack.
        fooled_fraction: per image, the main run's success over the verdict's fresh draws.
        draws: fresh draws for judging a re-run.
    """

    def __init__(self, *, name: str, kwargs: Dict[str, Any], model_eot: Optional[int], attacked_model: Callable[[int], nn.Module],
                 run_attack: AttackRunner, defended: nn.Module, classifier: nn.Module, counter: PassCounter,
                 attack_passes: int, fooled_fraction: List[float], draws: int, main_info: Dict[str, Any]) -> None:
        self.name, self.kwargs = name, dict(kwargs)
        self.params = attacks.REGISTRY.parameters(name)
        self.attacked_model, self.run_attack = attacked_model, run_attack
        self.defended, self.classifier, self.counter = defended, classifier, counter
        self.attack_passes = int(attack_passes)
        self.fooled_fraction = fooled_fraction
        self.draws = int(draws)
        self.main_info = main_info
        self.randomized = bool(getattr(defended, "randomized", False))
        steps_flag = attack_flags().get("steps")
        self.steps_hp = steps_flag.takers.get(name) if steps_flag else None
        self.steps = int(self._value(self.steps_hp) or 0) if self.steps_hp else 0
        self.own_eot = "eot" in self.params
        self.eot = int(self._value("eot") if self.own_eot else (model_eot or 1))

    # -- settings and prices --------------------------------------------------------------
    def _value(self, hp: Optional[str]) -> Any:
        if hp is None:
            return None
        if hp in self.kwargs:
            return self.kwargs[hp]
        p = self.params.get(hp)
        return None if p is None else p.default

    def _eff(self, eot: int, randomized: bool) -> int:
        return eot if randomized else 1

    def rerun_cost(self, n: int, *, steps: Optional[int] = None, eot: Optional[int] = None, bare: bool = False) -> float:
        """Estimated passes of re-running the attack on ``n`` images (``bare``: on the classifier)."""
        steps = self.steps if steps is None else steps
        eot = self.eot if eot is None else eot
        randomized = self.randomized and not bare
        # Judging the re-run on fresh draws: by the attack itself (it takes ``draws``) or here.
        judge = self._eff(self.draws, randomized)
        if "restarts" in self.params:  # the adaptive attack; an upper bound: no restart skips an image
            restarts = int(self._value("restarts") or len(self._value("losses") or ("ce",)))
            return n * (restarts * (steps + 1) * self._eff(eot, randomized) + judge)
        # Other attacks: the measured per-image cost, scaled by steps and EOT draws.
        per_image = self.attack_passes / max(1, len(self.fooled_fraction))
        scale = (steps + 1) / (self.steps + 1) if self.steps else 1.0
        scale *= self._eff(eot, randomized) / self._eff(self.eot, self.randomized)
        return n * (per_image * scale + (0 if "draws" in self.params else judge))

    def _rebuild(self, **overrides: Any) -> Any:
        kw = {**self.kwargs, **overrides}
        if "progress" in self.params:
            kw["progress"] = None
        return attacks.create(self.name, **kw)

    def _unbounded_overrides(self) -> Optional[Dict[str, Any]]:
        """A radius covering the whole [0,1] box, in the attack's own unit (None: no radius)."""
        if "eps" not in self.params:
            return None
        return {"eps": 1.0}  # Linf radius, or normalised (RMS) L2: the whole [0,1] box either way

    def _success(self, result: Any, labels: torch.Tensor, targets: Optional[torch.Tensor], judge: nn.Module, g: torch.Generator) -> float:
        """Expected success over fresh draws: the attack's own verdict, else judged here."""
        if "asr_expected" in result.info:
            return float(result.info["asr_expected"])
        v = evaluate_on_draws(judge, result.adversarial.detach(), labels, targets, draws=self.draws, key=g)
        return float(v["asr_expected"])

    # -- the run ----------------------------------------------------------------------------
    def run(self, mode: str, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], *, generator: torch.Generator,
            subset: int = DEFAULT_SUBSET) -> Dict[str, Any]:
        """Run the checks of ``mode`` ('default' or 'full'); returns the JSON-able report."""
        budget = BUDGET * self.attack_passes if mode == "default" else math.inf
        start = self.counter.images
        cap = min(subset, x.shape[0])
        out: Dict[str, Any] = {"mode": mode, "budget": BUDGET if mode == "default" else None, "warnings": [], "skipped": {}}
        warn: List[str] = out["warnings"]
        g = generator

        def fit(cost_per_image: float) -> int:
            if mode == "full":
                return cap
            left = budget - (self.counter.images - start)
            return min(cap, int(left // cost_per_image)) if cost_per_image > 0 else cap

        def run_check(key: str, cost_per_image: float, body: Callable[[int], Dict[str, Any]]) -> None:
            m = fit(cost_per_image)
            if m < 1:
                left = max(0.0, budget - (self.counter.images - start))
                out["skipped"][key] = (f"one image would cost about {cost_per_image:.0f} passes, {left:.0f} left of the "
                                       f"{BUDGET:.0%} budget (--diagnostics full runs it)")
                return
            before = self.counter.images
            rec = body(m)
            rec.update(n=m, passes=self.counter.images - before)
            out[key] = rec

        # 1. randomness
        def randomized(m: int) -> Dict[str, Any]:
            if not self.randomized:
                return {"prediction_disagreement": 0.0}
            with torch.no_grad():
                p1 = self.defended(x[:m], generator=make_generator(child_seed(g))).argmax(1)
                p2 = self.defended(x[:m], generator=make_generator(child_seed(g))).argmax(1)
            return {"prediction_disagreement": float((p1 != p2).float().mean())}

        run_check("randomized", 2.0 if self.randomized else 0.0, randomized)

        # 2. single-draw gradients against their mean: over the attack's EOT draws, and at
        # least 4 (a random defense attacked with one draw still shows its gradient noise)
        grad_draws = min(30, max(4, self.eot)) if self.randomized else 1

        def gradients(m: int) -> Dict[str, Any]:
            t = None if targets is None else targets[:m]
            ga = gradient_agreement(self.defended, x[:m], labels[:m], t, draws=grad_draws, generator=make_generator(child_seed(g)))
            warn.extend(gradient_warnings(ga))
            return ga

        run_check("gradients", float(self._eff(grad_draws, self.randomized)), gradients)

        st = self.main_info.get("gradient_stats")
        if st:
            out["attack_gradient_stats"] = st
            if st.get("nonfinite_gradients", 0):
                warn.append(f"the attack met {st['nonfinite_gradients']} non-finite gradients")
            if st.get("zero_gradients", 0):
                warn.append(f"the attack met {st['zero_gradients']} all-zero gradients (of {st.get('gradient_evaluations', '?')})")

        def main_success(m: int) -> float:
            return float(sum(self.fooled_fraction[:m]) / m)

        def rerun(attack: Any, model: nn.Module, m: int, judge: nn.Module) -> float:
            t = None if targets is None else targets[:m]
            res = self.run_attack(attack, model, x[:m], labels[:m], t, make_generator(child_seed(g)))
            return self._success(res, labels[:m], t, judge, make_generator(child_seed(g)))

        # 3. the same attack on the undefended classifier
        def undefended(m: int) -> Dict[str, Any]:
            r = rerun(self._rebuild(), self.classifier, m, self.classifier)
            defended_rate = main_success(m)
            if r + 1e-9 < defended_rate:
                warn.append(f"the attack succeeds less on the undefended model ({r:.2f}) than on the defended one ({defended_rate:.2f}): the attack is the weak link")
            elif r < 0.9:
                warn.append(f"the attack reaches only {r:.2f} on the undefended model: check the attack")
            return {"success": r}

        run_check("undefended", self.rerun_cost(1, bare=True), undefended)

        # 4. an unbounded run: must reach ~100%
        big = self._unbounded_overrides()
        if big is None:
            out["skipped"]["unbounded"] = "the attack has no radius"
        else:
            u_steps = self.steps if mode == "full" or not self.steps else min(self.steps, max(10, math.ceil(self.steps / 4)))
            u_eot = self.eot if mode == "full" else min(self.eot, max(2, math.ceil(self.eot / 4)))
            overrides = dict(big)
            if self.steps_hp and u_steps != self.steps:
                overrides[self.steps_hp] = u_steps
            if self.own_eot:
                overrides["eot"] = u_eot

            def unbounded(m: int) -> Dict[str, Any]:
                r = rerun(self._rebuild(**overrides), self.attacked_model(u_eot), m, self.defended)
                if r < UNBOUNDED_MIN_SUCCESS:
                    warn.append(f"an unbounded attack reaches only {r:.2f} (< {UNBOUNDED_MIN_SUCCESS}): gradient masking or a broken attack")
                rec = {k: v for k, v in big.items() if v is not None}
                rec.update(success=r, steps=u_steps or None, eot=u_eot)
                return rec

            run_check("unbounded", self.rerun_cost(1, steps=u_steps, eot=u_eot), unbounded)

        # 5. twice the steps, against the main run on the same images
        if not self.steps_hp:
            out["skipped"]["steps"] = "the attack has no number of steps"
        else:
            k = self.steps

            def doubling(m: int) -> Dict[str, Any]:
                rk = main_success(m)
                r2 = rerun(self._rebuild(**{self.steps_hp: 2 * k}), self.attacked_model(self.eot), m, self.defended)
                helps = r2 - rk > DOUBLING_TOLERANCE
                if helps:
                    warn.append(f"doubling the steps ({k} -> {2 * k}) raised success {rk:.2f} -> {r2:.2f}: the attack has not converged; use more steps")
                return {"k": k, "success_k": rk, "2k": 2 * k, "success_2k": r2, "doubling_helps": helps}

            run_check("steps", self.rerun_cost(1, steps=2 * k), doubling)

        out["passes"] = self.counter.images - start
        out["attack_passes"] = self.attack_passes
        out["cost_ratio"] = out["passes"] / max(1, self.attack_passes)
        out["n"] = max((v["n"] for v in out.values() if isinstance(v, dict) and "n" in v), default=0)
        return out


def _images(n: int) -> str:
    return f"[{n} image{'' if n == 1 else 's'}]"


def format_checks(d: Dict[str, Any]) -> str:
    """The report as text: warnings first, each check with the images it ran on, then the cost."""
    head = (f"Diagnostics ({d['mode']}: at most {d['budget']:.0%} of the attack's model passes; --diagnostics full runs all)"
            if d.get("budget") is not None else f"Diagnostics ({d['mode']}: every check at the attack's own settings)")
    lines = [head + ":"]
    lines += [f"  WARNING: {w}" for w in d.get("warnings", [])] or ["  no warnings"]
    s = d.get("steps")
    if s:
        lines.append(f"  success with {s['k']} steps (main run): {s['success_k']:.3f}; with {s['2k']} steps: {s['success_2k']:.3f} "
                     f"(doubling helps: {'yes' if s['doubling_helps'] else 'no'}) {_images(s['n'])}")
    if "undefended" in d:
        lines.append(f"  same attack on the undefended model: success {d['undefended']['success']:.3f} {_images(d['undefended']['n'])}")
    u = d.get("unbounded")
    if u:
        radius = ", ".join(f"{k} {v:g}" for k, v in u.items() if k == "eps")
        steps = f", {u['steps']} steps" if u.get("steps") else ""
        lines.append(f"  unbounded run ({radius}{steps}, eot {u['eot']}): success {u['success']:.3f} {_images(u['n'])}")
    lines += describe_randomness(d, suffix=lambda part: f" {_images(part['n'])}")
    for key, why in d.get("skipped", {}).items():
        lines.append(f"  skipped {key}: {why}")
    lines.append(f"  cost: {d['passes']} model passes, {d['cost_ratio']:.0%} of the attack's {d['attack_passes']}")
    return "\n".join(lines)

"""``prepdefense evaluate``: the attack ensemble's verdict on a defense as a resumable run, a
JSON robustness card and a Markdown report (issue 10, item 4).

The ensemble itself (budgets, auto-attack's rule, the per-image worst case, the checklist, the
curve) is :mod:`prepdefense.attacks.ensemble`; this module cuts it into units of work kept in a
:class:`~.store.ResultStore` (``--out DIR``), so a killed run started again with the same
arguments resumes, and writes what it found.

Units, in run order (``units/evaluate/*.json``, each written atomically):

* ``evaluate/<defense>/clean/s<k>``: the clean images of image shard ``k`` judged on the R
  verdict draws;
* ``evaluate/<defense>/<attack>/s<k>``: one attack of the budget on the images of shard ``k``
  still robust after the attacks before it (attacks in the budget's order, each over every
  shard); records hold the verdict of each attacked image, the examples that became the kept
  ones are cached (``cache/evaluate/<attack>/s<k>.pt``);
* ``evaluate/<defense>/check-unbounded/s0`` and ``check-steps/s0``: the unbounded and
  more-steps checks (on a subset of the whole sample, after every attack);
* ``evaluate/<defense>/curve/eps=<f>/s<k>``: the accuracy-vs-epsilon curve's attack at
  ``eps * f`` on shard ``k``.

Every image's draws come from the key ``DrawKey(seed, image_id(name))`` (:mod:`prepdefense.draws`):
they depend on the seed and the image's file name only, so the units give what
``attacks.ensemble.evaluate(model, x, labels=y, generator=seed, ids=[image_id(n) ...])``
gives on the whole sample at once. A configuration that differs from the stored one (model,
weights, model options, data, defense, norm, eps, budget, n, seed, draws, shard size, draw
scheme) is refused (:class:`~.store.ConfigMismatchError`); ``fresh`` starts over.

Robustness card (``card.json``; schema ``prepdefense/robustness-card``, ``schema_version`` 1).
Figures are fractions in [0, 1]; every interval is a 95% ``[low, high]`` pair (null when
undefined, e.g. over no image):

* ``schema``, ``schema_version``, ``created`` (UTC, ISO 8601);
* ``model``: ``name``, ``weights``, ``input_size``, ``num_classes``, ``options`` (``--mean``...);
* ``defense``: ``name``, ``parameters`` (each built-in part's constructor defaults as used),
  ``description`` (its repr), ``randomized``, ``differentiable``, ``defend_at`` (``[H, W]``
  the defense runs at before the resize to the model's input; null: the model's input);
* ``threat_model``: ``norm`` (``linf``/``l2``), ``eps``, ``eps_unit``, ``euclidean_radius``
  (L2), ``targeted`` (false: robust accuracy), ``image_shape``;
* ``budget``: the preset (:meth:`~prepdefense.attacks.ensemble.Budget.as_dict`: attacks with
  their hyperparameters and EOT, checks' and curve's sizes) and ``cost_per_image`` (model
  passes per image, at most, on a deterministic and on a random defense, and for this run);
* ``data``: ``source``, ``sample`` (how the sample was drawn: ``tried``, ``correct``...),
  ``ids`` (file names, in sample order);
* ``n``, ``seed``, ``draws`` (R: verdict draws per example; 1 for a deterministic defense),
  ``device``, ``device_description``, ``versions``, ``git_revision``, ``draw_scheme``;
* ``clean``: the defended model's accuracy on the clean sample (``robust_accuracy_expected``
  / ``_worst`` with ``_ci95``, ``n``, ``draws``);
* ``ensemble``: the verdict, the same keys: robust accuracy expected over draws (bootstrap
  interval, :func:`~prepdefense.attacks.verdict.bootstrap_interval`) and worst case over draws (Wilson interval), per image worst case over attacks;
* ``per_attack``: per attack in run order: ``attack``, ``kind`` (``white-box``,
  ``transfer``, ``gradient-free``), ``hyperparameters``, ``ran_on``, ``broke`` (images robust
  in the worst case before it and not after), ``lowered`` (kept examples it replaced),
  ``success_worst`` / ``success_expected`` on the images it ran on with ``_ci95``, ``after``
  (the ensemble's figures after it, cumulative), ``seconds``, ``classifier_images``,
  ``gradient_stats``, ``skipped`` (why it did not run, when it did not);
* ``per_image``: ``id``, ``label``, ``robust_worst``, ``correct_fraction``, ``broken_by``
  (the first attack that fooled a draw; ``clean``; null when robust), ``kept_from``,
  ``distance`` (of the kept example, in the threat model's norm);
* ``flags``: the checklist (:func:`~prepdefense.attacks.ensemble.checklist_flags`):
  ``masking``, ``transfer``, ``unbounded``, ``more_steps``, ``gradients``, ``curve_monotone``
  and ``warnings`` (sentences; empty when nothing calls for attention);
* ``curve``: points ``fraction``, ``eps``, ``source`` and the figures with intervals (0:
  clean; ``eps``: the ensemble);
* ``passes``: ``estimated_per_image`` (the budget's upper bound for this defense, in passes
  of the defended model; its ``ensemble``: classifier passes per defended pass, 30 for
  ``crop``) and
  ``classifier_images`` (counted: images through the classifier, all units of all sessions);
* ``seconds`` (compute time of the units), ``notes`` (how to read the figures), ``files``
  (the report, the curve and the examples beside the card).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import defenses
from ..attacks import ensemble as E
from ..draws import DRAW_SCHEME, DrawKey, image_id
from ..errors import PrepDefenseError
from .components import UsageError, build_defense, build_defended, build_model, resolve_device
from .metadata import collect_metadata, now_iso
from .plots import plot_accuracy_vs_eps
from .progress import Progress
from .reporting import fmt_ci, md_table
from .sample_cache import load_or_draw_sample
from .sharding import ShardSpec, select, shard_spec
from ..defenses.spec import referenced_files
from .store import ResultStore, atomic_write_bytes, atomic_write_text, to_jsonable
from .ensemble_records import attack_records, clean_records, state_from_clean, steps_from_records
from .units import Unit, n_shards, shard_slice

__all__ = ["CARD_SCHEMA", "CARD_SCHEMA_VERSION", "EXPERIMENT", "FILES", "CARD_KEYS", "EvaluateConfig", "EvaluateOutcome",
           "evaluate_defense", "run_units", "plan_units", "build_card", "report_markdown", "write_outputs",
           "clean_records", "attack_records", "steps_from_records", "defense_info"]

CARD_SCHEMA = "prepdefense/robustness-card"
CARD_SCHEMA_VERSION = 1
EXPERIMENT = "evaluate"
FILES = {"card": "card.json", "report": "report.md", "curve": "accuracy_vs_eps.png", "examples": "adversarial.pt"}
#: The card's top-level keys (module docstring).
CARD_KEYS = ("schema", "schema_version", "created", "model", "defense", "threat_model", "budget", "data", "n", "seed", "draws",
             "device", "device_description", "versions", "git_revision", "draw_scheme", "clean", "ensemble", "per_attack",
             "per_image", "flags", "curve", "passes", "seconds", "notes", "files")


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
def plan_units(defense: str, budget: E.Budget, n: int, shard_size: int, *, checks: bool = True, curve: bool = True,
               randomized: bool = True, draws: int = E.MIN_DRAWS) -> List[Unit]:
    """Every unit of an evaluation, in run order (module docstring); ``cost`` in model passes."""
    shards = range(n_shards(n, shard_size))
    size = lambda s: len(range(*shard_slice(s, shard_size, n).indices(n)))  # noqa: E731
    r = draws if randomized else 1
    units = [Unit(EXPERIMENT, defense, "clean", s, cost=size(s) * r) for s in shards]
    for a in budget.attacks:
        units += [Unit(EXPERIMENT, defense, a.label, s, cost=size(s) * (sum(a.cost(randomized)) + r)) for s in shards]
    lead = next((a for a in budget.attacks if a.kind == "white-box"), None)
    if lead is not None and checks:
        c = sum(lead.cost(randomized)) + r
        units += [Unit(EXPERIMENT, defense, "check-unbounded", 0, "subset", cost=budget.check_images * c),
                  Unit(EXPERIMENT, defense, "check-steps", 0, "subset", cost=2 * budget.check_images * c)]
    if lead is not None and curve:
        probe = lead.replace(eot=min(lead.eot, budget.curve_eot), **{lead.steps_param: budget.curve_steps})
        c = sum(probe.cost(randomized)) + r
        units += [Unit(EXPERIMENT, defense, "curve", s, f"eps={f:g}", cost=size(s) * c) for s in shards for f in budget.curve_fractions]
    return units


# ---------------------------------------------------------------------------------------------
# running the units
# ---------------------------------------------------------------------------------------------
@dataclass
class _Run:
    store: ResultStore
    model: nn.Module
    x: torch.Tensor
    labels: torch.Tensor
    ids: List[str]
    seed: int
    norm: str
    eps: float
    budget: E.Budget
    draws: int
    shard_size: int
    num_classes: Optional[int]
    batch_size: Optional[int]
    progress: Optional[Progress]
    ran: int = 0
    reused: int = 0
    seconds: float = 0.0

    def key(self, rows: slice) -> DrawKey:
        return DrawKey(self.seed, [image_id(i) for i in self.ids[rows]])

    def do(self, unit: Unit, compute: Callable[[Callable[[float], None]], Tuple[List[Dict[str, Any]], Dict[str, Any]]]) -> Dict[str, Any]:
        """The stored unit, or ``compute(rescale)`` run and stored (``rescale(cost)`` tells the
        progress bar the unit's real cost)."""
        stored = self.store.load_unit(EXPERIMENT, unit.id)
        if stored is not None and stored.get("status") == "ok":
            self.reused += 1
            self.seconds += float(stored.get("seconds", 0.0))
            return stored
        p = self.progress
        if p is not None:
            p.start_unit(unit)
        t0 = time.perf_counter()
        records, summary = compute(p.rescale_unit if p is not None else (lambda c: None))
        seconds = time.perf_counter() - t0
        self.store.write_unit(EXPERIMENT, unit.id, key=unit.key, records=records, summary=summary, seconds=seconds)
        self.ran += 1
        self.seconds += seconds
        if p is not None:
            p.end_unit(unit, "ok", seconds, None)
        return self.store.load_unit(EXPERIMENT, unit.id) or {"records": records, "summary": summary}

    def tick(self) -> Optional[Callable[..., None]]:
        if self.progress is None:
            return None
        hook = self.progress.unit_fraction
        return lambda d, t, *_r: hook(min(1.0, float(d) / max(float(t), 1.0)))


def run_units(store: ResultStore, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, ids: Sequence[str], *, seed: int,
              defense: str, norm: str, eps: float, budget: E.Budget, draws: int = E.MIN_DRAWS, shard_size: int = 10,
              checks: bool = True, curve: bool = True, batch_size: Optional[int] = None,
              progress: Optional[Progress] = None,
              image_shards: Optional[Sequence[int]] = None) -> Tuple[Optional[E.EnsembleResult], Dict[str, Any]]:
    """Run (or resume) every unit of the evaluation into ``store`` and return the verdict
    (an :class:`~prepdefense.attacks.ensemble.EnsembleResult` over the whole sample, with its
    kept examples) and ``{"ran", "reused", "seconds"}``.

    With ``image_shards`` (a shard of the run, ``--shard K/N``), only the chains of those
    image shards run (their clean verdicts and attacks); the verdict is then None, since the
    checks, the curve and the figures need every image shard (the run on the merged folder)."""
    ids = list(ids)
    x, labels, key_all, k = E.check_inputs(model, x, labels, DrawKey(seed, [image_id(i) for i in ids]), None, draws)
    randomized = bool(getattr(model, "randomized", False))
    r = int(draws) if randomized else 1
    n = len(ids)
    shards = [shard_slice(s, shard_size, n) for s in range(n_shards(n, shard_size))]
    run = _Run(store, model, x, labels, ids, int(seed), norm, eps, budget, int(draws), shard_size, k, batch_size, progress)
    plan = {u.id: u for u in plan_units(defense, budget, n, shard_size, checks=checks, curve=curve, randomized=randomized, draws=draws)}
    unit = lambda attack, s, variant="": plan[Unit(EXPERIMENT, defense, attack, s, variant).id]  # noqa: E731

    # Clean verdicts, then every attack over every shard (auto-attack's rule per image).
    mine = set(range(len(shards)) if image_shards is None else image_shards)
    states: Dict[int, E.EnsembleState] = {}
    clean: Dict[int, torch.Tensor] = {}
    for s, sl in enumerate(shards):
        if s not in mine:
            continue

        def compute_clean(_rescale, sl=sl):
            st = E.start(model, x[sl], labels[sl], draws=draws, key=run.key(sl), keep_examples=False)
            return clean_records(st, ids[sl], labels[sl]), {"draws": st.draws}
        stored = run.do(unit("clean", s), compute_clean)
        states[s] = state_from_clean(stored["records"], ids[sl])
        clean[s] = states[s].correct.clone()  # the attacks below update the states in place
    kept = x.detach().clone()
    steps_all: List[E.StepOutcome] = []
    infos: Dict[str, List[Dict[str, Any]]] = {}
    for spec in budget.attacks:
        parts = []
        for s, sl in enumerate(shards):
            if s not in mine:
                continue
            st = states[s]

            def compute_attack(rescale, st=st, sl=sl, s=s, spec=spec):
                rescale(int(st.robust_rows().numel()) * (sum(spec.cost(randomized)) + r))
                step = E.attack_step(spec, model, x[sl], labels[sl], st, run.key(sl), norm=norm, eps=eps, num_classes=k,
                                     batch_size=batch_size, progress=run.tick())
                better = st.improves(step)
                if step.adversarial is not None and bool(better.any()):
                    store.save_tensors(_cache(spec.label, s), {"ids": [ids[sl][i] for i in step.rows[better].tolist()],
                                                               "adversarial": step.adversarial[better.to(step.adversarial.device)].cpu()})
                summary = {"label": spec.label, "kind": spec.kind, "ran_on": int(step.rows.numel()), "info": to_jsonable(step.info)}
                return attack_records(step, ids[sl], x[sl]), summary

            stored = run.do(unit(spec.label, s), compute_attack)
            step = steps_from_records(spec.label, spec.kind, stored["records"], ids[sl], st.draws)
            step.info = dict((stored.get("summary") or {}).get("info") or {})
            infos.setdefault(spec.label, []).append(step.info)
            st.apply(step)
            parts.append(E.StepOutcome(step.label, step.kind, step.rows + sl.start, step.correct, None, step.distance, step.info))
        if image_shards is None:
            steps_all.append(_merge_steps(parts, _sum_info(infos[spec.label])))
    if image_shards is not None:
        return None, {"ran": run.ran, "reused": run.reused, "seconds": run.seconds}
    clean_correct = torch.cat([clean[s] for s in range(len(shards))])
    per_attack, state = E.per_attack_figures(clean_correct, steps_all, seed=key_all.seed % (2**32))
    E.annotate(per_attack, budget, randomized)
    missing: List[str] = []
    for s, sl in enumerate(shards):  # the kept examples, from the cached tensors of the attacks they came from
        missing += _fill_examples(store, kept, states[s], ids, sl, s)
    state.adversarial = kept
    spent = sum(int(row.get("classifier_images", 0) or 0) for row in per_attack)
    best = E.strongest_gradient_attack(budget, per_attack)

    unbounded = more = None
    if checks and best is not None:
        def compute_unbounded(rescale):
            u_cost = best.replace(**{best.steps_param: budget.unbounded_steps}).cost(randomized)[0] + r
            m = E.check_count(u_cost, spent / 2, budget.check_images, n)
            rescale(m * u_cost)
            return [], E.unbounded_check(best, model, x, labels, state, key_all, norm=norm, steps=budget.unbounded_steps,
                                         images=m, batch_size=batch_size)
        unbounded = _ids_in(run.do(unit("check-unbounded", 0, "subset"), compute_unbounded)["summary"], ids)

        def compute_steps(rescale):
            m_cost = 2 * best.cost(randomized)[0] + r
            m = E.check_count(m_cost, spent / 2, budget.check_images, int(state.robust_rows().numel()))
            rescale(m * m_cost)
            own = next((st for st in steps_all if st.label == best.label), None)
            return [], E.more_steps_check(best, model, x, labels, state, own, key_all, norm=norm, eps=eps, images=m, batch_size=batch_size)
        more = _ids_in(run.do(unit("check-steps", 0, "subset"), compute_steps)["summary"], ids)

    points: List[Tuple[float, E.StepOutcome]] = []
    if curve and best is not None:
        probe = E.curve_probe(best, budget)
        per_fraction: Dict[float, List[E.StepOutcome]] = {f: [] for f in budget.curve_fractions}
        for s, sl in enumerate(shards):
            cstate = E.EnsembleState(clean_correct[sl])
            for f in budget.curve_fractions:
                def compute_curve(rescale, cstate=cstate, sl=sl, f=f):
                    rescale(int(cstate.robust_rows().numel()) * (sum(probe.cost(randomized)) + r))
                    step = E.curve_step(probe, model, x[sl], labels[sl], cstate, run.key(sl), norm=norm, eps=eps, fraction=f,
                                        batch_size=batch_size, progress=run.tick())
                    return attack_records(step, ids[sl], x[sl]), {"attack": best.label, "fraction": f, "eps": eps * f,
                                                                   "info": to_jsonable(step.info)}

                u = unit("curve", s, f"eps={f:g}")
                stored = store.load_unit(EXPERIMENT, u.id)
                if stored is not None and (stored.get("summary") or {}).get("attack") not in (None, best.label):
                    raise PrepDefenseError(f"{u.id} was computed with {stored['summary']['attack']}, not {best.label}; rerun with --fresh")
                stored = run.do(u, compute_curve)
                step = steps_from_records(best.label, best.kind, stored["records"], ids[sl], cstate.draws)
                step.info = dict((stored.get("summary") or {}).get("info") or {})
                cstate.apply(step)
                per_fraction[f].append(E.StepOutcome(step.label, step.kind, step.rows + sl.start, step.correct, None, step.distance, step.info))
        points = [(f, _merge_steps(per_fraction[f], _sum_info([p.info for p in per_fraction[f]]))) for f in budget.curve_fractions]
    seed32 = key_all.seed % (2**32)
    curve_rows = E.curve_points(clean_correct, points, state.correct, eps=eps, attack=best.label if best else "-", seed=seed32)
    flags = E.checklist_flags(per_attack, unbounded=unbounded, more_steps=more, curve_rows=curve_rows)
    measured = n * r + spent + sum(int((c or {}).get("classifier_images", 0) or 0) for c in (unbounded, more))
    measured += sum(int(step.info.get("classifier_images", 0) or 0) for _f, step in points)
    per_image = E.per_image_rows(state, labels)
    for row, name in zip(per_image, ids):
        row["id"] = name
    result = E.EnsembleResult(norm=norm, eps=eps, budget=budget, draws=r, n=n, clean=E._figures(clean_correct, seed32),
                              robust=E._figures(state.correct, seed32), per_attack=per_attack, per_image=per_image, adversarial=kept,
                              flags=flags, curve=curve_rows,
                              passes={"estimated_per_image": {**budget.cost(randomized, draws),
                                                              "ensemble": int(getattr(model, "ensemble", 1) or 1)},
                                      "classifier_images": measured,
                                      "classifier_images_attacks": spent},
                              seconds=round(run.seconds, 3))
    return result, {"ran": run.ran, "reused": run.reused, "seconds": run.seconds, "missing_examples": missing}


def _cache(label: str, shard: int) -> str:
    return f"{EXPERIMENT}/{label}/s{shard}"


def _fill_examples(store: ResultStore, kept: torch.Tensor, state: E.EnsembleState, ids: List[str], sl: slice, shard: int) -> List[str]:
    """Put shard ``shard``'s kept examples into ``kept`` (rows of the whole sample) from the
    tensors its attack units cached.

    Returns:
        The ids of the images whose kept example is not in the cache (a store copied without its
        ``cache/``, e.g. to resume on another machine): their rows keep the clean image.
    """
    names = ids[sl]
    found = set()
    for label in sorted({state.kept_from[j] for j in range(len(state))} - {"clean"}):
        cached = store.load_tensors(_cache(label, shard))
        if cached is None:
            continue
        for name, adv in zip(cached["ids"], cached["adversarial"]):
            j = names.index(name) if name in names else -1
            if j >= 0 and state.kept_from[j] == label:
                kept[sl.start + j] = adv.to(kept)
                found.add(j)
    return [names[j] for j in range(len(state)) if state.kept_from[j] != "clean" and j not in found]


def _merge_steps(parts: Sequence[E.StepOutcome], info: Dict[str, Any]) -> E.StepOutcome:
    first = parts[0]
    return E.StepOutcome(first.label, first.kind, torch.cat([p.rows for p in parts]), torch.cat([p.correct for p in parts]),
                         None, torch.cat([p.distance if p.distance is not None else torch.zeros(p.rows.numel()) for p in parts]), info)


def _sum_info(infos: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The per-shard infos of one attack as one: seconds and passes added, gradient counts added."""
    out: Dict[str, Any] = {"seconds": 0.0, "classifier_images": 0}
    grads: Dict[str, int] = {}
    for i in infos:
        out["seconds"] += float(i.get("seconds", 0.0) or 0.0)
        out["classifier_images"] += int(i.get("classifier_images", 0) or 0)
        for kk, v in (i.get("gradient_stats") or {}).items():
            grads[kk] = grads.get(kk, 0) + int(v)
        for kk in ("hyperparameters", "skipped"):
            if kk in i and kk not in out:
                out[kk] = i[kk]
    out["seconds"] = round(out["seconds"], 3)
    if grads:
        out["gradient_stats"] = grads
    return out


def _ids_in(check: Dict[str, Any], ids: Sequence[str]) -> Dict[str, Any]:
    """A check's subset as file names as well as positions."""
    check = dict(check)
    if isinstance(check.get("images"), list):
        check["image_ids"] = [ids[i] for i in check["images"]]
    return check


# ---------------------------------------------------------------------------------------------
# the card, the report, the files
# ---------------------------------------------------------------------------------------------
def defense_info(defended: nn.Module, name: str, state_digest: Optional[str] = None) -> Dict[str, Any]:
    """The defense's name, constructor parameters (built-in parts: those in the name's
    brackets, else their defaults as used), description (repr), kind and ``state_digest``
    (the run identity's ``defense_state``, computed once by the caller)."""
    defense = getattr(defended, "defense", None)
    params: Dict[str, Any] = {}
    parts = defenses.split_chain(str(name))
    for part in parts:
        base, given = defenses.parse_part(part)
        if base and ":" not in base and base in defenses.names():
            got = {}
            for p in defenses.REGISTRY.parameters(base).values():
                value = given[p.name] if p.name in given else (
                    getattr(defense, p.name, p.default) if len(parts) == 1 else p.default)
                if isinstance(value, (int, float, str, bool, type(None), tuple, list)):
                    got[p.name] = value
                elif hasattr(value, "tolist"):
                    got[p.name] = value.tolist()
                else:
                    got[p.name] = type(value).__name__
            params[part] = got
    return {
        "name": name,
        "parameters": to_jsonable(params),
        "description": " ".join(repr(defense).split()) if defense is not None else "none (the bare classifier)",
        "randomized": bool(getattr(defended, "randomized", False)),
        "differentiable": bool(getattr(defense, "differentiable", True)) if defense is not None else True,
        "defend_at": to_jsonable(getattr(defended, "defend_at", None)),
        # the values behind the name (its quantization table), as the run's identity records them
        "state_digest": state_digest,
    }


def _threat_model(norm: str, eps: float, shape: Sequence[int]) -> Dict[str, Any]:
    dims = int(math.prod(shape))
    out = {"norm": norm, "eps": float(eps), "targeted": False, "image_shape": list(shape), "box": [0.0, 1.0],
           "eps_unit": "max |x_adv - x| per pixel (Linf)" if norm == "linf"
           else "normalised L2 (RMS): sqrt(sum((x_adv - x)^2) / (C*H*W))"}
    if norm == "l2":
        out["euclidean_radius"] = float(eps * math.sqrt(dims))
    return out


NOTES = (
    "The sample holds images the undefended model classifies correctly; an image the defended model misclassifies "
    "without attack counts as not robust (broken_by 'clean').",
    "Expected = mean over images of the fraction of the R verdict draws classified correctly (percentile bootstrap "
    "interval over images, with two pseudo-images at 0 and two at 1 so that a sample with no spread, say 0.00 on "
    "every image, does not get a point interval); worst case = fraction of images classified correctly under every draw, with every attack "
    "(Wilson interval). A deterministic defense is judged once (R = 1): both figures agree.",
    "Each attack ran only on the images still classified correctly on some verdict draw after the attacks before it "
    "(AutoAttack's rule); per image the example with the fewest correct draws is kept, chosen on the same draws (as "
    "AutoAttack does; exact for a deterministic defense).",
    "A budget that leaves a defense robust does not show it robust: check the flags and try a larger budget.",
)


def build_card(result: E.EnsembleResult, *, model: Dict[str, Any], defense: Dict[str, Any], data: Dict[str, Any], seed: int,
               metadata: Dict[str, Any], files: Dict[str, Optional[str]], image_shape: Sequence[int]) -> Dict[str, Any]:
    """The robustness card (module docstring), JSON-ready."""
    cost = {"deterministic_defense": result.budget.cost(False), "random_defense": result.budget.cost(True),
            "this_run": result.passes["estimated_per_image"]}
    card = {
        "schema": CARD_SCHEMA,
        "schema_version": CARD_SCHEMA_VERSION,
        "created": now_iso(),
        "model": model,
        "defense": defense,
        "threat_model": _threat_model(result.norm, result.eps, image_shape),
        "budget": {**result.budget.as_dict(), "cost_per_image": cost},
        "data": data,
        "n": result.n,
        "seed": int(seed),
        "draws": result.draws,
        "device": metadata.get("device"),
        "device_description": metadata.get("device_description"),
        "versions": metadata.get("versions"),
        "git_revision": metadata.get("git_revision"),
        "draw_scheme": DRAW_SCHEME,
        "clean": result.clean,
        "ensemble": result.robust,
        "per_attack": result.per_attack,
        "per_image": result.per_image,
        "flags": result.flags,
        "curve": result.curve,
        "passes": result.passes,
        "seconds": result.seconds,
        "notes": list(NOTES),
        "files": files,
    }
    return to_jsonable(card)


def _f(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


def _ci(v: Any) -> str:
    if not v or v[0] is None:
        return ""
    return fmt_ci((float(v[0]), float(v[1])))


def report_markdown(card: Dict[str, Any]) -> str:
    """The Markdown report of a card."""
    tm, b, ens, clean = card["threat_model"], card["budget"], card["ensemble"], card["clean"]
    radius = f"{tm['eps']:.4g}" + (f" (= {tm['eps'] * 255:.3g}/255)" if tm["norm"] == "linf" else f" RMS (Euclidean {tm.get('euclidean_radius', 0):.3g})")
    flags = card["flags"]
    cost = b["cost_per_image"]["this_run"]
    lines = [
        f"# Robustness of `{card['defense']['name']}` on `{card['model']['name']}`: {tm['norm'].upper()} eps {radius}, budget {b['name']}",
        "",
        f"**Robust accuracy: {_f(ens['robust_accuracy_expected'])}{_ci(ens['robust_accuracy_expected_ci95'])} expected over "
        f"{card['draws']} draw(s), {_f(ens['robust_accuracy_worst'])}{_ci(ens['robust_accuracy_worst_ci95'])} in the worst case** "
        f"(n = {card['n']} images; clean accuracy of the defended model {_f(clean['robust_accuracy_expected'])}"
        f"{_ci(clean['robust_accuracy_expected_ci95'])}). Brackets: 95% intervals.",
        "",
    ]
    if flags.get("warnings"):
        lines += ["## Warnings", ""] + [f"- **{w}**" for w in flags["warnings"]] + [""]
    else:
        lines += ["No checklist flag was raised.", ""]
    lines += [
        "## Threat model and budget", "",
        f"- Untargeted, {tm['norm']} ball of radius {radius} ({tm['eps_unit']}), intersected with the [0, 1] box; images {tm['image_shape']}.",
        f"- Defense: {card['defense']['description']} ({'random' if card['defense']['randomized'] else 'deterministic'}; "
        f"parameters {json.dumps(card['defense']['parameters'], sort_keys=True)}).",
        f"- Budget `{b['name']}`: {b['summary']}",
        f"- Cost per image, at most: {cost['gradient']:,.0f} forward+backward and {cost['forward']:,.0f} forward passes "
        f"of the defended model"
        + (f", each {cost['ensemble']} passes of the classifier (the defense averages {cost['ensemble']} members per "
           "prediction)" if cost.get("ensemble", 1) > 1 else "")
        + f" (counted in this run: {card['passes']['classifier_images']:,} images through the classifier).",
        "",
        "## Per attack", "",
        "Attacks run in this order, each only on the images still robust after the ones before it.", "",
    ]
    rows = []
    for r in card["per_attack"]:
        settings = ", ".join(f"{k.replace('_', ' ')} {'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted((r.get("settings") or {}).items()))
        succ = "-" if r.get("success_worst") is None else f"{r['success_worst']:.2f}{_ci(r['success_worst_ci95'])}"
        after = r["after"]
        rows.append([r["attack"], r["kind"], settings or r.get("skipped", "-"), r["ran_on"], r["broke"], succ,
                     f"{_f(after['robust_accuracy_expected'])}{_ci(after['robust_accuracy_expected_ci95'])}",
                     f"{_f(after['robust_accuracy_worst'])}{_ci(after['robust_accuracy_worst_ci95'])}", _f(r.get("seconds"), 1)])
    lines += [md_table(["attack", "kind", "settings", "ran on", "broke", "success on those (worst)", "robust after: expected",
                        "robust after: worst", "seconds"], rows), ""]
    lines += ["## Checklist (Carlini et al. 2019)", ""]
    m = flags.get("masking", {})
    lines.append(f"- Gradient-free attack beats the gradient ones: {'YES' if m.get('warning') else 'no'}"
                 + (f" ({m['skipped']})" if m.get("skipped") else f" ({m.get('broke_after_gradient_attacks', 0)} image(s) broken by "
                    f"{', '.join(m.get('gradient_free_attacks', []))} after the gradient attacks)"))
    t = flags.get("transfer", {})
    lines.append(f"- Transfer attack tried: {'yes' if t.get('transfer_tried') else 'no'}"
                 + (f"; it broke {t.get('broke_after_white_box', 0)} image(s) the white-box attacks left robust" if t.get("transfer_tried") else ""))
    u = flags.get("unbounded")
    if u:
        lines.append("- Unbounded attack reaches 100%: " + (f"not run ({u['skipped']})" if "skipped" in u else
                     f"{'yes' if u['reached'] else 'NO'} ({u['attack']}, eps {u['eps']:g}, {u['steps']} steps, on {u['n']} image(s) "
                     f"{', '.join(u.get('image_ids', [])[:10])}: success {u['success_expected']:.2f} expected over draws)"))
    s = flags.get("more_steps")
    if s:
        lines.append("- More steps do not help: " + (f"not needed ({s['skipped']})" if "skipped" in s else
                     f"{'NO, they help' if s['helps'] else 'yes'} ({s['attack']} with {s['steps_doubled']} instead of {s['steps']} steps "
                     f"on {s['n']} still-robust image(s): success {s['success_2k']:.2f}"
                     + (f" vs {s['success_k']:.2f}" if s.get("success_k") is not None else "") + f", {s['newly_broken_worst']} newly broken)"))
    g = flags.get("gradients", {})
    lines.append(f"- Zero / non-finite gradients met by the attacks: {g.get('zero_gradients', 0)} / {g.get('nonfinite_gradients', 0)}")
    lines.append("")
    if card["curve"]:
        lines += ["## Robust accuracy vs epsilon", ""]
        if card["files"].get("curve"):
            lines += [f"![accuracy vs epsilon]({card['files']['curve']})", ""]
        lines += [md_table(["eps", "from", "expected", "worst case"],
                           [[f"{p['eps']:.4g}", p["source"], f"{_f(p['robust_accuracy_expected'])}{_ci(p['robust_accuracy_expected_ci95'])}",
                             f"{_f(p['robust_accuracy_worst'])}{_ci(p['robust_accuracy_worst_ci95'])}"] for p in card["curve"]]), ""]
        lines += ["Below eps the points come from the strongest white-box attack at a reduced budget "
                  f"({b['curve_steps']} steps), each radius attacking the images still robust at the one below.", ""]
    lines += ["## Per image", ""]
    lines += [md_table(["image", "label", "robust (worst case)", "correct draws", "broken by", "kept example from", "distance"],
                       [[p.get("id", p["index"]), p.get("label", "-"), "yes" if p["robust_worst"] else "no", f"{p['correct_fraction']:.2f}",
                         p["broken_by"] or "-", p["kept_from"], f"{p['distance']:.4g}"] for p in card["per_image"]]), ""]
    lines += ["## How to read this", ""] + [f"- {n}" for n in card["notes"]] + [""]
    lines += ["## Run", "",
              f"- seed {card['seed']}, device {card['device_description'] or card['device']}, draw scheme {card['draw_scheme']}, "
              f"git {card['git_revision']}",
              f"- versions: {', '.join(f'{k} {v}' for k, v in sorted((card['versions'] or {}).items()) if v != 'absent')}",
              f"- data: {card['data'].get('source')} ({card['n']} images)", ""]
    return "\n".join(lines)


def write_outputs(out: Path, card: Dict[str, Any], result: E.EnsembleResult, *, ids: Sequence[str], labels: torch.Tensor,
                  missing: Sequence[str] = ()) -> Dict[str, Path]:
    """``card.json``, ``report.md``, the curve's PNG and the kept examples, each atomically.

    The examples file holds ``ids``, ``labels``, ``adversarial`` (N, C, H, W), ``kept_from`` (the
    attack of each row, ``"clean"`` for none), ``norm``, ``eps`` and ``missing``: the ids whose
    kept example was not in the store's cache (their rows hold the clean image).
    """
    import io

    out = Path(out)
    paths = {k: out / v for k, v in FILES.items()}
    tm = card["threat_model"]
    plot_accuracy_vs_eps(paths["curve"], card["curve"], xlabel=f"{tm['norm']} radius eps" + (" (RMS)" if tm["norm"] == "l2" else ""),
                         title=f"{card['defense']['name']} on {card['model']['name']}, budget {card['budget']['name']}",
                         note=f"n = {card['n']}, R = {card['draws']} draw(s); below eps: {card['curve'][1]['source'] if len(card['curve']) > 2 else '-'} "
                              f"at {card['budget']['curve_steps']} steps; at eps: the ensemble")
    buf = io.BytesIO()
    torch.save({"ids": list(ids), "labels": labels.cpu(), "adversarial": result.adversarial.detach().cpu() if result.adversarial is not None else None,
                "kept_from": [p["kept_from"] for p in result.per_image], "norm": result.norm, "eps": result.eps,
                "missing": list(missing)}, buf)
    atomic_write_bytes(paths["examples"], buf.getvalue())
    atomic_write_text(paths["report"], report_markdown(card))
    atomic_write_text(paths["card"], json.dumps(card, indent=2, sort_keys=True))
    return paths


# ---------------------------------------------------------------------------------------------
# the whole command
# ---------------------------------------------------------------------------------------------
@dataclass
class EvaluateConfig:
    """What ``prepdefense evaluate`` takes (the CLI maps its flags onto this).

    Attributes:
        defense: defense name or ``a+b`` chain (``none``: the bare classifier).
        norm, eps: threat model (eps None: the paper's bound, 8/255 or RMS 0.05).
        budget: a name of :data:`~prepdefense.attacks.ensemble.BUDGETS`.
        n: images in the sample (the undefended model classifies them correctly); seed: the run's seed.
        out: folder of the store and the outputs (None: a temporary store, nothing kept).
        data, model, weights, model_options: as ``prepdefense attack``'s.
        draws: verdict draws (>= 10); shard_size: images per unit.
        fresh: delete an earlier run in ``out`` first; quiet: log lines instead of a progress bar.
        checks, curve: run the unbounded / more-steps checks and the curve's attacks.
        shard: run only shard K of N (``"K/N"`` or a
            :class:`~prepdefense.experiments.sharding.ShardSpec`): the clean verdicts and
            attacks of its image shards (``sharding.py`` deals the chains, balanced by cost),
            into its own ``out``; no card. ``prepdefense merge`` combines the shards, and the
            same configuration without ``shard`` on the merged folder reuses every unit and
            runs the checks, the curve and the card.
        defend_at: run the defense at this side and resize to the model's input
            (``Defended(..., defend_at=S)``); the sample is picked by the bare model at its own
            input side and attacked at S px. None: the defense runs at the model's input side.
    """

    defense: str
    norm: str = "linf"
    eps: Optional[float] = None
    budget: str = "quick"
    n: int = 100
    seed: int = 0
    out: Optional[Path] = None
    data: str = "builtin"
    model: str = "efficientnet-lite0"
    weights: Optional[str] = None
    model_options: Dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    draws: int = E.MIN_DRAWS
    shard_size: int = 10
    batch_size: Optional[int] = None
    fresh: bool = False
    quiet: bool = False
    checks: bool = True
    curve: bool = True
    shard: Optional[Any] = None
    defend_at: Optional[int] = None


@dataclass
class EvaluateOutcome:
    """What a run did; ``card`` is None for a shard of a run (``shard_units``: its units)."""

    card: Optional[Dict[str, Any]]
    files: Dict[str, Path]
    resumed: bool
    ran: int
    reused: int
    seconds: float
    shard_units: Optional[List[str]] = None


def _identity(config: EvaluateConfig, norm: str, eps: float, budget: E.Budget, data_id: str,
              shard: Optional[ShardSpec] = None, defense_state: Optional[str] = None) -> Dict[str, Any]:
    # A shard's store names its shard (the unsharded identity has no "shard" key; merge.py).
    return {**({"shard": shard.as_dict()} if shard is not None else {}), "command": "evaluate", "card_schema_version": CARD_SCHEMA_VERSION, "model": config.model, "weights": config.weights,
            "model_options": to_jsonable(config.model_options), "data": data_id, "defense": config.defense, "norm": norm, "eps": eps,
            "budget": budget.as_dict(), "n": int(config.n), "seed": int(config.seed), "draws": int(config.draws),
            "shard_size": int(config.shard_size), "draw_scheme": DRAW_SCHEME,
            **({"defend_at": int(config.defend_at)} if config.defend_at is not None else {}),
            **({"defense_files": files} if (files := referenced_files(config.defense)) else {}),
            # the values behind the name (the default table is the shipped learned one: a new one must not resume old runs)
            **({"defense_state": defense_state} if defense_state else {})}


def evaluate_defense(config: EvaluateConfig, *, classifier: Optional[nn.Module] = None, stream=None) -> EvaluateOutcome:
    """Run (or resume) ``prepdefense evaluate``: build the model, the defense and the sample,
    run the units into the store, write the card, the report, the curve and the examples.

    Raises:
        ConfigMismatchError: ``config.out`` holds an evaluation with another configuration.
        StoreLockedError: another process writes into ``config.out``.
    """
    from .reproduce import _data_id

    from ..attacks.ball import check_eps

    config = replace(config, defense=defenses.normalize_name(config.defense))  # one id however it is spelled
    norm, eps = check_eps(config.norm, config.eps)
    budget = E.get_budget(config.budget)
    shard = shard_spec(config.shard)
    if shard is not None and config.out is None:
        raise PrepDefenseError("a shard of an evaluation needs an output folder (out / --out) to merge later")
    device = resolve_device(config.device)
    tmp = None
    if config.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="prepdefense-evaluate-")
        out = Path(tmp.name)
    else:
        out = Path(config.out).expanduser()
    store = ResultStore(out)
    store.lock()
    try:
        if config.fresh:
            store.reset()
            for name in FILES.values():
                (out / name).unlink(missing_ok=True)
        store.open()
        store.clean_temporaries()
        metadata = collect_metadata(device)
        defense = build_defense(config.defense)  # built once: its values enter the identity, then it runs
        try:
            state = defenses.state_digest(defense) if defense is not None else None
        except ValueError as e:
            raise UsageError(f"--defense {config.defense}: {e}") from None
        run_cfg = {"identity": _identity(config, norm, eps, budget, _data_id(config.data), shard, state), "device": str(device),
                   "metadata": metadata}
        resumed = store.check_or_write_config(run_cfg)
        if classifier is None:
            classifier = build_model(config.model, config.weights, device, **config.model_options)
        classifier = classifier.to(device).eval()
        for p in classifier.parameters():
            p.requires_grad_(False)
        defended = build_defended(classifier, config.defense, config.seed, device, defend_at=config.defend_at, defense=defense)
        sample = load_or_draw_sample(store, classifier, config.data, int(config.n), int(config.seed), device, load_size=config.defend_at)
        store.update_config(sample={**sample.info, "n": len(sample), "first_ids": sample.ids[:5]})
        x, labels, ids = sample.x.to(device), sample.labels.to(device), list(sample.ids)
        randomized = bool(getattr(defended, "randomized", False))
        units = plan_units(config.defense, budget, len(ids), config.shard_size, checks=config.checks, curve=config.curve,
                           randomized=randomized, draws=config.draws)
        image_shards = None
        if shard is not None:  # only the chains (clean, attacks) dealt to this shard
            chains = [u for u in units if u.attack != "curve" and u.variant != "subset"]
            units = select(chains, shard)
            image_shards = sorted({u.shard for u in units})
            store.update_config(shard={**shard.as_dict(), "only": None, "planned_units": len(chains), "units": [u.id for u in units]})
        todo = [u for u in units if not store.is_done(EXPERIMENT, u.id)]
        progress = Progress(sum(u.cost for u in todo), len(todo), quiet=config.quiet, stream=stream, desc="evaluate")
        progress.log(f"{'resuming' if resumed else 'starting'} evaluate of {config.defense} ({norm} eps {eps:.4g}, budget {budget.name}, "
                     f"{len(ids)} images) in {out if tmp is None else 'a temporary folder'}"
                     + (f", shard {shard} (the chains of image groups {', '.join(f's{i}' for i in image_shards) or 'none'})" if shard else "")
                     + f": {len(units)} units, "
                     f"{len(units) - len(todo)} already done, {len(todo)} to run on {device}")
        progress.start_experiment(EXPERIMENT, len(todo), sum(u.cost for u in todo), title="the attack ensemble")
        try:
            result, stats = run_units(store, defended, x, labels, ids, seed=config.seed, defense=config.defense, norm=norm, eps=eps,
                                      budget=budget, draws=config.draws, shard_size=config.shard_size, checks=config.checks,
                                      curve=config.curve, batch_size=config.batch_size, progress=progress, image_shards=image_shards)
        finally:
            progress.end_experiment(EXPERIMENT)
            progress.close()
        if result is None:  # a shard: its units are stored; merge, then finish on the merged folder
            store.append_session({"started": metadata["time"], "ended": now_iso(), "units_run": stats["ran"],
                                  "units_reused": stats["reused"], "shard": str(shard)})
            progress.log(f"shard {shard}: {len(units)} unit(s) stored in {out} ({stats['ran']} run, {stats['reused']} reused); "
                         "combine the shards with 'prepdefense merge OUT SHARD_OUT...', then run this command without --shard "
                         "and with --out OUT for the checks, the curve and the card")
            return EvaluateOutcome(None, {}, resumed, stats["ran"], stats["reused"], stats["seconds"], [u.id for u in units])
        model_info = {"name": config.model, "weights": config.weights, "options": to_jsonable(config.model_options),
                      "input_size": getattr(classifier, "input_size", None), "num_classes": getattr(classifier, "num_classes", None)}
        data = {"source": str(config.data), "sample": to_jsonable(sample.info), "ids": ids}
        files = {"card": FILES["card"], "report": FILES["report"], "curve": FILES["curve"], "examples": FILES["examples"]} if tmp is None \
            else {"card": None, "report": None, "curve": None, "examples": None}
        card = build_card(result, model=model_info, defense=defense_info(defended, config.defense, state), data=data, seed=config.seed,
                          metadata=metadata, files=files, image_shape=list(x.shape[1:]))
        if config.defend_at is not None:
            card["notes"].append(
                f"The defense runs at {config.defend_at} px and its output is resized to the model's input; the sample was "
                "picked by the bare model at its own input side, so the clean row (through the resize) may be below 1 "
                "without the defense being at fault.")
        missing = stats.get("missing_examples") or []
        if missing:
            card["notes"].append(
                f"{len(missing)} kept example(s) are not in {FILES['examples']} ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}; "
                "all are listed under its 'missing' key): the attack units that made them were stored without the tensors they "
                "cached (cache/ was lost, e.g. the run was copied to another machine without it), so those rows hold the clean "
                "image. The figures do not depend on them: they are read from the stored units.")
            progress.log(f"warning: {card['notes'][-1]}")
        paths = write_outputs(out, card, result, ids=ids, labels=labels, missing=missing) if tmp is None else {}
        store.append_session({"started": metadata["time"], "ended": now_iso(), "units_run": stats["ran"], "units_reused": stats["reused"]})
        progress.log(f"robust accuracy {card['ensemble']['robust_accuracy_expected']:.3f} expected, "
                     f"{card['ensemble']['robust_accuracy_worst']:.3f} worst case ({stats['ran']} unit(s) run, {stats['reused']} reused)")
        return EvaluateOutcome(card, paths, resumed, stats["ran"], stats["reused"], stats["seconds"])
    finally:
        store.unlock()
        if tmp is not None:
            tmp.cleanup()

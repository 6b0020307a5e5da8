"""The strong-attack section of ``reproduce`` (beyond the paper; PROTOCOL.md "Strong adaptive
attack"): the attack ensemble of ``prepdefense evaluate`` (``attacks.ensemble``), Carlini et al.
(2019)'s diagnostics and the report's verdict.

Per (defense, norm, image shard) a chain of units, untargeted, inside the bound (L2 RMS 0.05 or
Linf 8/255): ``clean`` (the clean images judged on R >= 10 fresh draws of the defense) then one
unit per attack of the preset's ensemble budget (``Preset.strong_budget``: APGD-CE, APGD-DLR, the
adaptive EOT-PGD with BPDA, transfer, Square, SPSA in the larger ones), each run only on the
images still robust after the units before it (auto-attack's rule) and judged on the same
draws, built by the same library calls as ``evaluate`` (``attacks.ensemble.attack_step``;
records as ``experiments.evaluation``'s). A chain's units share one draw key and run in order
(``sharding.group_key`` keeps a chain in one shard). Plus one ``diagnostics`` unit per diagnosed
defense (``attacks.diagnostics``, on the adaptive attack). The verdict takes per image the worst
case over the chain (the example with the fewest correct draws) and sets each defense's expected
and worst-case robust accuracy against the paper's claim (``paper_numbers.ROBUST_CLAIMS``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import AbstractSet, Any, Dict, List, Sequence, Tuple

from ..errors import PrepDefenseError
from . import paper_numbers as P
from .context import RunContext, make_attack
from .experiment import Experiment, Records, Section
from .fig4 import fig4_curves
from .reporting import ReportContext, bootstrap_mean_interval, defense_label, defense_order, fmt_ci, md_table, write_csv
from .store import to_jsonable
from .units import OUR_DEFENSE, Preset, Unit, ensemble_size

__all__ = ["EXPERIMENT", "BROKEN_BELOW", "plan", "plan_units", "run", "strong_stats", "adversarial_cache_name", "chain_units",
           "report_strong", "report_diagnostics", "report_verdict"]

BROKEN_BELOW = 0.10  # expected robust accuracy at or under which we call a defense broken
CLEAN = "clean"


def _budget(preset: Preset):
    from ..attacks.ensemble import get_budget

    return get_budget(preset.strong_budget)


def _draws(preset: Preset) -> int:
    from ..attacks.ensemble import MIN_DRAWS

    return max(MIN_DRAWS, int(preset.adaptive_draws))


def _randomized(defense: str) -> bool:
    """Whether ``defense`` draws (for the cost estimate; True when it cannot be built here)."""
    try:
        from .. import defenses

        return bool(defenses.create(defense).randomized)
    except Exception:  # noqa: BLE001 - the unit itself reports a defense that cannot be built
        return True


def chain_units(preset: Preset, defense: str, norm: str, shard: int) -> List[Unit]:
    """The units of one chain, in run order: ``clean``, then the budget's attacks."""
    budget, r = _budget(preset), _draws(preset)
    randomized = _randomized(defense)
    r = r if randomized else 1
    k = preset.shard_images(shard) * ensemble_size(preset, defense)
    variant = f"norm={norm}"
    return [Unit("strong", defense, CLEAN, shard, variant=variant, cost=k * r)] + [
        Unit("strong", defense, a.label, shard, variant=variant, cost=k * (sum(a.cost(randomized)) + r)) for a in budget.attacks]


def plan_units(preset: Preset, defenses: Sequence[str]) -> List[Unit]:
    """The ensemble's chains of ``defenses`` (every norm, the preset's image shards), then the
    diagnostics units of those among them that the preset diagnoses."""
    shards = list(preset.shards())
    s_shards = shards[: preset.strong_shards] if preset.strong_shards else shards
    units = [u for d in defenses for norm in preset.strong_norms for s in s_shards for u in chain_units(preset, d, norm, s)]
    units += [Unit("strong", d, "diagnostics", s_shards[0], variant=f"norm={norm}",
                   cost=preset.shard_images(s_shards[0]) * preset.adaptive_steps * (preset.adaptive_eot + 4))
              for d in preset.diagnostics_defenses if d in defenses for norm in preset.diagnostics_norms]
    return units


def plan(preset: Preset, selected: AbstractSet[str]) -> List[Unit]:
    """Every defense of the preset's strong attack."""
    return plan_units(preset, preset.strong_defenses)


def adversarial_cache_name(defense: str, norm: str, shard: int) -> str:
    """The cache entry of the ensemble's kept examples against ``defense`` at ``norm``, ``shard``."""
    from .context import slug

    return f"adv/strong/{slug(defense)}/{norm}/s{shard}"


def adaptive_params(ctx: RunContext, norm: str) -> Dict[str, Any]:
    """The ``adaptive`` attack's hyperparameters from the preset, for ``norm`` (``l2`` or ``linf``): the diagnostics' attack."""
    p = ctx.preset
    return {"norm": norm, "steps": p.adaptive_steps, "eot": p.adaptive_eot, "draws": p.adaptive_draws, "losses": tuple(p.adaptive_losses)}


def run(ctx: RunContext, unit: Unit) -> Records:
    """``clean`` / an attack of the ensemble: one link of the chain (module docstring);
    ``diagnostics``: the Carlini et al. checks."""
    from ..attacks import ensemble as E
    from .ensemble_records import attack_records, clean_records, state_from_clean, steps_from_records

    norm = unit.params["norm"]
    x, labels, targets, ids = ctx.shard(unit.shard)
    model = ctx.defended(unit.defense)
    if unit.attack == "diagnostics":
        from ..attacks.diagnostics import format_diagnostics, run_diagnostics

        params = adaptive_params(ctx, norm)
        attack = make_attack("adaptive", **params)
        d = run_diagnostics(attack, model, ctx.classifier, x, labels=labels, targets=None, generator=ctx.generator(unit.id),
                            n=len(ids), gradient_draws=max(2, ctx.preset.adaptive_eot * 2))
        return [], {"diagnostics": to_jsonable(d), "text": format_diagnostics(d), "params": params}
    budget, draws = _budget(ctx.preset), _draws(ctx.preset)
    # One key for the whole chain: every link is judged on the same draws of each image.
    key = ctx.image_key(Unit("strong", unit.defense, "ensemble", unit.shard, unit.variant), ids)
    if unit.attack == CLEAN:
        st = E.start(model, x, labels, draws=draws, key=key, keep_examples=False)
        return clean_records(st, ids, labels), {"draws": st.draws, "budget": budget.name}
    specs = {a.label: a for a in budget.attacks}
    if unit.attack not in specs:
        raise PrepDefenseError(f"{unit.attack!r} is not an attack of the {budget.name} budget ({', '.join(specs)})")
    chain = chain_units(ctx.preset, unit.defense, norm, unit.shard)
    before = chain[: [u.id for u in chain].index(unit.id)]
    stored = []
    for u in before:
        s = ctx.store.load_unit("strong", u.id)
        if s is None or s.get("status") != "ok":
            raise PrepDefenseError(f"{unit.id} attacks the images still robust after {u.id}, which has not finished; run again")
        stored.append((u, s))
    state = state_from_clean(stored[0][1]["records"], ids)
    for u, s in stored[1:]:
        state.apply(steps_from_records(u.attack, specs[u.attack].kind, s["records"], ids, state.draws))
    spec = specs[unit.attack]
    hook = ctx.progress_hook
    step = E.attack_step(spec, model, x, labels, state, key, norm=norm, eps=_eps(norm), num_classes=getattr(ctx.classifier, "num_classes", None),
                         progress=lambda d, t, *_r: hook(min(1.0, float(d) / max(float(t), 1.0))))
    if unit.defense == OUR_DEFENSE and step.adversarial is not None:
        better = state.improves(step)
        if bool(better.any()):
            name = adversarial_cache_name(unit.defense, norm, unit.shard)
            entry = ctx.store.load_tensors(name)
            kept = entry["adversarial"].clone() if entry is not None and list(entry.get("ids", [])) == list(ids) else x.detach().cpu().clone()
            kept[step.rows[better]] = step.adversarial[better.to(step.adversarial.device)].cpu()
            ctx.store.save_tensors(name, {"adversarial": kept, "ids": list(ids)})
    records = attack_records(step, ids, x)
    for r in records:
        r["draws"] = state.draws
    return records, {"budget": budget.name, "label": spec.label, "kind": spec.kind, "ran_on": int(step.rows.numel()),
                     "info": to_jsonable(step.info)}


def _eps(norm: str) -> float:
    from ..attacks.ball import default_eps

    return default_eps(norm)


def _chains(rep: ReportContext) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """(defense, norm) -> per image, in chain order: the clean and attack verdicts stored."""
    order = {CLEAN: -1}
    try:
        budget = _budget_from(rep)
        order.update({a.label: i for i, a in enumerate(budget.attacks)})
        kinds = {a.label: a.kind for a in budget.attacks}
    except KeyError:
        budget, kinds = None, {}
    out: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for r in rep.records("strong"):
        if r.get("attack") in ("diagnostics", None) or "correct_fraction" not in r:
            continue
        key = (r["defense"], str(r["variant"]).split("=", 1)[1])
        c = out.setdefault(key, {"images": defaultdict(list), "kinds": kinds, "order": order})
        c["images"][r["image_id"]].append((order.get(r["attack"], len(order)), r["attack"], float(r["correct_fraction"]), r))
    return out


def _budget_from(rep: ReportContext):
    from ..attacks.ensemble import get_budget

    return get_budget(rep.preset.get("strong_budget", "paper"))


def _strong_stats(rep: ReportContext) -> Dict[Tuple[str, str], Dict[str, Any]]:
    # Imported when a report is written, so that listing the experiments (``--help``) does
    # not load the attacks.
    from ..attacks.verdict import wilson_interval

    out = {}
    for key, chain in _chains(rep).items():
        frac, worst, broke, dist = [], 0, defaultdict(int), []
        draws = None
        for _image, links in chain["images"].items():
            links.sort(key=lambda t: t[0])
            if not links or links[0][1] != CLEAN:
                continue  # the clean verdict of this image is missing: the chain did not start
            low = 2.0
            by = None
            for _o, attack, f, rec in links:
                if f < low - 1e-12:  # the kept example: fewest correct draws, the earlier on ties
                    low = f
                if by is None and f < 1.0 - 1e-9:
                    by = attack
                if attack != CLEAN and "distance" in rec:
                    dist.append(float(rec["distance"]))
                draws = rec.get("draws", draws) if attack != CLEAN else (len(rec.get("correct", [])) or draws)
            frac.append(low)
            worst += low >= 1.0 - 1e-9
            broke[by or "robust"] += 1
        if not frac:
            continue
        free = sum(v for a, v in broke.items() if chain["kinds"].get(a) == "gradient-free")
        transfer = sum(v for a, v in broke.items() if chain["kinds"].get(a) == "transfer")
        out[key] = {
            "n": len(frac),
            "expected": sum(frac) / len(frac),
            "expected_ci": bootstrap_mean_interval(frac),
            "worst": worst / len(frac),
            "worst_ci": wilson_interval(worst, len(frac)),
            "draws": draws,
            "max_distance": max(dist) if dist else 0.0,
            "broken_by": dict(broke),
            "gradient_free_broke": free,
            "transfer_broke": transfer,
        }
    return out


def strong_stats(rep: ReportContext) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """(defense, norm) -> expected and worst-case robust accuracy with 95% intervals (once per report)."""
    return rep.memo("strong.stats", lambda: _strong_stats(rep))


def report_strong(rep: ReportContext) -> str:
    """Expected and worst-case robust accuracy per defense and norm, with 95% intervals."""
    strong = strong_stats(rep)
    order = defense_order(d for (d, _n) in strong)
    header = ["Defense", "paper's claim", "RMS 0.05: expected", "RMS 0.05: worst case", "Linf 8/255: expected", "Linf 8/255: worst case", "n", "draws R"]
    rows = []
    csv_rows = []
    for d in order:
        cells = []
        for norm in ("l2", "linf"):
            s = strong.get((d, norm))
            if s:
                cells += [f"{s['expected']:.2f}{fmt_ci(s['expected_ci'])}", f"{s['worst']:.2f}{fmt_ci(s['worst_ci'])}"]
                csv_rows.append([d, norm, s["expected"], *s["expected_ci"], s["worst"], *s["worst_ci"], s["n"], s["draws"], s["max_distance"]])
            else:
                cells += ["-", "-"]
        any_s = strong.get((d, "l2")) or strong.get((d, "linf"))
        rows.append([defense_label(d), P.ROBUST_CLAIMS.get(d, (None, "-"))[1]] + cells + [any_s["n"], any_s["draws"]])
    write_csv(rep.tables / "strong.csv", ["defense", "norm", "expected", "expected_lo", "expected_hi", "worst", "worst_lo", "worst_hi", "n", "draws", "max_distance"], csv_rows)
    try:
        budget_text = _budget_from(rep).describe()
    except KeyError as e:
        budget_text = str(e)
    text = ["## Strong adaptive attack", "",
            "Beyond the paper (PROTOCOL.md \"Strong adaptive attack\"): the attack ensemble of `prepdefense evaluate`, untargeted, "
            "inside the bound (L2 ball of RMS radius 0.05, or Linf 8/255). Each attack runs only on the images still robust after "
            "the ones before it (AutoAttack's rule), BPDA goes through the non-differentiable parts of a defense, and every example "
            f"is judged on R fresh draws of the defense (R = 1 for a deterministic one). Per image the worst case over the attacks counts. Budget {budget_text} "
            "**Expected** = mean over images of the fraction of draws still classified correctly; **worst case** = fraction of images "
            "classified correctly under every draw, with every attack. Brackets: 95% intervals over images (percentile bootstrap with two "
            "pseudo-images at 0 and two at 1 for the expected value, Wilson for the worst case).", "", md_table(header, rows), ""]
    for d in order:
        for norm in ("l2", "linf"):
            s = strong.get((d, norm))
            if not s:
                continue
            by = ", ".join(f"{k} {v}" for k, v in sorted(s["broken_by"].items(), key=lambda kv: -kv[1]))
            text.append(f"- {defense_label(d)}, {norm}: images by what broke them first: {by}.")
            if s["gradient_free_broke"]:
                text.append(f"  **WARNING (gradient masking):** a gradient-free attack broke {s['gradient_free_broke']} image(s) the "
                            "gradient attacks left robust.")
            if s["transfer_broke"]:
                text.append(f"  **WARNING:** the transfer attack broke {s['transfer_broke']} image(s) the white-box attacks left robust.")
    return rep.with_availability(text, "strong", what="the strong attack ensemble", also_selected_by=("table5",))


def report_diagnostics(rep: ReportContext) -> str:
    """The diagnostics per diagnosed defense, and warnings about zero or non-finite gradients."""
    units = [u for u in rep.ok_units("strong") if u["key"]["attack"] == "diagnostics"]
    text = ["## Diagnostics of the strong attack", "",
            "Carlini et al. (2019) checklist run beside the strong attack: the same attack on the undefended model, "
            "success with K and 2K steps, an unbounded run (should reach ~100%), gradient agreement across EOT draws, "
            "zero/NaN gradients.", ""]
    for u in sorted(units, key=lambda u: u["unit_id"]):
        text += [f"**{defense_label(u['key']['defense'])}, {u['key']['variant']}**", "", "```", u["summary"].get("text", "(no text)"), "```", ""]
    for u in sorted([u for u in rep.ok_units("strong") if u["key"]["attack"] not in ("diagnostics", CLEAN)], key=lambda u: u["unit_id"]):
        st = (u["summary"].get("info") or {}).get("gradient_stats")
        if st and (st.get("zero_gradients") or st.get("nonfinite_gradients")):
            text.append(f"- WARNING `{u['unit_id']}`: {st.get('zero_gradients', 0)} zero and {st.get('nonfinite_gradients', 0)} "
                        f"non-finite gradients out of {st.get('gradient_evaluations', '?')}")
    errs = [u for u in rep.err_units("strong") if u["key"]["attack"] == "diagnostics"]
    for u in errs:
        text.append(f"- not available: {(u.get('error') or '').splitlines()[0][:300]} (`{u['unit_id']}`)")
    if not units and not errs:
        text.append("- not run: no diagnostics unit has finished.")
    return "\n".join(text)


def report_verdict(rep: ReportContext) -> str:
    """Per defense: broken, much weaker than claimed, or holding, set against the paper's claim."""
    strong, curves = strong_stats(rep), fig4_curves(rep)
    text = ["## Verdict", ""]
    quick = rep.preset_name != "paper"
    if quick:
        text.append(f"_This is a {rep.preset_name} run: its attacks are far weaker than the paper preset's, so a defense that "
                    "survives here is not shown robust; a defense broken here is broken._")
        text.append("")
    defs = defense_order(d for (d, _n) in strong)
    if not defs:
        text.append("- No strong-attack result yet, so no verdict (see the sections above for what is missing).")
    for d in defs:
        s = strong.get((d, "l2")) or strong.get((d, "linf"))
        norm = "RMS 0.05" if strong.get((d, "l2")) else "Linf 8/255"
        robust_claim, claim = P.ROBUST_CLAIMS.get(d, (None, "no claim in the paper"))
        e, w = s["expected"], s["worst"]
        figures = f"expected robust accuracy {e:.2f}, worst case {w:.2f} at {norm}, n={s['n']}"
        if robust_claim:
            if e <= BROKEN_BELOW:
                line = f"**{defense_label(d)}: broken.** The strong attack ensemble breaks {defense_label(d)}, which the paper calls robust ({claim}); {figures}."
            elif e < 0.5 * (P.TABLE5_OURS["l2"] if d == OUR_DEFENSE else 0.6):
                line = f"**{defense_label(d)}: much weaker than claimed.** The paper reports it robust ({claim}); the strong attack leaves {figures}."
            else:
                line = f"**{defense_label(d)}: holds against this attack** ({figures}), consistent with the paper's claim ({claim})" + (
                    ", but only a full-size run can support that claim." if quick else ".")
        elif robust_claim is False:
            if e <= BROKEN_BELOW:
                line = f"**{defense_label(d)}: broken**, as the paper reports ({claim}); {figures}."
            else:
                line = (f"**{defense_label(d)}: not broken here** although the paper reports it broken ({claim}); {figures}. "
                        "The attack may be too weak at this size: check the diagnostics.")
        else:
            line = f"**{defense_label(d)}**: {figures}."
        text.append(f"- {line}")
    eot = curves.get(("bpda-eot", OUR_DEFENSE))
    if eot and eot["history"] and (OUR_DEFENSE, "l2") in strong:
        a = eot["history"][-1]["accuracy"]
        e = strong[(OUR_DEFENSE, "l2")]["expected"]
        text.append(f"- Paper protocol vs strong attack on our defense: BPDA+EOT leaves ACC {a:.2f}, the strong attack ensemble "
                    f"{e:.2f} at the same l2 bound.")
    return "\n".join(text)


EXPERIMENT = Experiment(
    name="strong",
    title="Strong adaptive attack",
    plan=plan,
    run=run,
    sections=(Section(90, report_strong), Section(91, report_diagnostics), Section(97, report_verdict)),
    aliases=("adaptive",),
)

"""The strong adaptive attack (beyond the paper; PROTOCOL.md "Strong adaptive attack"), its
Carlini et al. (2019) diagnostics and the report's verdict.

One unit per (defense, norm, image shard): untargeted EOT-PGD inside the bound (L2 RMS 0.05
or Linf 8/255) with BPDA through the non-differentiable parts (``attacks.adaptive``), judged
on R fresh draws of the defense; plus one ``diagnostics`` unit per diagnosed defense
(``attacks.diagnostics``). The verdict sets each defense's expected and worst-case robust
accuracy against the paper's claim (``paper_numbers.ROBUST_CLAIMS``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import AbstractSet, Any, Dict, List, Sequence, Tuple

from ..metrics import l2_rms, linf
from . import paper_numbers as P
from .context import RunContext, make_attack, predict_draws, slug, with_progress
from .experiment import Experiment, Records, Section
from .fig4 import fig4_curves
from .reporting import ReportContext, bootstrap_mean_interval, defense_label, defense_order, fmt_ci, md_table, write_csv
from .store import to_jsonable
from .units import OUR_DEFENSE, Preset, Unit, ensemble_size

__all__ = ["EXPERIMENT", "BROKEN_BELOW", "plan", "plan_units", "run", "strong_stats", "adversarial_cache_name",
           "report_strong", "report_diagnostics", "report_verdict"]

BROKEN_BELOW = 0.10  # expected robust accuracy at or under which we call a defense broken


def plan_units(preset: Preset, defenses: Sequence[str]) -> List[Unit]:
    """The adaptive-attack units of ``defenses`` (every norm, the preset's image shards), then the
    diagnostics units of those among them that the preset diagnoses."""
    shards = list(preset.shards())
    s_shards = shards[: preset.strong_shards] if preset.strong_shards else shards
    per_image = len(preset.adaptive_losses) * preset.adaptive_steps * preset.adaptive_eot + 0.35 * preset.adaptive_draws
    units = [Unit("strong", d, "adaptive", s, variant=f"norm={norm}", cost=preset.shard_images(s) * ensemble_size(preset, d) * per_image)
             for d in defenses for norm in preset.strong_norms for s in s_shards]
    units += [Unit("strong", d, "diagnostics", s_shards[0], variant=f"norm={norm}",
                   cost=preset.shard_images(s_shards[0]) * preset.adaptive_steps * (preset.adaptive_eot + 4))
              for d in preset.diagnostics_defenses if d in defenses for norm in preset.diagnostics_norms]
    return units


def plan(preset: Preset, selected: AbstractSet[str]) -> List[Unit]:
    """Every defense of the preset's strong attack."""
    return plan_units(preset, preset.strong_defenses)


def adversarial_cache_name(defense: str, norm: str, shard: int) -> str:
    """The cache entry of the strong attack's examples against ``defense`` at ``norm``, ``shard``."""
    return f"adv/strong/{slug(defense)}/{norm}/s{shard}"


def adaptive_params(ctx: RunContext, norm: str) -> Dict[str, Any]:
    """The ``adaptive`` attack's hyperparameters from the preset, for ``norm`` (``l2`` or ``linf``)."""
    p = ctx.preset
    return {"norm": norm, "steps": p.adaptive_steps, "eot": p.adaptive_eot, "draws": p.adaptive_draws, "losses": tuple(p.adaptive_losses)}


def run(ctx: RunContext, unit: Unit) -> Records:
    """``adaptive``: the strong attack judged on R fresh draws (its examples on our defense cached);
    ``diagnostics``: the Carlini et al. checks."""
    norm = unit.params["norm"]
    x, labels, targets, ids = ctx.shard(unit.shard)
    model = ctx.defended(unit.defense)
    params = adaptive_params(ctx, norm)
    if unit.attack == "diagnostics":
        from ..attacks.diagnostics import format_diagnostics, run_diagnostics

        attack = make_attack("adaptive", **params)
        d = run_diagnostics(attack, model, ctx.classifier, x, labels=labels, targets=None, generator=ctx.generator(unit.id),
                            n=len(ids), gradient_draws=max(2, ctx.preset.adaptive_eot * 2))
        return [], {"diagnostics": to_jsonable(d), "text": format_diagnostics(d), "params": params}
    attack = make_attack("adaptive", **with_progress(params, "adaptive", ctx.progress_hook))
    res = attack(model, x, labels=labels, targets=None, generator=ctx.image_key(unit, ids))
    adv = res.adversarial.detach()
    info = res.info or {}
    frac = info.get("per_image_correct_fraction")
    if frac is None or len(frac) != len(ids):
        # The attack did not judge on fresh draws itself: do it here.
        preds = predict_draws(model, adv, draws=ctx.preset.adaptive_draws, generator=ctx.image_key(unit, ids, "verdict"))
        frac = (preds == labels.cpu()).float().mean(0).tolist()
        draws = int(preds.shape[0])
    else:
        draws = int(info.get("draws", ctx.preset.adaptive_draws))
    dist = (l2_rms(adv, x) if norm == "l2" else linf(adv, x)).cpu()
    recs = []
    for i, image_id in enumerate(ids):
        recs.append({
            "image_id": image_id,
            "label": int(labels[i]),
            "correct_fraction": float(frac[i]),
            "robust_worst": bool(float(frac[i]) >= 1.0 - 1e-9),
            "distance": float(dist[i]),
            "l2": float(l2_rms(adv[i : i + 1], x[i : i + 1])),
            "linf": float(linf(adv[i : i + 1], x[i : i + 1])),
            "draws": draws,
        })
    summary = {"params": params, "info": {k: v for k, v in to_jsonable(info).items() if not (isinstance(v, list) and len(v) == len(ids))}}
    if unit.defense == OUR_DEFENSE:
        ctx.store.save_tensors(adversarial_cache_name(unit.defense, norm, unit.shard), {"adversarial": adv.cpu(), "ids": list(ids)})
    return recs, summary


def _strong_stats(rep: ReportContext) -> Dict[Tuple[str, str], Dict[str, Any]]:
    # Imported when a report is written, so that listing the experiments (``--help``) does
    # not load the attacks.
    from ..attacks.verdict import wilson_interval

    recs = [r for r in rep.records("strong") if r.get("attack") == "adaptive"]
    by = defaultdict(list)
    for r in recs:
        by[(r["defense"], str(r["variant"]).split("=", 1)[1])].append(r)
    out = {}
    for key, rs in by.items():
        frac = [float(r["correct_fraction"]) for r in rs]
        worst = sum(1 for r in rs if r["robust_worst"])
        out[key] = {
            "n": len(rs),
            "expected": sum(frac) / len(frac),
            "expected_ci": bootstrap_mean_interval(frac),
            "worst": worst / len(rs),
            "worst_ci": wilson_interval(worst, len(rs)),
            "draws": rs[0].get("draws"),
            "max_distance": max(float(r["distance"]) for r in rs),
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
    p = rep.preset
    text = ["## Strong adaptive attack", "",
            "Beyond the paper (PROTOCOL.md \"Strong adaptive attack\"): untargeted projected gradient descent inside the bound "
            f"(L2 ball of RMS radius 0.05, or Linf 8/255), random start, {p.get('adaptive_steps', '?')} steps per restart "
            f"(losses: {', '.join(p.get('adaptive_losses', []) or ['?'])}), EOT over {p.get('adaptive_eot', '?')} draws, BPDA through the "
            f"non-differentiable parts, best iterate kept; success judged on R = {p.get('adaptive_draws', '?')} fresh draws of the defense. "
            "**Expected** = mean over images of the fraction of draws still classified correctly; **worst case** = fraction of images "
            "classified correctly under every draw. Brackets: 95% intervals over images (percentile bootstrap for the expected value, "
            "Wilson for the worst case).", "", md_table(header, rows)]
    return rep.with_availability(text, "strong", what="the strong adaptive attack", also_selected_by=("table5",))


def report_diagnostics(rep: ReportContext) -> str:
    """The diagnostics per diagnosed defense, and warnings about zero or non-finite gradients."""
    units = [u for u in rep.ok_units("strong") if u["key"]["attack"] == "diagnostics"]
    text = ["## Diagnostics of the strong attack", "",
            "Carlini et al. (2019) checklist run beside the strong attack: the same attack on the undefended model, "
            "success with K and 2K steps, an unbounded run (should reach ~100%), gradient agreement across EOT draws, "
            "zero/NaN gradients.", ""]
    for u in sorted(units, key=lambda u: u["unit_id"]):
        text += [f"**{defense_label(u['key']['defense'])}, {u['key']['variant']}**", "", "```", u["summary"].get("text", "(no text)"), "```", ""]
    for u in sorted([u for u in rep.ok_units("strong") if u["key"]["attack"] == "adaptive"], key=lambda u: u["unit_id"]):
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
                line = f"**{defense_label(d)}: broken.** The strong adaptive attack breaks {defense_label(d)}, which the paper calls robust ({claim}); {figures}."
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
        text.append(f"- Paper protocol vs strong attack on our defense: BPDA+EOT leaves ACC {a:.2f}, the strong adaptive attack "
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

"""Fig. 4 (Sections 6.2-6.3): ACC and ASR per round of the paper's BPDA and BPDA+EOT attacks.

One unit per (defense, attack, image shard): the protocol attack ``bpda`` (Fig. 4 a/b) or
``bpda-eot`` (c/d) with its per-round history. The gradient is the paper's (PROTOCOL.md "BPDA,
paper protocol": backward as the identity through ``g``) for every defense that is not
differentiable as a whole (:func:`paper_approx`); for our defense a second, stronger variant
(``variant="stagewise"``) keeps the real gradient of the grid distortion and the identity only
through the rounding (``BPDA``'s stage-wise default), reported as its own rows and curves. The two
variants of a shard share their draws (common random numbers, :func:`draw_unit`): the same
defense draws at every step of the attack and in the verdict, so the gap between their curves
is the gradient's, not draw noise. :func:`protocol_attack` is shared with
Table 6 (``table6.py``) and learned BPDA (``learned.py``); :func:`fig4_curves` with Table 5
and the verdict. The adversarial examples of our defense are cached for the sample strip.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import AbstractSet, Any, Dict, List, Tuple

from ..attacks.protocol import paper_approx
from . import paper_numbers as P
from .context import RunContext, image_records, make_attack, predict_draws, slug, with_progress
from .experiment import Experiment, Records, Section
from .plots import plot_curves
from .reporting import ReportContext, defense_label, fmt, md_table, mean, merge_histories, write_csv
from .units import OUR_DEFENSE, Preset, Unit, ensemble_size

__all__ = ["EXPERIMENT", "plan", "run", "protocol_attack", "paper_approx", "fig4_curves", "report_fig4", "adversarial_cache_name",
           "STAGEWISE", "PAPER", "draw_unit"]

#: The variant of a Fig. 4 unit that differentiates our defense stage by stage (stronger than the paper).
STAGEWISE = "stagewise"
#: ``protocol_attack``'s default ``approx``: the paper's gradient, :func:`paper_approx`.
PAPER = "paper"


def plan(preset: Preset, selected: AbstractSet[str]) -> List[Unit]:
    """BPDA units for Fig. 4 a/b, then BPDA+EOT units for c/d, per defense and image shard."""
    units = [Unit("fig4", d, "bpda", s, cost=preset.shard_images(s) * preset.bpda_max_rounds * 1.35 * ensemble_size(preset, d))
             for d in preset.fig4_bpda_defenses for s in preset.shards()]
    units += [Unit("fig4", d, "bpda-eot", s, cost=preset.shard_images(s) * preset.bpda_max_rounds * (preset.eot + 0.35) * ensemble_size(preset, d))
              for d in preset.fig4_eot_defenses for s in preset.shards()]
    # the stronger, stage-wise gradient on our defense, beside the paper's
    units += [replace(u, variant=STAGEWISE) for u in units if u.defense == OUR_DEFENSE]
    return units


def draw_unit(unit: Unit) -> Unit:
    """The unit whose draw keys ``unit`` uses: a ``stagewise`` unit takes those of the paper's
    unit of the same defense, attack and shard (common random numbers), every other its own."""
    return replace(unit, variant="") if unit.variant == STAGEWISE else unit


def adversarial_cache_name(attack: str, defense: str, shard: int) -> str:
    """The cache entry of the final images of protocol attack ``attack`` on ``defense``, ``shard``."""
    return f"adv/fig4/{attack}/{slug(defense)}/s{shard}"


def protocol_attack(ctx: RunContext, unit: Unit, *, rounds: int, max_rounds: int, eot: int, approx: Any = PAPER) -> Records:
    """The paper's protocol attack ``unit.attack`` (``bpda`` or ``bpda-eot``) on ``unit``'s shard.

    Sections 6.2-6.3: targeted, ``rounds`` rounds (continued to the l2 bound up to
    ``max_rounds`` when larger), EOT over ``eot`` draws for ``bpda-eot``, ``approx`` the
    Section 6.4 network for learned BPDA (default :data:`PAPER`: :func:`paper_approx`; ``None``:
    ``BPDA``'s stage-wise default). Records carry the fresh-draw verdict and the
    protocol's own (last judged draw); the summary the per-round history.
    """
    params: Dict[str, Any] = {"rounds": rounds}
    if max_rounds > rounds:
        params.update(until_bound=True, max_rounds=max_rounds)
    if unit.attack == "bpda-eot":
        params["eot"] = eot
    x, labels, targets, ids = ctx.shard(unit.shard)
    model = ctx.defended(unit.defense)
    if isinstance(approx, str) and approx == PAPER:
        approx = paper_approx(model)
    if approx is not None:
        params["approx"] = approx
    name = "bpda-eot" if unit.attack == "bpda-eot" else "bpda"
    attack = make_attack(name, **with_progress(params, name, ctx.progress_hook))
    keys = draw_unit(unit)
    res = attack(model, x, labels=labels, targets=targets, generator=ctx.image_key(keys, ids))
    adv = res.adversarial.detach()
    info = res.info or {}
    # Fresh draws of the final images (the protocol's own curve uses one judged draw each).
    preds = predict_draws(model, adv, draws=ctx.preset.eval_draws, generator=ctx.image_key(keys, ids, "verdict"))
    extra = {}
    for key in ("stop_round", "stop_reason", "bound_round", "final_prediction"):
        if isinstance(info.get(key), list) and len(info[key]) == len(ids):
            extra[key] = info[key]
    recs = image_records(ids, labels, targets, preds, x=x, adv=adv, extra=extra)
    if "final_prediction" in extra:
        for r in recs:  # the protocol's verdict (last judged draw), as Fig. 4 counts it
            r["protocol_correct"] = r["final_prediction"] == r["label"]
            r["protocol_success"] = r["final_prediction"] == r["target"]
    summary = {
        "history": res.history,
        "n": len(ids),
        "params": {k: v for k, v in params.items() if k != "approx"},
        "gradient": approx if isinstance(approx, str) or approx is None else "learned approximation",
        **{k: info[k] for k in ("rounds_run", "mean_bound_round", "n_reached_bound", "rounds_to_all_stopped", "initial") if k in info},
    }
    if unit.defense == OUR_DEFENSE and unit.experiment == "fig4" and unit.variant != STAGEWISE:
        ctx.store.save_tensors(adversarial_cache_name(unit.attack, unit.defense, unit.shard), {"adversarial": adv.cpu(), "ids": list(ids)})
    return recs, summary


def run(ctx: RunContext, unit: Unit) -> Records:
    """The protocol attack with the preset's Fig. 4 rounds (continued to the bound up to its cap) and
    EOT; the paper's gradient, or the stage-wise one for a ``stagewise`` unit."""
    p = ctx.preset
    return protocol_attack(ctx, unit, rounds=p.bpda_rounds, max_rounds=p.bpda_max_rounds, eot=p.eot,
                           approx=None if unit.variant == STAGEWISE else PAPER)


def _curve_attack(attack: str, variant: Any) -> str:
    """A curve's attack key: ``bpda`` / ``bpda-eot``, ``@stagewise`` appended for that variant."""
    return f"{attack}@{STAGEWISE}" if variant == STAGEWISE else attack


def _merge_curves(rep: ReportContext) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """(attack, defense) -> merged history and per-image stop information."""
    out: Dict[Tuple[str, str], Dict[str, Any]] = {}
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = defaultdict(list)
    for u in rep.ok_units("fig4"):
        groups[(_curve_attack(u["key"]["attack"], u["key"].get("variant")), u["key"]["defense"])].append(u)
    recs = rep.records("fig4")
    for key, us in groups.items():
        us = sorted(us, key=lambda u: u["key"]["shard"])
        hist = merge_histories([u["summary"].get("history", []) for u in us], [u["summary"].get("initial") for u in us])
        rs = [r for r in recs if (_curve_attack(r["attack"], r.get("variant")), r["defense"]) == key]
        bound_rounds = [r["bound_round"] for r in rs if isinstance(r.get("bound_round"), int) and r["bound_round"] >= 0]
        out[key] = {"history": hist, "records": rs, "bound_rounds": bound_rounds, "n": len(rs)}
    return out


def fig4_curves(rep: ReportContext) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """(attack, defense) -> merged history and per-image stop information (computed once per report);
    the stage-wise variant's attack is ``bpda@stagewise`` / ``bpda-eot@stagewise``."""
    return rep.memo("fig4.curves", lambda: _merge_curves(rep))


def report_fig4(rep: ReportContext) -> str:
    """Fig. 4 a-d (one PNG per panel) and ACC/ASR at round 50 (or the last) and at the end."""
    curves = fig4_curves(rep)
    rounds = int(rep.preset.get("bpda_rounds", 50) or 50)
    at = min(50, rounds)
    note = f"{rep.shrunk_note()}: {rep.preset.get('n_images')} images, {rounds} rounds, EOT {rep.preset.get('eot')}" if rep.shrunk_note() else ""
    figs = []
    for attack, tag, panels in (("bpda", "BPDA", ("a", "b")), ("bpda-eot", "BPDA+EOT", ("c", "d"))):
        for metric, panel, ylabel in (("accuracy", panels[0], "ACC"), ("asr", panels[1], "ASR")):
            data = {defense_label(d): [(h["round"], h[metric]) for h in c["history"]] for (a, d), c in sorted(curves.items()) if a == attack}
            data.update({f"{defense_label(d)}, stage-wise BPDA": [(h["round"], h[metric]) for h in c["history"]]
                         for (a, d), c in sorted(curves.items()) if a == _curve_attack(attack, STAGEWISE)})
            paper_pts = {}
            for (a, d), pts in P.FIG4.items():
                if a != attack:
                    continue
                key = "acc" if metric == "accuracy" else "asr"
                xs = []
                for r, vals in pts.items():
                    if r == "bound" or vals.get(key) is None:
                        continue
                    xs.append((int(r), float(vals[key])))
                if xs and defense_label(d) in data:
                    paper_pts[defense_label(d)] = xs
            path = rep.figures / f"fig4{panel}_{attack}_{metric}.png"
            if data:
                plot_curves(path, data, title=f"Fig. 4({panel}): {ylabel} under {tag}", ylabel=ylabel, paper_points=paper_pts, note=note)
                figs.append((panel, tag, ylabel, path.name))
    header = ["Defense", "Attack", "paper (Sections 6.2-6.3)", f"ACC ours @ round {at}", f"ASR ours @ round {at}",
              "ACC ours (end)", "ASR ours (end)", "rounds run", "images at l2 bound", "mean round at bound", "n"]
    rows = []
    for (attack, d), c in sorted(curves.items(), key=lambda kv: (kv[0][0].partition("@")[0], kv[0][1] != OUR_DEFENSE, "@" in kv[0][0], kv[0][1])):
        hist = c["history"]
        h_at = next((h for h in hist if h["round"] == at), hist[-1] if hist else None)
        end = hist[-1] if hist else None
        br = c["bound_rounds"]
        base, _, variant = attack.partition("@")
        tag = ("BPDA" if base == "bpda" else "BPDA+EOT") + (" (stage-wise: real gradient of the grid distortion)" if variant else "")
        rows.append([defense_label(d), tag, P.FIG4_QUALIFIERS.get((base, d), "-") if not variant else "- (not in the paper)",
                     fmt(h_at and h_at["accuracy"]), fmt(h_at and h_at["asr"]), fmt(end and end["accuracy"]), fmt(end and end["asr"]),
                     end["round"] if end else "-", f"{len(br)}/{c['n']}", fmt(mean(br), 0) if br else "-", c["n"]])
    write_csv(rep.tables / "fig4.csv", ["defense", "attack", "round", "accuracy", "asr", "n"],
              [[d, a, h["round"], h["accuracy"], h["asr"], h["n"]] for (a, d), c in sorted(curves.items()) for h in c["history"]])
    text = [
        "## Fig. 4: BPDA and BPDA+EOT",
        "",
        "The paper's protocol attacks (PROTOCOL.md): targeted, per round `x <- clip(x - 0.1 * grad CE(f(g(x)), target))`, "
        "gradient through g by BPDA: the identity over the whole of a non-differentiable defense, as the paper (the real "
        "gradient of a differentiable one), BPDA+EOT averaging the gradient over "
        f"{rep.preset.get('eot', '?')} draws (paper: 30); an image stops at success (target with l2 < 0.05) or when its l2 would exceed 0.05. "
        "ACC/ASR per round count each image's last judged prediction (one draw), as the paper's curves do. "
        "The paper's quoted values are drawn as hollow markers. The stage-wise rows attack our defense harder than the "
        "paper does: the identity only through the rounding, the real gradient through the grid distortion.",
        "",
    ]
    for panel, tag, ylabel, name in figs:
        text.append(f"![Fig. 4({panel}) {ylabel} under {tag}](figures/{name})")
    text += ["", md_table(header, rows)]
    return rep.with_availability(text, "fig4")


EXPERIMENT = Experiment(name="fig4", title="Fig. 4: BPDA and BPDA+EOT, ACC and ASR per round", plan=plan, run=run,
                        sections=(Section(20, report_fig4),), aliases=("fig.4", "figure4"))

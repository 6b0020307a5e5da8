"""Table 4 (Section 6.5): the distortion limit delta of the grid distortion swept.

The clean images and the Table 2 examples (``standard_attacks.py``) through
``Defended(dct-distort(delta=...))`` for each delta of the preset (the paper's default is
0.15), judged on R fresh draws.
"""

from __future__ import annotations

from collections import defaultdict
from typing import AbstractSet, List

from . import paper_numbers as P
from .context import RunContext, image_records, predict_draws
from .experiment import Experiment, Records, Section
from .reporting import ReportContext, fmt, md_table, mean, write_csv
from .standard_attacks import inputs_for
from .units import OUR_DEFENSE, Preset, Unit

__all__ = ["EXPERIMENT", "plan", "run", "report_table4"]


def plan(preset: Preset, selected: AbstractSet[str]) -> List[Unit]:
    """One unit per delta, input (clean, then each standard attack) and image shard."""
    return [Unit("table4", OUR_DEFENSE, label, s, variant=f"delta={delta:g}", cost=preset.shard_images(s) * 0.35 * preset.eval_draws)
            for delta in preset.deltas
            for label in ("clean",) + tuple(a.label for a in preset.table2_attacks)
            for s in preset.shards()]


def run(ctx: RunContext, unit: Unit) -> Records:
    """The inputs through ``dct-distort`` with the unit's delta, judged on R fresh draws."""
    delta = float(unit.params["delta"])
    x, labels, targets, ids = ctx.shard(unit.shard)
    xa = inputs_for(ctx, unit.attack, unit.shard)
    model = ctx.defended(unit.defense, delta=delta)
    preds = predict_draws(model, xa, draws=ctx.preset.eval_draws, generator=ctx.image_key(unit, ids))
    return image_records(ids, labels, targets, preds, x=x, adv=xa), {"draws": int(preds.shape[0]), "delta": delta}


def report_table4(rep: ReportContext) -> str:
    """Table 4: ACC and ASR per delta, ours (paper)."""
    recs = rep.records("table4")
    by = defaultdict(list)
    for r in recs:
        by[(r["attack"], float(str(r["variant"]).split("=", 1)[1]))].append(r)
    deltas = [float(d) for d in rep.preset.get("deltas", P.TABLE4_DELTAS)]
    specs = rep.spec_notes()
    labels = ["clean"] + [a["label"] for a in rep.preset.get("table2_attacks", [])]
    header = ["Attack"] + [f"delta={d:g}" for d in deltas]
    rows_acc, rows_asr, csv_rows = [], [], []
    for label in labels:
        ra, rs_ = ["No attack" if label == "clean" else label], ["No attack" if label == "clean" else label]
        paper = P.TABLE4.get(label)
        untargeted = not specs.get(label, {}).get("targeted", True)
        for d in deltas:
            rs = by.get((label, d), [])
            acc = mean(r["correct_rate"] for r in rs)
            asr = None if label == "clean" else mean((1 - r["correct_rate"]) if untargeted else r["success_rate"] for r in rs)
            pa = ps = None
            if paper is not None and d in P.TABLE4_DELTAS:
                pa, ps = paper[P.TABLE4_DELTAS.index(d)]
            ra.append(f"{fmt(acc)} ({fmt(pa)})")
            rs_.append("Nan" if label == "clean" else f"{fmt(asr)} ({fmt(ps)})")
            csv_rows.append([label, d, acc, pa, asr, ps, len(rs)])
        rows_acc.append(ra)
        rows_asr.append(rs_)
    write_csv(rep.tables / "table4.csv", ["attack", "delta", "acc_ours", "acc_paper", "asr_ours", "asr_paper", "n"], csv_rows)
    text = [
        "## Table 4: distortion limit delta sweep",
        "",
        f"Clean images and the Table 2 examples through `{OUR_DEFENSE}` with the grid-distortion limit delta swept "
        "(the paper's default is 0.15). Each cell: **ours (paper)**; ours is the expected value over draws.",
        "",
        "ACC:",
        "",
        md_table(header, rows_acc),
        "",
        "ASR:",
        "",
        md_table(header, rows_asr),
    ]
    return rep.with_availability(text, "table4")


EXPERIMENT = Experiment(name="table4", title="Table 4: distortion limit delta sweep", plan=plan, run=run,
                        sections=(Section(50, report_table4),))

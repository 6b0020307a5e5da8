"""Table 6: the four combinations of a quantization step and a randomisation step
after the paper's BPDA rounds (``fig4.protocol_attack``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import AbstractSet, List

from . import paper_numbers as P
from .context import RunContext
from .experiment import Experiment, Records, Section
from .fig4 import PAPER, protocol_attack
from .reporting import ReportContext, defense_label, fmt, md_table, merge_histories, write_csv
from .units import Preset, Unit

__all__ = ["EXPERIMENT", "plan", "run", "report_table6"]


def plan(preset: Preset, selected: AbstractSet[str]) -> List[Unit]:
    """One BPDA unit per combination and image shard."""
    return [Unit("table6", d, "bpda", s, cost=preset.shard_images(s) * preset.table6_rounds * 1.35)
            for d in preset.table6_defenses for s in preset.shards()]


def run(ctx: RunContext, unit: Unit) -> Records:
    """BPDA for the preset's Table 6 rounds, with the paper's gradient (:func:`~prepdefense.attacks.protocol.paper_approx`:
    the identity over a non-differentiable combination that keeps the image's size, stage by stage
    for one with ``rand``)."""
    p = ctx.preset
    return protocol_attack(ctx, unit, rounds=p.table6_rounds, max_rounds=p.table6_rounds, eot=p.eot, approx=PAPER)


def report_table6(rep: ReportContext) -> str:
    """Table 6: ACC and ASR after the BPDA rounds per combination, beside the paper's."""
    groups = defaultdict(list)
    for u in rep.ok_units("table6"):
        groups[u["key"]["defense"]].append(u)
    rounds = rep.preset.get("table6_rounds", "?")
    header = ["Defense", "ACC (paper, 50 rounds)", f"ACC (ours, {rounds} rounds)", "ASR (paper)", "ASR (ours)", "n"]
    rows = []
    order = list(P.TABLE6) + sorted(set(groups) - set(P.TABLE6))
    for d in order:
        us = sorted(groups.get(d, []), key=lambda u: u["key"]["shard"])
        hist = merge_histories([u["summary"].get("history", []) for u in us])
        end = hist[-1] if hist else None
        p = P.TABLE6.get(d, (None, None))
        rows.append([defense_label(d), fmt(p[0]), fmt(end and end["accuracy"]), fmt(p[1]), fmt(end and end["asr"]), end["n"] if end else 0])
    write_csv(rep.tables / "table6.csv", header, rows)
    text = ["## Table 6: combinations after BPDA rounds", "",
            "The paper's BPDA protocol against the four combinations of a quantization step and a randomisation step.", "",
            md_table(header, rows)]
    return rep.with_availability(text, "table6")


EXPERIMENT = Experiment(name="table6", title="Table 6: combinations after BPDA rounds", plan=plan, run=run,
                        sections=(Section(70, report_table6),))

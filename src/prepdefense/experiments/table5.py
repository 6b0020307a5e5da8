"""Table 5: a broader comparison on bounded attacks (the paper's own row: Section 6.3).

The literature rows are quoted from the paper (``paper_numbers.TABLE5``); our rows are
measured by other experiments: the paper's BPDA+EOT protocol on our defense (``fig4.py``)
and the strong attack ensemble on it (``strong.py``). Table 5 has no units of its own:
selected without ``strong``, it plans the strong attack's units for our defense.
"""

from __future__ import annotations

from typing import AbstractSet, List

from . import paper_numbers as P
from .experiment import Experiment, Section
from .fig4 import fig4_curves
from .reporting import ReportContext, md_table, write_csv
from .strong import plan_units as plan_strong_units
from .strong import strong_stats
from .units import OUR_DEFENSE, Preset, Unit

__all__ = ["EXPERIMENT", "plan", "report_table5"]


def plan(preset: Preset, selected: AbstractSet[str]) -> List[Unit]:
    """The strong attack on our defense, unless ``strong`` (all its defenses) is selected too."""
    return [] if "strong" in selected else plan_strong_units(preset, [OUR_DEFENSE])


def report_table5(rep: ReportContext) -> str:
    """Table 5: the literature's rows quoted, ours measured (Fig. 4's BPDA+EOT and the strong attack)."""
    curves, strong = fig4_curves(rep), strong_stats(rep)
    header = ["Solution", "Requirement", "Attack", "Linf = 0.031", "l2 = 0.05", "source"]
    rows = [list(r) + ["quoted from the paper (literature)"] for r in P.TABLE5]
    rows.append(["Our method (paper)", "preprocessing", "BPDA+EOT", "-", "58%", "quoted from the paper"])
    eot = curves.get(("bpda-eot", OUR_DEFENSE))
    if eot and eot["history"]:
        rows.append(["Our method (ours, paper protocol)", "preprocessing", f"BPDA+EOT, {eot['history'][-1]['round']} rounds", "-",
                     f"{100 * eot['history'][-1]['accuracy']:.0f}%", "measured"])
    s_l2, s_li = strong.get((OUR_DEFENSE, "l2")), strong.get((OUR_DEFENSE, "linf"))
    if s_l2 or s_li:
        def cell(s):
            return f"{100 * s['expected']:.0f}% (worst {100 * s['worst']:.0f}%)" if s else "-"

        rows.append(["Our method (ours, strong attack ensemble)", "preprocessing", "APGD, EOT-PGD + BPDA, transfer, Square; untargeted", cell(s_li), cell(s_l2), "measured"])
    write_csv(rep.tables / "table5.csv", header, rows)
    text = [
        "## Table 5: broader comparison on bounded attacks",
        "",
        "Robust accuracy under bounded attacks. **The literature rows are quoted from the paper's Table 5, not measured here.** "
        "Our rows are measured: the paper's BPDA+EOT protocol (accuracy at the end of the Fig. 4 run) and the strong attack ensemble "
        "(expected robust accuracy over fresh draws; worst case over draws in brackets).",
        "",
        md_table(header, rows),
    ]
    if not (eot or s_l2 or s_li):
        text.append("")
        text.append("- not available: neither the Fig. 4 BPDA+EOT run nor the strong attack on our defense has finished.")
    return "\n".join(text)


EXPERIMENT = Experiment(name="table5", title="Table 5: broader comparison on bounded attacks", plan=plan,
                        sections=(Section(60, report_table5),))

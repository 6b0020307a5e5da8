"""The n = 100 table of ``benchmarks/RESULTS.md`` (issue 10, item 5), from the robustness cards
that ``prepdefense evaluate`` wrote: one row per ``DIR/*/card.json``.

Each row: the defense (for ``dct-distort``, the table its card describes, since the default
table changed between runs), the threat model, clean accuracy behind the defense, robust
accuracy expected over the verdict draws and in the worst case with their 95% intervals, the
attack that broke the most images, the checklist warnings and the units' compute time.

The expected interval is recomputed from the card's per-image fractions with the current
:func:`prepdefense.attacks.verdict.bootstrap_interval` (and the mean checked against the card's),
so cards written by older code, which held the plain percentile bootstrap (a point interval
for 0.00 on every image), are shown with the interval the library gives today.

Usage::

    python benchmarks/evaluation_table.py --runs runs/eval-n100            # print the table
    python benchmarks/evaluation_table.py --runs runs/eval-n100 --write    # and put it in RESULTS.md

``--write`` replaces the text between ``<!-- n100-table -->`` and ``<!-- /n100-table -->``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List

from prepdefense.atomic_io import atomic_write_text
from prepdefense.attacks.verdict import bootstrap_interval

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["dct-distort", "jpeg", "fd", "rand", "shield", "tv", "bdr", "pd", "crop"]
MARKERS = ("<!-- n100-table -->", "<!-- /n100-table -->")
HEADER = ("| defense | threat model | clean accuracy (defended, expected) | robust accuracy, expected over the draws | "
          "worst case | strongest attack (broke / ran on) | checklist warnings | wall time |\n|---|---|---|---|---|---|---|---|")


def defense_label(card: Dict[str, Any]) -> str:
    """The defense's name as run; for a table-holding defense run by its default, the table's
    provenance from the card's description (``table=learned (learned.json: cw 5x200, ...)``)."""
    name = card["defense"]["name"]
    table = re.search(r"table=([\w.-]+) \(([^)]*)\)", card["defense"].get("description", ""))
    return f"`{name}` (table {table.group(1)}: {table.group(2)})" if table and "[" not in name else f"`{name}`"


def row(card: Dict[str, Any], where: Path) -> str:
    ens, clean = card["ensemble"], card["clean"]
    frac = [r["correct_fraction"] for r in card["per_image"]]
    if abs(sum(frac) / len(frac) - ens["robust_accuracy_expected"]) > 1e-6:
        raise ValueError(f"{where}: per-image fractions do not average to the card's expected robust accuracy")
    expected_ci = bootstrap_interval(frac, seed=card["seed"])
    strongest = max(card["per_attack"], key=lambda r: r.get("broke", 0))
    ci = lambda v: f"[{v[0]:.2f}, {v[1]:.2f}]"  # noqa: E731
    tm = card["threat_model"]
    warnings = card["flags"].get("warnings") or []
    return (f"| {defense_label(card)} | {tm['norm']} {tm['eps']:.4g} | {clean['robust_accuracy_expected']:.2f} | "
            f"{ens['robust_accuracy_expected']:.2f} {ci(expected_ci)} | "
            f"{ens['robust_accuracy_worst']:.2f} {ci(ens['robust_accuracy_worst_ci95'])} | "
            f"{strongest['attack']} ({strongest.get('broke', 0)} of {strongest.get('ran_on', 0)}) | "
            f"{'; '.join(warnings) if warnings else 'none'} | {card['seconds'] / 60:.1f} min |")


def table(runs: Path) -> str:
    cards: List[tuple] = []
    for path in sorted(runs.glob("*/card.json")):
        card = json.loads(path.read_text())
        base = card["defense"]["name"].split("[")[0]
        key = (ORDER.index(base) if base in ORDER else len(ORDER), card["defense"]["name"], defense_label(card),
               card["threat_model"]["norm"] != "linf")
        cards.append((key, row(card, path)))
    if not cards:
        raise SystemExit(f"no */card.json under {runs}")
    return HEADER + "\n" + "\n".join(r for _, r in sorted(cards))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "eval-n100", help="folder of evaluate --out folders")
    ap.add_argument("--write", action="store_true", help="replace the table between the markers of --results")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="the file --write edits")
    args = ap.parse_args(argv)
    text = table(args.runs)
    print(text)
    if args.write:
        results = args.results
        s = results.read_text()
        if MARKERS[0] not in s or MARKERS[1] not in s:
            raise SystemExit(f"{results} has no {MARKERS[0]} ... {MARKERS[1]} markers")
        a, b = s.index(MARKERS[0]) + len(MARKERS[0]), s.index(MARKERS[1])
        atomic_write_text(results, s[:a] + "\n" + text + "\n" + s[b:])
    return 0


if __name__ == "__main__":
    sys.exit(main())

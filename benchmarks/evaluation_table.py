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

``--write`` puts the table between ``<!-- n100-table -->`` and ``<!-- /n100-table -->``. A row
is one defense at one threat model (its first two columns): the rows made from cards under
``--runs`` replace the rows of the same defense and threat model, and rows already in RESULTS.md
whose card is not under ``--runs`` are kept as they are, their intervals not recomputed (a run
folder lives outside the repository and may be gone, as on a new machine; its measured row is not
dropped for that). A kept row whose defense and threat model a card gives under another label
(another table) is kept with a warning. ``--drop-missing`` writes the cards' rows alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Sequence

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


def _cell(text: str) -> str:
    """A table cell's text with its pipes escaped, so a row splits into its cells on ``" | "``."""
    return text.replace("|", "\\|")


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
    return (f"| {_cell(defense_label(card))} | {tm['norm']} {tm['eps']:.4g} | {clean['robust_accuracy_expected']:.2f} | "
            f"{ens['robust_accuracy_expected']:.2f} {ci(expected_ci)} | "
            f"{ens['robust_accuracy_worst']:.2f} {ci(ens['robust_accuracy_worst_ci95'])} | "
            f"{strongest['attack']} ({strongest.get('broke', 0)} of {strongest.get('ran_on', 0)}) | "
            f"{_cell('; '.join(warnings)) if warnings else 'none'} | {card['seconds'] / 60:.1f} min |")


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


def _name(label: str, line: str) -> str:
    name = re.match(r"`([^`]+)`", label)
    if name is None:
        raise ValueError(f"not a row of the n = 100 table: {line!r}")
    return name.group(1)


def row_key(line: str) -> tuple:
    """Where a table row sorts: the defense's place in ``ORDER``, its name, its label, Linf first,
    then the rest of the row. Read from the row's text, so a row kept from RESULTS.md sorts as the
    one made from its card would."""
    label, threat = _cells(line)[:2]
    name = _name(label, line)
    base = name.split("[")[0]
    return (ORDER.index(base) if base in ORDER else len(ORDER), name, label, threat.split()[0] != "linf", line)


def row_identity(line: str) -> tuple:
    """One defense at one threat model: the row's first two cells (the defense's label, which
    for a table-holding defense names its table, and the norm with the radius)."""
    return tuple(_cells(line)[:2])


def _defense_threat(line: str) -> tuple:
    """The defense's name (without the label's table note) and the threat model of a row."""
    label, threat = row_identity(line)
    return _name(label, line), threat


def card_rows(runs: Path) -> List[str]:
    """One row per ``runs/*/card.json``."""
    rows = [row(json.loads(path.read_text()), path) for path in sorted(runs.glob("*/card.json"))]
    if not rows:
        raise SystemExit(f"no */card.json under {runs}")
    return rows


class Merged(NamedTuple):
    """The table's rows: ``made`` from cards, ``kept`` from before (no card gives their first two
    cells), and ``relabelled``: kept rows of a defense and threat model a card gives under
    another label (a row made before the label changed, or another table; kept, and worth a look)."""

    made: List[str]
    kept: List[str]
    relabelled: List[str]

    def text(self) -> str:
        return HEADER + "\n" + "\n".join(sorted(self.made + self.kept, key=row_key))


def merge(made: Sequence[str], earlier: Sequence[str] = ()) -> Merged:
    """``made`` (rows from cards) with the ``earlier`` rows (e.g. read from RESULTS.md) whose first
    two cells no made row has; an earlier row listed twice is kept once."""
    ids = {row_identity(r) for r in made}
    by_name = {_defense_threat(r) for r in made}
    kept: List[str] = []
    for r in earlier:
        if row_identity(r) not in ids and r not in kept:
            kept.append(r)
    relabelled = [r for r in kept if _defense_threat(r) in by_name]
    return Merged(list(made), kept, relabelled)


def table(runs: Path, kept: Sequence[str] = ()) -> str:
    """The table from the cards under ``runs``, with the rows ``kept`` (earlier rows, e.g. read
    from RESULTS.md) whose defense and threat model no card gives."""
    return merge(card_rows(runs), kept).text()


def rows_between_markers(text: str) -> List[str]:
    """The table rows (not the header) between the markers of ``text``.

    Raises:
        ValueError: a line there that is neither a row, the header nor blank.
    """
    a, b = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    header = set(HEADER.splitlines())
    rows = []
    for ln in text[a:b].splitlines():
        if ln.startswith("| `"):
            rows.append(ln)
        elif ln.strip() and ln not in header:
            raise ValueError(f"between {MARKERS[0]} and {MARKERS[1]}, a line that is not a row of the table: {ln!r}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "eval-n100", help="folder of evaluate --out folders")
    ap.add_argument("--write", action="store_true", help="put the table between the markers of --results (see above)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="the file --write edits")
    ap.add_argument("--drop-missing", action="store_true",
                    help="with --write: drop the rows of --results whose card is not under --runs (default: keep them)")
    args = ap.parse_args(argv)
    if args.drop_missing and not args.write:
        ap.error("--drop-missing only changes what --write writes")
    s, earlier = None, []
    if args.write:
        s = args.results.read_text()
        if MARKERS[0] not in s or MARKERS[1] not in s:
            raise SystemExit(f"{args.results} has no {MARKERS[0]} ... {MARKERS[1]} markers")
        if not args.drop_missing:
            earlier = rows_between_markers(s)
    merged = merge(card_rows(args.runs), earlier)
    text = merged.text()
    print(text)
    if args.write:
        if merged.kept:
            print(f"kept {len(merged.kept)} row(s) of {args.results.name} with no card under {args.runs} "
                  "(as they were: their intervals are not recomputed)", file=sys.stderr)
        for r in merged.relabelled:
            print(f"warning: kept {row_identity(r)}, whose defense and threat model a card gives under another label; "
                  "--drop-missing drops it", file=sys.stderr)
        a, b = s.index(MARKERS[0]) + len(MARKERS[0]), s.index(MARKERS[1])
        atomic_write_text(args.results, s[:a] + "\n" + text + "\n" + s[b:])
    return 0


if __name__ == "__main__":
    sys.exit(main())

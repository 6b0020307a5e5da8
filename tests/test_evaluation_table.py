"""`benchmarks/evaluation_table.py`: RESULTS' n = 100 table, made from evaluate's cards."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluation_table.py"


def _module():
    spec = importlib.util.spec_from_file_location("evaluation_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _card(folder: Path, name: str, norm: str, fractions, description: str = "") -> None:
    n = len(fractions)
    folder.mkdir(parents=True)
    card = {
        "defense": {"name": name, "description": description}, "seed": 0, "seconds": 90.0,
        "threat_model": {"norm": norm, "eps": 0.05 if norm == "l2" else 8 / 255},
        "clean": {"robust_accuracy_expected": 0.9},
        "ensemble": {"robust_accuracy_expected": sum(fractions) / n, "robust_accuracy_worst": 0.0,
                     "robust_accuracy_worst_ci95": [0.0, 0.04]},
        "per_image": [{"correct_fraction": f} for f in fractions],
        "per_attack": [{"attack": "apgd-ce", "broke": 7, "ran_on": 9}, {"attack": "square", "broke": 0, "ran_on": 0}],
        "flags": {"warnings": []},
    }
    (folder / "card.json").write_text(json.dumps(card))


def test_table_rows_order_labels_and_recomputed_intervals(tmp_path):
    mod = _module()
    _card(tmp_path / "jpeg-l2", "jpeg", "l2", [0.0] * 100)
    _card(tmp_path / "dct-linf", "dct-distort", "linf", [0.0] * 100,
          "DCTDistort( table=learned (learned.json: cw 5x200, efficientnet-lite0, 100 images), delta=0.15 )")
    lines = mod.table(tmp_path).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| `dct-distort` (table learned: learned.json: cw 5x200, efficientnet-lite0, 100 images) | linf")
    assert lines[3].startswith("| `jpeg` | l2 0.05 | 0.90 |")
    # the plain percentile bootstrap's point interval is not what the table shows
    assert "0.00 [0.00, 0.05]" in lines[3] and "apgd-ce (7 of 9)" in lines[3] and "1.5 min" in lines[3]


def test_table_refuses_a_card_whose_fractions_disagree_and_writes_between_markers(tmp_path):
    mod = _module()
    runs = tmp_path / "runs"
    _card(runs / "jpeg-l2", "jpeg", "l2", [0.0] * 10)
    results = tmp_path / "RESULTS.md"
    results.write_text("before\n<!-- n100-table -->\nold\n<!-- /n100-table -->\nafter\n")
    with pytest.raises(ValueError, match="not a row of the table: 'old'"):  # what --write would drop unseen
        mod.main(["--runs", str(runs), "--write", "--results", str(results)])
    assert mod.main(["--runs", str(runs), "--write", "--drop-missing", "--results", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("before\n<!-- n100-table -->\n| defense |") and "old" not in text and text.endswith("after\n")
    card = json.loads((runs / "jpeg-l2" / "card.json").read_text())
    card["ensemble"]["robust_accuracy_expected"] = 0.5
    (runs / "jpeg-l2" / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="do not average"):
        mod.table(runs)


def test_write_keeps_rows_whose_card_is_gone_and_replaces_those_a_card_gives(tmp_path, capsys):
    """A run folder lives outside the repository: on a new machine only some cards are there, and
    --write must not drop the measured rows of the others."""
    mod = _module()
    first = tmp_path / "first"
    _card(first / "jpeg-linf", "jpeg", "linf", [0.0] * 10)
    _card(first / "crop-linf", "crop", "linf", [0.0] * 10)
    results = tmp_path / "RESULTS.md"
    results.write_text("before\n<!-- n100-table -->\n<!-- /n100-table -->\nafter\n")
    assert mod.main(["--runs", str(first), "--write", "--results", str(results)]) == 0
    old = mod.rows_between_markers(results.read_text())
    assert [mod.row_identity(r)[0] for r in old] == ["`jpeg`", "`crop`"]

    second = tmp_path / "second"  # the jpeg card is gone; crop at RMS is new, crop at Linf re-measured
    _card(second / "crop-l2", "crop", "l2", [0.5] * 10)
    _card(second / "crop-linf", "crop", "linf", [1.0] * 10)
    assert mod.main(["--runs", str(second), "--write", "--results", str(results)]) == 0
    assert "kept 1 row(s)" in capsys.readouterr().err
    rows = mod.rows_between_markers(results.read_text())
    assert [mod.row_identity(r) for r in rows] == [("`jpeg`", "linf 0.03137"), ("`crop`", "linf 0.03137"), ("`crop`", "l2 0.05")]
    assert rows[0] == old[0]  # kept as it was
    assert "| 1.00 [" in rows[1] and "| 0.50 [" in rows[2]  # crop at Linf replaced, not doubled

    assert mod.main(["--runs", str(second), "--write", "--drop-missing", "--results", str(results)]) == 0
    assert [mod.row_identity(r)[0] for r in mod.rows_between_markers(results.read_text())] == ["`crop`", "`crop`"]


def test_row_key_refuses_a_line_that_is_not_a_row():
    with pytest.raises(ValueError, match="not a row"):
        _module().row_key("| defense | threat model |")


def test_the_table_in_results_is_in_the_order_the_script_writes():
    mod = _module()
    rows = mod.rows_between_markers((SCRIPT.parent / "RESULTS.md").read_text())
    assert rows and rows == sorted(rows, key=mod.row_key)


def test_labels_with_pipes_ties_duplicates_and_relabelled_rows(tmp_path, capsys):
    mod = _module()
    runs = tmp_path / "runs"
    _card(runs / "d-linf", "dct-distort", "linf", [0.0] * 10, "DCTDistort( table=mine (a | b, 10 images) )")
    made = mod.card_rows(runs)
    assert "(table mine: a \\| b, 10 images)" in made[0]  # escaped: the row still has 8 cells
    assert mod.row_identity(made[0]) == ("`dct-distort` (table mine: a \\| b, 10 images)", "linf 0.03137")
    # Same label and norm at two radii: the order is the text's, whichever comes first.
    small = made[0].replace("linf 0.03137", "linf 0.01569")
    assert sorted([made[0], small], key=mod.row_key) == sorted([small, made[0]], key=mod.row_key)
    # An earlier row listed twice is kept once; one of the same defense under another label is
    # kept and reported.
    other = made[0].replace("(table mine: a \\| b, 10 images)", "(table old: 5 images)")
    merged = mod.merge(made, [other, other])
    assert merged.kept == [other] and merged.relabelled == [other]
    results = tmp_path / "RESULTS.md"
    results.write_text(f"<!-- n100-table -->\n{mod.HEADER}\n{other}\n{other}\n<!-- /n100-table -->\n")
    assert mod.main(["--runs", str(runs), "--write", "--results", str(results)]) == 0
    err = capsys.readouterr().err
    assert "kept 1 row(s)" in err and "under another label" in err
    assert mod.rows_between_markers(results.read_text()) == [made[0], other]


def test_drop_missing_without_write_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        _module().main(["--runs", str(tmp_path), "--drop-missing"])
    assert e.value.code == 2

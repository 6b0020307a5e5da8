"""`prepdefense usability` and the `usability` experiment (issue 15, item 2): clean accuracy of
every defense and table on protocol images, beside the paper's figure."""

from __future__ import annotations

import json

import pytest

from prepdefense.cli.main import main
from prepdefense.experiments import registry, units as U
from prepdefense.experiments.usability import PAPER_SIDE, configs


def test_every_defense_both_tables_defend_at_and_the_delta_sweep_are_planned():
    preset = U.get_preset("paper")
    keys = [c.key for c in configs(preset.deltas)]
    assert len(keys) == len(set(keys)) and all("=" not in k and "," not in k and "/" not in k for k in keys)
    for name in ("dct-distort", "dct-distort@fd", f"dct-distort@at{PAPER_SIDE}", f"dct-distort@fd@at{PAPER_SIDE}",
                 "dct-quant", "grid-distort", "fd", "rand", "shield", "tv", "jpeg", "bdr", "pd", "crop"):
        assert name in keys
    assert sum(k.startswith("dct-distort@delta") for k in keys) == len(preset.deltas)
    units = registry.get("usability").plan(preset.with_overrides(usability_images=120), {"usability"})
    assert len(units) == len(keys) * 3  # 50 images per unit
    assert dict(zip(*zip(*[(c.key, c.paper_acc) for c in configs(preset.deltas)])))["dct-distort"] == 0.95


def test_an_earlier_shipped_table_gets_its_own_row(tmp_path, monkeypatch):
    import torch

    from prepdefense.defenses import quant_tables

    for stem, value in (("learned", 40.0), ("learned-v1", 50.0)):
        quant_tables.save_table(tmp_path / f"{stem}.json", torch.full((8, 8), value, dtype=torch.float64), {})
    monkeypatch.setattr(quant_tables, "TABLES_DIR", tmp_path)
    monkeypatch.setattr(quant_tables, "LEARNED_TABLE_PATH", tmp_path / "learned.json")
    rows = {c.key: c for c in configs(U.get_preset("paper").deltas)}
    assert rows["dct-distort@learned-v1"].params == {"table": "learned-v1"} and "dct-distort@learned" not in rows


@pytest.fixture
def three_configs(monkeypatch):
    """The bare model, the default defense and the same defended at 299: the pipeline, cheaply."""
    from prepdefense.experiments import usability

    full = usability.configs
    monkeypatch.setattr(usability, "configs", lambda deltas: [c for c in full(deltas)
                                                              if c.key in ("none", "dct-distort", f"dct-distort@at{PAPER_SIDE}")])
    return full


def _run_twice(sample_dir, out, capsys):
    """Run the command on 3 images, 2 draws, check what every row must hold, run it again
    (resumed: every unit reused, the same table) and return the rows by configuration."""
    argv = ["usability", "--data", str(sample_dir), "--out", str(out), "--n", "3", "--draws", "2",
            "--quiet", "--json", "--device", "cpu"]
    assert main(argv) == 0
    card = json.loads(capsys.readouterr().out)
    rows = {r["Configuration"]: r for r in card["rows"]}
    assert float(rows["none (bare model)"]["ACC (ours, mean over draws)"]) == 1.0  # protocol images only
    default = rows["dct-distort, default table"]
    assert default["ACC (paper)"] == 0.95 and default["table"]  # the table the default resolves to is named
    assert all(r["n"] == 3 for r in card["rows"])  # numbers, not display strings
    assert (out / "tables" / "usability.csv").is_file() and "## Usability" in (out / "report.md").read_text()
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == card["rows"]
    return rows


def test_usability_command_pipeline(imagenet_sample_dir, tmp_path, capsys, three_configs):
    rows = _run_twice(imagenet_sample_dir, tmp_path / "us", capsys)
    assert set(rows) == {"none (bare model)", "dct-distort, default table", f"dct-distort, default table, defended at {PAPER_SIDE}"}


@pytest.mark.slow
def test_usability_command_on_the_shared_sample(imagenet_sample_dir, tmp_path, capsys):
    rows = _run_twice(imagenet_sample_dir, tmp_path / "us", capsys)
    assert len(rows) == len(configs(U.get_preset("paper").deltas))


@pytest.mark.parametrize("flags, message", [(["--n", "0"], "--n"), (["--draws", "0"], "--draws")])
def test_usage_errors(tmp_path, capsys, flags, message):
    assert main(["usability", "--data", "builtin", "--out", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_data_is_required_and_too_few_protocol_images_is_one_line(tmp_path, capsys):
    import pytest as _pytest

    with _pytest.raises(SystemExit) as e:
        main(["usability", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--data" in capsys.readouterr().err
    assert main(["usability", "--data", "builtin", "--out", str(tmp_path / "o"), "--n", "5"]) == 2
    assert "--n 5" in capsys.readouterr().err

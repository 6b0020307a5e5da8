"""A run store names the values behind a defense's name, not only the name (issue 15, item 1):
``dct-distort``/``dct-quant`` take the shipped learned table by default, so shipping a new one
must not let ``evaluate`` resume a run made with the old one; the same table resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from byo_helpers import cli, tiny_convnet_folder
from prepdefense import defenses
from prepdefense.defenses import quant_tables

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return tiny_convnet_folder(tmp_path_factory.mktemp("evaluate-table-images"), 4, seed=9)


def _ship(folder: Path, value: float, monkeypatch) -> None:
    table = folder / "learned.json"
    quant_tables.save_table(table, torch.full((8, 8), value, dtype=torch.float64), {"attack": "cw", "n_images": 1})
    monkeypatch.setattr(quant_tables, "TABLES_DIR", folder)
    monkeypatch.setattr(quant_tables, "LEARNED_TABLE_PATH", table)


def _args(images, out, defense):
    return ["evaluate", "--model", "toy_models:tiny_convnet", "--device", "cpu", "--defense", defense, "--norm", "linf",
            "--n", "2", "--budget", "quick", "--data", str(images), "--out", str(out), "--quiet"]


def test_evaluate_refuses_to_resume_under_another_shipped_table(images, tmp_path, capsys, monkeypatch):
    learned, fd = _args(images, tmp_path / "learned", "dct-quant"), _args(images, tmp_path / "fd", "fd")
    _ship(tmp_path / "tables", 40.0, monkeypatch)
    for args in (learned, fd):
        code, _, err = cli(capsys, *args)
        assert code == 0, err
    code, text, err = cli(capsys, *learned)
    assert code == 0 and "resuming" in text + err  # the same table resumes
    card = json.loads((tmp_path / "learned" / "card.json").read_text())
    identity = json.loads((tmp_path / "learned" / "run.json").read_text())["identity"]
    assert card["defense"]["state_digest"] == identity["defense_state"] == defenses.state_digest(defenses.create("dct-quant"))
    _ship(tmp_path / "tables", 50.0, monkeypatch)
    code, _, err = cli(capsys, *learned)
    assert code != 0 and "defense_state" in err and "--fresh" in err
    assert "quantization table" in err and "shipped learned table has changed" in err  # said in words
    code, text, err = cli(capsys, *fd)  # a defense with a table of its own is not touched by the change
    assert code == 0 and "resuming" in text + err, err

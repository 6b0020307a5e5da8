"""``prepdefense predict`` (issue 2, item 7): JSON contract, skipped files, one-line errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from prepdefense.cli.main import main


def _run(capsys, *argv):
    code = main(["predict", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_json_on_builtin(capsys):
    code, out, err = _run(capsys, "--data", "builtin", "--json", "--device", "cpu")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert {"accuracy", "n", "skipped", "model", "defense", "seed", "device"} <= set(result)
    assert result["n"] == 4 and result["skipped"] == 0 and result["accuracy"] == 1.0
    assert result["model"] == "efficientnet-lite0" and result["defense"] == "none"


def test_predict_plain_output(capsys):
    code, out, _ = _run(capsys, "--data", "builtin", "--limit", "2", "--device", "cpu")
    assert code == 0 and out.startswith("accuracy ") and "2/2 images" in out


def test_mixed_folder_scores_good_files_and_counts_the_rest(tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)).save(tmp_path / f"good{i}.png")
        good.append(f"good{i}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[:600])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    Image.new("RGB", (10, 10)).save(tmp_path / "tiny.png")
    names = good + ["truncated.jpg", "empty.jpg", "notes.jpg", "tiny.png", "missing.jpg"]
    (tmp_path / "labels.csv").write_text("file,label,wnid,name\n" + "".join(f"{n},1,n01443537,goldfish\n" for n in names))
    code, out, err = _run(capsys, "--data", str(tmp_path), "--json", "--batch-size", "2", "--device", "cpu")
    assert code == 0
    result = json.loads(out)
    assert result["n"] == 3 and result["skipped"] == 5
    assert 0.0 <= result["accuracy"] <= 1.0
    warning_lines = [line for line in err.splitlines() if "warning: skipped" in line]
    assert len(warning_lines) == 5


def test_out_writes_one_row_per_scored_image(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)).save(data / f"img{i}.png")
    (data / "bad.jpg").write_text("not an image")
    (data / "labels.csv").write_text("file,label,wnid,name\n" + "".join(
        f"{n},{k},n01443537,goldfish\n" for k, n in enumerate(["img0.png", "bad.jpg", "img1.png", "img2.png"])))
    out = tmp_path / "preds.csv"
    for _ in range(2):  # the second run replaces the file
        code, stdout, _ = _run(capsys, "--data", str(data), "--json", "--batch-size", "2", "--device", "cpu", "--out", str(out))
        assert code == 0
    result = json.loads(stdout)
    rows = list(csv.DictReader(out.open(newline="")))
    assert [r["file"] for r in rows] == ["img0.png", "img1.png", "img2.png"]  # the unreadable file is not a row
    assert [int(r["label"]) for r in rows] == [0, 2, 3]
    assert all(0 <= int(r["prediction"]) < 1000 for r in rows)
    assert all(r["correct"] == str(int(r["label"] == r["prediction"])) for r in rows)
    assert sum(int(r["correct"]) for r in rows) == result["correct"]
    assert result["predictions_file"] == str(out)


def test_out_that_is_a_folder_is_a_usage_error(tmp_path, capsys):
    code, _, err = _run(capsys, "--data", "builtin", "--device", "cpu", "--out", str(tmp_path))
    assert code == 2 and "is a folder" in err


def test_out_never_replaces_the_labels_file(tmp_path, capsys):
    Image.fromarray(np.zeros((60, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    labels = "file,label,wnid,name\na.png,1,n01443537,goldfish\n"
    (tmp_path / "labels.csv").write_text(labels)
    code, _, err = _run(capsys, "--data", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "labels.csv"))
    assert code == 2 and "is the labels file of --data" in err
    assert (tmp_path / "labels.csv").read_text() == labels


def test_unknown_defense_and_model_are_one_line_errors(capsys):
    code, out, err = _run(capsys, "--defense", "no-such-defense")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "unknown defense 'no-such-defense'" in err and "none" in err
    code, _, err = _run(capsys, "--model", "no-such-model")
    assert code == 2 and "efficientnet-lite0" in err and err.count("\n") == 1


def test_missing_folder_exits_non_zero_with_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "prepdefense.cli.main", "predict", "--data", str(tmp_path / "nope"), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0]


def test_bad_labels_csv_exits_non_zero(tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("file,label\na.jpg,notanumber\n")
    code, _, err = _run(capsys, "--data", str(tmp_path))
    assert code == 2 and "row 2" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["predict", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "--json" in capsys.readouterr().out

"""``prepdefense demo`` (issue 2, item 7; issue 3, item 7): report and images in the output folder."""

from __future__ import annotations

import json

from PIL import Image

from prepdefense import defenses
from prepdefense.cli.main import main
from prepdefense.data.builtin import BUILTIN_IMAGES


def test_demo_writes_report_and_images(tmp_path, capsys):
    name = "dct-distort" if "dct-distort" in defenses.names() else "none"
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--device", "cpu", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["defense"] == name
    assert summary["n"] == len(BUILTIN_IMAGES) and summary["bare_correct"] == len(BUILTIN_IMAGES)
    report = (out / "README.md").read_text()
    assert f"defense `{name}`" in report
    assert report.count("bare model, top-5 | defended model, top-5") == len(BUILTIN_IMAGES)
    for image_name, _ in BUILTIN_IMAGES:
        assert f"## {image_name}:" in report
        panel = out / "images" / f"{image_name}_{name}_panel.png"
        assert f"images/{panel.name}" in report
        assert Image.open(out / "images" / f"{image_name}_clean.png").size == (224, 224)
        assert Image.open(panel).size[0] > 3 * 224  # clean | draw 1 | draw 2
    if defenses.create(name).randomized:
        a = Image.open(out / "images" / f"chelsea_{name}_draw1.png").tobytes()
        b = Image.open(out / "images" / f"chelsea_{name}_draw2.png").tobytes()
        assert a != b  # two independent draws
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_demo_unknown_defense_is_a_one_line_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--defense", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown defense 'nope'" in err and err.count("\n") == 1

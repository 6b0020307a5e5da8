"""``prepdefense demo`` (issue 2 item 7, issue 3 item 7, issue 5 item 6): report, images and the
short BPDA+EOT section in the output folder."""

from __future__ import annotations

import json

from PIL import Image

from prepdefense import defenses
from prepdefense.cli.main import main
from prepdefense.data.builtin import BUILTIN_IMAGES


def test_demo_writes_report_and_images(tmp_path, capsys):
    name = "dct-distort" if "dct-distort" in defenses.names() else "none"
    out = tmp_path / "demo"
    # A 2-round, 2-draw attack keeps the test short; `make demo` runs the default 20 x 8.
    code = main(["demo", "--out", str(out), "--device", "cpu", "--json", "--rounds", "2", "--eot", "2", "--strong-budget", "off"])
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
    # The attack section: per-round history for both models, a verdict on fresh draws, strips.
    attack = summary["attack"]
    assert set(attack) == {"bare", name}
    for verdict in attack.values():
        assert len(verdict["history"]) == 2
        assert 0.0 <= verdict["asr_expected"] <= verdict["asr_worst"] <= 1.0
    assert "## Attack: BPDA+EOT" in report and (out / "attack_rounds.png").is_file()
    for image_name, _ in BUILTIN_IMAGES:
        strip = Image.open(out / f"{image_name}_attack.png")
        assert strip.size[0] > 4 * 224  # clean | defended | adversarial | defended adversarial


def test_demo_without_attack(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--device", "cpu", "--defense", "bdr", "--rounds", "0", "--json",
                 "--strong-budget", "off"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "attack" not in summary
    assert "## Attack" not in (tmp_path / "README.md").read_text()


def test_demo_unknown_defense_is_a_one_line_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--defense", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown defense 'nope'" in err and err.count("\n") == 1


def _readme_headline_verdict() -> str:
    """What the README's headline says of dct-distort under a correct adaptive attack."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## What we measured", 1)[1].split("\n## ", 1)[0]
    for word in ("broken", "mostly broken", "holds"):
        if f"`dct-distort` is **{word}**" in section:
            return word
    raise AssertionError("the README's 'What we measured' section states no verdict on dct-distort")


def test_demo_tells_the_strong_verdict_and_agrees_with_the_readme(tmp_path, capsys):
    """`make demo` (issue 15, item 5): the strong verdict on the same images, one sentence that
    agrees with the README's headline, and a picture of an example fooled on every fresh draw."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu", "--rounds", "0"]) == 0
    printed = capsys.readouterr().out
    sentence = next(line.strip() for line in printed.splitlines() if "Strong verdict:" in line)
    readme_word = _readme_headline_verdict()
    said = "mostly broken" if "is mostly broken" in sentence else "broken" if "is broken" in sentence else "holds"
    assert said == readme_word, (sentence, readme_word)
    report = (out / "README.md").read_text()
    assert "## Strong verdict" in report and sentence in report
    if said != "holds":
        pictures = sorted(out.glob("*_strong_adversarial.png"))
        assert pictures, "a broken defense must show an example fooled on every fresh draw"
        assert Image.open(pictures[0]).size[0] >= 3 * 224  # clean | adversarial | perturbation

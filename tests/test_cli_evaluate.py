"""``prepdefense evaluate`` (issue 10, item 4): the robustness card and its files, ``--json``,
resumption after a kill, the store run equal to the library call, usage errors, and the
issue's check (``jpeg``, Linf 8/255, quick budget, 10 images of the shared sample) as the
README's command. A tiny random-weight 32x32 classifier (``toy_models.tiny_convnet``) stands in
for the real model except in the README/issue check."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from byo_helpers import cli, cli_json, label_by_model, noise_images
from prepdefense import data
from prepdefense.attacks import ensemble as E
from prepdefense.defenses import Defended
from prepdefense import defenses
from prepdefense.draws import DrawKey, image_id
from prepdefense.experiments import evaluation as V
from prepdefense.experiments.store import ConfigMismatchError, ResultStore, to_jsonable
from toy_models import TinyConvNet

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "toy_models:tiny_convnet", "--device", "cpu"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("evaluate-images")
    noise_images(folder, 8, side=40)
    label_by_model(folder, TinyConvNet().eval())
    return folder


def test_json_card_and_files(images, tmp_path, capsys):
    out = tmp_path / "out"
    card = cli_json(capsys, "evaluate", *TINY, "--defense", "jpeg", "--norm", "linf", "--n", "6", "--budget", "quick",
                    "--data", str(images), "--out", str(out), "--shard-size", "4", "--seed", "1")
    assert set(card) == set(V.CARD_KEYS) and card["schema"] == V.CARD_SCHEMA and card["schema_version"] == V.CARD_SCHEMA_VERSION
    assert card["n"] == 6 and card["seed"] == 1 and card["draws"] == 1  # jpeg is deterministic: judged once
    assert card["defense"]["name"] == "jpeg" and card["defense"]["parameters"]["jpeg"]["quality"] == 75
    assert card["threat_model"]["norm"] == "linf" and card["threat_model"]["eps"] == pytest.approx(8 / 255)
    assert card["budget"]["name"] == "quick" and card["budget"]["cost_per_image"]["this_run"]["gradient"] > 0
    assert card["versions"]["torch"] and card["draw_scheme"] and card["model"]["name"] == "toy_models:tiny_convnet"
    kinds = {r["attack"]: r["kind"] for r in card["per_attack"]}
    assert list(kinds) == [a.label for a in E.BUDGETS["quick"].attacks] and "gradient-free" in kinds.values()
    for figures in [card["ensemble"], card["clean"]] + [r["after"] for r in card["per_attack"]]:
        for k in ("robust_accuracy_expected", "robust_accuracy_worst"):
            lo, hi = figures[k + "_ci95"]
            assert lo <= figures[k] <= hi
    assert [p["id"] for p in card["per_image"]] == card["data"]["ids"] and len(card["per_image"]) == 6
    assert {"masking", "transfer", "unbounded", "more_steps", "gradients", "warnings"} <= set(card["flags"])
    assert card["curve"][0]["eps"] == 0 and card["curve"][-1]["source"] == "ensemble"
    assert card["passes"]["classifier_images"] > 0
    # The files beside it: the same card, the report, the curve, the kept examples.
    assert json.loads((out / "card.json").read_text())["ensemble"] == card["ensemble"]
    report = (out / "report.md").read_text()
    for heading in ("## Per attack", "## Checklist", "## Robust accuracy vs epsilon", "## Per image"):
        assert heading in report
    assert (out / "accuracy_vs_eps.png").read_bytes()[:4] == b"\x89PNG"
    ex = torch.load(out / "adversarial.pt", weights_only=False)
    assert ex["adversarial"].shape == (6, 3, 32, 32) and ex["ids"] == card["data"]["ids"]
    # Run again: every unit is reused, the card is the same.
    code, text, err = cli(capsys, "evaluate", *TINY, "--defense", "jpeg", "--norm", "linf", "--n", "6", "--budget", "quick",
                          "--data", str(images), "--out", str(out), "--shard-size", "4", "--seed", "1", "--quiet")
    assert code == 0 and "0 to run" in err and "robust accuracy" in text
    assert json.loads((out / "card.json").read_text())["per_image"] == card["per_image"]
    # Another configuration in the same folder is refused, with the way out.
    code, _, err = cli(capsys, "evaluate", *TINY, "--defense", "jpeg", "--norm", "linf", "--eps", "0.01", "--n", "6",
                       "--data", str(images), "--out", str(out), "--shard-size", "4", "--seed", "1")
    assert code == 2 and "--fresh" in err and len(err.strip().splitlines()) == 1


def _config(images, out, **kw):
    base = dict(defense="rand", norm="l2", eps=0.05, budget="smoke", n=6, seed=3, out=out, data=str(images), device="cpu",
                shard_size=4, quiet=True)
    return V.EvaluateConfig(**{**base, **kw})


def _evaluate(config):
    with open(os.devnull, "w") as quiet:
        return V.evaluate_defense(config, classifier=TinyConvNet(), stream=quiet)


def test_an_ensemble_defense_says_what_a_pass_costs(images, tmp_path, capsys):
    """``crop`` averages ``ensemble`` crops per prediction: the card and the report say that each
    pass of the defended model is that many classifier passes (30 for the default crop)."""
    out = tmp_path / "out"
    card = cli_json(capsys, "evaluate", *TINY, "--defense", "crop[ensemble=3]", "--norm", "linf", "--n", "2", "--budget",
                    "quick", "--data", str(images), "--out", str(out), "--shard-size", "2", "--no-checks", "--no-curve")
    assert card["budget"]["cost_per_image"]["this_run"]["ensemble"] == 3
    assert "each 3 passes of the classifier" in (out / "report.md").read_text()
    jpeg = cli_json(capsys, "evaluate", *TINY, "--defense", "jpeg", "--norm", "linf", "--n", "2", "--budget", "quick",
                    "--data", str(images), "--shard-size", "2", "--no-checks", "--no-curve")
    assert jpeg["budget"]["cost_per_image"]["this_run"]["ensemble"] == 1


def test_resume_after_a_kill_and_equal_to_the_library(images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = E.attack_step
    calls = []

    def dies_on_the_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(E, "attack_step", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(_config(images, out))
    monkeypatch.setattr(E, "attack_step", real)
    store = ResultStore(out)
    done = {u["unit_id"]: (store.unit_path(V.EXPERIMENT, u["unit_id"]).stat().st_mtime_ns) for u in store.units(V.EXPERIMENT, status="ok")}
    assert sorted(done) == sorted(["evaluate/rand/clean/s0", "evaluate/rand/clean/s1", "evaluate/rand/apgd-ce/s0", "evaluate/rand/apgd-ce/s1"])
    outcome = _evaluate(_config(images, out))
    assert outcome.resumed and outcome.reused == len(done) and outcome.ran > 0
    assert {uid: store.unit_path(V.EXPERIMENT, uid).stat().st_mtime_ns for uid in done} == done  # not redone
    card = outcome.card
    assert card["draws"] == 10 and card["defense"]["randomized"]

    # An uninterrupted run gives the same card, and so does the library on the whole sample at once.
    again = _evaluate(_config(images, tmp_path / "again")).card
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "classifier_images")} for r in rows]  # noqa: E731
    assert again["per_image"] == card["per_image"] and strip(again["per_attack"]) == strip(card["per_attack"])
    clf = TinyConvNet()
    s = data.protocol_sample(clf, str(images), n=6, seed=3)
    model = Defended(defenses.create("rand"), clf)
    res = E.evaluate(model, s.x, labels=s.labels, norm="l2", eps=0.05, budget="smoke", generator=DrawKey(3, [image_id(i) for i in s.ids]))
    assert [p["correct_fraction"] for p in res.per_image] == [p["correct_fraction"] for p in card["per_image"]]
    assert [p["broken_by"] for p in res.per_image] == [p["broken_by"] for p in card["per_image"]]
    assert to_jsonable(res.robust) == card["ensemble"] and [p["robust_accuracy_worst"] for p in res.curve] == [p["robust_accuracy_worst"] for p in card["curve"]]
    assert strip(to_jsonable(res.per_attack)) == strip(card["per_attack"])
    flags = to_jsonable(res.flags)
    assert flags["warnings"] == card["flags"]["warnings"] and flags["masking"] == card["flags"]["masking"]
    assert strip([flags["unbounded"]])[0].items() <= strip([card["flags"]["unbounded"]])[0].items()  # the store adds image_ids
    # The same folder with another configuration is refused.
    with pytest.raises(ConfigMismatchError, match="--fresh"):
        _evaluate(_config(images, out, seed=4))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_with_eta_on_a_terminal(images, tmp_path):
    screen = _Terminal()
    V.evaluate_defense(_config(images, tmp_path / "out", defense="jpeg", quiet=False), classifier=TinyConvNet(), stream=screen)
    text = screen.getvalue()
    assert "evaluate:" in text and "100%" in text and re.search(r"\[\d\d:\d\d<\d\d:\d\d", text)  # elapsed<remaining


@pytest.mark.parametrize("flags, message", [
    ({"--draws": "5"}, "--draws must be at least 10"),
    ({"--n": "0"}, "--n must be at least 1"),
    ({"--eps": "-1"}, "--eps must be positive"),
    ({"--defense": "no-such"}, "unknown defense"),
    ({"--fresh": None}, "--fresh deletes"),
    ({"--n": "99"}, "more images than"),
    ({"--budget": "huge"}, "invalid choice"),
    ({"--norm": "l3"}, "invalid choice"),
])
def test_usage_errors_exit_2(images, capsys, flags, message):
    argv = {"--defense": "jpeg", "--norm": "linf", "--n": "2", **flags}
    flat = [t for k, v in argv.items() for t in ((k,) if v is None else (k, v))]
    try:
        code, out, err = cli(capsys, "evaluate", *TINY, "--data", str(images), *flat)
    except SystemExit as e:  # argparse's own errors (a choice it does not know) exit in parse_args
        code, (out, err) = e.code, capsys.readouterr()
    assert code == 2 and message in err and out == ""
    assert len(err.strip().splitlines()) == 1, err


def _readme_command():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Evaluate a defense"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[0].endswith("prepdefense") and argv[1] == "evaluate"
    return argv[1:]


def _run_readme(capsys, sample_dir, out, n):
    argv = _readme_command()
    argv[argv.index("--data") + 1] = str(sample_dir)
    argv[argv.index("--out") + 1] = str(out)
    argv[argv.index("--n") + 1] = str(n)
    return cli_json(capsys, *argv, "--device", "cpu")


def _check_issue(card):
    """Issue 10's check: robust accuracy <= 0.05 and a card with per-attack figures, a
    gradient-free attack among them, and intervals."""
    assert card["defense"]["name"] == "jpeg" and card["threat_model"]["eps"] == pytest.approx(8 / 255) and card["budget"]["name"] == "quick"
    assert card["ensemble"]["robust_accuracy_expected"] <= 0.05 and card["ensemble"]["robust_accuracy_worst"] <= 0.05
    assert any(r["kind"] == "gradient-free" for r in card["per_attack"])
    assert all(len(r["after"]["robust_accuracy_worst_ci95"]) == 2 for r in card["per_attack"])
    assert len(card["ensemble"]["robust_accuracy_worst_ci95"]) == 2 and len(card["ensemble"]["robust_accuracy_expected_ci95"]) == 2
    for kind in ("expected", "worst"):  # an interval, never a point, even when every image has the same value
        lo, hi = card["ensemble"][f"robust_accuracy_{kind}_ci95"]
        assert lo <= card["ensemble"][f"robust_accuracy_{kind}"] <= hi and hi > lo


def test_readme_command_on_one_image(model, imagenet_sample_dir, tmp_path, capsys):
    """The README's command as written, on 1 of its 10 images (the full one is slow, below)."""
    card = _run_readme(capsys, imagenet_sample_dir, tmp_path / "out", 1)
    _check_issue(card)
    assert card["n"] == 1 and (tmp_path / "out" / "report.md").is_file()


@pytest.mark.slow
def test_issue_check_jpeg_quick_10_images(model, imagenet_sample_dir, tmp_path, capsys):
    """Issue 10's check as the README's command: jpeg, Linf 8/255, quick budget, 10 images
    (about 50 s on 2 CPU cores)."""
    card = _run_readme(capsys, imagenet_sample_dir, tmp_path / "out", 10)
    _check_issue(card)
    assert card["n"] == 10

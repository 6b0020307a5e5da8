"""`prepdefense attack --save-adv FILE.npz` writes what `prepdefense judge --adv` reads, and the
judge re-judges the saved examples to the attack's own verdict (same seed, same draws)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prepdefense.cli.main import main


@pytest.mark.parametrize("attack", [["--attack", "fgsm"],
                                    # adaptive judges its own result on other fresh draws (was: the CLI
                                    # reported that verdict, which judge could not reproduce)
                                    ["--attack", "adaptive", "--norm", "linf", "--steps", "2", "--eot", "2", "--no-diagnostics"]])
def test_save_then_judge_gives_the_attack_verdict(imagenet_sample_dir, tmp_path, capsys, attack):
    npz = tmp_path / "adv.npz"
    common = ["--data", str(imagenet_sample_dir), "--defense", "rand", "--seed", "3", "--device", "cpu", "--draws", "10"]
    assert main(["attack", *common, *attack, "--eps", "0.03", "--n", "3", "--untargeted",
                 "--save-adv", str(npz), "--json"]) == 0
    attack_out = json.loads(capsys.readouterr().out)
    saved = np.load(npz)
    assert saved["x_adv"].shape == saved["x"].shape == (3, 3, 224, 224) and saved["labels"].shape == (3,)
    assert list(saved["ids"]) == attack_out["ids"] and "targets" not in saved.files
    assert np.abs(saved["x_adv"] - saved["x"]).max() <= 0.03 + 1e-6
    assert main(["judge", "--adv", str(npz), "--defense", "rand", "--seed", "3", "--device", "cpu", "--draws", "10",
                 "--json"]) == 0
    judged = json.loads(capsys.readouterr().out)
    assert judged["draws"] == attack_out["draws"] == 10
    for k in ("accuracy", "accuracy_worst", "asr", "asr_worst", "clean_accuracy"):
        assert judged[k] == attack_out[k], k


def test_save_adv_needs_an_npz_name(tmp_path, capsys):
    assert main(["attack", "--defense", "jpeg", "--attack", "fgsm", "--save-adv", str(tmp_path / "adv.pt")]) == 2
    assert ".npz" in capsys.readouterr().err

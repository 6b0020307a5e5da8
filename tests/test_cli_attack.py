"""``prepdefense attack`` (issue 4, item 8): tiny runs on the built-in photos with the real model."""

from __future__ import annotations

import json

import pytest
import torch

from prepdefense.cli.main import main


# Tiny models: one torch thread avoids oversubscription (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(capsys, *argv):
    rc = main(["attack", "--data", "builtin", "--device", "cpu", "--json", *argv])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "below the protocol's" not in err  # deterministic defenses here: --draws does not matter
    return json.loads(out)


def test_pgd_undefended_json(model, capsys):
    r = _run(capsys, "--defense", "none", "--attack", "pgd", "--n", "2", "--steps", "2",
             "--norm", "linf", "--eps", "0.0314", "--untargeted")
    for key in ("accuracy", "asr", "n", "history", "model", "defense", "attack", "seed", "device", "versions", "clean_accuracy"):
        assert key in r, key
    assert r["n"] == 2 and r["clean_accuracy"] == 1.0 and r["targeted"] is False
    assert len(r["history"]) == 2 and {"round", "accuracy", "asr"} <= set(r["history"][0])
    assert r["linf_max"] <= 0.0314 + 1e-6
    assert r["accuracy"] + r["asr"] == pytest.approx(1.0)  # untargeted, deterministic model


def test_bpda_protocol_json(model, capsys):
    r = _run(capsys, "--defense", "bdr", "--attack", "bpda", "--n", "1", "--steps", "2")
    assert r["targeted"] is True and r["attack"] == "bpda" and r["defense"] == "bdr"
    assert [h["round"] for h in r["history"]] == [1, 2]
    assert r["l2_rms_max"] < 0.05
    assert "stop_round" in r["info"]


def test_adaptive_json_has_intervals_and_diagnostics(model, capsys):
    # --diagnostics full: on one image of one step the default's 25% budget holds no re-run
    # (issue 9, item 4), so the full checklist is asked for by name.
    r = _run(capsys, "--defense", "none", "--attack", "adaptive", "--n", "1", "--steps", "1", "--eot", "1",
             "--draws", "2", "--diag-n", "1", "--untargeted", "--norm", "linf", "--diagnostics", "full")
    assert 0 <= r["accuracy_worst"] <= r["accuracy"] <= 1
    lo, hi = r["accuracy_worst_ci95"]
    assert lo <= r["accuracy_worst"] <= hi
    d = r["diagnostics"]
    assert {"steps", "undefended", "unbounded", "gradients", "warnings"} <= set(d)
    assert d["mode"] == "full" and d["steps"]["n"] == 1 and d["passes"] > 0


def test_usage_errors(capsys):
    assert main(["attack", "--defense", "none", "--attack", "no-such-attack", "--n", "1"]) == 2
    assert "unknown attack" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["attack", "--help"])
    assert "NORMALISED" in capsys.readouterr().out




def test_adaptive_on_the_papers_defense_at_n10(model, imagenet_sample_dir, capsys, two_threads):
    """Issue 14: the README's headline attack at a size a user runs. Ten 224x224 images are
    two Step 1 steps, so with two torch threads Step 1 runs on the worker threads while the
    attack differentiates through BPDA (it crashed there)."""
    rc = main(["attack", "--data", str(imagenet_sample_dir), "--device", "cpu", "--json",
               "--defense", "dct-distort", "--attack", "adaptive", "--norm", "l2", "--eps", "0.05",
               "--steps", "1", "--eot", "2", "--draws", "2", "--diag-n", "1", "--untargeted",
               "--n", "10", "--seed", "1"])
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert rc == 0
    assert "--draws 2 is below the protocol's 10 fresh draws" in err  # a random defense, judged on 2 draws
    assert r["n"] == 10 and r["defense"] == "dct-distort" and r["attack"] == "adaptive"
    assert r["l2_rms_max"] <= 0.05 + 1e-6
    assert r["info"]["gradient_stats"]["zero_gradients"] == 0
    assert r["info"]["gradient_stats"]["nonfinite_gradients"] == 0
    assert 0 <= r["accuracy_worst"] <= r["accuracy"] <= 1


def test_transfer_text_header_names_the_transfer(model, capsys):
    rc = main(["attack", "--data", "builtin", "--device", "cpu", "--defense", "bdr", "--attack", "fgsm", "--transfer",
               "--n", "1", "--norm", "linf"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[0].startswith("fgsm on efficientnet-lite0 + bdr (targeted, 1 images, seed 0, device cpu; "
                                          "--transfer: generated on the bare efficientnet-lite0, judged on the defended one)")

"""``prepdefense randomness`` (Table 1; issue 3, item 5) on a few built-in images."""

from __future__ import annotations

import json

import pytest
import torch

from prepdefense import defenses
from prepdefense.cli.main import main
from prepdefense.experiments.randomness import measure_randomness
from prepdefense.seeding import make_generator


def _run(capsys, *args):
    rc = main(["randomness", "--data", "builtin", "--limit", "2", "--batch-size", "2", "--json", *args])
    out = capsys.readouterr().out
    assert rc == 0
    return json.loads(out)


def test_fd_is_deterministic_and_json_keys(capsys, model):
    row = _run(capsys, "--defense", "fd")
    for key in ("l2", "ssim", "accuracy", "n", "defense", "model", "seed", "device", "skipped"):
        assert key in row
    assert row["n"] == 2 and row["defense"] == "fd"
    assert row["l2"] == 0.0 and row["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert 0.0 <= row["accuracy"] <= 1.0


def test_rand_is_random(capsys, model):
    row = _run(capsys, "--defense", "rand", "--seed", "3")
    assert row["l2"] > 0 and row["ssim"] < 1


def test_unknown_defense_is_a_usage_error(capsys):
    rc = main(["randomness", "--data", "builtin", "--defense", "nope", "--limit", "1"])
    assert rc == 2
    assert "nope" in capsys.readouterr().err


class ConstantModel(torch.nn.Module):
    def forward(self, x):
        logits = torch.zeros(x.shape[0], 5)
        logits[:, 1] = 1
        return logits


def test_measure_randomness_is_pure_and_counts():
    x = torch.rand(3, 3, 32, 32)
    batches = [(x, torch.tensor([1, 0, 1]))]
    d = defenses.create("rand")
    a = measure_randomness(d, ConstantModel(), batches, make_generator(5))
    b = measure_randomness(d, ConstantModel(), batches, make_generator(5))
    assert a == b
    assert a["n"] == 3 and a["accuracy"] == pytest.approx(2 / 3) and a["l2"] > 0
    c = measure_randomness(defenses.create("bdr"), None, batches, make_generator(5))
    assert c["l2"] == 0 and c["ssim"] == pytest.approx(1.0) and c["accuracy"] is None

"""What the checks after ``prepdefense attack`` cost (issue 9, item 4), counted, not timed.

A tiny classifier wrapped in a module that counts the images it classifies stands in for the
real model; the command runs as a user runs it (``main([...])``) on a folder of 32x32 images.
The default checks of ``--attack adaptive`` must add at most about 25% to the model passes of
the whole run (sample, attack, verdict) at a realistic setting: 20 images, 20 steps, EOT 4.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from prepdefense import data
from prepdefense.cli import common
from prepdefense.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 32


class TinyClassifier(nn.Module):
    """A small conv net over 1000 classes (seeded weights)."""

    input_size = SIDE

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 1000)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.conv(x))
        return self.fc(nn.functional.adaptive_avg_pool2d(z, 4).flatten(1))


class CountingClassifier(nn.Module):
    """Counts the images (rows of every batch) and the calls that reach ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.input_size = model.input_size
        self.images = 0
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += int(x.shape[0])
        self.calls += 1
        return self.model(x)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """24 random 32x32 images labelled with the tiny classifier's own predictions, so the
    protocol sample (images the model classifies correctly) can hold 20 of them."""
    root = tmp_path_factory.mktemp("tiny-images")
    rng = np.random.default_rng(0)
    files = []
    for i in range(24):
        name = f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(root / name)
        files.append(name)

    def write(labels):
        with open(root / "labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "label"])
            w.writerows(zip(files, labels))

    write([0] * len(files))
    ds = data.load_dataset(root, size=SIDE)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        pred = TinyClassifier()(x).argmax(1).tolist()
    write(pred)
    return root


def _run(capsys, monkeypatch, folder, *argv):
    counted = CountingClassifier(TinyClassifier()).eval()
    monkeypatch.setattr(common, "build_model", lambda name, weights, device, **options: counted)
    rc = main(["attack", "--data", str(folder), "--device", "cpu", "--json", "--defense", "dct-distort",
               "--attack", "adaptive", "--n", "20", "--steps", "20", "--eot", "4", "--seed", "0", *argv])
    out = capsys.readouterr().out
    assert rc == 0
    return json.loads(out), counted


@pytest.mark.parametrize("targeting", ["--targeted", "--untargeted"])
def test_default_checks_add_at_most_a_quarter(capsys, monkeypatch, image_folder, targeting):
    off, counted_off = _run(capsys, monkeypatch, image_folder, targeting, "--diagnostics", "off")
    on, counted_on = _run(capsys, monkeypatch, image_folder, targeting)  # adaptive's default checks
    assert "diagnostics" not in off and on["diagnostics"]["mode"] == "default"
    # The same attack either way (same seed): the checks come after it.
    assert on["attack_passes"] == off["attack_passes"] and on["accuracy"] == off["accuracy"]
    ratio = counted_on.images / counted_off.images
    print(f"{targeting}: model passes with default checks / without: {counted_on.images} / {counted_off.images} = {ratio:.3f}; "
          f"calls {counted_on.calls} / {counted_off.calls}")
    assert ratio <= 1.25
    d = on["diagnostics"]
    assert d["passes"] == counted_on.images - counted_off.images  # the command's own count agrees
    assert d["cost_ratio"] <= 0.25 + 1e-9
    ran = {k: d[k]["n"] for k in ("randomized", "gradients", "undefended", "unbounded", "steps") if k in d}
    assert ran and all(1 <= n <= 10 for n in ran.values())
    assert set(ran) | set(d["skipped"]) == {"randomized", "gradients", "undefended", "unbounded", "steps"}
    assert {"randomized", "gradients", "undefended"} <= set(ran)


def test_full_checks_and_text_output(capsys, monkeypatch, image_folder):
    full, counted = _run(capsys, monkeypatch, image_folder, "--untargeted", "--n", "4", "--diagnostics", "full", "--diag-n", "2")
    d = full["diagnostics"]
    assert d["mode"] == "full" and not d["skipped"]
    assert all(d[k]["n"] == 2 for k in ("randomized", "gradients", "undefended", "unbounded", "steps"))
    assert d["unbounded"]["steps"] == 20 and d["unbounded"]["eot"] == 4 and d["steps"]["2k"] == 40
    counted_before = counted.images
    assert counted_before > 0
    # Text: which checks ran on how many images, and what they cost.
    counted2 = CountingClassifier(TinyClassifier()).eval()
    monkeypatch.setattr(common, "build_model", lambda name, weights, device, **options: counted2)
    rc = main(["attack", "--data", str(image_folder), "--device", "cpu", "--defense", "dct-distort", "--attack", "adaptive",
               "--n", "4", "--steps", "20", "--eot", "4", "--untargeted"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "Diagnostics (default: at most 25% of the attack's model passes" in text
    assert "[4 images]" in text and "cost: " in text and "% of the attack's" in text

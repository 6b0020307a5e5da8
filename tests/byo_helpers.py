"""Helpers of the bring-your-own tests (issue 12): a tiny module-defined classifier, user
defenses in a module of their own, labelled image folders, and running the CLI in-process."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

from prepdefense.cli.main import main

#: A 32x32, 10-class classifier with random (seeded) weights, declared by attributes.
TINY_NET = textwrap.dedent('''
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_size = 32
            self.num_classes = 10
            self.conv = nn.Conv2d(3, 8, 3, stride=2)
            self.fc = nn.Linear(8, 10)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


    class Undeclared(TinyNet):
        def __init__(self):
            super().__init__()
            del self.input_size
            del self.num_classes


    def tiny_net():
        return TinyNet()


    def not_a_model():
        return 42
''')

#: User defenses: good ones and two that break the contract.
USER_DEFENSES = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn

    from prepdefense.defenses import Defense
    from prepdefense.draws import Params


    class Blur(Defense):
        """3x3 mean filter (deterministic, differentiable)."""

        differentiable = True

        def apply(self, x, params):
            return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


    class Jitter(Defense):
        """Per-image brightness shift drawn from the image's own generator."""

        randomized = True
        differentiable = True

        def draw(self, x1, generator):
            return Params(shift=(torch.rand(1, generator=generator) - 0.5) * 0.1)

        def apply(self, x, params):
            return (x + params["shift"].to(x).view(-1, 1, 1, 1)).clamp(0, 1)


    class GlobalNoise(Defense):
        """Breaks the contract: draws from torch's global RNG, ignoring its generator."""

        randomized = True
        differentiable = True

        def draw(self, x1, generator):
            return Params(noise=torch.rand(1, *x1.shape[1:]))

        def apply(self, x, params):
            return (x + 0.01 * params["noise"].to(x)).clamp(0, 1)


    class SecretlyRandom(nn.Module):
        """Breaks the contract: claims nothing (deterministic) but adds global-RNG noise."""

        def forward(self, x):
            return (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
''')


def write_module(folder: Path, name: str, text: str) -> None:
    (folder / f"{name}.py").write_text(text)


def noise_images(folder: Path, n: int, side: int = 40, seed: int = 0) -> List[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side + 4, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def tiny_convnet_folder(folder: Path, n: int, seed: int) -> Path:
    """``n`` 40x40 noise images labelled by ``toy_models.TinyConvNet``'s own predictions."""
    from toy_models import TinyConvNet

    noise_images(folder, n, side=40, seed=seed)
    label_by_model(folder, TinyConvNet().eval())
    return folder


def label_by_model(folder: Path, model: torch.nn.Module) -> List[int]:
    """Write ``folder/labels.csv`` giving each image the model's own prediction (so every image
    is classified correctly and the protocol sample can use them all)."""
    from prepdefense import data

    names = sorted(p.name for p in folder.glob("*.png"))
    (folder / "labels.csv").write_text("file,label\n" + "".join(f"{n},0\n" for n in names))
    x, _, ids, _ = data.load_images(folder, size=model.input_size)
    with torch.no_grad():
        pred = model(x).argmax(1).tolist()
    by_id = dict(zip(ids, pred))
    (folder / "labels.csv").write_text("file,label\n" + "".join(f"{n},{by_id[n]}\n" for n in names))
    return [by_id[n] for n in names]


def cli(capsys, *argv: str) -> Tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys, *argv: str) -> dict:
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def forget(*modules: str) -> None:
    for m in modules:
        sys.modules.pop(m, None)

"""Tiny closed-form models shared by the attack tests (imported by the test modules)."""

from __future__ import annotations

import torch
from torch import nn

#: Image shape of the toy problems, and its flattened size.
C, H, W = 3, 4, 4
D = C * H * W


class Linear(nn.Module):
    """logits = W x + b on the flattened image (float64 for exact comparisons)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.t() + self.bias


class TinyConvNet(nn.Module):
    """32x32 [0,1] NCHW -> 10 logits, random weights from a fixed seed (deterministic); any
    input size works (adaptive pooling). The ensemble's tests use it."""

    input_size = 32
    num_classes = 10

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.conv(x * 2 - 1))
        return self.fc(nn.functional.adaptive_avg_pool2d(z, 2).flatten(1))


def tiny_convnet() -> nn.Module:
    """``--model toy_models:tiny_convnet`` (the tests' folder is on ``sys.path``)."""
    return TinyConvNet().eval()


class StrictTinyConvNet(TinyConvNet):
    """:class:`TinyConvNet` that refuses any input but its declared 32x32 (a model with a fixed
    input, as most are): a run that feeds it another size fails loudly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"StrictTinyConvNet takes {self.input_size}x{self.input_size} input, got {tuple(x.shape[-2:])}")
        return super().forward(x)


def strict_tiny_convnet() -> nn.Module:
    """``--model toy_models:strict_tiny_convnet``."""
    return StrictTinyConvNet().eval()

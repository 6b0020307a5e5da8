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

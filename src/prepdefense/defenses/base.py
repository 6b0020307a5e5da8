"""The one interface every defense implements (PROTOCOL.md "Conventions", STYLE.md).

A defense is an ``nn.Module`` mapping a [0,1] NCHW batch to a [0,1] NCHW batch on the
input's device and dtype: ``forward(x, *, generator=None)``.

Random defenses split into ``sample_params(x, generator)`` (draws everything random for the
batch, on the CPU generator so CPU and CUDA runs agree) and a deterministic
``apply(x, params)``; the same generator state therefore gives the same output, bit for bit
on CPU, and a draw can be replayed. Deterministic defenses implement ``apply`` only.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..seeding import ensure_generator

__all__ = ["Defense", "check_images"]


def check_images(x: torch.Tensor) -> None:
    """Raise a clear error unless ``x`` is a floating NCHW batch with 1 or 3 channels."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a float NCHW image batch in [0,1], got {shape}")


class Defense(nn.Module):
    """Base class: [0,1] NCHW in, [0,1] NCHW out, same device and dtype.

    Class attributes:
        randomized: the output depends on the generator.
        differentiable: autograd gives a useful gradient through ``forward`` (if False,
            attacks must use BPDA or a surrogate; the forward runs under ``no_grad``).
        ensemble: number of draws whose softmax ``Defended`` averages per prediction
            (30 for Guo et al.'s random-crop ensemble, 1 otherwise).
        changes_size: the output's H, W differ from the input's (``rand`` pads).
    """

    randomized: bool = False
    differentiable: bool = False
    ensemble: int = 1
    changes_size: bool = False

    def sample_params(self, x: torch.Tensor, generator: torch.Generator) -> Any:
        """Draw the random parameters for batch ``x`` (None for deterministic defenses)."""
        return None

    def apply(self, x: torch.Tensor, params: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement apply()")

    def forward(self, x: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        check_images(x)
        params = self.sample_params(x, ensure_generator(generator)) if self.randomized else None
        if self.differentiable:
            return self.apply(x, params)
        with torch.no_grad():  # not on the autograd graph: BPDA supplies the gradient
            return self.apply(x.detach(), params)

"""``bdr``: bit-depth reduction, the colour-depth squeezer of feature squeezing (Xu et al. 2018).

PROTOCOL.md "Baseline defenses" (``bdr``, 3 bits; paper Table 1 "BdR"). Each channel value is
rounded to the nearest of ``2**bits`` evenly spaced levels in [0, 1]:
``round(x * (2**bits - 1)) / (2**bits - 1)``. Deterministic; its gradient is zero almost
everywhere, so it is marked non-differentiable (attacks use BPDA).
"""

from __future__ import annotations

import torch

from ._registry import register
from .base import Defense, check_images

__all__ = ["BitDepthReduction", "reduce_bit_depth"]


def reduce_bit_depth(x: torch.Tensor, bits: int = 3) -> torch.Tensor:
    """Quantise [0,1] values to ``2**bits`` levels (ties round to even, as ``torch.round``).

    Shape: any -> same shape, dtype and device.
    """
    levels = float(2**bits - 1)
    return torch.round(x.clamp(0.0, 1.0) * levels) / levels


class BitDepthReduction(Defense):
    """Bit-depth reduction to ``bits`` bits per channel (Xu et al. 2018, feature squeezing).

    Args:
        bits: bits per channel, 1..16 (default 3, PROTOCOL.md; 8 leaves 8-bit images as they are).

    Shape: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, bits: int = 3) -> None:
        super().__init__()
        if not 1 <= int(bits) <= 16:
            raise ValueError(f"bits must be in 1..16, got {bits}")
        self.bits = int(bits)

    def apply(self, x: torch.Tensor, params=None) -> torch.Tensor:
        check_images(x)
        return reduce_bit_depth(x, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


register("bdr", help="bit-depth reduction to 3 bits (feature squeezing, Xu et al. 2018)")(BitDepthReduction)

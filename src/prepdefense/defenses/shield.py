"""``shield``: SHIELD's stochastic local quantisation (Das et al. 2018).

PROTOCOL.md "Baseline defenses" (``shield``; paper Table 1 "SHIELD"): every 8x8 block of the
image takes its pixels from a JPEG of the whole image at a quality drawn uniformly from
{20, 40, 60, 80}, independently per block and per image. The JPEGs are the Pillow-exact
:func:`~prepdefense.defenses.jpeg.jpeg_compress_qualities` round trips (4:2:0, as Pillow saves them),
computed once per quality for the batch; the random part is only the block -> quality map.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import seeding
from ..draws import Params
from ._registry import register
from .base import Defense
from .jpeg import jpeg_compress_qualities

__all__ = ["SHIELD", "assemble_blocks"]

BLOCK = 8


def assemble_blocks(candidates: torch.Tensor, block_choice: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Pick each ``block x block`` tile from one of K candidate images.

    Args:
        candidates: (K, N, C, H, W) the K versions of the batch.
        block_choice: (N, ceil(H/block), ceil(W/block)) integer indices in [0, K).

    Returns:
        (N, C, H, W): pixel (i, j) of image n from candidate
        ``block_choice[n, i // block, j // block]``.
    """
    k, n, c, h, w = candidates.shape
    pixel_choice = block_choice.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)[:, :h, :w]
    index = pixel_choice.to(candidates.device).long().view(1, n, 1, h, w).expand(1, n, c, h, w)
    return candidates.gather(0, index).squeeze(0)


class SHIELD(Defense):
    """Per-block random JPEG quality (Das et al. 2018, "SLQ"), non-differentiable.

    Args:
        qualities: the JPEG qualities a block may take (default 20, 40, 60, 80).
        subsampling: chroma subsampling of the JPEGs (default ``"4:2:0"``, Pillow's).

    ``sample_params`` returns ``Params(quality=...)``, an (N, ceil(H/8), ceil(W/8)) int64 tensor of indices into
    ``qualities`` (uniform, independent per block).

    Shape: (N, C, H, W) -> (N, C, H, W).
    """

    randomized = True

    def __init__(self, qualities: Sequence[int] = (20, 40, 60, 80), subsampling="4:2:0") -> None:
        super().__init__()
        self.qualities = tuple(int(q) for q in qualities)
        if not self.qualities or any(not 1 <= q <= 100 for q in self.qualities):
            raise ValueError(f"qualities must be a non-empty list of values in 1..100, got {qualities!r}")
        self.subsampling = subsampling

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> Params:
        n, _, h, w = x.shape
        shape = (n, -(-h // BLOCK), -(-w // BLOCK))
        return Params(quality=seeding.randint(0, len(self.qualities), shape, generator))

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        versions = jpeg_compress_qualities(x, self.qualities, self.subsampling)
        return assemble_blocks(versions, params["quality"])

    def extra_repr(self) -> str:
        return f"qualities={self.qualities}, block={BLOCK}"


register("shield", help="SHIELD: each 8x8 block from a JPEG at a random quality in {20,40,60,80}")(SHIELD)

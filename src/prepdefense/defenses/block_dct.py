"""Batched orthonormal 8x8 block DCT-II / DCT-III in torch (paper Section 5.2, PROTOCOL.md Step 1).

The 2-D DCT of every 8x8 block is ``D @ B @ D.T`` with ``D`` the orthonormal DCT-II matrix,
equal to ``scipy.fft.dctn(block, norm="ortho")``; done for all blocks of a batch at once.
These are the plain building blocks (JPEG, the table learning and the readable reference of
Step 1, ``kernels/dct_quant_reference.py``, use them); Step 1's fast path works in its own
layout (``kernels/planes.py``).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

BLOCK = 8


def dct_matrix(n: int = BLOCK, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` (n x n): ``D[k, i] = a_k cos(pi (2i+1) k / 2n)``."""
    i = torch.arange(n, dtype=torch.float64)
    k = i.view(-1, 1)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] = d[0] / math.sqrt(2.0)
    return d.to(dtype=dtype, device=device)


def pad_to_blocks(x: torch.Tensor, block: int = BLOCK, mode: str = "reflect") -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Pad H and W of an NCHW batch up to multiples of ``block`` (reflection by default)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % block, (-w) % block
    if ph or pw:
        if mode == "reflect" and (ph >= h or pw >= w):
            mode = "replicate"  # reflection needs the pad to be smaller than the side
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def to_blocks(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """(N, C, H, W) with H, W multiples of ``block`` -> (N, C, H/b, W/b, b, b)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // block, block, w // block, block).permute(0, 1, 2, 4, 3, 5)


def from_blocks(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_blocks`."""
    n, c, hb, wb, k, _ = b.shape
    return b.permute(0, 1, 2, 4, 3, 5).reshape(n, c, hb * k, wb * k)


def block_dct2d(blocks: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two dims (each of size 8)."""
    d = dct_matrix(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return d @ blocks @ d.transpose(0, 1)


def block_idct2d(coefs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`block_dct2d` (orthonormal DCT-III)."""
    d = dct_matrix(coefs.shape[-1], dtype=coefs.dtype, device=coefs.device)
    return d.transpose(0, 1) @ coefs @ d

"""Step 1, read at chosen pixels, written to be read: the reference for ``kernels/dct_quant.py``.

Paper Section 5.2 (Algorithm 1 lines 4-9); PROTOCOL.md "The defense g(x)", Step 1. Same
arguments and result as the fast :func:`prepdefense.defenses.kernels.dct_quant.quantize_and_read`
(to float rounding; ``tests/test_dct_quant_kernel.py``), with none of its speed.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..block_dct import block_dct2d, block_idct2d, from_blocks, pad_to_blocks, to_blocks

__all__ = ["quantize_and_read"]


def quantize_and_read(
    x: torch.Tensor, table: torch.Tensor, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``out[n, c, p, q] = S1(x)[n, c, rows[n, p], cols[n, q]]``, ``S1`` being Step 1:
    ``clip(IDCT(round(DCT(255 x) / Q) * Q) / 255, 0, 1)`` over 8x8 blocks.

    Shape:
        x: (N, C, H, W); table: (8, 8); rows: (N, H) or None (no remap); cols: (N, W) or None.
    """
    with torch.no_grad():
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        n, c, h, w = x.shape
        if x.numel() == 0:
            return x.detach().clone()
        pixels = 255.0 * x.detach().to(dtype)
        padded, _ = pad_to_blocks(pixels)  # reflect (replicate where the pad >= the side)
        q = table.to(dtype=dtype, device=x.device).reshape(8, 8)
        coefs = block_dct2d(to_blocks(padded))  # (N, C, H/8, W/8, 8, 8), orthonormal DCT-II
        quantized = from_blocks(block_idct2d(torch.round(coefs / q) * q))
        rows = torch.arange(h, device=x.device).expand(n, h) if rows is None else rows
        cols = torch.arange(w, device=x.device).expand(n, w) if cols is None else cols
        read = torch.stack([image[:, r][:, :, s] for image, r, s in zip(quantized, rows, cols)])
        return (read / 255.0).clamp(0.0, 1.0).to(x.dtype)

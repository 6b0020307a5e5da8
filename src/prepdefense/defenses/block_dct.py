"""Batched orthonormal 8x8 block DCT-II / DCT-III in torch (paper Section 5.2, PROTOCOL.md Step 1).

The 2-D DCT of every 8x8 block is ``D @ B @ D.T`` with ``D`` the orthonormal DCT-II matrix,
equal to ``scipy.fft.dctn(block, norm="ortho")``; done for all blocks of a batch at once.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

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


def block_row_segments(rows: torch.Tensor, blocks_per_row: int, block: int = BLOCK) -> torch.Tensor:
    """Where the pixels of image rows ``rows`` sit in the :func:`to_blocks` layout of one plane,
    counted in runs of ``block`` values.

    Viewed as ``(Hb * Wb * block, block)`` (one ``block``-long run per block row), a plane in
    block layout holds row ``r`` of the image in the runs ``((r // block) * Wb + j) * block +
    r % block`` for ``j = 0..Wb-1``: gathering those runs, in that order, rebuilds the row.

    Shape:
        rows: (..., H) int64; output: (..., H * Wb) int64.
    """
    base = (rows // block) * (blocks_per_row * block) + rows % block
    step = torch.arange(blocks_per_row, device=rows.device, dtype=rows.dtype) * block
    return (base.unsqueeze(-1) + step).flatten(-2)


def pixels_from_blocks(
    blocks: torch.Tensor,
    rows: Optional[torch.Tensor],
    cols: Optional[torch.Tensor],
    out: torch.Tensor,
    *,
    per_image: Optional[bool] = None,
) -> torch.Tensor:
    """``out[n, c, p, q] = image[n, c, rows[n, p], cols[n, q]]``, ``image`` being the (padded)
    picture that ``blocks`` holds in the :func:`to_blocks` layout. ``rows`` / ``cols`` ``None``
    mean the first ``out.shape[-2]`` rows / ``out.shape[-1]`` columns (a crop).

    Used for the output of Step 1 (a crop) and of the whole defense (Algorithm 3's separable
    remap, read straight from Step 1's blocks). Two ways, with the same result:

    - per image (the default on the CPU): the rows, as runs of 8 values
      (:func:`block_row_segments`), with one ``index_select``, then the columns with a second
      one (or a plain copy for a crop). Both copy through a small per-image buffer that stays
      in cache;
    - batched (elsewhere): one ``gather`` over flat offsets, pixel ``(r, s)`` sitting at
      ``((r // 8) * Wb + s // 8) * 64 + (r % 8) * 8 + s % 8`` (a row part plus a column
      part), from a view of each plane repeated for every output row (stride 0).

    Shape:
        blocks: (N, C, Hb, Wb, 8, 8); rows: (N, H) or None; cols: (N, W) or None;
        out: (N, C, H, W) with H <= 8 Hb, W <= 8 Wb.
    """
    n, c, hb, wb, block, _ = blocks.shape
    h, w = out.shape[-2:]
    width = wb * block
    if per_image is None:
        per_image = blocks.device.type == "cpu"
    if per_image:
        identity_rows = block_row_segments(torch.arange(h, device=blocks.device), wb, block) if rows is None else None
        line = blocks.new_empty(c, h * wb, block)
        for i in range(n):
            segments = identity_rows if rows is None else block_row_segments(rows[i], wb, block)
            torch.index_select(blocks[i].reshape(c, -1, block), 1, segments, out=line)
            lines, target = line.view(c * h, width), out[i].view(c * h, w)
            if cols is None:
                target.copy_(lines[:, :w])
            else:
                torch.index_select(lines, 1, cols[i], out=target)
        return out
    arange = torch.arange(max(h, w), device=blocks.device)
    rows = arange[:h].expand(n, h) if rows is None else rows
    cols = arange[:w].expand(n, w) if cols is None else cols
    row_offset = (rows // block) * (wb * block * block) + (rows % block) * block
    col_offset = (cols // block) * (block * block) + cols % block
    flat = (row_offset.unsqueeze(2) + col_offset.unsqueeze(1)).view(n, 1, h, w)
    source = blocks.reshape(n, c, 1, -1)
    source = source.expand(n, c, h, source.shape[-1])
    return torch.gather(source, 3, flat.expand(n, c, h, w), out=out)

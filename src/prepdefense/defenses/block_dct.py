"""Batched orthonormal 8x8 block DCT-II / DCT-III in torch (paper Section 5.2, PROTOCOL.md Step 1).

The 2-D DCT of every 8x8 block is ``D @ B @ D.T`` with ``D`` the orthonormal DCT-II matrix,
equal to ``scipy.fft.dctn(block, norm="ortho")``; done for all blocks of a batch at once.
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


def to_planes(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """(N, C, H, W) with H, W multiples of ``block`` -> (N, C, b, b, H/b, W/b) (a view).

    The *plane layout* of Step 1: entry ``[n, c, i, j, bh, bw]`` is pixel ``(i, j)`` of block
    ``(bh, bw)``, so each of the 64 positions of a block has a contiguous ``Hb x Wb`` plane
    once the view is made contiguous. The 1-D DCTs of Step 1 are then 8x8 matrices applied
    along the ``i`` or ``j`` axis over long contiguous rows (``dct_quant.quantize_into``).
    """
    n, c, h, w = x.shape
    return x.reshape(n, c, h // block, block, w // block, block).permute(0, 1, 3, 5, 2, 4)


def from_planes(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_planes`."""
    n, c, k, _, hb, wb = p.shape
    return p.permute(0, 1, 4, 2, 5, 3).reshape(n, c, hb * k, wb * k)


def plane_offsets(rows: torch.Tensor, cols: torch.Tensor, hb: int, wb: int, block: int = BLOCK):
    """Flat offsets, within one plane-layout image channel (``block * block * Hb * Wb``
    values), of pixel rows ``rows`` and columns ``cols``: pixel ``(r, s)`` sits at
    ``row[r] + col[s]``, with ``row = (r % b) * b * Hb * Wb + (r // b) * Wb`` and
    ``col = (s % b) * Hb * Wb + s // b``."""
    row = (rows % block) * (block * hb * wb) + (rows // block) * wb
    col = (cols % block) * (hb * wb) + cols // block
    return row, col


def row_then_column_indices(
    rows: torch.Tensor, cols: torch.Tensor, hb: int, wb: int, block: int = BLOCK
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices for reading pixels out of one plane-layout image in two copies (see
    :func:`read_rows_then_columns`).

    ``runs[n]`` picks, from the image's planes viewed as ``(C, 64 * Hb, Wb)``, the ``Wb``-long
    runs that make up the output rows: row ``r`` is, for ``j = 0..7``, the run
    ``(r % 8, j, r // 8)``, that is ``((r % 8) * 8 + j) * Hb + r // 8``. ``columns[n]`` picks
    column ``s`` within such a rebuilt row, laid out ``(j, bw)``: ``(s % 8) * Wb + s // 8``.

    Shape:
        rows: (N, H); cols: (N, W); runs: (N, H * 8); columns: (N, W).
    """
    first = (rows % block) * (block * hb) + rows // block
    runs = (first.unsqueeze(2) + torch.arange(block, device=rows.device) * hb).flatten(1)
    columns = (cols % block) * wb + cols // block
    return runs, columns


def row_buffer(like: torch.Tensor, channels: int, height: int, wb: int, block: int = BLOCK):
    """A buffer for :func:`read_rows_then_columns`, as the pair of views it takes:
    (C, H * 8, Wb) for the rows and (C * H, 8 * Wb) for the columns."""
    line = like.new_empty(channels * height, block * wb)
    return line.view(channels, height * block, wb), line


def read_rows_then_columns(
    image_planes: torch.Tensor, runs: torch.Tensor, columns: torch.Tensor, line, out: torch.Tensor
) -> None:
    """``out`` = one image's pixels at the rows and columns that ``runs`` / ``columns``
    (:func:`row_then_column_indices`) encode: the rows into the buffer ``line``
    (:func:`row_buffer`), then the columns from it. Two torch calls, nothing else: this runs
    once per image on the CPU workers, where every call costs a turn at Python's lock.

    Shape:
        image_planes: (C, 64 * Hb, Wb); runs: (H * 8,); columns: (W,); out: (C * H, W).
    """
    torch.index_select(image_planes, 1, runs, out=line[0])
    torch.index_select(line[1], 1, columns, out=out)


def pixels_from_planes(planes: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[n, c, p, q] = image[n, c, rows[n, p], cols[n, q]]``, ``image`` being the (padded)
    picture that ``planes`` holds in the :func:`to_planes` layout, for a whole batch at once:
    one ``gather`` over flat offsets (:func:`plane_offsets`), from a view of each channel
    repeated, with stride 0, for every output row. This is the batched path off the CPU; on
    the CPU, ``dct_quant.quantize_and_read`` reads image by image with
    :func:`read_rows_then_columns` instead (the same result, tested).

    Shape:
        planes: (N, C, 8, 8, Hb, Wb); rows: (N, H); cols: (N, W); out: (N, C, H, W) with
        H <= 8 Hb, W <= 8 Wb.
    """
    n, c, block, _, hb, wb = planes.shape
    h, w = out.shape[-2:]
    row, col = plane_offsets(rows, cols, hb, wb, block)
    flat = (row.unsqueeze(2) + col.unsqueeze(1)).view(n, 1, h, w)
    source = planes.reshape(n, c, 1, -1)
    source = source.expand(n, c, h, source.shape[-1])
    return torch.gather(source, 3, flat.expand(n, c, h, w), out=out)

"""The plane layout of Step 1's fast path, and reading pixels back out of it.

In the plane layout an image channel that has been padded to ``8 Hb x 8 Wb`` is stored as
``(8 i, 8 j, Hb, Wb)``: entry ``[i, j, bh, bw]`` is pixel ``(i, j)`` of block ``(bh, bw)``,
so each of the 64 positions of a block has its own contiguous ``Hb x Wb`` plane. The 1-D
DCTs of Step 1 are then 8x8 matrices applied along ``i`` or ``j`` over long contiguous rows
(``kernels/dct_quant.py``).

- :func:`pad_plane_index`: the padding and the change of layout as one ``index_select``.
- :func:`read_rows_then_columns`: one image's chosen pixels in two copies (the CPU path).
- :func:`pixels_from_planes`: a whole batch's chosen pixels in one ``gather`` (off the CPU).
- :func:`to_planes` / :func:`from_planes`: the layout as a view, for tests and readers.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..block_dct import BLOCK

__all__ = [
    "to_planes",
    "from_planes",
    "pad_plane_index",
    "plane_offsets",
    "index_dtype",
    "row_then_column_indices",
    "row_buffer",
    "read_rows_then_columns",
    "pixels_from_planes",
]


def to_planes(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """(N, C, H, W) with H, W multiples of ``block`` -> (N, C, b, b, H/b, W/b) (a view).

    Entry ``[n, c, i, j, bh, bw]`` is pixel ``(i, j)`` of block ``(bh, bw)``; contiguous, it
    is the plane layout.
    """
    n, c, h, w = x.shape
    return x.reshape(n, c, h // block, block, w // block, block).permute(0, 1, 3, 5, 2, 4)


def from_planes(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_planes`."""
    n, c, k, _, hb, wb = p.shape
    return p.permute(0, 1, 4, 2, 5, 3).reshape(n, c, hb * k, wb * k)


_INDEX_CACHE: dict = {}


def _axis_pad_index(size: int, padded: int, reflect: bool) -> torch.Tensor:
    """Source index of each padded position along one axis (``F.pad`` reflect / replicate)."""
    i = torch.arange(padded, dtype=torch.int64)
    mirrored = (2 * (size - 1) - i) if reflect else torch.full_like(i, size - 1)
    return torch.where(i < size, i, mirrored)


def pad_plane_index(h: int, w: int, device=None) -> torch.Tensor:
    """Flat source offsets (in an ``h x w`` image) of the padded image in the plane layout.

    ``image.reshape(-1, h * w).index_select(1, index)`` is
    ``to_planes(pad_to_blocks(image)[0])`` flattened per channel: padding and the change of
    layout in one copy. Reflection, or replication when a pad is not smaller than its side,
    as ``block_dct.pad_to_blocks``. Cached per size and device. ``int32`` while the offsets
    fit (``index_select`` reads half the index bytes: about 7% faster on the CPU,
    ``benchmarks/RESULTS.md``), else ``int64``.
    """
    key = (h, w, str(torch.device(device) if device is not None else "cpu"))
    index = _INDEX_CACHE.get(key)
    if index is None:
        ph, pw = (-h) % BLOCK, (-w) % BLOCK
        reflect = ph < h and pw < w
        rows = _axis_pad_index(h, h + ph, reflect).view(-1, BLOCK).t()  # (8 i, Hb)
        cols = _axis_pad_index(w, w + pw, reflect).view(-1, BLOCK).t()  # (8 j, Wb)
        flat = rows[:, None, :, None] * w + cols[None, :, None, :]  # (8 i, 8 j, Hb, Wb)
        index = flat.reshape(-1).to(device=device, dtype=index_dtype(h * w))
        if len(_INDEX_CACHE) > 32:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = index
    return index


def index_dtype(extent: int) -> torch.dtype:
    """``int32`` for offsets below ``extent`` when they fit in it, else ``int64``. ``index_select``
    takes either; with ``int32`` it reads half the index bytes (on the CPU the run copies of
    :func:`read_rows_then_columns` are about 25% faster, the padding copy about 7%)."""
    return torch.int32 if extent <= torch.iinfo(torch.int32).max else torch.int64


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
    return runs.to(index_dtype(block * block * hb)), columns.to(index_dtype(block * wb))


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
    the CPU the kernel reads image by image with :func:`read_rows_then_columns` instead (the
    same result, tested).

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

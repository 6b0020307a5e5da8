"""Two NumPy/SciPy implementations of the paper's defense, to time and check the torch one.

(a) ``paper_style_*``: one image at a time, in the style of the paper's released code:
    Python loops over the 8x8 blocks of every channel with ``scipy.fft.dctn`` /
    ``idctn``, per-cell Python loops to build the distortion maps, and ``cv2.remap``
    with nearest interpolation.
(b) ``numpy_*``: the same defense vectorised over the whole batch: the padded batch
    reshaped to (N, C, H/8, 8, W/8, 8) and transformed with one ``scipy.fft.dctn`` over
    axes (3, 5); the index maps built for all images at once; one fancy-index gather.

Both follow PROTOCOL.md "The defense g(x)" and the interpretation written in
``prepdefense.defenses.grid_distort`` (steps 1-5), and are written independently of the
torch code (no import from ``prepdefense`` here). Inputs and outputs are NumPy arrays,
NCHW, values in [0, 1]. Random parameters are given explicitly (``factors`` are the
``1 + U(-delta, delta)`` stretch factors, ``corner`` in {0: top-left, 1: top-right,
2: bottom-left, 3: bottom-right}), so all three implementations can be fed one draw.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import scipy.fft

BLOCK = 8


def _pad_amounts(h: int, w: int) -> Tuple[int, int]:
    return (-h) % BLOCK, (-w) % BLOCK


def _reflect_mode(h: int, w: int) -> str:
    ph, pw = _pad_amounts(h, w)
    return "reflect" if ph < h and pw < w else "edge"


# --------------------------------------------------------------------- (a) paper style


def paper_style_dct_quantize(image_chw: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Step 1 for one image, block by block with Python loops (released-code style)."""
    c, h, w = image_chw.shape
    ph, pw = _pad_amounts(h, w)
    padded = np.pad(image_chw.astype(np.float64) * 255.0, ((0, 0), (0, ph), (0, pw)), mode=_reflect_mode(h, w))
    out = np.empty_like(padded)
    for ch in range(c):
        for i in range(0, padded.shape[1], BLOCK):
            for j in range(0, padded.shape[2], BLOCK):
                block = padded[ch, i : i + BLOCK, j : j + BLOCK]
                coef = scipy.fft.dctn(block, norm="ortho")
                coef = np.round(coef / table) * table
                out[ch, i : i + BLOCK, j : j + BLOCK] = scipy.fft.idctn(coef, norm="ortho")
    return np.clip(out[:, :h, :w] / 255.0, 0.0, 1.0).astype(image_chw.dtype)


def paper_style_axis_map(factors: np.ndarray, flip: bool, size: int) -> np.ndarray:
    """Source index per output position along one axis, one cell at a time."""
    cells = max(1, min(len(factors), size))
    d = size // cells
    src = [k * d for k in range(cells)] + [size]
    bounds = [0.0]
    for k in range(cells):
        bounds.append(bounds[-1] + (src[k + 1] - src[k]) * float(factors[k]))
    bounds[-1] = max(bounds[-1], float(size))  # the last cell absorbs the remainder
    index = np.empty(size, dtype=np.int64)
    for k in range(cells):
        lo, hi = bounds[k], bounds[k + 1]
        # output pixels whose centre p + 0.5 lies in [lo, hi)
        first = max(0, int(np.ceil(lo - 0.5)))
        last = min(size, int(np.ceil(hi - 0.5)))
        if first >= last:
            continue
        centres = np.arange(first, last, dtype=np.float64) + 0.5
        u = src[k] + (centres - lo) * ((src[k + 1] - src[k]) / (hi - lo))
        index[first:last] = np.clip(np.floor(u), 0, size - 1).astype(np.int64)
    if flip:
        index = (size - 1) - index[::-1]
    return index


def paper_style_grid_distort(
    image_chw: np.ndarray, row_factors: np.ndarray, col_factors: np.ndarray, corner: int
) -> np.ndarray:
    """Step 2 for one image with ``cv2.remap`` (nearest neighbour)."""
    import cv2

    c, h, w = image_chw.shape
    rows = paper_style_axis_map(row_factors, corner >= 2, h)
    cols = paper_style_axis_map(col_factors, corner % 2 == 1, w)
    map_y = np.repeat(rows.astype(np.float32)[:, None], w, axis=1)
    map_x = np.repeat(cols.astype(np.float32)[None, :], h, axis=0)
    hwc = np.ascontiguousarray(image_chw.transpose(1, 2, 0))
    out = cv2.remap(hwc, map_x, map_y, interpolation=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
    if out.ndim == 2:
        out = out[:, :, None]
    return out.transpose(2, 0, 1)


def paper_style_dct_distort(
    batch: np.ndarray, table: np.ndarray, row_factors: np.ndarray, col_factors: np.ndarray, corner: np.ndarray
) -> np.ndarray:
    """(a): the whole defense, one image at a time."""
    out = np.empty_like(batch)
    for i in range(batch.shape[0]):
        quantized = paper_style_dct_quantize(batch[i], table)
        out[i] = paper_style_grid_distort(quantized, row_factors[i], col_factors[i], int(corner[i]))
    return out


# ------------------------------------------------------------------ (b) vectorised NumPy


def numpy_dct_quantize(batch: np.ndarray, table: np.ndarray, *, workers: int = 1) -> np.ndarray:
    """Step 1 for a batch: one ``dctn`` over the block axes of a reshaped padded batch."""
    n, c, h, w = batch.shape
    ph, pw = _pad_amounts(h, w)
    padded = np.pad(batch * np.asarray(255.0, batch.dtype), ((0, 0), (0, 0), (0, ph), (0, pw)), mode=_reflect_mode(h, w))
    hp, wp = padded.shape[-2:]
    blocks = padded.reshape(n, c, hp // BLOCK, BLOCK, wp // BLOCK, BLOCK)
    coef = scipy.fft.dctn(blocks, axes=(3, 5), norm="ortho", workers=workers)
    q = np.asarray(table, dtype=coef.dtype).reshape(BLOCK, 1, BLOCK)
    np.divide(coef, q, out=coef)
    np.round(coef, out=coef)
    np.multiply(coef, q, out=coef)
    pix = scipy.fft.idctn(coef, axes=(3, 5), norm="ortho", workers=workers).reshape(n, c, hp, wp)[:, :, :h, :w]
    pix = pix / np.asarray(255.0, pix.dtype)
    return np.clip(pix, 0.0, 1.0, out=pix)


def numpy_axis_maps(factors: np.ndarray, flip: np.ndarray, size: int) -> np.ndarray:
    """Source index maps (N, size) for all images at once."""
    factors = np.asarray(factors, dtype=np.float64)
    n = factors.shape[0]
    cells = max(1, min(factors.shape[1], size))
    d = size // cells
    src = np.arange(cells + 1, dtype=np.float64) * d
    src[-1] = size
    widths = np.diff(src)
    bounds = np.concatenate([np.zeros((n, 1)), np.cumsum(widths * factors[:, :cells], axis=1)], axis=1)
    bounds[:, -1] = np.maximum(bounds[:, -1], size)
    centres = np.arange(size, dtype=np.float64) + 0.5
    cell = (centres[None, :, None] >= bounds[:, None, 1:]).sum(axis=2)
    cell = np.minimum(cell, cells - 1)
    start = np.take_along_axis(bounds, cell, axis=1)
    span = np.take_along_axis(bounds[:, 1:], cell, axis=1) - start
    u = src[cell] + (centres[None, :] - start) * (widths[cell] / span)
    index = np.clip(np.floor(u), 0, size - 1).astype(np.int64)
    flip = np.asarray(flip, dtype=bool)[:, None]
    return np.where(flip, (size - 1) - index[:, ::-1], index)


def numpy_grid_distort(
    batch: np.ndarray, row_factors: np.ndarray, col_factors: np.ndarray, corner: np.ndarray
) -> np.ndarray:
    """Step 2 for a batch: maps for all images, then one gather on flattened pixels."""
    n, c, h, w = batch.shape
    corner = np.asarray(corner)
    rows = numpy_axis_maps(row_factors, corner >= 2, h)
    cols = numpy_axis_maps(col_factors, corner % 2 == 1, w)
    flat = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, h * w)
    out = np.take_along_axis(batch.reshape(n, c, h * w), flat, axis=2)
    return out.reshape(n, c, h, w)


def numpy_dct_distort(
    batch: np.ndarray,
    table: np.ndarray,
    row_factors: np.ndarray,
    col_factors: np.ndarray,
    corner: np.ndarray,
    *,
    workers: int = 1,
) -> np.ndarray:
    """(b): the whole defense, vectorised over the batch."""
    return numpy_grid_distort(numpy_dct_quantize(batch, table, workers=workers), row_factors, col_factors, corner)


def draw_params(n: int, delta: float, cells: int, rng: np.random.Generator):
    """A NumPy draw of the distortion parameters: ``(row_factors, col_factors, corner)``."""
    corner = rng.integers(0, 4, size=n)
    factors = 1.0 + rng.uniform(-delta, delta, size=(n, 2, cells))
    return factors[:, 0], factors[:, 1], corner

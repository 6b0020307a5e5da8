"""Step 2 of the defense: random grid distortion (paper Section 5.3, Algorithm 3).

PROTOCOL.md "The defense g(x)", Step 2: distortion limit ``delta = 0.15``; ``cells = 10``
cells per side (``d = floor(side / cells)``); a random one of the four corners is the
starting point; along each axis, cell ``i`` of the source is stretched or compressed by a
factor ``1 + U(-delta, delta)`` drawn independently per cell and per axis; the output pixel
grid is mapped onto the cumulative distorted source grid with nearest neighbour, so that
compressed cells drop rows/columns and content pushed past the border is dropped; the last
cell absorbs the remainder so the output keeps the input's size.

Exact interpretation implemented here (one axis of length ``L``; rows and columns are
independent, so the remap is separable):

1. Source cell boundaries ``S = [0, d, 2d, ..., (cells-1) d, L]`` with ``d = L // cells``:
   the last source cell also holds the remainder ``L - cells * d`` (9 pixels at 299).
   (``cells`` is reduced to ``L`` for images smaller than ``cells`` pixels.)
2. Each source cell ``i`` gets a factor ``f_i = 1 + U(-delta, delta)``; its distorted
   width is ``(S[i+1] - S[i]) * f_i`` and the distorted boundaries are the cumulative sums
   ``X = [0, X_1, ..., X_cells]`` (Algorithm 3 lines 4-9: ``x_m = x_{m-1} + d (1 + delta_x)``).
3. If ``X_cells < L`` the last cell is stretched further so that ``X_cells = L`` (it absorbs
   the remainder: no padding is needed, Algorithm 3 line 14). If ``X_cells > L``, whatever
   lands past ``L`` is dropped (the output is cropped to ``L``).
4. Output pixel ``p`` (centre ``p + 0.5``) lies in the distorted cell ``m`` with
   ``X_m <= p + 0.5 < X_{m+1}``; it takes the source coordinate
   ``u = S_m + (p + 0.5 - X_m) * (S_{m+1} - S_m) / (X_{m+1} - X_m)`` and the source pixel
   ``floor(u)`` (nearest neighbour with pixel ``i`` covering ``[i, i+1)``), clipped to
   ``[0, L-1]``. Compressed cells (``f < 1``) therefore skip source rows; stretched cells
   repeat rows and push the later cells towards (and past) the border.
5. The starting corner is top-left, top-right, bottom-left or bottom-right, uniformly. A
   start at the bottom (right) builds the row (column) map from the opposite end: the map
   ``r`` becomes ``L - 1 - r[::-1]`` (the same as flipping the image, distorting, flipping
   back). With ``delta = 0`` every map is the identity.

Random draws (on the CPU generator): ``1 + 2 * cells`` uniforms in float64 per image, the first
giving the corner, then the row factors, then the column factors (:func:`sample_grid_params`). As a defense,
each image draws from its own generator (``N = 1`` per image, :mod:`prepdefense.draws`).
"""

from __future__ import annotations

from typing import Tuple, Union

import torch

from .. import seeding
from ..draws import Params
from ._registry import register
from .base import Defense

__all__ = [
    "GridDistort",
    "grid_params",
    "sample_grid_params",
    "grid_params_from_uniforms",
    "index_maps",
    "axis_index_map",
    "remap_separable",
    "grid_distort",
    "pixel_statistics",
]


def grid_params(corner: torch.Tensor, row_factors: torch.Tensor, col_factors: torch.Tensor) -> Params:
    """One draw of Algorithm 3 for a batch (CPU tensors) as :class:`~prepdefense.draws.Params`:

    * ``corner``: (N,) int64 in {0: top-left, 1: top-right, 2: bottom-left, 3: bottom-right};
    * ``row_factors``: (N, cells) float64, ``1 + U(-delta, delta)`` per vertical cell;
    * ``col_factors``: (N, cells) float64, ``1 + U(-delta, delta)`` per horizontal cell.
    """
    return Params(corner=corner, row_factors=row_factors, col_factors=col_factors)


def sample_grid_params(n: int, delta: float, cells: int, generator: torch.Generator) -> Params:
    """Draw corner and per-cell, per-axis factors ``1 + U(-delta, delta)`` for ``n`` images
    from one generator: ``1 + 2 * cells`` uniforms in float64 per image, the first giving the
    corner (``floor(4 u)``), the next ``cells`` the row factors and the last ``cells`` the
    column factors. The defense draws each image from its own generator
    (:func:`grid_params_from_uniforms` on one row per image)."""
    return grid_params_from_uniforms(seeding.rand((n, 1 + 2 * cells), generator, dtype=torch.float64), delta, cells)


def grid_params_from_uniforms(u: torch.Tensor, delta: float, cells: int) -> Params:
    """The draw for rows of ``1 + 2 * cells`` uniforms in [0, 1) (see :func:`sample_grid_params`)."""
    corner = (u[:, 0] * 4).floor().long().clamp_(max=3)
    factors = 1.0 + float(delta) * (2.0 * u[:, 1:] - 1.0)
    return grid_params(corner, factors[:, :cells].contiguous(), factors[:, cells:].contiguous())


def axis_index_map(factors: torch.Tensor, flip: torch.Tensor, size: int, *, device=None) -> torch.Tensor:
    """Source index of every output position along one axis (steps 1-5 of the module doc).

    Args:
        factors: (N, cells) float64 stretch factors (> 0).
        flip: (N,) bool, build the map from the far end (start corner at the bottom/right).
        size: length ``L`` of the axis.

    Returns:
        (N, L) int64 source indices in ``[0, L-1]``.
    """
    device = factors.device if device is None else device
    factors = factors.to(device=device, dtype=torch.float64)
    n = factors.shape[0]
    cells = max(1, min(factors.shape[1], size))
    d = size // cells
    src = torch.arange(cells + 1, device=device, dtype=torch.float64) * d
    src[-1] = size
    widths = src[1:] - src[:-1]  # (cells,)
    out_widths = widths * factors[:, :cells]  # (N, cells)
    bounds = torch.cat([torch.zeros(n, 1, device=device, dtype=torch.float64), out_widths.cumsum(1)], dim=1)
    bounds[:, -1] = bounds[:, -1].clamp(min=float(size))  # the last cell absorbs the remainder
    centres = torch.arange(size, device=device, dtype=torch.float64) + 0.5
    cell = torch.searchsorted(bounds[:, 1:].contiguous(), centres.expand(n, size).contiguous(), right=True)
    cell = cell.clamp_(max=cells - 1)
    start = bounds.gather(1, cell)
    span = bounds[:, 1:].gather(1, cell) - start
    u = src[cell] + (centres - start) * (widths[cell] / span)
    index = u.floor_().clamp_(0, size - 1).to(torch.int64)
    flip = flip.to(device=device, dtype=torch.bool).view(n, 1)
    return torch.where(flip, (size - 1) - index.flip(1), index)


def index_maps(params: Params, height: int, width: int, *, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row map (N, H) and column map (N, W): output ``[p, q]`` takes source ``[rows[p], cols[q]]``."""
    corner = params["corner"].to(device=device)
    rows = axis_index_map(params["row_factors"], corner >= 2, height, device=device)
    cols = axis_index_map(params["col_factors"], (corner % 2) == 1, width, device=device)
    return rows, cols


def remap_separable(src: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``out[n, c, p, q] = src[n, c, rows[n, p], cols[n, q]]`` as one batched gather.

    ``src`` may be larger than the output (e.g. the padded output of Step 1): indices are
    taken within its top-left corner.

    Shape:
        src: (N, C, Hs, Ws); rows: (N, H); cols: (N, W); output: (N, C, H, W).
    """
    n, c, hs, ws = src.shape
    h, w = rows.shape[1], cols.shape[1]
    flat = (rows.to(src.device).unsqueeze(2) * ws + cols.to(src.device).unsqueeze(1)).view(n, 1, h * w)
    out = src.reshape(n, c, hs * ws).gather(2, flat.expand(n, c, h * w))
    return out.view(n, c, h, w)


def grid_distort(x: torch.Tensor, params: Params) -> torch.Tensor:
    """Algorithm 3 with given parameters (deterministic): remap ``x`` by :func:`index_maps`."""
    rows, cols = index_maps(params, x.shape[-2], x.shape[-1], device=x.device)
    return remap_separable(x, rows, cols)


def pixel_statistics(
    params_or_maps: Union[Params, Tuple[torch.Tensor, torch.Tensor]], height: int, width: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two figures of Section 5.3, per image: dropped and moved pixel fractions.

    ``dropped``: fraction of the H*W source pixels that appear nowhere in the output.
    ``moved``: fraction of the output pixels taken from a source coordinate other than
    their own. Both follow from the separable maps: a source pixel survives iff its row
    and its column both do; an output pixel stays put iff its row and column map to
    themselves.

    Returns:
        ``(dropped, moved)``, float64 tensors of shape (N,).
    """
    if isinstance(params_or_maps, dict):
        rows, cols = index_maps(params_or_maps, height, width, device="cpu")
    else:
        rows, cols = (t.to("cpu", torch.int64) for t in params_or_maps)
    n = rows.shape[0]

    def kept(index: torch.Tensor, size: int) -> torch.Tensor:
        present = torch.zeros(n, size, dtype=torch.bool).scatter_(1, index, True)
        return present.sum(1).to(torch.float64)

    def fixed(index: torch.Tensor, size: int) -> torch.Tensor:
        return (index == torch.arange(size)).sum(1).to(torch.float64)

    area = float(height * width)
    dropped = 1.0 - kept(rows, height) * kept(cols, width) / area
    moved = 1.0 - fixed(rows, height) * fixed(cols, width) / area
    return dropped, moved


class GridDistort(Defense):
    """Algorithm 3 as a defense: random, differentiable in ``x`` for a fixed draw.

    The remap is a gather, so gradients flow to the source pixels it picks (an attacker
    with EOT can differentiate through it; it is Step 1's rounding that is not).

    Args:
        delta: distortion limit, ``0 <= delta < 1`` (paper: 0.15).
        cells: grid cells per side (PROTOCOL.md: 10, ``d = floor(side / cells)``).
    """

    randomized = True
    differentiable = True

    def __init__(self, delta: float = 0.15, cells: int = 10) -> None:
        super().__init__()
        if not 0.0 <= float(delta) < 1.0:
            raise ValueError(f"delta must be in [0, 1), got {delta}")
        if int(cells) < 1:
            raise ValueError(f"cells must be >= 1, got {cells}")
        self.delta = float(delta)
        self.cells = int(cells)

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> Params:
        return sample_grid_params(1, self.delta, self.cells, generator)

    def draw_images(self, x: torch.Tensor, generators) -> Params:
        # One draw call per image, then the conversion once for the batch (the same values as
        # draw() per image: each row comes from its image's generator alone).
        width = 1 + 2 * self.cells
        u = torch.stack([torch.rand(width, generator=g, dtype=torch.float64) for g in generators])
        return grid_params_from_uniforms(u, self.delta, self.cells)

    def index_maps(self, x_shape, params: Params, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Row and column maps for a batch of shape ``x_shape`` (see :func:`index_maps`)."""
        return index_maps(params, x_shape[-2], x_shape[-1], device=device)

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return grid_distort(x, params)

    def extra_repr(self) -> str:
        return f"delta={self.delta}, cells={self.cells}"


register("grid-distort", help="Step 2 of the paper's defense: random grid distortion (delta=0.15, cells=10)")(GridDistort)

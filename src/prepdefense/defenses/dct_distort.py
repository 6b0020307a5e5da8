"""The paper's defense ``g(x) = distortion(quantization(x))`` (Section 5, Algorithm 1).

Step 1 is :class:`~prepdefense.defenses.dct_quant.DCTQuantize` (8x8 DCT quantization with
a table ``Q``), Step 2 is :class:`~prepdefense.defenses.grid_distort.GridDistort`
(Algorithm 3). PROTOCOL.md "The defense g(x)": defaults ``table='default'`` (the learned
table once shipped, else the FD table, and the repr says which), ``delta=0.15``,
``cells=10``; all switchable.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import register
from .base import Defense
from .block_dct import BLOCK
from .dct_quant import DCTQuantize, compute_dtype, images_per_step, prepare, quantize_into
from .grid_distort import GridDistort, GridDistortParams, index_maps
from .quant_tables import TableSpec

__all__ = ["DCTDistort", "gather_from_blocks"]


def gather_from_blocks(
    blocks: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``out[n, c, p, q] = image[n, c, rows[n, p], cols[n, q]]`` where ``image`` is the
    picture that ``blocks`` (the ``block_dct.to_blocks`` layout) holds.

    Pixel ``(r, s)`` sits at flat offset ``((r // 8) * W/8 + s // 8) * 64 + (r % 8) * 8 + s % 8``
    of an image's blocks: a row part plus a column part, so one batched gather does it
    (over a view of each plane repeated, with stride 0, for every output row, so that the
    gather splits into N * C * H rows across threads rather than N * C planes).

    Shape:
        blocks: (N, C, Hb, Wb, 8, 8); rows: (N, H); cols: (N, W); output: (N, C, H, W).
    """
    n, c, hb, wb = blocks.shape[:4]
    h, w = rows.shape[1], cols.shape[1]
    row_offset = (rows // BLOCK) * (wb * BLOCK * BLOCK) + (rows % BLOCK) * BLOCK
    col_offset = (cols // BLOCK) * (BLOCK * BLOCK) + cols % BLOCK
    flat = (row_offset.unsqueeze(2) + col_offset.unsqueeze(1)).view(n, 1, h, w)
    source = blocks.reshape(n, c, 1, -1)
    source = source.expand(n, c, h, source.shape[-1])
    if out is None:
        out = blocks.new_empty(n, c, h, w)
    return torch.gather(source, 3, flat.expand(n, c, h, w), out=out)


class DCTDistort(Defense):
    """Algorithm 1: DCT quantization, then random grid distortion. Random, not differentiable.

    ``.quantize`` and ``.distort`` are the two steps as defenses of their own, so an
    attacker can build a surrogate (e.g. BPDA through ``quantize`` and the exact,
    differentiable ``distort`` for a fixed draw). ``sample_params`` returns the
    :class:`GridDistortParams` of Step 2 (Step 1 is deterministic).

    Args:
        table: quantization table spec (see ``quant_tables.resolve_table``).
        delta: distortion limit (paper Section 5.3: 0.15).
        cells: grid cells per side (10).
    """

    randomized = True
    differentiable = False

    def __init__(self, table: TableSpec = "default", delta: float = 0.15, cells: int = 10) -> None:
        super().__init__()
        self.quantize = DCTQuantize(table=table)
        self.distort = GridDistort(delta=delta, cells=cells)

    @property
    def table_source(self) -> str:
        return self.quantize.table_source

    def sample_params(self, x: torch.Tensor, generator: torch.Generator) -> GridDistortParams:
        return self.distort.sample_params(x, generator)

    def apply(self, x: torch.Tensor, params: GridDistortParams) -> torch.Tensor:
        # Same as self.distort.apply(self.quantize.apply(x), params), bit for bit; the
        # distortion gathers straight from Step 1's block layout, which saves two copies,
        # and on CPU both steps run a few images at a time (dct_quant.images_per_step), so
        # the block buffer stays in cache from the padding copy to the gather.
        with torch.no_grad():
            operators = self.quantize.operators(compute_dtype(x), x.device)
            work, forward, inverse, index = prepare(x, self.quantize.table, operators)
            n, c, h, w = work.shape
            rows, cols = index_maps(params, h, w, device=x.device)
            step = images_per_step(work)
            blocks = work.new_empty(min(step, n) * c, index.numel())
            out = work.new_empty(n, c, h, w)
            for i in range(0, n, step):
                part = work[i : i + step]
                buffer = blocks[: part.shape[0] * c]
                quantize_into(part, buffer, forward, inverse, index)
                buffer = buffer.view(part.shape[0], c, -(-h // BLOCK), -(-w // BLOCK), BLOCK, BLOCK)
                gather_from_blocks(buffer, rows[i : i + step], cols[i : i + step], out=out[i : i + step])
            return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"table={self.table_source}, delta={self.distort.delta}, cells={self.distort.cells}"


@register("dct-distort", help="the paper's defense: DCT quantization then random grid distortion")
def dct_distort(table: TableSpec = "default", delta: float = 0.15, cells: int = 10) -> DCTDistort:
    return DCTDistort(table=table, delta=delta, cells=cells)

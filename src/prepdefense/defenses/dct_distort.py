"""The paper's defense ``g(x) = distortion(quantization(x))`` (Section 5, Algorithm 1).

Step 1 is :class:`~prepdefense.defenses.dct_quant.DCTQuantize` (8x8 DCT quantization with
a table ``Q``), Step 2 is :class:`~prepdefense.defenses.grid_distort.GridDistort`
(Algorithm 3). PROTOCOL.md "The defense g(x)": defaults ``table='default'`` (the learned
table once shipped, else the FD table, and the repr says which), ``delta=0.15``,
``cells=10``; all switchable.
"""

from __future__ import annotations

import torch

from ._registry import register
from .base import Defense
from .dct_quant import DCTQuantize, compute_dtype, prepare, quantize_and_read
from .grid_distort import GridDistort, GridDistortParams, index_maps
from .quant_tables import TableSpec

__all__ = ["DCTDistort"]


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
        # Same as self.distort.apply(self.quantize.apply(x), params), bit for bit; the remap
        # reads straight from Step 1's plane layout, which saves the crop and a copy, and on
        # the CPU each step's images stay in cache from the padding copy to the remap
        # (dct_quant.quantize_and_read).
        with torch.no_grad():
            operators = self.quantize.operators(compute_dtype(x), x.device)
            work, operators, index = prepare(x, self.quantize.table, operators)
            rows, cols = index_maps(params, work.shape[-2], work.shape[-1], device=x.device)
            return quantize_and_read(work, operators, index, rows, cols).to(x.dtype)

    def extra_repr(self) -> str:
        return f"table={self.table_source}, delta={self.distort.delta}, cells={self.distort.cells}"


register("dct-distort", help="the paper's defense: DCT quantization then random grid distortion")(DCTDistort)

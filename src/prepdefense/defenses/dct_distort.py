"""The paper's defense ``g(x) = distortion(quantization(x))`` (Section 5, Algorithm 1).

Step 1 is :class:`~prepdefense.defenses.dct_quant.DCTQuantize` (8x8 DCT quantization with
a table ``Q``), Step 2 is :class:`~prepdefense.defenses.grid_distort.GridDistort`
(Algorithm 3). PROTOCOL.md "The defense g(x)": defaults ``table='default'`` (the shipped
learned table, ``tables/learned.json``; the FD table if it is missing, and the repr says which),
``delta=0.15``,
``cells=10``; all switchable.
"""

from __future__ import annotations

import torch

from ._registry import register
from .base import Defense
from ..draws import Params
from .dct_quant import DCTQuantize
from .grid_distort import GridDistort, index_maps
from .kernels.dct_quant import compute_dtype, quantize_and_read
from .quant_tables import TableSpec
from ..validation import value_checks_enabled

__all__ = ["DCTDistort"]


class DCTDistort(Defense):
    """Algorithm 1: DCT quantization, then random grid distortion. Random, not differentiable.

    Its two stages, declared by :meth:`stages`, are ``quantize`` (Step 1, deterministic, not
    differentiable) and ``distort`` (Step 2, random, differentiable for a fixed draw), so BPDA
    approximates the rounding alone and keeps the real gradient of the remap.
    ``sample_params`` returns ``Params(distort=<Step 2's draw>)``.

    Args:
        table: quantization table spec (see ``quant_tables.resolve_table``).
        delta: distortion limit (paper Section 5.3: 0.15).
        cells: grid cells per side (10).
    """

    randomized = True
    differentiable = False
    checks_values_in_apply = True  # Step 1's kernel checks its own copy of each step, in cache

    def __init__(self, table: TableSpec = "default", delta: float = 0.15, cells: int = 10) -> None:
        super().__init__()
        self.quantize = DCTQuantize(table=table)
        self.distort = GridDistort(delta=delta, cells=cells)

    canonical_params = DCTQuantize.canonical_params  # the same table names, folded the same way

    @property
    def table_source(self) -> str:
        return self.quantize.table_source

    def stages(self):
        return (("quantize", self.quantize), ("distort", self.distort))

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        # Same as apply_stages(x, params), bit for bit; the remap
        # reads straight from Step 1's output in the kernel, which saves the crop and a copy,
        # and on the CPU each step's images stay in cache from the padding copy to the remap
        # (kernels/dct_quant.py). The kernel never puts Step 1 on the autograd graph.
        rows, cols = index_maps(params["distort"], x.shape[-2], x.shape[-1], device=x.device)
        operators = self.quantize.operators(compute_dtype(x), x.device)
        return quantize_and_read(x, self.quantize.table, rows, cols, operators=operators, check_values=value_checks_enabled())

    def extra_repr(self) -> str:
        return f"table={self.table_source}, delta={self.distort.delta}, cells={self.distort.cells}"


register("dct-distort", help="the paper's defense: DCT quantization then random grid distortion")(DCTDistort)

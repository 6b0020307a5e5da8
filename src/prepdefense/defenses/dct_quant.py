"""Step 1 of the defense: 8x8 block-DCT quantization (paper Section 5.2, Algorithm 1 lines 4-9).

PROTOCOL.md "The defense g(x)", Step 1: work in the 0..255 domain of each channel, pad H
and W up to multiples of 8 by reflection, orthonormal 2-D DCT-II of every 8x8 block,
``round(coef / Q) * Q``, inverse DCT, crop the padding, divide by 255, clip to [0, 1].

Registers ``dct-quant`` (``table='default'``: the shipped learned table, else FD) and
``fd`` (Feature Distillation of the paper's released code: Step 1 with the FD table).

The computation is the kernel ``kernels/dct_quant.py`` (:func:`quantize_and_read`): a fast
path (plane layout, 1-D transforms with the table folded in, steps of a few images over the
:mod:`~prepdefense.cpu_workers` on the CPU), held equal by a test to the short reference
``kernels/dct_quant_reference.py``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._registry import register
from .base import Defense
from .kernels.dct_quant import Operators, compute_dtype, quantization_operators, quantize_and_read
from .quant_tables import TableSpec, canonical_table_spec, resolve_table
from ..validation import value_checks_enabled

__all__ = ["dct_quantize", "quantization_operators", "DCTQuantize"]


def dct_quantize(x: torch.Tensor, table: torch.Tensor, *, operators: Optional[Operators] = None, check_values: bool = False) -> torch.Tensor:
    """Step 1 of the defense (paper Section 5.2; PROTOCOL.md "The defense g(x)").

    The kernel :func:`~prepdefense.defenses.kernels.dct_quant.quantize_and_read` with the
    crop back to the input's size. Never on the autograd graph (detached input, ``no_grad``):
    rounding has zero gradient almost everywhere, so attacks need BPDA or a surrogate.

    Args:
        x: images in [0,1].
        table: 8x8 quantization table ``Q`` (0..255 domain), e.g. ``quant_tables.FD_TABLE``.
        operators: precomputed :func:`quantization_operators` of ``table`` (optional).
        check_values: check the input's values in the kernel (see ``quantize_and_read``).

    Returns:
        ``clip(IDCT(round(DCT(255 x) / Q) * Q) / 255, 0, 1)`` block by block, same shape,
        device and dtype as ``x`` (half precision is computed in float32).

    Shape:
        x: (N, C, H, W), any H, W >= 1 (reflection-padded to multiples of 8, then cropped).
    """
    return quantize_and_read(x, table, operators=operators, check_values=check_values)


class DCTQuantize(Defense):
    """Step 1 as a defense: deterministic, not differentiable (``round`` has zero gradient).

    Args:
        table: ``'default'`` (the shipped learned table, else FD), ``'learned'``, the name of
            another shipped table (``quant_tables.shipped_tables``), ``'fd'``, ``'jpeg50'``, a
            JSON path, or an 8x8 tensor/array (see ``quant_tables.resolve_table``).

    The table is a float64 buffer (cast to the input's dtype at each call, so it follows
    ``.to(device)``); ``table_source`` says where it came from and appears in the repr.
    """

    randomized = False
    differentiable = False
    checks_values_in_apply = True  # on the kernel's own copy of each step, in cache

    def __init__(self, table: TableSpec = "default") -> None:
        super().__init__()
        values, source = resolve_table(table)
        self.register_buffer("table", values)
        self.table_source = source

    @classmethod
    def canonical_params(cls, params):
        return {k: canonical_table_spec(v) if k == "table" else v for k, v in params.items()}

    def _apply(self, fn, recurse: bool = True):
        """As ``nn.Module._apply`` (``.to``, ``.cuda``, ``.half``, ...), except that the table
        stays float64: a cast to half or bfloat16 would round its entries and change the
        defense (moves to another device apply as usual)."""
        table = self.table
        out = super()._apply(fn, recurse)
        if self.table.dtype != table.dtype:
            self.table = table.to(device=self.table.device)
        return out

    def operators(self, dtype: torch.dtype, device) -> Operators:
        """:func:`quantization_operators` of the table, cached per dtype/device."""
        key = (dtype, torch.device(device), self.table._version, self.table.data_ptr())
        cache = self.__dict__.setdefault("_operator_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = quantization_operators(self.table, dtype, device)
        return cache[key]

    def apply(self, x: torch.Tensor, params=None) -> torch.Tensor:
        return dct_quantize(x, self.table, operators=self.operators(compute_dtype(x), x.device), check_values=value_checks_enabled())

    def extra_repr(self) -> str:
        return f"table={self.table_source}"


register("dct-quant", help="Step 1 of the paper's defense: 8x8 DCT quantization (table='default')")(DCTQuantize)
register("fd", help="Feature Distillation (released-code FD table): 8x8 DCT quantization", fixed={"table": "fd"})(DCTQuantize)

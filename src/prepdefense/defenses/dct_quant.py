"""Step 1 of the defense: 8x8 block-DCT quantization (paper Section 5.2, Algorithm 1 lines 4-9).

PROTOCOL.md "The defense g(x)", Step 1: work in the 0..255 domain of each channel, pad H
and W up to multiples of 8 by reflection, orthonormal 2-D DCT-II of every 8x8 block,
``round(coef / Q) * Q``, inverse DCT, crop the padding, divide by 255, clip to [0, 1].

Registers ``dct-quant`` (``table='default'``: the shipped learned table, else FD) and
``fd`` (Feature Distillation of the paper's released code: Step 1 with the FD table).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import register
from .base import Defense
from .block_dct import BLOCK, dct_matrix, from_blocks, pad_to_blocks, to_blocks
from .quant_tables import TableSpec, resolve_table

__all__ = ["dct_quantize", "dct_quantize_blocks", "quantization_operators", "DCTQuantize"]

Operators = Tuple[torch.Tensor, torch.Tensor]


def quantization_operators(table: torch.Tensor, dtype: torch.dtype = torch.float32, device=None) -> Operators:
    """The two 64x64 matrices of Step 1 acting on row-major flattened 8x8 blocks.

    With ``K = kron(D, D)`` (``D`` the orthonormal DCT-II matrix), ``vec(D B D.T) = K vec(B)``
    is ``block_dct.block_dct2d``. Folding the 0..255 scaling and the table in:

    - ``forward = (diag(255 / Q) K).T``: ``blocks @ forward = DCT(255 B) / Q``;
    - ``inverse = diag(Q / 255) K``: ``round(.) @ inverse = IDCT(round(.) * Q) / 255``.

    Built in float64, then cast to ``dtype`` on ``device``.
    """
    d = dct_matrix(BLOCK, dtype=torch.float64)
    k = torch.kron(d, d)
    q = table.detach().to(device="cpu", dtype=torch.float64).reshape(BLOCK * BLOCK)
    forward = (k * (255.0 / q)[:, None]).t()
    inverse = k * (q / 255.0)[:, None]
    return tuple(m.to(dtype=dtype, device=device).contiguous() for m in (forward, inverse))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def dct_quantize_blocks(
    x: torch.Tensor, table: torch.Tensor, *, operators: Optional[Operators] = None
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Step 1 up to (not including) the final crop, in the 8x8 block layout.

    Returns ``(blocks, (H, W))``: ``blocks`` is the quantized, clipped image of the
    reflection-padded batch as ``block_dct.to_blocks`` lays it out, (N, C, H/8, W/8, 8, 8),
    contiguous; ``block_dct.from_blocks(blocks)[..., :H, :W]`` is the output.
    ``dct-distort`` gathers straight from this layout, which saves two copies.

    The 2-D DCT of every block is one GEMM with a 64x64 matrix (see
    :func:`quantization_operators`): the same map as ``block_dct.block_dct2d`` but with
    the 255 scale and the division by ``Q`` folded in, so the pipeline is pad, block,
    GEMM, round (in place), GEMM (into the block buffer), clip (in place). Rounding is
    ``torch.round``: half to even, as ``numpy.round``. Runs under ``no_grad``: rounding
    has zero gradient almost everywhere, so attacks need BPDA or a surrogate.

    Shape:
        x: (N, C, H, W); blocks: (N, C, ceil(H/8), ceil(W/8), 8, 8).
    """
    with torch.no_grad():
        work = x.to(compute_dtype(x))
        if operators is None:
            operators = quantization_operators(table, work.dtype, work.device)
        forward, inverse = (m.to(dtype=work.dtype, device=work.device) for m in operators)
        padded, size = pad_to_blocks(work)
        blocks = to_blocks(padded).clone(memory_format=torch.contiguous_format)  # never aliases x
        flat = blocks.view(-1, BLOCK * BLOCK)
        levels = torch.mm(flat, forward).round_()  # round(DCT(255 x) / Q)
        torch.mm(levels, inverse, out=flat)  # IDCT(levels * Q) / 255, into the block buffer
        blocks.clamp_(0.0, 1.0)
        return blocks.to(x.dtype), size


def dct_quantize(x: torch.Tensor, table: torch.Tensor, *, operators: Optional[Operators] = None) -> torch.Tensor:
    """Step 1 of the defense (paper Section 5.2; PROTOCOL.md "The defense g(x)").

    Args:
        x: images in [0,1].
        table: 8x8 quantization table ``Q`` (0..255 domain), e.g. ``quant_tables.FD_TABLE``.
        operators: precomputed :func:`quantization_operators` of ``table`` (optional).

    Returns:
        ``clip(IDCT(round(DCT(255 x) / Q) * Q) / 255, 0, 1)`` block by block, same shape,
        device and dtype as ``x`` (half precision is computed in float32).

    Shape:
        x: (N, C, H, W), any H, W >= 1 (reflection-padded to multiples of 8, then cropped).
    """
    blocks, (h, w) = dct_quantize_blocks(x, table, operators=operators)
    image = from_blocks(blocks)
    if image.shape[-2:] != (h, w):
        image = image[..., :h, :w].contiguous()
    return image


class DCTQuantize(Defense):
    """Step 1 as a defense: deterministic, not differentiable (``round`` has zero gradient).

    Args:
        table: ``'default'`` (the shipped learned table, else FD), ``'learned'``, ``'fd'``,
            ``'jpeg50'``, a JSON path, or an 8x8 tensor/array (see ``quant_tables.resolve_table``).

    The table is a float64 buffer (cast to the input's dtype at each call, so it follows
    ``.to(device)``); ``table_source`` says where it came from and appears in the repr.
    """

    randomized = False
    differentiable = False

    def __init__(self, table: TableSpec = "default") -> None:
        super().__init__()
        values, source = resolve_table(table)
        self.register_buffer("table", values)
        self.table_source = source

    def operators(self, dtype: torch.dtype, device) -> Operators:
        """:func:`quantization_operators` of the table, cached per dtype/device."""
        key = (dtype, torch.device(device), self.table._version, self.table.data_ptr())
        cache = self.__dict__.setdefault("_operator_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = quantization_operators(self.table, dtype, device)
        return cache[key]

    def apply(self, x: torch.Tensor, params=None) -> torch.Tensor:
        return dct_quantize(x, self.table, operators=self.operators(compute_dtype(x), x.device))

    def extra_repr(self) -> str:
        return f"table={self.table_source}"


@register("dct-quant", help="Step 1 of the paper's defense: 8x8 DCT quantization (table='default')")
def dct_quant(table: TableSpec = "default") -> DCTQuantize:
    return DCTQuantize(table=table)


@register("fd", help="Feature Distillation (released-code FD table): 8x8 DCT quantization")
def feature_distillation() -> DCTQuantize:
    return DCTQuantize(table="fd")

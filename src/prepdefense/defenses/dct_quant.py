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
from .block_dct import BLOCK, dct_matrix, from_blocks
from .quant_tables import TableSpec, resolve_table

__all__ = [
    "dct_quantize",
    "dct_quantize_blocks",
    "quantize_into",
    "block_gather_index",
    "images_per_step",
    "quantization_operators",
    "DCTQuantize",
]

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


#: On CPU, Step 1 runs a few images at a time, at most about this many float32 values
#: (3 MB: two 299x299 RGB images) per step: the pad-and-block copy, forward GEMM, round,
#: inverse GEMM, clip (and in ``dct-distort`` the gather) then work on data that stays in
#: cache instead of making passes over the whole batch in memory (about 1.4x faster on an
#: idle 2-core machine). Images are independent and, in float32, every step computes each
#: image bit for bit as the whole batch would (MKL's float64 GEMM can differ in the last
#: bit with the number of rows, as it does between a batch and its images). Each step is a handful of
#: short parallel regions: with several threads on cores that other processes keep busy,
#: waiting for descheduled threads makes small steps slow; a larger value (fewer, longer
#: steps) is more robust there.
CPU_STEP_ELEMENTS = 3 << 18


def images_per_step(x: torch.Tensor) -> int:
    """Images per step of Step 1: a few at a time on a single-threaded CPU, where keeping a
    step in cache measured 1.5x faster; all of them with several CPU threads (small parallel
    steps lose to thread wake-ups, badly when other processes share the cores) and off the CPU
    (one launch per operation)."""
    n, c, h, w = x.shape
    if x.device.type != "cpu" or torch.get_num_threads() > 1:
        return max(n, 1)
    padded = c * (-(-h // BLOCK) * BLOCK) * (-(-w // BLOCK) * BLOCK)
    return max(1, CPU_STEP_ELEMENTS // max(padded, 1))


_BLOCK_INDEX_CACHE: dict = {}


def _axis_pad_index(size: int, padded: int, reflect: bool) -> torch.Tensor:
    """Source index of each padded position along one axis (``F.pad`` reflect / replicate)."""
    i = torch.arange(padded, dtype=torch.int64)
    mirrored = (2 * (size - 1) - i) if reflect else torch.full_like(i, size - 1)
    return torch.where(i < size, i, mirrored)


def block_gather_index(h: int, w: int, device=None) -> torch.Tensor:
    """Flat source offsets (in an ``h x w`` image) of the padded image in block layout.

    ``image.reshape(-1, h * w).index_select(1, index)`` is
    ``to_blocks(pad_to_blocks(image)[0])`` flattened per image: padding and blocking in one
    copy. Reflection, or replication when a pad is not smaller than its side, as
    ``block_dct.pad_to_blocks``. Cached per size and device.
    """
    key = (h, w, str(torch.device(device) if device is not None else "cpu"))
    index = _BLOCK_INDEX_CACHE.get(key)
    if index is None:
        ph, pw = (-h) % BLOCK, (-w) % BLOCK
        reflect = ph < h and pw < w
        rows = _axis_pad_index(h, h + ph, reflect).view(-1, BLOCK)  # (Hb, 8)
        cols = _axis_pad_index(w, w + pw, reflect).view(-1, BLOCK)  # (Wb, 8)
        flat = rows[:, None, :, None] * w + cols[None, :, None, :]  # (Hb, Wb, 8, 8)
        index = flat.reshape(-1).to(device)
        if len(_BLOCK_INDEX_CACHE) > 32:
            _BLOCK_INDEX_CACHE.clear()
        _BLOCK_INDEX_CACHE[key] = index
    return index


def quantize_into(
    work: torch.Tensor, blocks: torch.Tensor, forward: torch.Tensor, inverse: torch.Tensor, index: torch.Tensor
) -> None:
    """Step 1 of ``work`` (N, C, H, W) into ``blocks`` (N * C, Hb * Wb * 64), block layout.

    Pad and block in one ``index_select`` (:func:`block_gather_index`), GEMM, round (in
    place), GEMM (into ``blocks``), clip (in place).
    """
    n, c, h, w = work.shape
    torch.index_select(work.reshape(n * c, h * w), 1, index, out=blocks)
    flat = blocks.view(-1, BLOCK * BLOCK)
    levels = torch.mm(flat, forward).round_()  # round(DCT(255 x) / Q)
    torch.mm(levels, inverse, out=flat)  # IDCT(levels * Q) / 255, into the block buffer
    flat.clamp_(0.0, 1.0)


def prepare(x: torch.Tensor, table: torch.Tensor, operators: Optional[Operators]):
    """``(work, forward, inverse, index)``: the input in the compute dtype, the two
    operators on its device and the :func:`block_gather_index` of its size."""
    work = x.to(compute_dtype(x))
    if operators is None:
        operators = quantization_operators(table, work.dtype, work.device)
    forward, inverse = (m.to(dtype=work.dtype, device=work.device) for m in operators)
    return work, forward, inverse, block_gather_index(work.shape[-2], work.shape[-1], work.device)


def dct_quantize_blocks(
    x: torch.Tensor, table: torch.Tensor, *, operators: Optional[Operators] = None
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Step 1 up to (not including) the final crop, in the 8x8 block layout.

    Returns ``(blocks, (H, W))``: ``blocks`` is the quantized, clipped image of the
    reflection-padded batch as ``block_dct.to_blocks`` lays it out, (N, C, H/8, W/8, 8, 8),
    contiguous; ``block_dct.from_blocks(blocks)[..., :H, :W]`` is the output.

    The 2-D DCT of every block is one GEMM with a 64x64 matrix (see
    :func:`quantization_operators`): the same map as ``block_dct.block_dct2d`` but with
    the 255 scale and the division by ``Q`` folded in, so the pipeline is pad and block
    (one ``index_select``), GEMM, round (in place), GEMM (into the block buffer), clip (in
    place) (:func:`quantize_into`), on CPU a few images at a time (:func:`images_per_step`).
    Rounding is ``torch.round``: half to even, as ``numpy.round``. Runs under ``no_grad``:
    rounding has zero gradient almost everywhere, so attacks need BPDA or a surrogate.

    Shape:
        x: (N, C, H, W); blocks: (N, C, ceil(H/8), ceil(W/8), 8, 8).
    """
    with torch.no_grad():
        work, forward, inverse, index = prepare(x, table, operators)
        n, c, h, w = work.shape
        hb, wb = -(-h // BLOCK), -(-w // BLOCK)
        blocks = work.new_empty(n, c, index.numel())  # a new buffer: never aliases x
        step = images_per_step(work)
        for i in range(0, n, step):
            quantize_into(work[i : i + step], blocks[i : i + step].view(-1, index.numel()), forward, inverse, index)
        return blocks.view(n, c, hb, wb, BLOCK, BLOCK).to(x.dtype), (h, w)


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

"""Step 1 of the defense: 8x8 block-DCT quantization (paper Section 5.2, Algorithm 1 lines 4-9).

PROTOCOL.md "The defense g(x)", Step 1: work in the 0..255 domain of each channel, pad H
and W up to multiples of 8 by reflection, orthonormal 2-D DCT-II of every 8x8 block,
``round(coef / Q) * Q``, inverse DCT, crop the padding, divide by 255, clip to [0, 1].

Registers ``dct-quant`` (``table='default'``: the shipped learned table, else FD) and
``fd`` (Feature Distillation of the paper's released code: Step 1 with the FD table).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .. import cpu_workers
from . import register
from .base import Defense
from .block_dct import BLOCK, dct_matrix, pixels_from_blocks
from .quant_tables import TableSpec, resolve_table

__all__ = [
    "dct_quantize",
    "quantize_in_steps",
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


#: On the CPU, Step 1 runs a few images per step, at most about this many float32 values
#: (3 MB: two 299x299 RGB images) per step: the pad-and-block copy, forward GEMM, round,
#: inverse GEMM, clip and the copy out (in ``dct-distort`` the remap) then work on data that
#: stays in one core's cache instead of streaming the whole batch through memory at every
#: pass. With several torch threads the steps are spread over single-threaded workers
#: (:mod:`prepdefense.cpu_workers`). Images are independent and, in float32, every step
#: computes each image bit for bit as a whole-batch step would (tested); MKL's float64 GEMM
#: can differ in the last bit with the number of rows, so steps start at multiples of the
#: step size whatever the number of workers.
CPU_STEP_ELEMENTS = 3 << 18


def images_per_step(x: torch.Tensor) -> int:
    """Images per step of Step 1: a few at a time on the CPU (a step's data fits in a core's
    cache), all of them elsewhere (one launch per operation)."""
    n, c, h, w = x.shape
    if x.device.type != "cpu":
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
    work: torch.Tensor,
    blocks: torch.Tensor,
    forward: torch.Tensor,
    inverse: torch.Tensor,
    index: torch.Tensor,
    levels: Optional[torch.Tensor] = None,
) -> None:
    """Step 1 of ``work`` (N, C, H, W) into ``blocks`` (N * C, Hb * Wb * 64), block layout.

    Pad and block in one ``index_select`` (:func:`block_gather_index`), GEMM (into
    ``levels``, a scratch buffer shaped like ``blocks``, when given), round (in place), GEMM
    (into ``blocks``), clip (in place).
    """
    n, c, h, w = work.shape
    torch.index_select(work.reshape(n * c, h * w), 1, index, out=blocks)
    flat = blocks.view(-1, BLOCK * BLOCK)
    if levels is None:
        levels = torch.mm(flat, forward)
    else:
        levels = torch.mm(flat, forward, out=levels.view(-1, BLOCK * BLOCK))
    levels.round_()  # round(DCT(255 x) / Q)
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


def quantize_in_steps(
    work: torch.Tensor,
    forward: torch.Tensor,
    inverse: torch.Tensor,
    index: torch.Tensor,
    emit: Callable[[int, torch.Tensor], None],
) -> None:
    """Step 1 of every image of ``work`` (N, C, H, W), handed out step by step.

    ``emit(i, blocks)`` receives images ``i .. i + m - 1`` quantized and clipped, in the
    ``block_dct.to_blocks`` layout of the padded images, (m, C, Hb, Wb, 8, 8), in a buffer
    that the next step reuses: it must copy out what it needs. On the CPU the steps hold
    :func:`images_per_step` images and run on :func:`prepdefense.cpu_workers.map_image_ranges`
    workers (``emit`` is then called from several threads, for disjoint images); elsewhere
    there is one step.
    """
    n, c, h, w = work.shape
    hb, wb = -(-h // BLOCK), -(-w // BLOCK)
    step = images_per_step(work)

    def run(lo: int, hi: int) -> None:
        buffer, levels = work.new_empty(2, min(step, hi - lo) * c, index.numel()).unbind(0)
        for i in range(lo, hi, step):
            part = work[i : min(i + step, hi)]
            blocks = buffer[: part.shape[0] * c]
            quantize_into(part, blocks, forward, inverse, index, levels[: part.shape[0] * c])
            emit(i, blocks.view(part.shape[0], c, hb, wb, BLOCK, BLOCK))

    cpu_workers.map_image_ranges(run, n, work.device, multiple=step)


def dct_quantize(x: torch.Tensor, table: torch.Tensor, *, operators: Optional[Operators] = None) -> torch.Tensor:
    """Step 1 of the defense (paper Section 5.2; PROTOCOL.md "The defense g(x)").

    The 2-D DCT of every block is one GEMM with a 64x64 matrix (see
    :func:`quantization_operators`): the same map as ``block_dct.block_dct2d`` but with the
    255 scale and the division by ``Q`` folded in, so the pipeline is pad and block (one
    ``index_select``), GEMM, round (in place), GEMM (into the block buffer), clip (in place)
    (:func:`quantize_into`), then the crop back to the image layout
    (``block_dct.pixels_from_blocks``); on the CPU a few images per step, over the
    :mod:`~prepdefense.cpu_workers` (:func:`quantize_in_steps`). Rounding is ``torch.round``:
    half to even, as ``numpy.round``. Runs under ``no_grad``: rounding has zero gradient
    almost everywhere, so attacks need BPDA or a surrogate.

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
    with torch.no_grad():
        work, forward, inverse, index = prepare(x, table, operators)
        out = work.new_empty(work.shape)  # a new buffer: never aliases x

        def emit(i: int, blocks: torch.Tensor) -> None:
            pixels_from_blocks(blocks, None, None, out[i : i + blocks.shape[0]])

        quantize_in_steps(work, forward, inverse, index, emit)
        return out.to(x.dtype)


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

"""Step 1 of the defense: 8x8 block-DCT quantization (paper Section 5.2, Algorithm 1 lines 4-9).

PROTOCOL.md "The defense g(x)", Step 1: work in the 0..255 domain of each channel, pad H
and W up to multiples of 8 by reflection, orthonormal 2-D DCT-II of every 8x8 block,
``round(coef / Q) * Q``, inverse DCT, crop the padding, divide by 255, clip to [0, 1].

Registers ``dct-quant`` (``table='default'``: the shipped learned table, else FD) and
``fd`` (Feature Distillation of the paper's released code: Step 1 with the FD table).

How it is computed: the padded images are copied into the *plane layout*
(``block_dct.to_planes``: position ``(i, j)`` of every block in one contiguous ``Hb x Wb``
plane), in one ``index_select`` that also does the padding (:func:`pad_plane_index`). The
2-D DCT is then two 1-D transforms, each a batched product with 8x8 matrices over long
contiguous rows, with the 255 scale and the table ``Q`` folded into the matrices
(:func:`quantization_operators`); then rounding, the two inverse 1-D transforms and the clip.
That is 32 multiply-adds per pixel where one 64x64 matrix per block takes 128. On the CPU a
few images at a time, spread over single-threaded workers (:func:`quantize_and_read`).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .. import cpu_workers
from ._registry import register
from .base import Defense
from .block_dct import (
    BLOCK,
    dct_matrix,
    pixels_from_planes,
    read_rows_then_columns,
    row_buffer,
    row_then_column_indices,
)
from .quant_tables import TableSpec, resolve_table

__all__ = [
    "dct_quantize",
    "quantize_and_read",
    "quantize_into",
    "batch_operators",
    "pad_plane_index",
    "images_per_step",
    "quantization_operators",
    "DCTQuantize",
]

#: ``(rows_forward, cols_forward, cols_inverse, rows_inverse)``, see :func:`quantization_operators`.
Operators = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def quantization_operators(table: torch.Tensor, dtype: torch.dtype = torch.float32, device=None) -> Operators:
    """The four matrices of Step 1 in the plane layout, the table folded in.

    With ``D`` the orthonormal DCT-II matrix and ``x[i, j]`` a block (0..1 values),
    ``DCT(255 x)[k, l] / Q[k, l] = sum_j D[l, j] / Q[k, l] * sum_i 255 D[k, i] x[i, j]`` and
    ``IDCT(L * Q)[i, j] / 255 = sum_k D[k, i] / 255 * sum_l D[l, j] Q[k, l] L[k, l]``:

    - ``rows_forward = 255 D`` (8k x 8i): ``t[k, j] = sum_i rows_forward[k, i] x[i, j]``;
    - ``cols_forward[k] = D / Q[k, :, None]`` (8k x 8l x 8j): the second transform, one
      matrix per vertical frequency ``k``, giving ``DCT(255 x) / Q``;
    - ``cols_inverse[k] = (D * Q[k, :, None]).T`` (8k x 8j x 8l): ``u[k, j] = sum_l
      cols_inverse[k, j, l] L[k, l]``, the levels times ``Q`` transformed along ``l``;
    - ``rows_inverse = D.T / 255`` (8i x 8k): ``x[i, j] = sum_k rows_inverse[i, k] u[k, j]``.

    Built in float64, then cast to ``dtype`` on ``device``.
    """
    d = dct_matrix(BLOCK, dtype=torch.float64)
    q = table.detach().to(device="cpu", dtype=torch.float64).reshape(BLOCK, BLOCK)
    rows_forward = 255.0 * d
    cols_forward = d.unsqueeze(0) / q.unsqueeze(2)
    cols_inverse = (d.unsqueeze(0) * q.unsqueeze(2)).transpose(1, 2)
    rows_inverse = d.t() / 255.0
    return tuple(
        m.to(dtype=dtype, device=device).contiguous() for m in (rows_forward, cols_forward, cols_inverse, rows_inverse)
    )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


#: On the CPU, Step 1 runs a few images per step, at most about this many float32 values
#: (3 MB: two 299x299 RGB images) per step: the padding copy, the four transforms, the
#: rounding, the clip and the copy out (in ``dct-distort`` the remap) then work on data that
#: stays in one core's cache instead of streaming the whole batch through memory at every
#: pass. With several torch threads the steps are spread over single-threaded workers
#: (:mod:`prepdefense.cpu_workers`), each step starting at a multiple of the step size, so
#: every image is computed by the same calls whatever the batch and the number of workers.
CPU_STEP_ELEMENTS = 3 << 18


def images_per_step(x: torch.Tensor) -> int:
    """Images per step of Step 1: a few at a time on the CPU (a step's data fits in a core's
    cache), all of them elsewhere (one launch per operation)."""
    n, c, h, w = x.shape
    if x.device.type != "cpu":
        return max(n, 1)
    padded = c * (-(-h // BLOCK) * BLOCK) * (-(-w // BLOCK) * BLOCK)
    return max(1, CPU_STEP_ELEMENTS // max(padded, 1))


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
    as ``block_dct.pad_to_blocks``. Cached per size and device.
    """
    key = (h, w, str(torch.device(device) if device is not None else "cpu"))
    index = _INDEX_CACHE.get(key)
    if index is None:
        ph, pw = (-h) % BLOCK, (-w) % BLOCK
        reflect = ph < h and pw < w
        rows = _axis_pad_index(h, h + ph, reflect).view(-1, BLOCK).t()  # (8 i, Hb)
        cols = _axis_pad_index(w, w + pw, reflect).view(-1, BLOCK).t()  # (8 j, Wb)
        flat = rows[:, None, :, None] * w + cols[None, :, None, :]  # (8 i, 8 j, Hb, Wb)
        index = flat.reshape(-1).to(device)
        if len(_INDEX_CACHE) > 32:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = index
    return index


def batch_operators(operators: Operators, planes: int) -> Operators:
    """:func:`quantization_operators` repeated for ``planes`` image channels, contiguous, as
    ``torch.bmm`` takes them: (planes, 8, 8) for the transforms along rows and
    (planes * 8, 8, 8) for the per-frequency ones. The first ``m`` (``8 m``) entries serve
    any ``m <= planes``."""
    rows_forward, cols_forward, cols_inverse, rows_inverse = operators
    per_plane = lambda op: op.expand(planes, *op.shape).reshape(-1, BLOCK, BLOCK).contiguous()  # noqa: E731
    return per_plane(rows_forward), per_plane(cols_forward), per_plane(cols_inverse), per_plane(rows_inverse)


class _Step:
    """Step 1 for ``m`` image channels (planes) at a time: the buffers' views and the
    operators sliced to ``m`` made once, so that running a step is seven torch calls.
    ``operators`` come from :func:`batch_operators` for at least ``m`` planes."""

    def __init__(self, planes: torch.Tensor, scratch: torch.Tensor, operators: Operators, index: torch.Tensor) -> None:
        m = planes.shape[0]
        rows_forward, cols_forward, cols_inverse, rows_inverse = operators
        self.rows_forward, self.rows_inverse = rows_forward[:m], rows_inverse[:m]
        self.cols_forward, self.cols_inverse = cols_forward[: m * BLOCK], cols_inverse[: m * BLOCK]
        by_row, by_freq = (m, BLOCK, -1), (m * BLOCK, BLOCK, -1)  # (plane, i or k, rest), (plane and k, j or l, Hb * Wb)
        self.planes, self.index = planes, index
        self.planes_by_row, self.planes_by_freq = planes.view(by_row), planes.view(by_freq)
        self.scratch_by_row, self.scratch_by_freq = scratch.view(by_row), scratch.view(by_freq)

    def __call__(self, channels: torch.Tensor) -> None:
        """``channels``: (m, H * W), the input's channels flattened."""
        torch.index_select(channels, 1, self.index, out=self.planes)
        torch.bmm(self.rows_forward, self.planes_by_row, out=self.scratch_by_row)
        torch.bmm(self.cols_forward, self.scratch_by_freq, out=self.planes_by_freq)
        self.planes.round_()  # round(DCT(255 x) / Q)
        torch.bmm(self.cols_inverse, self.planes_by_freq, out=self.scratch_by_freq)
        torch.bmm(self.rows_inverse, self.scratch_by_row, out=self.planes_by_row)  # IDCT(levels * Q) / 255
        self.planes.clamp_(0.0, 1.0)


def quantize_into(
    work: torch.Tensor, planes: torch.Tensor, scratch: torch.Tensor, operators: Operators, index: torch.Tensor
) -> None:
    """Step 1 of ``work`` (N, C, H, W) into ``planes`` (N * C, 64 * Hb * Wb), plane layout.

    Pad and change layout in one ``index_select`` (:func:`pad_plane_index`); the two forward
    1-D transforms (along ``i``, then along ``j`` with ``1/Q``); round (in place); the two
    inverse ones (along ``l`` with ``Q``, then along ``k``); clip (in place). ``scratch`` is
    a buffer shaped like ``planes``; ``operators`` come from :func:`batch_operators` for at
    least ``N * C`` planes. Rounding is ``torch.round``: half to even, as ``numpy.round``.
    """
    n, c, h, w = work.shape
    _Step(planes, scratch, operators, index)(work.reshape(n * c, h * w))


def prepare(x: torch.Tensor, table: torch.Tensor, operators: Optional[Operators]):
    """``(work, operators, index)``: the input in the compute dtype, the operators on its
    device and the :func:`pad_plane_index` of its size."""
    # Step 1 is never on the autograd graph (rounding has no useful gradient; BPDA supplies
    # one): a detached input keeps every in-place and ``out=`` call below legal whichever
    # thread runs it (grad mode is per thread, so a caller's ``no_grad`` does not reach the
    # cpu_workers threads).
    work = x.detach().to(compute_dtype(x))
    if operators is None:
        operators = quantization_operators(table, work.dtype, work.device)
    operators = tuple(m.to(dtype=work.dtype, device=work.device) for m in operators)
    return work, operators, pad_plane_index(work.shape[-2], work.shape[-1], work.device)


def quantize_and_read(
    work: torch.Tensor,
    operators: Operators,
    index: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    cols: Optional[torch.Tensor] = None,
    *,
    per_image: Optional[bool] = None,
) -> torch.Tensor:
    """Step 1 of every image of ``work``, read back as ``out[n, c, p, q] =
    quantized[n, c, rows[n, p], cols[n, q]]`` (``None``: the crop to the input's size;
    ``dct-distort`` passes Algorithm 3's maps, so the remap reads straight from Step 1's
    planes).

    On the CPU (``per_image``, the default there) the images go a few at a time
    (:func:`images_per_step`) through :func:`quantize_into` and, image by image,
    ``block_dct.read_rows_then_columns``, on :func:`prepdefense.cpu_workers.map_steps`
    workers: a step's data stays in one core's cache from the padding copy to the output.
    Every view and index a step needs is made before the loop, so that a step is the copies
    and products alone: each torch call lets go of Python's lock and takes it back,
    and two workers wait for each other at every one of them. Elsewhere: one step and one
    batched gather (``block_dct.pixels_from_planes``).

    Shape:
        work: (N, C, H, W); rows: (N, H) or None; cols: (N, W) or None; output like ``work``.
    """
    n, c, h, w = work.shape
    hb, wb = -(-h // BLOCK), -(-w // BLOCK)
    out = work.new_empty(work.shape)  # a new buffer: never aliases the input
    if out.numel() == 0:
        return out
    arange = torch.arange(max(h, w), device=work.device)
    rows = arange[:h].expand(n, h) if rows is None else rows
    cols = arange[:w].expand(n, w) if cols is None else cols
    if per_image is None:
        per_image = work.device.type == "cpu"
    if not per_image:
        planes, scratch = work.new_empty(2, n * c, index.numel()).unbind(0)
        quantize_into(work, planes, scratch, batch_operators(operators, n * c), index)
        return pixels_from_planes(planes.view(n, c, BLOCK, BLOCK, hb, wb), rows, cols, out)
    runs, columns = (t.unbind(0) for t in row_then_column_indices(rows, cols, hb, wb))
    outputs = out.view(n, c * h, w).unbind(0)
    step = images_per_step(work)

    channels = work.reshape(n * c, h * w).split(step * c)  # one entry per step

    def make_runner():
        images = min(step, n)
        planes, scratch = work.new_empty(2, images * c, index.numel()).unbind(0)
        line = row_buffer(work, c, h, wb)
        batched = batch_operators(operators, images * c)
        full = _Step(planes, scratch, batched, index)
        per_image_planes = [p.view(c, -1, wb) for p in planes.view(images, -1).unbind(0)]

        def run(lo: int, hi: int) -> None:
            part = channels[lo // step]
            m = hi - lo
            (full if m == images else _Step(planes[: m * c], scratch[: m * c], batched, index))(part)
            for k in range(m):
                read_rows_then_columns(per_image_planes[k], runs[lo + k], columns[lo + k], line, outputs[lo + k])

        return run

    cpu_workers.map_steps(make_runner, n, work.device, step=step)
    return out


def dct_quantize(x: torch.Tensor, table: torch.Tensor, *, operators: Optional[Operators] = None) -> torch.Tensor:
    """Step 1 of the defense (paper Section 5.2; PROTOCOL.md "The defense g(x)").

    Pad and change layout, two 1-D transforms, round, two inverse transforms, clip
    (:func:`quantize_into`), then the crop back to the image layout; on the CPU a few
    images per step, over the :mod:`~prepdefense.cpu_workers` (:func:`quantize_and_read`).
    Runs under ``no_grad``: rounding has zero gradient almost everywhere, so attacks need
    BPDA or a surrogate.

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
        work, operators, index = prepare(x, table, operators)
        return quantize_and_read(work, operators, index).to(x.dtype)


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


register("dct-quant", help="Step 1 of the paper's defense: 8x8 DCT quantization (table='default')")(DCTQuantize)
register("fd", help="Feature Distillation (released-code FD table): 8x8 DCT quantization", fixed={"table": "fd"})(DCTQuantize)

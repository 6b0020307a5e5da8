"""Step 1's fast path: 8x8 block-DCT quantization, then a read of chosen pixels (paper
Section 5.2, Algorithm 1 lines 4-9; in ``dct-distort`` also Algorithm 3's remap).

One entry point, :func:`quantize_and_read`. ``kernels/dct_quant_reference.py`` computes the
same function in a few plain lines; ``tests/test_dct_quant_kernel.py`` holds the two equal.
Everything below is about speed (each choice measured, ``benchmarks/RESULTS.md``):

1. **Plane layout** (``kernels/planes.py``): the padded image is copied, in one
   ``index_select`` that also pads, so that each of the 64 positions of a block has its own
   contiguous plane.
2. **Two 1-D transforms each way** (:func:`quantization_operators`): each an 8x8 matrix applied
   over long rows by ``bmm``, with the 255 scale and ``1/Q`` (then ``Q``) folded into the
   matrices: 32 multiply-adds per pixel where one 64x64 matrix per block takes 128.
3. **The read as two copies** (``planes.read_rows_then_columns``): rows as runs of ``Wb``
   values, then columns within the rebuilt rows, instead of a ``gather`` over every pixel.
4. **Steps of a few images on single-threaded workers** (:mod:`prepdefense.cpu_workers`): a
   step's data stays in one core's cache from the padding copy to the output, with no barrier
   between calls. Every image goes through the same calls whatever the batch or the number of
   workers, so the output does not depend on them.
5. **Few torch calls per step**: every view, buffer and operator a step needs is made before
   the loop (:class:`_Step`); each torch call lets go of Python's lock and takes it back, so
   the workers wait for each other at every one.

Off the CPU the whole batch is one step and the read one ``gather`` (``planes.pixels_from_planes``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ... import cpu_workers
from ...validation import check_value_range, unit_interval_bits
from ..block_dct import BLOCK, dct_matrix
from .planes import pad_plane_index, pixels_from_planes, read_rows_then_columns, row_buffer, row_then_column_indices

__all__ = ["quantize_and_read", "quantization_operators", "compute_dtype", "Operators"]

#: ``(rows_forward, cols_forward, cols_inverse, rows_inverse)``, see :func:`quantization_operators`.
Operators = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype Step 1 computes in: the input's, float32 for half precision."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


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


def _batch_operators(operators: Operators, planes: int) -> Operators:
    """:func:`quantization_operators` repeated for ``planes`` image channels, contiguous, as
    ``torch.bmm`` takes them: (planes, 8, 8) for the transforms along rows and
    (planes * 8, 8, 8) for the per-frequency ones. The first ``m`` (``8 m``) entries serve
    any ``m <= planes``."""
    return tuple(op.expand(planes, *op.shape).reshape(-1, BLOCK, BLOCK).contiguous() for op in operators)


class _Step:
    """Step 1 for ``m`` image channels at a time, into ``planes`` (m, 64 * Hb * Wb) in the
    plane layout; the views and the operators sliced to ``m`` are made once, so that running
    a step is seven torch calls. ``operators`` come from :func:`_batch_operators` for at
    least ``m`` planes; ``scratch`` is a buffer shaped like ``planes``."""

    def __init__(self, planes: torch.Tensor, scratch: torch.Tensor, operators: Operators, index: torch.Tensor,
                 extremes: Optional[torch.Tensor] = None) -> None:
        m = planes.shape[0]
        self.extremes = extremes
        rows_forward, cols_forward, cols_inverse, rows_inverse = operators
        self.rows_forward, self.rows_inverse = rows_forward[:m], rows_inverse[:m]
        self.cols_forward, self.cols_inverse = cols_forward[: m * BLOCK], cols_inverse[: m * BLOCK]
        by_row, by_freq = (m, BLOCK, -1), (m * BLOCK, BLOCK, -1)  # (plane, i or k, rest), (plane and k, j or l, Hb * Wb)
        self.planes, self.index = planes, index
        self.planes_by_row, self.planes_by_freq = planes.view(by_row), planes.view(by_freq)
        self.scratch_by_row, self.scratch_by_freq = scratch.view(by_row), scratch.view(by_freq)

    def __call__(self, channels: torch.Tensor, slot: int = 0) -> None:
        """``channels``: (m, H * W), the input's channels flattened; with ``extremes`` (an
        integer tensor, see :func:`~prepdefense.validation.unit_interval_bits`), the minimum and
        maximum of the copy read as integers go to ``extremes[:, slot]`` (one integer
        reduction on data in cache, no Python in between). Rounding is ``torch.round``: half to even, as ``numpy.round``."""
        torch.index_select(channels, 1, self.index, out=self.planes)  # pad, plane layout
        if self.extremes is not None:
            torch.aminmax(self.planes.view(self.extremes.dtype), out=(self.extremes[0, slot], self.extremes[1, slot]))
        torch.bmm(self.rows_forward, self.planes_by_row, out=self.scratch_by_row)  # along i
        torch.bmm(self.cols_forward, self.scratch_by_freq, out=self.planes_by_freq)  # along j, / Q
        self.planes.round_()  # round(DCT(255 x) / Q)
        torch.bmm(self.cols_inverse, self.planes_by_freq, out=self.scratch_by_freq)  # * Q, along l
        torch.bmm(self.rows_inverse, self.scratch_by_row, out=self.planes_by_row)  # along k: IDCT(levels * Q) / 255
        self.planes.clamp_(0.0, 1.0)


def quantize_and_read(
    x: torch.Tensor,
    table: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    cols: Optional[torch.Tensor] = None,
    *,
    operators: Optional[Operators] = None,
    workers: Optional[cpu_workers.CPUWorkers] = None,
    batched: Optional[bool] = None,
    check_values: bool = False,
) -> torch.Tensor:
    """Step 1 of every image of ``x``, read back at chosen pixels:
    ``out[n, c, p, q] = S1(x)[n, c, rows[n, p], cols[n, q]]`` with
    ``S1(x) = clip(IDCT(round(DCT(255 x) / Q) * Q) / 255, 0, 1)`` over the 8x8 blocks of ``x``
    reflection-padded to multiples of 8 (replicated when a pad is not smaller than its side).
    ``rows``/``cols`` ``None``: the crop back to the input's size; ``dct-distort`` passes
    Algorithm 3's maps, so the remap reads straight from Step 1's output.

    Never on the autograd graph: the input is detached and the work runs under ``no_grad``
    (rounding has no useful gradient; BPDA supplies one).

    Args:
        x: images in [0, 1]; half precision is computed in float32.
        table: the 8x8 quantization table ``Q`` (0..255 domain).
        rows, cols: source row / column of every output row / column, per image.
        operators: :func:`quantization_operators` of ``table``, to skip building them.
        workers: the :class:`~prepdefense.cpu_workers.CPUWorkers` that split the batch into
            steps and run them (default: ``cpu_workers.current()``). The output does not
            depend on it.
        batched: ``True``: one step and one ``gather`` (the path off the CPU); ``False``:
            steps, image by image reads (the CPU path); ``None``: by the device.
        check_values: check the input's values as :func:`prepdefense.validation.check_value_range`
            does (finite, in [0, 1] up to the tolerance; the result of the clamped input within
            it), from each step's copy while it is in cache (one ``aminmax`` per step) instead
            of a separate pass over ``x``; a bad value raises ``ValueError``. The copy is
            read as integers (:func:`~prepdefense.validation.unit_interval_bits`); only an
            input that is not in [0, 1] takes the float check.

    Returns:
        A new tensor of the shape, dtype and device of ``x``.

    Shape:
        x: (N, C, H, W); rows: (N, H) or None; cols: (N, W) or None.
    """
    with torch.no_grad():
        work = x.detach().to(compute_dtype(x))
        n, c, h, w = work.shape
        out = work.new_empty(work.shape)  # a new buffer: never aliases the input
        if out.numel() == 0:
            return out.to(x.dtype)
        if operators is None:
            operators = quantization_operators(table, work.dtype, work.device)
        operators = tuple(m.to(dtype=work.dtype, device=work.device) for m in operators)
        index = pad_plane_index(h, w, work.device)
        arange = torch.arange(max(h, w), device=work.device)
        rows = arange[:h].expand(n, h) if rows is None else rows
        cols = arange[:w].expand(n, w) if cols is None else cols
        if batched is None:
            batched = work.device.type != "cpu"
        extremes = None
        int_dtype, one = unit_interval_bits(work.dtype)
        if batched:
            extremes = work.new_empty(2, 1, dtype=int_dtype) if check_values else None
            _quantize_batched(work, operators, index, rows, cols, out, extremes)
        else:
            workers = workers or cpu_workers.current()
            steps = -(-n // workers.images_per_step(c * index.numel()))
            extremes = work.new_empty(2, steps, dtype=int_dtype) if check_values else None
            _quantize_in_steps(work, operators, index, rows, cols, out, workers, extremes)
        outside = extremes is not None and (int(extremes[0].min()) < 0 or int(extremes[1].max()) > one)
        if outside and check_value_range(x):
            # values a rounding step outside [0, 1] (rare): the result of the clamped input
            return quantize_and_read(x.detach().clamp(0.0, 1.0), table, rows, cols, operators=operators,
                                     workers=workers, batched=batched)
        return out.to(x.dtype)


def _quantize_batched(work, operators, index, rows, cols, out, extremes: Optional[torch.Tensor] = None) -> None:
    """The whole batch as one step, then one gather."""
    n, c, h, w = work.shape
    planes, scratch = work.new_empty(2, n * c, index.numel()).unbind(0)
    _Step(planes, scratch, _batch_operators(operators, n * c), index, extremes)(work.reshape(n * c, h * w))
    pixels_from_planes(planes.view(n, c, BLOCK, BLOCK, -(-h // BLOCK), -(-w // BLOCK)), rows, cols, out)


def _quantize_in_steps(work, operators, index, rows, cols, out, workers: cpu_workers.CPUWorkers,
                       extremes: Optional[torch.Tensor] = None) -> None:
    """A few images per step (``workers.images_per_step``), steps spread over ``workers``;
    each worker makes its buffers once and runs a step as :class:`_Step`'s calls and two
    copies per image."""
    n, c, h, w = work.shape
    wb = -(-w // BLOCK)
    step = workers.images_per_step(c * index.numel())  # index: one entry per padded pixel
    runs, columns = (t.unbind(0) for t in row_then_column_indices(rows, cols, -(-h // BLOCK), wb))
    outputs = out.view(n, c * h, w).unbind(0)
    channels = work.reshape(n * c, h * w).split(step * c)  # one entry per step

    def make_runner():
        images = min(step, n)
        planes, scratch = work.new_empty(2, images * c, index.numel()).unbind(0)
        line = row_buffer(work, c, h, wb)
        batched = _batch_operators(operators, images * c)
        full = _Step(planes, scratch, batched, index, extremes)
        image_planes = [p.view(c, -1, wb) for p in planes.view(images, -1).unbind(0)]

        def run(lo: int, hi: int) -> None:
            m = hi - lo
            (full if m == images else _Step(planes[: m * c], scratch[: m * c], batched, index, extremes))(channels[lo // step], lo // step)
            for k in range(m):
                read_rows_then_columns(image_planes[k], runs[lo + k], columns[lo + k], line, outputs[lo + k])

        return run

    workers.map_steps(make_runner, n, work.device, step=step)

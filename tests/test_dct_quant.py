"""Step 1 (8x8 DCT quantization) against SciPy, and dct-distort against the benchmark references.

Paper Section 5.2; PROTOCOL.md "The defense g(x)"; issue 3 items 2 and 4.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import torch
from PIL import Image

from prepdefense import defenses
from prepdefense.defenses import quant_tables
from prepdefense.defenses.block_dct import block_dct2d, block_idct2d, from_blocks, pad_to_blocks, to_blocks
from prepdefense.defenses.dct_distort import DCTDistort
from prepdefense.defenses.dct_quant import DCTQuantize, dct_quantize, quantization_operators
from prepdefense.defenses.grid_distort import index_maps, sample_grid_params
from prepdefense.draws import Params
from prepdefense.defenses.quant_tables import FD_TABLE, JPEG_LUMA_Q50
from prepdefense.seeding import make_generator

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def reference_quantize(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Step 1 block by block with scipy.fft.dctn/idctn (numpy.round: half to even)."""
    n, c, h, w = x.shape
    ph, pw = (-h) % 8, (-w) % 8
    padded = np.pad(x * 255.0, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect")
    out = np.empty_like(padded)
    for i in range(n):
        for ch in range(c):
            for r in range(0, padded.shape[2], 8):
                for s in range(0, padded.shape[3], 8):
                    coef = scipy.fft.dctn(padded[i, ch, r : r + 8, s : s + 8], norm="ortho")
                    coef = np.round(coef / table) * table
                    out[i, ch, r : r + 8, s : s + 8] = scipy.fft.idctn(coef, norm="ortho")
    return np.clip(out[:, :, :h, :w] / 255.0, 0.0, 1.0)


def test_block_dct_matches_scipy():
    blocks = torch.rand(5, 3, 8, 8, dtype=torch.float64, generator=make_generator(0)) * 255
    ours = block_dct2d(blocks).numpy()
    ref = scipy.fft.dctn(blocks.numpy(), axes=(-2, -1), norm="ortho")
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    np.testing.assert_allclose(block_idct2d(torch.from_numpy(ref)).numpy(), blocks.numpy(), atol=1e-9)


def test_quantization_operators_are_the_block_dct_with_the_table_folded_in():
    """Applied as in the kernel (along i, then j; then l, then k), the four operators give
    ``DCT(255 x) / Q`` and ``IDCT(L * Q) / 255`` of every block, checked against SciPy with
    a table of distinct entries (so a transposed table would fail)."""
    table = 10.0 + torch.arange(64, dtype=torch.float64).reshape(8, 8)
    rows_f, cols_f, cols_i, rows_i = quantization_operators(table, torch.float64)
    blocks = torch.rand(7, 8, 8, dtype=torch.float64, generator=make_generator(1))  # (m, i, j)
    planes = blocks.permute(1, 2, 0)  # (i, j, m): the plane layout of 7 blocks
    coefs = torch.matmul(cols_f, torch.matmul(rows_f, planes.reshape(8, -1)).view(8, 8, 7))  # (k, l, m)
    ref = scipy.fft.dctn(255.0 * blocks.numpy(), axes=(-2, -1), norm="ortho") / table.numpy()
    np.testing.assert_allclose(coefs.permute(2, 0, 1).numpy(), ref, atol=1e-9)
    levels = torch.rand(7, 8, 8, dtype=torch.float64, generator=make_generator(2)) * 20 - 10
    pixels = torch.matmul(rows_i, torch.matmul(cols_i, levels.permute(1, 2, 0)).reshape(8, -1)).view(8, 8, 7)
    ref = scipy.fft.idctn(levels.numpy() * table.numpy(), axes=(-2, -1), norm="ortho") / 255.0
    np.testing.assert_allclose(pixels.permute(2, 0, 1).numpy(), ref, atol=1e-12)


def test_padding_is_reflection():
    x = torch.arange(2 * 11 * 13, dtype=torch.float64).reshape(1, 2, 11, 13)
    padded, size = pad_to_blocks(x)
    assert size == (11, 13) and padded.shape[-2:] == (16, 16)
    np.testing.assert_array_equal(padded.numpy(), np.pad(x.numpy(), ((0, 0), (0, 0), (0, 5), (0, 3)), mode="reflect"))
    assert torch.equal(from_blocks(to_blocks(padded)), padded)


@pytest.mark.parametrize("shape", [(2, 3, 32, 40), (1, 3, 299, 299), (2, 1, 13, 21), (1, 3, 9, 8)])
@pytest.mark.parametrize("table_name", ["fd", "jpeg50"])
def test_dct_quantize_matches_per_block_scipy_reference(shape, table_name):
    table, _ = quant_tables.resolve_table(table_name)
    x = torch.rand(*shape, dtype=torch.float64, generator=make_generator(2))
    ours = dct_quantize(x, table)
    assert ours.shape == x.shape and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), reference_quantize(x.numpy(), table.numpy()), atol=1e-9)


def test_float32_agrees_with_reference_except_rare_rounding_ties():
    x = torch.rand(2, 3, 64, 64, generator=make_generator(3))
    ours = dct_quantize(x, FD_TABLE).numpy()
    ref = reference_quantize(x.numpy().astype(np.float64), FD_TABLE.numpy())
    block_error = np.abs(ours - ref).reshape(2, 3, 8, 8, 8, 8).max(axis=(3, 5))
    # float32 can put a coefficient on the other side of a .5 rounding boundary, which
    # changes its whole 8x8 block; that must stay rare, and every other block exact
    flipped = block_error > 1e-5
    assert flipped.mean() < 0.01, flipped.mean()
    assert block_error[~flipped].max() < 1e-5


def test_batch_equals_one_by_one_and_input_untouched():
    x = torch.rand(4, 3, 45, 61, generator=make_generator(4))
    x_copy = x.clone()
    batch = dct_quantize(x, FD_TABLE)
    assert torch.equal(x, x_copy)
    single = torch.cat([dct_quantize(x[i : i + 1], FD_TABLE) for i in range(4)])
    assert torch.equal(batch, single)
    y = torch.rand(1, 1, 8, 8, generator=make_generator(5))  # block layout could alias the input
    y_copy = y.clone()
    dct_quantize(y, FD_TABLE)
    assert torch.equal(y, y_copy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtype_and_range_kept(dtype):
    x = torch.rand(2, 3, 20, 27, generator=make_generator(6)).to(dtype)
    out = defenses.create("fd")(x)
    assert out.dtype == dtype and out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    x = torch.rand(2, 3, 299, 299, generator=make_generator(7))
    fd = defenses.create("fd")
    cpu = fd(x)
    gpu = fd.to("cuda")(x.cuda())
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().gt(1e-4).float().mean() < 1e-3


def test_tiny_images_are_handled():
    x = torch.rand(1, 3, 3, 5, generator=make_generator(8))
    out = dct_quantize(x, FD_TABLE)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_fd_and_jpeg_tables():
    fd = FD_TABLE.numpy()
    assert fd.shape == (8, 8)
    assert (fd[:4, :4] == 25).all() and (fd[4:, :] == 30).all() and (fd[:, 4:] == 30).all()
    # the JPEG table is the one Pillow's libjpeg writes at quality 50
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buf, "JPEG", quality=50)
    buf.seek(0)
    pillow_luma = np.array(Image.open(buf).quantization[0]).reshape(8, 8)
    np.testing.assert_array_equal(JPEG_LUMA_Q50.numpy(), pillow_luma)


def test_repr_names_the_table_source():
    assert "table=fd" in repr(defenses.create("fd"))
    assert "table=jpeg50" in repr(DCTQuantize(table="jpeg50"))
    _, default_source = quant_tables.default_table()
    assert default_source in repr(defenses.create("dct-quant"))
    assert default_source in repr(defenses.create("dct-distort"))
    if not quant_tables.LEARNED_TABLE_PATH.is_file():
        assert "fd (no learned table shipped yet)" in repr(defenses.create("dct-distort"))


def test_table_buffer_follows_module():
    q = DCTQuantize(table="fd")
    assert "table" in dict(q.named_buffers())
    assert q.double().table.dtype == torch.float64


def test_deterministic_and_flags():
    fd = defenses.create("fd")
    assert not fd.randomized and not fd.differentiable
    x = torch.rand(2, 3, 16, 16, generator=make_generator(9))
    assert torch.equal(fd(x), fd(x))


# ------------------------------------------------------------------------------ dct-distort


def test_dct_distort_is_distortion_of_quantization():
    d = defenses.create("dct-distort")
    assert d.randomized and not d.differentiable
    x = torch.rand(3, 3, 299, 299, generator=make_generator(10))
    params = d.sample_params(x, make_generator(11))
    fused = d.apply(x, params)
    assert torch.equal(fused, d.distort.apply(d.quantize.apply(x), params["distort"]))
    assert torch.equal(fused, d.apply_stages(x, params))
    assert torch.equal(d(x, generator=make_generator(11)), fused)


def test_dct_distort_parameters_switchable():
    d = defenses.create("dct-distort", table="jpeg50", delta=0.05, cells=4)
    assert "table=jpeg50" in repr(d) and d.distort.delta == 0.05 and d.distort.cells == 4
    x = torch.rand(1, 3, 40, 40, generator=make_generator(12))
    assert torch.equal(defenses.create("dct-distort", delta=0.0)(x), defenses.create("dct-quant")(x))


@pytest.fixture(scope="module")
def reference_impls():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import reference_impls as ref
    finally:
        sys.path.remove(str(BENCHMARKS))
    return ref


@pytest.mark.parametrize("shape", [(2, 3, 64, 72), (2, 3, 61, 45)])
def test_dct_distort_matches_numpy_and_paper_style_references(reference_impls, shape):
    """The benchmark's (a) per-image/cv2 and (b) vectorised NumPy versions agree with torch."""
    pytest.importorskip("cv2")
    ref = reference_impls
    g = make_generator(13)
    x = torch.rand(*shape, dtype=torch.float64, generator=g)
    params = sample_grid_params(shape[0], 0.15, 10, g)
    rf, cf, corner = params["row_factors"].numpy(), params["col_factors"].numpy(), params["corner"].numpy()
    rows, cols = index_maps(params, shape[2], shape[3])
    np.testing.assert_array_equal(ref.numpy_axis_maps(rf, corner >= 2, shape[2]), rows.numpy())
    np.testing.assert_array_equal(ref.numpy_axis_maps(cf, corner % 2 == 1, shape[3]), cols.numpy())
    for i in range(shape[0]):
        np.testing.assert_array_equal(ref.paper_style_axis_map(rf[i], corner[i] >= 2, shape[2]), rows[i].numpy())
    table = FD_TABLE
    ours = DCTDistort(table=table).apply(x, Params(distort=params)).numpy()
    np.testing.assert_allclose(ref.numpy_dct_quantize(x.numpy(), table.numpy()), dct_quantize(x, table).numpy(), atol=1e-9)
    np.testing.assert_allclose(ref.numpy_dct_distort(x.numpy(), table.numpy(), rf, cf, corner), ours, atol=1e-9)
    np.testing.assert_allclose(ref.paper_style_dct_distort(x.numpy(), table.numpy(), rf, cf, corner), ours, atol=1e-9)


@pytest.mark.parametrize("shape", [(5, 3, 299, 299), (3, 1, 21, 50)])
def test_cpu_steps_workers_and_batched_path_agree(shape):
    """Step 1 (and the whole defense) computed three ways give the same float32 output, bit
    for bit: inline in small steps, over two single-threaded CPU workers, and as the batched
    path that runs off the CPU (one step, one gather)."""
    from prepdefense.cpu_workers import CPUWorkers, use
    from prepdefense.defenses.kernels.dct_quant import quantize_and_read

    x = torch.rand(*shape, generator=make_generator(3))
    defense = defenses.create("dct-distort")
    params = defense.sample_params(x, make_generator(7))
    table = quant_tables.resolve_table("fd")[0]
    outputs = []
    for max_workers in (1, 2):
        with CPUWorkers(max_workers=max_workers) as workers, use(workers):
            outputs.append((defense.apply(x, params), dct_quantize(x, table)))
        assert workers.stats.most_steps > 1 or shape[-1] < 299  # the small-step path
        assert workers.stats.pooled_calls == (2 if max_workers == 2 and workers.stats.most_steps > 1 else 0)
    rows, cols = index_maps(params["distort"], shape[2], shape[3])
    batched = (
        quantize_and_read(x, defense.quantize.table, rows, cols, batched=True),
        quantize_and_read(x, table, batched=True),
    )
    for a, b, c in zip(*outputs, batched):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("shape", [(3, 2, 299, 299), (2, 1, 17, 40), (1, 3, 8, 8)])
def test_pixels_from_planes_per_image_equals_batched_and_reference(shape):
    """Both ways of reading pixels out of the plane layout (per image: row runs, then
    columns, ``read_rows_then_columns``; batched: one gather, ``pixels_from_planes``) equal
    indexing the padded image, for arbitrary (not only monotone) row and column maps and for
    the crop."""
    from prepdefense.defenses.kernels.planes import (
        from_planes,
        pixels_from_planes,
        read_rows_then_columns,
        row_buffer,
        row_then_column_indices,
        to_planes,
    )

    g = torch.Generator().manual_seed(5)
    n, c, h, w = shape
    image, _ = pad_to_blocks(torch.rand(*shape, generator=g))
    planes = to_planes(image).contiguous()
    assert torch.equal(from_planes(planes), image)
    hb, wb = planes.shape[-2:]
    random_maps = (torch.randint(0, h, (n, h), generator=g), torch.randint(0, w, (n, w), generator=g))
    crop = (torch.arange(h).expand(n, h), torch.arange(w).expand(n, w))
    for rows, cols in (random_maps, crop):
        expected = torch.stack([image[i][:, rows[i]][:, :, cols[i]] for i in range(n)])
        assert torch.equal(pixels_from_planes(planes, rows, cols, torch.empty(shape)), expected)
        runs, columns = row_then_column_indices(rows, cols, hb, wb)
        line, out = row_buffer(planes, c, h, wb), torch.empty(shape)
        for i in range(n):
            read_rows_then_columns(planes[i].reshape(c, -1, wb), runs[i], columns[i], line, out[i].view(c * h, w))
        assert torch.equal(out, expected)


def test_plane_indices_are_int32_while_they_fit_and_int64_beyond():
    """The padding and read indices are ``int32`` (``index_select`` is faster with them) as long
    as every offset fits, and ``int64`` past ``2**31 - 1``, so a huge image is never read
    through a wrapped-around offset."""
    from prepdefense.defenses.kernels.planes import index_dtype, pad_plane_index, row_then_column_indices

    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64
    assert pad_plane_index(17, 23).dtype == torch.int32
    runs, columns = row_then_column_indices(torch.arange(17)[None], torch.arange(23)[None], 3, 3)
    assert runs.dtype == columns.dtype == torch.int32

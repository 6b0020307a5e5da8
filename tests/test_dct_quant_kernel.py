"""Step 1's kernel: the fast path (``defenses/kernels/dct_quant.py``) equals the readable
reference (``defenses/kernels/dct_quant_reference.py``) on random tables, odd sizes, with and
without row/column maps, in one step and in several, on one worker and on two, and batched.

Paper Section 5.2; issue 9 item 6. The SciPy checks of Step 1 are in ``test_dct_quant.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prepdefense.cpu_workers import CPUWorkers, use
from prepdefense.defenses.grid_distort import index_maps, sample_grid_params
from prepdefense.defenses.kernels import dct_quant as fast
from prepdefense.defenses.kernels import dct_quant_reference as reference
from prepdefense.defenses.quant_tables import FD_TABLE
from prepdefense.seeding import make_generator

SHAPES = [(5, 3, 32, 40), (3, 2, 13, 21), (4, 1, 9, 8), (2, 3, 3, 5), (3, 3, 61, 45)]


@pytest.fixture(scope="module")
def configurations():
    """Every way the fast path can run a batch, as ``(name, keyword arguments)``: one step
    (the default size) or one image per step, on one worker or two, and the batched path."""
    made = {
        "one step, one worker": CPUWorkers(max_workers=1),
        "one step, two workers": CPUWorkers(max_workers=2),
        "an image per step, one worker": CPUWorkers(max_workers=1, step_elements=1),
        "an image per step, two workers": CPUWorkers(max_workers=2, step_elements=1),
    }
    configs = [(name, {"workers": workers, "batched": False}) for name, workers in made.items()]
    configs.append(("batched (off-CPU path)", {"batched": True}))
    yield configs
    for workers in made.values():
        workers.close()


def random_table(seed: int) -> torch.Tensor:
    """A table of distinct non-integer entries between 1 and 60 (small entries keep many
    coefficients, so rounding matters everywhere)."""
    return 1.0 + 59.0 * torch.rand(8, 8, dtype=torch.float64, generator=make_generator(seed))


def random_maps(shape, seed: int):
    """Arbitrary (not monotone) row and column maps into the image."""
    n, _, h, w = shape
    g = make_generator(seed)
    return torch.randint(0, h, (n, h), generator=g), torch.randint(0, w, (n, w), generator=g)


@pytest.fixture(params=[1, 2], ids=lambda t: f"torch_threads{t}")
def torch_threads(request):
    """The calling thread's torch thread count (what one inline worker computes with)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("maps", ["crop", "random maps", "grid distortion"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fast_path_equals_the_reference(shape, maps, configurations, torch_threads):
    seed = sum(shape)
    x = torch.rand(*shape, dtype=torch.float64, generator=make_generator(seed))
    table = random_table(seed)
    if maps == "crop":
        rows = cols = None
    elif maps == "random maps":
        rows, cols = random_maps(shape, seed)
    else:
        rows, cols = index_maps(sample_grid_params(shape[0], 0.15, 10, make_generator(seed)), *shape[2:])
    expected = reference.quantize_and_read(x, table, rows, cols)
    assert expected.shape == x.shape and expected.dtype == x.dtype
    first = None
    for name, kwargs in configurations:
        ours = fast.quantize_and_read(x, table, rows, cols, **kwargs)
        assert ours.shape == x.shape and ours.dtype == x.dtype, name
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9, msg=lambda m: f"{name}: {m}")
        first = ours if first is None else first
        assert torch.equal(ours, first), f"{name} differs from {configurations[0][0]}"  # bit for bit


@pytest.mark.parametrize("max_workers", [1, 2])
@pytest.mark.parametrize("step_elements,steps", [(None, 1), (1, 5)])
def test_the_configurations_take_one_step_or_several_inline_or_on_the_pool(max_workers, step_elements, steps):
    """The settings of :func:`configurations` really select one step or several, and the pool."""
    x = torch.rand(5, 3, 16, 16, generator=make_generator(0))
    settings = {} if step_elements is None else {"step_elements": step_elements}
    with CPUWorkers(max_workers=max_workers, **settings) as workers:
        fast.quantize_and_read(x, FD_TABLE, workers=workers)
    assert workers.stats.calls == 1 and workers.stats.most_steps == steps
    assert workers.stats.pooled_calls == (1 if steps > 1 and max_workers == 2 else 0)


def test_float32_equals_the_reference_except_rare_rounding_ties(configurations):
    """In float32 the two round the same coefficients except where one lands within float
    error of a .5 boundary, which changes that whole 8x8 block."""
    x = torch.rand(3, 3, 64, 48, generator=make_generator(1))
    table = random_table(1)
    expected = reference.quantize_and_read(x, table).numpy()
    for name, kwargs in configurations:
        ours = fast.quantize_and_read(x, table, **kwargs).numpy()
        block_error = np.abs(ours - expected).reshape(3, 3, 8, 8, 6, 8).max(axis=(3, 5))
        flipped = block_error > 1e-5
        assert flipped.mean() < 0.01, (name, flipped.mean())
        assert block_error[~flipped].max() < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    x = torch.rand(2, 3, 20, 27, generator=make_generator(2)).to(dtype)
    ours = fast.quantize_and_read(x, FD_TABLE, workers=CPUWorkers(max_workers=1))
    assert ours.dtype == dtype
    assert torch.equal(ours, fast.quantize_and_read(x.float(), FD_TABLE).to(dtype))


def test_never_on_the_autograd_graph_whatever_the_path(configurations):
    """Step 1 is never differentiated (BPDA supplies a gradient): an input that requires
    grad gives an output that does not, under grad mode, on every path."""
    x = torch.rand(4, 3, 16, 24, generator=make_generator(3)).requires_grad_(True)
    with torch.enable_grad():
        for name, kwargs in configurations:
            out = fast.quantize_and_read(x, FD_TABLE, **kwargs)
            assert not out.requires_grad and out.grad_fn is None, name
    assert x.grad is None


def test_input_untouched_and_output_new(configurations):
    x = torch.rand(3, 1, 8, 8, generator=make_generator(4))  # the plane layout could alias it
    copy = x.clone()
    for name, kwargs in configurations:
        out = fast.quantize_and_read(x, FD_TABLE, **kwargs)
        assert torch.equal(x, copy) and out.data_ptr() != x.data_ptr(), name


def test_empty_batch():
    x = torch.rand(0, 3, 10, 10)
    assert fast.quantize_and_read(x, FD_TABLE).shape == x.shape
    assert reference.quantize_and_read(x, FD_TABLE).shape == x.shape


def test_current_workers_are_used_when_none_are_given():
    x = torch.rand(3, 3, 16, 16, generator=make_generator(5))
    with CPUWorkers(max_workers=1, step_elements=1) as workers, use(workers):
        fast.quantize_and_read(x, FD_TABLE)
    assert workers.stats.calls == 1 and workers.stats.most_steps == 3

"""Random grid distortion (paper Section 5.3, Algorithm 3; PROTOCOL.md Step 2; issue 3 item 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prepdefense import defenses
from prepdefense.defenses.grid_distort import (
    GridDistort,
    grid_params,
    index_maps,
    pixel_statistics,
    sample_grid_params,
)
from prepdefense.seeding import make_generator

PAPER_DROPPED = "20-30%"
PAPER_MOVED = ">90%"


def numpy_axis_map(factors: np.ndarray, size: int) -> np.ndarray:
    """The module's interpretation (steps 1-4), written independently with ``np.interp``."""
    cells = len(factors)
    d = size // cells
    src = np.r_[np.arange(cells) * d, size].astype(float)
    bounds = np.r_[0.0, np.cumsum(np.diff(src) * factors)]
    bounds[-1] = max(bounds[-1], size)
    u = np.interp(np.arange(size) + 0.5, bounds, src)
    return np.clip(np.floor(u), 0, size - 1).astype(np.int64)


def numpy_statistics(row_map: np.ndarray, col_map: np.ndarray):
    h, w = len(row_map), len(col_map)
    dropped = 1 - len(np.unique(row_map)) * len(np.unique(col_map)) / (h * w)
    moved = 1 - (row_map == np.arange(h)).sum() * (col_map == np.arange(w)).sum() / (h * w)
    return dropped, moved


def simulate_statistics(delta: float, cells: int, size: int, draws: int, seed: int):
    """Independent simulation of the sampling distribution (NumPy RNG, np.interp maps)."""
    rng = np.random.default_rng(seed)
    out = np.empty((draws, 2))
    for i in range(draws):
        rows = numpy_axis_map(1 + rng.uniform(-delta, delta, cells), size)
        cols = numpy_axis_map(1 + rng.uniform(-delta, delta, cells), size)
        out[i] = numpy_statistics(rows, cols)  # the corner flips do not change either figure
    return out


@pytest.mark.parametrize("shape", [(2, 3, 299, 299), (3, 3, 224, 224), (2, 1, 37, 53)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_range_dtype_and_values_come_from_input(shape, dtype):
    x = torch.rand(*shape, generator=make_generator(0)).to(dtype)
    out = defenses.create("grid-distort")(x, generator=make_generator(1))
    assert out.shape == x.shape and out.dtype == dtype
    assert out.min() >= 0 and out.max() <= 1
    # nearest neighbour: every output value is one of the image's own values (per channel)
    for c in range(shape[1]):
        assert torch.isin(out[:, c], x[:, c]).all()


def test_same_generator_same_output_different_seeds_differ():
    d = defenses.create("grid-distort")
    x = torch.rand(4, 3, 299, 299, generator=make_generator(2))
    a = d(x, generator=make_generator(7))
    b = d(x, generator=make_generator(7))
    c = d(x, generator=make_generator(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert all(not torch.equal(a[i], c[i]) for i in range(4))


def test_batch_equals_one_by_one_with_same_params():
    d = GridDistort()
    x = torch.rand(5, 3, 120, 90, generator=make_generator(3))
    params = d.sample_params(x, make_generator(4))
    batch = d.apply(x, params)
    single = torch.cat([d.apply(x[i : i + 1], params.select(slice(i, i + 1))) for i in range(5)])
    assert torch.equal(batch, single)


def test_delta_zero_is_identity_for_every_corner():
    d = GridDistort(delta=0.0)
    x = torch.rand(8, 3, 299, 299, generator=make_generator(5))
    params = d.sample_params(x, make_generator(6))
    params["corner"] = torch.arange(8) % 4
    assert torch.equal(d.apply(x, params), x)
    dropped, moved = pixel_statistics(params, 299, 299)
    assert torch.all(dropped == 0) and torch.all(moved == 0)


def test_sampling_distribution_of_parameters():
    params = sample_grid_params(4000, 0.15, 10, make_generator(9))
    f = torch.cat([params["row_factors"], params["col_factors"]]).flatten()
    assert f.min() >= 0.85 and f.max() <= 1.15
    assert abs(float(f.mean()) - 1.0) < 4 * 0.15 / np.sqrt(3) / np.sqrt(f.numel())
    assert float(f.var()) == pytest.approx(0.15**2 / 3, rel=0.05)
    counts = torch.bincount(params["corner"], minlength=4).double()
    chi2 = float(((counts - 1000) ** 2 / 1000).sum())
    assert chi2 < 16.3  # 99.9% quantile of chi-square with 3 degrees of freedom
    assert abs(float(torch.corrcoef(torch.stack([params["row_factors"][:, 0], params["col_factors"][:, 0]]))[0, 1])) < 0.07


def test_maps_match_independent_formula_and_flips():
    params = sample_grid_params(64, 0.15, 10, make_generator(10))
    rows, cols = index_maps(params, 299, 223)
    for i in range(64):
        r = numpy_axis_map(params["row_factors"][i].numpy(), 299)
        c = numpy_axis_map(params["col_factors"][i].numpy(), 223)
        if params["corner"][i] >= 2:
            r = 298 - r[::-1]
        if params["corner"][i] % 2:
            c = 222 - c[::-1]
        np.testing.assert_array_equal(rows[i].numpy(), r)
        np.testing.assert_array_equal(cols[i].numpy(), c)
    assert bool((rows.diff(dim=1) >= 0).all()) and bool((cols.diff(dim=1) >= 0).all())
    assert rows.min() >= 0 and rows.max() <= 298 and cols.max() <= 222


def test_content_past_the_border_is_dropped():
    """All cells stretched by 1.15: the cumulative grid ends at 1.15 L, the tail is cut."""
    n, size = 1, 299
    factors = torch.full((n, 10), 1.15, dtype=torch.float64)
    params = grid_params(torch.zeros(n, dtype=torch.int64), factors, factors.clone())
    rows, _ = index_maps(params, size, size)
    assert rows[0, -1] == int((size - 0.5) / 1.15)  # the last output row shows source row 259
    dropped, _ = pixel_statistics(params, size, size)
    kept_rows = int(np.floor((size - 0.5) / 1.15)) + 1
    assert float(dropped[0]) == pytest.approx(1 - (kept_rows / size) ** 2)


def test_gradient_flows_through_the_gather():
    d = GridDistort()
    x = torch.rand(2, 3, 40, 40, generator=make_generator(11), requires_grad=True)
    out = d(x, generator=make_generator(12))
    out.sum().backward()
    assert d.differentiable and x.grad is not None
    assert float(x.grad.sum()) == pytest.approx(2 * 3 * 40 * 40)
    assert (x.grad == 0).any()  # dropped pixels get no gradient


def test_registry_parameters():
    d = defenses.create("grid-distort", delta=0.3, cells=5)
    assert d.delta == 0.3 and d.cells == 5 and d.randomized
    with pytest.raises(ValueError):
        GridDistort(delta=1.0)


def test_dropped_and_moved_pixel_fractions_at_delta_015():
    """Section 5.3's two figures on 299x299, measured over 200 draws of the torch defense and
    asserted against an independent simulation of the sampling distribution (not the paper)."""
    draws, size = 200, 299
    d = defenses.create("grid-distort")
    x = torch.zeros(draws, 1, size, size)
    dropped, moved = pixel_statistics(d.sample_params(x, make_generator(2024)), size, size)
    dropped, moved = dropped.numpy(), moved.numpy()
    sim = simulate_statistics(0.15, 10, size, draws=4000, seed=1)
    print(
        f"\n[grid-distort delta=0.15, 299x299, {draws} draws] dropped source pixels: "
        f"{dropped.mean():.1%} (sd {dropped.std():.1%}, simulated {sim[:, 0].mean():.1%}; paper {PAPER_DROPPED})"
        f"; moved output pixels: {moved.mean():.1%} (sd {moved.std():.1%}, simulated {sim[:, 1].mean():.1%}; "
        f"paper {PAPER_MOVED})"
    )
    for ours, ref in ((dropped, sim[:, 0]), (moved, sim[:, 1])):
        se = np.sqrt(ours.var() / len(ours) + ref.var() / len(ref))
        assert abs(ours.mean() - ref.mean()) < 4 * se, (ours.mean(), ref.mean(), se)
        assert 0.7 < ours.std() / ref.std() < 1.4
    # what the algorithm implies on its own terms: a sizeable fraction dropped, most pixels moved
    assert 0.05 < dropped.mean() < 0.15 and moved.mean() > 0.95

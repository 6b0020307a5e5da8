"""``pd`` (Pixel Deflection, PROTOCOL.md "Baseline defenses"): deflection step and wavelet step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.restoration import denoise_wavelet
from skimage.transform import resize

from prepdefense import seeding
from prepdefense.defenses import create, names
from prepdefense.defenses.pixel_deflection import (
    deflection_params,
    PixelDeflection,
    deflect_pixels,
    sample_deflections,
    wavelet_denoise,
)



# Tiny models: one torch thread avoids oversubscription (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _photos(n: int, size: int) -> torch.Tensor:
    which = ("astronaut", "chelsea", "coffee")[:n]
    return torch.stack(
        [torch.from_numpy(resize(getattr(skdata, w)(), (size, size), anti_aliasing=True)).permute(2, 0, 1) for w in which]
    ).float()


def test_registered_with_protocol_parameters():
    assert "pd" in names()
    d = create("pd")
    assert isinstance(d, PixelDeflection)
    assert (d.deflections, d.window, d.sigma) == (600, 10, 0.04)
    assert d.randomized and not d.differentiable


def test_deflection_changes_at_most_600_values_within_window():
    # random noise: every deflection from another pixel changes its target value
    x = torch.rand(4, 3, 64, 64, generator=seeding.make_generator(0))
    params = sample_deflections(x.shape, 600, 10, seeding.make_generator(1))
    out = deflect_pixels(x, params)
    changed = (out != x).reshape(4, -1).sum(dim=1)
    assert (changed <= 600).all()
    # targets collide and some sources equal their target, but most deflections do change a value
    assert (changed > 450).all(), changed
    # 200 per channel for RGB (the channel cycles as in the authors' code)
    for c in range(3):
        assert int((params["channel"] == c).sum(dim=1)[0]) == 200
    # sources inside the image and within the window of their target
    assert (params["source_row"] - params["target_row"]).abs().max() <= 10
    assert (params["source_col"] - params["target_col"]).abs().max() <= 10
    assert params["source_row"].min() >= 0 and params["source_row"].max() <= 63
    assert params["source_col"].min() >= 0 and params["source_col"].max() <= 63
    # every changed value is a copy of a value present in that channel before (no new values)
    for i in range(4):
        for c in range(3):
            mask = out[i, c] != x[i, c]
            assert torch.isin(out[i, c][mask], x[i, c].flatten()).all()
    assert torch.equal(x, x.clone())  # input untouched (no in-place)


def test_deflections_are_sequential():
    x = torch.arange(16.0).reshape(1, 1, 4, 4) / 16
    params = deflection_params(
        channel=torch.tensor([[0, 0]]),
        target_row=torch.tensor([[0, 1]]),
        target_col=torch.tensor([[0, 1]]),
        source_row=torch.tensor([[2, 0]]),
        source_col=torch.tensor([[2, 0]]),
    )
    out = deflect_pixels(x, params)
    # the second deflection copies the value the first one wrote
    assert out[0, 0, 0, 0] == x[0, 0, 2, 2] and out[0, 0, 1, 1] == x[0, 0, 2, 2]
    assert int((out != x).sum()) == 2


def test_target_and_offset_distribution():
    params = sample_deflections((1, 3, 299, 299), 60000, 10, seeding.make_generator(4))
    # targets uniform over rows: mean 149, sd of the mean 86/sqrt(60000) ~ 0.35
    assert abs(params["target_row"].double().mean().item() - 149.0) < 2.0
    interior = (params["target_row"] >= 10) & (params["target_row"] <= 288)
    offsets = (params["source_row"] - params["target_row"])[interior]
    counts = torch.bincount(offsets + 10, minlength=21).double()
    # uniform over the 21 offsets inside the image: chi-square with 20 dof, 99.9% quantile 45.3
    expected = counts.sum() / 21
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45.3, chi2


def test_wavelet_step_equals_skimage_called_directly():
    x = _photos(2, 64)
    ours = wavelet_denoise(x, sigma=0.04)
    for i in range(2):
        img = x[i].permute(1, 2, 0).double().numpy()
        ref = denoise_wavelet(
            img, sigma=0.04, mode="soft", method="BayesShrink", rescale_sigma=True, convert2ycbcr=True, channel_axis=-1
        )
        ref = np.clip(ref, 0, 1)
        assert np.abs(ref - img).max() > 1e-3  # the denoiser does something
        assert np.abs(ours[i].permute(1, 2, 0).double().numpy() - ref).max() < 1e-6


def test_full_defense_seeded_in_range_and_close_to_input():
    x = _photos(2, 96)
    d = create("pd")
    a = d(x, generator=seeding.make_generator(7))
    b = d(x, generator=seeding.make_generator(7))
    c = d(x, generator=seeding.make_generator(8))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    rms = (a - x).pow(2).mean().sqrt().item()
    assert 0 < rms < 0.1
    # apply == wavelet(deflect) with the same draw; batch == image by image
    params = d.sample_params(x, seeding.make_generator(7))
    assert torch.equal(d.apply(x, params), a)
    single = params.select(slice(1, 2))
    assert torch.equal(d.apply(x[1:2], single), a[1:2])


@pytest.mark.parametrize("shape", [(2, 3, 299, 299), (3, 3, 224, 224)])
def test_protocol_shapes(shape):
    x = _photos(shape[0], shape[2])
    out = create("pd")(x, generator=seeding.make_generator(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_grayscale_and_float64():
    x = torch.rand(2, 1, 40, 40, generator=seeding.make_generator(0), dtype=torch.float64)
    out = create("pd")(x, generator=seeding.make_generator(1))
    assert out.shape == x.shape and out.dtype == torch.float64

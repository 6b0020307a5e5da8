"""``tv`` (Guo et al. 2018, PROTOCOL.md "Baseline defenses") against scikit-image's Bregman TV."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.restoration import denoise_tv_bregman
from skimage.transform import resize

from prepdefense import seeding
from prepdefense.defenses import create, names
from prepdefense.defenses.total_variation import TotalVariation, tv_bregman



# Tiny models: one torch thread avoids oversubscription (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(h: int, w: int, which: str = "astronaut") -> np.ndarray:
    img = getattr(skdata, which)()
    return resize(img, (h, w), anti_aliasing=True).astype(np.float64)  # HWC in [0, 1]


def _to_nchw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(1.0 / float(np.mean((a - b) ** 2)))


def test_registered_with_protocol_parameters():
    assert "tv" in names()
    d = create("tv")
    assert isinstance(d, TotalVariation)
    assert d.randomized and not d.differentiable
    assert d.keep_prob == 0.5
    assert d.weight == pytest.approx(2.0 / 0.03)  # "lambda_tv 0.03, weight 2/lambda"
    assert create("tv", weight=5.0).weight == 5.0
    assert d.isotropic is False  # anisotropic, as Athalye et al.'s re-implementation of Guo et al.


@pytest.mark.parametrize("weight,isotropic", [(2.0 / 0.03, True), (2.0 / 0.03, False), (2.0, True)])
def test_solver_equals_skimage_per_channel(weight, isotropic):
    # The batched sweep is skimage's Gauss-Seidel sweep solved exactly (Neumann series
    # truncated at 1e-7), so in float64 it matches to ~1e-7; 1e-5 leaves room for rounding
    # while still failing on any change of formula, border or stopping rule (those give >1e-3).
    img = _photo(40, 56)
    img2 = _photo(40, 56, "chelsea")
    x = torch.cat([_to_nchw(img), _to_nchw(img2)])
    ours = tv_bregman(x, weight=weight, isotropic=isotropic).permute(0, 2, 3, 1).numpy()
    for i, im in enumerate((img, img2)):
        ref = np.stack(
            [denoise_tv_bregman(im[..., c], weight=weight, isotropic=isotropic) for c in range(3)], axis=-1
        )
        assert np.abs(ref - im).max() > 1e-2  # the comparison is not trivial
        assert np.abs(ours[i] - ref).max() < 1e-5


def test_solver_float32_close_to_skimage():
    img = _photo(40, 56)
    ours = tv_bregman(_to_nchw(img).float(), weight=2.0 / 0.03)[0].permute(1, 2, 0).numpy()
    ref = np.stack([denoise_tv_bregman(img[..., c], weight=2.0 / 0.03) for c in range(3)], axis=-1)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-4


def test_defense_keep_prob_one_agrees_with_skimage_channel_axis():
    # skimage's channel_axis path reuses one buffer across channels, so channels 1 and 2 start
    # their Bregman variables from the previous channel's result (observed: up to ~0.05 max abs
    # difference to per-channel calls). We start every channel from zero; against the
    # channel_axis call itself we therefore assert PSNR > 40 dB, and exactness per channel above.
    img = _photo(64, 64)
    weight = 2.0 / 0.03
    d = create("tv", keep_prob=1.0)
    out = d(_to_nchw(img), generator=seeding.make_generator(0))[0].permute(1, 2, 0).numpy()
    iso = d.isotropic
    ref_axis = denoise_tv_bregman(img, weight=weight, isotropic=iso, channel_axis=-1)
    ref_per_channel = np.clip(
        np.stack([denoise_tv_bregman(img[..., c], weight=weight, isotropic=iso) for c in range(3)], axis=-1), 0, 1
    )
    assert _psnr(out, np.clip(ref_axis, 0, 1)) > 40.0
    assert np.abs(out - ref_per_channel).max() < 1e-5
    # channel 0 has no leaked state in skimage either: equal there
    assert np.abs(out[..., 0] - np.clip(ref_axis[..., 0], 0, 1)).max() < 1e-5


def test_dropout_fills_dropped_pixels():
    x = 0.1 + 0.8 * _to_nchw(_photo(96, 96)).float()  # no zero pixel
    d = create("tv")  # keep_prob 0.5
    g = seeding.make_generator(3)
    params = d.sample_params(x, g)
    kept_fraction = params["mask"].float().mean().item()
    # 9216 Bernoulli(0.5) draws: sd 0.0052; 5 sd
    assert abs(kept_fraction - 0.5) < 0.026
    out = d.apply(x, params)
    dropped = ~params["mask"].expand_as(x)
    assert (x > 0).all()
    assert (out[dropped] > 0).all()  # no hole left
    on_dropped = _psnr(out[dropped].numpy(), x[dropped].numpy())
    assert on_dropped > 20.0, on_dropped  # holes left at 0 would give ~8 dB
    assert _psnr(out.numpy(), x.numpy()) > 25.0
    # a constant image is reconstructed exactly (filled holes take the neighbours' value)
    flat = torch.full((1, 3, 32, 32), 0.4)
    assert torch.allclose(d(flat, generator=seeding.make_generator(0)), flat, atol=1e-5)


def test_dropped_values_are_never_seen():
    x = _to_nchw(_photo(48, 48)).float()
    d = create("tv")
    params = d.sample_params(x, seeding.make_generator(5))
    y = x.clone()
    dropped = ~params["mask"].expand_as(x)
    y[dropped] = torch.rand(int(dropped.sum()), generator=seeding.make_generator(9))
    assert torch.equal(d.apply(x, params), d.apply(y, params))


def test_seeded_batched_and_in_range():
    x = torch.cat([_to_nchw(_photo(96, 80)), _to_nchw(_photo(96, 80, "chelsea"))]).float()
    d = create("tv")
    a = d(x, generator=seeding.make_generator(11))
    b = d(x, generator=seeding.make_generator(11))
    c = d(x, generator=seeding.make_generator(12))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    params = d.sample_params(x, seeding.make_generator(11))
    for i in range(2):
        single = d.apply(x[i : i + 1], params.select(slice(i, i + 1)))
        assert torch.allclose(single, a[i : i + 1], atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 299, 299), (3, 3, 224, 224)])
def test_protocol_shapes(shape):
    photos = [_photo(shape[2], shape[3], w) for w in ("astronaut", "chelsea", "coffee")][: shape[0]]
    x = torch.cat([_to_nchw(p) for p in photos]).float()
    out = create("tv")(x, generator=seeding.make_generator(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert _psnr(out.numpy(), x.numpy()) > 20.0


def test_float64_input():
    x = torch.rand(1, 3, 32, 32, generator=seeding.make_generator(0), dtype=torch.float64)
    out = create("tv", max_iter=20)(x, generator=seeding.make_generator(1))
    assert out.dtype == torch.float64 and out.shape == x.shape

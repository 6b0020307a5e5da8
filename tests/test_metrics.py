"""Metrics (issue 2, item 5; PROTOCOL.md "Conventions"), checked against NumPy and scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from prepdefense import metrics


def _pair(shape, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64)
    b = (a + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a, b


def _skimage_ssim(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """SSIM per image with exactly the PROTOCOL.md settings."""
    return np.array(
        [
            structural_similarity(
                x.permute(1, 2, 0).numpy(),
                y.permute(1, 2, 0).numpy(),
                channel_axis=-1,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1,
            )
            for x, y in zip(a, b)
        ]
    )


def test_l2_rms_and_linf_against_numpy():
    a, b = _pair((3, 3, 17, 23), seed=1)
    diff = (a - b).reshape(3, -1).numpy()
    expected_l2 = np.linalg.norm(diff, axis=1) / math.sqrt(3 * 17 * 23)
    expected_linf = np.linalg.norm(diff, ord=np.inf, axis=1)
    np.testing.assert_allclose(metrics.l2_rms(a, b).numpy(), expected_l2, rtol=1e-12)
    np.testing.assert_allclose(metrics.linf(a, b).numpy(), expected_linf, rtol=1e-12)
    assert torch.all(metrics.l2_rms(a, a) == 0) and torch.all(metrics.linf(a, a) == 0)


def test_l2_rms_float32_and_shape_mismatch():
    a, b = _pair((2, 3, 8, 8), seed=2)
    np.testing.assert_allclose(metrics.l2_rms(a.float(), b.float()).numpy(), metrics.l2_rms(a, b).numpy(), rtol=1e-5)
    with pytest.raises(ValueError):
        metrics.l2_rms(a, b[:, :, :7])


def test_euclidean_radius_of_the_paper_bound():
    assert metrics.l2_euclidean_radius(metrics.PAPER_L2_BOUND, (3, 299, 299)) == pytest.approx(0.05 * math.sqrt(3 * 299 * 299))
    assert metrics.PAPER_LINF_BOUND == pytest.approx(8 / 255)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (3, 3, 40, 57), (1, 1, 64, 23)])
def test_ssim_matches_skimage_on_random_images(shape):
    a, b = _pair(shape, seed=shape[2])
    ours = metrics.ssim(a, b).numpy()
    assert ours.shape == (shape[0],)
    np.testing.assert_allclose(ours, _skimage_ssim(a, b), atol=1e-3)


def test_ssim_matches_skimage_on_real_non_square_photos():
    from skimage import data as skdata

    cat = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1).double() / 255  # 300 x 451
    coffee = torch.from_numpy(skdata.coffee()[:300, :451]).permute(2, 0, 1).double() / 255
    clean = torch.stack([cat, coffee])
    g = torch.Generator().manual_seed(5)
    noisy = (clean + 0.05 * torch.randn(clean.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    shifted = torch.roll(clean, shifts=3, dims=3)
    for other in (noisy, shifted):
        np.testing.assert_allclose(metrics.ssim(clean, other).numpy(), _skimage_ssim(clean, other), atol=1e-3)
    # float32 input gives the same figures.
    np.testing.assert_allclose(metrics.ssim(clean.float(), noisy.float()).numpy(), _skimage_ssim(clean, noisy), atol=1e-3)


def test_ssim_identity_and_order():
    a, b = _pair((2, 3, 32, 32), seed=7, noise=0.05)
    _, c = _pair((2, 3, 32, 32), seed=7, noise=0.3)
    assert torch.allclose(metrics.ssim(a, a), torch.ones(2, dtype=a.dtype))
    assert torch.all(metrics.ssim(a, b) > metrics.ssim(a, c))


def test_accuracy_from_logits_and_predictions():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    labels = torch.tensor([1, 0, 0, 2])
    assert metrics.accuracy(logits, labels) == pytest.approx(0.75)
    assert metrics.accuracy(logits.argmax(1), labels) == pytest.approx(0.75)


def test_attack_success_rate_targeted_and_untargeted():
    pred = torch.tensor([1, 2, 2, 0])
    targets = torch.tensor([1, 2, 0, 1])
    labels = torch.tensor([1, 0, 0, 0])
    assert metrics.attack_success_rate(pred, targets) == pytest.approx(0.5)
    assert metrics.attack_success_rate(pred, None, labels) == pytest.approx(0.5)  # moved off the label: images 1, 2
    with pytest.raises(ValueError):
        metrics.attack_success_rate(pred, None)

"""``jpeg`` against Pillow's libjpeg round trip (issue 3, items 3 and 4; PROTOCOL.md: PSNR >= 40 dB)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from prepdefense import defenses
from prepdefense.defenses.jpeg import CHROMINANCE_TABLE, LUMINANCE_TABLE, jpeg_compress, quality_scaled_table


def pillow_round_trip(img: np.ndarray, quality: int, subsampling: int = -1) -> np.ndarray:
    """Pillow's JPEG save (default subsampling unless given) and decode, uint8 HWC or HW."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    buf.seek(0)
    out = Image.open(buf)
    return np.asarray(out.convert("RGB") if img.ndim == 3 else out)


def ours(img: np.ndarray, quality: int, subsampling="4:2:0") -> np.ndarray:
    t = torch.from_numpy(img.copy()).float() / 255
    t = t.permute(2, 0, 1)[None] if img.ndim == 3 else t[None, None]
    y = jpeg_compress(t, quality, subsampling)[0]
    y = y.permute(1, 2, 0) if img.ndim == 3 else y[0]
    return (y.numpy() * 255).round().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def synthetic(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = 128 + 100 * np.sin(xx / 7.0 + seed) * np.cos(yy / 11.0)
    img = smooth[..., None] + rng.normal(0, 20, (h, w, channels)) + rng.integers(-60, 60, (1, 1, channels))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img if channels == 3 else img[..., 0]


@pytest.mark.parametrize("size", [(299, 299), (224, 224), (37, 53), (24, 40), (8, 8), (3, 5)])
@pytest.mark.parametrize("quality", [10, 50, 75, 95])
def test_matches_pillow_on_synthetic(size, quality):
    img = synthetic(*size, seed=quality)
    ref = pillow_round_trip(img, quality)
    got = ours(img, quality)
    p = psnr(got, ref)
    print(f"{size} q{quality}: PSNR {p:.2f} dB, {np.mean(got == ref):.4%} samples equal")
    assert p >= 40.0


@pytest.mark.parametrize("quality", [30, 75])
def test_matches_pillow_444_and_greyscale(quality):
    img = synthetic(45, 61, seed=1)
    assert psnr(ours(img, quality, "4:4:4"), pillow_round_trip(img, quality, subsampling=0)) >= 40.0
    grey = synthetic(45, 61, seed=2, channels=1)
    assert psnr(ours(grey, quality), pillow_round_trip(grey, quality)) >= 40.0


def test_matches_pillow_on_shared_sample(imagenet_sample_dir):
    files = sorted(imagenet_sample_dir.glob("*.jpg"))[:6]
    assert files, "no JPEG in the shared sample"
    scores = []
    for f in files:
        for side in (224, 299):
            img = np.asarray(Image.open(f).convert("RGB").resize((side, side), Image.BILINEAR))
            for q in (20, 75):
                scores.append(psnr(ours(img, q), pillow_round_trip(img, q)))
    finite = [s for s in scores if math.isfinite(s)]
    print(f"PSNR vs Pillow: {len(scores) - len(finite)}/{len(scores)} identical, min {min(scores):.2f} dB")
    assert min(scores) >= 40.0


def test_quality_changes_the_result():
    x = torch.from_numpy(synthetic(64, 64, seed=3)).permute(2, 0, 1)[None].float() / 255
    err = {q: float((jpeg_compress(x, q) - x).pow(2).mean()) for q in (10, 50, 90)}
    assert err[10] > err[50] > err[90] > 0
    assert not torch.equal(defenses.create("jpeg", quality=20)(x), defenses.create("jpeg")(x))


def test_batch_equals_one_by_one():
    x = torch.stack([torch.from_numpy(synthetic(40, 56, seed=s)).permute(2, 0, 1).float() / 255 for s in range(3)])
    full = jpeg_compress(x, 75)
    for i in range(3):
        assert torch.equal(jpeg_compress(x[i:i + 1], 75), full[i:i + 1])


def test_quality_scaled_tables():
    assert torch.equal(quality_scaled_table(LUMINANCE_TABLE, 50), torch.tensor(LUMINANCE_TABLE))
    assert torch.equal(quality_scaled_table(CHROMINANCE_TABLE, 100), torch.ones(8, 8, dtype=torch.int64))
    t1 = quality_scaled_table(LUMINANCE_TABLE, 1)
    assert int(t1.max()) == 255 and int(t1.min()) == 255  # 16 * 5000 / 100 > 255: baseline clamp
    # quality 75: scale 50, (16 * 50 + 50) // 100 = 8
    assert int(quality_scaled_table(LUMINANCE_TABLE, 75)[0, 0]) == 8


def test_output_on_the_255_grid_and_module_attributes():
    d = defenses.create("jpeg")
    assert not d.randomized and not d.differentiable
    x = torch.rand(1, 3, 16, 16)
    y = d(x)
    assert torch.allclose(y * 255, (y * 255).round(), atol=1e-4)
    with pytest.raises(ValueError):
        defenses.create("jpeg", quality=0)

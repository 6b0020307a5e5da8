"""``shield`` (SHIELD, Das et al. 2018) against Pillow and its random block map (issue 3, item 4)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from prepdefense import defenses
from prepdefense.seeding import make_generator


def pillow_jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_every_block_is_the_pillow_jpeg_of_its_quality():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:44, 0:70]
    imgs = [np.clip(128 + 90 * np.sin(xx / (5.0 + k)) [..., None] + rng.normal(0, 25, (44, 70, 3)), 0, 255).astype(np.uint8)
            for k in range(2)]
    x = torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255 for a in imgs])
    d = defenses.create("shield")
    params = d.sample_params(x, make_generator(11))["quality"]
    y = d.apply(x, {"quality": params})
    assert params.shape == (2, math.ceil(44 / 8), math.ceil(70 / 8))
    out = (y.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.int64)
    for n, img in enumerate(imgs):
        refs = {q: pillow_jpeg(img, q).astype(np.int64) for q in d.qualities}
        for bi in range(params.shape[1]):
            for bj in range(params.shape[2]):
                q = d.qualities[int(params[n, bi, bj])]
                sl = (slice(8 * bi, 8 * bi + 8), slice(8 * bj, 8 * bj + 8))
                err = np.abs(out[n][sl] - refs[q][sl]).max()
                assert err <= 1, f"image {n} block ({bi},{bj}) differs from Pillow's quality-{q} JPEG by {err}"


def test_quality_map_is_uniform():
    d = defenses.create("shield")
    x = torch.zeros(1, 1, 1, 1).expand(6, 3, 299, 299)
    params = d.sample_params(x, make_generator(2024))["quality"]
    counts = torch.bincount(params.flatten(), minlength=4).double()
    total = float(counts.sum())
    assert total == 6 * 38 * 38
    # Binomial(total, 1/4) per quality: 5 standard deviations.
    sd = math.sqrt(total * 0.25 * 0.75)
    print("blocks per quality", counts.tolist(), "expected", total / 4, "+-", sd)
    assert torch.all((counts - total / 4).abs() < 5 * sd)


def test_random_and_reproducible():
    d = defenses.create("shield", qualities=(20, 90))
    x = torch.rand(1, 3, 32, 32)
    a = d(x, generator=make_generator(1))
    assert torch.equal(a, d(x, generator=make_generator(1)))
    assert not torch.equal(a, d(x, generator=make_generator(2)))
    assert d.randomized and not d.differentiable

"""``crop``: Guo et al.'s random-crop ensemble (PROTOCOL.md "Baseline defenses"; issue 3, item 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prepdefense import defenses
from prepdefense.defenses import Defended
from prepdefense.defenses.random_crop import crop_side
from prepdefense.seeding import make_generator


def test_crop_side_scales_with_input():
    assert crop_side(299) == 90 and crop_side(224) == 67
    d = defenses.create("crop")
    assert d.crop_hw(299, 299) == (90, 90) and d.ensemble == 30
    assert defenses.create("crop", side=50).crop_hw(224, 224) == (50, 50)


def test_crop_is_a_window_resized_back():
    d = defenses.create("crop")
    x = torch.rand(3, 3, 299, 299)
    p = d.sample_params(x, make_generator(4))
    y = d.apply(x, p)
    assert y.shape == x.shape
    for n in range(3):
        t, l = int(p["top"][n]), int(p["left"][n])
        assert 0 <= t <= 299 - 90 and 0 <= l <= 299 - 90
        ref = F.interpolate(x[n:n + 1, :, t:t + 90, l:l + 90], size=(299, 299), mode="bilinear", align_corners=False)
        assert torch.allclose(y[n:n + 1], ref.clamp(0, 1), atol=1e-6)


def test_corner_distribution_covers_the_range():
    d = defenses.create("crop")
    p = d.sample_params(torch.zeros(1, 1, 1, 1).expand(4000, 3, 299, 299), make_generator(8))
    top = p["top"].double()
    # Uniform on 0..209: mean 104.5, sd 60.6; 5 standard errors.
    assert abs(float(top.mean()) - 104.5) < 5 * 60.6 / 4000**0.5
    assert int(top.min()) == 0 and int(top.max()) == 209


class RecordingModel(nn.Module):
    """Logits that depend deterministically on the crop: the crop's mean intensity per channel."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10)
        logits[:, :3] = 20 * x.mean(dim=(2, 3))
        self.calls.append(logits)
        return logits


def test_defended_averages_the_softmax_of_30_crops():
    model = RecordingModel()
    defended = Defended(defenses.create("crop"), model)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    x = torch.stack([yy, xx, yy * xx]).unsqueeze(0).repeat(2, 1, 1, 1)
    out = defended(x, generator=make_generator(0))
    assert len(model.calls) == 30
    assert len({tuple(c[0, :3].tolist()) for c in model.calls}) > 20, "crops should differ"
    expected = torch.stack([c.softmax(dim=1) for c in model.calls]).mean(dim=0).log()
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(out, Defended(defenses.create("crop"), RecordingModel())(x, generator=make_generator(0)))
    single = Defended(defenses.create("crop", ensemble=1), RecordingModel())(x, generator=make_generator(0))
    assert not torch.allclose(single, out)

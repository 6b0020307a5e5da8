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


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def _saved_bytes_and_grad(defended, x, key):
    """Bytes autograd saves for the backward during the forward, and the input gradient."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    xg = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = defended.apply(xg, defended.sample_params(xg, key))
    (grad,) = torch.autograd.grad(out[:, 1].sum(), xg)
    return sum(saved), out.detach(), grad


def test_ensemble_members_are_checkpointed_on_a_large_graph(monkeypatch):
    """An attack step through 30 crops keeps one member's activations, not 30 (the n = 100
    evaluation of ``crop`` ran out of 24 GB before): above ``ENSEMBLE_GRAPH_IMAGES`` images each
    member is checkpointed; the output and the gradient are the same either way."""
    import prepdefense.defenses.defended as defended_module

    defended = Defended(defenses.create("crop"), SmallConvNet())
    x = torch.rand(2, 3, 48, 48, generator=make_generator(3))
    monkeypatch.setattr(defended_module, "ENSEMBLE_GRAPH_IMAGES", 10**6)  # never: the whole graph kept
    kept, out_kept, grad_kept = _saved_bytes_and_grad(defended, x, make_generator(1))
    monkeypatch.setattr(defended_module, "ENSEMBLE_GRAPH_IMAGES", 16)  # 30 members x 2 images > 16
    light, out_light, grad_light = _saved_bytes_and_grad(defended, x, make_generator(1))
    assert torch.equal(out_light, out_kept)
    torch.testing.assert_close(grad_light, grad_kept, rtol=1e-5, atol=1e-7)
    assert light * 5 < kept, (light, kept)
    with torch.no_grad():  # no graph, nothing to checkpoint
        assert torch.equal(defended.apply(x, defended.sample_params(x, make_generator(1))), out_kept)

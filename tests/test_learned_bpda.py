"""Learned BPDA approximator (paper Section 6.4): the net, its training, evaluation and storage."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prepdefense import seeding
from prepdefense.attacks.learned_bpda import (
    DenseAutoEncoder,
    evaluate_approximator,
    load_approximator,
    save_approximator,
    train_approximator,
)
from prepdefense.draws import DrawKey, Params
from prepdefense.defenses.base import Defense
from prepdefense.metrics import l2_rms, ssim


# Tiny models: one torch thread avoids oversubscription (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


class Blur(Defense):
    """A fixed 3x3 box blur (replicate border): a trivial defense a 3x3 conv can imitate."""

    differentiable = True

    def apply(self, x, params=None):
        return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


class NoisyBlur(Blur):
    """Blur plus a small random shift of brightness per image: a random defense."""

    randomized = True

    def draw(self, x, generator):
        return Params(offset=seeding.rand((x.shape[0], 1, 1, 1), generator) * 0.1 - 0.05)

    def apply(self, x, params):
        return (super().apply(x) + params["offset"].to(x.device)).clamp(0, 1)


class Shrink(Defense):
    def apply(self, x, params=None):
        return x[..., 1:, 1:]


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random images with some smoothness (noise upsampled 2x), on which a blur still acts."""
    g = seeding.make_generator(seed)
    small = torch.rand(n, 3, size // 2, size // 2, generator=g)
    return F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def test_net_shapes_identity_start_and_gradient():
    net = DenseAutoEncoder()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6  # "6-layer DenseNet auto-encoder"
    # dense connections: layer i sees the stem plus i earlier dense outputs
    assert [c.in_channels for c in net.dense] == [32, 48, 64, 80]
    x = torch.rand(2, 3, 33, 41, generator=seeding.make_generator(0), requires_grad=True)
    y = net(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.equal(y, x.detach())  # zero head: the untrained net is identity BPDA
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))


def test_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = DenseAutoEncoder(seed=1), DenseAutoEncoder(seed=1), DenseAutoEncoder(seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.stem.weight, c.stem.weight)


def test_training_on_a_blur_reduces_the_loss_and_beats_identity():
    train = _images(6, 32, seed=0)
    held_out = _images(4, 32, seed=1)
    # a slim net (the default one is ~8x the compute) keeps this test to a few seconds on CPU
    net, history = train_approximator(
        Blur(), train, steps=60, batch_size=4, lr=3e-3, generator=seeding.make_generator(0),
        net=DenseAutoEncoder(width=8, growth=8),
    )
    assert len(history) == 60 and all(set(h) == {"step", "loss"} for h in history)
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.3 * first, (first, last)
    figures = evaluate_approximator(net, Blur(), held_out, seeding.make_generator(3))
    assert figures["n"] == 4
    assert figures["l2"] < 0.6 * figures["identity_l2"], figures
    assert figures["ssim"] > figures["identity_ssim"], figures
    assert not net.training


def test_evaluate_is_the_mean_of_the_metrics():
    x = _images(5, 32, seed=2)
    net, _ = train_approximator(
        Blur(), x, steps=3, batch_size=2, generator=seeding.make_generator(0), net=DenseAutoEncoder(width=8, growth=8)
    )
    figures = evaluate_approximator(net, Blur(), x, seeding.make_generator(0), batch_size=2)
    with torch.no_grad():
        a, g = net(x), Blur()(x)
    assert figures["l2"] == pytest.approx(float(l2_rms(a, g).double().mean()), abs=1e-6)
    assert figures["ssim"] == pytest.approx(float(ssim(a, g).double().mean()), abs=1e-6)
    assert figures["identity_l2"] == pytest.approx(float(l2_rms(x, g).double().mean()), abs=1e-6)
    assert figures["identity_ssim"] == pytest.approx(float(ssim(x, g).double().mean()), abs=1e-6)
    # a random defense: the evaluation draws from the generator (same seed, same figures)
    e1 = evaluate_approximator(net, NoisyBlur(), x, seeding.make_generator(4))
    e2 = evaluate_approximator(net, NoisyBlur(), x, seeding.make_generator(4))
    e3 = evaluate_approximator(net, NoisyBlur(), x, seeding.make_generator(5))
    assert e1 == e2 and e1["l2"] != e3["l2"]


def test_training_is_reproducible_with_patches_and_a_random_defense():
    x = _images(4, 32, seed=3)
    runs = [
        train_approximator(NoisyBlur(), x, steps=3, batch_size=3, patch_size=16, generator=seeding.make_generator(7))
        for _ in range(2)
    ]
    assert [h["loss"] for h in runs[0][1]] == [h["loss"] for h in runs[1][1]]
    assert all(torch.equal(p, q) for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()))
    # fully convolutional: trained on 16x16 patches, applied to a whole 32x32 image
    assert runs[0][0](x).shape == x.shape


def test_size_changing_defense_is_refused():
    with pytest.raises(ValueError, match="shape"):
        train_approximator(Shrink(), _images(2, 16), steps=1, batch_size=1, generator=seeding.make_generator(0))


def test_save_load_round_trip(tmp_path):
    x = _images(3, 32, seed=4)
    net, _ = train_approximator(
        Blur(), x, steps=3, batch_size=2, generator=seeding.make_generator(0), net=DenseAutoEncoder(width=8, growth=8)
    )
    meta = {"defense": "blur", "train_ids": ["a", "b"], "steps": 5}
    path = save_approximator(tmp_path / "sub" / "approx.pt", net, meta)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    sidecar = json.loads((tmp_path / "sub" / "approx.pt.json").read_text())
    assert sidecar["metadata"] == meta and sidecar["config"] == net.config()
    loaded = load_approximator(path)
    assert loaded.metadata == meta
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert torch.load(path, weights_only=True)["format"].startswith("prepdefense-learned-bpda")
    with pytest.raises(TypeError):
        save_approximator(tmp_path / "bad.pt", net, {"not json": object()})
    assert not (tmp_path / "bad.pt").exists()

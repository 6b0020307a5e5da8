"""Protocol sampler (issue 2, item 6; PROTOCOL.md "Protocol sample"), on a tiny fake model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from prepdefense import data
from prepdefense.data import ImageDataset, ImageEntry, protocol_sample
from prepdefense.errors import DataError


class GreyLevelClassifier(nn.Module):
    """Predicts class round(255 * mean pixel value): exact on flat grey images."""

    input_size = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = (x.mean(dim=(1, 2, 3)) * 255).round().long()
        return nn.functional.one_hot(level, 1000).float()


def _flat(level: int):
    return lambda: Image.fromarray(np.full((40, 40, 3), level, np.uint8))


def _dataset(n: int = 40) -> ImageDataset:
    # Even images are labelled with their grey level (the model gets them right), odd ones off by one.
    entries = [ImageEntry(f"img{i:02d}", (10 + i) if i % 2 == 0 else (10 + i + 1), _flat(10 + i)) for i in range(n)]
    return ImageDataset(entries, size=32, source="fake")


def test_same_seed_same_picks_and_targets():
    model = GreyLevelClassifier()
    a = protocol_sample(model, _dataset(), n=6, seed=3)
    b = protocol_sample(model, _dataset(), n=6, seed=3, batch_size=1)  # batching must not change picks
    assert a.ids == b.ids
    assert torch.equal(a.labels, b.labels) and torch.equal(a.targets, b.targets) and torch.equal(a.x, b.x)
    c = protocol_sample(model, _dataset(), n=6, seed=4)
    assert c.ids != a.ids


def test_picks_are_correctly_classified_with_other_targets():
    model = GreyLevelClassifier()
    s = protocol_sample(model, _dataset(), n=10, seed=0, batch_size=3)
    assert len(s) == 10 and s.x.shape == (10, 3, 32, 32)
    assert len(set(s.ids)) == 10
    assert torch.equal(model(s.x).argmax(1), s.labels)
    assert all(int(i[3:]) % 2 == 0 for i in s.ids)  # only the correctly classified (even) images
    assert torch.all(s.targets != s.labels) and s.targets.min() >= 0 and s.targets.max() < 1000
    assert s.tried >= 10 and s.correct >= 10


def test_picks_follow_a_seeded_order_not_the_file_order():
    s = protocol_sample(GreyLevelClassifier(), _dataset(), n=5, seed=1)
    assert s.ids != ["img00", "img02", "img04", "img06", "img08"]


def test_exclude_ids_are_never_picked():
    model = GreyLevelClassifier()
    first = protocol_sample(model, _dataset(), n=8, seed=2)
    second = protocol_sample(model, _dataset(), n=8, seed=2, exclude_ids=first.ids)
    assert not set(first.ids) & set(second.ids)
    assert len(second) == 8


def test_too_few_correct_images_is_a_data_error():
    model = GreyLevelClassifier()
    with pytest.raises(DataError, match="only 20 of the 40"):
        protocol_sample(model, _dataset(), n=21, seed=0)


def test_targets_are_uniform_over_the_other_classes():
    labels = torch.full((99_900,), 5, dtype=torch.long)
    targets = data.draw_targets(labels, torch.Generator().manual_seed(0))
    counts = torch.bincount(targets, minlength=1000)
    assert counts[5] == 0
    others = torch.cat([counts[:5], counts[6:]]).double()
    # 999 classes, expected 100 each: a chi-square statistic near its 998 degrees of freedom.
    chi2 = float(((others - 100) ** 2 / 100).sum())
    assert 850 < chi2 < 1150, chi2


def test_protocol_sample_on_the_builtin_images_with_the_real_model(model):
    s = protocol_sample(model, "builtin", n=3, seed=0)
    assert s.x.shape == (3, 3, 224, 224) and s.source == "builtin"
    with torch.no_grad():
        assert torch.equal(model(s.x).argmax(1), s.labels)


def test_sampler_checks_its_arguments_and_leaves_the_model_in_its_mode(model, imagenet_sample_dir):
    """Issue 11, item 1: the sampler validates what it is given and runs the model in eval mode."""
    import copy

    from prepdefense.errors import DataError

    with pytest.raises(TypeError, match="n must be an integer"):
        data.protocol_sample(model, imagenet_sample_dir, n=2.5, seed=0)
    with pytest.raises(DataError, match="seed must be at least 0"):
        data.protocol_sample(model, imagenet_sample_dir, n=2, seed=-1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        data.protocol_sample(lambda x: x, imagenet_sample_dir, n=2, seed=0)
    mt = copy.deepcopy(model).train()
    before = copy.deepcopy(mt.state_dict())
    s = data.protocol_sample(mt, imagenet_sample_dir, n=2, seed=0, batch_size=4)
    assert mt.training and len(s) == 2
    assert all(torch.equal(v, mt.state_dict()[k]) for k, v in before.items())
    assert s.ids == data.protocol_sample(model, imagenet_sample_dir, n=2, seed=0, batch_size=4).ids

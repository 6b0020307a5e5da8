"""A draw records the image size it was made for, and a replay at another size is refused.

Before, ``rand``'s draw replayed on smaller images gave an output of another size, and
``grid-distort``'s or ``shield``'s gave an image with no error: pixel positions made for one
size were read at another. ``Params.image_size`` is set by ``sample_params`` and kept by
slicing, joining, moving, saving and loading; a draw without it (built by hand, or saved
before it was recorded) is replayed as before.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from prepdefense import defenses
from prepdefense.defenses import Defended
from prepdefense.defenses.base import as_defense
from prepdefense.draws import Params

RANDOM = [n for n in defenses.names() if defenses.create(n).randomized]


def _images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()


@pytest.mark.parametrize("name", RANDOM + ["fd+rand"])
def test_every_random_defense_refuses_a_draw_made_at_another_size(name):
    d = defenses.create(name)
    x, smaller = _images(2, 32), _images(2, 24, seed=1)
    params = d.sample_params(x, 0)
    assert params.image_size == (32, 32)
    assert torch.equal(d(x, params=params), d(x, params=params))
    with pytest.raises(ValueError, match="made for 32x32 images but x is 24x24"):
        d(smaller, params=params)
    # non-square: height and width are told apart
    wide = _images(2, 32)[..., :30]
    with pytest.raises(ValueError, match="made for 32x32 images but x is 32x30"):
        d(wide, params=params)


def test_the_size_survives_select_cat_to_and_save_load(tmp_path):
    d = defenses.create("dct-distort")
    x = _images(4, 32)
    params = d.sample_params(x, 3)
    assert params["distort"].image_size == (32, 32)
    assert params.select([1, 3]).image_size == (32, 32)
    assert params.select(torch.tensor([True, False, True, False])).image_size == (32, 32)
    assert Params.cat([params.select(slice(0, 2)), params.select(slice(2, 4))]).image_size == (32, 32)
    assert params.to("cpu").image_size == (32, 32)
    path = tmp_path / "draw.pt"
    params.select([2]).save(path)
    loaded = Params.load(path)
    assert loaded.image_size == (32, 32) and loaded["distort"].image_size == (32, 32)
    assert set(loaded) == {"distort"} and set(loaded["distort"]) == set(params["distort"])
    assert torch.equal(d(x[2:3], params=loaded), d(x[2:3], params=params.select([2])))
    with pytest.raises(ValueError, match="made for 32x32"):
        d(_images(1, 40), params=loaded)
    assert "image_size=32x32" in repr(loaded)


def test_joining_draws_of_different_sizes_is_refused():
    d = defenses.create("grid-distort")
    at_32, at_24 = d.sample_params(_images(1, 32), 0), d.sample_params(_images(1, 24), 0)
    with pytest.raises(ValueError, match="different sizes \\(24x24, 32x32\\)"):
        Params.cat([at_32, at_24])
    unrecorded = Params(dict(at_24))
    assert unrecorded.image_size is None
    assert Params.cat([unrecorded, at_32]).image_size == (32, 32)  # the part with no size takes it on
    assert Params.cat([unrecorded, unrecorded]).image_size is None


def test_copies_and_pickles_keep_the_size():
    params = defenses.create("pd").sample_params(_images(2, 32), 0)
    for copied in (Params(params), params.copy(), copy.deepcopy(params), pickle.loads(pickle.dumps(params))):
        assert isinstance(copied, Params) and copied.image_size == (32, 32)
        assert set(copied) == set(params)


def test_an_entry_named_like_the_size_is_refused_on_save(tmp_path):
    with pytest.raises(ValueError, match="__image_size__"):
        Params({"__image_size__": torch.zeros(1)}).save(tmp_path / "x.pt")


def test_empty_batches_and_stage_chains_record_their_sizes():
    empty = defenses.create("crop").sample_params(torch.zeros(0, 3, 32, 32), 0)
    assert empty.image_size == (32, 32) and empty.batch_size() == 0
    chain = defenses.create("rand+crop")
    x = _images(2, 32)
    params = chain.sample_params(x, 0)
    assert params.image_size == (32, 32)
    parts = dict(chain.stages())
    grown = parts["0:rand"].output_size(32, 32)
    assert params["1:crop"].image_size == tuple(grown) != (32, 32)  # the crop draws on rand's output
    padded = parts["0:rand"](x, params=params["0:rand"])
    torch.testing.assert_close(chain(x, params=params), parts["1:crop"](padded, params=params["1:crop"]))


def test_a_draw_saved_without_a_size_still_loads_and_replays(tmp_path):
    """Files written before draws recorded their size: loaded with image_size None, unchecked."""
    x = _images(2, 32)
    for name in ("rand", "dct-distort"):
        d = defenses.create(name)
        params = d.sample_params(x, 0)
        path = tmp_path / f"old-{name}.pt"
        plain = {k: (dict(v) if isinstance(v, Params) else v) for k, v in params.items()}  # nested, as saved before
        torch.save(plain, path)
        old = Params.load(path)
        assert old.image_size is None and all(v.image_size is None for v in old.values() if isinstance(v, Params))
        assert torch.equal(d(x, params=old), d(x, params=params))


def test_defended_without_defend_at_records_the_input_size():
    model = _tiny_model()
    x = _images(2, 32)
    deployed = Defended(defenses.create("pd"), model)
    params = deployed.sample_params(x, 0)
    assert params.image_size == (32, 32)
    torch.testing.assert_close(deployed(x, params=params), deployed(x, params=params))
    with pytest.raises(ValueError, match="made for 32x32 images but x is 40x40"):
        deployed(_images(2, 40), params=params)
    ensemble = Defended(defenses.create("crop", ensemble=3), model)
    members = ensemble.sample_params(x, 0)
    assert members.image_size == (32, 32) and members["0"].image_size == (32, 32)
    with pytest.raises(ValueError, match="made for 32x32"):
        ensemble(_images(2, 28), params=members)


@pytest.mark.parametrize("ensemble", [1, 3])
def test_defended_at_a_side_replays_a_draw_on_inputs_of_any_size(ensemble):
    """With ``defend_at``, the defense always runs at that side, so its draw is for that size
    and fits every input; the defense's own draw and ``Defended``'s are the same draw."""
    model = _tiny_model()
    deployed = Defended(defenses.create("crop", ensemble=ensemble), model, defend_at=24)
    x32, x40 = _images(2, 32), _images(2, 40)
    params = deployed.sample_params(x32, 0)
    assert params.image_size == (24, 24)
    assert deployed(x40, params=params).shape == (2, 10)  # another input size: still the same defended size
    torch.testing.assert_close(deployed(x32, params=params), deployed.apply(x32, params))
    if ensemble == 1:
        torch.testing.assert_close(params, deployed.defense.sample_params(torch.zeros(2, 3, 24, 24), 0))
        torch.testing.assert_close(deployed.defense(torch.zeros(2, 3, 24, 24), params=params), deployed.defense(torch.zeros(2, 3, 24, 24), params=params))
    else:
        assert all(params[str(k)].image_size == (24, 24) for k in range(ensemble))
    stale = deployed.defense.sample_params(x32, 0)  # a draw of the bare defense at the input's size
    with pytest.raises(ValueError, match="made for 32x32 images but it runs its defense at 24x24"):
        Defended(defenses.create("crop"), model, defend_at=24)(x32, params=stale)


def test_a_random_plain_module_records_the_size_too():
    class Noise(nn.Module):
        randomized = True

        def forward(self, t, generator=None):
            return (t + 0.01 * torch.rand(t.shape, generator=generator)).clamp(0, 1)

    d = as_defense(Noise())
    params = d.sample_params(_images(2, 32), 0)
    assert params.image_size == (32, 32)
    with pytest.raises(ValueError, match="made for 32x32"):
        d(_images(2, 16), params=params)


def test_a_hand_built_draw_is_not_size_checked():
    d = defenses.create("grid-distort")
    params = Params(dict(d.sample_params(_images(2, 32), 0)))
    assert params.image_size is None
    assert d(_images(2, 24), params=params).shape == (2, 3, 24, 24)

"""The four cases of issue 11, as a new user met them through the library API on two images of
the shared sample with the default model; each now gives the right value or a one-line error."""

from __future__ import annotations

import copy

import pytest
import torch

from prepdefense import attacks, data, defenses
from prepdefense.defenses import Defended

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two(model, imagenet_sample_dir):
    s = data.protocol_sample(model, imagenet_sample_dir, n=2, seed=0, batch_size=2)
    return s.x, s.labels, s.targets


def test_case1_cw_with_a_pixel_a_rounding_step_above_one(model, two):
    """Was: both images "not fooled" with L2 = inf (atanh of 1 + 1e-6 is NaN). Now the pixel is
    clamped within the documented tolerance and the result is the clean batch's."""
    x, y, _ = two
    xo = x.clone()
    xo[0, 0, 0, 0] = 1 + 1e-6
    cw = attacks.create("cw", steps=30, binary_search_steps=1, initial_const=10.0)
    res = cw(model, xo, labels=y)
    clean = cw(model, xo.clamp(0, 1), labels=y)
    assert torch.isfinite(res.adversarial).all()
    assert torch.equal(res.success, clean.success)
    assert all(v < float("inf") for v in res.info.get("l2", [0.0]))


@pytest.mark.parametrize("name", ["cw", "lbfgs", "fgsm", "pgd", "deepfool"])
def test_case2_non_differentiable_defense_is_refused_naming_bpda(model, two, name):
    """Was: C&W and L-BFGS returned the clean images as "not fooled" without a word, FGSM/PGD/
    DeepFool stopped with torch's raw graph error."""
    x, y, _ = two
    small = {"cw": dict(steps=2, binary_search_steps=1), "lbfgs": dict(max_iterations=2, binary_search_steps=1),
             "pgd": dict(steps=2), "deepfool": dict(steps=2)}.get(name, {})
    with pytest.raises(ValueError, match="BPDA") as err:
        attacks.create(name, **small)(Defended(defenses.create("jpeg"), model), x, labels=y)
    assert "\n" not in str(err.value)


def test_case3_model_in_training_mode_is_left_as_it_was(model, two):
    """Was: every batch-norm buffer changed, and success was reported where eval mode fails."""
    x, y, t = two
    mt = copy.deepcopy(model).train()
    before = copy.deepcopy(mt.state_dict())
    attack = attacks.create("bpda", rounds=2)
    res_train = attack(Defended(defenses.create("dct-distort"), mt), x, labels=y, targets=t, generator=0)
    assert mt.training
    for k, v in before.items():
        assert torch.equal(v, mt.state_dict()[k]), k
    res_eval = attack(Defended(defenses.create("dct-distort"), copy.deepcopy(model).eval()), x, labels=y, targets=t, generator=0)
    torch.testing.assert_close(res_train.adversarial, res_eval.adversarial)
    assert torch.equal(res_train.success, res_eval.success)


@pytest.mark.parametrize("name", ["fd", "dct-distort", "tv", "bdr", "pd", "crop", "grid-distort"])
def test_case4_channels_last_batch_is_refused(name):
    """Was: a (2, 40, 36, 3) tensor came back."""
    with pytest.raises(ValueError, match=r"channels-last.*permute\(0, 3, 1, 2\)"):
        defenses.create(name)(torch.rand(2, 40, 36, 3))

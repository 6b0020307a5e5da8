"""What a newcomer's review of the defense, metric and data API found (2026-11-30): replayed
draws, casts, parameters and metrics that accepted wrong input. Each test feeds the case and
checks the one-line error or the right value."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prepdefense import defenses, metrics
from prepdefense.data import loading
from prepdefense.defenses import Compose, Defended
from prepdefense.draws import as_key
from prepdefense.errors import DataError
from prepdefense.validation import range_tolerance
from toy_models import TinyConvNet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def x():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["dct-distort", "rand", "crop", "pd", "grid-distort", "fd+rand"])
def test_a_saved_draw_replays_through_the_call_and_is_checked(x, name):
    """Was: apply(x[2:], params) silently used images 0 and 1's draws, or raised a raw
    IndexError / RuntimeError."""
    d = defenses.create(name)
    p = d.sample_params(x, 0)
    assert torch.equal(d(x, params=p), d(x, generator=0))
    assert torch.equal(d(x[2:], params=p.select(slice(2, 4))), d(x, generator=0)[2:])
    with pytest.raises(ValueError, match=r"the draw is for 4 images but x has 2.*params\.select"):
        d(x[2:], params=p)
    with pytest.raises(ValueError, match="not both"):
        d(x, params=p, generator=1)
    with pytest.raises(TypeError, match="Params"):
        d(x, params=dict(p))


def test_replay_on_a_deterministic_defense_and_through_defended(x):
    with pytest.raises(ValueError, match="deterministic"):
        defenses.create("fd")(x, params=defenses.create("rand").sample_params(x, 0))
    model = Defended(defenses.create("rand"), TinyConvNet().eval())
    p = model.sample_params(x, 3)
    assert torch.equal(model(x, params=p), model(x, generator=3))
    with pytest.raises(ValueError, match="the draw is for 4 images"):
        model(x[:1], params=p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_cast_keeps_the_quantization_table(x, dtype):
    """Was: .half() rounded the float64 table and changed the defense (up to 0.024 per pixel)."""
    d = defenses.create("dct-distort")
    cast = copy.deepcopy(d).to(dtype)
    assert cast.quantize.table.dtype == torch.float64
    assert torch.equal(cast.quantize.table, d.quantize.table)
    assert defenses.state_digest(cast) == defenses.state_digest(d)
    xd = x.to(dtype)
    assert torch.equal(cast(xd, generator=0), d(xd, generator=0))


def test_ssim_checks_its_inputs(x):
    with pytest.raises(ValueError, match="data_range=255"):
        metrics.ssim(x * 255, x * 255)
    torch.testing.assert_close(metrics.ssim(x * 255, (x * 255).flip(0), data_range=255), metrics.ssim(x, x.flip(0)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.ssim(torch.full_like(x, float("nan")), x)
    with pytest.raises(ValueError, match="channels-last"):
        metrics.ssim(x.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1))
    with pytest.raises(TypeError, match="torch.Tensor"):
        metrics.ssim([1.0], x)
    assert metrics.ssim(x[:0], x[:0]).shape == (0,)


def test_accuracy_refuses_nan_logits_and_labels_beyond_the_classes():
    """Was: NaN logits scored 1.0 against label 0 (argmax picks 0); labels >= K scored 0 silently."""
    with pytest.raises(ValueError, match="NaN"):
        metrics.accuracy(torch.full((2, 5), float("nan")), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        metrics.accuracy(torch.zeros(2, 10), torch.tensor([282, 3]))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        metrics.attack_success_rate(torch.zeros(2, 10), None, torch.tensor([282, 3]))


def test_distances_of_one_image_or_none(x):
    with pytest.raises(ValueError, match="unsqueeze"):
        metrics.l2_rms(x[0], x[1])
    assert metrics.l2_rms(x[:0], x[:0]).shape == (0,) and metrics.linf(x[:0], x[:0]).shape == (0,)
    torch.testing.assert_close(metrics.l2_rms(x[:1], x[1:2]), ((x[0] - x[1]) ** 2).mean().sqrt().view(1))


@pytest.mark.parametrize("call, error, match", [
    (lambda: defenses.create(None), TypeError, "'none'"),
    (lambda: defenses.create(""), ValueError, "empty"),
    (lambda: defenses.create("bdr[bits=2.5]"), ValueError, "whole number"),
    (lambda: defenses.create("bdr", bits=2.7), ValueError, "whole number"),
    (lambda: defenses.create("jpeg[quality=50.5]"), ValueError, "whole number"),
    (lambda: defenses.create("rand[pad_value=2]"), ValueError, r"\[0, 1\]"),
    (lambda: defenses.create("tv[max_iter=0]"), ValueError, "max_iter must be >= 1"),
    (lambda: defenses.create("tv[eps=-1]"), ValueError, "eps"),
])
def test_defense_names_and_parameters_are_checked(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_an_integral_float_parameter_is_the_same_defense(x):
    assert torch.equal(defenses.create("bdr", bits=3.0)(x), defenses.create("bdr")(x))


@pytest.mark.parametrize("defend_at, error", [("299", TypeError), (True, TypeError), ((1, 2, 3), ValueError), (48.7, ValueError), (0, ValueError)])
def test_defend_at_is_parsed_strictly(defend_at, error):
    """Was: "299" became (2, 9) and (1, 2, 3) became (1, 2)."""
    with pytest.raises(error, match="defend_at"):
        Defended(defenses.create("fd"), TinyConvNet().eval(), defend_at=defend_at)


def test_defended_refuses_a_class_or_a_name_for_the_model():
    with pytest.raises(TypeError, match=r"pass an instance, Identity\(\)"):
        Defended(nn.Identity, TinyConvNet().eval())
    with pytest.raises(TypeError, match="classifier module"):
        Defended(defenses.create("fd"), "efficientnet-lite0")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trips_are_rounding_not_normalisation(x, dtype):
    """A half-precision normalise/denormalise round trip leaves values a few of the dtype's
    rounding units below 0: clamped, not refused as a normalised image."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    xh = torch.zeros(1, 3, 32, 32).to(dtype)
    trip = ((xh - mean.to(dtype)) / std.to(dtype)) * std.to(dtype) + mean.to(dtype)
    assert float(trip.min()) < -1e-4  # the round trip does leave such values
    assert -float(trip.min()) <= range_tolerance(dtype)
    assert torch.equal(defenses.create("fd")(trip), defenses.create("fd")(trip.clamp(0, 1)))
    with pytest.raises(ValueError, match="normalisation"):
        defenses.create("fd")((x.to(dtype) - mean.to(dtype)) / std.to(dtype))


def test_a_plain_module_defense_is_checked_and_composes(x):
    class Scale(nn.Module):
        def forward(self, t):
            return t * 255

    class NoGenerator(nn.Module):
        randomized = True

        def forward(self, t):
            return t

    net = TinyConvNet().eval()
    with pytest.raises(ValueError, match="output of the defense Scale"):
        Defended(Scale(), net)(x)
    with pytest.raises(TypeError, match="takes no generator"):
        Defended(NoGenerator(), net)(x, generator=0)
    pooled = Compose([defenses.create("fd"), nn.AvgPool2d(3, 1, 1)])(x)
    torch.testing.assert_close(pooled, nn.AvgPool2d(3, 1, 1)(defenses.create("fd")(x)))


def test_loading_sizes_are_whole_numbers(tmp_path):
    with pytest.raises(DataError, match="whole number"):
        loading.load_dataset("builtin", size=32.5)
    with pytest.raises(DataError, match="whole number"):
        loading.load_dataset("builtin", size="32")


def test_negative_seeds_are_refused():
    """Was: -1 drew what 2**63-1 draws."""
    with pytest.raises(ValueError, match="2\\*\\*63-1"):
        as_key(-1, 2)


def test_a_draw_that_does_not_fit_gets_a_clear_error(x):
    """A draw with no recorded size (built by hand, or saved before sizes were recorded)
    that indexes outside x; a recorded size is refused before (test_draw_image_size.py)."""
    big = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for name in ("crop", "pd"):
        d = defenses.create(name)
        params = d.sample_params(big, 0)
        params.image_size = None
        with pytest.raises(ValueError, match="does not fit"):
            d(x[:2], params=params)
    with pytest.raises(ValueError, match="does not fit"):
        defenses.create("rand")(x, params=defenses.create("grid-distort").sample_params(x, 0))


def test_a_type_error_of_the_module_itself_is_not_blamed_on_generator(x):
    class Broken(nn.Module):
        randomized = True

        def forward(self, t, generator=None):
            return t + torch.rand(t.shape, generator=generator, dtype="float")

    with pytest.raises(TypeError) as err:
        Defended(Broken(), TinyConvNet().eval())(x, generator=0)
    assert "takes no generator" not in str(err.value)


def test_infinite_logits_are_predictions_nan_are_not():
    logits = torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf"), 2.0, 0.0]])
    assert metrics.accuracy(logits, torch.tensor([2, 1])) == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ssim_takes_half_precision_within_its_rounding(x, dtype):
    xh = x.to(dtype)
    xh[0, 0, 0, 0] = 1 + torch.finfo(dtype).eps
    assert metrics.ssim(xh, xh).shape == (4,)


def test_a_bad_input_size_on_the_model_is_named_as_such(x):
    net = TinyConvNet().eval()
    net.input_size = (3, 24, 24)
    with pytest.raises(ValueError, match="input_size"):
        Defended(defenses.create("fd"), net, defend_at=32)(x)


def test_a_whole_float_for_an_integer_parameter_is_one_id():
    assert defenses.normalize_name("bdr[bits=3.0]") == "bdr"
    assert defenses.normalize_name("bdr[bits=2.0]") == defenses.normalize_name("bdr[bits=2]") == "bdr[bits=2]"

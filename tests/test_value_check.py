"""The value check of `prepdefense.validation` (issue 11) reads floats as integers in its fast
path (`unit_interval_bits`): it must decide exactly as the plain float check does, for every
float dtype, special value and memory layout."""

from __future__ import annotations

import math

import pytest
import torch

from prepdefense.validation import RANGE_TOLERANCE, check_extremes, check_value_range, range_tolerance, unit_interval_bits

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SPECIAL = (0.0, -0.0, 1.0, 0.5, 1 + 5e-5, -5e-5, 1 + 3e-4, -3e-4, 255.0, -1.0,
           math.nan, -math.nan, math.inf, -math.inf)


def reference(t: torch.Tensor):
    """The plain float decision: ("raises", None) or ("ok", must_clamp), at the dtype's tolerance
    (two units of its rounding in half precision)."""
    wide = t.double()
    try:
        return "ok", check_extremes(float(wide.min()), float(wide.max()), tolerance=range_tolerance(t.dtype))
    except ValueError:
        return "raises", None


def decision(t: torch.Tensor):
    try:
        return "ok", check_value_range(t)
    except ValueError:
        return "raises", None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", SPECIAL + ("next-above-1", "next-below-0"))
def test_fast_check_decides_as_the_float_check(dtype, value):
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    if value == "next-above-1":
        value = float(torch.nextafter(torch.ones((), dtype=torch.float32), torch.full((), 2.0)).to(dtype))
        value = value if value > 1 else float(torch.tensor(1.0, dtype=dtype) + torch.finfo(dtype).eps)
    elif value == "next-below-0":
        value = -float(torch.finfo(dtype).tiny)
    x[1, 2, 4, 6] = value
    for layout in (x, x.transpose(2, 3), x[:, :, ::2, 1:], x[1:, :1].expand(4, 3, 5, 7)):
        assert decision(layout) == reference(layout), (dtype, value)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clean_images_pass_and_the_bits_of_one(dtype):
    int_dtype, one = unit_interval_bits(dtype)
    assert torch.tensor([one], dtype=int_dtype).view(dtype).item() == 1.0
    x = torch.rand(4, 3, 8, 8, dtype=torch.float32).to(dtype)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0
    assert check_value_range(x) is False
    assert unit_interval_bits(torch.int64) is None


def test_tolerance_edges_follow_the_tolerance():
    inside, beyond = RANGE_TOLERANCE / 2, RANGE_TOLERANCE * 2
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    x[0, 0, 0, 0] = 1 + inside
    assert check_value_range(x) is True
    x[0, 0, 0, 0] = 1 + beyond
    with pytest.raises(ValueError, match="tolerance"):
        check_value_range(x)


# --- turning the value check off (validation.no_value_checks), issue 9 item 8 ---------------

from prepdefense import defenses  # noqa: E402
from prepdefense.validation import no_value_checks, set_value_checks, value_checks_enabled  # noqa: E402

OFF_DEFENSES = ("dct-distort", "dct-quant", "rand", "bdr")  # the kernel's own check, and the boundary's


@pytest.mark.parametrize("name", OFF_DEFENSES)
def test_no_value_checks_skips_the_value_check_only_inside_the_block(name):
    d = defenses.create(name)
    bad = torch.full((1, 3, 16, 16), 2.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        d(bad, generator=torch.Generator().manual_seed(0))
    with no_value_checks():
        assert not value_checks_enabled()
        assert d(bad, generator=torch.Generator().manual_seed(0)).shape[0] == 1
        with pytest.raises(ValueError, match="channels-last"):  # shapes and layouts are still checked
            d(torch.rand(1, 16, 16, 3), generator=torch.Generator().manual_seed(0))
    assert value_checks_enabled()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        d(bad, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", OFF_DEFENSES)
def test_outputs_on_clean_images_do_not_depend_on_the_check(name):
    d = defenses.create(name)
    x = torch.rand(3, 3, 21, 19, generator=torch.Generator().manual_seed(1))
    on = d(x, generator=torch.Generator().manual_seed(2))
    with no_value_checks():
        off = d(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(on, off)


def test_no_value_checks_restores_on_error_and_nests():
    with pytest.raises(RuntimeError, match="boom"):
        with no_value_checks():
            raise RuntimeError("boom")
    assert value_checks_enabled()
    with no_value_checks():
        with no_value_checks():
            pass
        assert not value_checks_enabled()  # the inner block restores the outer block's setting
    assert value_checks_enabled()


def test_set_value_checks_returns_the_previous_setting_and_takes_bools_only():
    assert set_value_checks(False) is True
    try:
        assert set_value_checks(False) is False
        with pytest.raises(TypeError, match="True or False"):
            set_value_checks(0)
    finally:
        assert set_value_checks(True) is False


def test_blocks_closing_out_of_order_leave_the_check_on():
    """Two blocks (two threads, or generators) that close in another order than they opened."""
    a, b = no_value_checks(), no_value_checks()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert not value_checks_enabled()  # b is still open
    b.__exit__(None, None, None)
    assert value_checks_enabled()


def test_a_users_module_output_is_checked_with_the_switch_off():
    from torch import nn

    from prepdefense.defenses.base import as_defense

    class Times255(nn.Module):
        def forward(self, x):
            return x * 255

    d = as_defense(Times255())
    with no_value_checks():
        with pytest.raises(ValueError, match="the output of the defense"):
            d(torch.rand(1, 3, 8, 8))

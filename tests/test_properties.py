"""Property-based checks of the input boundary (issue 11, item 6), with hypothesis.

Every registered defense and attack, on random batch sizes (including 1), sizes from the
smallest allowed to 512 (odd, non-multiples of 8), 1 and 3 channels, float32 and float64,
values at exactly 0 and 1: each either returns a valid result (shape, range, finite) or raises
the documented error (``ValueError`` / ``TypeError`` with a one-line message), never NaN and
never a raw torch error.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from prepdefense import attacks, defenses
from prepdefense.attacks.bpda import with_bpda
from prepdefense.defenses import Defended

#: Defenses whose CPU cost grows fast with the image (TV's solver, PD's wavelets, SHIELD's JPEGs):
#: smaller images and fewer examples keep the default suite fast.
HEAVY = {"tv", "pd", "shield", "crop"}
DOCUMENTED = (ValueError, TypeError)


def _images(draw, max_side: int):
    n = draw(st.integers(1, 3))
    c = draw(st.sampled_from([1, 3]))
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["rand", "zeros", "ones", "binary"]))
    g = torch.Generator().manual_seed(seed)
    if kind == "rand":
        x = torch.rand(n, c, h, w, generator=g, dtype=dtype)
    elif kind == "zeros":
        x = torch.zeros(n, c, h, w, dtype=dtype)
    elif kind == "ones":
        x = torch.ones(n, c, h, w, dtype=dtype)
    else:
        x = (torch.rand(n, c, h, w, generator=g, dtype=dtype) > 0.5).to(dtype)
    return x


@st.composite
def small_images(draw):
    return _images(draw, 64)


@st.composite
def large_images(draw):
    return _images(draw, 512)


def _check_defense_output(d, x, y):
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype
    assert y.shape[:2] == x.shape[:2]
    if not d.changes_size:
        assert y.shape == x.shape
    assert torch.isfinite(y).all(), "NaN or inf in a defense's output"
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def _run_defense(name, x):
    d = defenses.create(name)
    try:
        y = d(x, generator=0)
    except DOCUMENTED as e:
        assert "\n" not in str(e) and str(e), f"{name}: error message must be one line: {e!r}"
        return
    _check_defense_output(d, x, y)


@pytest.mark.parametrize("name", [n for n in defenses.names() if n not in HEAVY])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=large_images())
def test_defense_valid_or_documented_error(name, x):
    _run_defense(name, x)


@pytest.mark.parametrize("name", sorted(HEAVY & set(defenses.names())))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=small_images())
def test_heavy_defense_valid_or_documented_error(name, x):
    _run_defense(name, x)


class _AnySize(nn.Module):
    """A tiny classifier for any size and 1 or 3 channels (channel mean, then linear)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64))

    def forward(self, x):
        z = x.double().mean(dim=(2, 3))
        z = z.expand(-1, 3) if z.shape[1] == 1 else z
        return (z * 4 - 2) @ self.weight.t()


SMALL_ATTACK = {
    "fgsm": {}, "bim": dict(steps=2), "i-fgsm": dict(steps=2), "pgd": dict(steps=2), "mi-fgsm": dict(steps=2),
    "adaptive": dict(steps=2, eot=2, draws=2, restarts=1), "bpda": dict(rounds=2), "bpda-eot": dict(rounds=2, eot=2),
    "cw": dict(binary_search_steps=1, steps=3), "lbfgs": dict(binary_search_steps=1, max_iterations=3),
    "deepfool": dict(steps=2),
    "apgd": dict(steps=3, eot=2), "apgd-ce": dict(steps=3), "apgd-dlr": dict(steps=3), "square": dict(queries=4, eot=2),
    "spsa": dict(steps=2, samples=2), "transfer": dict(steps=2),
}


@pytest.mark.parametrize("name", attacks.names())
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=small_images(), defense=st.sampled_from(["none", "bdr", "grid-distort", "fd"]))
def test_attack_valid_or_documented_error(name, x, defense):
    clf = _AnySize()
    model = clf if defense == "none" else Defended(defenses.create(defense), clf)
    attack = attacks.create(name, **SMALL_ATTACK[name])
    if not attack.composes_bpda:
        model = with_bpda(model)
    with torch.no_grad():
        labels = (model(x, generator=0) if getattr(model, "randomized", False) else model(x)).argmax(1)
    targets = (labels + 1) % 5 if attack.supports_targeted else None
    try:
        res = attack(model, x, labels=labels, targets=targets, generator=1)
    except DOCUMENTED as e:
        assert "\n" not in str(e) and str(e), f"{name}: error message must be one line: {e!r}"
        return
    adv = res.adversarial
    assert adv.shape == x.shape and torch.isfinite(adv).all(), f"{name}: NaN or inf in the adversarial images"
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert res.success.shape == (x.shape[0],)


@pytest.mark.parametrize("name", ["cw", "lbfgs", "pgd", "deepfool", "adaptive", "apgd", "square", "spsa"])
def test_values_a_rounding_step_outside_the_box_are_clamped_not_nan(name):
    """A pixel at 1 + 1e-6 (a normalise/denormalise round trip) must not turn into NaN (issue 11,
    case 1: C&W's atanh of the start point)."""
    clf = _AnySize()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[0, 0, 0, 0] = 1 + 1e-6
    x[1, 1, 1, 1] = -1e-6
    labels = clf(x.clamp(0, 1)).argmax(1)
    attack = attacks.create(name, **SMALL_ATTACK[name])
    targets = (labels + 1) % 5 if attack.supports_targeted else None
    res = attack(clf, x, labels=labels, targets=targets, generator=0)
    assert torch.isfinite(res.adversarial).all()
    clean = attack(clf, x.clamp(0, 1), labels=labels, targets=targets, generator=0)
    torch.testing.assert_close(res.adversarial, clean.adversarial)  # the same as on the clamped batch
    assert torch.equal(res.success, clean.success)


def test_out_of_range_images_are_refused_with_the_fix():
    clf = _AnySize()
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="divide 0..255 images by 255"):
        attacks.create("pgd", steps=1)(clf, torch.rand(2, 3, 8, 8) * 255, labels=labels)
    with pytest.raises(ValueError, match="undo the normalisation"):
        attacks.create("pgd", steps=1)(clf, torch.rand(2, 3, 8, 8) - 0.5, labels=labels)
    with pytest.raises(TypeError, match="/ 255"):
        defenses.create("fd")(torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8))


@pytest.mark.parametrize("name", ["fd", "dct-distort", "tv", "bdr", "pd", "crop", "grid-distort", "jpeg", "rand"])
def test_channels_last_is_refused(name):
    """Issue 11, case 4: a channels-last batch returned a (2, 40, 36, 3) tensor."""
    with pytest.raises(ValueError, match="channels-last"):
        defenses.create(name)(torch.rand(2, 40, 36, 3))


def test_labels_and_targets_checked():
    clf = _AnySize()
    x = torch.rand(2, 3, 8, 8)
    pgd = attacks.create("pgd", steps=1)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        pgd(clf, x, labels=torch.tensor([0, 7]))
    with pytest.raises(TypeError, match="integers"):
        pgd(clf, x, labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="one-hot"):
        pgd(clf, x, labels=torch.eye(5)[:2].long())
    with pytest.raises(ValueError, match="targets equal the true labels"):
        pgd(clf, x, labels=torch.tensor([0, 1]), targets=torch.tensor([0, 2]))


@pytest.mark.parametrize("name", ["fd", "dct-quant", "dct-distort", "fd+rand"])
@pytest.mark.parametrize("n", [1, 2, 10])
def test_kernel_checks_values_like_the_boundary(name, n, two_threads):
    """Step 1's kernel checks its own copy of the input (``checks_values_in_apply``), on the
    per-step worker path and on the one-step path used off the CPU: NaN, infinities and 0..255
    values anywhere in the batch are refused with the boundary's message, and values a rounding
    step outside [0, 1] give the output of the clamped batch."""
    from prepdefense.cpu_workers import CPUWorkers, use
    from prepdefense.defenses.kernels.dct_quant import quantize_and_read
    from prepdefense.defenses.quant_tables import FD_TABLE

    d = defenses.create(name)
    x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(n))
    runs = (
        lambda t: d(t, generator=0),  # the defense, through the steps of the worker pool
        lambda t: quantize_and_read(t, FD_TABLE, batched=True, check_values=True),  # one step
    )
    with use(CPUWorkers(step_elements=3 * 16 * 16)):  # one image per step
        for run in runs:
            for bad, match in ((float("nan"), "NaN"), (float("inf"), "infinite"), (255.0, "divide 0..255")):
                xb = x.clone()
                xb[n - 1, 1, 5, 7] = bad
                with pytest.raises(ValueError, match=match):
                    run(xb)
            xe = x.clone()
            xe[n - 1, 0, 0, 0] = 1 + 5e-5
            xe[0, 2, 3, 3] = -5e-5
            assert torch.equal(run(xe), run(xe.clamp(0, 1)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY & set(defenses.names())))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=large_images())
def test_heavy_defense_up_to_512(name, x):
    """The heavy defenses on the full size range (the default suite stops them at 64)."""
    _run_defense(name, x)


@pytest.mark.slow
@pytest.mark.parametrize("name", attacks.names())
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=large_images(), defense=st.sampled_from(["none", "fd"]))
def test_attack_up_to_512(name, x, defense):
    """Every attack on the full size range (the default suite stops them at 64)."""
    test_attack_valid_or_documented_error.hypothesis.inner_test(name, x, defense)

"""The library's input boundary: what every public entry checks before it computes anything
(issue 11). A wrong input gets one line saying what is wrong and how to fix it, never a wrong
number or a raw torch error.

Images (PROTOCOL.md "Conventions"): a floating tensor, NCHW, 1 to 4 channels (RGB is 3), finite,
values in [0, 1]. Float rounding tolerance, explicit: values within
:data:`RANGE_TOLERANCE` (1e-4; in half precision two units of its rounding, :func:`range_tolerance`) outside [0, 1] (what a normalise/denormalise round trip or
a resize leaves) are accepted and clamped into [0, 1]; anything further out is an error,
since it means the image is in 0..255 or still normalised.

Labels and targets: integer tensors of shape (N,), values in [0, K) for a K-class model
(any integer dtype; they are returned as int64, what torch's losses take); a target equal to
the image's true label is an error (success would be trivial).

Counts (steps, draws, queries, batch sizes): whole numbers, at least 1 unless said otherwise;
``2.0`` is taken as 2, ``2.7`` and ``True`` are refused (never silently truncated).

Errors: ``TypeError`` for the wrong kind of object or dtype, ``ValueError`` for the wrong
shape, layout, range or values.

The value check (finite, in [0, 1]) reads every value once per call, 5-7% of a ``dct-distort``
call on the CPU (``benchmarks/bench_value_check.py``). Where the inputs are known to be in
[0, 1] and that time matters, :func:`no_value_checks` turns it off, as
``torch.distributions.Distribution.set_default_validate_args(False)`` does for torch's
distributions (what it covers: :func:`set_value_checks`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Optional, Tuple

import torch

__all__ = ["RANGE_TOLERANCE", "range_tolerance", "MAX_CHANNELS", "value_checks_enabled", "set_value_checks",
           "no_value_checks", "check_int", "check_images", "check_value_range", "check_extremes", "unit_interval_bits", "check_labels", "check_targets", "check_pair"]

#: How far outside [0, 1] an image value may be and still count as float rounding (it is clamped);
#: in half precision, two units of the dtype's rounding (:func:`range_tolerance`).
RANGE_TOLERANCE = 1e-4


_value_checks = True  # the process-wide setting (set_value_checks)
_off_blocks = 0  # open no_value_checks() blocks, in any thread
_off_lock = threading.Lock()


def value_checks_enabled() -> bool:
    """Whether image values are checked (finite, in [0, 1]) at the boundary: ``True`` unless
    turned off by :func:`set_value_checks` or while a :func:`no_value_checks` block is open."""
    return _value_checks and _off_blocks == 0


def set_value_checks(enabled: bool) -> bool:
    """Turn the check of image values (finite, in [0, 1]; clamping within the tolerance) on or
    off for the whole process, every thread included; returns the previous setting.

    What it covers: the image inputs of the defenses, :class:`~prepdefense.defenses.Defended`,
    EOT and the attacks (:func:`check_images`), and the check inside ``dct-quant``'s and
    ``dct-distort``'s kernels. What stays checked: shapes, layouts and dtypes everywhere; the
    output of a user's plain module used as a defense; the metrics' inputs
    (:mod:`prepdefense.metrics`); the images ``judge`` reads.

    With the check off, an input image out of [0, 1] is neither refused nor clamped: the
    defenses compute on it as given, and their outputs are then not defined by the paper.
    Prefer :func:`no_value_checks`, which restores the setting.

    Raises:
        TypeError: ``enabled`` is not a bool.
    """
    global _value_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    previous = _value_checks
    _value_checks = enabled
    return previous


@contextlib.contextmanager
def no_value_checks() -> Iterator[None]:
    """While the ``with`` block is open, image values are not checked (what
    :func:`set_value_checks` covers). Blocks count, so they may nest, overlap and close in any
    order, in any thread: the check is back on once every open block has closed (unless
    :func:`set_value_checks` turned it off). Process-wide: calls in other threads are not
    checked while a block is open either.

    For inputs known to be in [0, 1] whose check costs measurable time: a throughput
    benchmark, or a loop that clamps its own images. Example::

        with prepdefense.validation.no_value_checks():
            out = defense(x, generator=g)
    """
    global _off_blocks
    with _off_lock:
        _off_blocks += 1
    try:
        yield
    finally:
        with _off_lock:
            _off_blocks -= 1


def range_tolerance(dtype: torch.dtype) -> float:
    """:data:`RANGE_TOLERANCE`, or two units of ``dtype``'s rounding where that is coarser
    (float16: 0.002, bfloat16: 0.016), so that a normalise/denormalise round trip in half
    precision is not mistaken for a normalised image."""
    if dtype.is_floating_point:
        return max(RANGE_TOLERANCE, 2 * torch.finfo(dtype).eps)
    return RANGE_TOLERANCE
#: Most channels an image may have (greyscale 1, RGB 3, RGBA 4; also 2 for tests of per-channel code).
MAX_CHANNELS = 4


def check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is a whole number >= ``minimum`` (an integral float such as
    ``2.0`` included).

    Raises:
        TypeError: not a number, or a bool.
        ValueError: not a whole number, or below ``minimum``.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
        value = value.item()
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a whole number >= {minimum}, got {type(value).__name__} {value!r}")
    if hasattr(value, "__index__"):
        count = int(value.__index__())
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a whole number >= {minimum}, got {type(value).__name__} {value!r}") from None
        if not (math.isfinite(number) and number.is_integer()):
            raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
        count = int(number)
    if count < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {count}")
    return count


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def check_images(x, *, name: str = "x", clamp: bool = True, channels: Optional[tuple] = None, values: bool = True) -> torch.Tensor:
    """Check an image batch and return it (clamped into [0, 1] when a value lies within
    :func:`range_tolerance` outside; the input itself is never modified).

    Args:
        x: (N, C, H, W) floating tensor in [0, 1].
        name: how the error messages call it.
        clamp: return ``x.clamp(0, 1)`` when needed (False: only check).
        channels: the channel counts allowed (default 1..:data:`MAX_CHANNELS`).
        values: check the values too (:func:`check_value_range`); False leaves that to a
            kernel that checks its own copy of the input. Not checked while
            :func:`value_checks_enabled` is False (:func:`no_value_checks`); a caller that
            must check whatever the switch says calls :func:`check_value_range` itself.

    Raises:
        TypeError: not a tensor, or not floating point.
        ValueError: not 4-D, channels-last, a channel count not allowed, empty spatial size,
            non-finite values, or values outside [0, 1] beyond the tolerance.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor image batch (N, C, H, W) in [0, 1], got {type(x).__name__}")
    if x.dim() == 3:
        raise ValueError(f"{name} has shape {_shape(x)}: expected a batch (N, C, H, W); for one image use {name}.unsqueeze(0)")
    if x.dim() != 4:
        raise ValueError(f"{name} has shape {_shape(x)}: expected an image batch (N, C, H, W)")
    c = x.shape[1]
    allowed = channels or tuple(range(1, MAX_CHANNELS + 1))
    if c not in allowed:
        if x.shape[-1] in allowed and x.shape[-1] != c:
            raise ValueError(
                f"{name} has shape {_shape(x)}, which looks channels-last (N, H, W, C); "
                f"pass {name}.permute(0, 3, 1, 2) to get (N, C, H, W)"
            )
        raise ValueError(f"{name} has {c} channels (shape {_shape(x)}); expected {' or '.join(map(str, allowed))} in NCHW layout")
    if not x.is_floating_point():
        hint = f" (an 8-bit image: use {name}.float() / 255)" if x.dtype == torch.uint8 else f" (use {name}.float())"
        raise TypeError(f"{name} has dtype {x.dtype}: images must be floating point in [0, 1]{hint}")
    if x.numel() == 0:
        if x.shape[0] == 0 and x.shape[2] > 0 and x.shape[3] > 0:
            return x
        raise ValueError(f"{name} has shape {_shape(x)}: images must have at least one pixel")
    if not values or not value_checks_enabled():
        return x
    if check_value_range(x, name=name) and clamp:
        return x.clamp(0.0, 1.0)
    return x


def check_value_range(t: torch.Tensor, *, name: str = "x") -> bool:
    """Check that every value of ``t`` is finite and in [0, 1] up to :func:`range_tolerance`
    (:data:`RANGE_TOLERANCE`, coarser in half precision);
    returns whether some value lies outside [0, 1] (within the tolerance), i.e. whether the
    caller must clamp. Kernels that copy their input anyway check their own copy, where the
    data is in cache (``Defense.checks_values_in_apply``, :func:`unit_interval_bits`).

    Raises:
        ValueError: NaN or infinite values, or values beyond the tolerance.
    """
    t = t.detach()
    bits = unit_interval_bits(t.dtype)
    if bits is not None and t.numel():
        int_dtype, one = bits
        lo, hi = torch.aminmax(t.view(int_dtype))
        if int(lo) >= 0 and int(hi) <= one:
            return False  # every value in [0, 1]: the common case, one integer pass
    # min and max propagate NaN, and an infinity is the min or the max, so the two extremes
    # being finite means every value is (isfinite().all() would cost ~15x more).
    lo_t, hi_t = torch.aminmax(t)
    return check_extremes(float(lo_t), float(hi_t), name=name, tolerance=range_tolerance(t.dtype))


_INT_OF_FLOAT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def unit_interval_bits(dtype: torch.dtype) -> Optional[Tuple[torch.dtype, int]]:
    """For an IEEE float dtype, the signed integer dtype of its width and the bit pattern of
    1.0 read as that integer (None for other dtypes).

    Read as signed integers of the same width, the floats in [0, 1] are exactly the values in
    ``[0, bits(1.0)]``: a negative float (and -0.0, -inf, a NaN with its sign bit set) reads
    negative, and anything above 1 (+inf, a NaN) reads above ``bits(1.0)``. So one integer
    ``aminmax`` (about 3x faster on the CPU than the float ``aminmax``, which is not
    vectorised as well; torch 2.13, measured per step of Step 1's kernel) proves a tensor
    clean in the common case; only a tensor that
    fails needs the float check, for the message and the tolerance.
    """
    int_dtype = _INT_OF_FLOAT.get(dtype)
    if int_dtype is None:
        return None
    return int_dtype, int(torch.ones((), dtype=dtype).view(int_dtype))


def check_extremes(lo: float, hi: float, *, name: str = "x", tolerance: float = RANGE_TOLERANCE) -> bool:
    """:func:`check_value_range` given the minimum and maximum (NaN if any value is NaN)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or infinite values; images must be finite, in [0, 1]")
    if lo < -tolerance or hi > 1 + tolerance:
        if lo < -tolerance:  # negative values: a mean/std normalised batch, whatever its maximum
            hint = "undo the normalisation (x * std + mean); models here take [0, 1] and normalise inside"
        elif hi > 1.5:
            hint = "divide 0..255 images by 255"
        else:
            hint = "clamp or rescale into [0, 1]"
        raise ValueError(f"{name} has values in [{lo:.4g}, {hi:.4g}]; images must be in [0, 1] (tolerance {tolerance:g}): {hint}")
    return lo < 0 or hi > 1


def check_labels(labels, n: int, *, num_classes: Optional[int] = None, name: str = "labels") -> torch.Tensor:
    """Check class indices for ``n`` images and return them as int64 (``labels`` itself when it
    is int64 already; int32 or uint8 indices are converted, as torch's losses take int64 only).

    Raises:
        TypeError: not an integer tensor.
        ValueError: not of shape (n,), or values outside [0, num_classes).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, shape ({n},), got {type(labels).__name__}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} has dtype {labels.dtype}: class indices must be integers (use {name}.long()); one-hot labels: {name}.argmax(1)")
    if labels.shape != (n,):
        hint = f"; one-hot labels: use {name}.argmax(1)" if labels.dim() == 2 and labels.shape[0] == n else ""
        raise ValueError(f"{name} must have shape ({n},) for {n} images, got {_shape(labels)}{hint}")
    if n:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            top = f"{num_classes - 1}" if num_classes is not None else "K-1"
            raise ValueError(f"{name} has values in [{lo}, {hi}]; class indices must be in [0, {top}]")
    return labels if labels.dtype == torch.int64 else labels.long()


def check_targets(targets, labels: torch.Tensor, *, num_classes: Optional[int] = None) -> Optional[torch.Tensor]:
    """Check attack targets against the true labels (None: untargeted) and return them.

    Raises:
        TypeError / ValueError: as :func:`check_labels`, and a target equal to its image's label.
    """
    if targets is None:
        return None
    targets = check_labels(targets, labels.shape[0], num_classes=num_classes, name="targets")
    same = (targets.to(labels.device) == labels).nonzero().flatten()
    if same.numel():
        raise ValueError(
            f"targets equal the true labels for images {same.tolist()[:10]}; a targeted attack needs another class "
            f"(pass targets=None for an untargeted attack)"
        )
    return targets


def check_pair(a, b, *, names=("a", "b")) -> None:
    """Two image batches of one shape (for distances and SSIM)."""
    check_images(a, name=names[0], clamp=False)
    check_images(b, name=names[1], clamp=False)
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have one shape, got {_shape(a)} and {_shape(b)}")

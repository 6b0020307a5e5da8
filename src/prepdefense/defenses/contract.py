"""The defense contract, as checks any defense can be held to (issue 12, item 2; STYLE.md).

What every defense of the library promises, and what a user's defense must promise before the
attacks and verdicts of this library mean anything for it:

=====================  ==================================================================
check                  holds when
=====================  ==================================================================
declared attributes    ``randomized``/``differentiable``/``changes_size`` are bools,
                       ``ensemble`` an integer >= 1
shape kept             (N, C, H, W) -> (N, C, H, W), or ``output_size(H, W)`` when it
                       declares ``changes_size``
range kept             finite, within [0, 1]
dtype and device kept  float32 and float64 in, the same out, on the input's device
input left unchanged   the input tensor is not modified in place
no global RNG          torch's, NumPy's and Python's global random states are untouched
                       by a call given a generator (draws come from the generator)
reproducible           the same key, seed or seeded ``torch.Generator`` gives the same
                       output bit for bit; ``apply(x, sample_params(x, key))`` equals
                       ``forward(x, generator=key)``
batch = one at a time  image i of a batch equals image i alone under the same per-image
                       key (within 1e-5)
randomized claim       two keys give different outputs exactly when ``randomized``
                       (a deterministic defense also gives one output across calls
                       without a generator)
differentiable claim   a useful gradient (finite, not all zero) reaches the input exactly
                       when ``differentiable``; a non-differentiable defense's output is
                       off the autograd graph
state rebuilt equal    (given a way to build it again) two builds hold the same values
                       (:func:`~prepdefense.defenses.state.state_digest`), so a run stored
                       under the defense's name resumes with the same defense; tensors
                       held as plain attributes are compared too, and named in a note
                       (a run store cannot record them: ``register_buffer`` them)
=====================  ==================================================================

:func:`check_contract` runs them on a few generated images and returns a
:class:`ContractReport` (``passed``, a table); an exception inside the defense fails the
check it happened in, with the reason. ``prepdefense check-defense NAME`` prints that table and
exits 1 when a check fails; the tests hold the library's defenses to it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..draws import DrawKey, image_id
from .base import as_defense
from .state import plain_tensors, state_digest

__all__ = ["Check", "ContractReport", "check_contract", "contract_images", "BATCH_ATOL"]

#: Largest difference allowed between an image's output in a batch and alone.
BATCH_ATOL = 1e-5


@dataclass
class Check:
    """One line of the contract: its name, whether it held (None: not applicable) and why."""

    name: str
    passed: Optional[bool]
    detail: str = ""

    @property
    def status(self) -> str:
        return {True: "pass", False: "FAIL", None: "n/a"}[self.passed]


@dataclass
class ContractReport:
    """The checks of one defense, in order."""

    defense: str
    randomized: bool
    differentiable: bool
    checks: List[Check] = field(default_factory=list)
    setting: str = ""

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    @property
    def failures(self) -> List[Check]:
        return [c for c in self.checks if c.passed is False]

    def table(self) -> str:
        """A plain-text table: one row per check (check, result, detail)."""
        width = max(len("check"), *(len(c.name) for c in self.checks))
        lines = [f"defense {self.defense}: randomized={self.randomized}, differentiable={self.differentiable}"
                 + (f" ({self.setting})" if self.setting else ""),
                 f"  {'check'.ljust(width)}  result  detail"]
        lines += [f"  {c.name.ljust(width)}  {c.status.ljust(6)}  {c.detail}" for c in self.checks]
        lines.append(f"  {'contract'.ljust(width)}  {'pass' if self.passed else 'FAIL'}    "
                     + ("every check holds" if self.passed else f"{len(self.failures)} check(s) failed"))
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {"defense": self.defense, "randomized": self.randomized, "differentiable": self.differentiable,
                "passed": self.passed, "setting": self.setting,
                "checks": [{"check": c.name, "result": c.status, "passed": c.passed, "detail": c.detail} for c in self.checks]}


def contract_images(n: int = 4, size: int = 64, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` smooth-plus-noise RGB images touching 0 and 1, from their own generator (the
    global RNG is never used). Shape: (n, 3, size, size)."""
    g = torch.Generator().manual_seed(int(seed))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([yy, xx, (yy + xx) / 2]).expand(n, 3, size, size)
    return (base + 0.15 * torch.randn((n, 3, size, size), generator=g)).clamp(0, 1).to(device=device, dtype=dtype)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:160]


def _global_states() -> Tuple[torch.Tensor, Any, Any, Optional[List[torch.Tensor]]]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), np.random.get_state(), random.getstate(), cuda


def _changed_states(before, after) -> List[str]:
    names = []
    if not torch.equal(before[0], after[0]):
        names.append("torch (torch.rand/randn/randint/randperm... without generator=)")
    if not (before[1][0] == after[1][0] and np.array_equal(before[1][1], after[1][1]) and before[1][2:] == after[1][2:]):
        names.append("NumPy (np.random.*)")
    if before[2] != after[2]:
        names.append("Python's random module")
    if before[3] is not None and after[3] is not None and not all(torch.equal(a, b) for a, b in zip(before[3], after[3])):
        names.append("torch CUDA")
    return names


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


class _Runner:
    """Runs the checks in order, turning an exception in the defense into a failed check."""

    def __init__(self) -> None:
        self.checks: List[Check] = []

    def run(self, name: str, fn: Callable[[], Tuple[Optional[bool], str]]) -> None:
        try:
            passed, detail = fn()
        except Exception as e:  # the defense's own code: any failure fails this check, with the reason
            passed, detail = False, f"raised {_first_line(e)}"
        self.checks.append(Check(name, passed, detail))


def check_contract(defense: nn.Module, *, name: Optional[str] = None, n: int = 4, size: int = 64, seed: int = 0,
                   device: torch.device | str = "cpu", rebuild: Optional[Callable[[], nn.Module]] = None) -> ContractReport:
    """Hold ``defense`` to the contract (module docstring) on ``n`` generated ``size x size``
    images on ``device``; ``seed`` fixes the images and the keys. ``rebuild``: builds the
    defense again (``lambda: defenses.create(name)``), for the "state rebuilt equal" check
    (n/a without it).

    Raises:
        ValueError: ``n`` below 2 or ``size`` below 8 (too few to check anything).
    """
    if n < 2:
        raise ValueError(f"the contract needs at least 2 images (two draws, a batch), got n={n}")
    if size < 8:
        raise ValueError(f"the contract needs images of at least 8x8, got size={size}")
    d = as_defense(defense)
    label = name or type(defense).__name__
    randomized = getattr(d, "randomized", False)
    differentiable = getattr(d, "differentiable", False)
    report = ContractReport(label, bool(randomized), bool(differentiable),
                            setting=f"{n} images 3x{size}x{size}, seed {seed}, {torch.device(device)}")
    r = _Runner()
    try:  # the values as built, before any check runs the defense (a first call may fill a cache)
        built_state: Tuple[Optional[str], Optional[str]] = (state_digest(defense), None)
    except Exception as e:  # noqa: BLE001 - reported by the check, like any failure of the defense
        built_state = (None, _first_line(e))
    built_plain: Tuple[Dict[str, str], Optional[str]] = ({}, None)
    if rebuild is not None:
        try:
            built_plain = (plain_tensors(defense), None)
        except Exception as e:  # noqa: BLE001 - reported by the check, like any failure of the defense
            built_plain = ({}, _first_line(e))
    x = contract_images(n, size, seed=seed, device=device)
    ids = [image_id(f"contract-{i}") for i in range(n)]
    key = DrawKey(seed, ids)
    outputs: Dict[str, torch.Tensor] = {}

    def declared() -> Tuple[bool, str]:
        bad = [f"{a}={getattr(d, a, None)!r}" for a in ("randomized", "differentiable", "changes_size")
               if not isinstance(getattr(d, a, None), bool)]
        ens = getattr(d, "ensemble", 1)
        if isinstance(ens, bool) or not isinstance(ens, int) or ens < 1:
            bad.append(f"ensemble={ens!r}")
        if bad:
            return False, "must be bools (ensemble an integer >= 1): " + ", ".join(bad)
        return True, (f"randomized={d.randomized}, differentiable={d.differentiable}, "
                      f"ensemble={d.ensemble}, changes_size={d.changes_size}")

    r.run("declared attributes", declared)

    def no_global_rng() -> Tuple[bool, str]:
        before = _global_states()
        with torch.no_grad():
            outputs["key"] = d(x, generator=key)
            if d.randomized:
                d.apply(x, d.sample_params(x, key))
            d(x, generator=torch.Generator().manual_seed(seed))
        changed = _changed_states(before, _global_states())
        if changed:
            return False, ("draws from the global random state of " + " and ".join(changed)
                           + "; draw from the generator it is given (see Defense.draw)")
        return True, "global torch, NumPy and Python random states untouched"

    r.run("no global RNG", no_global_rng)

    def out() -> torch.Tensor:
        if "key" not in outputs:
            with torch.no_grad():
                outputs["key"] = d(x, generator=key)
        return outputs["key"]

    def shape_kept() -> Tuple[bool, str]:
        y = out()
        if not isinstance(y, torch.Tensor) or y.dim() != 4 or tuple(y.shape[:2]) != tuple(x.shape[:2]):
            return False, f"returned {tuple(getattr(y, 'shape', ())) or type(y).__name__} for input {tuple(x.shape)}"
        expected = tuple(d.output_size(size, size)) if d.changes_size else (size, size)
        if tuple(y.shape[2:]) != expected:
            why = "output_size() says" if d.changes_size else "changes_size is False, so"
            return False, f"output {tuple(y.shape)} but {why} {expected}"
        return True, f"{tuple(x.shape)} -> {tuple(y.shape)}"

    r.run("shape kept", shape_kept)

    def range_kept() -> Tuple[bool, str]:
        y = out()
        if not bool(torch.isfinite(y).all()):
            return False, "output has NaN or infinite values"
        lo, hi = float(y.min()), float(y.max())
        if lo < 0 or hi > 1:
            return False, f"output spans [{lo:.4g}, {hi:.4g}], outside [0, 1]; clamp it"
        return True, f"output within [{lo:.3g}, {hi:.3g}]"

    r.run("range kept", range_kept)

    def dtype_kept() -> Tuple[bool, str]:
        bad = []
        for dt in (torch.float32, torch.float64):
            xi = x.to(dt)
            with torch.no_grad():
                y = d(xi, generator=key)
            if y.dtype != dt or y.device != xi.device:
                bad.append(f"{dt} on {xi.device} -> {y.dtype} on {y.device}")
        return (False, "; ".join(bad)) if bad else (True, f"float32 and float64 kept on {x.device}")

    r.run("dtype and device kept", dtype_kept)

    def input_unchanged() -> Tuple[bool, str]:
        xi = x.clone()
        with torch.no_grad():
            d(xi, generator=key)
        return (True, "input not modified") if torch.equal(xi, x) else (False, "modifies its input in place; work on a copy")

    r.run("input left unchanged", input_unchanged)

    def reproducible() -> Tuple[bool, str]:
        problems = []
        with torch.no_grad():
            if not torch.equal(d(x, generator=key), out()):
                problems.append("the same DrawKey gave two outputs")
            if not torch.equal(d(x, generator=seed + 11), d(x, generator=seed + 11)):
                problems.append("the same int seed gave two outputs")
            g1, g2 = torch.Generator().manual_seed(seed + 12), torch.Generator().manual_seed(seed + 12)
            if not torch.equal(d(x, generator=g1), d(x, generator=g2)):
                problems.append("two torch.Generators seeded alike gave two outputs")
            if d.randomized:
                replay = d.apply(x, d.sample_params(x, key))
                if not torch.equal(replay, out()):
                    problems.append("apply(x, sample_params(x, key)) differs from forward(x, generator=key)")
        if problems:
            return False, "; ".join(problems) + " (does it keep its own random state, or ignore the generator?)"
        return True, "same key / seed / generator, same output bit for bit" + ("; draws replay" if d.randomized else "")

    r.run("reproducible", reproducible)

    def batch_equals_single() -> Tuple[bool, str]:
        full = out()
        worst, bad = 0.0, []
        with torch.no_grad():
            for i in range(n):
                one = d(x[i : i + 1], generator=key.select([i]))
                diff = _max_diff(one, full[i : i + 1])
                worst = max(worst, diff)
                if diff > BATCH_ATOL:
                    bad.append(i)
        if bad:
            return False, (f"image(s) {bad} differ alone from in the batch (max |diff| {worst:.3g} > {BATCH_ATOL:g}); "
                           "draw each image from its own generator (Defense.draw)")
        return True, f"max |diff| {worst:.3g} over {n} images"

    r.run("batch = one at a time", batch_equals_single)

    def randomized_claim() -> Tuple[bool, str]:
        with torch.no_grad():
            other = d(x, generator=DrawKey(seed + 1, ids))
            differ = [i for i in range(n) if not torch.equal(other[i], out()[i])] if other.shape == out().shape else list(range(n))
            if d.randomized:
                if not differ:
                    return False, "randomized=True, but two keys gave the same output on every image; declare randomized = False"
                return True, f"two keys differ on {len(differ)}/{n} images"
            if differ:
                return False, (f"randomized=False, but two keys gave different outputs on {len(differ)}/{n} images; "
                               "declare randomized = True and draw from the generator")
            a, b = d(x), d(x)
            if not torch.equal(a, b):
                return False, "randomized=False, but two calls without a generator differ; declare randomized = True"
        return True, "deterministic: one output for every key and call"

    r.run("randomized claim", randomized_claim)

    def differentiable_claim() -> Tuple[bool, str]:
        g = torch.Generator().manual_seed(seed + 1)  # a fixed direction to differentiate along

        def useful_grad(y: torch.Tensor, xg: torch.Tensor) -> Tuple[Optional[torch.Tensor], str]:
            w = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
            (grad,) = torch.autograd.grad((y * w).sum(), xg, allow_unused=True)
            if grad is None:
                return None, "no"
            if not bool(torch.isfinite(grad).all()):
                return None, "a non-finite"
            if not bool(grad.abs().sum() > 0):
                return None, "an all-zero"
            return grad, ""

        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            y = d(xg, generator=key)
            if d.differentiable:
                if not y.requires_grad:
                    return False, "differentiable=True, but the output is off the autograd graph; declare differentiable = False"
                grad, what = useful_grad(y, xg)
                if grad is None:
                    return False, f"differentiable=True, but {what} gradient reaches the input; declare differentiable = False"
                return True, f"gradient reaches the input (mean |grad| {float(grad.abs().mean()):.3g})"
            if y.requires_grad:
                grad, _ = useful_grad(y, xg)
                if grad is not None:
                    return False, ("differentiable=False, but a gradient reaches the input through forward; "
                                   "declare differentiable = True (or run the defense under no_grad)")
                return False, "differentiable=False, but forward returns a tensor on the autograd graph (run it under no_grad)"
            # The declaration is what attacks act on (BPDA, not autograd); say so when apply()
            # alone would pass a gradient, without failing a conservative claim.
            params = d.sample_params(x, key) if d.randomized else None
            ya = d.apply(xg, params)
            if ya.requires_grad and useful_grad(ya, xg)[0] is not None:
                return True, ("no gradient through forward, as declared (attacks use BPDA); note: apply() alone "
                              "passes a gradient, so differentiable = True would let attacks use it")
        return True, "no gradient, as declared (attacks use BPDA)"

    r.run("differentiable claim", differentiable_claim)

    def state_rebuilt_equal() -> Tuple[Optional[bool], str]:
        if rebuild is None:
            return None, "not asked (no way to build it again was given)"
        first, error = built_state
        error = error or built_plain[1]
        if error is not None:
            return False, f"its state cannot be read as built: {error}"
        again = rebuild()
        second = state_digest(again)
        if first != second:
            return False, (f"two builds hold different values ({first} and {second}): seed what the constructor "
                           "draws, or load it from a file, so that a resumed run is the same defense")
        plain, before = plain_tensors(again), built_plain[0]
        differ = sorted(k for k in set(before) | set(plain) if before.get(k) != plain.get(k))
        if differ:
            return False, (f"two builds hold different plain tensor attributes ({', '.join(differ)}; drawn unseeded? "
                           "an uninitialised scratch buffer?): seed what the constructor draws, and hold values with "
                           "register_buffer so that a run store records them")
        note = (f"; note: {', '.join(sorted(plain))} are plain tensor attributes, equal here but not recorded by a run "
                "store (register_buffer them)") if plain else ""
        return True, ("no state held" if first is None else f"the same values ({first})") + note

    r.run("state rebuilt equal", state_rebuilt_equal)
    report.checks = r.checks
    return report

"""Explicit randomness: every random draw in the library takes a ``torch.Generator``.

Generators live on the CPU so that a CPU run and a CUDA run draw the same numbers;
random tensors are drawn on the CPU and then moved to the data's device. The library
never calls ``torch.manual_seed`` or touches the global RNG.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def make_generator(seed: Optional[int] = None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (a fresh nondeterministic seed if None)."""
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def ensure_generator(generator: Optional[torch.Generator]) -> torch.Generator:
    """Return ``generator`` or, when None, a freshly (nondeterministically) seeded one."""
    return generator if generator is not None else make_generator(None)


def child_seed(generator: torch.Generator) -> int:
    """Draw a 63-bit seed from ``generator`` (to derive independent sub-streams)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def rand(shape: Sequence[int], generator: torch.Generator, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0,1) drawn on the CPU from ``generator`` and moved to ``device``."""
    out = torch.rand(tuple(shape), generator=generator, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return out.to(device=device, dtype=dtype)


def randint(low: int, high: int, shape: Sequence[int], generator: torch.Generator, *, device=None) -> torch.Tensor:
    """Integers in [low, high) drawn on the CPU from ``generator`` and moved to ``device``."""
    return torch.randint(low, high, tuple(shape), generator=generator).to(device)


def randn(shape: Sequence[int], generator: torch.Generator, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal drawn on the CPU from ``generator`` and moved to ``device``."""
    return torch.randn(tuple(shape), generator=generator).to(device=device, dtype=dtype)

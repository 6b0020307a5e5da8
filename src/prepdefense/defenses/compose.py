"""Composition of defenses by ``+`` in a name (paper Section 7, Table 6: ``fd+rand`` ...).

``Compose([a, b])(x) = b(a(x))``: the left-most name runs first, as the paper writes
"quantization + distortion".
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ..seeding import child_seed, ensure_generator, make_generator
from .base import Defense, check_images


class Compose(Defense):
    """Apply defenses left to right. Random if any part is; differentiable if all are.

    Each random part gets its own sub-generator seeded from ``generator``, so one seed
    reproduces the whole chain.
    """

    def __init__(self, parts: Sequence[Defense], names: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        if not parts:
            raise ValueError("Compose needs at least one defense")
        self.parts = nn.ModuleList(parts)
        self.part_names: List[str] = list(names) if names else [type(p).__name__ for p in parts]
        self.randomized = any(p.randomized for p in parts)
        self.differentiable = all(p.differentiable for p in parts)
        self.ensemble = max(p.ensemble for p in parts)
        self.changes_size = any(p.changes_size for p in parts)

    def forward(self, x: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        check_images(x)
        g = ensure_generator(generator)
        for part in self.parts:
            sub = make_generator(child_seed(g)) if part.randomized else None
            x = part(x, generator=sub)
        return x

    def extra_repr(self) -> str:
        return "+".join(self.part_names)

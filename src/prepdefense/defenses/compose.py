"""Composition of defenses by ``+`` in a name (paper Section 7, Table 6: ``fd+rand`` ...).

``Compose([a, b])(x) = b(a(x))``: the left-most name runs first, as the paper writes
"quantization + distortion".
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..draws import Params
from .base import Defense, as_defense


class Compose(Defense):
    """Apply defenses left to right. Random if any part is; differentiable if all are.

    The parts are the chain's :meth:`stages`, named ``"<position>:<name>"`` (``"0:fd"``,
    ``"1:rand"``): each random part draws under its own sub-stream of the key, so one seed
    reproduces the whole chain, and BPDA treats each part by its own declaration.
    """

    def __init__(self, parts: Sequence[Defense], names: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        parts = [as_defense(p) for p in parts]  # a plain module is a ModuleDefense, as in Defended
        if not parts:
            raise ValueError("Compose needs at least one defense")
        self.parts = nn.ModuleList(parts)
        self.part_names: List[str] = list(names) if names else [type(p).__name__ for p in parts]
        self.randomized = any(p.randomized for p in parts)
        self.differentiable = all(p.differentiable for p in parts)
        self.ensemble = max(p.ensemble for p in parts)
        self.changes_size = any(p.changes_size for p in parts)

    def stages(self) -> Sequence[Tuple[str, Defense]]:
        return tuple((f"{i}:{name}", part) for i, (name, part) in enumerate(zip(self.part_names, self.parts)))

    def apply(self, x: torch.Tensor, params: Optional[Params]) -> torch.Tensor:
        return self.apply_stages(x, params)

    def extra_repr(self) -> str:
        return "+".join(self.part_names)

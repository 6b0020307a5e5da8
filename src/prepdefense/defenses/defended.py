"""``Defended(defense, model)``: the model a user deploys, ``f(g(x))`` (paper Section 4).

Composition lives on the model side, so attacks never special-case a defense.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..seeding import child_seed, ensure_generator, make_generator
from .base import Defense


class Defended(nn.Module):
    """Classifier behind a preprocessing defense: ``logits = model(defense(x))``.

    For defenses with ``ensemble > 1`` (Guo et al.'s 30 random crops) the prediction is the
    mean softmax over that many independent draws; the returned "logits" are then the log
    of that mean, so ``argmax`` and cross-entropy behave as for a plain classifier.

    Args:
        defense: a :class:`Defense` (or any module taking ``(x, generator=...)``).
        model: a classifier taking [0,1] NCHW and returning logits.
        generator: default generator used when ``forward`` gets none (keeps a deployed
            model reproducible); a fresh nondeterministic one if None.
    """

    def __init__(self, defense: Defense, model: nn.Module, *, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.defense = defense
        self.model = model
        self._generator = generator
        self.randomized = bool(getattr(defense, "randomized", False))
        self.input_size = getattr(model, "input_size", None)

    def forward(self, x: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        g = generator if generator is not None else self._generator
        g = ensure_generator(g) if self.randomized else g
        n = int(getattr(self.defense, "ensemble", 1))
        if n <= 1:
            return self.model(self.defense(x, generator=g))
        probs = None
        for _ in range(n):
            sub = make_generator(child_seed(g))
            p = self.model(self.defense(x, generator=sub)).softmax(dim=1)
            probs = p if probs is None else probs + p
        return (probs / n).clamp_min(1e-12).log()

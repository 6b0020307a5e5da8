"""``Defended(defense, model)``: the model a user deploys, ``f(g(x))`` (paper Section 4).

Composition lives on the model side, so attacks never special-case a defense. Like a defense,
a ``Defended`` model draws with ``sample_params(x, generator)`` and replays with
``apply(x, params)`` (:mod:`prepdefense.draws`), so EOT and the verdict on fresh draws can
hold, save and replay the exact draw that fooled it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..draws import KeyLike, Params, as_key
from .base import Defense, as_defense, check_images


class Defended(nn.Module):
    """Classifier behind a preprocessing defense: ``logits = model(defense(x))``.

    For defenses with ``ensemble > 1`` (Guo et al.'s 30 random crops) the prediction is the
    mean softmax over that many independent draws (member ``k`` draws under the key's
    sub-stream ``("member", k)``); the returned "logits" are then the log of that mean, so
    ``argmax`` and cross-entropy behave as for a plain classifier.

    Args:
        defense: a :class:`Defense` (a plain module called as ``module(x, generator=g)`` is
            wrapped in :class:`~prepdefense.defenses.base.ModuleDefense`).
        model: a classifier taking [0,1] NCHW and returning logits.
        generator: default source of draws when ``forward`` gets none (a seed or
            ``torch.Generator`` keeps a deployed model reproducible); fresh draws if None.

    Shape: (N, C, H, W) -> (N, K).
    """

    def __init__(self, defense: Defense, model: nn.Module, *, generator: KeyLike = None) -> None:
        super().__init__()
        self.defense = as_defense(defense)
        self.model = model
        self._generator = generator
        self.randomized = bool(getattr(defense, "randomized", False))
        self.ensemble = int(getattr(defense, "ensemble", 1))
        self.input_size = getattr(model, "input_size", None)

    def sample_params(self, x: torch.Tensor, generator: KeyLike = None) -> Optional[Params]:
        """The defense's draw for ``x`` (per ensemble member when ``ensemble > 1``)."""
        if not self.randomized:
            return None
        key = as_key(generator if generator is not None else self._generator, x.shape[0])
        if self.ensemble <= 1:
            return self.defense.sample_params(x, key)
        return Params({str(k): self.defense.sample_params(x, key.child("member", k)) for k in range(self.ensemble)})

    def apply(self, x: torch.Tensor, params: Optional[Params]) -> torch.Tensor:
        """Logits for a given draw."""
        if self.ensemble <= 1:
            return self.model(self.defense.run(x, params))
        probs = None
        for k in range(self.ensemble):
            member = None if params is None else params[str(k)]
            p = self.model(self.defense.run(x, member)).softmax(dim=1)
            probs = p if probs is None else probs + p
        return (probs / self.ensemble).clamp_min(1e-12).log()

    def forward(self, x: torch.Tensor, *, generator: KeyLike = None) -> torch.Tensor:
        x = check_images(x, values=not self.defense.checks_values_in_apply)
        return self.apply(x, self.sample_params(x, generator))

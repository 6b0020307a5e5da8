"""EOT: Expectation over Transformation (Athalye et al. 2018; paper Sections 4, 6.3).

``EOT(model, n)`` is a model wrapper (foolbox 3's idea): its forward draws ``n`` independent
randomisations of a random model (a ``Defended`` model around a random defense, possibly with
``BPDA`` inside) and averages them, so every attack that differentiates a model differentiates
the expectation ``E_t f(g_t(x))`` instead of one draw. BPDA+EOT is just
``EOT(Defended(BPDA(defense), classifier), 30)``.

Randomness: draw ``i`` uses its own generator ``make_generator(child_seed(g))`` taken in order
from the generator ``g`` given to ``forward`` (or a fresh one), so the result is the mean of
``n`` manual calls ``model(x, generator=g_i)`` with those generators, whatever the chunking.

Reduction (documented choice):

* ``reduce="logits"`` (default): the mean of the ``n`` logit vectors; attacks use it as
  ordinary logits (cross-entropy, margin).
* ``reduce="prob"``: ``log(mean softmax)``, the log of the expected class probabilities
  (what ``Defended`` does for an ensemble defense).
* ``reduce="none"``: the per-draw logits, shape ``(n, N, K)``, for attacks that average a
  per-draw *loss* (the gradient average of the paper's BPDA+EOT, Section 6.3).

Batching: for a ``Defended`` model with ``ensemble == 1`` the defense is applied draw by
draw and up to ``chunk`` draws are concatenated into one classifier call (the classifier is
the costly part; ``chunk=None`` means all ``n``). With ``checkpoint=True`` each chunk is
recomputed in the backward pass (its draws are replayed from their seeds), so memory holds
one chunk's activations at a time. Over a deterministic model (``randomized`` False or absent)
EOT calls the model once: the expectation of a constant is that constant.
"""

from __future__ import annotations

import inspect
from typing import List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..defenses.defended import Defended
from ..seeding import child_seed, ensure_generator, make_generator

__all__ = ["EOT", "REDUCTIONS"]

REDUCTIONS = ("logits", "prob", "none")


def _accepts_generator(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "generator" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class EOT(nn.Module):
    """Average a random model over ``n`` independent draws.

    Args:
        model: a module mapping [0,1] NCHW to logits, called as ``model(x, generator=g)``
            when it takes a generator.
        n: number of draws (the paper's ensemble size: 30).
        chunk: draws per classifier call (``None``: all at once).
        reduce: ``"logits"`` (mean logits), ``"prob"`` (log mean softmax) or ``"none"``.
        checkpoint: recompute chunks in the backward pass to bound memory.

    Shape: (N, C, H, W) -> (N, K), or (n, N, K) with ``reduce="none"``.
    """

    def __init__(self, model: nn.Module, n: int = 30, *, chunk: Optional[int] = None, reduce: str = "logits", checkpoint: bool = False) -> None:
        super().__init__()
        if int(n) < 1:
            raise ValueError(f"EOT needs n >= 1 draws, got {n}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if chunk is not None and int(chunk) < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model = model
        self.n = int(n)
        self.chunk = None if chunk is None else int(chunk)
        self.reduce = reduce
        self.checkpoint = bool(checkpoint)
        self.randomized = bool(getattr(model, "randomized", False))
        self.input_size = getattr(model, "input_size", None)
        self._takes_generator = _accepts_generator(model)

    def draws(self, x: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-draw logits, shape (n, N, K) (one draw, repeated, for a deterministic model)."""
        if not self.randomized:
            z = self.model(x)
            return z.unsqueeze(0).expand(self.n, *z.shape)
        g = ensure_generator(generator)
        seeds = [child_seed(g) for _ in range(self.n)]
        step = self.chunk or self.n
        outs: List[torch.Tensor] = []
        for start in range(0, self.n, step):
            chunk_seeds = seeds[start : start + step]
            if self.checkpoint and torch.is_grad_enabled() and x.requires_grad:
                out = _checkpoint(self._chunk, x, tuple(chunk_seeds), use_reentrant=False)
            else:
                out = self._chunk(x, tuple(chunk_seeds))
            outs.append(out)
        return torch.cat(outs, dim=0)

    def _chunk(self, x: torch.Tensor, seeds) -> torch.Tensor:
        gens = [make_generator(s) for s in seeds]
        m = self.model
        if isinstance(m, Defended) and int(getattr(m.defense, "ensemble", 1)) <= 1:
            views = [m.defense(x, generator=gi) for gi in gens]
            if all(v.shape == views[0].shape for v in views):
                z = m.model(torch.cat(views, dim=0))
                return z.view(len(gens), x.shape[0], *z.shape[1:])
            return torch.stack([m.model(v) for v in views], dim=0)
        if self._takes_generator:
            return torch.stack([m(x, generator=gi) for gi in gens], dim=0)
        return torch.stack([m(x) for _ in gens], dim=0)

    def forward(self, x: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if not self.randomized and self.reduce != "none":
            z = self.model(x)
            return z if self.reduce == "logits" else z.log_softmax(dim=1)
        z = self.draws(x, generator=generator)
        if self.reduce == "none":
            return z
        if self.reduce == "logits":
            return z.mean(dim=0)
        return (z.log_softmax(dim=2).exp().mean(dim=0)).clamp_min(1e-30).log()

    def extra_repr(self) -> str:
        return f"n={self.n}, chunk={self.chunk}, reduce={self.reduce!r}"

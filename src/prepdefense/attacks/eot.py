"""EOT: Expectation over Transformation (Athalye et al. 2018; paper Sections 4, 6.3).

``EOT(model, n)`` is a model wrapper (foolbox 3's idea): its forward draws ``n`` independent
randomisations of a random model (a ``Defended`` model around a random defense, possibly with
``BPDA`` inside) and averages them, so every attack that differentiates a model differentiates
the expectation ``E_t f(g_t(x))`` instead of one draw. BPDA+EOT is just
``EOT(Defended(BPDA(defense), classifier), 30)``.

Randomness: draw ``i`` is the model's draw under the key's sub-stream ``("eot", i)``
(:mod:`prepdefense.draws`): ``sample_params(x, generator)`` returns all ``n`` draws as one
:class:`~prepdefense.draws.Params` (``"0"`` .. ``"n-1"``) and ``apply(x, params)`` replays them,
so each image's draws depend only on the seed, its id and ``i``, whatever the chunking or
the batch.

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
recomputed in the backward pass from its recorded draws, so memory holds one chunk's
activations at a time. Over a deterministic model (``randomized`` False or absent) EOT calls
the model once: the expectation of a constant is that constant.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..defenses.base import ModuleDefense
from ..defenses.defended import ENSEMBLE_GRAPH_IMAGES, Defended
from ..draws import KeyLike, Params, as_key
from ..validation import check_int, check_images

__all__ = ["EOT", "REDUCTIONS", "EOT_CHUNK_IMAGES", "expectation_gradient"]

#: Images per classifier call when an attack differentiates an expectation (:func:`expectation_gradient`):
#: its memory holds the activations of at most ``max(EOT_CHUNK_IMAGES, N)`` images at a time (16: an
#: EfficientNet-Lite0 attack step on 16 images fits in about 1.8 GB of RSS whatever the number of draws).
#: The same budget as an ensemble defense's members (:data:`~prepdefense.defenses.defended.ENSEMBLE_GRAPH_IMAGES`).
EOT_CHUNK_IMAGES = ENSEMBLE_GRAPH_IMAGES

REDUCTIONS = ("logits", "prob", "none")


class EOT(nn.Module):
    """Average a random model over ``n`` independent draws.

    Args:
        model: a module mapping [0,1] NCHW to logits with ``sample_params(x, generator)`` and
            ``apply(x, params)`` (a ``Defended`` model, possibly with ``BPDA`` inside). A plain
            random module called as ``model(x, generator=g)`` also works: each draw then gets
            one ``torch.Generator`` for the whole batch (draws depend on the batch).
        n: number of draws (the paper's ensemble size: 30).
        chunk: draws per classifier call (``None``: all at once).
        reduce: ``"logits"`` (mean logits), ``"prob"`` (log mean softmax) or ``"none"``.
        checkpoint: recompute chunks in the backward pass to bound memory.

    Shape: (N, C, H, W) -> (N, K), or (n, N, K) with ``reduce="none"``.
    """

    def __init__(self, model: nn.Module, n: int = 30, *, chunk: Optional[int] = None, reduce: str = "logits", checkpoint: bool = False) -> None:
        super().__init__()
        n = check_int(n, "n (EOT draws)")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        chunk = None if chunk is None else check_int(chunk, "chunk")
        self.randomized = bool(getattr(model, "randomized", False))
        if self.randomized and not (hasattr(model, "sample_params") and hasattr(model, "apply")):
            model = ModuleDefense(model, images_out=False)  # a plain random module: one generator per draw
        self.model = model
        self.n = int(n)
        self.chunk = None if chunk is None else int(chunk)
        self.reduce = reduce
        self.checkpoint = bool(checkpoint)
        self.input_size = getattr(model, "input_size", None)

    def sample_params(self, x: torch.Tensor, generator: KeyLike = None) -> Optional[Params]:
        """The ``n`` draws for ``x``: draw ``i`` under the key's sub-stream ``("eot", i)``."""
        if not self.randomized:
            return None
        key = as_key(generator, x.shape[0])
        return Params({str(i): self.model.sample_params(x, key.child("eot", i)) for i in range(self.n)}).for_images(x)

    def draws(self, x: torch.Tensor, *, generator: KeyLike = None) -> torch.Tensor:
        """Per-draw logits, shape (n, N, K) (one draw, repeated, for a deterministic model)."""
        return self.apply_draws(x, self.sample_params(x, generator))

    def apply_draws(self, x: torch.Tensor, params: Optional[Params], draws: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Per-draw logits (len(draws), N, K) for given draws (default: all ``n``)."""
        draws = list(range(self.n)) if draws is None else list(draws)
        if not self.randomized:
            z = self.model(x)
            return z.unsqueeze(0).expand(len(draws), *z.shape)
        step = self.chunk or len(draws)
        outs: List[torch.Tensor] = []
        for start in range(0, len(draws), step):
            chunk = [params[str(i)] for i in draws[start : start + step]]
            if self.checkpoint and torch.is_grad_enabled() and x.requires_grad:
                out = _checkpoint(self._chunk, x, chunk, use_reentrant=False)
            else:
                out = self._chunk(x, chunk)
            outs.append(out)
        return torch.cat(outs, dim=0)

    def _chunk(self, x: torch.Tensor, chunk: List[Optional[Params]]) -> torch.Tensor:
        m = self.model
        if isinstance(m, Defended) and m.ensemble <= 1:
            views = [m._defend(x, p) for p in chunk]  # the defense (at ``defend_at``, when set)
            if all(v.shape == views[0].shape for v in views):
                z = m.model(torch.cat(views, dim=0))
                return z.view(len(chunk), x.shape[0], *z.shape[1:])
            return torch.stack([m.model(v) for v in views], dim=0)
        return torch.stack([m.apply(x, p) for p in chunk], dim=0)

    def apply(self, x: torch.Tensor, params: Optional[Params]) -> torch.Tensor:
        """The reduced output for given draws."""
        if not self.randomized and self.reduce != "none":
            z = self.model(x)
            return z if self.reduce == "logits" else z.log_softmax(dim=1)
        z = self.apply_draws(x, params)
        if self.reduce == "none":
            return z
        if self.reduce == "logits":
            return z.mean(dim=0)
        return (z.log_softmax(dim=2).exp().mean(dim=0)).clamp_min(1e-30).log()

    def forward(self, x: torch.Tensor, *, generator: KeyLike = None) -> torch.Tensor:
        x = check_images(x)
        return self.apply(x, self.sample_params(x, generator))

    def extra_repr(self) -> str:
        return f"n={self.n}, chunk={self.chunk}, reduce={self.reduce!r}"


def expectation_gradient(
    model: nn.Module,
    x: torch.Tensor,
    key,
    draws: int,
    per_draw_objective: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk: Optional[int] = None,
    need_grad: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """The mean over ``draws`` draws of a per-draw objective and its gradient w.r.t. ``x``
    (Athalye et al.'s EOT), in chunks of draws whose graphs are freed after each backward.

    Memory: one chunk's activations at a time, ``chunk`` draws of the N images (default:
    ``max(1, EOT_CHUNK_IMAGES // N)`` draws, so at most ``max(EOT_CHUNK_IMAGES, N)`` images),
    whatever ``draws``; the gradient is the same as from one pass over all draws (up to float
    summation order). A deterministic model is run once.

    Args:
        model: a model with ``sample_params``/``apply`` when random (``Defended``, with BPDA).
        x: (N, C, H, W) images.
        key: the draws' key (draw ``i`` is the sub-stream ``("eot", i)``).
        draws: number of draws ``R``.
        per_draw_objective: maps per-draw logits (r, N, K) to objectives (r, N).
        chunk: draws per classifier call (None: the default above).
        need_grad: also return the gradient (False: objective and logits only).

    Returns:
        ``(objective (N,) mean over draws, gradient like x or None, logits (R, N, K) detached)``.
    """
    n = x.shape[0]
    randomized = bool(getattr(model, "randomized", False))
    r_total = int(draws) if randomized else 1
    eot = EOT(model, r_total, reduce="none")
    params = eot.sample_params(x, key) if randomized else None
    per = int(chunk) if chunk else max(1, EOT_CHUNK_IMAGES // max(n, 1))
    grad = None
    objectives, logits = [], []
    for start in range(0, r_total, per):
        xa = x.detach().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            z = eot.apply_draws(xa, params, range(start, min(start + per, r_total))) if randomized else model(xa).unsqueeze(0)
            obj = per_draw_objective(z)
        if need_grad:
            (g,) = torch.autograd.grad(obj.sum() / r_total, xa)
            grad = g if grad is None else grad + g
        objectives.append(obj.detach())
        logits.append(z.detach())
    return torch.cat(objectives).mean(0), grad, torch.cat(logits)

"""Square Attack: a score-based, gradient-free random search (Andriushchenko et al. 2020), with
each acceptance decided on the mean loss over EOT draws.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020 (Algorithms 1-3). It queries the model's
outputs only, never a gradient, so it attacks a non-differentiable defense as deployed (no
BPDA); a gradient-free attack that beats the gradient attacks is the sign of gradient
masking (Carlini et al. 2019's checklist).

* **Linf** (Algorithm 2): start from vertical stripes ``x + eps * s`` (one random sign per
  channel and column); each iteration redraws one square window of side
  ``round(sqrt(p * H * W))`` at a random position to ``x +- eps`` (one random sign per channel).
* **L2** (Algorithm 3): start from a grid of squares, each holding the paper's centred
  "eta" pattern with a random sign per channel, scaled to the sphere of radius ``eps``; each
  iteration moves the perturbation's mass from a second random window into a new pattern at
  the first window, keeping the norm at the radius.
* ``p`` (the fraction of pixels changed) starts at ``p_init`` and halves at iterations
  10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a 10 000-iteration run, rescaled to the
  ``queries`` of the run (AutoAttack's schedule).
* **Acceptance**: a candidate replaces the current point when its loss is lower, or when it
  fools every draw. Loss (minimised): minus the objective of :mod:`.losses` (default the
  margin, floored at 0 once the goal is met; ``ce`` and ``dlr`` work too). On a random model
  each query uses ``eot`` draws (the key's sub-stream ``("query", t)``) and the loss is the mean
  over them, so an acceptance is not decided by one lucky draw. An image stops once a point
  fools every draw of its query.

Randomness: image ``i``'s windows, signs and pattern orientations come from its own generator
(``key.child("square").generator(i)``) and its draws from its own key, so the result of an
image does not depend on the batch. (AutoAttack draws one window per iteration for the whole
batch.)

Budget: ``queries`` counts loss evaluations per image, the initial point included (each costs
``eot`` forward passes of the model); an image stops early once fooled. ``eps``: the Linf
radius, or the normalised (RMS) L2 radius (Euclidean radius ``eps * sqrt(C*H*W)``).
``info["queries"]`` holds the queries each image used; ``success`` is judged by one more
forward pass (a fresh draw, sub-stream ``"judge"``).

Shape: x (N, C, H, W) in [0, 1], any size; labels, targets (N,) int64.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .. import seeding
from ..draws import DrawKey
from ..validation import check_int
from ._registry import register
from .ball import check_eps, radius
from .base import Attack, AttackResult, forward
from .eot import EOT
from .losses import LOSSES, is_successful, objective

__all__ = ["Square", "p_schedule", "eta_pattern"]


def p_schedule(p_init: float, it: int, iterations: int) -> float:
    """The fraction of pixels changed at iteration ``it`` of ``iterations`` (AutoAttack's
    piecewise-constant schedule for 10 000 iterations, rescaled)."""
    it = int(it / max(iterations, 1) * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def _rectangles(a: int, b: int) -> torch.Tensor:
    """Nested centred rectangles weighted 1/(k+1)^2 (the building block of the L2 pattern), (a, b)."""
    out = torch.zeros(a, b, dtype=torch.float64)
    if a == 0 or b == 0:
        return out
    ca, cb = a // 2, b // 2
    for k in range(max(ca, cb) + 1):
        out[max(ca - k, 0):min(ca + k + 1, a), max(cb - k, 0):min(cb + k + 1, b)] += 1.0 / (k + 1) ** 2
    return out / out.norm()


@functools.lru_cache(maxsize=64)
def eta_pattern(s: int) -> torch.Tensor:
    """The L2 Square Attack's window pattern (Algorithm 3's ``eta``): two halves of opposite
    sign, each peaked in its centre, unit L2 norm, (s, s) float64."""
    eta = torch.cat([_rectangles(s // 2, s), -_rectangles(s - s // 2, s)], dim=0)
    return eta / eta.norm()


def _window_index(vh: torch.Tensor, vw: torch.Tensor, s: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advanced indices of one (s, s) window per image at rows ``vh``, columns ``vw`` (N,):
    ``t[i0, :, i1, i2]`` is (N, s, s, C)."""
    n = vh.shape[0]
    ar = torch.arange(s, device=vh.device)
    rows = (vh[:, None] + ar)[:, :, None]
    cols = (vw[:, None] + ar)[:, None, :]
    return torch.arange(n, device=vh.device)[:, None, None], rows, cols


def _get_window(t: torch.Tensor, idx) -> torch.Tensor:
    i0, i1, i2 = idx
    return t[i0, :, i1, i2].permute(0, 3, 1, 2)  # (N, C, s, s)


def _set_window(t: torch.Tensor, idx, value: torch.Tensor) -> None:
    i0, i1, i2 = idx
    t[i0, :, i1, i2] = value.permute(0, 2, 3, 1)


class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020), Linf and L2, EOT acceptance (module docstring).

    Args (keyword only; AutoAttack's defaults):
        norm: ``'linf'`` or ``'l2'``.
        eps: radius: Linf, or normalised (RMS) L2 (default: 8/255, or 0.05 for L2).
        queries: loss evaluations per image, the initial one included (5000).
        p_init: initial fraction of pixels changed per iteration (0.8).
        loss: minimised loss, ``'margin'`` (default), ``'ce'`` or ``'dlr'``.
        eot: draws per query on a random model; the acceptance uses their mean loss (1).
        chunk: EOT draws per classifier call (memory; None: all).
        batch_size: images attacked together (None: all).
        progress: optional ``progress(done, total)``.
    """

    HYPERPARAMETERS = ("norm", "eps", "queries", "p_init", "loss", "eot")
    name = "square"
    #: Gradient-free: it queries the defended model as deployed, whatever its gradient.
    composes_bpda = True
    uses_gradient = False

    def __init__(
        self,
        *,
        norm: str = "linf",
        eps: Optional[float] = None,
        queries: int = 5000,
        p_init: float = 0.8,
        loss: str = "margin",
        eot: int = 1,
        chunk: Optional[int] = None,
        batch_size: Optional[int] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        self.norm, self.eps = check_eps(norm, eps)
        queries, eot = check_int(queries, "queries"), check_int(eot, "eot")
        if not 0 < float(p_init) <= 1:
            raise ValueError(f"p_init must lie in (0, 1], got {p_init}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        batch_size = None if batch_size is None else check_int(batch_size, "batch_size")
        chunk = None if chunk is None else check_int(chunk, "chunk")
        self.queries, self.eot, self.p_init, self.loss = int(queries), int(eot), float(p_init), loss
        self.chunk = None if chunk is None else int(chunk)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.progress = progress

    def steps_per_batch(self) -> int:
        return self.queries

    # -- one query: mean loss over the draws and the share of draws fooled --------------------
    @torch.no_grad()
    def query(self, model: nn.Module, x: torch.Tensor, labels, targets, key: DrawKey) -> Tuple[torch.Tensor, torch.Tensor]:
        """Loss (N,) to minimise, mean over the query's draws, and the fraction of draws fooled (N,)."""
        n = x.shape[0]
        if self.eot > 1 and getattr(model, "randomized", False):
            z = EOT(model, self.eot, chunk=self.chunk, reduce="none")(x, generator=key)
        else:
            z = forward(model, x, key).unsqueeze(0)
        r = z.shape[0]
        loss = -objective(self.loss, z.reshape(r * n, -1), labels.repeat(r), None if targets is None else targets.repeat(r)).view(r, n).mean(0)
        pred = z.argmax(2)
        hit = pred == targets if targets is not None else pred != labels
        return loss.double(), hit.double().mean(0)

    # -- proposals --------------------------------------------------------------------------
    @staticmethod
    def _signs(gens: List[torch.Generator], shape, dtype, device) -> torch.Tensor:
        return torch.stack([seeding.randint(0, 2, shape, g) for g in gens]).to(device=device, dtype=dtype) * 2 - 1

    @staticmethod
    def _offsets(gens: List[torch.Generator], high: int, device) -> torch.Tensor:
        return torch.cat([seeding.randint(0, high + 1, (1,), g) for g in gens]).to(device)

    def _init(self, x: torch.Tensor, r: float, gens: List[torch.Generator]) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.norm == "linf":
            return (x + r * self._signs(gens, (c, 1, w), x.dtype, x.device)).clamp(0, 1)
        s = max(min(h, w) // 5, 1)
        nh, nw = h // s, w // s
        oh, ow = (h - nh * s) // 2, (w - nw * s) // 2
        delta = torch.zeros_like(x)
        eta = eta_pattern(s).to(x)
        for a in range(nh):
            for b in range(nw):
                flip = self._signs(gens, (1,), x.dtype, x.device).view(-1, 1, 1, 1) > 0
                pattern = torch.where(flip, eta.t()[None, None], eta[None, None])
                sign = self._signs(gens, (c, 1, 1), x.dtype, x.device)
                delta[:, :, oh + a * s: oh + (a + 1) * s, ow + b * s: ow + (b + 1) * s] += pattern * sign
        return (x + r * delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)).clamp(0, 1)

    def _propose_linf(self, x, x_best, r: float, p: float, gens) -> torch.Tensor:
        n, c, h, w = x.shape
        s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
        idx = _window_index(self._offsets(gens, h - s, x.device), self._offsets(gens, w - s, x.device), s)
        new = x_best.clone()
        window = _get_window(x_best, idx) + 2 * r * self._signs(gens, (c, 1, 1), x.dtype, x.device)
        _set_window(new, idx, window)
        return torch.min(torch.max(new, x - r), x + r).clamp(0, 1)

    def _propose_l2(self, x, x_best, r: float, p: float, gens) -> torch.Tensor:
        n, c, h, w = x.shape
        s = max(int(round(math.sqrt(p * h * w))), 3)
        s = min(s + 1 if s % 2 == 0 else s, h, w)
        delta = x_best - x
        idx1 = _window_index(self._offsets(gens, h - s, x.device), self._offsets(gens, w - s, x.device), s)
        idx2 = _window_index(self._offsets(gens, h - s, x.device), self._offsets(gens, w - s, x.device), s)
        old = _get_window(delta, idx1)  # (N, C, s, s)
        both = torch.zeros_like(delta)
        _set_window(both, idx1, torch.ones_like(old))
        _set_window(both, idx2, torch.ones_like(old))
        norm_windows = (delta * both).pow(2).sum((2, 3), keepdim=True).sqrt()  # (N, C, 1, 1)
        norm_image = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        eta = eta_pattern(s).to(x)
        flip = self._signs(gens, (1,), x.dtype, x.device).view(-1, 1, 1, 1) > 0
        new = torch.where(flip, eta.t()[None, None], eta[None, None]) * self._signs(gens, (c, 1, 1), x.dtype, x.device)
        new = new + old / (old.pow(2).sum((2, 3), keepdim=True).sqrt() + 1e-12)
        budget = ((r ** 2 - norm_image ** 2).clamp_min(0) / c + norm_windows ** 2).sqrt()
        new = new / (new.pow(2).sum((2, 3), keepdim=True).sqrt() + 1e-12) * budget
        delta = delta.clone()
        _set_window(delta, idx2, torch.zeros_like(old))
        _set_window(delta, idx1, new)
        d_norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x + r * delta / d_norm).clamp(0, 1)

    # -- the search -------------------------------------------------------------------------
    def run(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], key: DrawKey) -> AttackResult:
        """Shape: x (N, C, H, W) in [0, 1]; labels, targets (N,) int64 -> result.adversarial
        (N, C, H, W), result.success (N,) bool."""
        n = x.shape[0]
        r = radius(self.norm, self.eps, x)
        gens = key.child("square").generators()
        base = getattr(self, "_progress_base", 0)
        sub = lambda t, i: None if t is None else t[i]  # noqa: E731
        x_best = self._init(x, r, gens)
        loss_best, freq = self.query(model, x_best, labels, targets, key.child("query", 0))
        used = torch.ones(n, dtype=torch.long)
        iterations = self.queries - 1
        propose = self._propose_linf if self.norm == "linf" else self._propose_l2
        for it in range(iterations):
            idx = (freq < 1.0).nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                break
            ic = idx.cpu()
            g = [gens[i] for i in ic.tolist()]
            cand = propose(x[idx], x_best[idx], r, p_schedule(self.p_init, it, iterations), g)
            loss, f = self.query(model, cand, labels[idx], sub(targets, idx), key.child("query", it + 1).select(ic))
            accept = (loss < loss_best[idx]) | (f >= 1.0)
            sel = idx[accept]
            x_best[sel], loss_best[sel], freq[sel] = cand[accept], loss[accept], f[accept]
            used[ic] += 1
            self._advance(to=base + it + 2)
        with torch.no_grad():
            success = is_successful(forward(model, x_best, key.child("judge")), labels, targets)
        info = {
            "attack": self.name,
            "hyperparameters": self.hyperparameters(),
            "radius": r,
            "queries": used.tolist(),
            "attack_draw_success_frequency": freq.tolist(),
            "best_loss": loss_best.tolist(),
        }
        return AttackResult(adversarial=x_best.detach(), success=success.detach(), info=info)


register("square", help="Square Attack (Andriushchenko et al. 2020): gradient-free random search, Linf or L2, EOT acceptance")(Square)

"""SPSA: a gradient-free attack that estimates the gradient from the model's outputs by
simultaneous perturbations and descends it with Adam (Uesato et al. 2018).

Uesato, O'Donoghue, van den Oord & Kohli, "Adversarial Risk and the Dangers of Evaluating
Against Weak Attacks", ICML 2018, Section 3.1 / Algorithm 1 (Spall 1992's SPSA). Each step:

1. draws ``samples`` Rademacher directions ``v_j`` (entries +-1, per image);
2. estimates the gradient of the loss ``f`` as the mean of
   ``(f(x + delta v_j) - f(x - delta v_j)) / (2 delta) * v_j`` (both sides of a pair are
   classified under the same draw of a random model, the key's sub-stream
   ``("sample", t, j)``, so the difference measures the direction, not the draw);
3. takes an Adam step (learning rate ``lr``) down the estimate, then projects onto the ball
   and the [0, 1] box.

Loss (minimised): minus the objective of :mod:`.losses`, by default the margin (Uesato et al.'s
logit difference, floored at 0 once the goal is met). It never uses a gradient of the model,
so it attacks a non-differentiable defense as deployed (no BPDA).

Early stop: on a deterministic model an image stops at the first iterate that fools it
(checked by one query per step). On a random model every step is taken (a single fooled draw
says little) and the last iterate is returned.

Budget: ``steps`` steps of ``2 * samples`` queries (plus one check per step on a deterministic
model); ``queries``, when given, sets ``steps = queries // (2 * samples)``. ``info["queries"]``
holds the queries each image used. ``eps``: the Linf radius, or the normalised (RMS) L2 radius
(Euclidean radius ``eps * sqrt(C*H*W)``). Paper defaults: ``delta = 0.01``, ``lr = 0.01``.

Randomness: image ``i``'s directions come from its own generator
(``key.child("spsa").generator(i)``), drawn ``query_batch // 2`` directions at a time whatever
the batch, so an image's result does not depend on the batch.

Shape: x (N, C, H, W) in [0, 1]; labels, targets (N,) int64.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .. import seeding
from ..draws import DrawKey
from ..validation import check_int
from ._registry import register
from .ball import check_eps, project, radius
from .base import Attack, AttackResult, forward
from .losses import LOSSES, is_successful, objective

__all__ = ["SPSA"]


class SPSA(Attack):
    """SPSA with Adam (Uesato et al. 2018), Linf or L2 (module docstring).

    Args (keyword only):
        norm: ``'linf'`` or ``'l2'``.
        eps: radius: Linf, or normalised (RMS) L2 (default: 8/255, or 0.05 for L2).
        steps: SPSA steps (100).
        samples: Rademacher directions per step, each costing two queries (128).
        queries: total query budget per image; when given, it sets the steps,
            ``queries // (2 * samples)`` (the budget is an upper bound), in place of ``steps``.
        delta: finite-difference size, in pixel units (0.01).
        lr: Adam learning rate, in pixel units (0.01).
        loss: minimised loss, ``'margin'`` (default), ``'ce'`` or ``'dlr'``.
        query_batch: images per model call while estimating (memory; 256).
        batch_size: images attacked together (None: all).
        progress: optional ``progress(done, total)``.
    """

    HYPERPARAMETERS = ("norm", "eps", "steps", "samples", "delta", "lr", "loss")
    name = "spsa"
    #: Gradient-free: it queries the defended model as deployed, whatever its gradient.
    composes_bpda = True
    uses_gradient = False

    def __init__(
        self,
        *,
        norm: str = "linf",
        eps: Optional[float] = None,
        steps: int = 100,
        samples: int = 128,
        queries: Optional[int] = None,
        delta: float = 0.01,
        lr: float = 0.01,
        loss: str = "margin",
        query_batch: int = 256,
        batch_size: Optional[int] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        self.norm, self.eps = check_eps(norm, eps)
        steps, samples, query_batch = (check_int(v, what) for what, v in (("steps", steps), ("samples", samples), ("query_batch", query_batch)))
        if not float(delta) > 0 or not float(lr) > 0:
            raise ValueError(f"delta and lr must be positive, got {delta} and {lr}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        batch_size = None if batch_size is None else check_int(batch_size, "batch_size")
        self.samples = int(samples)
        if queries is not None:
            queries = check_int(queries, "queries")
            if queries < 2 * self.samples:
                raise ValueError(f"queries ({queries}) must allow one step of 2 * samples = {2 * self.samples} queries")
            steps = int(queries) // (2 * self.samples)
        self.steps = int(steps)
        self.queries = None if queries is None else int(queries)
        self.delta, self.lr, self.loss = float(delta), float(lr), loss
        self.query_batch = int(query_batch)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.progress = progress

    def steps_per_batch(self) -> int:
        return self.steps

    @torch.no_grad()
    def _loss(self, model: nn.Module, x: torch.Tensor, labels, targets, key: DrawKey) -> torch.Tensor:
        z = forward(model, x, key)
        return -objective(self.loss, z, labels, targets)

    @torch.no_grad()
    def _estimate(self, model, x, labels, targets, gens, key: DrawKey, t: int) -> torch.Tensor:
        """The SPSA gradient estimate of the loss at ``x``, (N, C, H, W)."""
        n = x.shape[0]
        per_draw = max(1, self.query_batch // 2)  # directions drawn at a time, per image
        grad = torch.zeros_like(x)
        random_model = getattr(model, "randomized", False)
        for j0 in range(0, self.samples, per_draw):
            m = min(per_draw, self.samples - j0)
            v = torch.stack([seeding.randint(0, 2, (m, *x.shape[1:]), g) for g in gens]).to(device=x.device, dtype=x.dtype) * 2 - 1
            v = v.transpose(0, 1)  # (m, N, C, H, W)
            plus = (x[None] + self.delta * v).clamp(0, 1)
            minus = (x[None] - self.delta * v).clamp(0, 1)
            diffs = []
            if random_model:
                for j in range(m):
                    k = key.child("sample", t, j0 + j)
                    pair = DrawKey(k.seed, k.ids.repeat(2), k.path)  # the same draw on both sides
                    f = self._loss(model, torch.cat([plus[j], minus[j]]), labels.repeat(2), None if targets is None else targets.repeat(2), pair)
                    diffs.append(f[:n] - f[n:])
                diff = torch.stack(diffs)
            else:
                rows = torch.cat([plus, minus]).reshape(2 * m * n, *x.shape[1:])
                ys, ts = labels.repeat(2 * m), None if targets is None else targets.repeat(2 * m)
                f = torch.cat([self._loss(model, rows[s:s + self.query_batch], ys[s:s + self.query_batch],
                                          None if ts is None else ts[s:s + self.query_batch], key)
                               for s in range(0, rows.shape[0], self.query_batch)]).view(2, m, n)
                diff = f[0] - f[1]
            grad += (diff.to(x.dtype).view(m, n, 1, 1, 1) * v).sum(0)
        return grad / (2 * self.delta * self.samples)

    def run(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], key: DrawKey) -> AttackResult:
        """Shape: x (N, C, H, W) in [0, 1]; labels, targets (N,) int64 -> result.adversarial
        (N, C, H, W), result.success (N,) bool."""
        n = x.shape[0]
        r = radius(self.norm, self.eps, x)
        gens = key.child("spsa").generators()
        random_model = getattr(model, "randomized", False)
        sub = lambda t, i: None if t is None else t[i]  # noqa: E731
        x_adv = x.clone()
        m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
        beta1, beta2, tiny = 0.9, 0.999, 1e-8
        running = torch.ones(n, dtype=torch.bool, device=x.device)
        used = torch.zeros(n, dtype=torch.long)
        base = getattr(self, "_progress_base", 0)
        for t in range(self.steps):
            idx = running.nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                break
            ic = idx.cpu()
            g = self._estimate(model, x_adv[idx], labels[idx], sub(targets, idx), [gens[i] for i in ic.tolist()],
                               key.select(ic), t)
            used[ic] += 2 * self.samples
            m1[idx] = beta1 * m1[idx] + (1 - beta1) * g
            m2[idx] = beta2 * m2[idx] + (1 - beta2) * g * g
            step = self.lr * (m1[idx] / (1 - beta1 ** (t + 1))) / ((m2[idx] / (1 - beta2 ** (t + 1))).sqrt() + tiny)
            x_adv[idx] = project(self.norm, x_adv[idx] - step, x[idx], r)
            if not random_model:
                with torch.no_grad():
                    fooled = is_successful(forward(model, x_adv[idx], key.select(ic)), labels[idx], sub(targets, idx))
                used[ic] += 1
                running[idx[fooled]] = False
            self._advance(to=base + t + 1)
        with torch.no_grad():
            success = is_successful(forward(model, x_adv, key.child("judge")), labels, targets)
        info = {"attack": self.name, "hyperparameters": self.hyperparameters(), "radius": r, "queries": used.tolist()}
        return AttackResult(adversarial=x_adv.detach(), success=success.detach(), info=info)


register("spsa", help="SPSA (Uesato et al. 2018): gradient-free, finite differences on random +-1 directions and Adam")(SPSA)

"""APGD: Auto-PGD, the step-size-free PGD of AutoAttack (Croce & Hein 2020), with EOT.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020, Section 3 (Algorithm 1). Each of ``steps`` iterations

1. takes a gradient step of length ``eta`` (per image) and projects it onto the ball and the
   [0, 1] box: ``z = P(x_k + eta * sign(g))`` (Linf) or ``P(x_k + eta * g / ||g||_2)`` (L2);
2. adds momentum: ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))`` with
   ``a = momentum`` (0.75; 1 at the first step);
3. keeps the point of highest objective ``x_max`` (and its gradient).

Step size. ``eta`` starts at ``2 * radius``. At the checkpoints ``w_j`` (the first after
``0.22 * steps`` iterations, then windows shrinking by ``0.03 * steps`` down to
``0.06 * steps``, Section 3.2, as the authors' code rounds them) ``eta`` is halved and the
iterate restarts from ``x_max`` (with ``x_max``'s gradient) when

* the objective rose in at most ``rho * (w_j - w_{j-1})`` of the window's steps (``rho``
  0.75; the authors' code compares with ``<=``), or
* ``eta`` was not halved at the previous checkpoint and the best objective has not improved
  since.

Losses (:mod:`.losses`): cross-entropy (APGD-CE) and the difference of logits ratio (APGD-DLR;
with ``targets`` the targeted DLR of APGD-T), or the C&W margin. The objective ascended is
minus the loss, per image, summed over the batch.

EOT. On a random model each evaluation uses ``eot`` draws (the key's sub-stream
``("restart", r, "step", t)``): the objective is the mean over draws of the per-draw loss, so
its gradient is the mean of the per-draw gradients (Athalye et al. 2018; AutoAttack's
``version='rand'`` uses ``eot = 20``). The step-size checks compare these means.

Restarts. ``restarts`` runs from independent random starts (Linf: a uniform direction scaled
to the ball's surface; L2: a Gaussian direction of length ``radius``, then clipped to the box);
as in AutoAttack, a restart attacks only images not yet fooled by every draw of some iterate.

Returned images. Per image, the iterate fooled on the largest share of its step's draws (ties:
higher objective); if no iterate fooled any draw, the point of highest objective ``x_max``
(not the clean image, as AutoAttack returns: on a random defense the verdict on fresh draws
may still find it). ``success`` is judged by one more forward pass (a fresh draw, the key's
sub-stream ``"judge"``). ``info`` holds the per-image best objective and success frequency,
the final step sizes and zero / non-finite gradient counts.

Budgets: ``eps`` is the Linf radius or the normalised (RMS) L2 radius (Euclidean radius
``eps * sqrt(C*H*W)``), defaulting to the paper's bounds 8/255 and 0.05. Cost per image:
``restarts * (steps + 1) * eot`` forward and backward passes.

Shape: x (N, C, H, W) in [0, 1]; labels, targets (N,) int64 -> adversarial (N, C, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .. import seeding
from ..draws import DrawKey
from ..validation import check_int
from ._registry import register
from .ball import check_eps, per_image_norm, project, radius
from .base import Attack, AttackResult, forward
from .eot import EOT
from .losses import LOSSES, is_successful, objective

__all__ = ["APGD", "checkpoint_windows"]


def checkpoint_windows(steps: int) -> list:
    """The iterations (0-based, after which the step size is checked) of APGD's checkpoints,
    as the authors' code computes them: windows of ``max(int(0.22 n), 1)`` iterations, each
    next one ``max(int(0.03 n), 1)`` shorter, down to ``max(int(0.06 n), 1)``."""
    k = max(int(0.22 * steps), 1)
    shrink, least = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, i = [], k - 1
    while i < steps:
        out.append(i)
        k = max(k - shrink, least)
        i += k
    return out


@dataclass
class _Run:
    x_max: torch.Tensor  # highest-objective point (N, C, H, W)
    f_max: torch.Tensor  # its objective (N,)
    x_adv: torch.Tensor  # most successful iterate (N, C, H, W)
    freq: torch.Tensor  # its success frequency over its draws (N,)
    f_adv: torch.Tensor  # its objective (N,)
    eta: torch.Tensor  # final step sizes (N,)
    zero: torch.Tensor  # zero-gradient evaluations per image (N,)
    nonfinite: torch.Tensor  # non-finite-gradient evaluations per image (N,)


class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020) with EOT over a random model's draws (module docstring).

    Args (keyword only; AutoAttack's defaults):
        norm: ``'linf'`` or ``'l2'``.
        eps: radius: Linf, or normalised (RMS) L2 (default: 8/255, or 0.05 for L2).
        steps: iterations per restart (100).
        restarts: random restarts (1).
        loss: ``'ce'`` (APGD-CE), ``'dlr'`` (APGD-DLR; targeted DLR with targets) or ``'margin'``.
        eot: draws per objective evaluation on a random model (1; AutoAttack's rand version: 20).
        rho: oscillation threshold of the step-size check (0.75).
        momentum: weight ``a`` of the new step against the previous move (0.75).
        chunk: EOT draws per classifier call (memory; None: all).
        batch_size: images attacked together (None: all).
        progress: optional ``progress(done, total)``.
    """

    HYPERPARAMETERS = ("norm", "eps", "steps", "restarts", "loss", "eot", "rho", "momentum")
    name = "apgd"

    def __init__(
        self,
        *,
        norm: str = "linf",
        eps: Optional[float] = None,
        steps: int = 100,
        restarts: int = 1,
        loss: str = "ce",
        eot: int = 1,
        rho: float = 0.75,
        momentum: float = 0.75,
        chunk: Optional[int] = None,
        batch_size: Optional[int] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        self.norm, self.eps = check_eps(norm, eps)
        steps, restarts, eot = (check_int(v, what) for what, v in (("steps", steps), ("restarts", restarts), ("eot", eot)))
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        if not 0 <= float(rho) <= 1 or not 0 <= float(momentum) <= 1:
            raise ValueError(f"rho and momentum must lie in [0, 1], got {rho} and {momentum}")
        batch_size = None if batch_size is None else check_int(batch_size, "batch_size")
        self.steps, self.restarts, self.eot = int(steps), int(restarts), int(eot)
        self.loss = loss
        self.rho, self.momentum = float(rho), float(momentum)
        self.chunk = None if chunk is None else int(chunk)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.progress = progress

    def steps_per_batch(self) -> int:
        return self.restarts * self.steps

    # -- one evaluation: objective, gradient, success frequency -----------------------------
    def _evaluate(self, model: nn.Module, xa: torch.Tensor, labels, targets, key: DrawKey):
        n = xa.shape[0]
        xa = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            if self.eot > 1 and getattr(model, "randomized", False):
                z = EOT(model, self.eot, chunk=self.chunk, reduce="none")(xa, generator=key)
            else:
                z = forward(model, xa, key).unsqueeze(0)
            r = z.shape[0]
            f = objective(self.loss, z.reshape(r * n, -1), labels.repeat(r),
                          None if targets is None else targets.repeat(r)).view(r, n).mean(0)
        (grad,) = torch.autograd.grad(f.sum(), xa)
        with torch.no_grad():
            pred = z.detach().argmax(2)
            hit = pred == targets if targets is not None else pred != labels
        return f.detach().double(), grad.detach(), hit.float().mean(0)

    def _start(self, x: torch.Tensor, r: float, key: DrawKey) -> torch.Tensor:
        """AutoAttack's random start, image ``i`` from ``key.generator(i)``: Linf, a uniform
        draw rescaled to Linf norm ``r``; L2, a Gaussian direction of length ``r``; clipped."""
        rows = []
        for g in key.generators():
            if self.norm == "linf":
                t = 2 * seeding.rand(x.shape[1:], g, dtype=x.dtype) - 1
                rows.append(t / (t.abs().max() + 1e-12) * r)
            else:
                t = seeding.randn(x.shape[1:], g, dtype=x.dtype)
                rows.append(t / (t.norm() + 1e-12) * r)
        return (x + torch.stack(rows).to(x.device)).clamp(0.0, 1.0)

    def _step(self, grad: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return eta * grad.sign()
        return eta * grad / (per_image_norm(grad, 2) + 1e-12)

    def _run_once(self, model, x, labels, targets, key: DrawKey) -> _Run:
        n = x.shape[0]
        r = radius(self.norm, self.eps, x)
        checks = set(checkpoint_windows(self.steps))
        zero = torch.zeros(n, dtype=torch.long)
        nonfinite = torch.zeros(n, dtype=torch.long)

        def evaluate(xa, t):
            f, g, freq = self._evaluate(model, xa, labels, targets, key.child("step", t))
            flat = g.flatten(1)
            bad = ~torch.isfinite(flat).all(1)
            nonfinite.add_(bad.cpu().long())
            zero.add_(((flat.abs().amax(1) == 0) & ~bad).cpu().long())
            g = torch.where(bad.view(-1, 1, 1, 1), torch.zeros_like(g), g)
            f = torch.where(torch.isfinite(f), f, torch.full_like(f, -float("inf")))
            return f, g, freq

        x_k = self._start(x, r, key.child("start"))
        f, grad, freq = evaluate(x_k, 0)
        x_max, f_max, grad_max = x_k.clone(), f.clone(), grad.clone()
        x_adv, best_freq, f_adv = x_k.clone(), freq.clone(), f.clone()
        history = [f]  # objective of x^0, x^1, ...
        eta = torch.full((n, 1, 1, 1), 2.0 * r, dtype=x.dtype, device=x.device)
        x_prev = x_k.clone()
        window_start = 0
        reduced_last = torch.ones(n, dtype=torch.bool, device=x.device)
        f_max_last = f_max.clone()
        for i in range(self.steps):
            with torch.no_grad():
                a = self.momentum if i > 0 else 1.0
                move = x_k - x_prev
                x_prev = x_k
                z = project(self.norm, x_k + self._step(grad, eta), x, r)
                x_k = project(self.norm, x_k + a * (z - x_k) + (1 - a) * move, x, r)
            f, grad, freq = evaluate(x_k, i + 1)
            history.append(f)
            with torch.no_grad():
                better = (freq > best_freq) | ((freq == best_freq) & (f > f_adv))
                x_adv[better], best_freq[better], f_adv[better] = x_k[better], freq[better], f[better]
                up = f > f_max
                x_max[up], f_max[up], grad_max[up] = x_k[up], f[up], grad[up]
                if i in checks:
                    k = i + 1 - window_start
                    rises = sum((history[m] > history[m - 1]).long() for m in range(i + 2 - k, i + 2))
                    oscillating = rises <= self.rho * k
                    stalled = ~reduced_last & (f_max_last >= f_max)
                    reduce = oscillating | stalled
                    reduced_last, f_max_last = reduce, f_max.clone()
                    eta[reduce] /= 2.0
                    x_k = torch.where(reduce.view(-1, 1, 1, 1), x_max, x_k)
                    grad = torch.where(reduce.view(-1, 1, 1, 1), grad_max, grad)
                    window_start = i + 1
            self._advance()
        return _Run(x_max, f_max, x_adv, best_freq, f_adv, eta.flatten(), zero, nonfinite)

    def run(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], key: DrawKey) -> AttackResult:
        """Shape: x (N, C, H, W) in [0, 1]; labels, targets (N,) int64 -> result.adversarial
        (N, C, H, W), result.success (N,) bool."""
        n = x.shape[0]
        x_max, f_max = x.clone(), torch.full((n,), -float("inf"), dtype=torch.float64, device=x.device)
        x_adv, freq, f_adv = x.clone(), torch.full((n,), -1.0, device=x.device), f_max.clone()
        eta = torch.full((n,), float("nan"), dtype=x.dtype, device=x.device)
        zero = torch.zeros(n, dtype=torch.long)
        nonfinite = torch.zeros(n, dtype=torch.long)
        base = getattr(self, "_progress_base", 0)
        for rs in range(self.restarts):
            idx = (freq < 1.0).nonzero(as_tuple=True)[0]  # only images not fooled by every draw
            if idx.numel():
                sub = lambda t: None if t is None else t[idx]  # noqa: E731
                out = self._run_once(model, x[idx], labels[idx], sub(targets), key.child("restart", rs).select(idx.cpu()))
                up = out.f_max > f_max[idx]
                x_max[idx[up]], f_max[idx[up]] = out.x_max[up], out.f_max[up]
                better = (out.freq > freq[idx]) | ((out.freq == freq[idx]) & (out.f_adv > f_adv[idx]))
                sel = idx[better]
                x_adv[sel], freq[sel], f_adv[sel] = out.x_adv[better], out.freq[better], out.f_adv[better]
                eta[idx] = out.eta
                zero[idx.cpu()] += out.zero
                nonfinite[idx.cpu()] += out.nonfinite
            self._advance(to=base + (rs + 1) * self.steps)
        adversarial = torch.where((freq > 0).view(-1, 1, 1, 1), x_adv, x_max)
        with torch.no_grad():
            success = is_successful(forward(model, adversarial, key.child("judge")), labels, targets)
        info = {
            "attack": self.name,
            "hyperparameters": self.hyperparameters(),
            "radius": radius(self.norm, self.eps, x),
            "best_objective": f_max.tolist(),
            "attack_draw_success_frequency": freq.tolist(),
            "final_step_size": eta.tolist(),
            "gradient_stats": {"zero_gradients": int(zero.sum()), "nonfinite_gradients": int(nonfinite.sum()), "images": n},
        }
        return AttackResult(adversarial=adversarial.detach(), success=success.detach(), info=info)


register("apgd", help="APGD (Croce & Hein 2020): step-size-free PGD with momentum and checkpoints; --loss ce, dlr or margin")(APGD)
register("apgd-ce", help="APGD-CE: APGD on the cross-entropy (AutoAttack's defaults: 100 steps, 1 restart)", fixed={"loss": "ce"})(APGD)
register("apgd-dlr", help="APGD-DLR: APGD on the difference of logits ratio (targeted DLR with targets)", fixed={"loss": "dlr"})(APGD)

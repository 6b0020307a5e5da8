"""Carlini & Wagner L2 attack with its binary search over the constant c (paper Section 6.5,
Tables 2-3; PROTOCOL.md "Attacks": 5 binary-search steps, 1000 iterations, lr 0.1).

For each image, minimise over ``w`` (the tanh change of variables keeps the image in the box)::

    x' = (tanh(w) + 1) / 2
    ||x' - x||_2^2 + c * max(max_{j != t} z_j(x') - z_t(x'), -kappa)          (targeted)
    ||x' - x||_2^2 + c * max(z_y(x') - max_{j != y} z_j(x'), -kappa)          (untargeted)

with Adam, starting from ``x`` at every binary-search step. Every image has its own ``c``:
after each binary-search step it is halved toward the lower bound where an adversarial was
found and multiplied by 10 (until an upper bound exists, then bisected) where none was
(Carlini & Wagner 2017, Section V; the search the paper ran through Cleverhans). The result
is, per image, the successful iterate of smallest L2 over all steps, or ``x`` itself when
none was found (Cleverhans' convention), with success judged by one final forward pass.

Batching: the per-image losses are summed, and Adam's update is per coordinate, so an image's
trajectory does not depend on the rest of the batch. Early abort (C&W's "abort early") is per
image as well: every ``max(10, ceil(steps/10))`` iterations an image whose loss fell by less
than 0.01% since the last check is frozen for the rest of that binary-search step (its
variable is no longer updated), and the step ends when all images are frozen. (C&W check
every ``steps/10`` iterations; the floor of 10 keeps a short run from stopping on the first
oscillation of Adam at lr 0.1.)

Reference: Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ._registry import register
from ..draws import DrawKey
from ..validation import check_int
from .base import Attack, AttackResult, GradientStats, forward
from .binary_search import NO_UPPER, next_constants
from .losses import is_successful, margin_loss
from .verdict import round_record

__all__ = ["CarliniWagnerL2"]

_TANH_SCALE = 1 - 1e-6  # keeps atanh finite at pixels equal to 0 or 1


class CarliniWagnerL2(Attack):
    """C&W L2 with per-image binary search over ``c``.

    Args (keyword only):
        binary_search_steps: outer steps of the search over c (paper: 5).
        steps: Adam iterations per binary-search step (paper: 1000).
        lr: Adam learning rate (paper: 0.1; C&W's own default is 0.01).
        initial_const: starting c (Cleverhans' default 0.01, which the paper used).
        kappa: confidence margin (C&W's kappa; 0 as the paper).
        abort_early: freeze an image whose loss stopped decreasing (see module docstring).
        record_history: record, after each binary-search step, accuracy and attack success
            rate of the best adversarials so far and the mean c.
        batch_size: images attacked together (None: all).

    Shape: x (N, C, H, W) in [0, 1]; labels, targets (N,) -> adversarial (N, C, H, W),
    success (N,); ``info['l2']`` Euclidean and ``info['l2_rms']`` normalised L2 per image
    (inf where failed), ``info['const']`` the c at which each best adversarial was found.
    """

    HYPERPARAMETERS = ("binary_search_steps", "steps", "lr", "initial_const", "kappa", "abort_early")

    name = "cw"
    supports_targeted = True
    supports_untargeted = True
    norms = ("l2",)

    def __init__(
        self,
        *,
        binary_search_steps: int = 5,
        steps: int = 1000,
        lr: float = 0.1,
        initial_const: float = 1e-2,
        kappa: float = 0.0,
        abort_early: bool = True,
        record_history: bool = False,
        batch_size: Optional[int] = None,
    ) -> None:
        binary_search_steps, steps = check_int(binary_search_steps, "binary_search_steps"), check_int(steps, "steps")
        if not lr > 0 or not initial_const > 0 or kappa < 0:
            raise ValueError("lr and initial_const must be positive and kappa non-negative")
        self.binary_search_steps = int(binary_search_steps)
        self.steps = int(steps)
        self.lr = float(lr)
        self.initial_const = float(initial_const)
        self.kappa = float(kappa)
        self.abort_early = bool(abort_early)
        self.record_history = bool(record_history)
        self.batch_size = None if batch_size is None else check_int(batch_size, "batch_size")

    def run(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], key: DrawKey) -> AttackResult:
        """Attack one batch. A random model draws under ``key``: a fresh draw per iteration
        (sub-stream ``("step", binary-search step, iteration)``), so the run is reproducible."""
        n = x.shape[0]
        dev = x.device
        w0 = torch.atanh((2 * x - 1) * _TANH_SCALE)

        lower = torch.zeros(n, dtype=torch.float64, device=dev)
        upper = torch.full((n,), NO_UPPER, dtype=torch.float64, device=dev)
        const = torch.full((n,), self.initial_const, dtype=torch.float64, device=dev)
        best_l2sq = torch.full((n,), math.inf, device=dev)
        best_adv = x.clone()
        best_const = torch.full((n,), math.nan, dtype=torch.float64, device=dev)
        history: List[Dict[str, Any]] = []
        stats = GradientStats()
        check_every = max(10, math.ceil(self.steps / 10))
        iterations_run = []

        for bs_step in range(self.binary_search_steps):
            w = w0.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=self.lr)
            c = const.to(x.dtype)
            found = torch.zeros(n, dtype=torch.bool, device=dev)
            active = torch.ones(n, dtype=torch.bool, device=dev)
            previous = torch.full((n,), math.inf, device=dev)
            it = 0
            for it in range(self.steps):
                with torch.enable_grad():
                    x_new = (torch.tanh(w) + 1) / 2
                    logits = forward(model, x_new, key.child("step", bs_step, it))
                    l2sq = (x_new - x).flatten(1).pow(2).sum(dim=1)
                    adv_loss = margin_loss(logits, labels, targets, kappa=self.kappa)
                    loss = l2sq + c * adv_loss
                    # the gradient of w only: backward() would also leave .grad on the user's model
                    w.grad, x_grad = torch.autograd.grad(loss.sum(), (w, x_new))
                # the adversarial term's share of the gradient (the distance term's is 2 (x' - x)):
                # zero for every image when the model masks its gradient
                stats.add((x_grad - 2 * (x_new - x)).detach()[active])
                frozen = ~active
                kept = w.detach()[frozen].clone() if frozen.any() else None
                optimizer.step()
                if kept is not None:
                    with torch.no_grad():
                        w[frozen] = kept

                # book-keeping on the iterate the gradient was taken at
                with torch.no_grad():
                    l2sq_d = l2sq.detach()
                    succ = is_successful(logits.detach(), labels, targets) & (adv_loss.detach() <= -self.kappa)
                    found |= succ
                    better = succ & (l2sq_d < best_l2sq)
                    best_l2sq = torch.where(better, l2sq_d, best_l2sq)
                    best_adv = torch.where(better.view(-1, 1, 1, 1), x_new.detach(), best_adv)
                    best_const = torch.where(better, const, best_const)
                    if self.abort_early and it % check_every == 0:
                        stalled = loss.detach() > 0.9999 * previous
                        active &= ~stalled
                        previous = loss.detach()
                        if not active.any():
                            break
            iterations_run.append(it + 1)

            # per-image binary search over c
            const, lower, upper = next_constants(found, const, lower, upper)
            if self.record_history:
                with torch.no_grad():
                    pred = forward(model, best_adv, key.child("history", bs_step)).argmax(dim=1)
                history.append(round_record(bs_step + 1, pred, labels, targets, mean_const=float(const.mean())))

        with torch.no_grad():
            success = is_successful(forward(model, best_adv, key.child("judge")), labels, targets)
        l2 = best_l2sq.sqrt()
        info = {
            "attack": self.name,
            "hyperparameters": self.hyperparameters(),
            "l2": l2.cpu(),
            "l2_rms": (l2 / math.sqrt(x[0].numel())).cpu(),
            "const": best_const.cpu(),
            "iterations": iterations_run,
            "gradient_stats": stats.as_dict(),
        }
        return AttackResult(adversarial=best_adv.detach(), success=success, history=history, info=info)


register("cw", help="Carlini-Wagner L2: Adam in tanh space, 5 binary-search steps over c, 1000 iterations, lr 0.1")(CarliniWagnerL2)

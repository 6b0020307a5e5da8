"""Box-constrained L-BFGS attack (Szegedy et al. 2014) with a binary search over the constant
(paper Section 6.5, Tables 2-3; PROTOCOL.md "Attacks": 5 binary-search steps, 1000 iterations).

Szegedy et al. minimise ``c * ||r|| + loss_f(x + r, t)`` subject to ``x + r`` in the box and
search over ``c``. We use the equivalent parametrisation of Cleverhans' implementation, the one
the paper ran: per image, minimise::

    ||x' - x||_2^2 + const * CE(f(x'), t)            (targeted)
    ||x' - x||_2^2 + const * (-log(1 - p_y(x')))     (untargeted: push p_y to 0)

subject to ``x'`` in [0, 1], starting from ``x`` at every binary-search step; ``const`` plays
the role of ``1/c``. After each step, ``const`` is bisected downward where the minimiser is
adversarial and multiplied by 10 (then bisected once an upper bound exists) where it is not.
The result is, per image, the adversarial of smallest L2 over all steps, or ``x`` where none
was found; success is judged by one final forward pass.

Batching (a documented simplification, as in Cleverhans): the per-image objectives are summed
and minimised jointly by SciPy's L-BFGS-B (exact box constraints) over the flattened batch.
The objective is separable, so its minimiser is the per-image one, but L-BFGS's curvature
memory and stopping rule are shared, so the iterates (not the problem) depend on which images
share a batch. Attack one image at a time for per-image L-BFGS.

Reference: Szegedy et al., "Intriguing Properties of Neural Networks", ICLR 2014.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register
from ..draws import DrawKey
from ..validation import check_int
from .base import Attack, AttackResult, GradientStats, forward
from .binary_search import NO_UPPER, next_constants
from .losses import is_successful
from .verdict import round_record

__all__ = ["LBFGS", "lbfgs_adversarial_loss"]



def lbfgs_adversarial_loss(logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-sample loss minimised by L-BFGS: ``CE(z, t)`` (targeted) or ``-log(1 - p_y)``
    (untargeted, bounded below by 0, computed stably as
    ``logsumexp(z) - logsumexp_{j != y}(z_j)``).

    Shape: (N, K) -> (N,).
    """
    if targets is not None:
        return F.cross_entropy(logits, targets, reduction="none")
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return torch.logsumexp(logits, dim=1) - torch.logsumexp(others, dim=1)


class LBFGS(Attack):
    """Szegedy et al.'s L-BFGS attack with per-image binary search over the constant.

    Args (keyword only):
        binary_search_steps: outer search steps (paper: 5).
        max_iterations: L-BFGS-B iterations per search step (paper: 1000).
        initial_const: starting weight of the adversarial loss (Cleverhans' default 0.01).
        record_history: record accuracy/ASR of the best adversarials after each search step.
        batch_size: images optimised together (None: all; L-BFGS-B runs on the batch's
            joint objective, so its iterations depend on the batch).

    Shape: x (N, C, H, W) in [0, 1]; labels, targets (N,) -> adversarial (N, C, H, W),
    success (N,); ``info['l2']`` / ``info['l2_rms']`` per image (inf where failed),
    ``info['const']`` the constant of each best adversarial.
    """

    HYPERPARAMETERS = ("binary_search_steps", "max_iterations", "initial_const")

    name = "lbfgs"
    supports_targeted = True
    supports_untargeted = True
    norms = ("l2",)

    def __init__(
        self,
        *,
        binary_search_steps: int = 5,
        max_iterations: int = 1000,
        initial_const: float = 1e-2,
        record_history: bool = False,
        batch_size: Optional[int] = None,
    ) -> None:
        binary_search_steps, max_iterations = check_int(binary_search_steps, "binary_search_steps"), check_int(max_iterations, "max_iterations")
        if not initial_const > 0:
            raise ValueError("initial_const must be positive")
        self.binary_search_steps = int(binary_search_steps)
        self.max_iterations = int(max_iterations)
        self.initial_const = float(initial_const)
        self.record_history = bool(record_history)
        self.batch_size = None if batch_size is None else check_int(batch_size, "batch_size")

    def run(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], key: DrawKey) -> AttackResult:
        """Attack one batch. A random model draws under ``key``: a fresh draw per function
        evaluation (sub-stream ``("evaluation", binary-search step, call)``)."""
        from scipy.optimize import fmin_l_bfgs_b

        n = x.shape[0]
        dev, dtype, shape = x.device, x.dtype, x.shape
        x0 = x.double().cpu().numpy().ravel()

        lower = np.zeros(n)
        upper = np.full(n, NO_UPPER)
        const = np.full(n, self.initial_const)
        best_l2sq = np.full(n, np.inf)
        best_const = np.full(n, np.nan)
        best_adv = x.clone()
        history: List[Dict[str, Any]] = []
        evaluations: List[int] = []
        stats = GradientStats()

        calls = [0]

        def objective_and_grad(flat: np.ndarray, c: torch.Tensor, step: int):
            xa = torch.from_numpy(flat).view(shape).to(device=dev, dtype=dtype).requires_grad_(True)
            calls[0] += 1
            with torch.enable_grad():
                logits = forward(model, xa, key.child("evaluation", step, calls[0]))
                per_image = (xa - x).flatten(1).pow(2).sum(dim=1) + c * lbfgs_adversarial_loss(logits, labels, targets)
                total = per_image.sum()
                (grad,) = torch.autograd.grad(total, xa)
            stats.add((grad - 2 * (xa - x)).detach())  # the adversarial term's share (the distance's is 2 (x' - x))
            return float(total.item()), grad.detach().double().cpu().numpy().ravel()

        for step in range(self.binary_search_steps):
            c = torch.from_numpy(const).to(device=dev, dtype=dtype)
            solution, _, details = fmin_l_bfgs_b(
                objective_and_grad, x0.copy(), args=(c, step), bounds=[(0.0, 1.0)] * x0.size,
                maxiter=self.max_iterations,
            )
            evaluations.append(int(details.get("funcalls", 0)))
            xa = torch.from_numpy(solution).view(shape).to(device=dev, dtype=dtype).clamp(0, 1)
            with torch.no_grad():
                succ = is_successful(forward(model, xa, key.child("check", step)), labels, targets).cpu().numpy()
            l2sq = (xa - x).flatten(1).pow(2).sum(dim=1).double().cpu().numpy()
            better = succ & (l2sq < best_l2sq)
            best_l2sq = np.where(better, l2sq, best_l2sq)
            best_const = np.where(better, const, best_const)
            best_adv = torch.where(torch.from_numpy(better).to(dev).view(-1, 1, 1, 1), xa, best_adv)

            const, lower, upper = next_constants(succ, const, lower, upper)
            if self.record_history:
                with torch.no_grad():
                    pred = forward(model, best_adv, key.child("history", step)).argmax(dim=1)
                history.append(round_record(step + 1, pred, labels, targets, mean_const=float(const.mean())))

        with torch.no_grad():
            success = is_successful(forward(model, best_adv, key.child("judge")), labels, targets)
        l2 = torch.from_numpy(np.sqrt(best_l2sq))
        info = {
            "attack": self.name,
            "hyperparameters": self.hyperparameters(),
            "l2": l2,
            "l2_rms": l2 / math.sqrt(x[0].numel()),
            "const": torch.from_numpy(best_const),
            "function_evaluations": evaluations,
            "gradient_stats": stats.as_dict(),
        }
        return AttackResult(adversarial=best_adv.detach(), success=success, history=history, info=info)


register("lbfgs", help="L-BFGS (Szegedy et al.): box-constrained L-BFGS-B, 5 binary-search steps, 1000 iterations")(LBFGS)

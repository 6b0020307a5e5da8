"""DeepFool, L2, untargeted (Moosavi-Dezfooli et al. 2016; paper Section 6.5, PROTOCOL.md
"Attacks": DeepFool is the one standard attack run untargeted).

At each iteration the classifier is linearised around the current point ``x_i`` and the image
takes the smallest L2 step that crosses the nearest linearised boundary among the candidate
classes ``k`` (the ``candidates - 1`` classes ranked highest on the clean image, besides the
label ``y``)::

    f_k = z_k(x_i) - z_y(x_i),   w_k = grad z_k(x_i) - grad z_y(x_i)
    l   = argmin_k |f_k| / ||w_k||_2
    r_i = (|f_l| / ||w_l||_2 + 1e-4) * w_l / ||w_l||_2
    x_{i+1} = clip(x + (1 + overshoot) * sum_{j <= i} r_j, 0, 1)

until ``x_{i+1}`` is no longer classified as ``y`` or ``steps`` iterations have run (the
1e-4 and the overshoot on the accumulated perturbation are those of the authors' code). For a
linear binary classifier the first step lands at the analytic distance to the boundary times
``1 + overshoot``.

Batching: all images move together; an image is frozen (no further gradient computed for it)
as soon as it is misclassified, so each image's path is its own.

Reference: Moosavi-Dezfooli, Fawzi, Frossard, "DeepFool: a simple and accurate method to fool
deep neural networks", CVPR 2016.
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
from .verdict import round_record

__all__ = ["DeepFool"]


class DeepFool(Attack):
    """Batched untargeted L2 DeepFool.

    Args (keyword only):
        steps: maximum number of iterations (50).
        overshoot: the final perturbation is ``(1 + overshoot)`` times the accumulated one (0.02).
        candidates: number of top classes considered, the label included (10).
        record_history: record per-iteration accuracy and success rate.
        batch_size: images attacked together (None: all).

    Shape: x (N, C, H, W) in [0, 1]; labels (N,) -> adversarial (N, C, H, W), success (N,);
    ``info['iterations']`` per image, ``info['l2']`` / ``info['l2_rms']`` per image.
    """

    HYPERPARAMETERS = ("steps", "overshoot", "candidates")

    name = "deepfool"
    supports_targeted = False
    supports_untargeted = True
    norms = ("l2",)

    def __init__(self, *, steps: int = 50, overshoot: float = 0.02, candidates: int = 10, record_history: bool = False,
                 batch_size: Optional[int] = None) -> None:
        steps, candidates = check_int(steps, "steps"), check_int(candidates, "candidates", minimum=2)
        if not overshoot >= 0:
            raise ValueError(f"overshoot must be >= 0, got {overshoot}")
        self.steps = int(steps)
        self.overshoot = float(overshoot)
        self.candidates = int(candidates)
        self.record_history = bool(record_history)
        self.batch_size = None if batch_size is None else check_int(batch_size, "batch_size")

    def run(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], key: DrawKey) -> AttackResult:
        """Attack one batch (untargeted: the base refuses ``targets``). A random model draws
        under ``key``: a fresh draw per iteration (sub-stream ``("step", iteration)``)."""
        n = x.shape[0]
        dev = x.device

        with torch.no_grad():
            logits0 = forward(model, x, key.child("start"))
        k = min(self.candidates, logits0.shape[1])
        # candidate classes: the label first, then the k-1 highest other classes
        others = logits0.scatter(1, labels[:, None], float("-inf")).topk(k - 1, dim=1).indices
        cand = torch.cat([labels[:, None], others], dim=1)

        r_tot = torch.zeros_like(x)
        x_adv = x.clone()
        active = logits0.argmax(dim=1) == labels
        iterations = torch.zeros(n, dtype=torch.long, device=dev)
        history: List[Dict[str, Any]] = []
        stats = GradientStats()

        for it in range(self.steps + 1):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xa = x_adv[idx].clone().requires_grad_(True)
            with torch.enable_grad():
                logits = forward(model, xa, key.select(idx).child("step", it))
            still = logits.argmax(dim=1) == labels[idx]
            active[idx[~still]] = False
            if it > 0 and self.record_history:
                # an image still classified correctly is active; the others are fooled
                history.append(round_record(it, torch.where(active, labels, -1), labels, None))
            if it == self.steps or not still.any():
                break
            z = logits.gather(1, cand[idx])  # (m, k)
            grads = []
            for j in range(k):
                (g,) = torch.autograd.grad(z[:, j].sum(), xa, retain_graph=j < k - 1)
                grads.append(g)
            grads = torch.stack(grads, dim=1)  # (m, k, C, H, W)
            f = (z[:, 1:] - z[:, :1]).detach()  # (m, k-1)
            w = grads[:, 1:] - grads[:, :1]  # (m, k-1, C, H, W)
            w_norm = w.flatten(2).norm(dim=2)  # (m, k-1)
            dist = f.abs() / w_norm.clamp_min(1e-12)
            best = dist.argmin(dim=1)
            sel = torch.arange(idx.numel(), device=dev)
            w_l = w[sel, best]
            stats.add(w_l)
            step = (dist[sel, best] + 1e-4) / w_norm[sel, best].clamp_min(1e-12)
            r_i = (step.view(-1, 1, 1, 1) * w_l).to(r_tot.dtype)  # a model may give logits in another dtype
            upd = idx[still]
            r_tot[upd] = r_tot[upd] + r_i[still]
            x_adv[upd] = (x[upd] + (1 + self.overshoot) * r_tot[upd]).clamp(0, 1)
            iterations[upd] += 1

        with torch.no_grad():
            success = forward(model, x_adv, key.child("judge")).argmax(dim=1) != labels
        l2 = (x_adv - x).flatten(1).norm(dim=1)
        info = {
            "attack": self.name,
            "hyperparameters": self.hyperparameters(),
            "iterations": iterations.cpu(),
            "l2": l2.cpu(),
            "l2_rms": (l2 / math.sqrt(x[0].numel())).cpu(),
            "gradient_stats": stats.as_dict(),
        }
        return AttackResult(adversarial=x_adv.detach(), success=success, history=history, info=info)


register("deepfool", help="DeepFool (untargeted, L2): overshoot 0.02, 50 iterations, top-10 candidate classes")(DeepFool)

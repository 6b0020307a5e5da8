"""The paper's protocol attacks: ``bpda`` (Section 6.2, Fig. 4a/b) and ``bpda-eot`` (Section 6.3,
Fig. 4c/d), as pinned by PROTOCOL.md ("BPDA, paper protocol", "BPDA+EOT, paper protocol").

Per round, for every image still running::

    x <- clip(x - lr * grad_x CE(f(g(x)), target), 0, 1)

with the *raw* gradient (no sign, no normalisation: the paper's "learning rate of BPDA is
0.1", Section 6.1, applied to the gradient as it is) of the per-image cross-entropy (summed over
the batch, so batch size never changes a step), ``lr = 0.1``, and the gradient of ``g`` taken
through BPDA (:class:`~.bpda.BPDA`). ``approx=None`` is BPDA's own default, stage-wise for a
defense made of stages (``dct-distort``: the identity through the rounding, the real gradient of
the grid distortion), stronger than the paper; :func:`paper_approx` gives the paper's, the
identity over the whole of a non-differentiable defense, which ``reproduce``'s Fig. 4 and the
demo use. For
``bpda-eot`` the gradient is the average of the gradients of 30 independent draws of ``g``
per round (the mean over draws of the per-draw cross-entropy, differentiated).

An image stops

* at *success*: it is classified as its target with ``l2_rms < eps`` (0.05, the paper's RMS
  bound). Success is judged on one forward pass of the deployed (defended) model with a fresh
  draw of the defense (the run key's sub-stream ``("round", r, "judge")``, never used for the
  gradient, whose draws are ``("round", r, "gradient")``);
* at the *bound*: the next iterate would have ``l2_rms >= eps``; that iterate is discarded
  and the image keeps its last iterate inside the bound. The round at which this happens is
  recorded per image (``info["bound_round"]``), with its mean.

After every round ACC (prediction == label) and ASR (prediction == target) are recorded over
all images in ``history``; a stopped image keeps its state (its image and its last judged
prediction), so the curves of Fig. 4 can be drawn. ``until_bound=True`` keeps going after
``rounds`` until every image has stopped (at most ``max_rounds``), the paper's "we continue
the attack until the images reach the l2 bound" (231 rounds for its defense).

Where the defense goes: on the model side (STYLE.md). Pass the deployed model
``Defended(defense, classifier)``; the attack differentiates ``with_bpda(model, approx)``
(the same model with ``BPDA(defense, approx)`` in place of the defense, values unchanged) and
judges success on the model as given. A model already holding a ``BPDA`` is used as is.
Untargeted use (``targets=None``) ascends the cross-entropy of the true label instead.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..draws import DrawKey
from ..metrics import PAPER_L2_BOUND, l2_rms
from ..validation import check_int
from ._registry import register
from .ball import check_eps
from .base import Attack, AttackResult, GradientStats, forward
from .bpda import with_bpda
from .eot import expectation_gradient
from .verdict import merge_histories, round_record

__all__ = ["ProtocolBPDA", "merge_histories", "paper_approx"]


class ProtocolBPDA(Attack):
    """BPDA / BPDA+EOT exactly as the paper runs them (see the module docstring).

    Args:
        rounds: rounds to run (Fig. 4 draws 50).
        lr: step size on the raw gradient (0.1).
        eot: draws of the defense averaged per gradient (1: BPDA; 30: BPDA+EOT).
        eps: the normalised-L2 (RMS) bound (0.05).
        approx: BPDA approximation (None: identity / real gradient, see ``BPDA``).
        until_bound: continue past ``rounds`` until every image has stopped.
        max_rounds: safety cap for ``until_bound``.
        chunk: EOT draws per classifier call (memory).
        batch_size: images attacked together (None: all).
        progress: optional callable ``progress(round, total_rounds, record)`` after each round.

    Shape: x (N, C, H, W) in [0,1]; labels, targets (N,) int64.
    """

    HYPERPARAMETERS = ("rounds", "lr", "eot", "eps", "approx", "until_bound", "max_rounds", "chunk", "batch_size")
    name = "bpda"
    composes_bpda = True

    def __init__(
        self,
        *,
        rounds: int = 50,
        lr: float = 0.1,
        eot: int = 1,
        eps: float = PAPER_L2_BOUND,
        approx: Any = None,
        until_bound: bool = False,
        max_rounds: int = 1000,
        chunk: Optional[int] = None,
        batch_size: Optional[int] = None,
        progress: Optional[Callable[[int, int, Dict[str, Any]], None]] = None,
    ) -> None:
        rounds, eot = check_int(rounds, "rounds"), check_int(eot, "eot")
        max_rounds = check_int(max_rounds, "max_rounds")
        chunk = None if chunk is None else check_int(chunk, "chunk")
        batch_size = None if batch_size is None else check_int(batch_size, "batch_size")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        _, eps = check_eps("l2", eps)
        self.rounds = int(rounds)
        self.lr = float(lr)
        self.eot = int(eot)
        self.eps = float(eps)
        self.approx = approx
        self.until_bound = bool(until_bound)
        self.max_rounds = max(int(max_rounds), self.rounds)
        self.chunk = chunk
        self.batch_size = batch_size
        self.progress = progress
        self.name = "bpda-eot" if self.eot > 1 else "bpda"

    def _gradient(self, grad_model: nn.Module, x: torch.Tensor, goal: torch.Tensor, targeted: bool, key: DrawKey) -> torch.Tensor:
        def per_draw_ce(z: torch.Tensor) -> torch.Tensor:  # (r, N, K) -> (r, N)
            r = z.shape[0]
            return F.cross_entropy(z.reshape(-1, z.shape[-1]), goal.repeat(r), reduction="none").view(r, -1)

        # the gradient of the mean cross-entropy over the draws, one chunk of draws at a time
        _, grad, _ = expectation_gradient(grad_model, x, key, self.eot, per_draw_ce, chunk=self.chunk)
        self._stats.add(grad)
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)  # counted above and reported
        # Targeted: descend CE to the target; untargeted: ascend CE of the label.
        return grad if targeted else -grad

    def run(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], key: DrawKey) -> AttackResult:
        targeted = targets is not None
        goal = targets if targeted else labels
        grad_model = with_bpda(model, self.approx)
        self._stats = GradientStats()
        total_rounds = self.max_rounds if self.until_bound else self.rounds
        n = x.shape[0]
        x_adv = x.clone()
        with torch.no_grad():
            pred = forward(model, x_adv, key.child("round", 0, "judge")).argmax(1)
        hit0 = pred == targets if targeted else pred != labels
        active = ~hit0  # an image that already meets the goal is a success at round 0
        stop_round = torch.full((n,), -1, dtype=torch.long)
        stop_round[hit0.cpu()] = 0
        reason = ["success" if bool(h) else "running" for h in hit0.cpu()]
        bound_round = torch.full((n,), -1, dtype=torch.long)
        history: List[Dict[str, Any]] = []
        initial = round_record(0, pred, labels, targets, n_running=int(active.sum()))
        r = 0
        while r < total_rounds and (r < self.rounds or bool(active.any())):
            r += 1
            idx = active.nonzero(as_tuple=True)[0]
            if idx.numel():
                xa = x_adv[idx]
                grad = self._gradient(grad_model, xa, goal[idx], targeted, key.child("round", r, "gradient").select(idx.cpu()))
                x_new = (xa - self.lr * grad).clamp(0.0, 1.0)
                within = l2_rms(x_new, x[idx]) < self.eps
                over = idx[~within]
                if over.numel():
                    active[over] = False
                    stop_round[over.cpu()] = r
                    bound_round[over.cpu()] = r
                    for i in over.tolist():
                        reason[i] = "bound"
                keep = idx[within]
                if keep.numel():
                    x_adv[keep] = x_new[within]
                    with torch.no_grad():
                        p = forward(model, x_adv[keep], key.child("round", r, "judge").select(keep.cpu())).argmax(1)
                    pred[keep] = p
                    done = keep[(p == targets[keep]) if targeted else (p != labels[keep])]
                    if done.numel():
                        active[done] = False
                        stop_round[done.cpu()] = r
                        for i in done.tolist():
                            reason[i] = "success"
            rec = round_record(r, pred, labels, targets, n_running=int(active.sum()))
            history.append(rec)
            self._advance(to=self._progress_base + r, extra=rec)
        success = (pred == targets) if targeted else (pred != labels)
        info = {
            "initial": initial,
            "stop_round": stop_round.tolist(),
            "stop_reason": reason,
            "bound_round": bound_round.tolist(),
            "l2": l2_rms(x_adv, x).tolist(),
            "final_prediction": pred.tolist(),
            "gradient_stats": self._stats.as_dict(),
        }
        return AttackResult(adversarial=x_adv, success=success.cpu(), history=history, info=info)

    def steps_per_batch(self) -> int:
        return self.max_rounds if self.until_bound else self.rounds

    def merge_info(self, parts: List[Dict[str, Any]], sizes: List[int]) -> Dict[str, Any]:
        merged = super().merge_info(parts, sizes)
        merged["initial"] = merge_histories([[p["initial"]] for p in parts])[0]
        return merged

    def finish(self, result: AttackResult, model, x, labels, targets, key) -> AttackResult:
        info = result.info
        stop_round = torch.tensor(info["stop_round"])
        bound_round = torch.tensor(info["bound_round"])
        reached = bound_round[bound_round >= 0]
        n = len(info["stop_round"])
        info.update({
            "rounds_run": len(result.history),
            "mean_bound_round": float(reached.float().mean()) if reached.numel() else None,
            "n_reached_bound": int(reached.numel()),
            "rounds_to_all_stopped": int(stop_round.max()) if n and bool((stop_round >= 0).all()) else None,
            "lr": self.lr,
            "eot": self.eot,
            "eps": self.eps,
            "targeted": targets is not None,
        })
        return result

register("bpda", help="BPDA, paper protocol (Section 6.2): raw-gradient steps lr 0.1, stop at success or the l2 bound", fixed={"eot": 1})(ProtocolBPDA)
register("bpda-eot", help="BPDA+EOT, paper protocol (Section 6.3): as bpda, gradient averaged over 30 draws")(partial(ProtocolBPDA, eot=30))


def paper_approx(model: nn.Module) -> Optional[str]:
    """The paper's BPDA for the deployed ``model`` (PROTOCOL.md "BPDA, paper protocol": forward
    through ``g``, backward as the identity): ``"identity"`` over the whole defense when it is
    not differentiable as a whole (``dct-distort``: the rounding and the grid distortion alike);
    ``None`` (BPDA's own default: the real gradient, stage by stage) when it is differentiable
    (``rand``, ``crop``) or changes the image's size (a chain such as ``fd+rand``), where an
    identity would not have the output's shape."""
    defense = getattr(model, "defense", None)
    if defense is None or getattr(defense, "differentiable", False) or getattr(defense, "changes_size", False):
        return None
    return "identity"

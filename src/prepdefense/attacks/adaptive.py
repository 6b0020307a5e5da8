"""``adaptive``: the strong adaptive attack (PROTOCOL.md "Strong adaptive attack", beyond the paper).

Projected gradient descent inside the bound, built to answer "how robust is the defense
really" (Athalye et al. 2018; Carlini et al. 2019; Tramer et al. 2020):

* **Threat model**: the L2 ball of normalised radius ``eps`` (default 0.05, i.e. a Euclidean
  radius ``0.05 * sqrt(C*H*W)``) or the Linf ball of radius ``eps`` (default 8/255),
  intersected with the [0,1] box.
* **Gradient**: BPDA through the non-differentiable parts of the defense (real gradient
  through its differentiable parts; see :class:`~.bpda.BPDA`, ``approx=None``) and EOT over
  ``eot`` draws per step (default 30): the objective is the mean over draws of the per-draw
  loss, so its gradient is the mean of the per-draw gradients (Athalye et al.'s EOT).
* **Steps**: the shared loop of :class:`~.gradient.GradientAttack` (one loop for FGSM, BIM,
  PGD, MI-FGSM and this attack): random start (uniform in the Linf or L2 ball), ``steps``
  (default 200) sign (Linf) or L2-normalised (L2) steps with a cosine-decayed step size from
  ``step_fraction * eps`` (0.25) down to 1% of it, projection after each step.
* **Losses**: cross-entropy and the C&W margin (``kappa`` 20, so a met goal keeps being
  pushed for a margin), one restart per loss by default; an image already fooled by every draw
  of a previous restart is not attacked again (auto-attack's "only still-robust points").
* **Best iterate**: per image, the iterate with the highest success frequency over the EOT
  draws of its step (draws the attack sees anyway), ties broken by the lowest mean probability
  of the true class (untargeted) / highest of the target (targeted). This selection uses the
  attack's own draws only.
* **Verdict on fresh draws**: the kept images are judged on ``draws`` (R >= 10) fresh draws of
  the defended model, from generators never used during the attack. Reported in
  ``AttackResult.info``:

  - ``robust_accuracy_expected``: mean over images of the fraction of draws classified
    correctly (the expected robust accuracy over draws); ``robust_accuracy_worst``: fraction of
    images classified correctly under *every* draw (an image counts as broken if any draw is
    fooled);
  - ``asr_expected`` / ``asr_worst``: the same for success (targeted: predicted as the target;
    untargeted: not predicted as the label), worst = fooled under *some* draw;
  - 95% intervals (:mod:`.verdict`): Wilson score intervals for the worst-case figures and a
    percentile bootstrap over images, with two pseudo-images at 0 and two at 1, for the expected
    figures (:func:`.verdict.bootstrap_interval`).

``success`` in the result is the worst-case verdict (fooled under some fresh draw). The
``model`` is the deployed model ``Defended(defense, classifier)`` (or a bare classifier);
the attack differentiates ``with_bpda(model, approx)`` and judges on ``model`` as given.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ..draws import DrawKey
from ..metrics import l2_rms, linf
from ..validation import check_int
from ._registry import register
from .base import AttackResult
from .bpda import with_bpda
from .gradient import GradientAttack
from .losses import LOSSES
from .verdict import bootstrap_interval, evaluate_on_draws, judge_on_draws, summarize, wilson_interval

__all__ = ["AdaptiveAttack", "wilson_interval", "bootstrap_interval", "evaluate_on_draws"]


class AdaptiveAttack(GradientAttack):
    """EOT-PGD with BPDA, two losses, best iterate, verdict on fresh draws (module docstring).

    Args:
        norm: ``"l2"`` (normalised radius; the default, the paper's threat model for its adaptive
            attack, unlike the other attacks' ``"linf"``) or ``"linf"``.
        eps: bound; normalised RMS for L2 (default 0.05), max-abs for Linf (default 8/255).
        steps: PGD steps per restart (>= 200 recommended; default 200).
        eot: draws averaged per step (default 30; ignored for deterministic models).
        losses: losses to run, one restart each (``"ce"``, ``"margin"``, ``"dlr"``).
        restarts: total restarts (default ``len(losses)``), cycling through ``losses``.
        step_fraction: initial step size as a fraction of the radius (0.25).
        kappa: margin-loss confidence (20).
        draws: fresh draws for the verdict (R >= 10).
        approx: BPDA approximation (None: auto, see ``BPDA``).
        chunk: EOT draws per classifier call (None: at most 16 images per call; memory holds one
            call's activations at a time).
        batch_size: images attacked together (None: all).
        random_start: start from a random point of the ball.
        progress: optional ``progress(done_steps, total_steps)`` callable.

    Shape: x (N, C, H, W) in [0,1]; labels, targets (N,) int64 (targets None: untargeted).
    """

    HYPERPARAMETERS = ("norm", "eps", "steps", "eot", "losses", "restarts", "step_fraction", "kappa", "draws",
                       "approx", "chunk", "batch_size", "random_start")
    name = "adaptive"
    composes_bpda = True

    def __init__(
        self,
        *,
        norm: str = "l2",
        eps: Optional[float] = None,
        steps: int = 200,
        eot: int = 30,
        losses: Sequence[str] = ("ce", "margin"),
        restarts: Optional[int] = None,
        step_fraction: float = 0.25,
        kappa: float = 20.0,
        draws: int = 10,
        approx: Any = None,
        chunk: Optional[int] = None,
        batch_size: Optional[int] = None,
        random_start: bool = True,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        if isinstance(losses, str):
            losses = tuple(s.strip() for s in losses.split(","))
        if not losses or any(l not in LOSSES for l in losses):
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {losses!r}")
        draws = check_int(draws, "draws")
        restarts = None if restarts is None else check_int(restarts, "restarts")
        super().__init__(norm=norm, eps=eps, steps=steps, rel_stepsize=step_fraction, random_start=random_start,
                         loss=losses[0], kappa=kappa, eot=eot, batch_size=batch_size, chunk=chunk)
        self.losses = tuple(losses)
        self.restarts = int(restarts) if restarts is not None else len(self.losses)
        self.step_fraction = float(step_fraction)
        self.draws = int(draws)
        self.approx = approx
        self.progress = progress

    def step_length(self, t: int, alpha: float) -> float:
        """Cosine decay from ``alpha`` to 1% of it over the ``steps``."""
        return alpha * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t / self.steps)))

    def steps_per_batch(self) -> int:
        return self.restarts * self.steps

    def run(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], key: DrawKey) -> AttackResult:
        grad_model = with_bpda(model, self.approx)
        n = x.shape[0]
        best_x = x.clone()
        best_freq = torch.full((n,), -1.0, device=x.device)
        best_tie = torch.full((n,), float("inf"), device=x.device)
        zero = torch.zeros(n, dtype=torch.long)
        nonfinite = torch.zeros(n, dtype=torch.long)
        per_loss: Dict[str, int] = {}
        evaluations = 0
        attack_key = key.child("attack")
        for r in range(self.restarts):
            loss_name = self.losses[r % len(self.losses)]
            idx = (best_freq < 1.0).nonzero(as_tuple=True)[0]  # only images not fooled by every draw
            if idx.numel() == 0:
                for _ in range(self.steps):
                    self._advance()
                continue
            sub = lambda t: None if t is None else t[idx]  # noqa: E731
            out = self.pgd(grad_model, x[idx], labels[idx], sub(targets), attack_key.child("restart", r).select(idx.cpu()),
                           loss=loss_name, tick=self._advance)
            better = (out.best_frequency > best_freq[idx]) | ((out.best_frequency == best_freq[idx]) & (out.best_tie < best_tie[idx]))
            sel = idx[better]
            best_x[sel] = out.best[better]
            best_freq[sel] = out.best_frequency[better]
            best_tie[sel] = out.best_tie[better]
            zero[idx.cpu()] += out.zero_gradients
            nonfinite[idx.cpu()] += out.nonfinite_gradients
            per_loss[loss_name] = per_loss.get(loss_name, 0) + int(better.sum())
            evaluations += int(idx.numel()) * self.steps
        judged = judge_on_draws(model, best_x, labels, targets, draws=self.draws, key=key)
        stats = {"zero_gradients": int(zero.sum()), "nonfinite_gradients": int(nonfinite.sum()),
                 "gradient_evaluations": evaluations}
        info = {
            "verdict_correct": judged["correct"],
            "verdict_fooled": judged["fooled"],
            "attack_draw_success_frequency": best_freq.tolist(),
            "best_from_loss": per_loss,
            "gradient_stats": stats,
            "zero_gradient_steps": zero.tolist(),
            "nonfinite_gradient_steps": nonfinite.tolist(),
        }
        return AttackResult(adversarial=best_x, success=judged["fooled"].any(1), history=[], info=info)

    def finish(self, result: AttackResult, model, x, labels, targets, key) -> AttackResult:
        info = result.info
        correct, fooled = info.pop("verdict_correct"), info.pop("verdict_fooled")
        verdict = summarize(correct, fooled, seed=key.seed % (2**32))
        dist = l2_rms(result.adversarial, x) if self.norm == "l2" else linf(result.adversarial, x)
        info.update(verdict)
        info.update({
            "norm": self.norm,
            "eps": self.eps,
            "radius": self.radius(x),
            "steps": self.steps,
            "eot": self.eot,
            "restarts": self.restarts,
            "losses": list(self.losses),
            "targeted": targets is not None,
            "max_distance": float(dist.max()) if dist.numel() else 0.0,
        })
        return result


register("adaptive", help="strong adaptive attack: EOT-PGD with BPDA, CE+margin, best iterate, verdict on fresh draws")(AdaptiveAttack)

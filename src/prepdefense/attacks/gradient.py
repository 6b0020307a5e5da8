"""Iterative gradient attacks in L2 and Linf: FGSM, I-FGSM/BIM, PGD, MI-FGSM (paper Section
6.5, Tables 2-3; PROTOCOL.md "Attacks", standard attacks).

One base class, :class:`GradientAttack` (the shape of foolbox 3's gradient-descent base): the
four attacks differ only in their defaults for the number of steps, the step size, the random
start and the momentum. Each step

1. computes the per-sample objective (:mod:`.losses`, summed over the batch, so a step never
   depends on the batch size) and its gradient with respect to the current iterate;
2. (MI-FGSM only) accumulates ``g <- momentum * g + grad / ||grad||_1`` (Dong et al. 2018);
3. normalises the direction: ``sign`` for Linf, ``d / ||d||_2`` per image for L2;
4. moves by the step size, projects the perturbation onto the ball (Linf: clip to
   ``[-eps, eps]``; L2: rescale to norm ``eps`` when outside) and clips to the box [0, 1].

Budgets. ``eps`` is the ball radius: the Linf radius, or for L2 the paper's *normalised*
(root-mean-square) distance ``||d||_2 / sqrt(C*H*W)`` (PROTOCOL.md, "Conventions"); every
L2 budget in prepdefense is in this unit and named ``eps``. The Euclidean radius
``eps * sqrt(C*H*W)`` is worked out from the images' shape at call time (0.05 at 3x224x224 is
a Euclidean radius of about 19.4; foolbox and torchattacks take that Euclidean figure). An
absolute ``step_size`` is read in the same unit. The default is the attack class's Linf
``eps``, or 0.05 (the paper's bound) for L2.

The loop. FGSM, BIM, PGD, MI-FGSM and the strong ``adaptive`` attack share one loop,
:meth:`GradientAttack.pgd`, and differ only in its hooks: :meth:`~GradientAttack.random_start`,
:meth:`~GradientAttack.step_length` (a constant, or the adaptive attack's cosine schedule),
:meth:`~GradientAttack.normalize` and :meth:`~GradientAttack.project`. With ``eot > 1`` on a
random model the objective of a step is the mean over ``eot`` draws of the per-draw loss
(Athalye et al.'s EOT; the draws are the run key's sub-stream ``("step", restart, t)``). Every
step also scores the current iterate from the draws it computed anyway: the fraction of draws
on which it succeeds, ties broken by the mean probability of the true class (untargeted, lower
is better) or of the target (targeted, higher is better); the best iterate by that score is
kept. Zero and non-finite gradients are counted per image in ``info["gradient_stats"]`` (a
non-finite gradient step is skipped rather than taken).

Targets. With ``targets`` the attack is targeted (success = classified as the target);
without, untargeted (success = no longer classified as the label).

Success is judged by one forward pass of the model on the images returned (a fresh draw for a
randomised model, the key's sub-stream ``"judge"``). With ``keep_best=True`` each image returns
its best iterate by the score above when that iterate succeeded on some draw, or the final
iterate otherwise. With ``record_history=True`` the result's ``history`` lists, for every step
``k``, the accuracy and attack success rate of the k-th iterate.

References:
    Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015 (FGSM).
    Kurakin et al., "Adversarial Examples in the Physical World", 2017 (I-FGSM / BIM).
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018 (PGD).
    Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018 (MI-FGSM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .. import seeding
from ..draws import DrawKey
from ..metrics import PAPER_L2_BOUND, PAPER_LINF_BOUND
from . import ball
from ._registry import register
from ..validation import check_int
from .ball import NORMS, check_eps, normalize_norm, per_image_norm
from .base import Attack, AttackResult, forward, gradient_health
from .eot import expectation_gradient
from .losses import LOSSES, is_successful, objective
from .verdict import round_record

__all__ = ["GradientAttack", "FGSM", "BIM", "PGD", "MIFGSM", "PGDRun", "NORMS", "normalize_norm"]

@dataclass
class PGDRun:
    """What one run of the loop returns (per image, batch order).

    Attributes:
        final: the last iterate.
        best: the best iterate by the score (success frequency, then goal probability).
        best_frequency: its success frequency over the draws of its step, (N,).
        best_tie: its tie-break score (lower is better), (N,).
        history: per-step accuracy / ASR records (when recorded).
        zero_gradients / nonfinite_gradients: per-image counts of such steps, (N,).
    """

    final: torch.Tensor
    best: torch.Tensor
    best_frequency: torch.Tensor
    best_tie: torch.Tensor
    history: List[Dict[str, Any]]
    zero_gradients: torch.Tensor
    nonfinite_gradients: torch.Tensor


class GradientAttack(Attack):
    """Base of FGSM, BIM, PGD, MI-FGSM and ``adaptive``: ``steps`` normalised gradient steps,
    projected (the module docstring).

    Args (keyword only):
        norm: ``'linf'`` or ``'l2'``.
        eps: ball radius: Linf radius, or normalised (RMS) L2 radius, the paper's unit.
        steps: number of gradient steps.
        step_size: absolute step (Linf: per-pixel change; L2: RMS length). Overrides
            ``rel_stepsize``.
        rel_stepsize: step as a fraction of the radius (used when ``step_size`` is None).
        random_start: start from a uniform draw in the ball (Linf: U[-eps, eps] per pixel;
            L2: uniform in the ball), drawn per image from the run's key.
        momentum: MI-FGSM decay factor ``mu`` (0 disables the momentum accumulator).
        loss: ``'ce'`` (cross-entropy) or ``'margin'`` (Carlini-Wagner), see :mod:`.losses`.
        kappa: confidence of the margin loss.
        eot: draws averaged per step on a random model (1: one draw per step).
        keep_best: return each image's best successful iterate instead of the final one.
        record_history: record per-step accuracy and attack success rate.
        batch_size: images attacked together (None: all).
        chunk: EOT draws per classifier call (None: ``max(1, 16 // N)``, so memory holds the
            activations of at most ``max(16, N)`` images whatever ``eot``; see
            :func:`~prepdefense.attacks.eot.expectation_gradient`).
    """

    HYPERPARAMETERS = ("norm", "eps", "steps", "step_size", "rel_stepsize", "random_start",
                       "momentum", "loss", "kappa", "eot", "keep_best")

    name = "gradient"
    #: default Linf radius when ``eps`` is not given (subclasses override).
    default_linf_eps: float = PAPER_LINF_BOUND

    def __init__(
        self,
        *,
        norm: str = "linf",
        eps: Optional[float] = None,
        steps: int = 10,
        step_size: Optional[float] = None,
        rel_stepsize: Optional[float] = None,
        random_start: bool = False,
        momentum: float = 0.0,
        loss: str = "ce",
        kappa: float = 0.0,
        eot: int = 1,
        keep_best: bool = False,
        record_history: bool = False,
        batch_size: Optional[int] = None,
        chunk: Optional[int] = None,
    ) -> None:
        norm = normalize_norm(norm)
        if eps is None:
            eps = self.default_linf_eps if norm == "linf" else PAPER_L2_BOUND
        norm, eps = check_eps(norm, eps)
        steps, eot = check_int(steps, "steps"), check_int(eot, "eot")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        if step_size is None and rel_stepsize is None:
            raise ValueError("give step_size or rel_stepsize")
        batch_size = None if batch_size is None else check_int(batch_size, "batch_size")
        self.norm = norm
        self.eps = float(eps)
        self.steps = int(steps)
        self.step_size = None if step_size is None else float(step_size)
        self.rel_stepsize = None if rel_stepsize is None else float(rel_stepsize)
        self.random_start = bool(random_start)
        self.momentum = float(momentum)
        self.loss = loss
        self.kappa = float(kappa)
        self.eot = int(eot)
        self.keep_best = bool(keep_best)
        self.record_history = bool(record_history)
        self.batch_size = None if batch_size is None else int(batch_size)
        chunk = None if chunk is None else check_int(chunk, "chunk")
        self.chunk = None if chunk is None else int(chunk)

    # -- geometry -------------------------------------------------------------------------
    def radius(self, x: torch.Tensor) -> float:
        """The ball radius in the attack's own geometry (Linf, or Euclidean L2) for images like x."""
        return ball.radius(self.norm, self.eps, x)

    def absolute_step(self, x: torch.Tensor) -> float:
        """The (initial) step length in the attack's own geometry for images like x."""
        if self.step_size is None:
            return self.rel_stepsize * self.radius(x)
        if self.norm == "l2":
            return self.step_size * math.sqrt(x[0].numel())
        return self.step_size

    def step_length(self, t: int, alpha: float) -> float:
        """Step length at step ``t`` (0-based) from the initial length ``alpha``: constant."""
        return alpha

    def normalize(self, direction: torch.Tensor) -> torch.Tensor:
        """Unit step direction: ``sign`` (Linf) or per-image L2-normalised (L2)."""
        if self.norm == "linf":
            return direction.sign()
        return direction / per_image_norm(direction, 2).clamp_min(1e-12)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, radius: float) -> torch.Tensor:
        """Project onto the ball of ``radius`` around ``x``, then onto the [0, 1] box."""
        return ball.project(self.norm, x_adv, x, radius)

    def random_perturbation(self, x: torch.Tensor, radius: float, key: DrawKey) -> torch.Tensor:
        """A uniform draw in the ball, image ``i`` from ``key.generator(i)`` (on the CPU, moved
        to x's device): Linf U[-r, r] per pixel; L2 a Gaussian direction with radius
        ``r * U^(1/d)`` (uniform in the Euclidean ball)."""
        d = x[0].numel()
        rows = []
        for g in key.generators():
            if self.norm == "linf":
                rows.append((2 * seeding.rand(x.shape[1:], g, dtype=x.dtype) - 1) * radius)
            else:
                direction = seeding.randn(x.shape[1:], g, dtype=x.dtype)
                direction = direction / direction.norm().clamp_min(1e-12)
                rows.append(direction * radius * float(seeding.rand((1,), g, dtype=torch.float64)) ** (1.0 / d))
        if not rows:
            return torch.zeros_like(x)
        return torch.stack(rows).to(x.device)

    def random_start_point(self, x: torch.Tensor, radius: float, key: DrawKey) -> torch.Tensor:
        """The start of a run: ``x`` itself, or a uniform draw in the ball with ``random_start``."""
        if not self.random_start:
            return x.clone()
        return self.project(x + self.random_perturbation(x, radius, key), x, radius)

    # -- the loop ---------------------------------------------------------------------------
    def pgd(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], key: DrawKey,
            *, loss: Optional[str] = None, tick=None) -> PGDRun:
        """One run of the shared loop from :meth:`random_start_point` (module docstring)."""
        loss = loss or self.loss
        n = x.shape[0]
        radius = self.radius(x)
        alpha = self.absolute_step(x)
        targeted = targets is not None
        goal = targets if targeted else labels
        x_adv = self.random_start_point(x, radius, key.child("start"))
        best = x_adv.clone()
        best_freq = torch.full((n,), -1.0, device=x.device)
        best_tie = torch.full((n,), float("inf"), device=x.device)
        zero = torch.zeros(n, dtype=torch.long)
        nonfinite = torch.zeros(n, dtype=torch.long)
        velocity = torch.zeros_like(x) if self.momentum else None
        history: List[Dict[str, Any]] = []
        for t in range(self.steps + 1):
            last = t == self.steps

            def per_draw(z: torch.Tensor) -> torch.Tensor:
                r = z.shape[0]
                return objective(loss, z.reshape(r * n, -1), labels.repeat(r),
                                 None if targets is None else targets.repeat(r), kappa=self.kappa).view(r, n)

            # the mean objective over the step's draws and its gradient, one chunk of draws at a time
            _, grad, zd = expectation_gradient(model, x_adv, key.child("step", t), self.eot, per_draw,
                                               chunk=self.chunk, need_grad=not last)
            with torch.no_grad():  # score the current iterate from the draws just computed
                pred = zd.argmax(2)  # (R, N)
                hit = pred == targets if targeted else pred != labels
                freq = hit.float().mean(0)
                goal_p = zd.softmax(2).mean(0).gather(1, goal[:, None]).squeeze(1)
                tie = (-goal_p if targeted else goal_p).float()
                better = (freq > best_freq) | ((freq == best_freq) & (tie < best_tie))
                best[better] = x_adv[better]
                best_freq = torch.where(better, freq, best_freq)
                best_tie = torch.where(better, tie, best_tie)
                if self.record_history and t >= 1:
                    history.append(round_record(t, zd[0].argmax(1), labels, targets))
            if last:
                break
            zero_now, bad = gradient_health(grad)
            nonfinite += bad.cpu().long()
            zero += zero_now.cpu().long()
            grad = torch.where(bad.view(-1, 1, 1, 1), torch.zeros_like(grad), grad)
            if velocity is not None:
                velocity = self.momentum * velocity + grad / per_image_norm(grad, 1).clamp_min(1e-12)
                grad = velocity
            with torch.no_grad():
                x_adv = self.project(x_adv + self.step_length(t, alpha) * self.normalize(grad), x, radius)
            if tick is not None:
                tick()
        return PGDRun(x_adv.detach(), best.detach(), best_freq, best_tie, history, zero, nonfinite)

    def steps_per_batch(self) -> int:
        return self.steps

    def run(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], key: DrawKey) -> AttackResult:
        """Shape: x (N, C, H, W) in [0, 1]; labels, targets (N,) int64 -> result.adversarial
        (N, C, H, W), result.success (N,) bool."""
        out = self.pgd(model, x, labels, targets, key, tick=self._advance)
        adversarial = out.final
        if self.keep_best:
            adversarial = torch.where((out.best_frequency > 0).view(-1, 1, 1, 1), out.best, out.final)
        with torch.no_grad():
            logits = forward(model, adversarial, key.child("judge"))
        success = is_successful(logits, labels, targets)
        info = {"attack": self.name, "hyperparameters": self.hyperparameters(), "radius": self.radius(x),
                "step": self.absolute_step(x), "gradient_stats": _gradient_stats(out)}
        return AttackResult(adversarial=adversarial.detach(), success=success.detach(), history=out.history, info=info)


def _gradient_stats(out: PGDRun) -> Dict[str, int]:
    steps_taken = int(out.zero_gradients.numel())
    return {"zero_gradients": int(out.zero_gradients.sum()), "nonfinite_gradients": int(out.nonfinite_gradients.sum()),
            "images": steps_taken}


class FGSM(GradientAttack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one step of length ``eps``.

    Linf: ``x + eps * sign(grad)``; L2 (fast gradient method): ``x + eps * grad/||grad||``;
    clipped to [0, 1]. Paper defaults (Section 6.5, Table 2): Linf, eps 0.01 or 0.03
    (default 0.03), no random start.
    """

    name = "fgsm"
    default_linf_eps = 0.03

    def __init__(self, *, norm: str = "linf", eps: Optional[float] = None, loss: str = "ce", kappa: float = 0.0,
                 eot: int = 1, record_history: bool = False, batch_size: Optional[int] = None) -> None:
        super().__init__(norm=norm, eps=eps, steps=1, rel_stepsize=1.0, random_start=False,
                         loss=loss, kappa=kappa, eot=eot, record_history=record_history, batch_size=batch_size)


class BIM(GradientAttack):
    """Iterative FGSM / Basic Iterative Method (Kurakin et al. 2017): FGSM steps, projected.

    Paper defaults (Section 6.5): Linf, eps 0.01 or 0.03 (default 0.03), 10 iterations, no
    random start. The paper does not state the step size; we take ``eps / steps``
    (``rel_stepsize = 1/steps``), the choice under which 10 steps can just reach the
    boundary, and the one consistent with the paper's Table 2, whose I-FGSM RMS distances
    (0.0040 at eps 0.01, 0.0098 at eps 0.03) are about a third of eps, far below what larger,
    clipped steps would give. Kurakin et al.'s own alpha = 1/255 is ``step_size=1/255``.
    """

    name = "bim"
    default_linf_eps = 0.03

    def __init__(self, *, norm: str = "linf", eps: Optional[float] = None,
                 steps: int = 10, step_size: Optional[float] = None, rel_stepsize: Optional[float] = None,
                 loss: str = "ce", kappa: float = 0.0, keep_best: bool = False, record_history: bool = False, eot: int = 1, batch_size: Optional[int] = None) -> None:
        if step_size is None and rel_stepsize is None:
            rel_stepsize = 1.0 / check_int(steps, "steps")
        super().__init__(norm=norm, eps=eps, steps=steps, step_size=step_size,
                         rel_stepsize=rel_stepsize, random_start=False, loss=loss, kappa=kappa,
                         keep_best=keep_best, record_history=record_history, eot=eot, batch_size=batch_size)


class PGD(GradientAttack):
    """Projected Gradient Descent with a random start (Madry et al. 2018).

    Defaults: Linf eps 8/255 (the paper's Linf bound; L2: ``eps`` 0.05 RMS, its L2 bound),
    50 steps (the paper's PGD-50; PGD-1000 is ``steps=1000``), step ``2.5 * eps / steps``
    (Madry et al.'s rule, so the iterate can cross the ball 2.5 times), random start.
    """

    name = "pgd"
    default_linf_eps = PAPER_LINF_BOUND

    def __init__(self, *, norm: str = "linf", eps: Optional[float] = None,
                 steps: int = 50, step_size: Optional[float] = None, rel_stepsize: Optional[float] = None,
                 random_start: bool = True, loss: str = "ce", kappa: float = 0.0, keep_best: bool = False,
                 record_history: bool = False, eot: int = 1, batch_size: Optional[int] = None) -> None:
        if step_size is None and rel_stepsize is None:
            rel_stepsize = 2.5 / check_int(steps, "steps")
        super().__init__(norm=norm, eps=eps, steps=steps, step_size=step_size,
                         rel_stepsize=rel_stepsize, random_start=random_start, loss=loss, kappa=kappa,
                         keep_best=keep_best, record_history=record_history, eot=eot, batch_size=batch_size)


class MIFGSM(GradientAttack):
    """Momentum Iterative FGSM (Dong et al. 2018): BIM with an L1-normalised momentum
    accumulator ``g <- mu * g + grad / ||grad||_1``, stepping along ``sign(g)`` (Linf) or
    ``g / ||g||_2`` (L2).

    Defaults as Dong et al.: ``momentum = 1.0``, 10 iterations, step ``eps / steps``, Linf
    eps 0.03 (the paper's I-FGSM budget), no random start.
    """

    name = "mi-fgsm"
    default_linf_eps = 0.03

    def __init__(self, *, norm: str = "linf", eps: Optional[float] = None,
                 steps: int = 10, step_size: Optional[float] = None, rel_stepsize: Optional[float] = None,
                 momentum: float = 1.0, loss: str = "ce", kappa: float = 0.0, keep_best: bool = False,
                 record_history: bool = False, eot: int = 1, batch_size: Optional[int] = None) -> None:
        if step_size is None and rel_stepsize is None:
            rel_stepsize = 1.0 / check_int(steps, "steps")
        super().__init__(norm=norm, eps=eps, steps=steps, step_size=step_size,
                         rel_stepsize=rel_stepsize, random_start=False, momentum=momentum, loss=loss,
                         kappa=kappa, keep_best=keep_best, record_history=record_history, eot=eot, batch_size=batch_size)


register("fgsm", help="FGSM: one signed (Linf) or normalised (L2) gradient step of size eps")(FGSM)
register("bim", help="I-FGSM / BIM: 10 projected FGSM steps of eps/10, no random start")(BIM)
register("i-fgsm", help="alias of bim")(BIM)
register("pgd", help="PGD: random start, 50 projected steps of 2.5*eps/steps (PGD-1000: --steps 1000)")(PGD)
register("mi-fgsm", help="MI-FGSM: BIM with momentum 1.0 on the L1-normalised gradient")(MIFGSM)

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

Budgets. ``eps`` is the ball radius in the attack's own norm: the Linf radius, or the
*Euclidean* L2 radius (the convention of foolbox and torchattacks). The paper's "l2" is the
*normalised* (root-mean-square) distance ``||d||_2 / sqrt(C*H*W)`` (PROTOCOL.md,
"Conventions"); pass it as ``rms_eps`` instead, and the Euclidean radius
``rms_eps * sqrt(C*H*W)`` is worked out from the images' shape at call time (0.05 at 3x224x224
is a Euclidean radius of about 19.4). With ``rms_eps`` an absolute ``step_size`` is read in the
same normalised unit. When neither is given the default is Linf ``eps`` of the attack class,
or ``rms_eps = 0.05`` (the paper's bound) for L2.

Targets. With ``targets`` the attack is targeted (success = classified as the target);
without, untargeted (success = no longer classified as the label).

Success is judged by one forward pass of the model on the images returned (a fresh draw for a
randomised model). With ``keep_best=True`` each image returns its successful iterate of highest
objective (judged on the forward pass the next gradient needs anyway), or the final iterate
if none succeeded. With ``record_history=True`` the result's ``history`` lists, for every step
``k``, the accuracy and attack success rate of the k-th iterate.

References:
    Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015 (FGSM).
    Kurakin et al., "Adversarial Examples in the Physical World", 2017 (I-FGSM / BIM).
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018 (PGD).
    Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018 (MI-FGSM).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .. import seeding
from ..metrics import PAPER_L2_BOUND, PAPER_LINF_BOUND
from ._registry import register
from .base import Attack, AttackResult
from .losses import LOSSES, is_successful, objective

__all__ = ["GradientAttack", "FGSM", "BIM", "PGD", "MIFGSM", "check_attack_inputs"]

NORMS = ("linf", "l2")
_NORM_ALIASES = {"inf": "linf", "l_inf": "linf", "linfinity": "linf", "2": "l2", "l_2": "l2"}


def check_attack_inputs(x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor]) -> None:
    """Raise a clear ``ValueError`` unless x is a float NCHW batch with matching labels/targets."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a float NCHW image batch in [0,1], got {shape}")
    n = x.shape[0]
    if labels is None or labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {None if labels is None else tuple(labels.shape)}")
    if targets is not None and targets.shape != (n,):
        raise ValueError(f"targets must have shape ({n},), got {tuple(targets.shape)}")


def _per_image_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    """Per-image Lp norm, shaped (N, 1, 1, 1) for broadcasting."""
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.dim() - 1)))


class GradientAttack(Attack):
    """Base of FGSM, BIM, PGD and MI-FGSM: ``steps`` normalised gradient steps, projected.

    Args (keyword only):
        norm: ``'linf'`` or ``'l2'``.
        eps: ball radius: Linf radius, or Euclidean L2 radius (see the module docstring).
        rms_eps: L2 only: the radius as a normalised (RMS) L2, the paper's unit; exclusive
            with ``eps``.
        steps: number of gradient steps.
        step_size: absolute step (Linf: per-pixel change; L2: Euclidean length, or RMS length
            when ``rms_eps`` is used). Overrides ``rel_stepsize``.
        rel_stepsize: step as a fraction of the radius (used when ``step_size`` is None).
        random_start: start from a uniform draw in the ball (Linf: U[-eps, eps] per pixel;
            L2: uniform in the Euclidean ball), drawn from the ``generator`` on the CPU.
        momentum: MI-FGSM decay factor ``mu`` (0 disables the momentum accumulator).
        loss: ``'ce'`` (cross-entropy) or ``'margin'`` (Carlini-Wagner), see :mod:`.losses`.
        kappa: confidence of the margin loss.
        keep_best: return each image's best successful iterate instead of the final one.
        record_history: record per-step accuracy and attack success rate.
    """

    HYPERPARAMETERS = ("norm", "eps", "rms_eps", "steps", "step_size", "rel_stepsize", "random_start",
                       "momentum", "loss", "kappa", "keep_best")

    name = "gradient"
    #: default Linf radius when ``eps`` is not given (subclasses override).
    default_linf_eps: float = PAPER_LINF_BOUND
    supports_targeted = True
    supports_untargeted = True
    norms = NORMS

    def __init__(
        self,
        *,
        norm: str = "linf",
        eps: Optional[float] = None,
        rms_eps: Optional[float] = None,
        steps: int = 10,
        step_size: Optional[float] = None,
        rel_stepsize: Optional[float] = None,
        random_start: bool = False,
        momentum: float = 0.0,
        loss: str = "ce",
        kappa: float = 0.0,
        keep_best: bool = False,
        record_history: bool = False,
    ) -> None:
        norm = _NORM_ALIASES.get(str(norm).lower(), str(norm).lower())
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
        if eps is not None and rms_eps is not None:
            raise ValueError("give either eps (Euclidean / Linf radius) or rms_eps (normalised L2), not both")
        if rms_eps is not None and norm != "l2":
            raise ValueError("rms_eps (normalised L2 radius) only applies to norm='l2'")
        if eps is None and rms_eps is None:
            if norm == "linf":
                eps = self.default_linf_eps
            else:
                rms_eps = PAPER_L2_BOUND
        radius = eps if eps is not None else rms_eps
        if not radius > 0:
            raise ValueError(f"the radius must be positive, got {radius}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        if step_size is None and rel_stepsize is None:
            raise ValueError("give step_size or rel_stepsize")
        self.norm = norm
        self.eps = None if eps is None else float(eps)
        self.rms_eps = None if rms_eps is None else float(rms_eps)
        self.steps = int(steps)
        self.step_size = None if step_size is None else float(step_size)
        self.rel_stepsize = None if rel_stepsize is None else float(rel_stepsize)
        self.random_start = bool(random_start)
        self.momentum = float(momentum)
        self.loss = loss
        self.kappa = float(kappa)
        self.keep_best = bool(keep_best)
        self.record_history = bool(record_history)

    # -- configuration -------------------------------------------------------------------
    @classmethod
    def with_rms_eps(cls, rms_eps: float, **kwargs: Any) -> "GradientAttack":
        """The attack in L2 with the paper's normalised radius (``norm='l2'``, ``rms_eps``)."""
        return cls(norm="l2", rms_eps=rms_eps, **kwargs)

    def radius(self, x: torch.Tensor) -> float:
        """The ball radius in the attack's own norm (Linf, or Euclidean L2) for images like x."""
        if self.eps is not None:
            return self.eps
        return self.rms_eps * math.sqrt(x[0].numel())

    def absolute_step(self, x: torch.Tensor) -> float:
        """The step length in the attack's own norm for images like x."""
        if self.step_size is None:
            return self.rel_stepsize * self.radius(x)
        if self.rms_eps is not None:
            return self.step_size * math.sqrt(x[0].numel())
        return self.step_size

    # -- the three pieces a norm defines ---------------------------------------------------
    def normalize(self, direction: torch.Tensor) -> torch.Tensor:
        """Unit step direction: ``sign`` (Linf) or per-image L2-normalised (L2)."""
        if self.norm == "linf":
            return direction.sign()
        return direction / _per_image_norm(direction, 2).clamp_min(1e-12)

    def project(self, delta: torch.Tensor, eps: float) -> torch.Tensor:
        """Project perturbations onto the ball of radius ``eps``."""
        if self.norm == "linf":
            return delta.clamp(-eps, eps)
        norms = _per_image_norm(delta, 2)
        factor = torch.where(norms > eps, eps / norms.clamp_min(1e-30), torch.ones_like(norms))
        return delta * factor

    def random_perturbation(self, x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
        """A uniform draw in the ball (drawn on the CPU generator, moved to x's device)."""
        if self.norm == "linf":
            u = seeding.rand(x.shape, generator, device=x.device, dtype=x.dtype)
            return (2 * u - 1) * eps
        # uniform in the Euclidean ball: Gaussian direction, radius eps * U^(1/d)
        d = x[0].numel()
        direction = seeding.randn(x.shape, generator, device=x.device, dtype=x.dtype)
        direction = direction / _per_image_norm(direction, 2).clamp_min(1e-12)
        r = seeding.rand((x.shape[0],), generator, device=x.device, dtype=x.dtype).pow(1.0 / d)
        return direction * (eps * r).view(-1, 1, 1, 1)

    # -- the attack ------------------------------------------------------------------------
    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        *,
        labels: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> AttackResult:
        """Attack ``model`` on the batch ``x``.

        Shape: x (N, C, H, W) in [0, 1]; labels, targets (N,) int64 -> result.adversarial
        (N, C, H, W), result.success (N,) bool.
        """
        check_attack_inputs(x, labels, targets)
        x = x.detach()
        labels = labels.to(x.device)
        targets = None if targets is None else targets.to(x.device)
        eps = self.radius(x)
        alpha = self.absolute_step(x)

        if self.random_start:
            gen = seeding.ensure_generator(generator)
            x_adv = (x + self.project(self.random_perturbation(x, eps, gen), eps)).clamp(0, 1)
        else:
            x_adv = x.clone()

        velocity = torch.zeros_like(x) if self.momentum else None
        history: List[Dict[str, Any]] = []
        best = x_adv.clone() if self.keep_best else None
        best_obj = torch.full((x.shape[0],), float("-inf"), device=x.device) if self.keep_best else None

        def note(step: int, logits: torch.Tensor, x_at: torch.Tensor, obj: torch.Tensor) -> None:
            """Book-keeping for iterate ``step`` from the forward pass made on it."""
            nonlocal best
            success = is_successful(logits, labels, targets)
            if self.record_history and step >= 1:
                history.append(_history_entry(step, logits, labels, targets))
            if self.keep_best and step >= 1:
                better = success & (obj > best_obj)
                best = torch.where(better.view(-1, 1, 1, 1), x_at, best)
                best_obj.copy_(torch.where(better, obj, best_obj))

        for step in range(self.steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                logits = model(x_adv)
                obj = objective(self.loss, logits, labels, targets, kappa=self.kappa)
                (grad,) = torch.autograd.grad(obj.sum(), x_adv)
            x_adv = x_adv.detach()
            note(step, logits.detach(), x_adv, obj.detach())
            if velocity is not None:
                velocity = self.momentum * velocity + grad / _per_image_norm(grad, 1).clamp_min(1e-12)
                direction = velocity
            else:
                direction = grad
            x_adv = x_adv + alpha * self.normalize(direction)
            x_adv = (x + self.project(x_adv - x, eps)).clamp(0, 1).detach()

        with torch.no_grad():
            logits = model(x_adv)
            obj = objective(self.loss, logits, labels, targets, kappa=self.kappa)
        note(self.steps, logits, x_adv, obj)

        if self.keep_best:
            never = torch.isinf(best_obj)
            adversarial = torch.where(never.view(-1, 1, 1, 1), x_adv, best)
            with torch.no_grad():
                logits = model(adversarial)
        else:
            adversarial = x_adv
        success = is_successful(logits, labels, targets)
        info = {"attack": self.name, "hyperparameters": self.hyperparameters(), "radius": eps, "step": alpha}
        return AttackResult(adversarial=adversarial.detach(), success=success.detach(), history=history, info=info)


def _history_entry(step: int, logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor]) -> Dict[str, Any]:
    pred = logits.argmax(dim=1)
    acc = float((pred == labels).float().mean())
    asr = float(is_successful(pred, labels, targets).float().mean())
    return {"round": int(step), "accuracy": acc, "asr": asr}


class FGSM(GradientAttack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one step of length ``eps``.

    Linf: ``x + eps * sign(grad)``; L2 (fast gradient method): ``x + eps * grad/||grad||``;
    clipped to [0, 1]. Paper defaults (Section 6.5, Table 2): Linf, eps 0.01 or 0.03
    (default 0.03), no random start.
    """

    name = "fgsm"
    default_linf_eps = 0.03

    def __init__(self, *, norm: str = "linf", eps: Optional[float] = None, rms_eps: Optional[float] = None,
                 loss: str = "ce", kappa: float = 0.0, record_history: bool = False) -> None:
        super().__init__(norm=norm, eps=eps, rms_eps=rms_eps, steps=1, rel_stepsize=1.0, random_start=False,
                         loss=loss, kappa=kappa, record_history=record_history)


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

    def __init__(self, *, norm: str = "linf", eps: Optional[float] = None, rms_eps: Optional[float] = None,
                 steps: int = 10, step_size: Optional[float] = None, rel_stepsize: Optional[float] = None,
                 loss: str = "ce", kappa: float = 0.0, keep_best: bool = False, record_history: bool = False) -> None:
        if step_size is None and rel_stepsize is None:
            rel_stepsize = 1.0 / int(steps)
        super().__init__(norm=norm, eps=eps, rms_eps=rms_eps, steps=steps, step_size=step_size,
                         rel_stepsize=rel_stepsize, random_start=False, loss=loss, kappa=kappa,
                         keep_best=keep_best, record_history=record_history)


class PGD(GradientAttack):
    """Projected Gradient Descent with a random start (Madry et al. 2018).

    Defaults: Linf eps 8/255 (the paper's Linf bound; L2: ``rms_eps`` 0.05, its L2 bound),
    50 steps (the paper's PGD-50; PGD-1000 is ``steps=1000``), step ``2.5 * eps / steps``
    (Madry et al.'s rule, so the iterate can cross the ball 2.5 times), random start.
    """

    name = "pgd"
    default_linf_eps = PAPER_LINF_BOUND

    def __init__(self, *, norm: str = "linf", eps: Optional[float] = None, rms_eps: Optional[float] = None,
                 steps: int = 50, step_size: Optional[float] = None, rel_stepsize: Optional[float] = None,
                 random_start: bool = True, loss: str = "ce", kappa: float = 0.0, keep_best: bool = False,
                 record_history: bool = False) -> None:
        if step_size is None and rel_stepsize is None:
            rel_stepsize = 2.5 / int(steps)
        super().__init__(norm=norm, eps=eps, rms_eps=rms_eps, steps=steps, step_size=step_size,
                         rel_stepsize=rel_stepsize, random_start=random_start, loss=loss, kappa=kappa,
                         keep_best=keep_best, record_history=record_history)


class MIFGSM(GradientAttack):
    """Momentum Iterative FGSM (Dong et al. 2018): BIM with an L1-normalised momentum
    accumulator ``g <- mu * g + grad / ||grad||_1``, stepping along ``sign(g)`` (Linf) or
    ``g / ||g||_2`` (L2).

    Defaults as Dong et al.: ``momentum = 1.0``, 10 iterations, step ``eps / steps``, Linf
    eps 0.03 (the paper's I-FGSM budget), no random start.
    """

    name = "mi-fgsm"
    default_linf_eps = 0.03

    def __init__(self, *, norm: str = "linf", eps: Optional[float] = None, rms_eps: Optional[float] = None,
                 steps: int = 10, step_size: Optional[float] = None, rel_stepsize: Optional[float] = None,
                 momentum: float = 1.0, loss: str = "ce", kappa: float = 0.0, keep_best: bool = False,
                 record_history: bool = False) -> None:
        if step_size is None and rel_stepsize is None:
            rel_stepsize = 1.0 / int(steps)
        super().__init__(norm=norm, eps=eps, rms_eps=rms_eps, steps=steps, step_size=step_size,
                         rel_stepsize=rel_stepsize, random_start=False, momentum=momentum, loss=loss,
                         kappa=kappa, keep_best=keep_best, record_history=record_history)


register("fgsm", help="FGSM: one signed (Linf) or normalised (L2) gradient step of size eps")(FGSM)
register("bim", help="I-FGSM / BIM: 10 projected FGSM steps of eps/10, no random start")(BIM)
register("i-fgsm", help="alias of bim")(BIM)
register("pgd", help="PGD: random start, 50 projected steps of 2.5*eps/steps (PGD-1000: --steps 1000)")(PGD)
register("mi-fgsm", help="MI-FGSM: BIM with momentum 1.0 on the L1-normalised gradient")(MIFGSM)

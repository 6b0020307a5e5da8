"""Transfer: adversarial examples made on the bare classifier, judged on the defended model.

Carlini et al. 2019 ("On Evaluating Adversarial Robustness", Section 5's checklist: "try a
transfer attack"; Papernot et al. 2016; Athalye et al. 2018, Section 5): PGD (Madry et al.
2018, :class:`~.gradient.PGD`) runs on the classifier *inside* the defended model, with no
defense in front of it, so it never differentiates, approximates or even calls the defense;
the images it returns are then classified by the defended model. A defense that stops
white-box attacks but not these is masking gradients rather than removing adversarial
examples.

The source is found by unwrapping the model given: ``EOT(...)`` -> its model, ``Defended``
(with or without BPDA) -> its ``model`` (the classifier). A model that is not ``Defended``
is its own source (then this is plain PGD).

``success`` is judged on the defended model as given, by one forward pass (a fresh draw of
a random defense, the key's sub-stream ``"judge"``); ``info["source_success"]`` says which
images fooled the bare classifier.

Budgets: ``eps`` is the Linf radius or the normalised (RMS) L2 radius, as everywhere;
defaults are PGD's (50 steps of ``2.5 * eps / steps``, random start, cross-entropy).

Shape: x (N, C, H, W) in [0, 1]; labels, targets (N,) int64.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..defenses.defended import Defended, undefended_at
from ..draws import DrawKey
from ..validation import check_int
from ._registry import register
from .base import Attack, AttackResult, forward
from .eot import EOT
from .gradient import PGD
from .losses import is_successful

__all__ = ["Transfer", "source_classifier", "inner_classifier"]


def _without_eot(model: nn.Module) -> nn.Module:
    while isinstance(model, EOT):
        model = model.model
    return model


def inner_classifier(model: nn.Module) -> nn.Module:
    """The bare classifier inside ``model`` (through ``EOT`` and ``Defended``), or ``model``:
    the module every classification runs through (what a pass counter hooks)."""
    model = _without_eot(model)
    return model.model if isinstance(model, Defended) else model


def source_classifier(model: nn.Module) -> nn.Module:
    """The undefended model the transfer attack differentiates: :func:`inner_classifier`, behind
    the same resize when the defense runs at another side (``Defended(..., defend_at=S)``), so
    that it takes the attacked images as the defended model does."""
    model = _without_eot(model)
    return undefended_at(inner_classifier(model), model.defend_at if isinstance(model, Defended) else None)


class Transfer(Attack):
    """PGD on the bare classifier, judged on the defended model (module docstring).

    Args (keyword only; PGD's defaults):
        norm: ``'linf'`` or ``'l2'``.
        eps: radius: Linf, or normalised (RMS) L2 (default: 8/255, or 0.05 for L2).
        steps: PGD steps on the source (50).
        step_size: absolute step (overrides ``rel_stepsize``).
        rel_stepsize: step as a fraction of the radius (default ``2.5 / steps``).
        random_start: start from a uniform draw in the ball (True).
        loss: ``'ce'``, ``'margin'`` or ``'dlr'``.
        batch_size: images attacked together (None: all).
        progress: optional ``progress(done, total)``.
    """

    HYPERPARAMETERS = ("norm", "eps", "steps", "step_size", "rel_stepsize", "random_start", "loss")
    name = "transfer"
    #: Never differentiates the defense: any defense is fine.
    composes_bpda = True

    def __init__(
        self,
        *,
        norm: str = "linf",
        eps: Optional[float] = None,
        steps: int = 50,
        step_size: Optional[float] = None,
        rel_stepsize: Optional[float] = None,
        random_start: bool = True,
        loss: str = "ce",
        batch_size: Optional[int] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        self.source_attack = PGD(norm=norm, eps=eps, steps=steps, step_size=step_size, rel_stepsize=rel_stepsize,
                                 random_start=random_start, loss=loss)
        self.norm, self.eps, self.steps = self.source_attack.norm, self.source_attack.eps, self.source_attack.steps
        self.step_size, self.rel_stepsize = self.source_attack.step_size, self.source_attack.rel_stepsize
        self.random_start, self.loss = self.source_attack.random_start, loss
        self.batch_size = None if batch_size is None else check_int(batch_size, "batch_size")
        self.progress = progress

    def steps_per_batch(self) -> int:
        return self.steps

    def run(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], key: DrawKey) -> AttackResult:
        """Shape: x (N, C, H, W) in [0, 1]; labels, targets (N,) int64 -> result.adversarial
        (N, C, H, W), result.success (N,) bool (judged on ``model``)."""
        source = source_classifier(model)
        out = self.source_attack.run(source, x, labels, targets, key.child("source"))
        with torch.no_grad():
            success = is_successful(forward(model, out.adversarial, key.child("judge")), labels, targets)
        info = {
            "attack": self.name,
            "hyperparameters": self.hyperparameters(),
            "source": type(source).__name__,
            "source_success": out.success.tolist(),
            "radius": out.info["radius"],
            "gradient_stats": out.info["gradient_stats"],
        }
        return AttackResult(adversarial=out.adversarial, success=success.detach(), info=info)


register("transfer", help="transfer: PGD on the bare classifier inside the defended model, judged on the defended model")(Transfer)

"""What every attack takes and returns (STYLE.md, foolbox 3 / torchattacks shape).

An attack is a callable object whose hyperparameters are keyword-only constructor
arguments with the paper's defaults, and whose call is::

    result = attack(model, x, labels=y, targets=t_or_None, generator=g)

``model`` is any module mapping [0,1] NCHW to logits (a bare classifier, a ``Defended``
model, ``BPDA``/``EOT`` wrappers around one); the model is an argument, never state.
Losses are per sample (``reduction='none'``) and summed, so batch size never changes a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["Attack", "AttackResult"]


@dataclass
class AttackResult:
    """Outcome of an attack on a batch.

    Attributes:
        adversarial: the adversarial images, (N, C, H, W) in [0, 1].
        success: per-image success as judged by the attack (targeted: predicted as the
            target; untargeted: not predicted as the true label), (N,) bool.
        history: per-round records when the attack is iterative and asked to keep them,
            e.g. ``[{"round": 1, "accuracy": 0.9, "asr": 0.05, ...}, ...]``.
        info: anything else worth reporting (per-image rounds, distances, diagnostics).
    """

    adversarial: torch.Tensor
    success: torch.Tensor
    history: List[Dict[str, Any]] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)


class Attack:
    """Base of the attack classes: each names its hyperparameters in ``HYPERPARAMETERS`` (the
    attributes its constructor sets), which :meth:`hyperparameters` records beside results and
    ``repr`` shows."""

    HYPERPARAMETERS: Tuple[str, ...] = ()

    def hyperparameters(self) -> Dict[str, Any]:
        """Every setting, as recorded beside results."""
        return {k: getattr(self, k) for k in self.HYPERPARAMETERS}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

"""Per-sample attack losses (``reduction='none'``), so batch size never changes a step.

Every attack in the package ascends an *objective*: a per-image score, shape ``(N,)``, that
grows as the image moves toward the attacker's goal. Attacks sum it over the batch before
calling ``backward``; because each image's score depends on that image only, the gradient an
image receives is the same whether it is attacked alone or in a batch (STYLE.md).

Three families (PROTOCOL.md, "Attacks": cross-entropy and margin losses; APGD's DLR):

* cross-entropy: targeted ascends ``-CE(z, t)`` (moves toward the target ``t``);
  untargeted ascends ``CE(z, y)`` (moves away from the true label ``y``).
* margin, the loss of Carlini & Wagner (2017), Eq. 6 with ``kappa`` (their "confidence"):
  targeted minimises ``max(max_{j != t} z_j - z_t, -kappa)``; untargeted minimises
  ``max(z_y - max_{j != y} z_j, -kappa)``. The objective to ascend is its negative.
* DLR, the Difference of Logits Ratio of Croce & Hein (2020), Section 4 (Eq. 6, and its
  targeted form for APGD-T): untargeted minimises
  ``(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)``; targeted minimises
  ``(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, with ``z_pi1 >= z_pi2 >= ...`` the sorted
  logits (1e-12 is added to the denominator). It is invariant to shifting and rescaling the
  logits, so a saturated softmax does not flatten it. It needs at least 3 classes (4 targeted).

Shape: logits (N, K); labels, targets (N,) int64 -> (N,).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "cross_entropy_loss",
    "margin_loss",
    "dlr_loss",
    "objective",
    "is_successful",
    "LOSSES",
]

#: Names accepted by :func:`objective` (and by the ``loss=`` argument of the attacks).
LOSSES = ("ce", "margin", "dlr")


def _goal(labels: torch.Tensor, targets: Optional[torch.Tensor]) -> torch.Tensor:
    return targets if targets is not None else labels


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample cross-entropy the attacker *minimises*.

    Targeted (``targets`` given): ``CE(z, t)``; untargeted: ``-CE(z, y)``.

    Shape: (N, K), (N,), (N,) or None -> (N,).
    """
    if targets is not None:
        return F.cross_entropy(logits, targets, reduction="none")
    return -F.cross_entropy(logits, labels, reduction="none")


def _best_other(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``max_{j != cls} z_j`` per row (the class itself masked to -inf)."""
    masked = logits.masked_fill(F.one_hot(cls, logits.shape[1]).bool(), float("-inf"))
    return masked.amax(dim=1)


def margin_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    targets: Optional[torch.Tensor] = None,
    *,
    kappa: float = 0.0,
) -> torch.Tensor:
    """Carlini-Wagner margin loss the attacker *minimises* (C&W 2017, Eq. 6 / "f_6").

    Targeted: ``max(max_{j != t} z_j - z_t, -kappa)``; untargeted:
    ``max(z_y - max_{j != y} z_j, -kappa)``. It is <= 0 exactly when the image is classified
    as the target (targeted) or as anything but the label (untargeted), and bottoms out at
    ``-kappa`` once the goal is met with margin ``kappa``.

    Shape: (N, K), (N,), (N,) or None -> (N,).
    """
    if targets is not None:
        z_t = logits.gather(1, targets[:, None]).squeeze(1)
        diff = _best_other(logits, targets) - z_t
    else:
        z_y = logits.gather(1, labels[:, None]).squeeze(1)
        diff = z_y - _best_other(logits, labels)
    return diff.clamp_min(-float(kappa))


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Difference-of-logits-ratio loss the attacker *minimises* (Croce & Hein 2020, Section 4).

    Untargeted: ``(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)``; targeted:
    ``(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` (``z_pi`` the logits sorted in
    decreasing order). Negative exactly when the image is misclassified (untargeted).

    Shape: (N, K), (N,), (N,) or None -> (N,). K >= 3 (K >= 4 targeted), else ValueError.
    """
    k = logits.shape[1]
    need = 4 if targets is not None else 3
    if k < need:
        raise ValueError(f"the DLR loss needs at least {need} classes, the model has {k}; use loss='ce' or 'margin'")
    top = logits.topk(need, dim=1).values
    z_y = logits.gather(1, labels[:, None]).squeeze(1)
    if targets is not None:
        z_t = logits.gather(1, targets[:, None]).squeeze(1)
        return (z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)
    return (z_y - _best_other(logits, labels)) / (top[:, 0] - top[:, 2] + 1e-12)


def objective(
    name: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    targets: Optional[torch.Tensor] = None,
    *,
    kappa: float = 0.0,
) -> torch.Tensor:
    """The per-sample objective an attack *ascends*: minus the loss ``name`` ('ce', 'margin' or 'dlr').

    Attacks differentiate ``objective(...).sum()`` (``torch.autograd.grad``, so the model's
    parameters get no ``.grad``); no mean over the batch, so a step
    never depends on how many images share the batch.

    Shape: (N, K), (N,), (N,) or None -> (N,).
    """
    if name == "ce":
        return -cross_entropy_loss(logits, labels, targets)
    if name == "margin":
        return -margin_loss(logits, labels, targets, kappa=kappa)
    if name == "dlr":
        return -dlr_loss(logits, labels, targets)
    raise ValueError(f"unknown attack loss {name!r}; known: {', '.join(LOSSES)}")


def is_successful(logits_or_pred: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-image success: predicted as the target (targeted) or not as the label (untargeted).

    Shape: (N, K) logits or (N,) predictions -> (N,) bool.
    """
    pred = logits_or_pred.argmax(dim=1) if logits_or_pred.dim() == 2 else logits_or_pred
    if targets is not None:
        return pred == targets
    return pred != labels

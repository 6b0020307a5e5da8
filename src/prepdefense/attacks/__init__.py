"""Attacks: standard (FGSM, I-FGSM/BIM, PGD, MI-FGSM, C&W L2, L-BFGS, DeepFool), the
paper's protocol attacks (BPDA, BPDA+EOT, learned BPDA), a strong adaptive attack, and the
ensemble's attacks: APGD-CE/DLR, Square and SPSA (gradient-free) and transfer.

``create(name, **hyperparameters)`` builds one by name; ``names()`` lists them.
Model-side composition: ``BPDA(defense, approx=...)`` and ``EOT(model, n)``.
"""

from __future__ import annotations

from typing import Any, List

# Each module registers its attacks on import (one line beside each class).
from . import adaptive, apgd, carlini_wagner, deepfool, gradient, lbfgs, protocol, spsa, square, transfer  # noqa: F401
from ._registry import REGISTRY, register
from .base import AttackResult


def names() -> List[str]:
    return REGISTRY.names()


def create(name: str, **params: Any):
    return REGISTRY.create(name.strip().lower(), **params)


__all__ = ["AttackResult", "create", "names", "register", "REGISTRY"]

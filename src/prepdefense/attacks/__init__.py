"""Attacks: standard (FGSM, I-FGSM/BIM, PGD, MI-FGSM, C&W L2, L-BFGS, DeepFool), the
paper's protocol attacks (BPDA, BPDA+EOT, learned BPDA) and a strong adaptive attack.

``create(name, **hyperparameters)`` builds one by name; ``names()`` lists them.
Model-side composition: ``BPDA(defense, approx=...)`` and ``EOT(model, n)``.
"""

from __future__ import annotations

import importlib
from typing import Any, List

from ..registry import Registry
from .base import AttackResult

REGISTRY = Registry("attack")
register = REGISTRY.register

_MODULES = (
    "gradient",
    "carlini_wagner",
    "lbfgs",
    "deepfool",
    "protocol",
    "adaptive",
)
_loaded = False


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise


def names() -> List[str]:
    _load()
    return REGISTRY.names()


def create(name: str, **params: Any):
    _load()
    return REGISTRY.create(name.strip().lower(), **params)


__all__ = ["AttackResult", "create", "names", "register", "REGISTRY"]

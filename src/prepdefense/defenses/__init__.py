"""Preprocessing defenses: the paper's ``dct-distort`` and every baseline (Sections 5, 6).

``create(name, **params)`` builds one by name; a name may chain defenses with ``+``
(``fd+rand``, ``dct-quant+rand``, ``fd+grid-distort``), applied left to right.
``names()`` lists the registered ones. ``Defended(defense, model)`` is the deployed model.
"""

from __future__ import annotations

from typing import Any, List

# Each module registers its defenses on import (one line beside each class).
from . import (  # noqa: F401
    bit_depth,
    dct_distort,
    dct_quant,
    grid_distort,
    identity,
    jpeg,
    pixel_deflection,
    random_crop,
    random_resize_pad,
    shield,
    total_variation,
)
from ._registry import REGISTRY, register
from .base import Defense, check_images
from .compose import Compose
from .defended import Defended


def names() -> List[str]:
    """Registered single defense names (compose any of them with ``+``)."""
    return REGISTRY.names()


def create(name: str, **params: Any) -> Defense:
    """Build a defense by name. ``params`` go to a single defense; a ``+`` chain takes
    each part's defaults (build parts yourself and use :class:`Compose` to tune them)."""
    name = name.strip().lower()
    if name in ("none", ""):
        return REGISTRY.create("none")
    if "+" in name:
        parts = [p.strip() for p in name.split("+")]
        if params:
            raise ValueError(f"parameters cannot be given for the chain {name!r}; build its parts and use Compose")
        return Compose([REGISTRY.create(p) for p in parts], names=parts)
    return REGISTRY.create(name, **params)


__all__ = ["Defense", "Defended", "Compose", "create", "names", "register", "check_images", "REGISTRY"]

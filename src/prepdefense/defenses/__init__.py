"""Preprocessing defenses: the paper's ``dct-distort`` and every baseline (Sections 5, 6).

``create(name, **params)`` builds one by name; a name may chain defenses with ``+``
(``fd+rand``, ``dct-quant+rand``, ``fd+grid-distort``), applied left to right.
``names()`` lists the registered ones. ``Defended(defense, model)`` is the deployed model.
"""

from __future__ import annotations

import importlib
from typing import Any, List

from ..registry import Registry
from .base import Defense, check_images
from .compose import Compose
from .defended import Defended

REGISTRY = Registry("defense")
register = REGISTRY.register

# Modules that register defenses on import; each is one concern.
_MODULES = (
    "identity",
    "dct_quant",
    "grid_distort",
    "dct_distort",
    "jpeg",
    "shield",
    "bit_depth",
    "random_resize_pad",
    "total_variation",
    "pixel_deflection",
    "random_crop",
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
        except ModuleNotFoundError as e:  # a module not written yet must not break the others
            if e.name != f"{__name__}.{mod}":
                raise


def names() -> List[str]:
    """Registered single defense names (compose any of them with ``+``)."""
    _load()
    return REGISTRY.names()


def create(name: str, **params: Any) -> Defense:
    """Build a defense by name. ``params`` go to a single defense; a ``+`` chain takes
    each part's defaults (build parts yourself and use :class:`Compose` to tune them)."""
    _load()
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

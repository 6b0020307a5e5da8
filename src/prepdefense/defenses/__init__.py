"""Preprocessing defenses: the paper's ``dct-distort`` and every baseline (Sections 5, 6).

``create(name, **params)`` builds one by name; a name may chain defenses with ``+``
(``fd+rand``, ``dct-quant+rand``, ``fd+grid-distort``), applied left to right.
``names()`` lists the registered ones. ``Defended(defense, model)`` is the deployed model.

A name (or a chain part) may also be a user's defense: ``package.module:Class`` or a name
published in the ``prepdefense.defenses`` entry-point group (:mod:`.user`), so
``fd+my_pkg.blur:Blur`` mixes a built-in and a user defense. Built-in names are case-blind;
``package.module:Class`` keeps its case (:func:`normalize_name`).
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
from .user import ENTRY_POINT_GROUP, UserDefenseError, create_user_defense, entry_point_names


def names() -> List[str]:
    """Registered single defense names (compose any of them with ``+``)."""
    return REGISTRY.names()


def normalize_name(name: str) -> str:
    """A defense name or chain as :func:`create` reads it: parts stripped, built-in and
    entry-point names in lower case, ``package.module:Class`` parts as written."""
    return "+".join(p.strip() if ":" in p else p.strip().lower() for p in str(name).split("+"))


def _create_one(name: str, **params: Any) -> Defense:
    if ":" not in name and name in REGISTRY:
        return REGISTRY.create(name, **params)
    try:
        defense = create_user_defense(name)
    except KeyError:
        REGISTRY.entry(name)  # raises the KeyError listing the known names
        raise
    if params:
        raise ValueError(f"parameters cannot be given for the user defense {name!r}; build it yourself")
    return defense


def create(name: str, **params: Any) -> Defense:
    """Build a defense by name. ``params`` go to a single built-in defense; a ``+`` chain
    takes each part's defaults (build parts yourself and use :class:`Compose` to tune them).

    Raises:
        KeyError: an unknown name (the message lists the known ones).
        ValueError: a user's defense that cannot be loaded (:class:`UserDefenseError`), or
            parameters for a chain.
    """
    name = normalize_name(name)
    if name in ("none", ""):
        return REGISTRY.create("none")
    if "+" in name:
        parts = name.split("+")
        if params:
            raise ValueError(f"parameters cannot be given for the chain {name!r}; build its parts and use Compose")
        return Compose([_create_one(p) for p in parts], names=parts)
    return _create_one(name, **params)


__all__ = ["Defense", "Defended", "Compose", "create", "names", "normalize_name", "entry_point_names", "register",
           "check_images", "REGISTRY", "ENTRY_POINT_GROUP", "UserDefenseError"]

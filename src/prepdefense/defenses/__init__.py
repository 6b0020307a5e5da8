"""Preprocessing defenses: the paper's ``dct-distort`` and every baseline (Sections 5, 6).

``create(name, **params)`` builds one by name; a name may chain defenses with ``+``
(``fd+rand``, ``dct-quant+rand``, ``fd+grid-distort``), applied left to right.
``names()`` lists the registered ones. ``Defended(defense, model)`` is the deployed model.

A name (or a chain part) may also be a user's defense: ``package.module:Class`` or a name
published in the ``prepdefense.defenses`` entry-point group (:mod:`.user`), so
``fd+my_pkg.blur:Blur`` mixes a built-in and a user defense. Built-in names are case-blind;
``package.module:Class`` keeps its case (:func:`normalize_name`).

Parameters that make a different defense go into the name in brackets (:mod:`.spec`):
``create("dct-distort[table=fd]")`` is ``create("dct-distort", table="fd")``, and the name,
written canonically, is the defense's id in stores, cards and reports.
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
from .spec import format_part, parse_part, split_chain
from .state import state_digest
from .user import ENTRY_POINT_GROUP, UserDefenseError, create_user_defense, entry_point_names


def names() -> List[str]:
    """Registered single defense names (compose any of them with ``+``)."""
    return REGISTRY.names()


def normalize_name(name: str) -> str:
    """A defense name or chain as :func:`create` reads it: parts stripped, built-in and
    entry-point names in lower case, ``package.module:Class`` parts as written, bracketed
    parameters in canonical form (``Dct-Distort[ delta=0.10,table=FD]`` ->
    ``dct-distort[delta=0.1,table=fd]``: the defense's ``canonical_params`` spells values
    one way; a built-in's parameter equal to its default is dropped:
    ``dct-distort[delta=0.15]`` -> ``dct-distort``).

    Raises:
        ValueError: unbalanced brackets or a malformed ``[key=value,...]``.
    """
    out = []
    for part in split_chain(str(name)):
        base, params = parse_part(part)
        base = base if ":" in base else base.lower()
        if base in REGISTRY:
            params = _canonical_params(base, getattr(REGISTRY.get(base), "canonical_params", dict)(params))
        out.append(format_part(base, params))
    return "+".join(out)


def _canonical_params(name: str, params: dict) -> dict:
    """A built-in defense's parameters without those equal to its defaults, an integer given
    for a float default as a float (``rand[pad_value=0]`` is ``rand[pad_value=0.0]``) and a
    whole float given for an integer default as an integer (``bdr[bits=2.0]`` is ``bdr[bits=2]``)."""
    defaults = {p.name: p.default for p in REGISTRY.parameters(name).values()}
    out = {}
    for key, value in params.items():
        default = defaults.get(key, _NO_DEFAULT)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) and value.is_integer():
            value = int(value)
        if default is not _NO_DEFAULT and type(value) is type(default) and value == default:
            continue
        out[key] = value
    return out


_NO_DEFAULT = object()


def _create_one(part: str, **params: Any) -> Defense:
    name, given = parse_part(part)
    both = sorted(set(given) & set(params))
    if both:
        raise ValueError(f"parameter {both[0]!r} is given both in the name {part!r} and as a keyword")
    params = {**given, **params}
    if ":" not in name and name in REGISTRY:
        accepted = REGISTRY.parameters(name)
        unknown = sorted(set(params) - set(accepted) - set(REGISTRY.entry(name).fixed))
        if unknown:
            if not accepted:
                raise ValueError(f"defense {name!r} takes no parameters (got {unknown[0]!r})")
            raise ValueError(f"defense {name!r} takes no parameter {unknown[0]!r}; it takes: " + ", ".join(accepted))
        for key, value in params.items():
            default = accepted[key].default if key in accepted else None
            if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                    isinstance(value, (str, bool)) or value is None):
                raise ValueError(f"parameter {key!r} of defense {name!r} must be a number (default {default!r}), got {value!r}")
            if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"parameter {key!r} of defense {name!r} must be a whole number (default {default!r}), got {value!r}")
        return REGISTRY.create(name, **params)
    try:
        return create_user_defense(name, **params)
    except KeyError:
        REGISTRY.entry(name)  # raises the KeyError listing the known names
        raise


def create(name: str, **params: Any) -> Defense:
    """Build a defense by name. ``params`` go to a single defense; a ``+`` chain takes each
    part's parameters from its brackets (``fd+rand[pad_value=0.25]``), or build the parts
    yourself and use :class:`Compose`.

    Raises:
        TypeError: ``name`` not a string (``None`` is not "no defense": that is ``'none'``).
        KeyError: an unknown name (the message lists the known ones).
        ValueError: an empty name, a whole-number parameter given a fraction, a user's defense that cannot be loaded (:class:`UserDefenseError`),
            keyword parameters for a chain, a parameter the defense does not take, or a
            malformed ``name[key=value,...]``.
    """
    if not isinstance(name, str):
        raise TypeError(f"a defense name must be a string such as 'dct-distort' or 'none' (no defense), got {type(name).__name__}")
    name = normalize_name(name)
    if name == "":
        raise ValueError("the defense name is empty: name one (defenses.names() lists them), or 'none' for no defense")
    if name == "none":
        return REGISTRY.create("none")
    parts = split_chain(name)
    if len(parts) > 1:
        if params:
            raise ValueError(f"parameters cannot be given for the chain {name!r}; build its parts and use Compose")
        return Compose([_create_one(p) for p in parts], names=parts)
    return _create_one(name, **params)


__all__ = ["Defense", "Defended", "Compose", "create", "names", "normalize_name", "entry_point_names", "register",
           "check_images", "REGISTRY", "ENTRY_POINT_GROUP", "UserDefenseError", "split_chain", "parse_part", "state_digest"]

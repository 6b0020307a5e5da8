"""A user's own defense by name: ``package.module:Class`` or a ``prepdefense.defenses``
entry point (issue 12, item 2).

``package.module:Class`` imports ``package.module`` and calls ``Class()`` (a class or any
callable; ``package.module:Class[k=v]`` calls ``Class(k=v)``; a module-level ``nn.Module`` instance is used as it is). The result
must be an ``nn.Module``: a :class:`~prepdefense.defenses.base.Defense` is used directly, any
other module is wrapped in :class:`~prepdefense.defenses.base.ModuleDefense` (called as
``module(x)``, or ``module(x, generator=g)`` when it declares ``randomized = True``).

A package can also publish defenses under a name in the ``prepdefense.defenses`` entry-point
group (``pyproject.toml``: ``[project.entry-points."prepdefense.defenses"] my-blur =
"my_pkg.blur:Blur"``); that name then works wherever a built-in name does. Built-in names
win over entry points of the same name.

``prepdefense check-defense NAME`` holds any of them to the defense contract
(:mod:`prepdefense.defenses.contract`).
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Dict, List

from torch import nn

from .. import user_code
from .base import Defense, as_defense

__all__ = ["ENTRY_POINT_GROUP", "is_user_spec", "entry_point_names", "create_user_defense", "UserDefenseError"]

ENTRY_POINT_GROUP = "prepdefense.defenses"


class UserDefenseError(ValueError):
    """A user's defense cannot be found or built (one line saying why)."""


def is_user_spec(name: str) -> bool:
    """Whether a chain part names a user's defense by ``package.module:Class``."""
    return ":" in name


def _entry_points() -> Dict[str, importlib.metadata.EntryPoint]:
    return {ep.name.strip().lower(): ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def entry_point_names() -> List[str]:
    """Names published in the ``prepdefense.defenses`` entry-point group, sorted."""
    return sorted(_entry_points())


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _build(obj: Any, what: str, params: Dict[str, Any]) -> Defense:
    if isinstance(obj, nn.Module) and params:
        raise UserDefenseError(f"{what} is a module instance; it takes no parameters")
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise UserDefenseError(f"{what} is a {type(obj).__name__}, not a defense class")
        try:
            obj = obj(**params)
        except TypeError as e:
            args = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise UserDefenseError(f"{what}({args}) cannot be called ({_first_line(e)})") from None
    if not isinstance(obj, nn.Module):
        raise UserDefenseError(f"{what}() returned a {type(obj).__name__}, not an nn.Module")
    return as_defense(obj)


def _resolve(spec: str) -> Any:
    head, _, tail = spec.partition(":")
    head, tail = head.strip(), tail.strip()
    if not head or not tail or not all(p.isidentifier() for p in head.split(".") + tail.split(".")):
        raise UserDefenseError(f"bad defense spec {spec!r}: use package.module:Class")
    try:
        return user_code.resolve(spec)
    except ImportError as e:
        raise UserDefenseError(f"cannot import {head!r} for defense {spec} ({_first_line(e)}); "
                               "is it installed, on PYTHONPATH or in the working folder?") from None
    except AttributeError:
        raise UserDefenseError(f"module {head!r} has no {tail!r} (defense {spec})") from None


def create_user_defense(name: str, **params: Any) -> Defense:
    """Build the user's defense ``name`` (``package.module:Class`` or an entry-point name),
    calling it with ``params`` (keywords; none by default).

    Raises:
        KeyError: ``name`` is neither a spec nor a published entry point.
        UserDefenseError: the module, class or entry point cannot be loaded or built.
    """
    if is_user_spec(name):
        return _build(_resolve(name), name, params)
    ep = _entry_points().get(name.strip().lower())
    if ep is None:
        raise KeyError(name)
    try:
        obj = ep.load()
    except Exception as e:  # a third party's import: any failure means "cannot load"
        raise UserDefenseError(f"entry point {ep.name} = {ep.value} cannot be loaded "
                               f"({type(e).__name__}: {_first_line(e)})") from None
    return _build(obj, f"{ep.name} ({ep.value})", params)

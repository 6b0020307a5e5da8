"""A small name -> constructor registry shared by models, defenses and attacks (timm-style).

Defenses and attacks register their classes directly, one line each beside the class::

    register("pgd")(PGD)
    register("i-fgsm", help="alias of bim")(BIM)
    register("bpda-eot")(functools.partial(ProtocolBPDA, eot=30))   # other defaults
    register("fd", fixed={"table": "fd"})(DCTQuantize)             # an argument pinned

A ``functools.partial`` of a class changes defaults (still overridable); ``fixed`` pins
arguments that make the name what it is (passing them to :meth:`Registry.create` is an
error). The short description is ``help`` or the first line of the class docstring.
:meth:`Registry.parameters` lists what an entry takes, with defaults and annotations, so a
command line can build its flags from it. Plain functions are accepted too (models, tests).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional


@dataclass(frozen=True)
class Parameter:
    """One keyword a registry entry takes: its default (``inspect.Parameter.empty`` when
    required) and its annotation as written (a string under ``from __future__ import annotations``)."""

    name: str
    default: Any
    annotation: Any


@dataclass(frozen=True)
class Entry:
    """What a name stands for: ``factory(**params)`` builds it; ``fixed`` are pinned arguments."""

    name: str
    factory: Callable[..., Any]
    help: str
    fixed: Mapping[str, Any]

    @property
    def target(self) -> Optional[type]:
        """The class behind the entry (unwrapping partials), or None for a plain function."""
        f = _unwrap(self.factory)
        return f if isinstance(f, type) else None


def _unwrap(f: Callable[..., Any]) -> Callable[..., Any]:
    while isinstance(f, functools.partial):
        f = f.func
    return f


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


class Registry:
    """Maps a name to a class (or partial of one); ``create`` gives a clear error listing
    the known names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Entry] = {}

    def register(self, name: str, help: str = "", *, fixed: Optional[Mapping[str, Any]] = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator (or call on a class): register ``obj`` under ``name``; returns ``obj``."""

        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            pinned = dict(fixed or {})
            factory = functools.partial(obj, **pinned) if pinned else obj
            self._entries[name] = Entry(name, factory, help or _first_doc_line(_unwrap(obj)), pinned)
            return obj

        return decorator

    def names(self) -> List[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def describe(self, name: str) -> str:
        return self._entries[name].help if name in self._entries else ""

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        """The callable that builds ``name`` (a class, or a partial of one)."""
        return self.entry(name).factory

    def parameters(self, name: str) -> Dict[str, Parameter]:
        """The keywords ``create(name, ...)`` accepts, in declaration order, with the entry's
        defaults (a partial's, else the constructor's); pinned ones are left out."""
        entry = self.entry(name)
        try:
            sig = inspect.signature(entry.factory)
        except (TypeError, ValueError):
            return {}
        out: Dict[str, Parameter] = {}
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY) or p.name in entry.fixed:
                continue
            out[p.name] = Parameter(p.name, p.default, p.annotation)
        return out

    def create(self, name: str, **params: Any) -> Any:
        entry = self.entry(name)
        pinned = sorted(set(params) & set(entry.fixed))
        if pinned:
            fixed = ", ".join(f"{k}={entry.fixed[k]!r}" for k in pinned)
            raise TypeError(f"{self.kind} {name!r} fixes {fixed}; it cannot be changed")
        return entry.factory(**params)

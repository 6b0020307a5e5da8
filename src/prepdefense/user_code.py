"""Importing a user's code named as ``package.module:attribute`` (models and defenses,
issue 12).

The module is imported as Python would; when it is not found, the current working folder
is put on ``sys.path`` (at its end) and the import tried once more, as gunicorn and uvicorn do,
so ``prepdefense predict --model my_net:my_net`` works in the folder holding ``my_net.py``
whether or not that folder is on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Tuple

__all__ = ["split_spec", "valid_spec", "find_module", "import_module", "resolve"]


def split_spec(spec: str) -> Tuple[str, str]:
    """``"pkg.mod:attr.sub"`` -> ``("pkg.mod", "attr.sub")`` (stripped)."""
    head, _, tail = str(spec).partition(":")
    return head.strip(), tail.strip()


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def valid_spec(spec: str) -> bool:
    """Whether ``spec`` has the form ``package.module:attribute`` (identifiers only)."""
    head, tail = split_spec(spec)
    return _dotted(head) and _dotted(tail)


def _with_cwd() -> bool:
    """Append the working folder to ``sys.path``; True if it was not there."""
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path:
        return False
    sys.path.append(cwd)
    importlib.invalidate_caches()
    return True


def find_module(name: str) -> bool:
    """Whether module ``name`` can be imported (from ``sys.path`` or the working folder),
    without running it (its parent packages are imported)."""
    for attempt in range(2):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            pass
        if attempt == 0 and not _with_cwd():
            return False
    return False


def import_module(name: str) -> Any:
    """``importlib.import_module(name)``, retried with the working folder on ``sys.path``."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name not in (name, name.split(".")[0]) or not _with_cwd():
            raise
        return importlib.import_module(name)


def resolve(spec: str) -> Any:
    """The object ``package.module:attr.sub`` names.

    Raises:
        ImportError: the module cannot be imported.
        AttributeError: the module has no such attribute (the message names it).
    """
    head, tail = split_spec(spec)
    obj: Any = import_module(head)
    for attr in tail.split("."):
        if not hasattr(obj, attr):
            raise AttributeError(f"{head!r} has no {tail!r}")
        obj = getattr(obj, attr)
    return obj

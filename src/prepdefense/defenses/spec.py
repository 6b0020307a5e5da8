"""Defense names with parameters: ``name[key=value,...]`` (one string, so it travels as an id).

A defense's name is its identity everywhere (stores, unit ids, cards, reports), so the
parameters that make it a different defense are written into the name itself, in square
brackets after a built-in or user name: ``dct-distort[table=fd]``,
``dct-distort[table=fd,delta=0.1]``, ``fd+rand[pad_value=0.25]`` (brackets bind to the part
they follow). A value is read as a Python literal when it is one (``0.1``, ``10``,
``True``, ``None``, ``'1'`` for the text 1), else kept as the text written (``fd``,
``tables/mine.json``). In a shell, quote the whole name: brackets are glob characters.

:func:`format_part` writes the canonical form (keys sorted, no spaces), so two spellings
of one defense get one id (``defenses.normalize_name`` also drops a built-in defense's
parameters that equal its defaults). :func:`referenced_files` lists the files a name's
values point to, so a run's identity can hold their contents' digest.
"""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

__all__ = ["split_chain", "parse_part", "format_part", "referenced_files"]

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def split_chain(text: str) -> List[str]:
    """Split ``a+b[k=v]+c`` on the ``+`` outside brackets; parts stripped.

    Raises:
        ValueError: unbalanced brackets.
    """
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"defense {text!r} has a ']' without its '['")
        elif ch == "+" and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if depth != 0:
        raise ValueError(f"defense {text!r} has a '[' without its ']'")
    parts.append(text[start:].strip())
    return parts


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_part(part: str) -> Tuple[str, Dict[str, Any]]:
    """``'dct-distort[table=fd, delta=0.1]'`` -> ``('dct-distort', {'table': 'fd', 'delta': 0.1})``.

    Raises:
        ValueError: text after the ``]``, nested brackets, an item without ``=``, a key that
            is not an identifier, or a key given twice.
    """
    part = part.strip()
    if "[" not in part and "]" not in part:
        return part, {}
    name, sep, rest = part.partition("[")
    name = name.strip()
    if not sep or not rest.endswith("]") or "[" in rest or "]" in rest[:-1]:
        raise ValueError(f"bad defense {part!r}: write parameters as name[key=value,...] at the end of the name")
    if not name:
        raise ValueError(f"bad defense {part!r}: parameters without a defense name")
    params: Dict[str, Any] = {}
    body = rest[:-1].strip()
    for item in (body.split(",") if body else []):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not _KEY.match(key) or not value:
            raise ValueError(f"bad parameter {item.strip()!r} in defense {part!r}: write key=value")
        if key in params:
            raise ValueError(f"parameter {key!r} is given twice in defense {part!r}")
        params[key] = _value(value)
    return name, params


def format_part(name: str, params: Dict[str, Any]) -> str:
    """The canonical ``name[key=value,...]`` (keys sorted; ``name`` alone without parameters)."""
    if not params:
        return name
    items = ",".join(f"{k}={_text(v)}" for k, v in sorted(params.items()))
    return f"{name}[{items}]"


def _text(v: Any) -> str:
    if isinstance(v, str):
        # Bare where it reads back as the same text; quoted where it would read as a number,
        # a boolean or None ('1'), or hold a separator.
        return v if _value(v) == v and not set(v) & set(",[]+") and v == v.strip() and v else repr(v)
    return repr(v)


def referenced_files(name: str) -> Dict[str, str]:
    """``{"<part>.<key>": "sha256:<hex>"}`` for every text value of ``name`` (a chain with
    bracketed parameters) that names an existing file, e.g. a table's JSON: the run's
    identity then follows the file's contents, not only its path."""
    out: Dict[str, str] = {}
    for part in split_chain(name):
        base, params = parse_part(part)
        for key, value in params.items():
            if isinstance(value, str) and value:
                path = Path(value).expanduser()
                if path.is_file():
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    out[f"{base}.{key}"] = f"sha256:{digest}"
    return out

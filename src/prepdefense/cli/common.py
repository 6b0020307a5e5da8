"""Helpers shared by the sub-commands: errors, device choice, progress bars, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Optional

import torch


from ..errors import PrepDefenseError


class UsageError(PrepDefenseError):
    """A problem the user can fix; printed as one line, exit status 2."""


def resolve_device(name: Optional[str]) -> torch.device:
    """``auto`` (or None) -> CUDA when available, else CPU; otherwise the named device."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"bad --device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return dev


def progress(iterable: Iterable, *, total: Optional[int] = None, desc: str = "", enabled: bool = True, unit: str = "it"):
    """A tqdm bar on a terminal (stderr); silent when disabled or stderr is not a TTY."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled or not sys.stderr.isatty(), dynamic_ncols=True)


def print_json(obj: Any) -> None:
    """One JSON object on stdout (the ``--json`` contract)."""
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(o: Any):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def add_common_data_args(p, *, default_limit: Optional[int] = None) -> None:
    """``--data``, ``--model``, ``--limit``, ``--batch-size``, ``--device``, ``--seed``, ``--json``."""
    p.add_argument("--data", default="builtin", help="image folder (labels.csv or synset sub-folders), or 'builtin' for the scikit-image photos (default)")
    p.add_argument("--model", default="efficientnet-lite0", help="classifier name (default: efficientnet-lite0)")
    p.add_argument("--weights", default=None, help="local weights file for torchvision models (nothing downloads)")
    p.add_argument("--limit", type=int, default=default_limit, help="use at most N images")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, no progress bar")

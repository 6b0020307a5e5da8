"""Helpers shared by the sub-commands: errors, device choice, progress bars, JSON output."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from .. import data, defenses, models
from ..defenses import Defended
from ..seeding import make_generator


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


@contextlib.contextmanager
def one_line_skip_warnings() -> Iterator[None]:
    """Show every skipped-file warning as one ``prepdefense: warning: ...`` line on stderr."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, data.SkippedFileWarning):
            print(f"prepdefense: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", data.SkippedFileWarning)
        warnings.showwarning = show
        yield


def build_model(name: str, weights: Optional[str], device: torch.device) -> nn.Module:
    """``models.create`` with unknown names turned into a one-line usage error."""
    kwargs = {"weights": weights} if weights else {}
    try:
        model = models.create(name, **kwargs)
    except KeyError as e:
        raise UsageError(str(e.args[0]) if e.args else f"unknown model {name!r}") from None
    except TypeError as e:
        if "weights" not in str(e):
            raise
        raise UsageError(f"model {name!r} takes no --weights") from None
    return model.to(device).eval()


def build_defended(model: nn.Module, defense_name: str, seed: int, device: torch.device) -> nn.Module:
    """``Defended(defenses.create(name), model)`` seeded with ``seed``; the bare model for ``none``."""
    name = (defense_name or "none").strip().lower()
    if name == "none":
        return model
    try:
        defense = defenses.create(name)
    except KeyError as e:
        raise UsageError(str(e.args[0]) if e.args else f"unknown defense {name!r}") from None
    except ValueError as e:
        raise UsageError(f"bad --defense {defense_name!r}: {e}") from None
    return Defended(defense, model, generator=make_generator(seed)).to(device)

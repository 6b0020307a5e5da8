"""Helpers shared by the sub-commands: errors, device choice, progress bars, JSON output."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from typing import Any, Iterable, Iterator, Optional

import torch

from .. import data

# Built in the experiments layer (``reproduce`` needs them too); re-exported for the sub-commands.
from ..experiments.components import UsageError, build_defended, build_model, resolve_device

__all__ = ["UsageError", "resolve_device", "build_model", "build_defended", "progress", "print_json",
           "add_common_data_args", "one_line_skip_warnings"]


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

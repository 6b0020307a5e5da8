"""``prepdefense predict``: accuracy of a (defended) classifier on a folder of labelled images
(issue 2, item 7; issue 3, item 7).

Prints the top-1 accuracy with the number of images scored and of files skipped; with
``--json`` one object ``{"accuracy", "n", "correct", "skipped", "model", "defense", "seed",
"device", "data"}`` on stdout and no progress bar.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from .. import data, defenses, models
from ..defenses import Defended
from ..errors import DataError
from ..seeding import make_generator
from .common import UsageError, add_common_data_args, print_json, progress, resolve_device


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="accuracy of a (defended) model on labelled images",
        description=(
            "Classify labelled images and print the top-1 accuracy, the number of images scored "
            "and the number of files skipped (unreadable, truncated, not images, too small or too large). "
            "--data takes a folder with labels.csv (file,label,wnid,name), an ImageNet-style folder "
            "of synset sub-folders (n01440764/...), or 'builtin'."
        ),
    )
    add_common_data_args(p)
    p.add_argument("--defense", default="none", help="preprocessing defense in front of the model, e.g. dct-distort or fd+rand (default: none)")
    p.set_defaults(func=run)


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


def score(model: nn.Module, dataset: data.ImageDataset, *, batch_size: int, device: torch.device, show_progress: bool) -> Tuple[int, int]:
    """Classify every readable image of ``dataset``; returns (images scored, correct)."""
    n = correct = 0
    batches = data.iter_batches(dataset, batch_size)
    total = math.ceil(len(dataset) / batch_size)
    with torch.no_grad():
        for x, y, _ in progress(batches, total=total, desc="predict", unit="batch", enabled=show_progress):
            pred = model(x.to(device)).argmax(dim=1).cpu()
            correct += int((pred == y).sum())
            n += y.numel()
    return n, correct


def run(args) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    device = resolve_device(args.device)
    if str(args.data) != "builtin":
        # A missing folder or a bad labels.csv fails before the model loads (warnings come later).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", data.SkippedFileWarning)
            data.loading.folder_entries(args.data)
    with one_line_skip_warnings():
        model = build_model(args.model, args.weights, device)
        classifier = build_defended(model, args.defense, args.seed, device)
        dataset = data.load_dataset(args.data, size=model.input_size, limit=args.limit)
        n, correct = score(classifier, dataset, batch_size=args.batch_size, device=device, show_progress=not args.json)
    if n == 0:
        raise DataError(f"no readable image in {args.data} ({dataset.skipped} file(s) skipped)")
    result = {
        "accuracy": correct / n,
        "n": n,
        "correct": correct,
        "skipped": dataset.skipped,
        "model": args.model,
        "defense": (args.defense or "none").strip().lower(),
        "seed": args.seed,
        "device": str(device),
        "data": str(args.data),
    }
    if args.json:
        print_json(result)
    else:
        print(
            f"accuracy {result['accuracy']:.4f} ({correct}/{n} images; {dataset.skipped} skipped) "
            f"model {args.model}, defense {result['defense']}, device {device}"
        )
    return 0

"""``prepdefense predict``: accuracy of a (defended) classifier on a folder of labelled images
(issue 2, item 7; issue 3, item 7).

Prints the top-1 accuracy with the number of images scored and of files skipped; with
``--json`` one object ``{"accuracy", "n", "correct", "skipped", "model", "defense", "seed",
"device", "data"}`` on stdout and no progress bar. ``--out FILE.csv`` also writes one row per
scored image (``file,label,prediction,correct``), atomically, and names the file in the output
(``"predictions_file"`` in the JSON).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from .. import data
from ..atomic_io import atomic_write_bytes
from ..errors import DataError
from .common import (
    DEFENSE_HELP,
    add_common_data_args,
    add_defend_at_option,
    check_defend_at,
    add_model_options,
    build_defended,
    build_model,
    check_common,
    check_data,
    check_defense,
    check_out_file,
    UsageError,
    one_line_skip_warnings,
    model_options,
    print_json,
    progress,
    resolve_device,
)


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
    add_model_options(p)
    add_defend_at_option(p, "predict")
    p.add_argument("--defense", default="none", help=DEFENSE_HELP + " (default: none)")
    p.add_argument("--out", metavar="FILE.csv", default=None,
                   help="also write one row per scored image: file,label,prediction,correct (class indices; "
                        "an existing file is replaced atomically)")
    p.set_defaults(func=run)


def score(model: nn.Module, dataset: data.ImageDataset, *, batch_size: int, device: torch.device, show_progress: bool,
          rows: Optional[List[Tuple[str, int, int]]] = None) -> Tuple[int, int]:
    """Classify every readable image of ``dataset``; returns (images scored, correct) and, when
    ``rows`` is a list, appends ``(file, label, prediction)`` to it for every scored image."""
    n = correct = 0
    batches = data.iter_batches(dataset, batch_size)
    total = math.ceil(len(dataset) / batch_size)
    with torch.no_grad():
        for x, y, ids in progress(batches, total=total, desc="predict", unit="batch", enabled=show_progress):
            pred = model(x.to(device)).argmax(dim=1).cpu()
            correct += int((pred == y).sum())
            n += y.numel()
            if rows is not None:
                rows.extend(zip(ids, y.tolist(), pred.tolist()))
    return n, correct


def predictions_csv(rows: List[Tuple[str, int, int]]) -> str:
    """The ``--out`` file: a header, then ``file,label,prediction,correct`` (correct is 0 or 1)."""
    buf = io.StringIO()
    writer = csv.writer(buf)  # the csv module's own line ends (\r\n), so a \r in a file name is quoted
    writer.writerow(("file", "label", "prediction", "correct"))
    writer.writerows((f, label, pred, int(label == pred)) for f, label, pred in rows)
    return buf.getvalue()


def run(args) -> int:
    # Every flag is checked before the model loads: a missing folder, a bad labels.csv, an
    # unknown model or defense, a bad chain fail at once (skipped-file warnings come later).
    check_common(args)
    defense = check_defense(args.defense)
    check_defend_at(args)
    device = resolve_device(args.device)
    check_data(args.data)
    if args.out is not None:
        check_out_file(args.out)
        if args.data != "builtin" and Path(args.out).expanduser().resolve() == (Path(args.data).expanduser() / "labels.csv").resolve():
            raise UsageError(f"--out {args.out} is the labels file of --data; write the predictions to another file")
    rows: Optional[List[Tuple[str, int, int]]] = [] if args.out is not None else None
    with one_line_skip_warnings():
        model = build_model(args.model, args.weights, device, **model_options(args))
        classifier = build_defended(model, defense, args.seed, device, defend_at=args.defend_at)
        dataset = data.load_dataset(args.data, size=args.defend_at or model.input_size, limit=args.limit,
                                    num_classes=model.num_classes)
        n, correct = score(classifier, dataset, batch_size=args.batch_size, device=device, show_progress=not args.json,
                             rows=rows)
    if n == 0:
        raise DataError(f"no readable image in {args.data} ({dataset.skipped} file(s) skipped)")
    written = None
    if args.out is not None:
        # file names that are not valid UTF-8 (read from the folder) are written as their own bytes
        written = atomic_write_bytes(Path(args.out).expanduser(), predictions_csv(rows).encode("utf-8", "surrogateescape"))
    result = {
        "accuracy": correct / n,
        "n": n,
        "correct": correct,
        "skipped": dataset.skipped,
        "model": args.model,
        "defense": defense,
        "defend_at": args.defend_at,
        "seed": args.seed,
        "device": str(device),
        "data": str(args.data),
        **({"predictions_file": str(written)} if written is not None else {}),
    }
    if args.json:
        print_json(result)
    else:
        print(
            f"accuracy {result['accuracy']:.4f} ({correct}/{n} images; {dataset.skipped} skipped) "
            f"model {args.model}, defense {result['defense']}, device {device}"
        )
        if written is not None:
            print(f"  per-image predictions: {written}")
    return 0

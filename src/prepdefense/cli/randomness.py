"""``prepdefense randomness``: Table 1 of the paper (Section 6.1; PROTOCOL.md Table 1).

For each image two independent outputs of the defense are compared (mean normalised L2 and
SSIM), and the defended default model's top-1 accuracy on the clean images is measured (see
:func:`prepdefense.experiments.randomness.measure_randomness`). ``--defense all`` prints one
row per registered defense. ``--json`` prints one object (``l2``, ``ssim``, ``accuracy``,
``n``, ``defense``, ``model``, ``seed``, ``device``, ``skipped``, ``data``); for ``all`` the
rows go in a list under ``"rows"``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

from .. import data, defenses
from ..seeding import make_generator
from ..experiments.paper_numbers import TABLE1 as PAPER_TABLE1
from ..experiments.randomness import measure_randomness
from .common import (
    DEFENSE_HELP,
    UsageError,
    add_common_data_args,
    add_model_options,
    build_model,
    check_common,
    check_data,
    check_defense,
    model_options,
    one_line_skip_warnings,
    print_json,
    progress,
    resolve_device,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "randomness",
        help="Table 1: randomness (l2, SSIM between two draws) and accuracy of a defense",
        description=(
            "For every image draw two independent outputs of the defense and print the mean "
            "normalised L2 and SSIM between them, and the top-1 accuracy of the defended model "
            "on the clean images (paper Table 1). Deterministic defenses give l2 0 and SSIM 1. "
            "--defense all prints a row for every registered defense."
        ),
    )
    add_common_data_args(p)
    add_model_options(p)
    p.add_argument("--defense", required=True, help=DEFENSE_HELP + ", or 'all' for a row per registered defense")
    p.set_defaults(func=run)


def _create_defense(name: str):
    try:
        return defenses.create(name)
    except KeyError as e:
        raise UsageError(str(e.args[0]) if e.args else f"unknown defense {name!r}") from None
    except ValueError as e:
        raise UsageError(f"bad --defense {name!r}: {e}") from None


def _row_text(row: Dict[str, Any]) -> str:
    acc = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
    paper = PAPER_TABLE1.get(row["defense"])
    ref = f"   (paper: {paper[0]:.2f} {paper[1]:.2f} {paper[2]:.2f})" if paper else ""
    return f"{row['defense']:<14} {row['l2']:>8.4f} {row['ssim']:>8.4f} {acc:>8} {row['n']:>6}{ref}"


def run(args) -> int:
    check_common(args)
    name = check_defense(args.defense, allow_all=True)
    device = resolve_device(args.device)
    check_data(args.data)  # before the model loads
    names: List[str] = defenses.names() if name == "all" else [name]
    built = [(n, _create_defense(n)) for n in names]
    rows = []
    with one_line_skip_warnings():
        model = build_model(args.model, args.weights, device, **model_options(args))
        dataset = data.load_dataset(args.data, size=model.input_size, limit=args.limit)
        total = math.ceil(len(dataset) / args.batch_size)
        for defense_name, defense in built:
            defense = defense.to(device)
            batches = progress(data.iter_batches(dataset, args.batch_size), total=total, desc=defense_name,
                               unit="batch", enabled=not args.json)
            result = measure_randomness(defense, model, batches, make_generator(args.seed), device=device)
            rows.append({"defense": defense_name, **result})
    common = {"model": args.model, "seed": args.seed, "device": str(device), "skipped": dataset.skipped,
              "data": str(args.data)}
    if args.json:
        if name == "all":
            print_json({"rows": rows, **common})
        else:
            print_json({**rows[0], **common})
        return 0
    print(f"{'defense':<14} {'l2':>8} {'SSIM':>8} {'ACC':>8} {'n':>6}")
    for row in rows:
        print(_row_text(row))
    print(f"model {args.model}, seed {args.seed}, device {device}, {dataset.skipped} file(s) skipped; "
          "paper figures are Inception V3 on 1000 ImageNet images (compare trends, not values)")
    return 0

"""``prepdefense usability``: the clean accuracy every defense costs (issue 15, item 2).

Runs the ``usability`` experiment of ``reproduce`` (``experiments/usability.py``) on its own,
with the number of protocol images and draws given here: every defense and table, the paper's
defense at the model's resolution and defended at 299 px, and Table 4's delta sweep, each
beside the paper's accuracy. The run is resumable like ``reproduce`` (same store under
``--out``) and ends with ``report.md`` and ``tables/usability.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..experiments import units as U
from .common import (MODEL_HELP_DECLARED, WEIGHTS_HELP, UsageError, check_at_least, check_data, check_model, check_out_folder, check_seed, one_line_skip_warnings,
                     print_json, resolve_device)

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "usability",
        help="clean accuracy of every defense and table on protocol images, beside the paper's",
        description=(
            "Clean accuracy of the defended model for every defense (the shipped learned table, the FD table and "
            "every other shipped table, the paper's defense also defended at 299 px, Table 4's delta sweep) on N "
            "images the bare model classifies correctly, mean and spread over R draws, beside the paper's Table 1 / "
            "Table 4 figures. Cost: about N x R forward passes per configuration (23, one more per extra shipped table), 30 times that for "
            "the crop ensemble; tv "
            "is the slowest defense per image. N=200 and R=3 took about 13 minutes of computing on 2 CPU cores "
            "(benchmarks/RESULTS.md, 2026-11-30)."
        ),
    )
    p.add_argument("--data", required=True,
                   help="image folder (labels.csv or synset sub-folders); needs at least --n images the bare model "
                        "classifies correctly ('builtin' has only 4)")
    p.add_argument("--out", required=True, help="output folder (report.md, tables/usability.csv; resumable)")
    p.add_argument("--n", type=int, default=200, help="protocol images (correctly classified by the bare model; default 200)")
    p.add_argument("--draws", type=int, default=3, help="draws per random defense (default 3)")
    p.add_argument("--model", default="efficientnet-lite0", help=MODEL_HELP_DECLARED)
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=int, default=0, help="random seed: image order and draws (default 0)")
    p.add_argument("--fresh", action="store_true", help="delete earlier results in --out and start over")
    p.add_argument("--quiet", action="store_true", help="plain log lines instead of progress bars")
    p.add_argument("--json", action="store_true", help="print the table as JSON rows")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.reproduce import ReproduceConfig, reproduce

    check_at_least("--n", args.n, 1)
    check_at_least("--draws", args.draws, 1)
    check_out_folder(args.out)
    check_seed(args.seed)
    check_model(args.model, args.weights)
    resolve_device(args.device)
    listed = check_data(args.data)
    if listed < args.n:
        raise UsageError(f"--n {args.n} needs at least {args.n} images, but --data {args.data} lists {listed}")
    # The paper preset's sizes, with the protocol sample no larger than needed here.
    overrides = {"usability_images": int(args.n), "usability_draws": int(args.draws),
                 "n_images": min(U.get_preset("paper").n_images, int(args.n))}
    cfg = ReproduceConfig(out=Path(args.out), data=args.data, preset="paper", model=args.model, weights=args.weights,
                          device=args.device, seed=args.seed, fresh=args.fresh, quiet=args.quiet, only=["usability"],
                          overrides=overrides)
    with one_line_skip_warnings():
        outcome = reproduce(cfg)
    table = Path(args.out) / "tables" / "usability.csv"
    rows = list(csv.DictReader(table.open(encoding="utf-8"))) if table.is_file() else []
    if args.json:
        typed = [{k: _typed(v) for k, v in r.items()} for r in rows]
        print_json({"n": args.n, "draws": args.draws, "seed": args.seed, "model": args.model, "rows": typed,
                    "report": str(outcome.report)})
    else:
        for r in rows:
            print(f"{r['Configuration']:<48} ours {r['ACC (ours, mean over draws)']:>6} "
                  f"[{r['lowest draw']}, {r['highest draw']}]  paper {r['ACC (paper)']:>5}  n={r['n']}"
                  + (f"  table: {r['table']}" if r.get("table") else ""))
        print(f"report: {outcome.report}")
    if outcome.failed:
        print(f"{outcome.failed} unit(s) failed; the report says which and why (run again to retry them)")
    return 0


def _typed(cell: str):
    """A table cell as JSON wants it: an int or a float where the text is one, None for the
    table's "-" (no figure), the text otherwise."""
    text = (cell or "").strip()
    if text in ("", "-"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text

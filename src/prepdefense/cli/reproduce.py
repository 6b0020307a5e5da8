"""``prepdefense reproduce``: the paper's evaluation (Section 6) as one resumable run (issue 5).

    prepdefense reproduce --data DIR --out DIR [--preset quick|paper|smoke] [--model NAME]
                          [--device D] [--seed S] [--fresh] [--quiet] [--only EXPERIMENTS]
                          [--report-only] [--shard K/N]
                          [--executor local|ray [--ray-address ADDR] [--ray-workers N] [--ray-threads T]]

Writes ``DIR/report.md`` (every table with the paper's numbers beside ours), ``results/*.jsonl``,
``tables/*.csv``, ``figures/*.png``. Killed and started again with the same arguments, it
resumes where it stopped; ``--fresh`` starts over. ``--shard K/N`` runs only shard K of N of the
planned units (numbered from 1) into its own ``--out``; ``prepdefense merge`` combines the shards.
``--executor ray`` computes the units on Ray actors (one per GPU, or per CPU slot) while this
process stores them (the ``ray`` extra; ``experiments/ray_executor.py``): the same records as a
local run, and the same resumption.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..experiments import registry
from ..experiments import units as U
from ..experiments.executors import EXECUTORS, RAY_EXTRA_HINT
from .common import (MODEL_HELP_DECLARED, WEIGHTS_HELP, UsageError, check_data, check_model, check_out_folder, check_seed, check_shard, one_line_skip_warnings,
                     resolve_device)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "reproduce",
        help="reproduce the paper's tables and figures (resumable) and write a report",
        description=(
            "Run the paper's evaluation: Table 1 (randomness), Fig. 4 (BPDA and BPDA+EOT curves), Tables 2-4 "
            "(standard attacks, bare and defended, delta sweep), Table 5, Table 6 (combinations), Section 6.4 "
            "(learned BPDA) and the strong attack ensemble of 'prepdefense evaluate' with its diagnostics. Results are stored per unit of work, "
            "atomically: a killed run started again with the same arguments resumes."
        ),
    )
    p.add_argument("--data", default="builtin", help="image folder (labels.csv or synset sub-folders) or 'builtin' (default)")
    p.add_argument("--out", required=True, help="output folder (report.md, results/, tables/, figures/)")
    p.add_argument("--preset", default="quick", choices=sorted(U.PRESETS),
                   help="paper: the paper's sizes (100 images, 50 rounds, EOT 30, ...); quick (default): ~20 min on 2 CPU cores; smoke: tiny (tests)")
    p.add_argument("--model", default="efficientnet-lite0", help=MODEL_HELP_DECLARED)
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--fresh", action="store_true", help="delete earlier results in --out and start over")
    p.add_argument("--quiet", action="store_true", help="plain log lines instead of progress bars")
    p.add_argument("--only", default=None,
                   help=f"comma-separated experiments to run: {', '.join(registry.names())} (default: all)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the stored results")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run only shard K of N (numbered from 1: 1/N .. N/N) of the planned units, each into its own --out; "
                        "whole units are split, balanced by estimated cost, the same way in every shard; then "
                        "'prepdefense merge OUT SHARD_OUT...' combines them into records equal to an unsharded run's")
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local: compute the units in this process (default); ray: on Ray actors, one per GPU or CPU slot, "
                        "this process storing every result (same records; needs the 'ray' extra)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --executor ray: the Ray cluster to join (e.g. auto, or HOST:PORT); default: start a local Ray "
                        "on 127.0.0.1 for this run and stop it at the end")
    p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="with --executor ray: at most N workers (default: one per GPU of the cluster, else one per "
                        "T CPUs; a local Ray gets N*T CPUs)")
    p.add_argument("--ray-threads", type=int, default=None, metavar="T",
                   help="with --executor ray: torch threads and reserved CPUs per worker (default 1); records equal a "
                        "local run's with as many torch threads (e.g. OMP_NUM_THREADS=1 for the default)")
    p.set_defaults(func=run)


def _check_executor(args) -> None:
    if args.executor != "ray":
        for flag, value in (("--ray-address", args.ray_address), ("--ray-workers", args.ray_workers),
                            ("--ray-threads", args.ray_threads)):
            if value is not None:
                raise UsageError(f"{flag} applies to --executor ray only; add --executor ray or leave {flag} out")
        return
    for flag, value in (("--ray-workers", args.ray_workers), ("--ray-threads", args.ray_threads)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.ray_address is not None and not args.ray_address.strip():
        raise UsageError("--ray-address is empty; give auto or HOST:PORT, or leave it out to start a local Ray")
    if args.report_only:
        raise UsageError("--report-only computes nothing, so --executor ray has nothing to run; use one of them")
    if importlib.util.find_spec("ray") is None:
        raise UsageError(f"--executor ray needs Ray, which is not installed; {RAY_EXTRA_HINT}")


def run(args) -> int:
    from ..experiments.reproduce import ReproduceConfig, reproduce

    # Every flag is checked before anything is loaded or written (issue 11, item 5).
    if args.only is not None and not [p for p in args.only.split(",") if p.strip()]:
        raise UsageError(f"--only {args.only!r} names no experiment; give some of {', '.join(registry.names())}, "
                         "comma-separated, or leave --only out to run them all")
    try:
        only = registry.parse_only(args.only) if args.only else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.fresh and args.report_only:
        raise UsageError("--fresh deletes the stored results that --report-only would report; use one of them")
    check_out_folder(args.out)
    shard = check_shard(args.shard)
    if args.report_only and not (Path(args.out).expanduser() / "run.json").is_file():
        raise UsageError(f"--report-only: {args.out} holds no run to report (no run.json); run without --report-only first")
    check_seed(args.seed)
    _check_executor(args)
    check_model(args.model, args.weights)
    resolve_device(args.device)
    data = args.data
    listed = check_data(data)
    n_images = U.get_preset(args.preset).n_images
    if not args.report_only and listed < n_images:
        raise UsageError(
            f"--preset {args.preset} needs {n_images} images the model classifies correctly, but --data {data} "
            f"lists {listed}; give a larger folder" + (" or --preset smoke" if args.preset != "smoke" else "")
        )
    cfg = ReproduceConfig(
        out=Path(args.out), data=data, preset=args.preset, model=args.model, weights=args.weights,
        device=args.device, seed=args.seed, fresh=args.fresh, quiet=args.quiet, only=only,
        report_only=args.report_only, shard=shard, executor=args.executor, ray_address=args.ray_address,
        ray_workers=args.ray_workers, ray_threads=args.ray_threads or 1,
    )
    with one_line_skip_warnings():
        outcome = reproduce(cfg)
    print(f"report: {outcome.report}" + (f" (shard {shard} only; combine the shards with 'prepdefense merge')" if shard else ""))
    if outcome.failed:
        print(f"{outcome.failed} unit(s) failed; the report says which and why (run again to retry them)")
    return 0

"""``prepdefense merge``: combine the shards of a ``reproduce`` or ``evaluate --shard K/N`` run (issue 13, item 1).

    prepdefense merge OUT SHARD_OUT... [--allow-missing]

Checks that the folders are the shards of one run (same data, model, weights, seed, preset,
number of shards and ``--only``), reports missing and repeated shards, copies their units
into ``OUT`` and writes ``OUT/report.md`` as an unsharded run does
(``experiments/merge.py``). The shards of ``evaluate`` merge without a report: ``evaluate``
with the same arguments and ``--out OUT`` then finishes the run (checks, curve, card).
"""

from __future__ import annotations

from pathlib import Path

from .common import UsageError, check_out_folder


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="combine the --out folders of 'reproduce --shard K/N' or 'evaluate --shard K/N' into one run",
        description=(
            "Combine the shards of one 'prepdefense reproduce --shard K/N' run (each with its own --out) into OUT and "
            "write OUT/report.md as an unsharded run does: the merged records equal those of one unsharded run with "
            "the same arguments. The shards must come from one run (same --data, --model, --weights, --seed, --preset, "
            "--only and N); otherwise merge stops with a one-line error naming the difference. Missing shards are an "
            "error unless --allow-missing; a shard given twice is taken once. 'prepdefense reproduce' with the run's "
            "arguments and --out OUT resumes the merged run (and computes what a missing shard left out). The shards of "
            "'prepdefense evaluate --shard K/N' merge the same way; then 'prepdefense evaluate' with the same arguments "
            "(without --shard) and --out OUT reuses every attack and runs the checks, the curve and the card."
        ),
    )
    p.add_argument("out", metavar="OUT", help="output folder of the merged run (for reproduce: report.md, results/, tables/, "
                                             "figures/; for evaluate: the units, finished by 'evaluate --out OUT')")
    p.add_argument("shards", nargs="+", metavar="SHARD_OUT", help="the --out folder of each shard")
    p.add_argument("--allow-missing", action="store_true",
                   help="merge even when some shards of the split are missing (reproduce: the report is then partial; "
                        "evaluate: the finishing run computes what they left out)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.merge import merge_shards

    check_out_folder(args.out)
    for s in args.shards:
        if not Path(s).expanduser().is_dir():
            raise UsageError(f"shard folder {s!r} does not exist (give the --out folder of each shard's --shard K/N run)")
    outcome = merge_shards(Path(args.out), [Path(s) for s in args.shards], allow_missing=args.allow_missing)
    if outcome.command == "evaluate":
        print(f"merged: {outcome.out}; finish with 'prepdefense evaluate' and the shards' arguments, without --shard, "
              f"and --out {outcome.out} (it reuses the shards' attacks, then runs the checks, the curve and the card)")
        if outcome.failed_units or outcome.missing_units:
            print(f"{len(outcome.failed_units)} unit(s) failed and {len(outcome.missing_units)} not run; that command computes them")
        return 0
    print(f"report: {outcome.report}")
    if outcome.failed_units or outcome.missing_units:
        print(f"{len(outcome.failed_units)} unit(s) failed and {len(outcome.missing_units)} not run; the report says which "
              "(run 'prepdefense reproduce' with the run's arguments and --out OUT to compute them)")
    return 0

"""A/B throughput of two source trees of prepdefense: this one against a baseline revision.

Issue 9, item 8 ("not worse than before, same run"): single timings on a shared 2-core VM
swing by 15-20%, so a before/after figure must come from rounds that alternate between the
two trees. Each round starts one fresh interpreter per tree (in alternating order), times
``--calls`` user-facing calls ``defense(x, generator=torch.Generator().manual_seed(i))`` on the
same images and reports the median call; the ratio ``after / before`` is taken per round and
summarised by its median with a bootstrap 95% interval over rounds (scipy.stats.bootstrap).

The baseline is a git revision (checked out with ``git worktree add`` into a temporary
folder, removed afterwards) or a path to another checkout's ``src``. Both trees run on this
interpreter and its packages; only ``PYTHONPATH`` differs.

Usage::

    python benchmarks/bench_compare_revisions.py --baseline b6b31cc [--defenses dct-distort,jpeg]
        [--rounds 8] [--calls 12] [--batch 64] [--size 299] [--threads 2] [--out FILE.json]
        [--no-value-checks]

``--no-value-checks`` times both trees with ``prepdefense.validation.set_value_checks(False)``
where the tree has it (trees older than the value check of issue 11 have nothing to turn off),
and records per tree what happened to the check.

Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# The timed child: only public API that both old and new trees have (defenses.create and a
# forward with a torch.Generator), so any revision since the registry can be measured.
CHILD = r"""
import json, os, statistics, sys, time
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch
threads, batch, size, calls = (int(a) for a in sys.argv[1:5])
names = sys.argv[5].split(",")
torch.set_num_threads(threads)
from prepdefense import defenses
try:
    from prepdefense.validation import set_value_checks
except ImportError:
    set_value_checks = None
if set_value_checks is None:
    switch = "no switch in this tree"
elif sys.argv[6] == "off":
    set_value_checks(False); switch = "off"
else:
    switch = "on"
x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
out = {}
for name in names:
    d = defenses.create(name)
    call = lambda i: d(x, generator=torch.Generator().manual_seed(i))
    call(0); call(1)
    times = []
    for i in range(calls):
        t0 = time.perf_counter(); call(i); times.append(time.perf_counter() - t0)
    out[name] = statistics.median(times)
out["value_checks"] = switch
print(json.dumps(out))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="git revision of this repository, or a path to another tree's src/")
    p.add_argument("--defenses", default="dct-distort", help="comma-separated defense names present in both trees")
    p.add_argument("--rounds", type=int, default=8, help="alternating rounds (one child per tree each)")
    p.add_argument("--calls", type=int, default=12, help="timed calls per child (after two warm-up calls)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="", help="JSON results (default: print only)")
    p.add_argument("--no-value-checks", action="store_true",
                   help="turn the image value check off in both trees (where the tree can; recorded per tree)")
    return p.parse_args(argv)


def run_child(src: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = [sys.executable, "-c", CHILD, str(args.threads), str(args.batch), str(args.size), str(args.calls), args.defenses,
           "off" if args.no_value_checks else "on"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"timing child for {src} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(before: list, after: list) -> dict:
    """Median per-round ratio after/before with a bootstrap 95% interval over rounds."""
    from scipy import stats

    ratios = np.asarray(after) / np.asarray(before)
    out = {"median_before_s": float(np.median(before)), "median_after_s": float(np.median(after)),
           "ratio_after_over_before": float(np.median(ratios)), "ratios": ratios.round(4).tolist()}
    if len(ratios) >= 3:
        ci = stats.bootstrap((ratios,), np.median, confidence_level=0.95, n_resamples=2000,
                             random_state=np.random.default_rng(0), method="percentile").confidence_interval
        out["ci95"] = [float(ci.low), float(ci.high)]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    baseline_src, cleanup = Path(args.baseline), None
    if not (baseline_src / "prepdefense").is_dir():
        tmp = Path(tempfile.mkdtemp(prefix="prepdefense-baseline-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "tree"), args.baseline],
                       check=True, capture_output=True)
        baseline_src, cleanup = tmp / "tree" / "src", tmp / "tree"
    trees = {"before": baseline_src, "after": ROOT / "src"}
    names = args.defenses.split(",")
    times = {label: {n: [] for n in names} for label in trees}
    value_checks = {}
    try:
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for label in order:
                child = run_child(trees[label], args)
                value_checks[label] = child.pop("value_checks")
                for name, t in child.items():
                    times[label][name].append(t)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {times['after'][n][-1] / times['before'][n][-1]:.3f}" for n in names), flush=True)
    finally:
        if cleanup is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(cleanup)], check=False)
    import torch

    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "baseline": args.baseline, "after": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                           capture_output=True, text=True).stdout.strip(),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "threads": args.threads, "batch": args.batch, "size": args.size, "calls": args.calls, "rounds": args.rounds,
        "load_average": os.getloadavg(), "value_checks": value_checks,
        "defenses": {n: summarise(times["before"][n], times["after"][n]) for n in names},
    }
    print("value checks: " + ", ".join(f"{label} {state}" for label, state in value_checks.items()))
    for n, s in result["defenses"].items():
        ci = s.get("ci95")
        print(f"{n}: before {s['median_before_s'] * 1e3:.1f} ms, after {s['median_after_s'] * 1e3:.1f} ms per call of "
              f"{args.batch} images; after/before {s['ratio_after_over_before']:.3f}"
              + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

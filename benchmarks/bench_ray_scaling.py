"""Scaling of ``reproduce --executor ray`` from 1 to 2 workers, and its cost per unit (issue 13, item 2).

Runs the same plan (default: the smoke preset's Table 1, Tables 2-3 and Fig. 4 on
EfficientNet-Lite0 and the built-in images) three times into fresh folders, each with one
torch thread per process:

* ``local``: the local executor;
* ``ray1`` / ``ray2``: 1 and 2 Ray workers on one local Ray (2 CPUs, 127.0.0.1), started once
  before them (its start-up is reported apart; a real run pays it once).

For each it times the whole ``reproduce`` call and the executor's part (from the first unit
handed out to the last result stored; the sample, the report and the strip are the same in
every run) and reports

* scaling efficiency ``t(ray1) / (2 * t(ray2))`` of the executor's part, with and without the
  workers' start (each worker imports torch and the library and loads the model once);
* per-unit overhead ``(t(ray1) - t(local)) / units``, with and without the worker's start;
  and, less sensitive to other work on the machine slowing one run more than another, each
  run's own overhead per unit: its executor time minus the workers' start minus the units'
  compute time (``UnitResult.seconds``, summed; one worker computes them one after another),
  per unit, for ``ray1`` and ``local`` (dispatch, transfer of the results and the store's
  writes; Ray's share is the difference).

The records of the three runs are checked equal. Writes JSON with ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/bench_ray_scaling.py --only table1,table2,table3,fig4 --out ray.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import torch

from prepdefense import __version__
from prepdefense.experiments.executors import LocalExecutor
from prepdefense.experiments.ray_executor import RayExecutor, start_local_ray
from prepdefense.experiments.reproduce import ReproduceConfig, reproduce
from prepdefense.experiments.store import ResultStore


class Timed:
    """An executor around another that records when its first unit goes out and its last
    result has been stored (the generator resumes after the caller stored the last one)."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.seconds, self.units, self.compute_seconds = inner, inner.name, 0.0, 0, 0.0

    def describe(self) -> str:
        return self.inner.describe()

    def run(self, ctx, units, progress):
        t0 = time.perf_counter()
        try:
            for pair in self.inner.run(ctx, units, progress):
                self.units += 1
                self.compute_seconds += pair[1].seconds
                yield pair
        finally:
            self.seconds = time.perf_counter() - t0


def _records(out: Path) -> Dict[str, Any]:
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not (k == "seconds" or k.endswith("_seconds"))}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    st = ResultStore(out)
    return {e: strip(st.records(e)) for e in st.experiments()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--only", default="table1,table2,table3,fig4")
    ap.add_argument("--work", default=None, help="folder for the three runs (default: a temporary one, removed)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # as each Ray worker: the same records, a fair per-unit comparison
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-ray-"))
    only = [p for p in args.only.split(",") if p]
    load_before = os.getloadavg()

    def run(name: str, executor) -> Dict[str, Any]:
        timed = Timed(executor)
        cfg = ReproduceConfig(out=work / name, data=args.data, preset=args.preset, model=args.model, device="cpu",
                              quiet=True, fresh=True, only=only, executor=timed)
        t0 = time.perf_counter()
        outcome = reproduce(cfg, stream=open(os.devnull, "w"))
        total = time.perf_counter() - t0
        assert outcome.failed == 0, f"{name}: {outcome.failed} unit(s) failed"
        row = {"units": outcome.ran, "total_s": round(total, 2), "executor_s": round(timed.seconds, 2),
               "unit_compute_s": round(timed.compute_seconds, 2), "workers_start_s": 0.0}
        if isinstance(executor, RayExecutor):
            row["workers_start_s"] = round(executor.start_seconds, 2)
        if not (isinstance(executor, RayExecutor) and executor.workers != 1):  # units one after another
            row["own_overhead_per_unit_s"] = round((timed.seconds - row["workers_start_s"] - timed.compute_seconds) / max(1, outcome.ran), 4)
        print(f"{name:6s} {row}", flush=True)
        return row

    import ray

    try:
        rows = {"local": run("local", LocalExecutor())}
        t0 = time.perf_counter()
        start_local_ray(2, num_gpus=0)
        ray_start = time.perf_counter() - t0
        print(f"local Ray (2 CPUs, 127.0.0.1) started in {ray_start:.1f} s", flush=True)
        try:
            rows["ray1"] = run("ray1", RayExecutor(workers=1, device="cpu"))
            rows["ray2"] = run("ray2", RayExecutor(workers=2, device="cpu"))
        finally:
            ray.shutdown()
        same = _records(work / "local") == _records(work / "ray1") == _records(work / "ray2")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    n = rows["local"]["units"]
    t1, t2, tl = rows["ray1"]["executor_s"], rows["ray2"]["executor_s"], rows["local"]["executor_s"]
    s1, s2 = rows["ray1"]["workers_start_s"], rows["ray2"]["workers_start_s"]
    result = {
        "benchmark": "ray_scaling",
        "plan": {"preset": args.preset, "only": only, "model": args.model, "data": args.data, "units": n},
        "runs": rows,
        "ray_start_s": round(ray_start, 2),
        "scaling_efficiency": round(t1 / (2 * t2), 3),
        "scaling_efficiency_without_worker_start": round((t1 - s1) / (2 * (t2 - s2)), 3),
        "per_unit_overhead_s": round((t1 - tl) / n, 3),
        "per_unit_overhead_without_worker_start_s": round((t1 - s1 - tl) / n, 3),
        "own_overhead_per_unit_s": {k: rows[k]["own_overhead_per_unit_s"] for k in ("local", "ray1")},
        "ray_overhead_per_unit_s": round(rows["ray1"]["own_overhead_per_unit_s"] - rows["local"]["own_overhead_per_unit_s"], 4),
        "records_equal": same,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "ray": ray.__version__, "prepdefense": __version__},
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "machine")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

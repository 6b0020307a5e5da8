"""Throughput of every registered defense, and of the paper's defense against two references.

Issue 3, item 6: images/s of every defense at 299x299, batch 64, on CPU (2 threads) and
on CUDA when present; for ``dct-distort``, side by side in the same run, (a) a per-image
implementation in the style of the paper's released code (8x8 block loops with SciPy's
DCT, ``cv2.remap``) and (b) a vectorised NumPy/SciPy implementation
(``benchmarks/reference_impls.py``). Before timing, the three implementations are checked
to agree on one shared random draw (float64: to 1e-9; float32: the fraction of pixels
that differ, which only rounding ties at ``.5`` can cause). torch and (b) are then timed
in alternating rounds (:func:`time_interleaved`), and the ratio reported is the median of
the per-round ratios, so that a stretch of load from other jobs hits both alike.

``--pool`` adds, to the same interleaved rounds, torch's fast path with the CPU workers
forced to one (``cpu_workers.CPUWorkers(max_workers=1)``: the same steps, run inline on the
calling thread with its intra-op threads), so that ``torch / it`` on that row is what the
worker pool buys. With ``--threads 1`` the pool is off anyway and the ratio is about 1.

Usage::

    python benchmarks/bench_defense_throughput.py [--quick] [--defenses dct-distort,fd]
        [--device cpu|cuda|all] [--pool] [--out benchmarks/results/throughput-DATE.json]

PyTorch's CPU allocator returns large blocks to the OS, so every fresh 70 MB buffer
page-faults (4 KB pages) while NumPy asks for transparent huge pages; this script sets
PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (huge pages for allocations >= 2 MB) before importing
torch so both sides allocate alike. ``--no-thp`` measures the default allocator instead.
The JSON records both settings, the load average and the package versions.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--defenses", default="", help="comma-separated names (default: every registered defense)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (and SciPy FFT workers for (b))")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per defense (after one warm-up); torch vs (b): 2 * REPEATS + 1 rounds")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all", help="all = CPU, and CUDA if present")
    p.add_argument("--cuda-batches", default="64,512", help="batch sizes timed on CUDA")
    p.add_argument("--paper-images", type=int, default=8, help="images timed for the per-image reference (a)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="shrink the batch of a defense slower than this per call")
    p.add_argument("--quick", action="store_true", help="small run: batch 16, 1 repeat, 2 images for (a)")
    p.add_argument("--pool", action="store_true",
                   help="dct-distort: also time torch with the CPU workers forced to 1, interleaved with the "
                        "others, to isolate what the worker pool buys")
    p.add_argument("--no-thp", action="store_true", help="do not set THP_MEM_ALLOC_ENABLE=1 for torch")
    p.add_argument("--out", default="", help="JSON results (default benchmarks/results/throughput-<date>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.paper_images = min(args.batch, 16), 1, min(args.paper_images, 2)
        args.cuda_batches = "64"
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and not ARGS.no_thp:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_impls as ref  # noqa: E402

from prepdefense import cpu_workers, defenses  # noqa: E402
from prepdefense.defenses.dct_distort import DCTDistort  # noqa: E402
from prepdefense.defenses.grid_distort import index_maps, sample_grid_params  # noqa: E402
from prepdefense.draws import Params  # noqa: E402
from prepdefense.seeding import make_generator  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn, repeats: int, device: str = "cpu") -> float:
    """Wall seconds per call, after one warm-up call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def time_defense(name: str, device: str, batch: int, size: int, repeats: int, max_seconds: float) -> dict:
    defense = defenses.create(name).to(device)
    generator = make_generator(0)
    x_small = torch.rand(2, 3, size, size, generator=make_generator(1)).to(device)
    start = time.perf_counter()
    defense(x_small, generator=generator)
    _sync(device)
    per_image = (time.perf_counter() - start) / 2
    if per_image * batch > max_seconds:  # very slow defenses (TV, PD on CPU): fewer images
        batch = max(1, min(batch, int(max_seconds / max(per_image, 1e-9))))
        repeats = 1
    x = torch.rand(batch, 3, size, size, generator=make_generator(1)).to(device)
    seconds = time_calls(lambda: defense(x, generator=generator), repeats, device)
    return {"defense": name, "device": device, "batch": batch, "repeats": repeats,
            "seconds_per_call": seconds, "images_per_s": batch / seconds}


def check_references(threads: int) -> dict:
    """(a), (b) and torch on one shared draw: float64 equality, float32 tie fraction."""
    g = make_generator(123)
    out = {}
    table = defenses.create("dct-distort").quantize.table
    for label, shape in (("299", (3, 3, 299, 299)), ("odd", (2, 3, 61, 45))):
        x64 = torch.rand(*shape, generator=g, dtype=torch.float64)
        params = sample_grid_params(shape[0], 0.15, 10, g)
        rf, cf, corner = params["row_factors"].numpy(), params["col_factors"].numpy(), params["corner"].numpy()
        model = DCTDistort(table=table)
        t64 = model.apply(x64, Params(distort=params)).numpy()
        b64 = ref.numpy_dct_distort(x64.numpy(), table.numpy(), rf, cf, corner, workers=threads)
        a64 = ref.paper_style_dct_distort(x64.numpy(), table.numpy(), rf, cf, corner)
        rows, cols = index_maps(params, shape[2], shape[3])
        maps_equal = bool(
            (ref.numpy_axis_maps(rf, corner >= 2, shape[2]) == rows.numpy()).all()
            and (ref.numpy_axis_maps(cf, corner % 2 == 1, shape[3]) == cols.numpy()).all()
            and all((ref.paper_style_axis_map(rf[i], corner[i] >= 2, shape[2]) == rows[i].numpy()).all()
                    for i in range(shape[0]))
        )
        x32 = x64.float()
        t32 = model.apply(x32, Params(distort=params)).numpy()
        b32 = ref.numpy_dct_distort(x32.numpy(), table.numpy().astype(np.float32), rf, cf, corner, workers=threads)
        out[label] = {
            "shape": list(shape),
            "maps_equal": maps_equal,
            "float64_max_abs_torch_vs_b": float(np.abs(t64 - b64).max()),
            "float64_max_abs_torch_vs_a": float(np.abs(t64 - a64).max()),
            "float32_fraction_differing_torch_vs_b": float((np.abs(t32 - b32) > 1e-4).mean()),
            "float32_max_abs_torch_vs_b": float(np.abs(t32 - b32).max()),
        }
        out[label]["ok"] = bool(
            maps_equal and out[label]["float64_max_abs_torch_vs_b"] < 1e-9 and out[label]["float64_max_abs_torch_vs_a"] < 1e-9
            and out[label]["float32_fraction_differing_torch_vs_b"] < 1e-3
        )
    return out


def time_interleaved(calls: dict, rounds: int, warmup: int = 2) -> dict:
    """Wall and process-CPU seconds of each call in ``calls`` (name -> function), timed in
    ``rounds`` rounds that each run every call, one after the other, after ``warmup``
    untimed rounds. In each round every call runs twice and the second run is timed: on
    this VM a core left idle for a while (say, while a single-threaded call ran) comes back
    slow for about half a second, which would otherwise penalise whichever multi-threaded
    call comes next. Interleaving exposes every implementation to the same stretches of a
    shared machine's load, so ratios are taken per round."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            fn()
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return {"wall": wall, "cpu": cpu}


def _median(values):
    return float(np.median(np.asarray(values, dtype=np.float64)))


def time_references(batch: int, size: int, repeats: int, paper_images: int, threads: int, pool: bool = False) -> dict:
    """dct-distort: torch vs (b) vectorised NumPy vs (a) paper style, same process, same data,
    interleaved (:func:`time_interleaved`); each rate is the median over rounds and each
    ratio the median of the per-round ratios. ``pool``: also torch with the CPU workers
    forced to one, in the same rounds (``torch_over_one_worker``: what the pool buys)."""
    x = torch.rand(batch, 3, size, size, generator=make_generator(1))
    xn = x.numpy()
    table = defenses.create("dct-distort").quantize.table
    tn = table.numpy().astype(np.float32)
    torch_defense = defenses.create("dct-distort")
    g = make_generator(0)
    rng = np.random.default_rng(0)
    xa = xn[:paper_images]
    calls = {
        "torch": lambda: torch_defense(x, generator=g),
        "numpy_vectorised_b": lambda: ref.numpy_dct_distort(xn, tn, *ref.draw_params(batch, 0.15, 10, rng), workers=threads),
    }
    if pool:
        one_worker = cpu_workers.CPUWorkers(max_workers=1)  # same steps, inline: no pool

        def torch_one_worker():
            with cpu_workers.use(one_worker):
                return torch_defense(x, generator=g)

        calls["torch_one_worker"] = torch_one_worker
    rounds = 2 * max(repeats, 1) + 1
    times = time_interleaved(calls, rounds, warmup=1 if repeats <= 1 else 2)
    # (a) is single-threaded and about 100x slower: timed on its own, a few images, after torch
    # and (b), its ratio taken against torch's median.
    paper = time_interleaved(
        {"paper_style_a": lambda: ref.paper_style_dct_distort(xa, tn, *ref.draw_params(paper_images, 0.15, 10, rng))},
        max(repeats, 1), warmup=0,
    )
    for kind in ("wall", "cpu"):
        times[kind].update(paper[kind])
    images = {"torch": batch, "numpy_vectorised_b": batch, "torch_one_worker": batch, "paper_style_a": paper_images}
    result = {"batch": batch, "paper_style_images": paper_images, "rounds": rounds,
              "workers": cpu_workers.current().size()}
    for kind, key in (("wall", "images_per_s"), ("cpu", "images_per_cpu_s")):
        per_round = {name: [images[name] / t for t in times[kind][name]] for name in times[kind]}
        result[key] = {name: _median(v) for name, v in per_round.items()}
        suffix = "" if kind == "wall" else "_cpu_time"
        ratios = [t / o for t, o in zip(per_round["torch"], per_round["numpy_vectorised_b"])]
        result[f"torch_over_b{suffix}"] = _median(ratios)
        result[f"torch_over_a{suffix}"] = result[key]["torch"] / result[key]["paper_style_a"]
        if kind == "wall":
            result["torch_over_b_per_round"] = ratios
        if pool:
            pool_ratios = [t / o for t, o in zip(per_round["torch"], per_round["torch_one_worker"])]
            result[f"torch_over_one_worker{suffix}"] = _median(pool_ratios)
            if kind == "wall":
                result["torch_over_one_worker_per_round"] = pool_ratios
    return result


def _atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    try:
        import cv2

        cv2.setNumThreads(1)  # (a) is the per-image, single-process style of the released code
        cv2_version = cv2.__version__
    except ImportError:
        cv2_version = None
    names = [n.strip() for n in args.defenses.split(",") if n.strip()] or defenses.names()
    devices = ["cpu"] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append("cuda")
    elif args.device == "cuda":
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    started = _dt.datetime.now()

    checks = check_references(args.threads) if "dct-distort" in names else {}
    rows, skipped = [], []
    for device in devices:
        batches = [args.batch] if device == "cpu" else [int(b) for b in args.cuda_batches.split(",")]
        for name in names:
            for batch in batches:
                try:
                    rows.append(time_defense(name, device, batch, args.size, args.repeats, args.max_seconds))
                except Exception as e:  # another helper's defense may be unfinished: report, go on
                    skipped.append({"defense": name, "device": device, "error": f"{type(e).__name__}: {e}"})
                    break
    references = None
    if "dct-distort" in names:
        references = time_references(args.batch, args.size, args.repeats, args.paper_images, args.threads, args.pool)

    result = {
        "date": started.isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                 "cuda": torch.cuda.get_device_name(0) if "cuda" in devices else None,
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "scipy": __import__("scipy").__version__, "opencv": cv2_version},
        "settings": {"size": args.size, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
                     "quick": args.quick, "pool": args.pool,
                     "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")},
        "correctness": checks, "defenses": rows, "skipped": skipped, "dct_distort_references": references,
    }

    print(f"\n{started:%Y-%m-%d %H:%M}  {args.size}x{args.size}, torch threads={args.threads}, "
          f"THP={os.environ.get('THP_MEM_ALLOC_ENABLE')}, load avg before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print(f"{'device':<6} {'defense':<14} {'batch':>5} {'images/s':>10}")
    for r in rows:
        print(f"{r['device']:<6} {r['defense']:<14} {r['batch']:>5} {r['images_per_s']:>10.1f}")
    for s in skipped:
        print(f"skipped {s['defense']} on {s['device']}: {s['error']}")
    if references:
        rates, cpu_rates = references["images_per_s"], references["images_per_cpu_s"]
        print(f"\ndct-distort on CPU, same run, {references['rounds']} interleaved rounds, medians "
              f"(batch {references['batch']}; (a) timed on {references['paper_style_images']} images):")
        print(f"{'implementation':<34} {'images/s':>10} {'torch / it':>11} {'images/CPU-s':>13} {'torch / it':>11}")
        print(f"{'torch (prepdefense)':<34} {rates['torch']:>10.2f} {1.0:>11.1f} {cpu_rates['torch']:>13.2f} {1.0:>11.1f}")
        rows_shown = (("torch_one_worker", "torch, CPU workers forced to 1", "one_worker"),) if args.pool else ()
        rows_shown += (("numpy_vectorised_b", "(b) vectorised NumPy/SciPy", "b"),
                       ("paper_style_a", "(a) per-image, paper-code style", "a"))
        for key, label, ratio in rows_shown:
            print(f"{label:<34} {rates[key]:>10.2f} {references[f'torch_over_{ratio}']:>11.1f} "
                  f"{cpu_rates[key]:>13.2f} {references[f'torch_over_{ratio}_cpu_time']:>11.1f}")
        spread = references["torch_over_b_per_round"]
        print(f"torch / (b) per round: {', '.join(f'{r:.1f}' for r in spread)}")
        if args.pool:
            spread = references["torch_over_one_worker_per_round"]
            print(f"torch ({references['workers']} workers) / torch (1 worker) per round: "
                  f"{', '.join(f'{r:.2f}' for r in spread)}")
    for label, c in checks.items():
        print(f"check {label} {tuple(c['shape'])}: maps equal={c['maps_equal']}, float64 max|torch-b|="
              f"{c['float64_max_abs_torch_vs_b']:.1e}, max|torch-a|={c['float64_max_abs_torch_vs_a']:.1e}, "
              f"float32 pixels differing (rounding ties)={c['float32_fraction_differing_torch_vs_b']:.1e} -> "
              f"{'OK' if c['ok'] else 'FAILED'}")

    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"throughput-{started:%Y-%m-%d}.json"
    _atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))

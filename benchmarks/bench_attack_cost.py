"""Cost of one BPDA+EOT step relative to the bare model (issue 4, item 11).

For each defense and device, times

* ``step``: one BPDA+EOT gradient step on B images: ``EOT(Defended(BPDA(defense), model), n)``
  forward (n draws of the defense, the classifier on n*B images in chunks) and backward to the
  input, mean over the draws of the per-draw cross-entropy (the gradient the attacks use);
* ``reference``: the classifier's forward + backward (to the input) on n*B images at once;

and prints ``ratio = step / reference`` (goal <= 1.10: the wrappers and the defense add at most
10% to the unavoidable cost of the model on the same number of images). Median of ``--repeat``
runs after one warm-up. CPU always; CUDA too when present. Writes JSON with ``--out``.

    python benchmarks/bench_attack_cost.py --batch 2 --eot 30 --defenses dct-distort,jpeg,rand --out cost.json

``--rss`` also runs ``prepdefense attack --defense rand --attack adaptive --n 10`` with EOT 8 and
EOT 32 (one step each, no diagnostics) in child processes and reports each one's peak RSS
against the documented bound :data:`RSS_BOUND_MIB` (issue 13, item 4): EOT and the verdict
work in chunks of at most ``attacks.eot.EOT_CHUNK_IMAGES`` images, so the peak holds the
activations of ``max(16, batch)`` images whatever ``--eot`` and ``--n`` are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

from prepdefense import __version__, defenses, models, seeding
from prepdefense.attacks.bpda import BPDA
from prepdefense.attacks.eot import EOT
from prepdefense.defenses import Defended


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, repeat: int, device: torch.device) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(defense_name: str, model, device: torch.device, *, batch: int, eot: int, chunk, repeat: int, seed: int) -> Dict[str, float]:
    side = model.input_size
    g = seeding.make_generator(seed)
    x = seeding.rand((batch, 3, side, side), g, device=device)
    labels = seeding.randint(0, 1000, (batch,), g, device=device)
    wrapped = EOT(Defended(BPDA(defenses.create(defense_name)), model).to(device), eot, chunk=chunk, reduce="none")

    def step():
        xa = x.clone().requires_grad_(True)
        z = wrapped(xa, generator=seeding.make_generator(seed))
        k = z.shape[0]
        loss = F.cross_entropy(z.reshape(k * batch, -1), labels.repeat(k), reduction="none").view(k, batch).mean(0).sum()
        (gr,) = torch.autograd.grad(loss, xa)
        return gr

    big = x.repeat(eot, 1, 1, 1)
    big_labels = labels.repeat(eot)

    def reference():
        xa = big.clone().requires_grad_(True)
        loss = F.cross_entropy(model(xa), big_labels, reduction="none").sum()
        (gr,) = torch.autograd.grad(loss, xa)
        return gr

    t_ref = _median_time(reference, repeat, device)
    t_step = _median_time(step, repeat, device)
    row = {"defense": defense_name, "device": str(device), "batch": batch, "eot": eot, "chunk": chunk,
           "randomized": bool(wrapped.randomized), "step_s": t_step, "reference_s": t_ref, "ratio": t_step / t_ref}
    # A defense that enlarges the image (rand pads 224 -> 248) makes the classifier itself dearer;
    # the second reference runs the model on images of the defense's output size.
    with torch.no_grad():
        out_side = defenses.create(defense_name)(x[:1], generator=seeding.make_generator(seed)).shape[-1]
    if out_side != side:
        big_out = seeding.rand((eot * batch, 3, out_side, out_side), g, device=device)

        def reference_out():
            xa = big_out.clone().requires_grad_(True)
            (gr,) = torch.autograd.grad(F.cross_entropy(model(xa), big_labels, reduction="none").sum(), xa)
            return gr

        t_out = _median_time(reference_out, repeat, device)
        row.update(reference_output_size_s=t_out, output_side=out_side, ratio_output_size=t_step / t_out)
    return row


#: Documented bound on an attack's peak resident memory with the default model (224 px, CPU),
#: whatever ``--eot`` and ``--n``: the model, the data and the activations of 16 images.
RSS_BOUND_MIB = 2560

_PEAK_RSS_CHILD = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def peak_rss(eot: int, data: str, n: int = 10) -> Dict[str, float]:
    """Peak RSS (MiB) of one ``prepdefense attack`` run on ``rand`` with ``eot`` draws."""
    cmd = [sys.executable, "-m", "prepdefense.cli.main", "attack", "--data", data, "--defense", "rand",
           "--attack", "adaptive", "--eot", str(eot), "--n", str(n), "--steps", "1", "--no-diagnostics", "--json",
           "--untargeted"]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, *cmd], capture_output=True, text=True, check=True)
    rc, kib = out.stdout.split()
    return {"eot": eot, "n": n, "returncode": int(rc), "peak_rss_mib": int(kib) / 1024.0,
            "seconds": time.perf_counter() - t0, "bound_mib": RSS_BOUND_MIB, "within_bound": int(kib) / 1024.0 <= RSS_BOUND_MIB}


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--defenses", default="dct-distort,jpeg,rand", help="comma-separated defense names")
    p.add_argument("--batch", type=int, default=2, help="images B per step (default 2)")
    p.add_argument("--eot", type=int, default=30, help="EOT draws n (default 30)")
    p.add_argument("--chunk", type=int, default=None, help="EOT draws per classifier call (default: all)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement, median (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--devices", default="auto", help="'auto' (cpu, plus cuda when present) or a comma list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--rss", action="store_true", help="also measure the peak RSS of an attack with EOT 8 and 32 (child processes)")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"),
                   help="image folder for --rss (default: ../shared/data/imagenet-sample)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" else args.devices.split(",")
    model = models.create("efficientnet-lite0")
    rows = []
    for dev in devs:
        device = torch.device(dev)
        m = model.to(device)
        for name in [d.strip() for d in args.defenses.split(",") if d.strip()]:
            r = bench(name, m, device, batch=args.batch, eot=args.eot, chunk=args.chunk, repeat=args.repeat, seed=args.seed)
            rows.append(r)
            extra = f"; vs the model on {r['output_side']}px images {r['ratio_output_size']:.3f}" if "ratio_output_size" in r else ""
            note = "" if r["randomized"] else " (deterministic defense: EOT runs one draw)"
            print(f"{dev:5s} {name:12s} B={args.batch} n={args.eot}: step {r['step_s']:.3f} s, model fwd+bwd on {args.eot * args.batch} images {r['reference_s']:.3f} s, ratio {r['ratio']:.3f}{extra} (goal <= 1.10){note}", flush=True)
    rss = []
    if args.rss:
        if not Path(args.data).is_dir():
            print(f"--rss: skipped, no image folder at {args.data}")
        for eot in (8, 32):
            r = peak_rss(eot, args.data)
            rss.append(r)
            print(f"peak RSS, adaptive on rand, n={r['n']}, EOT {eot}: {r['peak_rss_mib']:.0f} MiB "
                  f"(bound {RSS_BOUND_MIB} MiB: {'within' if r['within_bound'] else 'EXCEEDED'}; exit {r['returncode']})", flush=True)
    out = {
        "benchmark": "bpda_eot_step_cost",
        "peak_rss": rss,
        "goal_ratio": 1.10,
        "results": rows,
        "threads": torch.get_num_threads(),
        "versions": {"prepdefense": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

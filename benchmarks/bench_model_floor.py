"""The floor under every attack: the default model's forward and forward+backward, and what
``channels_last``, ``torch.inference_mode`` and ``torch.compile`` do to it (issue 13, item 3).

Every attack costs about (model forward+backward) x steps x EOT, so the model is the floor.
For ``efficientnet-lite0`` at its 224-px input, batch ``--batch`` on the CPU (``--threads``),
it times in interleaved rounds (each variant once per round, median over rounds, ratios per
round against the baseline of the same round):

* forward, for judging: ``no_grad`` (baseline), ``inference_mode``, ``channels_last`` model
  and input (+ ``inference_mode``), and ``torch.compile`` (when it compiles here; its
  compile time is reported apart);
* forward+backward to the input, the attack step's unavoidable part: default (baseline),
  ``channels_last``, ``torch.compile``.

Before timing, every variant's logits (and input gradients) are checked against the
baseline's (max abs difference and relative difference reported; a variant that disagrees
beyond float tolerance is marked and must not be adopted).

Usage::

    python benchmarks/bench_model_floor.py [--batch 32] [--threads 2] [--rounds 5] [--no-compile] [--out FILE.json]

Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles for tens of seconds)")
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from prepdefense import __version__, models

    base = models.create("efficientnet-lite0").eval()
    for p in base.parameters():
        p.requires_grad_(False)
    side = int(base.input_size)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, side, side, generator=g)
    labels = torch.randint(0, 1000, (args.batch,), generator=g)
    cl_model = copy.deepcopy(base).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def fwd(model, inp, mode):
        with mode():
            return model(inp)

    def fwd_bwd(model, inp):
        xa = inp.clone().requires_grad_(True)
        loss = F.cross_entropy(model(xa), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xa)
        return grad

    forward = {
        "no_grad (baseline)": lambda: fwd(base, x, torch.no_grad),
        "inference_mode": lambda: fwd(base, x, torch.inference_mode),
        "channels_last + no_grad": lambda: fwd(cl_model, x_cl, torch.no_grad),
        "channels_last + inference_mode": lambda: fwd(cl_model, x_cl, torch.inference_mode),
    }
    backward = {
        "default (baseline)": lambda: fwd_bwd(base, x),
        "channels_last": lambda: fwd_bwd(cl_model, x_cl),
    }
    compile_info = {}
    if not args.no_compile:
        try:
            compiled = torch.compile(copy.deepcopy(base))
            t0 = time.perf_counter()
            fwd(compiled, x, torch.no_grad)
            compile_info["forward_compile_s"] = time.perf_counter() - t0
            forward["torch.compile + no_grad"] = lambda: fwd(compiled, x, torch.no_grad)
            t0 = time.perf_counter()
            fwd_bwd(compiled, x)
            compile_info["backward_compile_s"] = time.perf_counter() - t0
            backward["torch.compile"] = lambda: fwd_bwd(compiled, x)
        except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
            compile_info["error"] = f"{type(e).__name__}: {str(e)[:300]}"

    agreement = {}
    ref = forward["no_grad (baseline)"]()
    for name, fn in forward.items():
        out = fn()
        agreement["forward: " + name] = {"max_abs": float((out - ref).abs().max()),
                                         "same_argmax": bool(out.argmax(1).eq(ref.argmax(1)).all())}
    ref_g = backward["default (baseline)"]()
    for name, fn in backward.items():
        out = fn()
        agreement["backward: " + name] = {"max_abs": float((out - ref_g).abs().max()),
                                          "rel": float((out - ref_g).norm() / ref_g.norm().clamp_min(1e-30))}

    def timed(calls):
        times = {k: [] for k in calls}
        for fn in calls.values():
            fn()
        for _ in range(args.rounds):
            for k, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        first = next(iter(calls))
        return {k: {"median_s": statistics.median(v), "images_per_s": args.batch / statistics.median(v),
                    "speedup_vs_baseline": statistics.median([b / t for b, t in zip(times[first], v)])}
                for k, v in times.items()}

    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": "efficientnet-lite0", "side": side, "batch": args.batch, "threads": args.threads,
        "rounds": args.rounds, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "prepdefense": __version__, "load_average": os.getloadavg(),
        "forward": timed(forward), "forward_backward": timed(backward), "compile": compile_info,
        "agreement": agreement,
    }
    for part in ("forward", "forward_backward"):
        print(f"{part} (batch {args.batch}, {args.threads} threads):")
        for k, r in result[part].items():
            print(f"  {k:32s} {r['images_per_s']:8.1f} images/s  x{r['speedup_vs_baseline']:.3f} vs baseline")
    print("agreement with the baseline:", json.dumps(agreement, indent=1))
    if compile_info:
        print("torch.compile:", compile_info)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

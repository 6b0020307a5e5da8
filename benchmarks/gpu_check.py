"""One short script for a lent GPU (issue 13, item 5): correctness and speed of the CUDA path.

It measures, on ``--device`` (default ``cuda``):

1. **CUDA vs CPU agreement** for every registered defense on the same draw: params are drawn
   on the CPU (``sample_params``), applied on both devices (``apply``); reported as the max
   absolute difference and the fraction of pixels that differ by more than 1e-4 (Step 1's
   rounding can flip a coefficient that sits on a .5 tie, which moves a block by one level).
2. **dct-distort throughput** at 299x299, batch 256 (goal >= 20,000 images/s on one H100/H200).
3. **The attack step's cost** over the model's forward+backward on the same images (BPDA+EOT,
   ``benchmarks/bench_attack_cost.py``; goal <= 1.10).
4. **``reproduce --preset paper`` wall time**, estimated: the planned units' costs (in image
   forward+backward passes, ``experiments/units.py``) times the measured seconds per image
   forward+backward of the model on this device, for 1 GPU and divided over N GPUs with Ray.

Everything goes to stdout and to ``--out`` (JSON, default ``benchmarks/results/gpu-check-<date>.json``).
With ``--device cpu --quick`` it runs the same logic small on the CPU (the tests do, so the
script does not rot between GPU sessions).

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--out FILE]

Budget: about 3-5 minutes on one H100/H200 (model and data load included).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeat: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def agreement(device: torch.device, side: int, batch: int) -> dict:
    from prepdefense import defenses
    from prepdefense.draws import DrawKey

    x = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    rows = {}
    for name in defenses.names():
        d = defenses.create(name).eval()
        if name == "crop":
            d.ensemble = 1
        key = DrawKey.from_seed(1, batch)
        params = d.sample_params(x, key) if d.randomized else None
        with torch.no_grad():
            cpu = d.apply(x, params)
            dev = d.to(device).apply(x.to(device), None if params is None else params.to(device)).cpu()
        diff = (cpu - dev).abs()
        rows[name] = {"max_abs": float(diff.max()), "fraction_over_1e-4": float((diff > 1e-4).float().mean())}
    return rows


def dct_distort_throughput(device: torch.device, side: int, batch: int, repeat: int) -> dict:
    from prepdefense import defenses

    d = defenses.create("dct-distort").to(device)
    x = torch.rand(batch, 3, side, side, device=device)
    with torch.no_grad():
        t = _time(lambda: d(x, generator=torch.Generator().manual_seed(0)), device, repeat)
    return {"side": side, "batch": batch, "seconds": t, "images_per_s": batch / t, "goal_images_per_s": 20000}


def model_seconds_per_image(model, device: torch.device, batch: int, repeat: int) -> float:
    side = int(model.input_size)
    x = torch.rand(batch, 3, side, side, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def fwd_bwd():
        xa = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xa), labels, reduction="sum"), xa)
        return g

    return _time(fwd_bwd, device, repeat) / batch


def paper_preset_estimate(seconds_per_image: float, gpus=(1, 2, 4, 8)) -> dict:
    from prepdefense.experiments import registry, units as U

    plan = registry.plan(U.get_preset("paper"), set(registry.names()))
    passes = sum(u.cost for u in plan)
    hours = passes * seconds_per_image / 3600.0
    return {"units": len(plan), "image_fwd_bwd_passes": passes, "seconds_per_image_fwd_bwd": seconds_per_image,
            "hours_by_gpus": {n: hours / n for n in gpus},
            "note": "unit costs are the planner's estimates; Ray divides whole units, so N GPUs approach 1/N only "
                    "while there are many more units than GPUs"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes (a dry run of the logic, e.g. on the CPU)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it where one is lent (or --device cpu --quick for a dry run)")
        return 2
    from prepdefense import __version__, models
    from bench_attack_cost import bench as attack_step_bench

    q = args.quick
    t_start = time.perf_counter()
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "prepdefense": __version__, "quick": q,
    }
    result["agreement"] = agreement(device, 32 if q else 224, 2 if q else 8)
    worst = max(result["agreement"].items(), key=lambda kv: kv[1]["max_abs"])
    print(f"1. CUDA vs CPU, every defense on the same draw: worst {worst[0]} max |diff| {worst[1]['max_abs']:.2e}, "
          f"{worst[1]['fraction_over_1e-4']:.2e} of pixels over 1e-4", flush=True)
    result["dct_distort"] = dct_distort_throughput(device, 64 if q else 299, 4 if q else 256, 1 if q else 5)
    r = result["dct_distort"]
    print(f"2. dct-distort {r['side']}px batch {r['batch']}: {r['images_per_s']:.0f} images/s (goal >= 20000)", flush=True)
    model = models.create("efficientnet-lite0").to(device).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    steps = [attack_step_bench(name, model, device, batch=2 if q else 8, eot=2 if q else 30, chunk=None,
                               repeat=1 if q else 3, seed=0) for name in ("dct-distort", "rand")]
    result["attack_step"] = steps
    for s in steps:
        print(f"3. BPDA+EOT step on {s['defense']}: {s['step_s']:.3f} s vs model fwd+bwd {s['reference_s']:.3f} s, "
              f"ratio {s['ratio']:.3f} (goal <= 1.10)", flush=True)
    spi = model_seconds_per_image(model, device, 4 if q else 128, 1 if q else 5)
    result["paper_preset"] = paper_preset_estimate(spi)
    e = result["paper_preset"]
    print(f"4. reproduce --preset paper: {e['units']} units, {e['image_fwd_bwd_passes']:.3g} image fwd+bwd passes at "
          f"{spi * 1e3:.3f} ms each: " + ", ".join(f"{n} GPU(s) ~{h:.1f} h" for n, h in e["hours_by_gpus"].items()), flush=True)
    result["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"gpu-check-{result['date'][:10]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"written: {out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

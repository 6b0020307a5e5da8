"""``prepdefense reproduce``: the paper's evaluation (Section 6) as one resumable run (issue 5).

:func:`reproduce` resolves the preset, checks ``OUT/run.json`` (a different configuration is
refused unless ``fresh``), draws (or reloads) the protocol sample, runs every unit of the
plan that is not done yet (``units.py``; each unit writes one atomic file, ``store.py``),
draws the sample-image strip and writes the report (``report.py``).

A unit whose piece is missing or raises is stored with status "error" and its message; the
run goes on, the report says "not available: <reason>", and the next run tries it again.
A unit's randomness comes only from ``unit_seed(seed, unit.id)``, so a unit gives the same
records whichever process, machine or order computes it.

Each experiment is one function ``_run_<experiment>(ctx, unit) -> (records, summary)``:

* ``table1``  two independent defended outputs per image: l2, SSIM, defended accuracy
  (``experiments.randomness.measure_randomness``; Table 1, Section 5.4);
* ``table2``  a standard attack on the bare model (Table 2, Section 6.5); its adversarial
  examples are cached in ``OUT/cache/adv/table2/...`` for Tables 3 and 4;
* ``table3``  those examples through ``Defended(dct-distort)`` (Table 3), judged on R draws;
* ``table4``  the same with the distortion limit ``delta`` swept (Table 4);
* ``fig4`` / ``table6``  the protocol attacks ``bpda`` / ``bpda-eot`` with their per-round
  history (Fig. 4 a-d, Sections 6.2-6.3; Table 6);
* ``learned`` the Section 6.4 approximator (trained once on images disjoint from the sample,
  cached), its l2/SSIM to g(x), and BPDA through it;
* ``strong``  the ``adaptive`` attack (L2 RMS 0.05 and Linf 8/255, untargeted) with its
  verdict on R fresh draws, and the Carlini et al. diagnostics (``attacks.diagnostics``).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import seeding
from ..errors import PrepDefenseError
from ..metrics import l2_rms, linf
from . import units as U
from .metadata import collect_metadata, now_iso
from .store import ResultStore, to_jsonable

__all__ = ["ReproduceConfig", "ReproduceOutcome", "reproduce", "run_demo_pipeline", "RunContext"]


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class ReproduceConfig:
    """Everything ``prepdefense reproduce`` takes (the CLI maps its flags onto this).

    Attributes:
        out: output folder (``run.json``, ``units/``, ``results/``, ``report.md``...).
        data: image folder or ``"builtin"``.
        preset: ``quick``, ``paper`` or ``smoke`` (``units.PRESETS``).
        model: classifier name (``models.names()``); ``weights`` a local weights file.
        device: ``cpu``, ``cuda[:N]`` or ``auto``.
        seed: the run's seed (sample, targets, every unit's generator).
        fresh: delete earlier results in ``out`` first.
        quiet: plain log lines instead of progress bars.
        only: experiments to run (``units.EXPERIMENTS``; None = all).
        overrides: preset fields to replace (part of the run's identity).
        report_only: only (re)write the report from the stored units.
    """

    out: Path
    data: str = "builtin"
    preset: str = "quick"
    model: str = "efficientnet-lite0"
    weights: Optional[str] = None
    device: str = "auto"
    seed: int = 0
    fresh: bool = False
    quiet: bool = False
    only: Optional[Sequence[str]] = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    report_only: bool = False


@dataclass
class ReproduceOutcome:
    out: Path
    report: Optional[Path]
    planned: int
    already_done: int
    ran: int
    failed: int
    seconds: float
    resumed: bool


class _Sample:
    """The protocol sample (x on CPU, labels, targets, ids) plus how it was drawn."""

    def __init__(self, x, labels, targets, ids, info=None):
        self.x = x
        self.labels = labels
        self.targets = targets
        self.ids = list(ids)
        self.info = dict(info or {})

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------------------------
# run context: the model, the sample, defenses and generators for the units
# ---------------------------------------------------------------------------------------------
class RunContext:
    """What every unit needs: preset, seed, device, store, classifier and the sample."""

    def __init__(self, *, preset: U.Preset, seed: int, device: torch.device, store: ResultStore,
                 classifier: nn.Module, sample: _Sample, data_source: Any, model_name: str) -> None:
        self.preset = preset
        self.seed = int(seed)
        self.device = torch.device(device)
        self.store = store
        self.classifier = classifier
        self.sample = sample
        self.data_source = data_source
        self.model_name = model_name
        self.progress_hook: Callable[[float], None] = lambda fraction: None
        self._dataset = None

    # -- randomness --------------------------------------------------------------------------
    def generator(self, unit_id: str, purpose: str = "") -> torch.Generator:
        """A CPU generator from the run's seed, the unit's id and a purpose tag."""
        return seeding.make_generator(U.unit_seed(self.seed, unit_id + ("#" + purpose if purpose else "")))

    # -- images --------------------------------------------------------------------------------
    def shard(self, shard: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[str]]:
        """(x, labels, targets, ids) of an image shard of the sample, on the device."""
        sl = U.shard_slice(shard, self.preset.shard_size, len(self.sample))
        if sl.start >= len(self.sample):
            raise ValueError(f"shard {shard} is empty (the sample has {len(self.sample)} images)")
        s = self.sample
        return (s.x[sl].to(self.device), s.labels[sl].to(self.device), s.targets[sl].to(self.device), s.ids[sl])

    def dataset(self):
        """The whole image source (Table 1 and the approximator's training images)."""
        if self._dataset is None:
            from ..data import ImageDataset, load_dataset

            if isinstance(self.data_source, ImageDataset):
                self._dataset = self.data_source
            elif isinstance(self.data_source, (str, Path)):
                self._dataset = load_dataset(str(self.data_source), size=int(getattr(self.classifier, "input_size", 224)))
            else:
                raise PrepDefenseError("no image source to draw Table 1 / training images from (images were given directly)")
        return self._dataset

    def table1_indices(self) -> List[int]:
        """Table 1 images: a seeded random subset of the source (any label, like the paper's)."""
        ds = self.dataset()
        g = seeding.make_generator(U.unit_seed(self.seed, "table1-images"))
        order = torch.randperm(len(ds), generator=g).tolist()
        return order[: self.preset.table1_images]

    def load_indices(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        from ..data import iter_batches

        batches = list(iter_batches(self.dataset(), 64, indices=list(indices)))
        if not batches:
            raise PrepDefenseError("none of the requested images could be read")
        return (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), sum((b[2] for b in batches), []))

    # -- defenses --------------------------------------------------------------------------------
    def defense(self, name: str, **params: Any) -> nn.Module:
        """``defenses.create(name, **params)`` on the device, the crop ensemble set by the preset."""
        from .. import defenses

        if name == "crop":
            params.setdefault("ensemble", int(self.preset.crop_ensemble))
        d = defenses.create(name, **params)
        if int(getattr(d, "ensemble", 1)) > 1 and int(d.ensemble) != self.preset.crop_ensemble:
            d.ensemble = int(self.preset.crop_ensemble)
        return d.to(self.device).eval()

    def defended(self, name: str, **params: Any) -> nn.Module:
        from ..defenses import Defended

        if name == "none":
            return self.classifier
        return Defended(self.defense(name, **params), self.classifier).eval()


# ---------------------------------------------------------------------------------------------
# small shared helpers
# ---------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "-", text).strip("-").lower()


def _call_model(model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if getattr(model, "randomized", False):
        return model(x, generator=generator)
    return model(x)


@torch.no_grad()
def predict_draws(model: nn.Module, x: torch.Tensor, *, draws: int, generator: torch.Generator) -> torch.Tensor:
    """Predicted labels under ``draws`` independent draws of a random model: (R, N) on CPU.

    A deterministic model is run once (R = 1), since every draw would agree.
    """
    r = int(draws) if getattr(model, "randomized", False) else 1
    return torch.stack([_call_model(model, x, seeding.make_generator(seeding.child_seed(generator))).argmax(1).cpu() for _ in range(r)])


def _image_records(ids, labels, targets, preds: torch.Tensor, *, x=None, adv=None, extra: Optional[Dict[str, Sequence]] = None) -> List[Dict[str, Any]]:
    """Per-image records: first-draw prediction and the rates over all R draws."""
    labels_c, targets_c = labels.cpu(), targets.cpu()
    correct = preds == labels_c
    hit = preds == targets_c
    l2 = l2_rms(adv, x).cpu() if adv is not None else None
    li = linf(adv, x).cpu() if adv is not None else None
    out = []
    for i, image_id in enumerate(ids):
        rec = {
            "image_id": image_id,
            "label": int(labels_c[i]),
            "target": int(targets_c[i]),
            "prediction": int(preds[0, i]),
            "predictions": [int(p) for p in preds[:, i]],
            "correct": bool(correct[0, i]),
            "success": bool(hit[0, i]),
            "correct_rate": float(correct[:, i].float().mean()),
            "success_rate": float(hit[:, i].float().mean()),
            "draws": int(preds.shape[0]),
        }
        if l2 is not None:
            rec["l2"] = float(l2[i])
            rec["linf"] = float(li[i])
        for k, vals in (extra or {}).items():
            rec[k] = vals[i]
        out.append(rec)
    return out


def _attack(name: str, **params: Any):
    from .. import attacks

    return attacks.create(name, **params)


def _with_progress(params: Dict[str, Any], name: str, hook: Callable[[float], None]) -> Dict[str, Any]:
    """Add a ``progress`` callback when the attack's factory/class accepts one."""
    from .. import attacks

    try:
        factory = attacks.REGISTRY.get(name)
    except KeyError:
        return params
    sig_ok = False
    try:
        sig = inspect.signature(factory)
        sig_ok = "progress" in sig.parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    except (TypeError, ValueError):
        pass
    if not sig_ok:
        return params

    def progress(done, total, *_rest):
        try:
            hook(min(1.0, float(done) / max(1.0, float(total))))
        except Exception:  # noqa: BLE001 - progress must never break an attack
            pass

    return {**params, "progress": progress}


# ---------------------------------------------------------------------------------------------
# Table 1
# ---------------------------------------------------------------------------------------------
def _run_table1(ctx: RunContext, unit: U.Unit):
    from .randomness import measure_randomness

    idx_all = ctx.table1_indices()
    sl = U.shard_slice(unit.shard, ctx.preset.shard_size, len(idx_all))
    x, labels, ids = ctx.load_indices(idx_all[sl])
    defense = ctx.defense(unit.defense)
    g = ctx.generator(unit.id)
    records = []
    for i, image_id in enumerate(ids):
        # One image per call so that every record carries its own l2 / SSIM / correctness.
        m = measure_randomness(defense, ctx.classifier, [(x[i : i + 1], labels[i : i + 1])], g, device=ctx.device)
        records.append({"image_id": image_id, "label": int(labels[i]), "l2": m["l2"], "ssim": m["ssim"], "correct": bool(m["accuracy"] == 1.0)})
        ctx.progress_hook((i + 1) / len(ids))
    return records, {"n": len(records), "randomized": bool(getattr(defense, "randomized", False))}


# ---------------------------------------------------------------------------------------------
# Tables 2-4
# ---------------------------------------------------------------------------------------------
def standard_adversarial(ctx: RunContext, label: str, shard: int) -> Dict[str, Any]:
    """The Table 2 adversarial examples of attack ``label`` on ``shard`` (computed once, cached).

    The cache entry is written atomically; the attack's generator depends only on the
    Table 2 unit id, so whichever unit computes it first gets the same tensors.
    """
    name = f"adv/table2/{_slug(label)}/s{shard}"
    cached = ctx.store.load_tensors(name)
    if cached is not None:
        return cached
    spec = ctx.preset.attack_spec(label)
    x, labels, targets, ids = ctx.shard(shard)
    attack = _attack(spec.name, **spec.kwargs)
    table2_id = U.Unit("table2", "none", label, shard).id
    t0 = time.perf_counter()
    res = attack(ctx.classifier, x, labels=labels, targets=targets if spec.targeted else None, generator=ctx.generator(table2_id))
    entry = {
        "adversarial": res.adversarial.detach().cpu(),
        "success": res.success.detach().cpu(),
        "ids": list(ids),
        "seconds": time.perf_counter() - t0,
        "attack": repr(attack),
        "params": spec.kwargs,
        "targeted": spec.targeted,
    }
    ctx.store.save_tensors(name, entry)
    return entry


def _run_table2(ctx: RunContext, unit: U.Unit):
    entry = standard_adversarial(ctx, unit.attack, unit.shard)
    x, labels, targets, ids = ctx.shard(unit.shard)
    adv = entry["adversarial"].to(ctx.device)
    preds = predict_draws(ctx.classifier, adv, draws=1, generator=ctx.generator(unit.id))
    recs = _image_records(ids, labels, targets, preds, x=x, adv=adv, extra={"attack_success": [bool(s) for s in entry["success"]]})
    spec = ctx.preset.attack_spec(unit.attack)
    return recs, {"attack": entry["attack"], "params": spec.kwargs, "targeted": spec.targeted, "attack_seconds": entry["seconds"]}


def _inputs_for(ctx: RunContext, label: str, shard: int) -> torch.Tensor:
    x, _, _, _ = ctx.shard(shard)
    if label == "clean":
        return x
    return standard_adversarial(ctx, label, shard)["adversarial"].to(ctx.device)


def _run_table3(ctx: RunContext, unit: U.Unit):
    x, labels, targets, ids = ctx.shard(unit.shard)
    xa = _inputs_for(ctx, unit.attack, unit.shard)
    model = ctx.defended(unit.defense)
    preds = predict_draws(model, xa, draws=ctx.preset.eval_draws, generator=ctx.generator(unit.id))
    return _image_records(ids, labels, targets, preds, x=x, adv=xa), {"draws": int(preds.shape[0])}


def _run_table4(ctx: RunContext, unit: U.Unit):
    delta = float(unit.params["delta"])
    x, labels, targets, ids = ctx.shard(unit.shard)
    xa = _inputs_for(ctx, unit.attack, unit.shard)
    model = ctx.defended(unit.defense, delta=delta)
    preds = predict_draws(model, xa, draws=ctx.preset.eval_draws, generator=ctx.generator(unit.id))
    return _image_records(ids, labels, targets, preds, x=x, adv=xa), {"draws": int(preds.shape[0]), "delta": delta}


# ---------------------------------------------------------------------------------------------
# Fig. 4 and Table 6: the protocol attacks
# ---------------------------------------------------------------------------------------------
def _protocol_attack(ctx: RunContext, unit: U.Unit, *, rounds: int, max_rounds: int, eot: int, approx: Any = None):
    params: Dict[str, Any] = {"rounds": rounds}
    if max_rounds > rounds:
        params.update(until_bound=True, max_rounds=max_rounds)
    if unit.attack == "bpda-eot":
        params["eot"] = eot
    if approx is not None:
        params["approx"] = approx
    name = "bpda-eot" if unit.attack == "bpda-eot" else "bpda"
    attack = _attack(name, **_with_progress(params, name, ctx.progress_hook))
    x, labels, targets, ids = ctx.shard(unit.shard)
    model = ctx.defended(unit.defense)
    res = attack(model, x, labels=labels, targets=targets, generator=ctx.generator(unit.id))
    adv = res.adversarial.detach()
    info = res.info or {}
    # Fresh draws of the final images (the protocol's own curve uses one judged draw each).
    preds = predict_draws(model, adv, draws=ctx.preset.eval_draws, generator=ctx.generator(unit.id, "verdict"))
    extra = {}
    for key in ("stop_round", "stop_reason", "bound_round", "final_prediction"):
        if isinstance(info.get(key), list) and len(info[key]) == len(ids):
            extra[key] = info[key]
    recs = _image_records(ids, labels, targets, preds, x=x, adv=adv, extra=extra)
    if "final_prediction" in extra:
        for r in recs:  # the protocol's verdict (last judged draw), as Fig. 4 counts it
            r["protocol_correct"] = r["final_prediction"] == r["label"]
            r["protocol_success"] = r["final_prediction"] == r["target"]
    summary = {
        "history": res.history,
        "n": len(ids),
        "params": {k: v for k, v in params.items() if k != "approx"},
        **{k: info[k] for k in ("rounds_run", "mean_bound_round", "n_reached_bound", "rounds_to_all_stopped", "initial") if k in info},
    }
    if unit.defense == U.OUR_DEFENSE and unit.experiment == "fig4":
        ctx.store.save_tensors(f"adv/fig4/{unit.attack}/{_slug(unit.defense)}/s{unit.shard}", {"adversarial": adv.cpu(), "ids": list(ids)})
    return recs, summary


def _run_fig4(ctx: RunContext, unit: U.Unit):
    p = ctx.preset
    return _protocol_attack(ctx, unit, rounds=p.bpda_rounds, max_rounds=p.bpda_max_rounds, eot=p.eot)


def _run_table6(ctx: RunContext, unit: U.Unit):
    p = ctx.preset
    return _protocol_attack(ctx, unit, rounds=p.table6_rounds, max_rounds=p.table6_rounds, eot=p.eot)


# ---------------------------------------------------------------------------------------------
# Section 6.4: learned BPDA
# ---------------------------------------------------------------------------------------------
def _learned_module():
    return importlib.import_module("prepdefense.attacks.learned_bpda")


def approximator(ctx: RunContext, defense_name: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """The Section 6.4 approximator of ``defense_name`` (trained once, cached atomically).

    Training images: a seeded subset of the image source, disjoint from the protocol sample
    (their ids are recorded beside the weights).
    """
    lb = _learned_module()
    path = ctx.store.cache_dir / "learned" / f"{_slug(defense_name)}-approximator.pt"
    if path.is_file():
        try:
            net = lb.load_approximator(path, map_location=ctx.device)
            return net.eval(), dict(getattr(net, "metadata", {}) or {})
        except Exception:  # noqa: BLE001 - an unreadable cache entry is retrained
            pass
    defense = ctx.defense(defense_name)
    ds = ctx.dataset()
    taken = set(ctx.sample.ids)
    g = seeding.make_generator(U.unit_seed(ctx.seed, "learned-train-images"))
    order = [i for i in torch.randperm(len(ds), generator=g).tolist() if ds.entries[i].id not in taken]
    if not order:
        raise PrepDefenseError("no image left to train the approximator on (every image is in the evaluation sample)")
    x_train, _, train_ids = ctx.load_indices(order[: ctx.preset.learned_train_images])
    assert not (set(train_ids) & taken), "training images must be disjoint from the evaluation sample"
    p = ctx.preset
    unit_id = U.Unit("learned", defense_name, "train", 0).id
    t0 = time.perf_counter()

    net, history = lb.train_approximator(
        defense, x_train, steps=p.learned_steps, batch_size=p.learned_batch, patch_size=p.learned_patch,
        generator=ctx.generator(unit_id), device=ctx.device,
    )
    losses = [h["loss"] for h in history]
    info = {
        "defense": defense_name,
        "train_images": len(train_ids),
        "train_ids_first": train_ids[:5],
        "disjoint_from_sample": True,
        "steps": p.learned_steps,
        "batch_size": p.learned_batch,
        "patch_size": p.learned_patch,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "seed": U.unit_seed(ctx.seed, unit_id),
    }
    lb.save_approximator(path, net, {**info, "train_ids": train_ids})
    return net.to(ctx.device).eval(), info


def _run_learned(ctx: RunContext, unit: U.Unit):
    if unit.attack == "train":
        _, info = approximator(ctx, unit.defense)
        return [], {"train": to_jsonable({k: v for k, v in info.items() if k != "train_ids"})}
    lb = _learned_module()
    net, train_info = approximator(ctx, unit.defense)
    for p_ in net.parameters():
        p_.requires_grad_(False)
    x, labels, targets, ids = ctx.shard(unit.shard)
    defense = ctx.defense(unit.defense)
    quality = lb.evaluate_approximator(net, defense, x, ctx.generator(unit.id, "quality"))
    recs, summary = _protocol_attack(ctx, U.Unit(unit.experiment, unit.defense, "bpda", unit.shard),
                                     rounds=ctx.preset.learned_rounds, max_rounds=ctx.preset.learned_rounds, eot=1, approx=net)
    summary["approximator"] = to_jsonable(quality)
    summary["train"] = to_jsonable({k: v for k, v in train_info.items() if k != "train_ids"})
    summary["n"] = len(ids)
    return recs, summary


# ---------------------------------------------------------------------------------------------
# strong adaptive attack
# ---------------------------------------------------------------------------------------------
def _adaptive_params(ctx: RunContext, norm: str) -> Dict[str, Any]:
    p = ctx.preset
    return {"norm": norm, "steps": p.adaptive_steps, "eot": p.adaptive_eot, "draws": p.adaptive_draws, "losses": tuple(p.adaptive_losses)}


def _run_strong(ctx: RunContext, unit: U.Unit):
    norm = unit.params["norm"]
    x, labels, targets, ids = ctx.shard(unit.shard)
    model = ctx.defended(unit.defense)
    params = _adaptive_params(ctx, norm)
    if unit.attack == "diagnostics":
        from ..attacks.diagnostics import format_diagnostics, run_diagnostics

        attack = _attack("adaptive", **params)
        d = run_diagnostics(attack, model, ctx.classifier, x, labels=labels, targets=None, generator=ctx.generator(unit.id),
                            n=len(ids), gradient_draws=max(2, ctx.preset.adaptive_eot * 2))
        return [], {"diagnostics": to_jsonable(d), "text": format_diagnostics(d), "params": params}
    attack = _attack("adaptive", **_with_progress(params, "adaptive", ctx.progress_hook))
    res = attack(model, x, labels=labels, targets=None, generator=ctx.generator(unit.id))
    adv = res.adversarial.detach()
    info = res.info or {}
    frac = info.get("per_image_correct_fraction")
    if frac is None or len(frac) != len(ids):
        # The attack did not judge on fresh draws itself: do it here.
        preds = predict_draws(model, adv, draws=ctx.preset.adaptive_draws, generator=ctx.generator(unit.id, "verdict"))
        frac = (preds == labels.cpu()).float().mean(0).tolist()
        draws = int(preds.shape[0])
    else:
        draws = int(info.get("draws", ctx.preset.adaptive_draws))
    dist = (l2_rms(adv, x) if norm == "l2" else linf(adv, x)).cpu()
    recs = []
    for i, image_id in enumerate(ids):
        recs.append({
            "image_id": image_id,
            "label": int(labels[i]),
            "correct_fraction": float(frac[i]),
            "robust_worst": bool(float(frac[i]) >= 1.0 - 1e-9),
            "distance": float(dist[i]),
            "l2": float(l2_rms(adv[i : i + 1], x[i : i + 1])),
            "linf": float(linf(adv[i : i + 1], x[i : i + 1])),
            "draws": draws,
        })
    summary = {"params": params, "info": {k: v for k, v in to_jsonable(info).items() if not (isinstance(v, list) and len(v) == len(ids))}}
    if unit.defense == U.OUR_DEFENSE:
        ctx.store.save_tensors(f"adv/strong/{_slug(unit.defense)}/{norm}/s{unit.shard}", {"adversarial": adv.cpu(), "ids": list(ids)})
    return recs, summary


RUNNERS: Dict[str, Callable[[RunContext, U.Unit], Tuple[List[Dict[str, Any]], Dict[str, Any]]]] = {
    "table1": _run_table1,
    "table2": _run_table2,
    "table3": _run_table3,
    "table4": _run_table4,
    "fig4": _run_fig4,
    "table6": _run_table6,
    "learned": _run_learned,
    "strong": _run_strong,
}


def run_unit(ctx: RunContext, unit: U.Unit) -> Dict[str, Any]:
    """Run one unit and store it (status "ok", or "error" with the reason); returns a summary."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    try:
        records, summary = RUNNERS[unit.experiment](ctx, unit)
        status, error, tb = "ok", None, None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - a missing or failing piece must not stop the run
        records, summary = [], {}
        status, error = "error", f"{type(e).__name__}: {e}".strip()
        tb = traceback.format_exc(limit=8)
    seconds = time.perf_counter() - t0
    if tb:
        summary = {"traceback": tb}
    summary = {**summary, "cpu_seconds": round(time.process_time() - c0, 3)}
    ctx.store.write_unit(unit.experiment, unit.id, key=unit.key, records=records, summary=summary, status=status, error=error, seconds=seconds)
    return {"status": status, "error": error, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# progress: one overall bar, one per experiment (or plain log lines)
# ---------------------------------------------------------------------------------------------
class Progress:
    """tqdm bars on a terminal (overall + current experiment, in estimated work units, so the
    ETA accounts for the cost of each unit); plain log lines with ``quiet`` or off a TTY."""

    def __init__(self, total_cost: float, total_units: int, *, quiet: bool, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.bars = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total_units = total_units
        self.done_units = 0
        self.overall = None
        self.current = None
        self._unit_cost = 0.0
        self._unit_frac = 0.0
        if self.bars:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self.overall = tqdm(total=max(total_cost, 1e-9), desc="reproduce", position=0, file=self.stream,
                                dynamic_ncols=True, bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]{postfix}")
            self.overall.set_postfix_str(f"0/{total_units} units")

    def log(self, msg: str) -> None:
        if self.bars:
            self._tqdm.write(msg, file=self.stream)
        else:
            print(f"[{now_iso()}] {msg}", file=self.stream, flush=True)

    def start_experiment(self, experiment: str, n_units: int, cost: float) -> None:
        if self.bars:
            self.current = self._tqdm(total=max(cost, 1e-9), desc=f"  {experiment}", position=1, leave=False, file=self.stream,
                                      dynamic_ncols=True, bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]")
        self.log(f"{experiment}: {n_units} unit(s) to run ({U.EXPERIMENT_TITLES.get(experiment, '')})")

    def start_unit(self, unit: U.Unit) -> None:
        self._unit_cost = unit.cost
        self._unit_frac = 0.0

    def unit_fraction(self, fraction: float) -> None:
        """Intra-unit progress reported by an attack (0..1)."""
        fraction = max(self._unit_frac, min(1.0, fraction))
        delta = (fraction - self._unit_frac) * self._unit_cost
        self._unit_frac = fraction
        if self.bars and delta > 0:
            self.current.update(delta)
            self.overall.update(delta)

    def end_unit(self, unit: U.Unit, status: str, seconds: float, error: Optional[str]) -> None:
        self.unit_fraction(1.0)
        self.done_units += 1
        if self.bars:
            self.overall.set_postfix_str(f"{self.done_units}/{self.total_units} units")
        msg = f"[{self.done_units}/{self.total_units}] {unit.id}: {status} in {seconds:.1f}s"
        if error:
            msg += f" ({error.splitlines()[0][:200]})"
        if status != "ok" or not self.bars:
            self.log(msg)

    def end_experiment(self, experiment: str) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def close(self) -> None:
        if self.overall is not None:
            self.overall.close()


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def _identity(config: ReproduceConfig, preset: U.Preset, data_id: str) -> Dict[str, Any]:
    return {"data": data_id, "model": config.model, "weights": config.weights, "seed": int(config.seed),
            "preset": preset.name, "preset_sizes": preset.as_dict()}


def _data_id(data: Any) -> str:
    if isinstance(data, (str, Path)) and str(data) != "builtin":
        return str(Path(data).expanduser().resolve())
    return str(data)


def _tensor_digest(x: torch.Tensor, ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update("|".join(ids).encode())
    return h.hexdigest()[:16]


def _load_or_draw_sample(store: ResultStore, classifier: nn.Module, data: Any, n: int, seed: int, device: torch.device) -> _Sample:
    cached = store.load_tensors("sample")
    if cached is not None and len(cached.get("ids", [])) == n:
        return _Sample(cached["x"], cached["labels"], cached["targets"], cached["ids"], cached.get("info"))
    from ..data import protocol_sample

    s = protocol_sample(classifier, data, n=n, seed=seed, device=device)
    info = {"source": s.source, "tried": s.tried, "correct": s.correct, "skipped": s.skipped, "seed": s.seed}
    store.save_tensors("sample", {"x": s.x.cpu(), "labels": s.labels.cpu(), "targets": s.targets.cpu(), "ids": list(s.ids), "info": info})
    return _Sample(s.x.cpu(), s.labels.cpu(), s.targets.cpu(), s.ids, info)


def reproduce(
    config: ReproduceConfig,
    *,
    classifier: Optional[nn.Module] = None,
    images: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Sequence[str]]] = None,
    stream=None,
) -> ReproduceOutcome:
    """Run (or resume) the evaluation and write the report. See the module docstring.

    Args:
        config: what to run.
        classifier: a ready model (default: ``models.create(config.model)``).
        images: ``(x, labels, targets_or_None, ids)`` to evaluate instead of drawing the
            protocol sample from ``config.data`` (the demo's use); targets are drawn from the
            seed when None.
        stream: where progress and log lines go (default stderr).

    Raises:
        ConfigMismatchError: ``config.out`` holds a run with another configuration.
        StoreLockedError: another run writes into ``config.out``.
    """
    from ..cli.common import resolve_device

    t_start = time.perf_counter()
    started = now_iso()
    preset = U.get_preset(config.preset).with_overrides(**config.overrides) if config.overrides else U.get_preset(config.preset)
    experiments = U.parse_only(config.only)
    device = resolve_device(config.device)
    store = ResultStore(Path(config.out))
    store.lock()
    try:
        if config.fresh:
            store.reset()
        store.open()
        store.clean_temporaries()
        if images is not None:
            x, labels, targets, ids = images
            data_id = f"given images sha256:{_tensor_digest(x, ids)}"
        else:
            data_id = _data_id(config.data)
        identity = _identity(config, preset, data_id)
        run_cfg = {
            "identity": identity,
            "device": str(device),
            "only": list(experiments),
            "quiet": bool(config.quiet),
            "metadata": collect_metadata(device),
        }
        resumed = store.check_or_write_config(run_cfg)
        plan = U.plan(preset, experiments)

        if config.report_only:
            from .report import write_report

            report = write_report(store)
            return ReproduceOutcome(Path(config.out), report, len(plan), 0, 0, 0, time.perf_counter() - t_start, resumed)

        if classifier is None:
            from .. import models

            kw = {"weights": config.weights} if config.weights else {}
            classifier = models.create(config.model, **kw)
        classifier = classifier.to(device).eval()
        for p in classifier.parameters():
            p.requires_grad_(False)

        if images is not None:
            x, labels, targets, ids = images
            if targets is None:
                from ..data import draw_targets

                targets = draw_targets(labels.cpu(), seeding.make_generator(U.unit_seed(config.seed, "given-targets")))
            n = min(preset.n_images, len(ids))
            sample = _Sample(x[:n].cpu(), labels[:n].cpu(), targets[:n].cpu(), list(ids)[:n], {"source": "given images"})
            if preset.n_images != n:
                preset = preset.with_overrides(n_images=n)
                plan = U.plan(preset, experiments)
            data_source = None
        else:
            sample = _load_or_draw_sample(store, classifier, config.data, preset.n_images, config.seed, device)
            data_source = config.data
        store.update_config(sample={**sample.info, "n": len(sample), "first_ids": sample.ids[:5]})
        ctx = RunContext(preset=preset, seed=config.seed, device=device, store=store, classifier=classifier,
                         sample=sample, data_source=data_source, model_name=config.model)

        todo = [u for u in plan if not store.is_done(u.experiment, u.id)]
        already = len(plan) - len(todo)
        progress = Progress(sum(u.cost for u in todo), len(todo), quiet=config.quiet, stream=stream)
        progress.log(
            f"{'resuming' if resumed else 'starting'} {preset.name} run in {config.out}: {len(plan)} units planned, "
            f"{already} already done, {len(todo)} to run on {device}"
        )
        ctx.progress_hook = progress.unit_fraction
        failed = 0
        ran = 0
        try:
            for exp in U.EXPERIMENTS:
                exp_units = [u for u in todo if u.experiment == exp]
                if not exp_units:
                    continue
                progress.start_experiment(exp, len(exp_units), sum(u.cost for u in exp_units))
                for unit in exp_units:
                    progress.start_unit(unit)
                    r = run_unit(ctx, unit)
                    ran += 1
                    failed += r["status"] != "ok"
                    progress.end_unit(unit, r["status"], r["seconds"], r["error"])
                progress.end_experiment(exp)
        finally:
            progress.close()
            store.append_session({"started": started, "ended": now_iso(), "seconds": time.perf_counter() - t_start,
                                  "units_run": ran, "units_failed": failed, "device": str(device), "only": list(experiments)})

        from .plots import sample_strip_figure
        from .report import write_report

        try:
            sample_strip_figure(ctx, store.root / "figures" / "samples.png")
        except Exception as e:  # noqa: BLE001 - the report says the strip is missing and why
            store.update_config(sample_strip_error=f"{type(e).__name__}: {e}")
        report = write_report(store)
        progress.log(f"report written to {report} ({ran} unit(s) run, {failed} failed, {already} reused)")
        return ReproduceOutcome(Path(config.out), report, len(plan), already, ran, failed, time.perf_counter() - t_start, resumed)
    finally:
        store.unlock()


def run_demo_pipeline(
    out: Path,
    *,
    x: torch.Tensor,
    labels: torch.Tensor,
    ids: Sequence[str],
    targets: Optional[torch.Tensor] = None,
    experiments: Sequence[str] = ("fig4",),
    preset: str = "smoke",
    overrides: Optional[Dict[str, Any]] = None,
    classifier: Optional[nn.Module] = None,
    model: str = "efficientnet-lite0",
    device: str = "auto",
    seed: int = 0,
    fresh: bool = True,
    quiet: bool = True,
    stream=None,
) -> ReproduceOutcome:
    """Run a named subset of the evaluation on given images and write ``out/report.md``.

    For ``prepdefense demo``: e.g. ``experiments=("fig4",)`` with
    ``overrides={"fig4_bpda_defenses": (), "fig4_eot_defenses": ("dct-distort",), "bpda_rounds": 5,
    "bpda_max_rounds": 5, "eot": 4}`` gives a short BPDA+EOT attack on each image. Images the
    classifier gets wrong are kept (the caller chooses them). Table 1 and the learned
    approximator need an image source and are not available here.
    """
    ov = dict(overrides or {})
    ov.setdefault("n_images", len(ids))
    ov.setdefault("shard_size", max(1, len(ids)))
    cfg = ReproduceConfig(out=Path(out), data="given", preset=preset, model=model, device=device, seed=seed,
                          fresh=fresh, quiet=quiet, only=list(experiments), overrides=ov)
    return reproduce(cfg, classifier=classifier, images=(x, labels, targets, list(ids)), stream=stream)

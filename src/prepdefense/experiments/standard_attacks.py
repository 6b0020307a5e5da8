"""Tables 2 and 3 (Section 6.5): the standard attacks, on the bare model and then defended.

* ``table2``: each standard attack of the preset (FGSM, I-FGSM, PGD, L-BFGS, C&W, DeepFool;
  ``units.AttackSpec``) on the bare model. Its adversarial examples are cached in
  ``OUT/cache/adv/table2/...`` (computed once, whichever unit needs them first) for Tables 3
  and 4 (``delta_sweep.py``).
* ``table3``: the clean images and those examples through ``Defended(dct-distort)``, judged
  on R fresh draws of the defense.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import AbstractSet, Any, Dict, List

import torch

from . import paper_numbers as P
from .context import RunContext, image_records, make_attack, predict_draws, slug
from .experiment import Experiment, Records, Section
from .reporting import ReportContext, fmt, md_table, mean, write_csv
from .units import OUR_DEFENSE, Preset, Unit

__all__ = ["TABLE2", "TABLE3", "standard_adversarial", "adversarial_cache_name", "inputs_for", "table2_records"]


def plan_table2(preset: Preset, selected: AbstractSet[str]) -> List[Unit]:
    """One unit per standard attack and image shard (the bare model)."""
    return [Unit("table2", "none", spec.label, s, cost=preset.shard_images(s) * spec.cost_per_image)
            for spec in preset.table2_attacks for s in preset.shards()]


def plan_table3(preset: Preset, selected: AbstractSet[str]) -> List[Unit]:
    """One unit per input (clean, then each standard attack's examples) and image shard."""
    return [Unit("table3", OUR_DEFENSE, label, s, cost=preset.shard_images(s) * 0.35 * preset.eval_draws)
            for label in ("clean",) + tuple(a.label for a in preset.table2_attacks) for s in preset.shards()]


def adversarial_cache_name(label: str, shard: int) -> str:
    """The cache entry of the Table 2 examples of attack ``label`` on ``shard``."""
    return f"adv/table2/{slug(label)}/s{shard}"


def standard_adversarial(ctx: RunContext, label: str, shard: int) -> Dict[str, Any]:
    """The Table 2 adversarial examples of attack ``label`` on ``shard`` (computed once, cached).

    The cache entry is written atomically; the attack's draws depend only on the run's seed,
    the Table 2 unit's stream and each image's id (``RunContext.image_key``), so whichever unit
    computes it first gets the same tensors.
    """
    name = adversarial_cache_name(label, shard)
    cached = ctx.store.load_tensors(name)
    if cached is not None:
        return cached
    spec = ctx.preset.attack_spec(label)
    x, labels, targets, ids = ctx.shard(shard)
    attack = make_attack(spec.name, **spec.kwargs)
    table2_unit = Unit("table2", "none", label, shard)
    t0 = time.perf_counter()
    res = attack(ctx.classifier, x, labels=labels, targets=targets if spec.targeted else None, generator=ctx.image_key(table2_unit, ids))
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


def run_table2(ctx: RunContext, unit: Unit) -> Records:
    """The bare model's predictions on the (cached) Table 2 examples of ``unit.attack``."""
    entry = standard_adversarial(ctx, unit.attack, unit.shard)
    x, labels, targets, ids = ctx.shard(unit.shard)
    adv = entry["adversarial"].to(ctx.device)
    preds = predict_draws(ctx.classifier, adv, draws=1, generator=ctx.image_key(unit, ids))
    recs = image_records(ids, labels, targets, preds, x=x, adv=adv, extra={"attack_success": [bool(s) for s in entry["success"]]})
    spec = ctx.preset.attack_spec(unit.attack)
    return recs, {"attack": entry["attack"], "params": spec.kwargs, "targeted": spec.targeted, "attack_seconds": entry["seconds"]}


def inputs_for(ctx: RunContext, label: str, shard: int) -> torch.Tensor:
    """The clean images of ``shard`` (``label == "clean"``) or its Table 2 examples of attack ``label``."""
    x, _, _, _ = ctx.shard(shard)
    if label == "clean":
        return x
    return standard_adversarial(ctx, label, shard)["adversarial"].to(ctx.device)


def run_table3(ctx: RunContext, unit: Unit) -> Records:
    """The clean images or the Table 2 examples through our defense, judged on R fresh draws."""
    x, labels, targets, ids = ctx.shard(unit.shard)
    xa = inputs_for(ctx, unit.attack, unit.shard)
    model = ctx.defended(unit.defense)
    preds = predict_draws(model, xa, draws=ctx.preset.eval_draws, generator=ctx.image_key(unit, ids))
    return image_records(ids, labels, targets, preds, x=x, adv=xa), {"draws": int(preds.shape[0])}


def table2_records(rep: ReportContext) -> Dict[str, List[Dict[str, Any]]]:
    """Table 2 records grouped by attack label."""
    recs = rep.records("table2")
    by = defaultdict(list)
    for r in recs:
        by[r["attack"]].append(r)
    return by


def report_table2(rep: ReportContext) -> str:
    """Table 2: distances, ACC and ASR of each standard attack on the bare model, beside the paper's."""
    by = table2_records(rep)
    specs = rep.spec_notes()
    header = ["Attack", "setting", "Linf (paper)", "Linf (ours)", "l2 (paper)", "l2 (ours)", "ACC (paper)", "ACC (ours)", "ASR (paper)", "ASR (ours)", "n"]
    rows = []
    sample = rep.store.load_tensors("sample")
    n_clean = len(sample.get("ids", [])) if sample else None
    p = P.TABLE2["clean"]
    rows.append(["Clean", "-", fmt(p[0], 3), "0.000", fmt(p[1], 4), "0.0000", fmt(p[2]), "1.00" if n_clean else "-", "Nan", "Nan", n_clean or "-"])
    for label in [a["label"] for a in rep.preset.get("table2_attacks", [])]:
        rs = by.get(label, [])
        spec = specs.get(label, {})
        setting = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(spec.get("params", {}).items()))
        if spec.get("paper"):
            setting += f" (paper: {spec['paper']})"
        if not spec.get("targeted", True):
            setting += "; untargeted (ASR = fooled rate)"
        p = P.TABLE2.get(label, (None, None, None, None))
        asr = mean((not r["correct"]) if not spec.get("targeted", True) else r["success"] for r in rs)
        rows.append([label, setting, fmt(p[0], 3), fmt(mean(r.get("linf") for r in rs), 3), fmt(p[1], 4), fmt(mean(r.get("l2") for r in rs), 4),
                     fmt(p[2]), fmt(mean(float(r["correct"]) for r in rs)), fmt(p[3]) if p[2] is not None else "-", fmt(asr), len(rs)])
    write_csv(rep.tables / "table2.csv", header, rows)
    text = [
        "## Table 2: standard attacks on the bare model",
        "",
        "Targeted attacks (target drawn uniformly among the other 999 classes) generated on the undefended model; "
        "Linf and l2 are the mean distances of the returned images (l2 = RMS, the paper's normalised l2). "
        "The paper's PGD rows come from its Table 3 and DeepFool is not in the paper.",
        "",
        md_table(header, rows),
    ]
    return rep.with_availability(text, "table2")


def report_table3(rep: ReportContext) -> str:
    """Table 3: the Table 2 examples bare and through our defense, beside the paper's."""
    recs = rep.records("table3")
    by = defaultdict(list)
    for r in recs:
        by[r["attack"]].append(r)
    bare = table2_records(rep)
    specs = rep.spec_notes()
    header = ["Attack", "l2 (paper)", "l2 (ours)", "no defense ACC (paper)", "no defense ACC (ours)", "no defense ASR (paper)",
              "no defense ASR (ours)", "our defense ACC (paper)", "our defense ACC (ours)", "our defense ASR (paper)", "our defense ASR (ours)", "n"]
    rows = []
    labels = ["clean"] + [a["label"] for a in rep.preset.get("table2_attacks", [])]
    for label in labels:
        rs = by.get(label, [])
        b = bare.get(label, [])
        p = P.TABLE3.get(label, (None, None, None, None, None))
        untargeted = not specs.get(label, {}).get("targeted", True)
        b_acc = 1.0 if label == "clean" and rs else mean(float(r["correct"]) for r in b)
        b_asr = None if label == "clean" else mean((not r["correct"]) if untargeted else r["success"] for r in b)
        acc = mean(r["correct_rate"] for r in rs)
        asr = None if label == "clean" else mean((1 - r["correct_rate"]) if untargeted else r["success_rate"] for r in rs)
        rows.append(["No attack" if label == "clean" else label, fmt(p[0], 3), fmt(mean(r.get("l2") for r in rs), 4) if label != "clean" else "0.0",
                     fmt(p[1]), fmt(b_acc), fmt(p[2]) if label != "clean" else "Nan", fmt(b_asr) if label != "clean" else "Nan",
                     fmt(p[3]), fmt(acc), fmt(p[4]) if label != "clean" else "Nan", fmt(asr) if label != "clean" else "Nan", len(rs)])
    write_csv(rep.tables / "table3.csv", header, rows)
    text = [
        "## Table 3: the same adversarial examples against our defense",
        "",
        f"The Table 2 examples (made on the bare model) fed to `Defended({OUR_DEFENSE})`; our ACC/ASR are expected values "
        f"over {rep.preset.get('eval_draws', '?')} draws of the defense. The paper's \"I-FGSM\" row is set beside our I-FGSM eps=0.03 "
        "(same l2, 0.010); the paper has no FGSM or DeepFool row here.",
        "",
        md_table(header, rows),
    ]
    return rep.with_availability(text, "table3")


TABLE2 = Experiment(name="table2", title="Table 2: standard attacks on the bare model", plan=plan_table2, run=run_table2,
                    sections=(Section(30, report_table2),))

TABLE3 = Experiment(name="table3", title="Table 3: the same adversarial examples against our defense", plan=plan_table3, run=run_table3,
                    sections=(Section(40, report_table3),))

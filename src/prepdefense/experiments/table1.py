"""Table 1 (Section 5.4): how random each defense is.

Two independent defended outputs per image: their normalised l2 and SSIM, and the defended
model's top-1 accuracy on those clean images (``randomness.measure_randomness``). Images: a
seeded random subset of the whole image source, any label, like the paper's 1000 random
ImageNet images.
"""

from __future__ import annotations

from collections import defaultdict
from typing import AbstractSet, List

import torch

from .. import seeding
from . import paper_numbers as P
from .context import RunContext
from .experiment import Experiment, Records, Section
from .randomness import measure_randomness
from .reporting import ReportContext, defense_label, fmt, md_table, mean, write_csv
from .units import ALL_BASELINES, OUR_DEFENSE, Preset, Unit, n_shards, shard_len, shard_slice, unit_seed

__all__ = ["EXPERIMENT", "plan", "run", "report_table1", "table1_indices"]


def plan(preset: Preset, selected: AbstractSet[str]) -> List[Unit]:
    """One unit per defense and shard of the Table 1 images."""
    size, n, r = preset.shard_size, preset.table1_images, preset.eval_draws
    return [Unit("table1", d, "clean", s, cost=shard_len(s, size, n) * (2 + 0.35 * r))
            for d in (OUR_DEFENSE,) + ALL_BASELINES for s in range(n_shards(n, size))]


def table1_indices(ctx: RunContext) -> List[int]:
    """Table 1 images: a seeded random subset of the source (any label, like the paper's)."""
    ds = ctx.dataset()
    g = seeding.make_generator(unit_seed(ctx.seed, "table1-images"))
    order = torch.randperm(len(ds), generator=g).tolist()
    return order[: ctx.preset.table1_images]


def run(ctx: RunContext, unit: Unit) -> Records:
    """One shard of the Table 1 images: per image, the l2/SSIM of two defended outputs and the defended prediction."""
    idx_all = table1_indices(ctx)
    sl = shard_slice(unit.shard, ctx.preset.shard_size, len(idx_all))
    x, labels, ids = ctx.load_indices(idx_all[sl])
    defense = ctx.defense(unit.defense)
    records = []
    for i, image_id in enumerate(ids):
        # One image per call so that every record carries its own l2 / SSIM / correctness, with
        # a generator of its own (the run's seed, the unit without its shard, the image's id):
        # an image's draws do not depend on the shard or on the images before it.
        g = seeding.make_generator(unit_seed(ctx.seed, f"{unit.stream}#image={image_id}"))
        m = measure_randomness(defense, ctx.classifier, [(x[i : i + 1], labels[i : i + 1])], g, device=ctx.device)
        records.append({"image_id": image_id, "label": int(labels[i]), "l2": m["l2"], "ssim": m["ssim"], "correct": bool(m["accuracy"] == 1.0)})
        ctx.progress_hook((i + 1) / len(ids))
    return records, {"n": len(records), "randomized": bool(getattr(defense, "randomized", False))}


def report_table1(rep: ReportContext) -> str:
    """Table 1: our l2, SSIM and ACC per defense beside the paper's."""
    recs = rep.records("table1")
    by = defaultdict(list)
    for r in recs:
        by[r["defense"]].append(r)
    header = ["Defense", "l2 (paper)", "l2 (ours)", "SSIM (paper)", "SSIM (ours)", "ACC (paper)", "ACC (ours)", "n"]
    rows = []
    order = [OUR_DEFENSE, "rand", "fd", "shield", "tv", "bdr", "pd", "jpeg"]
    for d in order + sorted(set(by) - set(order)):
        if d not in by and d not in P.TABLE1:
            continue
        rs = by.get(d, [])
        paper = P.TABLE1.get(d, (None, None, None))
        rows.append([defense_label(d), fmt(paper[0]), fmt(mean(r["l2"] for r in rs), 3), fmt(paper[1]), fmt(mean(r["ssim"] for r in rs), 3),
                     fmt(paper[2]), fmt(mean(float(r["correct"]) for r in rs)), len(rs)])
    write_csv(rep.tables / "table1.csv", header, rows)
    n = rep.preset.get("table1_images", "?")
    text = [
        "## Table 1: randomness of the defenses",
        "",
        f"Two independent outputs of each defense on the same image: normalised l2 and SSIM between them (mean over "
        f"{n} images drawn at random from the source, any label; paper: 1000 images), and the defended model's "
        "top-1 accuracy on those clean images (one draw).",
        "",
        md_table(header, rows),
    ]
    return rep.with_availability(text, "table1")


EXPERIMENT = Experiment(name="table1", title="Table 1: randomness of the defenses", plan=plan, run=run,
                        sections=(Section(10, report_table1),))

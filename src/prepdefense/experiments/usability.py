"""Usability: the clean accuracy a defense costs (paper Section 5.4, Table 1's ACC column and
Table 4's clean row; issue 15, item 2).

The paper's first property of a defense is that it keeps the model's accuracy on clean
images. Here it is measured on ``preset.usability_images`` protocol images (images the bare
model classifies correctly, PROTOCOL.md "Images"): a seeded random order of the whole image
source, kept while the bare model is right, so the bare model scores 1.00 and every point
lost at the model's resolution is the defense's (for the rows defended at 299 px, a control row
runs the same read-at-299-and-resize pipeline without a defense). Each configuration is judged on ``preset.usability_draws`` independent
draws (one for a deterministic defense); the report gives the mean accuracy over draws and
the spread (lowest and highest draw), beside the paper's figure.

Configurations: every defense with its default parameters, the paper's defense and Step 1
with the shipped learned table and with the FD table, the paper's defense with every other
shipped table (an earlier learned one, selectable by its name), the paper's defense defended at 299
px and resized to the model's input (``Defended(..., defend_at=299)``: the paper's own
working resolution) with both tables, and Table 4's delta sweep. The report names the table
the default resolves to (its metadata), so the figure can be traced to the table that made it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, AbstractSet, Dict, List, Optional, Sequence, Tuple

import torch

from .. import seeding
from ..defenses.quant_tables import shipped_tables
from ..draws import DrawKey, image_id
from ..errors import DataError
from . import paper_numbers as P
from .context import RunContext, predict_draws
from .experiment import Experiment, Records, Section
from .reporting import ReportContext, fmt, md_table, write_csv
from .units import ALL_BASELINES, OUR_DEFENSE, Preset, Unit, ensemble_size, n_shards, shard_len, shard_slice, unit_seed

__all__ = ["EXPERIMENT", "Config", "configs", "plan", "run", "report_usability", "usability_indices", "usability_sample",
           "PAPER_SIDE"]

#: The paper's working resolution (Inception V3's input).
PAPER_SIDE = 299
#: Images per unit of this experiment.
SHARD_IMAGES = 50


@dataclass(frozen=True)
class Config:
    """One configuration: a defense, its parameters, and the side it is defended at."""

    key: str  # the unit's variant and the report's row key (no '=', ',' or '/')
    label: str
    defense: str
    params: Dict[str, Any] = field(default_factory=dict)
    defend_at: Optional[int] = None
    paper_acc: Optional[float] = None
    group: str = "defenses"


def configs(deltas: Sequence[float]) -> List[Config]:
    """Every configuration the experiment measures, in report order (``deltas``: Table 4's
    sweep, the preset's ``deltas``)."""
    t1 = {d: acc for d, (_, _, acc) in P.TABLE1.items()}
    out = [
        Config("none", "none (bare model)", "none"),
        Config(f"none@at{PAPER_SIDE}", f"none, read at {PAPER_SIDE} and resized (control for the rows defended at {PAPER_SIDE})",
               "none", defend_at=PAPER_SIDE),
        Config("dct-distort", "dct-distort, default table", OUR_DEFENSE, paper_acc=t1.get(OUR_DEFENSE)),
        Config("dct-distort@fd", "dct-distort, FD table", OUR_DEFENSE, {"table": "fd"}),
        # every other shipped table (an earlier learned one, kept selectable by its name)
        *(Config(f"dct-distort@{name}", f"dct-distort, shipped table {name}", OUR_DEFENSE, {"table": name})
          for name in shipped_tables() if name != "learned"),
        Config(f"dct-distort@at{PAPER_SIDE}", f"dct-distort, default table, defended at {PAPER_SIDE}", OUR_DEFENSE,
               defend_at=PAPER_SIDE, paper_acc=t1.get(OUR_DEFENSE)),
        Config(f"dct-distort@fd@at{PAPER_SIDE}", f"dct-distort, FD table, defended at {PAPER_SIDE}", OUR_DEFENSE,
               {"table": "fd"}, defend_at=PAPER_SIDE),
        Config("dct-quant", "dct-quant (Step 1), default table", "dct-quant"),
        Config("grid-distort", "grid-distort (Step 2)", "grid-distort"),
    ]
    out += [Config(d, d, d, paper_acc=t1.get(d)) for d in ALL_BASELINES + ("crop",)]
    clean_row = dict(zip(P.TABLE4_DELTAS, (acc for acc, _ in P.TABLE4["clean"])))
    out += [Config(f"dct-distort@delta{delta:g}", f"dct-distort, delta {delta:g}", OUR_DEFENSE, {"delta": float(delta)},
                   paper_acc=clean_row.get(delta), group="delta") for delta in deltas]
    return out


def _config(preset: Preset, key: str) -> Config:
    for c in configs(preset.deltas):
        if c.key == key:
            return c
    raise KeyError(f"unknown usability configuration {key!r}")


def plan(preset: Preset, selected: AbstractSet[str]) -> List[Unit]:
    """One unit per configuration and shard of ``SHARD_IMAGES`` images."""
    n = preset.usability_images
    if n <= 0:
        return []
    return [Unit("usability", c.defense, "clean", s, variant=c.key,
                 cost=shard_len(s, SHARD_IMAGES, n) * preset.usability_draws * ensemble_size(preset, c.defense)
                 * (3 if c.defense == "tv" else 1) * 0.35)
            for c in configs(preset.deltas) for s in range(n_shards(n, SHARD_IMAGES))]


def usability_indices(ctx: RunContext) -> List[int]:
    """The first ``usability_images`` images of a seeded random order of the image source that
    the bare model classifies correctly (:func:`usability_sample`; once per run context)."""
    cache = ctx.cache.get("usability_indices")
    if cache is None:
        cache = ctx.cache["usability_indices"] = usability_sample(ctx.classifier, ctx.dataset(), seed=ctx.seed,
                                                                  n=ctx.preset.usability_images, device=ctx.device)
    return cache


def usability_sample(classifier: torch.nn.Module, dataset, *, seed: int, n: int, device="cpu") -> List[int]:
    """Indices into ``dataset`` of the usability images: the first ``n`` of a random order
    (seeded by ``seed``) that ``classifier`` classifies correctly; unreadable images are skipped.
    Deterministic, so ``learn-table`` can keep them out of the images it learns from.

    Raises:
        DataError: fewer than ``n`` such images.
    """
    from ..data import iter_batches

    order = torch.randperm(len(dataset), generator=seeding.make_generator(unit_seed(seed, "usability-images"))).tolist()
    kept: List[int] = []
    start = 0
    while start < len(order) and len(kept) < n:
        step = max(8, min(64, 2 * (n - len(kept))))  # about twice what is still missing
        chunk = order[start : start + step]
        start += step
        index_of = {dataset.ids[i]: i for i in chunk}
        for x, labels, ids in iter_batches(dataset, 64, indices=chunk):  # unreadable images are skipped
            with torch.no_grad():
                right = classifier(x.to(device)).argmax(1).cpu().eq(labels).tolist()
            kept += [index_of[name] for name, ok in zip(ids, right) if ok]
    if len(kept) < n:
        raise DataError(f"usability needs {n} images the bare model classifies correctly; the image source has only "
                        f"{len(kept)} of {len(order)} (ask for fewer, or give a larger folder)")
    return kept[:n]


def run(ctx: RunContext, unit: Unit) -> Records:
    """One configuration on one shard: per image, the prediction under each draw."""
    cfg = _config(ctx.preset, unit.variant)
    indices = usability_indices(ctx)
    sl = shard_slice(unit.shard, SHARD_IMAGES, len(indices))
    x, labels, ids = ctx.load_indices(indices[sl], size=cfg.defend_at)
    if cfg.defense == "none" and cfg.defend_at is None:
        model = ctx.classifier
    else:
        from ..defenses import Defended

        model = Defended(ctx.defense(cfg.defense, **cfg.params), ctx.classifier, defend_at=cfg.defend_at).eval()
    key = DrawKey(unit_seed(ctx.seed, unit.stream), [image_id(i) for i in ids])
    preds = predict_draws(model, x.to(ctx.device), draws=ctx.preset.usability_draws, generator=key)  # (R, N)
    correct = preds.eq(labels.view(1, -1)).t().tolist()  # (N, R)
    records = [{"image_id": i, "label": int(lab), "correct": c} for i, lab, c in zip(ids, labels.tolist(), correct)]
    source = getattr(getattr(model, "defense", None), "table_source", None)
    ctx.progress_hook(1.0)
    return records, {"n": len(records), "draws": preds.shape[0], "table_source": source, "defend_at": cfg.defend_at}


def _accuracies(records: List[Dict[str, Any]]) -> Tuple[float, float, float, int]:
    """Mean accuracy over draws, lowest and highest draw's accuracy, images."""
    draws = min(len(r["correct"]) for r in records)
    per_draw = [sum(bool(r["correct"][k]) for r in records) / len(records) for k in range(draws)]
    return sum(per_draw) / draws, min(per_draw), max(per_draw), len(records)


def report_usability(rep: ReportContext) -> str:
    """The usability table (and its CSV), beside the paper's accuracy."""
    recs = rep.records("usability")
    by = defaultdict(list)
    for r in recs:
        by[r["variant"]].append(r)
    order = configs(tuple(rep.preset.get("deltas", ())))
    sources = {}
    for u in rep.ok_units("usability"):
        sources.setdefault(u.get("key", {}).get("variant"), u.get("summary", {}).get("table_source"))
    header = ["Configuration", "ACC (paper)", "ACC (ours, mean over draws)", "lowest draw", "highest draw", "n", "table"]
    rows = []
    keys = [c.key for c in order] + sorted(set(by) - {c.key for c in order})
    labels = {c.key: (c.label, c.paper_acc) for c in order}
    for k in keys:
        if k not in by:
            continue
        mean_acc, lo, hi, n = _accuracies(by[k])
        label, paper = labels.get(k, (k, None))
        rows.append([label, fmt(paper), fmt(mean_acc, 3), fmt(lo, 3), fmt(hi, 3), n, sources.get(k) or ""])
    write_csv(rep.tables / "usability.csv", header, rows)
    draws = rep.preset.get("usability_draws", "?")
    text = [
        "## Usability: clean accuracy of the defended model",
        "",
        f"Protocol images (the bare model is right on every one, so it scores 1.00), each configuration judged on "
        f"{draws} independent draws where random. The paper's ACC is Table 1's (Inception V3 on 1000 random ImageNet "
        f"images, so its bare model is not at 1.00) and, for the delta rows, Table 4's clean row. 'defended at {PAPER_SIDE}': "
        f"the images are read at {PAPER_SIDE} px, defended there and resized to the model's input; "
        f"the row 'none, read at {PAPER_SIDE} and resized' is the same pipeline without a defense, so the points "
        f"lost there are the resizing's, not the defense's.",
        "",
        md_table(header, rows),
    ]
    return rep.with_availability(text, "usability")


EXPERIMENT = Experiment(name="usability", title="Usability: clean accuracy of every defense and table", plan=plan, run=run,
                        sections=(Section(12, report_usability),), aliases=("clean-accuracy",))

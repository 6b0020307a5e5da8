"""Section 6.4: BPDA through a learned approximation of our defense.

A DenseNet-style convolutional auto-encoder (``attacks.learned_bpda``) is trained once to
map x to g(x) for ``dct-distort`` on images disjoint from the evaluation sample (cached in
``OUT/cache/learned/``), then used as the backward pass of the paper's BPDA attack
(``fig4.protocol_attack``); the report sets its l2/SSIM to g(x) beside the paper's.
"""

from __future__ import annotations

import time
from typing import AbstractSet, Any, Dict, List, Tuple

import torch
from torch import nn

from .. import seeding
from ..errors import PrepDefenseError
from . import paper_numbers as P
from .context import RunContext, slug
from .experiment import Experiment, Records, Section
from .fig4 import protocol_attack
from .reporting import ReportContext, fmt, md_table, mean, write_csv
from .store import to_jsonable
from .units import OUR_DEFENSE, Preset, Unit, unit_seed

__all__ = ["EXPERIMENT", "plan", "run", "approximator", "report_learned"]


def plan(preset: Preset, selected: AbstractSet[str]) -> List[Unit]:
    """The training unit, then one BPDA unit per image shard."""
    patch_frac = 1.0 if not preset.learned_patch else min(1.0, (preset.learned_patch / 224.0) ** 2)
    units = [Unit("learned", OUR_DEFENSE, "train", 0, cost=preset.learned_steps * preset.learned_batch * (0.3 + 1.5 * patch_frac))]
    units += [Unit("learned", OUR_DEFENSE, "bpda-learned", s, cost=preset.shard_images(s) * preset.learned_rounds * 3.0)
              for s in preset.shards()]
    return units


def approximator(ctx: RunContext, defense_name: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """The Section 6.4 approximator of ``defense_name`` (trained once, cached atomically).

    Training images: a seeded subset of the image source, disjoint from the protocol sample
    (their ids are recorded beside the weights).
    """
    from ..attacks import learned_bpda as lb

    path = ctx.store.cache_dir / "learned" / f"{slug(defense_name)}-approximator.pt"
    if path.is_file():
        try:
            net = lb.load_approximator(path, map_location=ctx.device)
            return net.eval(), dict(getattr(net, "metadata", {}) or {})
        except Exception:  # noqa: BLE001 - an unreadable cache entry is retrained
            pass
    defense = ctx.defense(defense_name)
    ds = ctx.dataset()
    taken = set(ctx.sample.ids)
    g = seeding.make_generator(unit_seed(ctx.seed, "learned-train-images"))
    order = [i for i in torch.randperm(len(ds), generator=g).tolist() if ds.entries[i].id not in taken]
    if not order:
        raise PrepDefenseError("no image left to train the approximator on (every image is in the evaluation sample)")
    x_train, _, train_ids = ctx.load_indices(order[: ctx.preset.learned_train_images])
    assert not (set(train_ids) & taken), "training images must be disjoint from the evaluation sample"
    p = ctx.preset
    unit_id = Unit("learned", defense_name, "train", 0).id
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
        "seed": unit_seed(ctx.seed, unit_id),
    }
    lb.save_approximator(path, net, {**info, "train_ids": train_ids})
    return net.to(ctx.device).eval(), info


def run(ctx: RunContext, unit: Unit) -> Records:
    """``train``: train (or reload) the approximator; ``bpda-learned``: its quality against g(x) and BPDA through it."""
    if unit.attack == "train":
        _, info = approximator(ctx, unit.defense)
        return [], {"train": to_jsonable({k: v for k, v in info.items() if k != "train_ids"})}
    from ..attacks import learned_bpda as lb

    net, train_info = approximator(ctx, unit.defense)
    for p_ in net.parameters():
        p_.requires_grad_(False)
    x, labels, targets, ids = ctx.shard(unit.shard)
    defense = ctx.defense(unit.defense)
    quality = lb.evaluate_approximator(net, defense, x, ctx.generator(unit.id, "quality"))
    recs, summary = protocol_attack(ctx, Unit(unit.experiment, unit.defense, "bpda", unit.shard),
                                    rounds=ctx.preset.learned_rounds, max_rounds=ctx.preset.learned_rounds, eot=1, approx=net)
    summary["approximator"] = to_jsonable(quality)
    summary["train"] = to_jsonable({k: v for k, v in train_info.items() if k != "train_ids"})
    summary["n"] = len(ids)
    return recs, summary


def report_learned(rep: ReportContext) -> str:
    """Section 6.4: the approximator's l2/SSIM to g(x) and the ASR of BPDA through it, beside the paper's."""
    recs = rep.records("learned")
    units = rep.ok_units("learned")
    train = next((u["summary"].get("train") for u in units if u["key"]["attack"] == "train"), None)
    evals = [u["summary"] for u in units if u["key"]["attack"] != "train"]

    def weighted(key):
        pairs = [(s["approximator"].get(key), s["approximator"].get("n", s.get("n", 1))) for s in evals if s.get("approximator")]
        pairs = [(v, n) for v, n in pairs if v is not None and n]
        return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs else None

    acc = mean(float(r.get("protocol_correct", r.get("correct"))) for r in recs)
    asr = mean(float(r.get("protocol_success", r.get("success"))) for r in recs)
    header = ["Quantity", "paper", "ours"]
    rows = [
        ["approximator l2 to g(x)", fmt(P.SECTION_6_4["l2"]), fmt(weighted("l2"), 3)],
        ["approximator SSIM to g(x)", fmt(P.SECTION_6_4["ssim"]), fmt(weighted("ssim"), 3)],
        ["identity (x) l2 to g(x), for reference", "-", fmt(weighted("identity_l2"), 3)],
        ["identity (x) SSIM to g(x), for reference", "-", fmt(weighted("identity_ssim"), 3)],
        [f"BPDA through the approximator: ASR after {rep.preset.get('learned_rounds', '?')} rounds", fmt(P.SECTION_6_4["asr"]), fmt(asr)],
        ["BPDA through the approximator: ACC", "-", fmt(acc)],
        ["images", "100", len(recs)],
    ]
    write_csv(rep.tables / "section6_4.csv", header, rows)
    p = rep.preset
    patch = p.get("learned_patch")
    text = ["## Section 6.4: learned BPDA", "",
            f"A DenseNet-style convolutional auto-encoder (6 conv layers) trained to map x to g(x) for `{OUR_DEFENSE}` on "
            f"{p.get('learned_train_images', '?')} images disjoint from the evaluation sample ({p.get('learned_steps', '?')} steps of "
            f"{p.get('learned_batch', '?')} {'random ' + str(patch) + 'x' + str(patch) + ' patches' if patch else 'whole images'}), "
            "then used as the backward pass of the paper's BPDA attack. l2/SSIM compare the network's output with a fresh draw of g(x) "
            "on the evaluation images.", "", md_table(header, rows)]
    if train:
        text += ["", "Training: " + ", ".join(f"{k} {v}" for k, v in train.items() if not isinstance(v, (list, dict)))]
    return rep.with_availability(text, "learned")


EXPERIMENT = Experiment(name="learned", title="Section 6.4: learned BPDA", plan=plan, run=run,
                        sections=(Section(80, report_learned),), aliases=("6.4", "learned-bpda"))

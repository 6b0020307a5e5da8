"""The report's strip of sample images: clean, defended, adversarial, defended adversarial.

Computed here from the run (the first images of the protocol sample and the strongest
adversarial examples of our defense that some experiment cached), drawn by ``plots.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..seeding import make_generator
from . import fig4, standard_attacks, strong
from .context import RunContext
from .plots import image_rows_figure
from .units import OUR_DEFENSE, unit_seed

__all__ = ["adversarial_candidates", "find_adversarial", "sample_strip_figure"]


def _class_name(i: int) -> str:
    try:
        from ..data import imagenet_class_names

        return imagenet_class_names()[int(i)].split(",")[0][:18]
    except Exception:  # noqa: BLE001 - a caption is not worth an error
        return str(int(i))


def adversarial_candidates() -> List[Tuple[str, str]]:
    """(cache entry, what it holds) of the strip's adversarial images, strongest attack first
    (``merge`` reads it to take the strip of the shard that holds the first entry)."""
    return [
        (strong.adversarial_cache_name(OUR_DEFENSE, "l2", 0), "strong attack ensemble (L2 RMS 0.05)"),
        (strong.adversarial_cache_name(OUR_DEFENSE, "linf", 0), "strong attack ensemble (Linf 8/255)"),
        (fig4.adversarial_cache_name("bpda-eot", OUR_DEFENSE, 0), "BPDA+EOT (paper protocol)"),
        (fig4.adversarial_cache_name("bpda", OUR_DEFENSE, 0), "BPDA (paper protocol)"),
        (standard_attacks.adversarial_cache_name("C&W", 0), "C&W on the bare model"),
        (standard_attacks.adversarial_cache_name("PGD-50", 0), "PGD-50 on the bare model"),
    ]


def find_adversarial(ctx: RunContext) -> Tuple[Optional[torch.Tensor], str]:
    """The first cached adversarial batch of shard 0 for our defense (strongest attack first)."""
    candidates = adversarial_candidates()
    for name, what in candidates:
        entry = ctx.store.load_tensors(name)
        if entry is not None and "adversarial" in entry:
            return entry["adversarial"], what
    return None, ""


@torch.no_grad()
def sample_strip_figure(ctx: RunContext, path: Path, *, max_images: int = 4) -> Optional[Path]:
    """Rows of (clean, defended, adversarial, defended adversarial) for the first images of the
    sample, with the defended model's prediction under each; returns None when no
    adversarial example of our defense is cached yet.
    """
    adv, what = find_adversarial(ctx)
    if adv is None:
        return None
    k = min(max_images, adv.shape[0], len(ctx.sample))
    x = ctx.sample.x[:k].to(ctx.device)
    adv = adv[:k].to(ctx.device)
    labels = ctx.sample.labels[:k]
    defense = ctx.defense(OUR_DEFENSE)
    g = make_generator(unit_seed(ctx.seed, "sample-strip"))
    dx = defense(x, generator=g)
    dadv = defense(adv, generator=g)
    pred_clean = ctx.classifier(dx).argmax(1).cpu()
    pred_adv = ctx.classifier(dadv).argmax(1).cpu()
    pred_bare_adv = ctx.classifier(adv).argmax(1).cpu()
    rows = [[x[i], dx[i], adv[i], dadv[i]] for i in range(k)]
    captions = [
        [
            f"true: {_class_name(labels[i])}",
            f"pred: {_class_name(pred_clean[i])}",
            f"bare pred: {_class_name(pred_bare_adv[i])}",
            f"pred: {_class_name(pred_adv[i])}",
        ]
        for i in range(k)
    ]
    cols = ["clean", f"defended ({OUR_DEFENSE})", f"adversarial\n{what}", "defended adversarial"]
    return image_rows_figure(path, rows, captions, column_titles=cols,
                             title=f"first {k} images of the protocol sample; adversarial: {what}")

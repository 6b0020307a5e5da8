"""Table 1 of the paper: how random a defense's output is, and what it costs in accuracy.

Paper Section 6.1 ("Property 3", Table 1) and PROTOCOL.md ("The paper's numbers", Table 1):
for every image, two independent outputs of the defense ``g`` are compared with the
normalised L2 (``metrics.l2_rms``) and SSIM (``metrics.ssim``); the table gives their means
over the images, together with the top-1 accuracy of the defended model ``f(g(x))`` on the
clean images. The paper preprocesses each image 100 times and picks two outputs at random,
which is the same as drawing two independent outputs. A deterministic defense gives l2 0 and
SSIM 1.

:func:`measure_randomness` is pure: its result depends only on its arguments (the generator's
state included), so the reproduction run reuses it.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from .. import metrics
from ..defenses import Defended
from ..seeding import child_seed, make_generator

__all__ = ["measure_randomness"]


def measure_randomness(
    defense: nn.Module,
    model: Optional[nn.Module],
    batches: Iterable[Sequence[Any]],
    generator: torch.Generator,
    *,
    device: Optional[torch.device] = None,
) -> Dict[str, Any]:
    """Mean l2 / SSIM between two independent defended outputs per image, and the accuracy.

    For each batch three sub-generators are drawn from ``generator`` in a fixed order: two for
    the compared outputs A and B, one for the ensemble prediction. The accuracy uses one
    defended draw per image: output A fed to the model, or, for an ensemble defense
    (``ensemble > 1``, Guo et al.'s random crops), :class:`Defended`'s mean softmax over its
    draws. Outputs that change size (``rand``) are compared at their common padded size.

    Args:
        defense: a defense (``forward(x, *, generator)``).
        model: classifier on [0,1] NCHW; None skips the accuracy (reported as None).
        batches: iterable of ``(x, labels, ...)``; x (B, C, H, W) in [0,1], labels (B,).
        generator: CPU generator all randomness derives from.
        device: where to run (default: x's device).

    Returns:
        dict with ``l2``, ``ssim`` (means over images), ``l2_std``, ``ssim_std``,
        ``accuracy`` (fraction, or None without a model) and ``n`` (images).
    """
    l2_all, ssim_all = [], []
    correct = 0
    n = 0
    ensemble = int(getattr(defense, "ensemble", 1))
    defended = Defended(defense, model) if model is not None and ensemble > 1 else None
    with torch.no_grad():
        for batch in batches:
            x, labels = batch[0], batch[1]
            if device is not None:
                x = x.to(device)
            g_a = make_generator(child_seed(generator))
            g_b = make_generator(child_seed(generator))
            g_pred = make_generator(child_seed(generator))
            out_a = defense(x, generator=g_a)
            out_b = defense(x, generator=g_b)
            l2_all.append(metrics.l2_rms(out_a, out_b).double().cpu())
            ssim_all.append(metrics.ssim(out_a, out_b).double().cpu())
            if model is not None:
                logits = defended(x, generator=g_pred) if defended is not None else model(out_a)
                correct += int((logits.argmax(dim=1).cpu() == labels.cpu()).sum())
            n += x.shape[0]
    if n == 0:
        raise ValueError("measure_randomness got no images")
    l2 = torch.cat(l2_all)
    ss = torch.cat(ssim_all)
    return {
        "l2": float(l2.mean()),
        "ssim": float(ss.mean()),
        "l2_std": float(l2.std(unbiased=False)),
        "ssim_std": float(ss.std(unbiased=False)),
        "accuracy": (correct / n) if model is not None else None,
        "n": n,
    }

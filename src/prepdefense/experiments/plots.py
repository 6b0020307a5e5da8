"""Figures of the reproduction report: Fig. 4 curves and a strip of sample images (issue 5, item 3).

Matplotlib with the non-interactive Agg backend; every PNG is written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch

from .store import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .reproduce import RunContext

__all__ = ["plot_curves", "sample_strip_figure", "save_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Render ``fig`` to PNG bytes and write them atomically; closes the figure."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def plot_curves(
    path: Path,
    curves: Dict[str, Sequence[Tuple[int, float]]],
    *,
    title: str,
    ylabel: str,
    paper_points: Optional[Dict[str, Sequence[Tuple[int, float]]]] = None,
    note: str = "",
) -> Path:
    """One panel of Fig. 4: a line per defense (value per round), the paper's quoted points as
    hollow markers of the same colour.

    Args:
        curves: defense -> [(round, value), ...] (round 0 = before the attack).
        paper_points: defense -> [(round, value)] quoted from the paper (Section 6.2-6.3).
        note: a line under the title (e.g. "quick run: 8 images, 10 rounds").
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = {}
    for name, pts in curves.items():
        if not pts:
            continue
        xs, ys = zip(*pts)
        (line,) = ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=name)
        colors[name] = line.get_color()
    for name, pts in (paper_points or {}).items():
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, facecolors="none", edgecolors=colors.get(name, "k"), s=60, linewidths=1.5,
                   label=f"{name} (paper)", zorder=3)
    ax.set_xlabel("attack round")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
    if curves or paper_points:
        ax.legend(fontsize=7, ncol=2, loc="best")
    return save_figure(fig, path)


def _class_name(i: int) -> str:
    try:
        from ..data import imagenet_class_names

        return imagenet_class_names()[int(i)].split(",")[0][:18]
    except Exception:  # noqa: BLE001 - a caption is not worth an error
        return str(int(i))


def _find_adversarial(ctx: "RunContext") -> Tuple[Optional[torch.Tensor], str]:
    """The first cached adversarial batch of shard 0 for our defense (strongest attack first)."""
    from .units import OUR_DEFENSE

    slug = OUR_DEFENSE
    candidates = [
        (f"adv/strong/{slug}/l2/s0", "strong adaptive attack (L2 RMS 0.05)"),
        (f"adv/strong/{slug}/linf/s0", "strong adaptive attack (Linf 8/255)"),
        (f"adv/fig4/bpda-eot/{slug}/s0", "BPDA+EOT (paper protocol)"),
        (f"adv/fig4/bpda/{slug}/s0", "BPDA (paper protocol)"),
        ("adv/table2/c-w/s0", "C&W on the bare model"),
        ("adv/table2/pgd-50/s0", "PGD-50 on the bare model"),
    ]
    for name, what in candidates:
        entry = ctx.store.load_tensors(name)
        if entry is not None and "adversarial" in entry:
            return entry["adversarial"], what
    return None, ""


@torch.no_grad()
def sample_strip_figure(ctx: "RunContext", path: Path, *, max_images: int = 4) -> Optional[Path]:
    """Rows of (clean, defended, adversarial, defended adversarial) for the first images of the
    sample, with the defended model's prediction under each; returns None when no
    adversarial example of our defense is cached yet.
    """
    from ..seeding import make_generator
    from .units import OUR_DEFENSE, unit_seed

    adv, what = _find_adversarial(ctx)
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
    plt = _pyplot()
    fig, axes = plt.subplots(k, 4, figsize=(10, 2.6 * k), squeeze=False)
    cols = ["clean", f"defended ({OUR_DEFENSE})", f"adversarial\n{what}", "defended adversarial"]
    for i in range(k):
        images = [x[i], dx[i], adv[i], dadv[i]]
        captions = [
            f"true: {_class_name(labels[i])}",
            f"pred: {_class_name(pred_clean[i])}",
            f"bare pred: {_class_name(pred_bare_adv[i])}",
            f"pred: {_class_name(pred_adv[i])}",
        ]
        for j in range(4):
            ax = axes[i][j]
            ax.imshow(images[j].clamp(0, 1).permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(captions[j], fontsize=8)
            if i == 0:
                ax.set_title(cols[j], fontsize=9)
    fig.suptitle(f"first {k} images of the protocol sample; adversarial: {what}", fontsize=9)
    return save_figure(fig, path)

"""Figures of the reproduction report and the demo: Fig. 4 curves and grids of images (issue 5, item 3).

Drawing only: the callers compute what is drawn. Matplotlib with the non-interactive Agg
backend; every PNG is written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from .store import atomic_write_bytes

__all__ = ["plot_curves", "plot_accuracy_vs_eps", "image_rows_figure", "save_figure"]


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


def plot_accuracy_vs_eps(
    path: Path,
    points: Sequence[Dict[str, object]],
    *,
    title: str,
    xlabel: str,
    note: str = "",
) -> Path:
    """Robust accuracy against the radius: expected over draws and worst case, each with its
    95% interval as error bars (``prepdefense evaluate``'s curve).

    Args:
        points: ``{"eps", "robust_accuracy_expected", "robust_accuracy_expected_ci95",
            "robust_accuracy_worst", "robust_accuracy_worst_ci95", "source"}`` per radius,
            smallest first.
        xlabel: the radius's unit (e.g. "Linf radius").
        note: a line under the title (which attack gives which point).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    xs = [float(p["eps"]) for p in points]
    for key, label, marker in (("robust_accuracy_expected", "expected over draws", "o"), ("robust_accuracy_worst", "worst case over draws", "s")):
        ys = [float(p[key]) for p in points]
        cis = [_interval(p.get(key + "_ci95"), y) for p, y in zip(points, ys)]
        lo = [max(0.0, y - c[0]) for y, c in zip(ys, cis)]
        hi = [max(0.0, c[1] - y) for y, c in zip(ys, cis)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, capsize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def _interval(ci, value: float) -> Tuple[float, float]:
    """``ci`` as two floats, ``(value, value)`` where it is missing (None or NaN)."""
    try:
        lo, hi = float(ci[0]), float(ci[1])
    except (TypeError, ValueError, IndexError):
        return (value, value)
    return (lo, hi) if lo == lo and hi == hi else (value, value)


def image_rows_figure(
    path: Path,
    rows: Sequence[Sequence[torch.Tensor]],
    captions: Sequence[Sequence[str]],
    *,
    column_titles: Sequence[str],
    title: str,
) -> Path:
    """A grid of images, one row per entry of ``rows`` ((3, H, W) tensors in [0,1]), each with
    its caption below, ``column_titles`` above the first row and ``title`` above the grid."""
    plt = _pyplot()
    k, cols = len(rows), len(column_titles)
    fig, axes = plt.subplots(k, cols, figsize=(2.5 * cols, 2.6 * k), squeeze=False)
    for i in range(k):
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(rows[i][j].clamp(0, 1).permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(captions[i][j], fontsize=8)
            if i == 0:
                ax.set_title(column_titles[j], fontsize=9)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)

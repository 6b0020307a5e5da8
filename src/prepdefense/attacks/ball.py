"""The threat model's ball, shared by APGD, Square, SPSA and transfer: its radius in the
attack's own geometry and the projection onto it.

``eps`` is the Linf radius, or for L2 the paper's normalised (root-mean-square) radius
``||d||_2 / sqrt(C*H*W)`` (PROTOCOL.md, "Conventions"); the Euclidean radius of an L2 ball is
``eps * sqrt(C*H*W)``, worked out from the images' shape.

Shape: images (N, C, H, W) in [0, 1].
"""

from __future__ import annotations

import math

import torch

from ..metrics import PAPER_L2_BOUND, PAPER_LINF_BOUND

__all__ = ["NORMS", "MAX_EPS", "normalize_norm", "radius", "project", "per_image_norm", "default_eps", "check_eps"]

NORMS = ("linf", "l2")
_NORM_ALIASES = {"inf": "linf", "l_inf": "linf", "linfinity": "linf", "2": "l2", "l_2": "l2"}


def normalize_norm(norm: str) -> str:
    """``'linf'`` or ``'l2'`` from the usual spellings; ValueError otherwise."""
    norm = _NORM_ALIASES.get(str(norm).lower(), str(norm).lower())
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
    return norm


def per_image_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    """Per-image Lp norm, shaped (N, 1, 1, 1) for broadcasting."""
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.dim() - 1)))


def default_eps(norm: str) -> float:
    """The paper's bound: 8/255 (Linf) or 0.05 RMS (L2)."""
    return PAPER_LINF_BOUND if normalize_norm(norm) == "linf" else PAPER_L2_BOUND


#: The largest radius that means anything: no two images in [0, 1] are further apart than 1,
#: in Linf or in the RMS unit of L2, so ``eps = 1`` is already an unbounded attack.
MAX_EPS = 1.0


def check_eps(norm: str, eps) -> tuple:
    """``(norm, eps)`` normalised, ``eps`` defaulting to the paper's bound.

    Raises:
        TypeError: ``eps`` not a number.
        ValueError: an unknown norm; ``eps`` not positive, or above :data:`MAX_EPS` (a radius
            in 0..255 units, or a Euclidean L2 radius where the RMS one is meant).
    """
    norm = normalize_norm(norm)
    if eps is None:
        eps = default_eps(norm)
    else:
        try:
            if isinstance(eps, (bool, str, bytes)):
                raise TypeError
            eps = float(eps)
        except (TypeError, ValueError):
            raise TypeError(f"eps (the radius) must be a number, got {type(eps).__name__} {eps!r}") from None
    if not eps > 0:
        raise ValueError(f"eps (the radius) must be a positive number, got {eps}")
    if eps > MAX_EPS:
        unit = "Linf 8/255 = 0.0314" if norm == "linf" else "RMS 0.05, the paper's bound, which is a Euclidean radius of 0.05 * sqrt(C*H*W)"
        raise ValueError(f"eps={eps:g} is larger than any {norm} distance between two images in [0, 1] (at most {MAX_EPS:g}): "
                         f"radii are in the [0, 1] image unit ({unit}); eps={MAX_EPS:g} is already unbounded")
    return norm, eps


def radius(norm: str, eps: float, x: torch.Tensor) -> float:
    """The radius in the attack's own geometry: ``eps`` (Linf) or ``eps * sqrt(C*H*W)`` (L2)."""
    return eps if norm == "linf" else eps * math.sqrt(x[0].numel())


def project(norm: str, x_adv: torch.Tensor, x: torch.Tensor, r: float) -> torch.Tensor:
    """Onto the ball of radius ``r`` (own geometry) around ``x``, then onto the [0, 1] box.
    L2: a perturbation longer than ``r`` is rescaled to length ``r``."""
    d = x_adv - x
    if norm == "linf":
        d = d.clamp(-r, r)
    else:
        n = per_image_norm(d, 2)
        d = d * torch.where(n > r, r / n.clamp_min(1e-30), torch.ones_like(n))
    return (x + d).clamp(0.0, 1.0)

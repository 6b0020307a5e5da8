"""``crop``: Guo et al. 2018's random-crop ensemble ("Countering adversarial images using input
transformations"), a baseline of the paper's Fig. 4.

PROTOCOL.md "Baseline defenses": a random 90 x 90 window of a 299 x 299 image (the side scales
with the input: ``round(90 * S / 299)``, 67 at 224), resized back to the input size with
bilinear interpolation (``align_corners=False``, no antialiasing); the prediction averages the
softmax over an ensemble of 30 crops, which :class:`~prepdefense.defenses.Defended` does from
the ``ensemble`` attribute. The window's top-left corner is uniform over every position that
keeps it inside the image. Crop and resize are linear in the pixels, so autograd passes
gradients through (``differentiable``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import seeding
from ..draws import Params
from ._registry import register
from .base import Defense

__all__ = ["RandomCrop", "crop_side", "crop_and_resize"]

#: Guo et al.'s crop: 90 pixels of a 299-pixel side.
REFERENCE_CROP = 90
REFERENCE_SIDE = 299


def crop_side(side: int, crop_fraction: float = REFERENCE_CROP / REFERENCE_SIDE) -> int:
    """Crop side for an input side: ``round(side * crop_fraction)`` (90 at 299, 67 at 224), >= 1."""
    return max(1, min(side, int(round(side * crop_fraction))))


def crop_and_resize(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, crop_hw) -> torch.Tensor:
    """Cut a ``crop_hw`` window at (``top[n]``, ``left[n]``) from image n and resize it
    bilinearly back to the input size.

    Shape: x (N, C, H, W), top/left (N,) int64 -> (N, C, H, W).
    """
    n, c, h, w = x.shape
    ch, cw = crop_hw
    dev = x.device
    rows = top.to(dev).view(-1, 1) + torch.arange(ch, device=dev).view(1, -1)
    cols = left.to(dev).view(-1, 1) + torch.arange(cw, device=dev).view(1, -1)
    index = (rows.unsqueeze(2) * w + cols.unsqueeze(1)).view(n, 1, ch * cw).expand(n, c, ch * cw)
    crops = x.reshape(n, c, h * w).gather(2, index).view(n, c, ch, cw)
    return F.interpolate(crops, size=(h, w), mode="bilinear", align_corners=False)


class RandomCrop(Defense):
    """Random crop resized back to the input size, averaged over an ensemble (Guo et al. 2018).

    Args:
        side: crop side in pixels (default: ``round(crop_fraction * S)`` per input side S).
        crop_fraction: crop side / image side when ``side`` is None (default 90/299).
        ensemble: number of crops whose softmax :class:`Defended` averages (default 30).

    ``sample_params`` returns :class:`~prepdefense.draws.Params` of (N,) int64 tensors ``top``, ``left``.

    Shape: (N, C, H, W) -> (N, C, H, W).
    """

    randomized = True
    differentiable = True

    def __init__(self, side: Optional[int] = None, crop_fraction: float = REFERENCE_CROP / REFERENCE_SIDE,
                 ensemble: int = 30) -> None:
        super().__init__()
        if side is not None and int(side) < 1:
            raise ValueError(f"crop side must be >= 1, got {side}")
        if not 0.0 < float(crop_fraction) <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        if int(ensemble) < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        self.side = None if side is None else int(side)
        self.crop_fraction = float(crop_fraction)
        self.ensemble = int(ensemble)

    def crop_hw(self, h: int, w: int):
        """(crop height, crop width) for an h x w input."""
        if self.side is not None:
            if self.side > min(h, w):
                raise ValueError(f"crop side {self.side} exceeds the image ({h}x{w})")
            return self.side, self.side
        return crop_side(h, self.crop_fraction), crop_side(w, self.crop_fraction)

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> Params:
        n, _, h, w = x.shape
        ch, cw = self.crop_hw(h, w)
        return Params(
            top=seeding.randint(0, h - ch + 1, (n,), generator),
            left=seeding.randint(0, w - cw + 1, (n,), generator),
        )

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        h, w = x.shape[-2:]
        return crop_and_resize(x, params["top"], params["left"], self.crop_hw(h, w)).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        side = self.side if self.side is not None else f"round({self.crop_fraction:.4f}*S)"
        return f"side={side}, ensemble={self.ensemble}, bilinear"


register("crop", help="Guo et al. 2018: random 90/299 crop resized back, ensemble of 30")(RandomCrop)

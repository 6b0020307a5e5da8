"""Image tensors as PNG files: conversion and side-by-side strips for the demo's figures.

Shared by ``demo.py`` and ``demo_attack.py`` (neither imports the other's helpers).
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["to_pil", "png_bytes", "side_by_side"]


def to_pil(img: torch.Tensor) -> Image.Image:
    """A (3, H, W) [0,1] tensor as an 8-bit RGB image (rounded, clamped)."""
    a = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(a)


def png_bytes(img: Image.Image) -> bytes:
    """``img`` encoded as PNG."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def side_by_side(images: Sequence[torch.Tensor], gap: int = 4) -> Image.Image:
    """Images (3, H_i, W_i) in a row on a white background, top-aligned."""
    pils = [to_pil(t) for t in images]
    height = max(p.height for p in pils)
    width = sum(p.width for p in pils) + gap * (len(pils) - 1)
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for p in pils:
        panel.paste(p, (x, 0))
        x += p.width + gap
    return panel

"""``rand``: random resizing and random padding (Xie et al. 2018, "Mitigating adversarial effects
through randomization"), as used by the paper (Table 1 "Rand", Fig. 4, Table 6).

PROTOCOL.md "Baseline defenses": an S x S image is resized to s x s with ``s`` drawn
uniformly from the integers in [S, P), P = round(S * 331 / 299) (331 at S = 299, 248 at
S = 224), then placed at a random offset on a P x P canvas filled with 0.5 (the value of the
paper's released code); the model sees the padded P x P image (``changes_size``).

Choices, following Xie et al.'s released TensorFlow code: the resize is nearest-neighbour
(TF1 ``resize_images(..., NEAREST_NEIGHBOR)``: source index ``floor(i * S / s)``), and the top
and left padding are drawn uniformly from ``0 .. P - s - 1`` (``random_uniform((), 0, rem)``,
upper bound exclusive). Non-square inputs draw height and width independently.

The whole batch is done with one gather through integer index maps, so every image may have
its own size and offset and the result is exact (bit for bit the same batched or alone). The
map is piecewise a pixel copy, so autograd passes gradients through it (``differentiable``).
"""

from __future__ import annotations


import torch

from ..draws import Params
from ._registry import register
from .base import Defense

__all__ = ["RandomResizePad", "padded_side", "resize_pad", "MIN_SIDE"]

#: Xie et al.'s sizes: inputs of 299 are resized to [299, 331) and padded to 331.
REFERENCE_SIDE = 299
REFERENCE_PADDED = 331
PAD_VALUE = 0.5
#: Smallest side the defense takes: the least S with round(S * 331 / 299) > S, so that the
#: canvas is larger than the image (S = 4 gives round(4.43) = 4; S = 5 gives round(5.54) = 6,
#: and every larger S grows by at least one since S * 32 / 299 > 0.5).
MIN_SIDE = 5


def padded_side(side: int) -> int:
    """Canvas side P for input side S: ``round(S * 331 / 299)`` (331 at 299, 248 at 224)."""
    return int(round(side * REFERENCE_PADDED / REFERENCE_SIDE))


def _axis_map(length: int, padded: int, size: torch.Tensor, offset: torch.Tensor):
    """Source index (nearest neighbour) and validity of every canvas position along one axis.

    Shape: size, offset (N,) -> (N, padded) int64 index, (N, padded) bool.
    """
    pos = torch.arange(padded, device=size.device).view(1, -1) - offset.view(-1, 1)
    inside = (pos >= 0) & (pos < size.view(-1, 1))
    src = torch.div(pos.clamp(min=0) * length, size.view(-1, 1), rounding_mode="floor").clamp(max=length - 1)
    return src, inside


def resize_pad(x: torch.Tensor, height: torch.Tensor, width: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
               padded_hw, pad_value: float = PAD_VALUE) -> torch.Tensor:
    """Nearest-neighbour resize image n to ``height[n] x width[n]`` and paste it at
    (``top[n]``, ``left[n]``) on a ``padded_hw`` canvas of ``pad_value``.

    Shape: x (N, C, H, W), the four (N,) int64 tensors -> (N, C, PH, PW).
    """
    n, c, h, w = x.shape
    ph, pw = padded_hw
    dev = x.device
    src_r, in_r = _axis_map(h, ph, height.to(dev), top.to(dev))
    src_c, in_c = _axis_map(w, pw, width.to(dev), left.to(dev))
    index = (src_r.unsqueeze(2) * w + src_c.unsqueeze(1)).view(n, 1, ph * pw).expand(n, c, ph * pw)
    out = x.reshape(n, c, h * w).gather(2, index).view(n, c, ph, pw)
    # The canvas outside each image, filled in place: no second full-size tensor (0.77x the
    # time of torch.where at 64 x 299 px on the CPU); gather's backward needs only the index.
    outside = ~(in_r.unsqueeze(2) & in_c.unsqueeze(1)).unsqueeze(1)
    return out.masked_fill_(outside, pad_value)


class RandomResizePad(Defense):
    """Xie et al.'s random resize + random pad (PROTOCOL.md ``rand``).

    Args:
        pad_value: canvas fill (default 0.5, as the paper's released code).

    ``sample_params`` returns :class:`~prepdefense.draws.Params` of (N,) int64 tensors ``height``, ``width``, ``top``,
    ``left`` (resized size and paste offset per image).

    Shape: (N, C, S, S) -> (N, C, P, P), P = round(S * 331 / 299).
    """

    randomized = True
    differentiable = True
    changes_size = True

    def __init__(self, pad_value: float = PAD_VALUE) -> None:
        super().__init__()
        if not 0.0 <= float(pad_value) <= 1.0:
            raise ValueError(f"pad_value is a pixel value in [0, 1] (the output stays an image in [0, 1]), got {pad_value}")
        self.pad_value = float(pad_value)

    def output_size(self, height: int, width: int):
        return padded_side(height), padded_side(width)

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> Params:
        return self.draw_images(x, [generator])

    def draw_images(self, x: torch.Tensor, generators) -> Params:
        # Four uniforms per image in one call from its own generator, converted for the batch
        # at once (row i is draw(x[i:i+1], generators[i])).
        _, _, h, w = x.shape
        ph, pw = padded_side(h), padded_side(w)
        if ph <= h or pw <= w:
            raise ValueError(f"input {h}x{w} is too small for random resizing and padding: height and width must be at least {MIN_SIDE} (the padded side round(S*331/299) must exceed S)")
        u = torch.stack([torch.rand(4, generator=g, dtype=torch.float64) for g in generators])
        height = h + (u[:, 0] * (ph - h)).floor().long()  # uniform in [S, P)
        width = w + (u[:, 1] * (pw - w)).floor().long()
        # Offsets uniform in [0, P - s): exclusive upper bound as in Xie et al.'s code.
        top = (u[:, 2] * (ph - height)).floor().long()
        left = (u[:, 3] * (pw - width)).floor().long()
        return Params(height=height, width=width, top=top, left=left)

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        _, _, h, w = x.shape
        return resize_pad(x, params["height"], params["width"], params["top"], params["left"],
                          (padded_side(h), padded_side(w)), self.pad_value)

    def extra_repr(self) -> str:
        return f"size in [S, round(S*331/299)), pad_value={self.pad_value}, nearest"


register("rand", help="Xie et al. 2018: random resize to [S, S*331/299) and random pad (0.5)")(RandomResizePad)

"""``pd``: Pixel Deflection (Prakash et al. 2018; PROTOCOL.md "Baseline defenses").

Two steps:

1. **Deflection** (batched torch, :func:`deflect_pixels`): ``deflections`` times, a pixel of
   one channel chosen uniformly over the image is replaced by the same channel's value at a
   pixel drawn uniformly from the ``(2 * window + 1)``-wide square window around it (clipped
   to the image). As in the authors' code the channel cycles R, G, B, R, ... (600 deflections
   = 200 per channel for RGB), the offsets are uniform in ``[-window, window]`` per axis
   (rejection to stay inside the image is equivalent to drawing each axis uniformly from
   its clipped range, which is what we do), and the deflections are applied in order, so a
   later one may copy a value an earlier one wrote.
   Deliberate differences: the original weights the choice of pixel by a robust class
   activation map (pixels with high activation are deflected less); PROTOCOL.md asks for
   the uniform version, which is the original's with a zero map. The original's bounds check
   ``x + a > 0`` also excludes row/column 0 as a source (an off-by-one); we allow it.
2. **Wavelet denoising** (:func:`wavelet_denoise`, CPU, per image):
   ``skimage.restoration.denoise_wavelet(img, sigma=0.04, wavelet='db1', mode='soft',
   method='BayesShrink', rescale_sigma=True, convert2ycbcr=True, channel_axis=-1)`` —
   the authors' settings (they denoise in YCbCr; ``convert2ycbcr`` is used for 3-channel
   images only), then clipped to [0, 1]. The result returns to the input's device and dtype.

Shape: (N, C, H, W) -> (N, C, H, W).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import seeding
from ..draws import Params
from ._registry import register
from .base import Defense

__all__ = ["PixelDeflection", "deflection_params", "sample_deflections", "deflect_pixels", "wavelet_denoise"]


FIELDS = ("channel", "target_row", "target_col", "source_row", "source_col")


def deflection_params(channel, target_row, target_col, source_row, source_col) -> Params:
    """One draw of the deflections for a batch, each (N, K) int64 (K = number of deflections):
    the channel, the target pixel (row, col) and the source pixel (row, col)."""
    return Params(channel=channel, target_row=target_row, target_col=target_col,
                  source_row=source_row, source_col=source_col)


def sample_deflections(
    shape, deflections: int, window: int, generator: torch.Generator
) -> Params:
    """Draw ``deflections`` (target, source) pairs per image on the CPU generator.

    The channel of deflection k is ``k % C``; the target is uniform over the H x W pixels;
    the source is uniform over the target's window clipped to the image, per axis.
    """
    n, c, h, w = shape
    k = int(deflections)
    channel = (torch.arange(k) % c).expand(n, k).contiguous()
    target_row = seeding.randint(0, h, (n, k), generator)
    target_col = seeding.randint(0, w, (n, k), generator)
    u = seeding.rand((2, n, k), generator, dtype=torch.float64)

    def source(target: torch.Tensor, size: int, unit: torch.Tensor) -> torch.Tensor:
        lo = (target - window).clamp(min=0)
        hi = (target + window).clamp(max=size - 1)
        s = lo + torch.floor(unit * (hi - lo + 1).double()).long()
        return torch.minimum(s, hi)

    return deflection_params(
        channel=channel,
        target_row=target_row,
        target_col=target_col,
        source_row=source(target_row, h, u[0]),
        source_col=source(target_col, w, u[1]),
    )


def deflect_pixels(x: torch.Tensor, params: Params) -> torch.Tensor:
    """Apply the deflections in order (step 1); returns a new tensor, ``x`` is unchanged.

    Batched over images: one indexed copy per deflection, so at most K values per image change.
    """
    out = x.clone()
    n = x.shape[0]
    batch = torch.arange(n, device=x.device)
    ch, tr, tc, sr, sc = (
        params[f].to(x.device) for f in FIELDS
    )
    for k in range(ch.shape[1]):
        out[batch, ch[:, k], tr[:, k], tc[:, k]] = out[batch, ch[:, k], sr[:, k], sc[:, k]]
    return out


def wavelet_denoise(x: torch.Tensor, *, sigma: float = 0.04, ycbcr: bool = True, wavelet: str = "db1") -> torch.Tensor:
    """BayesShrink soft-threshold wavelet denoising with scikit-image, per image on the CPU (step 2).

    Shape: (N, C, H, W) -> (N, C, H, W) on ``x``'s device and dtype, clipped to [0, 1].
    """
    from skimage.restoration import denoise_wavelet

    arr = x.detach().cpu().double().permute(0, 2, 3, 1).numpy()
    out = np.empty_like(arr)
    use_ycbcr = bool(ycbcr) and arr.shape[-1] == 3
    for i in range(arr.shape[0]):
        out[i] = denoise_wavelet(
            arr[i],
            sigma=sigma,
            wavelet=wavelet,
            mode="soft",
            method="BayesShrink",
            rescale_sigma=True,
            convert2ycbcr=use_ycbcr,
            channel_axis=-1,
        ).reshape(arr.shape[1:])
    np.clip(out, 0.0, 1.0, out=out)
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype).contiguous()


class PixelDeflection(Defense):
    """Pixel Deflection: random local pixel swaps, then wavelet denoising (Prakash et al. 2018).

    Args:
        deflections: number of deflections per image (600).
        window: half-width of the source window in pixels (10).
        sigma: noise level given to the BayesShrink wavelet denoiser (0.04).
        ycbcr: denoise in YCbCr as the authors' code does (True).
    """

    randomized = True
    differentiable = False

    def __init__(self, deflections: int = 600, window: int = 10, sigma: float = 0.04, ycbcr: bool = True) -> None:
        super().__init__()
        if deflections < 0 or window < 0 or sigma <= 0:
            raise ValueError(f"need deflections >= 0, window >= 0, sigma > 0; got {deflections}, {window}, {sigma}")
        self.deflections = int(deflections)
        self.window = int(window)
        self.sigma = float(sigma)
        self.ycbcr = bool(ycbcr)

    def extra_repr(self) -> str:
        return f"deflections={self.deflections}, window={self.window}, sigma={self.sigma}, ycbcr={self.ycbcr}"

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> Params:
        return sample_deflections(x.shape, self.deflections, self.window, generator)

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return wavelet_denoise(deflect_pixels(x, params), sigma=self.sigma, ycbcr=self.ycbcr)


register("pd", help="Pixel Deflection: 600 deflections in a 10-pixel window + BayesShrink wavelet denoising")(PixelDeflection)

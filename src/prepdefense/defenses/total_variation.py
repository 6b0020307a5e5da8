"""``tv``: pixel dropout + total-variation minimisation (Guo et al. 2018; PROTOCOL.md
"Baseline defenses").

Each pixel is kept with probability ``keep_prob`` (one mask per pixel, shared by the three
channels, as in Athalye et al.'s re-implementation of Guo et al.), and the image is reconstructed by minimising

    sum_i |grad u_i| + weight * m_i * (f_i - u_i)^2

(skimage's ROF energy ``|grad u| + (lambda/2)(f - u)^2`` with ``weight = lambda / 2``)

with the split-Bregman solver of ``skimage.restoration.denoise_tv_bregman`` (Goldstein &
Osher 2009) in which the data-fidelity term of each pixel is multiplied by its mask value
``m_i`` in {0, 1}: a dropped pixel has no data term, so the solver fills it from its
neighbours (its Gauss-Seidel update becomes the mean of the four neighbours plus the
Bregman terms).

Parameters (PROTOCOL.md: "lambda_tv 0.03, weight 2/lambda"): ``lambda_tv`` is Guo et al.'s
TV weight in ``min ||m * (u - f)||^2 + lambda_tv * TV(u)``; the solver's ``weight`` is the
argument of the same name of ``skimage.restoration.denoise_tv_bregman`` (and of the Bregman
solver in Athalye et al.'s re-implementation of Guo et al.'s defense, which calls it with
``weight = 2 / lambda_tv``). So by default ``weight = 2 / 0.03 = 66.67``: a large weight,
i.e. kept pixels stay close to the input and the work is done on the dropped ones.
TV is anisotropic by default (``isotropic=False``), as in that re-implementation, whose d-step
is the scalar soft threshold; ``isotropic=True`` gives skimage's default variant.

The solver reproduces skimage's iteration exactly (same update formulas, same border
handling, same lexicographic Gauss-Seidel sweep, same stopping rule
``rmse(u_n - u_{n-1}) <= eps`` per channel), but batched over images and channels. The
sweep is vectorised without changing its result: in skimage's sweep the new ``d`` and ``b``
of every pixel depend only on values from the previous sweep, so they are computed for all
pixels at once; what remains is the lower-triangular system
``u[r,c] = B[r,c] + A[r,c] * (u[r-1,c] + u[r,c-1])`` with ``A = 2 / (m + 8) <= 1/4``, whose
Neumann series converges like ``(2 A)^k <= 2^-k``; it is summed until the truncation error
is below ``1e-7`` relative (about 24 terms), i.e. exact to float32 rounding.

Deliberate differences from the reference codes, documented here:
- skimage's ``channel_axis`` path re-uses one buffer across channels, so channels 1 and 2
  start their Bregman variables from the previous channel's result (measured: up to ~0.05
  max abs difference, PSNR ~47 dB, at weight 66.7); this module starts every channel from
  zero, i.e. it equals skimage called on each channel separately (see the tests).
- Athalye et al.'s solver stops on the RMS change over all channels at once and reflects the
  bottom/right ghost border from the second-to-last row/column; we follow skimage (per
  channel; last row/column).
- a dropped pixel's starting value is not its true value (Athalye et al.'s solver starts
  from the full image, so with the early stop the "dropped" values partly survive); it starts
  from the mean of the kept pixels in its 3x3 neighbourhood (or of its channel when none is
  kept), so the defense never sees what it dropped.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import seeding
from ..draws import Params
from ..validation import check_int
from ._registry import register
from .base import Defense

__all__ = ["TotalVariation", "tv_bregman"]

# Relative truncation error of the triangular solve of one Gauss-Seidel sweep.
_SWEEP_TOL = 1e-7


def _reflect_border(u: torch.Tensor, f: torch.Tensor) -> None:
    """Fill the one-pixel ghost ring of ``u`` (P, H+2, W+2) from ``f`` (P, H, W) as skimage
    does: row 0 <- f row 1, column 0 <- f column 1, last row <- f's last row, last column <-
    f's last column (the corners stay 0 and are never read)."""
    h, w = f.shape[-2:]
    u[:, 1 : h + 1, 1 : w + 1] = f
    u[:, 0, 1 : w + 1] = f[:, min(1, h - 1), :]
    u[:, 1 : h + 1, 0] = f[:, :, min(1, w - 1)]
    u[:, h + 1, 1 : w + 1] = f[:, h - 1, :]
    u[:, 1 : h + 1, w + 1] = f[:, :, w - 1]


def _sweep_terms(a_max: float) -> int:
    """Number of Neumann terms so that ``sum_{n>K} (2 a_max)^n < _SWEEP_TOL``."""
    q = 2.0 * a_max
    return max(1, int(math.ceil(math.log(_SWEEP_TOL * (1.0 - q)) / math.log(q))))


def _solve_sweep(rhs: torch.Tensor, a: torch.Tensor, start: torch.Tensor, terms: int) -> torch.Tensor:
    """The lower-triangular system of one Gauss-Seidel sweep, ``u = rhs + a * (u_up + u_left)``
    (zero outside the image), by ``terms`` steps of the fixed-point iteration
    ``u_{k+1} = rhs + a * S u_k`` started from the previous sweep's ``u`` (``start``).

    ``S`` (sum of the upper and left neighbours) has norm 2 in the max norm, so the iteration
    contracts by ``q = 2 max(a) <= 1/2``: ``terms`` (:func:`_sweep_terms`) steps bring the error
    below ``_SWEEP_TOL`` from any start, and starting from the previous sweep's solution, which is
    close to this one, leaves it well below. The count is fixed, never chosen from the data, so an
    image's result does not depend on the other images of its batch. Two buffers take turns, so
    no step copies.

    Shape: rhs, a, start (P, H, W) -> (P, H, W).
    """
    p, h, w = rhs.shape
    bufs = rhs.new_zeros(2, p, h + 1, w + 1)  # zero top row and left column: outside the image
    bufs[0, :, 1:, 1:] = start
    neighbours = torch.empty_like(rhs)
    for k in range(terms):
        src, dst = bufs[k % 2], bufs[1 - k % 2]
        torch.add(src[:, :-1, 1:], src[:, 1:, :-1], out=neighbours)
        torch.addcmul(rhs, a, neighbours, out=dst[:, 1:, 1:])
    return bufs[terms % 2, :, 1:, 1:]


def tv_bregman(
    image: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    weight: float,
    max_iter: int = 100,
    eps: float = 1e-3,
    isotropic: bool = True,
    init: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Masked split-Bregman TV denoising, skimage's ``denoise_tv_bregman`` batched in torch.

    With ``mask`` all ones (or None) and ``init`` None this computes, for every image and
    channel, what ``skimage.restoration.denoise_tv_bregman(image[n, c], weight=weight,
    max_num_iter=max_iter, eps=eps, isotropic=isotropic)`` computes.

    Args:
        image: (N, C, H, W) data ``f``; values of dropped pixels are ignored.
        mask: (N, 1 or C, H, W), 1 where the data term applies (kept pixel), 0 where the pixel
            is filled from its neighbours. None: all kept.
        weight: skimage's ``weight`` (``lambda / 2`` of the ROF energy).
        max_iter, eps: at most ``max_iter`` sweeps; a channel stops after the first sweep whose
            RMS change is ``<= eps`` (skimage's rule).
        isotropic: isotropic (joint shrinkage of the two derivatives) or anisotropic TV.
        init: (N, C, H, W) starting point (default ``image``); also sets the ghost border.

    Returns:
        (N, C, H, W) tensor of ``image``'s dtype (computed in float32 or float64), not clipped.
    """
    if image.dim() != 4:
        raise ValueError(f"expected NCHW, got {tuple(image.shape)}")
    n, c, h, w = image.shape
    work_dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    f = image.to(work_dtype).reshape(n * c, h, w)
    if mask is None:
        m = torch.ones_like(f)
    else:
        m = mask.to(device=image.device, dtype=work_dtype).expand(n, c, h, w).reshape(n * c, h, w)
    start = f if init is None else init.to(work_dtype).reshape(n * c, h, w)

    weight = float(weight)
    lam = 2.0 * weight
    inv_lam = 1.0 / lam
    norm = m * weight + 4.0 * lam  # per-pixel denominator of the Gauss-Seidel update
    a = lam / norm  # coefficient of the two already-updated neighbours (2/9 kept, 1/4 dropped)
    wf = (m * weight) * f
    terms = _sweep_terms(0.25)  # a <= 1/4 always (dropped pixels): the same count for every batch

    planes = n * c
    u = torch.zeros(planes, h + 2, w + 2, dtype=work_dtype, device=image.device)
    _reflect_border(u, start)
    dx = torch.zeros_like(u)
    dy = torch.zeros_like(u)
    bx = torch.zeros_like(u)
    by = torch.zeros_like(u)
    out = torch.empty(planes, h, w, dtype=work_dtype, device=image.device)
    active = torch.arange(planes, device=image.device)

    inner = (slice(None), slice(1, h + 1), slice(1, w + 1))
    for _ in range(int(max_iter)):
        ui = u[inner]
        # d- and b-updates: each pixel uses only values from the previous sweep (skimage
        # computes them from ``uprev`` and the not-yet-updated forward neighbours).
        ux = u[:, 1 : h + 1, 2 : w + 2] - ui
        uy = u[:, 2 : h + 2, 1 : w + 1] - ui
        bxo = bx[inner]
        byo = by[inner]
        tx = ux + bxo
        ty = uy + byo
        # b_new = b + grad u - d_new = t - d_new; for the anisotropic soft threshold
        # d_new = t - clamp(t, -1/lam, 1/lam), so b_new is the clamp itself.
        if isotropic:
            s_lam = torch.sqrt(tx * tx + ty * ty) * lam
            shrink = s_lam / (s_lam + 1.0)
            dxn = shrink * tx
            dyn = shrink * ty
            bxn = tx - dxn
            byn = ty - dyn
        else:
            bxn = tx.clamp(-inv_lam, inv_lam)
            byn = ty.clamp(-inv_lam, inv_lam)
            dxn = tx - bxn
            dyn = ty - byn

        # Right-hand side with every already-known term: forward neighbours from the previous
        # sweep, new d/b of the left and upper neighbours, old d/b of the pixel itself.
        # Borders of d and b are never updated (zero), as in skimage.
        dx_left = F.pad(dxn[:, :, :-1], (1, 0))
        bx_left = F.pad(bxn[:, :, :-1], (1, 0))
        dy_up = F.pad(dyn[:, :-1, :], (0, 0, 1, 0))
        by_up = F.pad(byn[:, :-1, :], (0, 0, 1, 0))
        known = (
            u[:, 2 : h + 2, 1 : w + 1]
            + u[:, 1 : h + 1, 2 : w + 2]
            + dx_left - dx[inner] + dy_up - dy[inner]
            - bx_left + bxo - by_up + byo
        )
        # The fixed ghost border enters through the first row / column's backward neighbours.
        known[:, 0, :] += u[:, 0, 1 : w + 1]
        known[:, :, 0] += u[:, 1 : h + 1, 0]
        rhs = (lam * known + wf) / norm

        unew = _solve_sweep(rhs, a, ui, terms)

        rmse = (unew - ui).pow(2).mean(dim=(1, 2)).sqrt()
        u[inner] = unew
        dx[inner] = dxn
        dy[inner] = dyn
        bx[inner] = bxn
        by[inner] = byn

        done = rmse <= eps
        if bool(done.any()):
            # Converged planes leave the working set (skimage's per-channel stopping rule).
            out[active[done]] = u[inner][done]
            keep = ~done
            active = active[keep]
            if active.numel() == 0:
                break
            u, dx, dy, bx, by = (t[keep] for t in (u, dx, dy, bx, by))
            norm, a, wf = norm[keep], a[keep], wf[keep]
    if active.numel():
        out[active] = u[inner]
    return out.reshape(n, c, h, w).to(image.dtype)


def _fill_dropped(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Starting values that do not use dropped pixels: each dropped pixel gets the mean of the
    kept pixels in its 3x3 neighbourhood, or of its channel's kept pixels when none is kept."""
    n, c, h, w = x.shape
    m = mask.to(x.dtype).expand(n, c, h, w)
    kept = x * m
    ones = torch.ones(c, 1, 3, 3, dtype=x.dtype, device=x.device)
    num = F.conv2d(F.pad(kept, (1, 1, 1, 1)), ones, groups=c)
    den = F.conv2d(F.pad(m, (1, 1, 1, 1)), ones, groups=c)
    channel_mean = kept.sum(dim=(2, 3), keepdim=True) / m.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
    local = torch.where(den > 0, num / den.clamp(min=1.0), channel_mean.expand_as(x))
    return torch.where(m > 0, x, local)


class TotalVariation(Defense):
    """Guo et al. 2018 TV minimisation: random pixel dropout, then masked Bregman TV fill.

    Args:
        keep_prob: probability that a pixel (all its channels) is kept (0.5).
        lambda_tv: Guo et al.'s TV weight (0.03); ignored when ``weight`` is given.
        weight: skimage ``denoise_tv_bregman`` weight; default ``2 / lambda_tv``.
        isotropic: isotropic TV (skimage's default); False (default): anisotropic, as the
            re-implementation of Guo et al. by Athalye et al. 2018.
        max_iter, eps: skimage's defaults (100, 1e-3).

    Shape: (N, C, H, W) -> (N, C, H, W), clipped to [0, 1].
    """

    randomized = True
    differentiable = False

    def __init__(
        self,
        keep_prob: float = 0.5,
        lambda_tv: float = 0.03,
        weight: Optional[float] = None,
        isotropic: bool = False,
        max_iter: int = 100,
        eps: float = 1e-3,
    ) -> None:
        super().__init__()
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}")
        if weight is None:
            if lambda_tv <= 0:
                raise ValueError(f"lambda_tv must be > 0, got {lambda_tv}")
            weight = 2.0 / lambda_tv
        if weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        self.keep_prob = float(keep_prob)
        self.lambda_tv = float(lambda_tv)
        self.weight = float(weight)
        self.isotropic = bool(isotropic)
        self.max_iter = check_int(max_iter, "max_iter")
        if not float(eps) > 0:
            raise ValueError(f"eps (the solver's stopping tolerance) must be > 0, got {eps}")
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return (
            f"keep_prob={self.keep_prob}, lambda_tv={self.lambda_tv}, weight={self.weight:.4g}, "
            f"isotropic={self.isotropic}, max_iter={self.max_iter}, eps={self.eps}"
        )

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> Params:
        n, _, h, w = x.shape
        return Params(mask=seeding.rand((n, 1, h, w), generator) < self.keep_prob)

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """Never on the autograd graph (``differentiable = False``: attacks use BPDA)."""
        with torch.no_grad():
            return self._reconstruct(x.detach(), params)

    def _reconstruct(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        if x.numel() == 0:
            return x.clone()
        mask = params["mask"].to(x.device)
        init = _fill_dropped(x, mask) if not bool(mask.all()) else None
        data = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        out = tv_bregman(
            data, mask, weight=self.weight, max_iter=self.max_iter, eps=self.eps,
            isotropic=self.isotropic, init=init,
        )
        return out.clamp_(0.0, 1.0)


register("tv", help="Guo et al. pixel dropout (p=0.5) + Bregman TV minimisation (lambda_tv 0.03)")(TotalVariation)

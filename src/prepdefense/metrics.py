"""Every distance and score the project reports, in one place (PROTOCOL.md, "Conventions").

All functions take NCHW batches and return one value per image (a 1-D tensor of length N)
unless they are rates over a batch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .validation import check_labels, check_value_range, range_tolerance

__all__ = [
    "l2_rms",
    "l2_euclidean_radius",
    "linf",
    "ssim",
    "accuracy",
    "attack_success_rate",
    "PAPER_L2_BOUND",
    "PAPER_LINF_BOUND",
]

#: The paper's normalised-L2 bound (Section 6.1: "l2 norm smaller than 0.05").
PAPER_L2_BOUND = 0.05
#: The paper's Linf bound (Section 3, Table 5: 8/255 ~ 0.031).
PAPER_LINF_BOUND = 8.0 / 255.0


def _flat_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image differences (N, D); TypeError / ValueError for non-tensors, mismatched shapes,
    no batch dimension, non-finite values (a NaN distance would pass every bound check) or
    values outside [0, 1] beyond the rounding tolerance (a 0..255 batch would give distances
    255 times too large; :func:`prepdefense.validation.check_value_range`)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor batch, got {type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"the two batches must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"expected a batch (N, ...) of images, got shape {tuple(a.shape)}")
    if a.dim() == 3:
        raise ValueError(f"got shape {tuple(a.shape)}, one image (C, H, W) or a batch of 2-D images: pass a batch "
                         f"(N, C, H, W), for one image a.unsqueeze(0) and b.unsqueeze(0)")
    for name, t in (("a", a), ("b", b)):
        if t.numel():
            check_value_range(t, name=name)
    return (a - b).reshape(a.shape[0], -1) if a.shape[0] else a.new_zeros(0, 1)


def l2_rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised L2 of the paper: ``sqrt(sum((a-b)^2) / (C*H*W))`` per image (RMS difference).

    Shape: a, b (N, C, H, W) in [0, 1] -> (N,) (empty for N = 0).

    Raises:
        TypeError / ValueError: as :func:`_flat_diff` (not floating tensors, other shapes, one
            image without its batch dimension, NaN, values outside [0, 1]).
    """
    d = _flat_diff(a, b).double()
    if d.shape[0] == 0:
        return a.new_zeros(0)
    return d.pow(2).mean(dim=1).sqrt().to(a.dtype)


def l2_euclidean_radius(rms: float, shape) -> float:
    """Euclidean radius equivalent to a normalised-L2 bound for images of ``shape`` (C,H,W)."""
    c, h, w = shape[-3:]
    return float(rms) * math.sqrt(c * h * w)


def linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``max |a-b|`` per image.

    Shape: a, b (N, C, H, W) in [0, 1] -> (N,) (empty for N = 0).

    Raises:
        TypeError / ValueError: as :func:`l2_rms`.
    """
    d = _flat_diff(a, b)
    return a.new_zeros(0) if d.shape[0] == 0 else d.abs().amax(dim=1)


def _gaussian_kernel1d(sigma: float, truncate: float, dtype, device) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    data_range: float = 1.0,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, averaged over channels.

    Gaussian window (sigma 1.5, truncated at 3.5 sigma: 11x11), population covariances,
    K1=0.01, K2=0.03, and the border of half a window left out of the mean: the settings of
    ``skimage.metrics.structural_similarity(..., channel_axis=-1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)`` (PROTOCOL.md), computed batched
    in float64 with a separable "valid" convolution.

    Shape: a, b (N, C, H, W) with H, W >= 11, values in [0, ``data_range``] (1 for the
    project's [0, 1] images; 255 for 0..255 data) -> (N,).

    Raises:
        TypeError: not tensors.
        ValueError: other shapes, not NCHW (a channels-last batch is named), NaN or infinite
            values, values outside [0, ``data_range``], images smaller than the window.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ssim: {name} must be a torch.Tensor batch (N, C, H, W), got {type(t).__name__}")
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ssim expects two NCHW batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] > 4 and a.shape[-1] <= 4:
        raise ValueError(f"ssim: shape {tuple(a.shape)} looks channels-last (N, H, W, C); pass a.permute(0, 3, 1, 2)")
    if a.shape[0] == 0:
        return torch.zeros(0, dtype=a.dtype if a.is_floating_point() else torch.float32, device=a.device)
    for name, t in (("a", a), ("b", b)):
        lo, hi = (float(v) for v in torch.aminmax(t.detach().double()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"ssim: {name} contains NaN or infinite values")
        tolerance = range_tolerance(t.dtype)
        if lo < -tolerance * data_range or hi > data_range * (1 + tolerance):
            hint = " (0..255 data: pass data_range=255)" if data_range == 1 and hi > 1.5 else ""
            raise ValueError(f"ssim: {name} has values in [{lo:.4g}, {hi:.4g}], outside [0, data_range={data_range:g}]{hint}")
    n, c, h, w = a.shape
    x = a.detach().double().reshape(n * c, 1, h, w)
    y = b.detach().double().reshape(n * c, 1, h, w)
    k = _gaussian_kernel1d(sigma, 3.5, torch.float64, x.device)
    if h < k.numel() or w < k.numel():
        raise ValueError(f"ssim needs images of at least {k.numel()}x{k.numel()} pixels")
    kh = k.view(1, 1, -1, 1)
    kw = k.view(1, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh), kw)

    stack = torch.cat([x, y, x * x, y * y, x * y], dim=0)
    mu_x, mu_y, m_xx, m_yy, m_xy = blur(stack).split(n * c, dim=0)
    vx = m_xx - mu_x * mu_x
    vy = m_yy - mu_y * mu_y
    vxy = m_xy - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * vxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (vx + vy + c2))
    return s.reshape(n, c, -1).mean(dim=2).mean(dim=1).to(a.dtype if a.is_floating_point() else torch.float32)


def _predictions(logits_or_pred: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(logits_or_pred, torch.Tensor) or logits_or_pred.dim() not in (1, 2) or logits_or_pred.shape[0] != n:
        shape = tuple(logits_or_pred.shape) if isinstance(logits_or_pred, torch.Tensor) else type(logits_or_pred).__name__
        raise ValueError(f"expected (N, K) logits or (N,) predictions for {n} labels, got {shape}")
    if logits_or_pred.dim() == 2 and logits_or_pred.shape[1] == 1:
        raise ValueError(f"got shape {tuple(logits_or_pred.shape)}: one column is neither (N,) predictions nor (N, K >= 2) "
                         f"logits; for predictions pass pred.squeeze(1)")
    if logits_or_pred.dim() == 2 and logits_or_pred.is_floating_point() and logits_or_pred.numel():
        lo, hi = torch.aminmax(logits_or_pred.detach())  # both NaN when any logit is (an infinite logit is fine)
        if bool(torch.isnan(lo) | torch.isnan(hi)):
            raise ValueError("the logits contain NaN: no prediction can be read from them")
    return logits_or_pred.argmax(dim=1) if logits_or_pred.dim() == 2 else logits_or_pred


def accuracy(logits_or_pred: torch.Tensor, labels: torch.Tensor) -> float:
    """ACC: fraction of images whose prediction equals the true label.

    Shape: (N, K) logits or (N,) predictions, (N,) labels -> float (nan for N = 0)."""
    n = logits_or_pred.shape[0] if isinstance(logits_or_pred, torch.Tensor) and logits_or_pred.dim() else None
    if n is None:
        n = labels.shape[0] if isinstance(labels, torch.Tensor) and labels.dim() == 1 else -1
    k = logits_or_pred.shape[1] if isinstance(logits_or_pred, torch.Tensor) and logits_or_pred.dim() == 2 and logits_or_pred.shape[1] > 1 else None
    labels = check_labels(labels, n, num_classes=k)
    pred = _predictions(logits_or_pred, labels.shape[0])
    return float((pred.cpu() == labels.cpu()).float().mean().item()) if labels.numel() else float("nan")


def attack_success_rate(logits_or_pred: torch.Tensor, targets: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None) -> float:
    """ASR: fraction predicted as the attacker's target; for untargeted attacks
    (``targets`` None) the fraction no longer predicted as the true label."""
    ref = targets if targets is not None else labels
    if ref is None:
        raise ValueError("untargeted ASR needs the true labels")
    k = logits_or_pred.shape[1] if isinstance(logits_or_pred, torch.Tensor) and logits_or_pred.dim() == 2 and logits_or_pred.shape[1] > 1 else None
    ref = check_labels(ref, ref.shape[0] if isinstance(ref, torch.Tensor) and ref.dim() == 1 else -1, num_classes=k,
                       name="targets" if targets is not None else "labels")
    pred = _predictions(logits_or_pred, ref.shape[0]).cpu()
    if targets is not None:
        return float((pred == targets.cpu()).float().mean().item()) if targets.numel() else float("nan")
    if labels is None:
        raise ValueError("untargeted ASR needs the true labels")
    return float((pred != labels.cpu()).float().mean().item()) if labels.numel() else float("nan")

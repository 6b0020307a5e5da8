"""Learned BPDA approximator (paper Section 6.4; PROTOCOL.md "Attacks", "Adaptive BPDA").

The adaptive BPDA of Raff et al. 2019 (the paper's [15]) replaces the identity in the backward
pass by a network trained to imitate the defense: ``a(x) ~ g(x)``. The paper uses "a 6-layer
DenseNet auto-encoder" and reports, for its defense, l2 0.16 and SSIM 0.36 between ``a(x)``
and ``g(x)`` on 100 images.

:class:`DenseAutoEncoder` is that network: six 3x3 convolutions, the four middle ones densely
connected (each sees the concatenation of all earlier feature maps, Huang et al. 2017), the
last one predicting a residual, ``a(x) = clip(x + r(x), 0, 1)``. It is fully convolutional, so
it is trained on patches and applied to whole images of any size. It keeps full resolution
(no spatial bottleneck): the defenses studied are near-identity maps, and a bottleneck would
only throw away detail an attacker wants; a stronger approximator is the conservative choice
when judging a defense. The residual head starts at zero, so an untrained net *is* the
identity BPDA of Section 6.2 and training can only move it towards ``g``.

Training (:func:`train_approximator`) minimises the MSE (or L1) between ``a(x)`` and a fresh
draw of ``g(x)`` at every step, so for a random ``g`` the net learns (approximately) the
expectation ``E[g(x)]``, the best a deterministic approximation can do in MSE. The defense
is applied to whole images and the *same* random crop is then taken from ``x`` and ``g(x)``
(defenses such as the grid distortion depend on the image size).

**Disjointness**: the images used for training must be disjoint from the images the attack
is evaluated on; the functions take tensors, so the caller guarantees it (e.g. train on
images drawn with ``exclude_ids`` = the evaluation sample's ids) and records it in the saved
metadata.

The network plugs into :class:`~prepdefense.attacks.bpda.BPDA` as ``BPDA(defense, approx=net)``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import seeding
from ..atomic_io import atomic_write_with
from ..metrics import l2_rms, ssim

__all__ = [
    "DenseAutoEncoder",
    "train_approximator",
    "evaluate_approximator",
    "save_approximator",
    "load_approximator",
]

_FORMAT = "prepdefense-learned-bpda/1"


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    # skip_init: no draw from the global RNG; weights are set from an explicit generator.
    return nn.utils.skip_init(nn.Conv2d, cin, cout, 3, padding=1)


class DenseAutoEncoder(nn.Module):
    """DenseNet-style convolutional auto-encoder mapping x to an approximation of g(x).

    Layers: stem conv (C -> ``width``), ``dense_layers`` convs each adding ``growth`` feature
    maps computed from the concatenation of all previous ones, and a head conv predicting the
    residual (C maps). ReLU after every conv but the head. Defaults: 1 + 4 + 1 = 6 conv layers.

    Args:
        channels: image channels (3).
        width: stem output maps (32).
        growth: maps added per dense layer (16).
        dense_layers: number of dense layers (4).
        seed: seed of the weight initialisation (He-uniform; the head starts at zero).

    Shape: (N, C, H, W) in [0, 1] -> (N, C, H, W) in [0, 1].
    """

    def __init__(self, channels: int = 3, width: int = 32, growth: int = 16, dense_layers: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.channels, self.width, self.growth, self.dense_layers = int(channels), int(width), int(growth), int(dense_layers)
        self.stem = _conv3x3(self.channels, self.width)
        self.dense = nn.ModuleList(_conv3x3(self.width + i * self.growth, self.growth) for i in range(self.dense_layers))
        self.head = _conv3x3(self.width + self.dense_layers * self.growth, self.channels)
        self.reset_parameters(seeding.make_generator(seed))

    def config(self) -> Dict[str, int]:
        """Constructor arguments that rebuild this architecture."""
        return {"channels": self.channels, "width": self.width, "growth": self.growth, "dense_layers": self.dense_layers}

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """He-uniform weights and zero biases for the ReLU layers; a zero head (identity start)."""
        for conv in [self.stem, *self.dense]:
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            bound = math.sqrt(6.0 / fan_in)
            conv.weight.copy_((seeding.rand(conv.weight.shape, generator) * 2 - 1) * bound)
            conv.bias.zero_()
        self.head.weight.zero_()
        self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [F.relu(self.stem(x))]
        for conv in self.dense:
            features.append(F.relu(conv(torch.cat(features, dim=1))))
        residual = self.head(torch.cat(features, dim=1))
        return (x + residual).clamp(0.0, 1.0)


def _random_crops(
    x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same random ``size`` x ``size`` window (one per image) from ``x`` and ``y``."""
    n, _, h, w = x.shape
    if size >= h and size >= w:
        return x, y
    size_h, size_w = min(size, h), min(size, w)
    top = seeding.randint(0, h - size_h + 1, (n,), generator).tolist()
    left = seeding.randint(0, w - size_w + 1, (n,), generator).tolist()
    xs = torch.stack([x[i, :, t : t + size_h, l : l + size_w] for i, (t, l) in enumerate(zip(top, left))])
    ys = torch.stack([y[i, :, t : t + size_h, l : l + size_w] for i, (t, l) in enumerate(zip(top, left))])
    return xs, ys


def train_approximator(
    defense: nn.Module,
    images: torch.Tensor,
    *,
    steps: int = 2000,
    batch_size: int = 16,
    lr: float = 1e-3,
    generator: Optional[torch.Generator] = None,
    patch_size: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
    loss: str = "mse",
    net: Optional[DenseAutoEncoder] = None,
) -> Tuple[DenseAutoEncoder, List[Dict[str, float]]]:
    """Train a :class:`DenseAutoEncoder` to imitate ``defense`` (Section 6.4).

    Every step draws ``batch_size`` training images (with replacement) and a fresh draw of the
    defense on them, optionally cuts one random ``patch_size`` crop per image from both, and
    takes one Adam step on the MSE (or L1) between ``net(x)`` and ``g(x)``. The learning rate
    follows a cosine decay from ``lr`` to ``lr / 20``.

    Args:
        defense: ``g``, called as ``defense(x, generator=generator)``; must keep the image size.
        images: (N, C, H, W) training images in [0, 1], disjoint from the evaluation images.
        steps, batch_size, lr: optimisation budget.
        generator: CPU generator for the image choice, the defense draws and the crops.
        patch_size: train on random crops of this side (None: whole images).
        device: where the net trains (images are moved batch by batch).
        progress: show a tqdm bar on stderr.
        loss: ``"mse"`` or ``"l1"``.
        net: continue training this net (default: a fresh one seeded from ``generator``).

    Returns:
        ``(net, history)``: the trained net in eval mode, and one ``{"step", "loss"}`` per step.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"need a non-empty NCHW batch of training images, got {tuple(images.shape)}")
    if loss not in ("mse", "l1"):
        raise ValueError(f"loss must be 'mse' or 'l1', got {loss!r}")
    generator = seeding.ensure_generator(generator)
    device = torch.device(device)
    if net is None:
        net = DenseAutoEncoder(channels=images.shape[1], seed=seeding.child_seed(generator))
    net = net.to(device)
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps)))
    )
    criterion = F.mse_loss if loss == "mse" else F.l1_loss
    history: List[Dict[str, float]] = []

    iterator = range(int(steps))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="train approximator", unit="step", dynamic_ncols=True)
    n = images.shape[0]
    for step in iterator:
        idx = seeding.randint(0, n, (batch_size,), generator)
        x = images[idx].to(device)
        with torch.no_grad():
            target = defense(x, generator=generator)
        if target.shape != x.shape:
            raise ValueError(
                f"the defense changes the image shape {tuple(x.shape)} -> {tuple(target.shape)}; "
                "a learned approximator needs a size-preserving defense"
            )
        target = target.to(device=device, dtype=x.dtype)
        if patch_size is not None:
            x, target = _random_crops(x, target, int(patch_size), generator)
        value = criterion(net(x), target)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        scheduler.step()
        history.append({"step": step, "loss": float(value.detach())})
        if progress:
            iterator.set_postfix(loss=f"{history[-1]['loss']:.5f}")
    net.eval()
    return net, history


@torch.no_grad()
def evaluate_approximator(
    net: nn.Module,
    defense: nn.Module,
    images: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    *,
    batch_size: int = 16,
) -> Dict[str, float]:
    """How close the approximation is to the defense: the paper's Section 6.4 figures.

    For each image, one fresh draw of ``g(x)`` is compared with ``net(x)`` by the normalised L2
    (:func:`~prepdefense.metrics.l2_rms`) and SSIM (:func:`~prepdefense.metrics.ssim`); the
    means are returned (paper, for its defense: l2 0.16, SSIM 0.36). For reference the same
    figures for the identity approximation (``x`` against ``g(x)``, Section 6.2's BPDA) are
    returned as ``identity_l2`` / ``identity_ssim``.

    Args:
        images: (N, C, H, W) evaluation images, disjoint from the training images.

    Returns:
        ``{"l2", "ssim", "identity_l2", "identity_ssim", "n"}``.
    """
    generator = seeding.ensure_generator(generator)
    was_training = net.training
    net.eval()
    device = next((p.device for p in net.parameters()), images.device)
    l2s, ssims, id_l2s, id_ssims = [], [], [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        g = defense(x, generator=generator).to(device=device, dtype=x.dtype)
        a = net(x)
        l2s.append(l2_rms(a, g).cpu())
        ssims.append(ssim(a, g).cpu())
        id_l2s.append(l2_rms(x, g).cpu())
        id_ssims.append(ssim(x, g).cpu())
    net.train(was_training)
    return {
        "l2": float(torch.cat(l2s).double().mean()),
        "ssim": float(torch.cat(ssims).double().mean()),
        "identity_l2": float(torch.cat(id_l2s).double().mean()),
        "identity_ssim": float(torch.cat(id_ssims).double().mean()),
        "n": int(images.shape[0]),
    }


def save_approximator(path: Union[str, os.PathLike], net: DenseAutoEncoder, metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Save the net's weights, architecture and ``metadata`` (JSON-serialisable: the defense,
    training images, steps, seed, figures...) atomically to ``path``, plus a human-readable
    copy of architecture and metadata in ``<path>.json``. Returns ``path``."""
    path = Path(path)
    meta_json = json.dumps(metadata or {}, sort_keys=True)  # fails early on non-JSON metadata
    payload = {
        "format": _FORMAT,
        "config": json.dumps(net.config(), sort_keys=True),
        "metadata": meta_json,
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
    }
    atomic_write_with(path, lambda fh: torch.save(payload, fh))
    sidecar = json.dumps({"format": _FORMAT, "config": net.config(), "metadata": metadata or {}}, indent=2, sort_keys=True)
    atomic_write_with(path.with_name(path.name + ".json"), lambda fh: fh.write((sidecar + "\n").encode()))
    return path


def load_approximator(path: Union[str, os.PathLike], *, map_location: Union[str, torch.device] = "cpu") -> DenseAutoEncoder:
    """Load a net saved by :func:`save_approximator` (``torch.load(weights_only=True)``), in eval
    mode, with the saved metadata as the ``metadata`` attribute (a dict)."""
    payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a learned-BPDA approximator file ({_FORMAT})")
    net = DenseAutoEncoder(**json.loads(payload["config"]))
    net.load_state_dict(payload["state_dict"])
    net.metadata = json.loads(payload["metadata"])
    net.to(map_location)
    net.eval()
    return net

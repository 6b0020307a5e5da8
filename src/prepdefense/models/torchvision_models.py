"""The paper's Inception V3 (299x299) and ResNet-50 (224x224) through torchvision
(PROTOCOL.md, "Models and data"; paper Section 6.1).

Both need torchvision installed (``pip install 'prepdefense[torchvision]'``) and a local
ImageNet weights file passed as ``weights=PATH`` (CLI ``--weights FILE``), e.g. the
``.pth`` files torchvision itself publishes. Nothing downloads at run time: without
torchvision or without a weights file the factory raises
:class:`~prepdefense.errors.ModelUnavailableError` with a one-line hint.

Normalisation (ImageNet mean/std) happens inside ``forward``, so the models take [0,1]
NCHW RGB like every model of the project.
"""

from __future__ import annotations

import os
import pickle
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import ModelUnavailableError
from ._registry import register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INSTALL_HINT = "pip install 'prepdefense[torchvision]'"


class NormalizedClassifier(nn.Module):
    """Wraps a torchvision classifier: [0,1] RGB -> ImageNet mean/std -> logits.

    Shape: x (N, 3, H, W) in [0, 1] -> (N, 1000).
    """

    def __init__(self, net: nn.Module, input_size: int) -> None:
        super().__init__()
        self.net = net
        self.input_size = int(input_size)
        self.num_classes = 1000
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        # Inception V3 returns (logits, aux) in training mode; callers want the logits.
        return out.logits if hasattr(out, "logits") else out


def _torchvision_model(name: str, builder: Callable[[], nn.Module], input_size: int, weights: Optional[str]) -> NormalizedClassifier:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise ModelUnavailableError(
            f"{name} needs torchvision ({INSTALL_HINT}) and a local weights file (--weights FILE)"
        ) from None
    if not weights:
        raise ModelUnavailableError(
            f"{name} needs a local ImageNet weights file: pass --weights FILE (weights=PATH); nothing is downloaded"
        )
    path = os.fspath(os.path.expanduser(weights))
    if not os.path.isfile(path):
        raise ModelUnavailableError(f"{name} weights file not found: {path}")
    net = builder()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        net.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelUnavailableError(f"{name}: {path} is not a compatible state dict ({first})") from None
    return NormalizedClassifier(net, input_size).eval()


@register("inception-v3", help="Inception V3, ImageNet, 299x299 (the paper's model; needs torchvision and --weights FILE)")
def inception_v3(weights: Optional[str] = None) -> NormalizedClassifier:
    """torchvision Inception V3 (299x299) with a local weights file."""

    def build() -> nn.Module:
        from torchvision.models import inception_v3 as tv_inception_v3

        # As torchvision does for its published weights: aux_logits=True so the state dict
        # (with AuxLogits.*) loads strictly, and transform_input=True because those weights
        # (ported from TensorFlow) expect inputs in [-1, 1], not mean/std-normalised ones.
        return tv_inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)

    return _torchvision_model("inception-v3", build, 299, weights)


@register("resnet50", help="ResNet-50, ImageNet, 224x224 (needs torchvision and --weights FILE)")
def resnet50(weights: Optional[str] = None) -> NormalizedClassifier:
    """torchvision ResNet-50 (224x224) with a local weights file."""

    def build() -> nn.Module:
        from torchvision.models import resnet50 as tv_resnet50

        return tv_resnet50(weights=None)

    return _torchvision_model("resnet50", build, 224, weights)

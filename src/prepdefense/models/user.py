"""A user's own classifier: ``torchscript:PATH``, ``package.module:callable``,
``torchvision:ARCH`` and ``timm:ARCH`` (issue 12, item 1).

Every form gives an ``nn.Module`` taking [0,1] NCHW RGB and returning ``(N, K)`` logits, with
two attributes the rest of the library reads:

* ``input_size``: the square input side the images are resized and cropped to;
* ``num_classes``: ``K``, the number of logits (labels and random targets are drawn below it).

They come from the arguments (``--input-size`` / ``--num-classes``) when given, else from the
model's own attributes; a model with no ``input_size`` anywhere is an error saying which flag
to pass. The model is then run once on one grey image of that size (a probe): it must return
finite ``(1, K)`` logits, and a declared ``num_classes`` must equal ``K`` (an undeclared one is
taken from the probe).

A model that expects normalised input (``(x - mean) / std``, as torchvision's and timm's
ImageNet weights do) is wrapped in :class:`Normalize` by ``mean=`` / ``std=`` (``--mean`` /
``--std``). ``torchvision:`` and ``timm:`` architectures take ImageNet's mean and std unless
given others (timm: the model's own ``pretrained_cfg``).

Nothing downloads: ``torchvision:`` and ``timm:`` build the architecture with random weights
and load a local state dict (``weights=PATH``, ``--weights FILE``); ``package.module:callable``
is called with ``weights=PATH`` only when a weights file is given. torchvision and timm are
optional extras; without them the error names the extra to install.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import user_code
from ..errors import ModelUnavailableError

__all__ = ["Normalize", "TorchScriptModel", "PREFIXES", "is_user_spec", "check_user_spec", "create_user_model", "declare"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The reserved prefixes of a model spec; any other ``a.b:c`` is ``package.module:callable``.
PREFIXES = ("torchscript", "torchvision", "timm")
EXTRA_HINT = {"torchvision": "pip install 'prepdefense[torchvision]'", "timm": "pip install 'prepdefense[timm]'"}


class Normalize(nn.Module):
    """``model((x - mean) / std)``: a model that expects normalised input, fed [0,1] images.

    Args:
        model: the classifier expecting normalised input.
        mean, std: one value per channel (or one for all); ``std`` must be positive.

    ``input_size`` and ``num_classes`` are copied from ``model`` when it has them.

    Shape: (N, C, H, W) in [0, 1] -> whatever ``model`` returns, (N, K) logits.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor([float(v) for v in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(v) for v in std], dtype=torch.float32)
        if mean_t.dim() != 1 or std_t.dim() != 1 or not len(mean_t) or not len(std_t):
            raise ValueError("mean and std need one value per channel (or one value)")
        if not bool(torch.isfinite(mean_t).all()) or not bool((std_t > 0).all()) or not bool(torch.isfinite(std_t).all()):
            raise ValueError(f"std must be positive and mean and std finite, got mean {mean_t.tolist()} std {std_t.tolist()}")
        self.model = model
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)
        for attr in ("input_size", "num_classes"):
            if getattr(model, attr, None) is not None:
                setattr(self, attr, int(getattr(model, attr)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class TorchScriptModel(nn.Module):
    """A loaded TorchScript module inside a plain ``nn.Module``, so that hooks (the pass
    counters of ``attack``), attributes and ``.to()`` work as for any model; the scripted
    module's own ``input_size`` and ``num_classes`` attributes are kept when it has them.

    Shape: whatever the scripted module maps, (N, 3, H, W) -> (N, K).
    """

    def __init__(self, scripted: nn.Module) -> None:
        super().__init__()
        self.scripted = scripted
        for attr in ("input_size", "num_classes"):
            value = getattr(scripted, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, attr, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scripted(x)


def is_user_spec(name: str) -> bool:
    """Whether ``name`` names a user's model (``prefix:...`` or ``package.module:callable``)."""
    return ":" in str(name)


def _split(spec: str) -> Tuple[str, str]:
    head, _, tail = str(spec).partition(":")
    return head.strip(), tail.strip()


def _valid_dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def check_user_spec(spec: str, weights: Optional[str] = None) -> None:
    """What the spec alone shows, without loading anything: a missing TorchScript file, a
    malformed ``package.module:callable``, an absent module or extra, a missing ``weights``.

    Raises:
        ModelUnavailableError: with one line saying what to fix.
    """
    head, tail = _split(spec)
    if head == "torchscript":
        if not tail:
            raise ModelUnavailableError("torchscript: needs a file, e.g. --model torchscript:model.pt")
        path = Path(tail).expanduser()
        if not path.is_file():
            raise ModelUnavailableError(f"TorchScript file not found: {tail}")
        return
    if head in ("torchvision", "timm"):
        if not _valid_dotted(tail):
            raise ModelUnavailableError(f"{head}: needs an architecture name, e.g. --model {head}:resnet18 --weights FILE")
        if importlib.util.find_spec(head) is None:
            raise ModelUnavailableError(f"--model {spec} needs the {head} extra: {EXTRA_HINT[head]}")
        if not weights:
            raise ModelUnavailableError(f"--model {spec} needs a local weights file: pass --weights FILE (nothing is downloaded)")
        return
    if not _valid_dotted(head) or not _valid_dotted(tail):
        raise ModelUnavailableError(
            f"bad model spec {spec!r}: use torchscript:PATH, torchvision:ARCH, timm:ARCH or "
            "package.module:callable (a callable returning an nn.Module)")
    if not user_code.find_module(head):
        raise ModelUnavailableError(f"module {head!r} of --model {spec} not found; is it installed or on PYTHONPATH?")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load_torchscript(path: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated in new torch
        try:
            return TorchScriptModel(torch.jit.load(os.path.expanduser(path), map_location="cpu"))
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelUnavailableError(f"cannot load TorchScript file {path} ({_first_line(e)})") from None


def _resolve(head: str, tail: str, spec: str) -> Any:
    try:
        return user_code.resolve(spec)
    except ImportError as e:
        raise ModelUnavailableError(f"cannot import {head!r} for --model {spec} ({_first_line(e)})") from None
    except AttributeError as e:
        raise ModelUnavailableError(f"{e} (--model {spec})") from None


def _from_callable(spec: str, weights: Optional[str]) -> nn.Module:
    head, tail = _split(spec)
    obj = _resolve(head, tail, spec)
    if isinstance(obj, nn.Module):
        return TorchScriptModel(obj) if isinstance(obj, torch.jit.ScriptModule) else obj
    if not callable(obj):
        raise ModelUnavailableError(f"{spec} is a {type(obj).__name__}, not a callable returning an nn.Module")
    model = obj(weights=weights) if weights else obj()
    if not isinstance(model, nn.Module):
        raise ModelUnavailableError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    return TorchScriptModel(model) if isinstance(model, torch.jit.ScriptModule) else model


def _load_state(net: nn.Module, weights: str, spec: str) -> None:
    path = os.path.expanduser(weights)
    if not os.path.isfile(path):
        raise ModelUnavailableError(f"--weights file not found: {weights}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        net.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, TypeError, AttributeError, pickle.UnpicklingError) as e:
        raise ModelUnavailableError(f"{spec}: {weights} is not a compatible state dict ({_first_line(e)})") from None


def _from_library(spec: str, weights: Optional[str], num_classes: Optional[int]) -> Tuple[nn.Module, dict]:
    """A torchvision or timm architecture with random weights, then the local state dict.
    Returns the net and its defaults (mean, std, input_size)."""
    head, arch = _split(spec)
    check_user_spec(spec, weights)
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    defaults = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": 224}
    try:
        if head == "torchvision":
            import torchvision.models as tvm

            net = tvm.get_model(arch, weights=None, **kwargs)
            if arch.startswith("inception"):
                defaults["input_size"] = 299
        else:
            import timm

            net = timm.create_model(arch, pretrained=False, **kwargs)
            cfg = getattr(net, "pretrained_cfg", None) or {}
            defaults["mean"] = tuple(cfg.get("mean", IMAGENET_MEAN))
            defaults["std"] = tuple(cfg.get("std", IMAGENET_STD))
            if cfg.get("input_size"):
                defaults["input_size"] = int(cfg["input_size"][-1])
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelUnavailableError(f"{head} has no architecture {arch!r} ({_first_line(e)})") from None
    _load_state(net, weights or "", spec)
    return net, defaults


def declare(model: nn.Module, *, input_size: Optional[int] = None, num_classes: Optional[int] = None, probe: bool = True,
            name: str = "the model") -> nn.Module:
    """Set ``model.input_size`` and ``model.num_classes`` from the arguments or the model's own
    attributes, and (``probe``) run it once on a grey image to check its output (module docstring).

    Raises:
        ModelUnavailableError: no input size anywhere, a non-(1, K) or non-finite output, or a
            declared number of classes the output contradicts.
    """
    side = input_size if input_size is not None else getattr(model, "input_size", None)
    if side is None:
        raise ModelUnavailableError(f"{name} declares no input size: pass --input-size N (input_size=N), "
                                    "or give the model an input_size attribute")
    if isinstance(side, (tuple, list)):  # e.g. timm's (3, H, W)
        side = side[-1]
    side = int(side)
    if side < 1:
        raise ModelUnavailableError(f"{name}: input size must be at least 1, got {side}")
    declared = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    model.input_size = side
    if probe or declared is None:  # an undeclared number of classes is read from the probe
        was_training = model.training
        model.eval()
        with torch.no_grad():
            try:
                out = model(torch.full((1, 3, side, side), 0.5))
            except Exception as e:  # the user's code: any failure means "this model does not fit"
                raise ModelUnavailableError(f"{name} fails on a (1, 3, {side}, {side}) image in [0, 1] "
                                            f"({type(e).__name__}: {_first_line(e)}); check --input-size") from None
        model.train(was_training)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelUnavailableError(f"{name} must map (N, 3, H, W) images to (N, K) logits; it returned {shape}")
        if not bool(torch.isfinite(out).all()):
            raise ModelUnavailableError(f"{name} returned NaN or infinite logits on a grey image")
        k = int(out.shape[1])
        if declared is not None and int(declared) != k:
            raise ModelUnavailableError(f"{name} declares {int(declared)} classes but returns {k} logits; "
                                        "fix --num-classes (num_classes)")
        declared = k
    if int(declared) < 2:
        raise ModelUnavailableError(f"{name} has {int(declared)} class(es); a classifier needs at least 2")
    model.num_classes = int(declared)
    return model


def create_user_model(spec: str, *, weights: Optional[str] = None, input_size: Optional[int] = None,
                      num_classes: Optional[int] = None) -> Tuple[nn.Module, Optional[dict]]:
    """Build the model a spec names (module docstring), in eval mode, before declaring it.

    Returns the model and, for ``torchvision:``/``timm:``, its normalisation defaults.
    """
    check_user_spec(spec, weights)
    head, tail = _split(spec)
    if head == "torchscript":
        if weights:
            raise ModelUnavailableError("a TorchScript file holds its weights; drop --weights")
        return _load_torchscript(tail), None
    if head in ("torchvision", "timm"):
        return _from_library(spec, weights, num_classes)
    return _from_callable(spec, weights), None

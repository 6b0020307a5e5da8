"""The pieces a run is built from: the device, the classifier and the defended classifier.

Shared by ``prepdefense reproduce`` (``reproduce.py``) and every sub-command (``cli/common.py``
re-exports these names), so the experiments never import from the CLI above them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .. import defenses, models
from ..defenses import Defended
from ..errors import PrepDefenseError
from ..seeding import make_generator

__all__ = ["UsageError", "resolve_device", "build_model", "build_defense", "build_defended"]


class UsageError(PrepDefenseError):
    """A problem the user can fix; printed as one line, exit status 2."""


def resolve_device(name: Optional[str]) -> torch.device:
    """``auto`` (or None) -> CUDA when available, else CPU; otherwise the named device."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"bad --device {name!r}: use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for, but no CUDA device is available; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there is no CUDA device {dev.index} "
                             f"({torch.cuda.device_count()} visible: cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def build_model(name: str, weights: Optional[str], device: torch.device, *, input_size: Optional[int] = None,
                num_classes: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None) -> nn.Module:
    """``models.create`` with unknown names turned into a one-line usage error.

    ``name`` may be a user's model (``torchscript:PATH``, ``package.module:callable``,
    ``torchvision:ARCH``, ``timm:ARCH``); ``input_size``/``num_classes`` declare what it does
    not, ``mean``/``std`` wrap it in :class:`~prepdefense.models.Normalize`."""
    kwargs = {"weights": weights} if weights else {}
    try:
        model = models.create(name, input_size=input_size, num_classes=num_classes, mean=mean, std=std, **kwargs)
    except KeyError as e:
        raise UsageError(str(e.args[0]) if e.args else f"unknown model {name!r}") from None
    except TypeError as e:
        if "weights" not in str(e):
            raise
        raise UsageError(f"model {name!r} takes no --weights") from None
    except ValueError as e:
        raise UsageError(f"--model {name}: {e}") from None
    return model.to(device).eval()


def build_defense(defense_name: str) -> Optional[nn.Module]:
    """``defenses.create(name)``, ``None`` for ``none``; an unknown or malformed name is a
    :class:`UsageError` (one line)."""
    name = (defense_name or "none").strip()
    try:
        name = defenses.normalize_name(name)
        return None if name == "none" else defenses.create(name)
    except KeyError as e:
        raise UsageError(str(e.args[0]) if e.args else f"unknown defense {name!r}") from None
    except ValueError as e:
        raise UsageError(f"bad --defense {defense_name!r}: {e}") from None


def build_defended(model: nn.Module, defense_name: str, seed: int, device: torch.device,
                   defend_at: Optional[int] = None, *, defense: Optional[nn.Module] = None) -> nn.Module:
    """``Defended(defenses.create(name), model, defend_at=defend_at)`` seeded with ``seed``; the
    bare model for ``none`` (resized from ``defend_at`` to the model's input when set).
    ``defense``: the defense :func:`build_defense` made of ``defense_name`` already (it is
    used, not built again)."""
    if defense is None:
        defense = build_defense(defense_name)
    if defense is None:
        if defend_at is None:
            return model
        defense = defenses.create("none")
    return Defended(defense, model, generator=make_generator(seed), defend_at=defend_at).to(device)

"""foolbox 3 both ways (issue 12, item 3).

* :func:`as_foolbox_model`: a (defended) classifier as a ``foolbox.PyTorchModel``:
  ``Defended(BPDA(defense), model)``, optionally averaged over ``eot`` draws per call
  (:class:`~prepdefense.attacks.interop.adapted.PeerModel`), so foolbox's gradient attacks
  (``LinfPGD``, ``L2PGD``, ...) differentiate through the defense with BPDA.
* :func:`from_foolbox_model`: a foolbox PyTorch model (with its own ``bounds`` and
  ``preprocessing``) as a plain ``nn.Module`` of [0,1] NCHW -> logits, which every prepdefense
  attack and the verdict accept.

foolbox is imported only inside these functions (ImportError naming the ``foolbox`` extra).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import nn

from ...draws import KeyLike
from ...validation import check_images
from .adapted import PeerModel, require_peer

__all__ = ["as_foolbox_model", "from_foolbox_model", "FoolboxModel"]


def as_foolbox_model(model: nn.Module, defense: Union[None, str, nn.Module] = None, *, eot: int = 1,
                     generator: KeyLike = None, fixed_draw: bool = False, approx: Union[None, str, nn.Module] = None,
                     bpda: bool = True, bounds: Tuple[float, float] = (0.0, 1.0), device: Any = None):
    """A foolbox ``PyTorchModel`` around ``PeerModel(model, defense, eot=...)``.

    ``model`` is put in eval mode (what the peer library expects; a prepdefense attack instead
    restores each module's mode when it returns) and is left so: call ``model.train()`` to train it again.

    Args:
        model: classifier on [0,1] NCHW returning logits (a model expecting normalised input
            goes in :class:`prepdefense.models.Normalize` first: foolbox's ``preprocessing``
            would normalise before the defense, which must see [0, 1] images).
        defense: a defense name, a :class:`~prepdefense.defenses.Defense`, or None for the
            bare model.
        eot, generator, fixed_draw, approx, bpda: as :class:`PeerModel` (each call of foolbox
            gets its own draw; ``eot > 1`` averages logits over that many).
        bounds: the value range foolbox attacks in; other than (0, 1) it is mapped to [0, 1]
            before the defense (``transform_bounds``).
        device: foolbox's device (default: the device of the model's parameters).

    Raises:
        ImportError: foolbox is not installed.
    """
    fb = require_peer("foolbox", "foolbox", "as_foolbox_model")
    peer = PeerModel(model, defense, eot=eot, generator=generator, fixed_draw=fixed_draw, approx=approx, bpda=bpda).eval()
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    fmodel = fb.PyTorchModel(peer, bounds=(0.0, 1.0), device=device)
    if tuple(float(b) for b in bounds) != (0.0, 1.0):
        fmodel = fmodel.transform_bounds(tuple(bounds))
    return fmodel


class FoolboxModel(nn.Module):
    """A foolbox model whose native tensors are torch's, as a plain module: [0,1] NCHW ->
    logits, differentiable (foolbox's preprocessing runs in torch on the autograd graph).

    The input is mapped from [0, 1] to the model's ``bounds``. ``module`` (the torch module
    inside, when given) is registered so ``eval()`` and ``parameters()`` reach it; foolbox keeps
    no reference to it that could be read back.

    Shape: (N, C, H, W) in [0, 1] -> (N, K).
    """

    #: It runs its defense's draws itself: an attack does not look for defenses inside it
    #: (:func:`prepdefense.attacks.base.check_model`).
    holds_own_draws = True

    def __init__(self, fmodel: Any, module: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.fmodel = fmodel
        self.net = module
        lo, hi = fmodel.bounds
        self._bounds = (float(lo), float(hi))
        for attr in ("input_size", "num_classes"):
            if module is not None and getattr(module, attr, None) is not None:
                setattr(self, attr, int(getattr(module, attr)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_images(x)
        lo, hi = self._bounds
        if (lo, hi) != (0.0, 1.0):
            x = x * (hi - lo) + lo
        z = self.fmodel(x)
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"the foolbox model returned {type(z).__name__}, not a torch.Tensor; "
                            "from_foolbox_model takes foolbox PyTorch models")
        return z


def from_foolbox_model(fmodel: Any, module: Optional[nn.Module] = None) -> FoolboxModel:
    """A foolbox model (``fb.PyTorchModel``, possibly ``transform_bounds``-ed) as an
    ``nn.Module`` of [0,1] NCHW -> logits (:class:`FoolboxModel`).

    Args:
        fmodel: the foolbox model.
        module: the torch module inside it, optional (for ``eval()``, ``parameters()`` and its
            ``input_size`` / ``num_classes``).

    Raises:
        ImportError: foolbox is not installed.
        TypeError: ``fmodel`` is not a foolbox model.
    """
    fb = require_peer("foolbox", "foolbox", "from_foolbox_model")
    if not isinstance(fmodel, fb.models.Model):
        raise TypeError(f"from_foolbox_model takes a foolbox model (fb.PyTorchModel), got {type(fmodel).__name__}")
    return FoolboxModel(fmodel, module)

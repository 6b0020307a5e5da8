"""torchattacks (issue 12, item 3): a (defended) classifier as the plain ``nn.Module``
torchattacks attacks, with BPDA through the defense and optional EOT.

torchattacks takes any module mapping [0,1] NCHW to logits, so the reverse direction needs no
adapter. It installs with ``--no-deps`` (its pins would replace torch); nothing here imports it.
A model expecting normalised input goes in :class:`prepdefense.models.Normalize` rather than
torchattacks' ``set_normalization_used``, which would normalise before the defense.
torchattacks' own ``EOTPGD`` calls the model ``eot_iter`` times: each call is a fresh draw, so it
composes with ``eot=1`` here.
"""

from __future__ import annotations

from typing import Union

from torch import nn

from ...draws import KeyLike
from .adapted import PeerModel

__all__ = ["as_torchattacks_model"]


def as_torchattacks_model(model: nn.Module, defense: Union[None, str, nn.Module] = None, *, eot: int = 1,
                          generator: KeyLike = None, fixed_draw: bool = False,
                          approx: Union[None, str, nn.Module] = None, bpda: bool = True) -> PeerModel:
    """``PeerModel(model, defense, eot=...)`` in eval mode: what a torchattacks attack takes.

    ``model`` is put in eval mode (what the peer library expects; a prepdefense attack instead
    restores each module's mode when it returns) and is left so: call ``model.train()`` to train it again.

    Args: as :class:`~prepdefense.attacks.interop.adapted.PeerModel` (each call gets its own
    draw from ``generator``; ``eot > 1`` averages logits over that many draws per call).

    Shape: (N, C, H, W) in [0, 1] -> (N, K).
    """
    return PeerModel(model, defense, eot=eot, generator=generator, fixed_draw=fixed_draw, approx=approx, bpda=bpda).eval()

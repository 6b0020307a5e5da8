"""The ART preprocessor class itself. Importing this module imports ART; the public entry is
:func:`prepdefense.attacks.interop.art.as_art_preprocessor`, which imports it only when called."""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from art.defences.preprocessor.preprocessor import PreprocessorPyTorch
from torch import nn

from ...defenses.base import Defense
from ...draws import KeyLike
from ...validation import check_images
from ..bpda import BPDA
from .adapted import DrawSource

__all__ = ["DefensePreprocessor"]


class DefensePreprocessor(PreprocessorPyTorch):
    """A prepdefense defense as an ART ``PreprocessorPyTorch`` (see
    :func:`~prepdefense.attacks.interop.art.as_art_preprocessor` for the arguments).

    ``forward(x, y)`` runs on ART's autograd graph (a ``PyTorchClassifier`` whose preprocessing
    is all PyTorch calls it there for ``loss_gradient`` and ``class_gradient``): its value is
    the defense's output on the call's draw and its gradient BPDA's. With ``eot > 1`` and a
    gradient asked for (``x.requires_grad``), each image is repeated once per draw, image ``i``'s
    ``eot`` draws next to each other, and ``y`` is repeated to match, so ART's loss over the
    longer batch averages the per-draw losses and its gradient is the EOT average (with ART's
    default mean-reduced loss; a sum-reduced one gives ``eot`` times it). ``class_gradient``
    calls without ``y`` and backpropagates each class's outputs summed over the longer batch,
    so there the views pass back ``1 / eot`` of their gradient (same values), and the class
    gradient is the EOT average too. Every call without ``y`` that asks for a gradient is
    taken to sum over the rows that way (ART's ``get_activations`` with ``framework=True``
    also calls without ``y``: an attack that averages the rows itself gets ``1 / eot`` of the
    average there). Without a gradient (``predict``) one draw per image is
    returned, as a deployed defense would give.

    ``estimate_forward(x)`` (ART's path for a chain with a non-PyTorch preprocessor) is one
    draw with BPDA's gradient, never repeated.
    """

    params = ["eot", "clip_values"]

    def __init__(self, defense: Defense, *, eot: int = 1, generator: KeyLike = None, fixed_draw: bool = False,
                 approx: Union[None, str, nn.Module] = None, bpda: bool = True,
                 clip_values: Tuple[float, float] = (0.0, 1.0), device_type: str = "gpu",
                 apply_fit: bool = False, apply_predict: bool = True) -> None:
        super().__init__(device_type=device_type, is_fitted=True, apply_fit=apply_fit, apply_predict=apply_predict)
        self.defense = defense
        self.stage = BPDA(defense, approx) if bpda else defense
        self.eot = int(eot)
        self.clip_values = (float(clip_values[0]), float(clip_values[1]))
        self.source = DrawSource(generator, fixed=fixed_draw)
        self._check_params()

    def _check_params(self) -> None:
        if self.eot < 1:
            raise ValueError(f"eot must be at least 1, got {self.eot}")
        lo, hi = self.clip_values
        if not hi > lo:
            raise ValueError(f"clip_values must be (min, max) with min < max, got {self.clip_values}")
        if int(getattr(self.defense, "ensemble", 1)) > 1:
            raise ValueError(
                f"{type(self.defense).__name__} averages the classifier's softmax over {self.defense.ensemble} draws, "
                "which a preprocessor cannot do; use as_art_classifier(model, defense) instead (the defense on the model side)"
            )

    # -- the defense on [0, 1] images, in ART's value range ----------------------------------------
    def _to_unit(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.clip_values
        return x if (lo, hi) == (0.0, 1.0) else (x - lo) / (hi - lo)

    def _from_unit(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.clip_values
        return x if (lo, hi) == (0.0, 1.0) else x * (hi - lo) + lo

    def _views(self, x: torch.Tensor, draws: int) -> torch.Tensor:
        """(N * draws, C, H', W'): image ``i``'s ``draws`` views at rows ``i*draws .. i*draws+draws-1``."""
        x01 = check_images(self._to_unit(x), name="the input of the defense preprocessor")
        self.stage.to(x01.device)
        if not self.defense.randomized:
            return self._from_unit(self.stage.run(x01, None)).repeat_interleave(draws, dim=0)
        key = self.source.key(x.shape[0])
        if draws == 1:
            return self._from_unit(self.stage.run(x01, self.stage.sample_params(x01, key)))
        views = [self.stage.run(x01, self.stage.sample_params(x01, key.child("eot", j))) for j in range(draws)]
        return self._from_unit(torch.stack(views, dim=1).flatten(0, 1))

    def forward(self, x: torch.Tensor, y: Optional[Any] = None) -> Tuple[torch.Tensor, Optional[Any]]:
        draws = self.eot if (self.eot > 1 and self.defense.randomized and torch.is_grad_enabled() and x.requires_grad) else 1
        out = self._views(x, draws)
        if draws > 1 and isinstance(y, torch.Tensor):
            y = y.repeat_interleave(draws, dim=0)
        elif draws > 1 and y is None:  # class_gradient: a sum over the draws, made their average
            out = out.detach() + (out - out.detach()) / draws
        return out, y

    def estimate_forward(self, x: torch.Tensor, y: Optional[Any] = None) -> torch.Tensor:
        return self._views(x, 1)

    def __repr__(self) -> str:
        return (f"DefensePreprocessor(defense={type(self.defense).__name__}, eot={self.eot}, draws={self.source!r}, "
                f"bpda={isinstance(self.stage, BPDA)}, clip_values={self.clip_values})")

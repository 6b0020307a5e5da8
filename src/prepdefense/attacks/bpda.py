"""BPDA: Backward Pass Differentiable Approximation (Athalye et al. 2018; paper Sections 4, 6.2, 6.4).

The forward pass runs the real defense ``g``; the backward pass uses the gradient of a
differentiable approximation ``a`` of it (advertorch's ``BPDAWrapper`` idea, written here as
the straight-through form ``a(x) + (g(x) - a(x)).detach()``: its value is exactly ``g(x)``
and its gradient is exactly that of ``a``).

How the backward pass is chosen (``approx``):

* ``None`` (default, "auto"): the best gradient the defense allows without training anything,
  read from what the defense declares (:meth:`~prepdefense.defenses.Defense.stages` and each
  stage's ``differentiable``), with no guessing:

  - a ``differentiable`` defense (e.g. ``none``, ``grid-distort``) keeps its real gradient
    (so BPDA composes with differentiable defenses without weakening the attack);
  - a defense made of stages (``dct-distort`` = ``quantize`` then ``distort``, a ``+``
    chain) is handled stage by stage, each stage run once with its own part of the draw:
    differentiable stages keep their real gradient, the others get identity BPDA ("BPDA
    through the non-differentiable parts", PROTOCOL.md "Strong adaptive attack"). For
    ``dct-distort`` only the quantisation is approximated by the identity;
  - any other defense: identity BPDA, ``g'(x) = x`` (the paper's BPDA, Section 6.2). When the
    defense changes the image size (``changes_size``) the identity cannot match the shapes and
    the approximation becomes a bilinear resize of ``x`` to the output size (a crude stand-in;
    mark such a defense ``differentiable`` if its ``apply`` is differentiable, as it then gets
    its real gradient instead).
* ``"identity"``: identity BPDA even for differentiable defenses (shapes must match).
* an ``nn.Module`` (a differentiable function, or a learned network such as the Section 6.4
  auto-encoder): ``a = approx(x)``; its output must have the defense's output shape.

``BPDA`` is itself a defense-like module (same ``randomized``/``ensemble``/``changes_size``,
``differentiable = True``), so the attacked model is written on the model side as
``Defended(BPDA(defense), classifier)`` and every attack runs through it unchanged
(STYLE.md, "Composition lives on the model side"). :func:`with_bpda` does that rewrite for an
existing ``Defended`` model.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..defenses.base import Defense, as_defense
from ..defenses.defended import Defended
from ..draws import KeyLike, Params

__all__ = ["BPDA", "straight_through", "with_bpda", "bpda_model"]


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``surrogate + (value - surrogate).detach()``: the value of ``value``, the gradient of
    ``surrogate`` (both of one shape)."""
    if value.shape != surrogate.shape:
        raise ValueError(
            f"BPDA approximation has shape {tuple(surrogate.shape)} but the defense outputs "
            f"{tuple(value.shape)}; pass an approx whose output matches the defense's"
        )
    return surrogate + (value.detach().to(surrogate.dtype) - surrogate).detach()


class BPDA(Defense):
    """A defense whose backward pass is replaced by a differentiable approximation.

    Args:
        defense: the defense ``g`` (a :class:`~prepdefense.defenses.Defense`; a plain module
            is wrapped by :func:`~prepdefense.defenses.base.as_defense`).
        approx: ``None`` (auto, see the module docstring), ``"identity"``, or a differentiable
            ``nn.Module`` mapping ``x`` to an approximation of ``g(x)``.

    It draws exactly as ``defense`` does (``sample_params`` is the defense's), so for the same
    draw its value is exactly ``g(x)``; only the gradient differs.

    Shape: (N, C, H, W) -> the defense's output shape.
    """

    differentiable = True

    def __init__(self, defense: nn.Module, approx: Union[None, str, nn.Module] = None) -> None:
        super().__init__()
        if isinstance(approx, str) and approx != "identity":
            raise ValueError(f"approx must be None, 'identity' or an nn.Module, got {approx!r}")
        self.defense = as_defense(defense)
        self.approx = approx if isinstance(approx, nn.Module) else None
        self.mode = "identity" if approx == "identity" else ("module" if isinstance(approx, nn.Module) else "auto")
        self.randomized = bool(self.defense.randomized)
        self.ensemble = int(self.defense.ensemble)
        self.changes_size = bool(self.defense.changes_size)

    def output_size(self, height: int, width: int):
        return self.defense.output_size(height, width)

    def sample_params(self, x: torch.Tensor, generator: KeyLike = None) -> Optional[Params]:
        return self.defense.sample_params(x, generator)

    def apply(self, x: torch.Tensor, params: Optional[Params]) -> torch.Tensor:
        if self.mode == "module":
            return straight_through(self.defense.run(x, params), self.approx(x))
        if self.mode == "identity":
            value = self.defense.run(x, params)
            if value.shape != x.shape:
                raise ValueError(
                    f"identity BPDA needs a size-preserving defense; {type(self.defense).__name__} maps "
                    f"{tuple(x.shape)} to {tuple(value.shape)} (use approx=None or a module)"
                )
            return straight_through(value, x)
        return _auto(self.defense, x, params)

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


def _auto(defense: Defense, x: torch.Tensor, params: Optional[Params]) -> torch.Tensor:
    """The "auto" backward pass from the defense's declaration (module docstring)."""
    if defense.differentiable:
        return defense.apply(x, params)
    stages = defense.stages()
    if stages:
        for name, stage in stages:
            x = _auto(stage, x, None if params is None else params.get(name))
        return x
    value = defense.run(x, params)
    if value.shape == x.shape:
        return straight_through(value, x)
    surrogate = F.interpolate(x, size=value.shape[-2:], mode="bilinear", align_corners=False)
    return straight_through(value, surrogate)


def with_bpda(model: nn.Module, approx: Union[None, str, nn.Module] = None) -> nn.Module:
    """Rewrite ``Defended(defense, clf)`` as ``Defended(BPDA(defense, approx), clf)``.

    Models that are not a ``Defended`` (a bare classifier, an ``EOT`` wrapper) or whose
    defense is already a ``BPDA`` are returned unchanged, so attacks may call this on whatever
    model they get.
    """
    if isinstance(model, Defended) and not isinstance(model.defense, BPDA):
        return Defended(BPDA(model.defense, approx), model.model, generator=model._generator, defend_at=model.defend_at)
    return model


def bpda_model(defense: nn.Module, classifier: nn.Module, approx: Union[None, str, nn.Module] = None) -> Defended:
    """``Defended(BPDA(defense, approx), classifier)``: the model attacks differentiate."""
    return Defended(BPDA(defense, approx), classifier)

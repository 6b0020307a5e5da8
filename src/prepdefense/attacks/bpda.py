"""BPDA: Backward Pass Differentiable Approximation (Athalye et al. 2018; paper Sections 4, 6.2, 6.4).

The forward pass runs the real defense ``g``; the backward pass uses the gradient of a
differentiable approximation ``a`` of it (advertorch's ``BPDAWrapper`` idea, written here as
the straight-through form ``a(x) + (g(x) - a(x)).detach()``: its value is exactly ``g(x)``
and its gradient is exactly that of ``a``).

How the backward pass is chosen (``approx``):

* ``None`` (default, "auto"): the best gradient the defense allows without training anything:

  - a defense with ``differentiable = True`` (e.g. ``none``, or a random resize + pad written
    in differentiable torch ops) is run with autograd: the real gradient (so BPDA composes with
    differentiable defenses without weakening the attack);
  - a :class:`~prepdefense.defenses.Compose` chain, or a defense exposing the two parts
    ``quantize`` and ``distort`` (the paper's ``dct-distort``, helper H2), is handled part by
    part: differentiable parts keep their real gradient, the others get identity BPDA
    ("BPDA through the non-differentiable parts", PROTOCOL.md "Strong adaptive attack"). For
    ``dct-distort`` the grid distortion is a gather, differentiable in the pixel values for the
    sampled maps, so only the quantisation is approximated by the identity;
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

from ..defenses.compose import Compose
from ..defenses.defended import Defended
from ..seeding import child_seed, ensure_generator, make_generator

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


def _has_parts(defense: nn.Module) -> bool:
    return isinstance(defense, Compose) or (
        isinstance(getattr(defense, "quantize", None), nn.Module) and isinstance(getattr(defense, "distort", None), nn.Module)
    )


class BPDA(nn.Module):
    """A defense whose backward pass is replaced by a differentiable approximation.

    Args:
        defense: the defense ``g`` (a :class:`~prepdefense.defenses.Defense` or any module
            called as ``defense(x, generator=...)``).
        approx: ``None`` (auto, see the module docstring), ``"identity"``, or a differentiable
            ``nn.Module`` mapping ``x`` to an approximation of ``g(x)``.

    Shape: (N, C, H, W) -> the defense's output shape.
    """

    differentiable = True

    def __init__(self, defense: nn.Module, approx: Union[None, str, nn.Module] = None) -> None:
        super().__init__()
        if isinstance(approx, str) and approx != "identity":
            raise ValueError(f"approx must be None, 'identity' or an nn.Module, got {approx!r}")
        self.defense = defense
        self.approx = approx if isinstance(approx, nn.Module) else None
        self.mode = "identity" if approx == "identity" else ("module" if isinstance(approx, nn.Module) else "auto")
        self.randomized = bool(getattr(defense, "randomized", False))
        self.ensemble = int(getattr(defense, "ensemble", 1))
        self.changes_size = bool(getattr(defense, "changes_size", False))
        self._parts_mode: Optional[str] = None  # how a quantize/distort defense splits (cached)

    def forward(self, x: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        d = self.defense
        if self.mode == "module":
            with torch.no_grad():
                value = d(x, generator=generator)
            return straight_through(value, self.approx(x))
        if self.mode == "auto":
            if getattr(d, "differentiable", False):
                return d(x, generator=generator)
            if isinstance(d, Compose):
                return self._compose_parts(x, generator)
            if _has_parts(d):
                return self._quantize_distort_parts(x, generator)
        with torch.no_grad():
            value = d(x, generator=generator)
        if value.shape == x.shape:
            return straight_through(value, x)
        if self.mode == "identity":
            raise ValueError(
                f"identity BPDA needs a size-preserving defense; {type(d).__name__} maps "
                f"{tuple(x.shape)} to {tuple(value.shape)} (use approx=None or a module)"
            )
        surrogate = F.interpolate(x, size=value.shape[-2:], mode="bilinear", align_corners=False)
        return straight_through(value, surrogate)

    def _compose_parts(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        # Replays Compose.forward's generator scheme exactly, so the value equals d(x, generator).
        g = ensure_generator(generator)
        for part in self.defense.parts:
            sub = make_generator(child_seed(g)) if part.randomized else None
            x = BPDA(part)(x, generator=sub)
        return x

    def _quantize_distort_parts(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        # A two-part defense (dct-distort): run ``distort(quantize(x))`` with BPDA on each part,
        # handing the generator to the random part. On the first call the result is checked
        # against the real forward (same generator state); if a wrapper used its generator
        # differently, a child-seed hand-over is tried, and failing both the whole defense gets
        # identity BPDA. The verdict is cached, so later calls run the defense once.
        d = self.defense
        if self._parts_mode is None:
            state = generator.get_state() if generator is not None else None
            with torch.no_grad():
                value = d(x, generator=generator)
            quantized = BPDA(d.quantize)(x, generator=None)
            for mode in ("direct", "child"):
                if state is None:
                    replay = None
                else:
                    replay = torch.Generator(device="cpu")
                    replay.set_state(state)
                surrogate = BPDA(d.distort)(quantized, generator=self._hand_over(replay, mode))
                if surrogate.shape == value.shape and torch.allclose(surrogate.detach(), value, atol=1e-5):
                    self._parts_mode = mode
                    return straight_through(value, surrogate)
            self._parts_mode = "whole"
            return straight_through(value, x)
        if self._parts_mode == "whole":
            with torch.no_grad():
                value = d(x, generator=generator)
            return straight_through(value, x)
        quantized = BPDA(d.quantize)(x, generator=None)
        return BPDA(d.distort)(quantized, generator=self._hand_over(generator, self._parts_mode))

    @staticmethod
    def _hand_over(generator: Optional[torch.Generator], mode: str) -> Optional[torch.Generator]:
        if generator is None or mode == "direct":
            return generator
        return make_generator(child_seed(generator))

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


def with_bpda(model: nn.Module, approx: Union[None, str, nn.Module] = None) -> nn.Module:
    """Rewrite ``Defended(defense, clf)`` as ``Defended(BPDA(defense, approx), clf)``.

    Models that are not a ``Defended`` (a bare classifier, an ``EOT`` wrapper) or whose
    defense is already a ``BPDA`` are returned unchanged, so attacks may call this on whatever
    model they get.
    """
    if isinstance(model, Defended) and not isinstance(model.defense, BPDA):
        return Defended(BPDA(model.defense, approx), model.model, generator=model._generator)
    return model


def bpda_model(defense: nn.Module, classifier: nn.Module, approx: Union[None, str, nn.Module] = None) -> Defended:
    """``Defended(BPDA(defense, approx), classifier)``: the model attacks differentiate."""
    return Defended(BPDA(defense, approx), classifier)

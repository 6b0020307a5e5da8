"""``Defended(defense, model)``: the model a user deploys, ``f(g(x))`` (paper Section 4).

Composition lives on the model side, so attacks never special-case a defense. Like a defense,
a ``Defended`` model draws with ``sample_params(x, generator)`` and replays with
``apply(x, params)`` (:mod:`prepdefense.draws`), so EOT and the verdict on fresh draws can
hold, save and replay the exact draw that fooled it.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..draws import KeyLike, Params, as_key
from ..validation import check_int
from .base import Defense, as_defense, check_images, replay, shaped_like
from .identity import Identity

__all__ = ["Defended", "resize_images", "undefended_at", "ENSEMBLE_GRAPH_IMAGES"]

#: For an ensemble defense under autograd: when ``ensemble x N`` images would exceed this, each
#: member's classifier pass is checkpointed (``torch.utils.checkpoint``): its activations are
#: freed after the forward and recomputed, one member at a time, in the backward. Without it an
#: attack step on 10 images through Guo et al.'s 30 crops holds 300 images' activations (more
#: than 24 GB for EfficientNet-Lite0); with it, 10 images' (about 1 GB), for one more forward
#: pass per member. The attacks' EOT chunk (``attacks.eot.EOT_CHUNK_IMAGES``) is this same budget.
ENSEMBLE_GRAPH_IMAGES = 16


def resize_images(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``x`` resized to ``size`` = (H, W): bilinear, antialiased when shrinking (as Pillow's
    ``resize`` with ``BILINEAR``), clamped to [0, 1]; ``x`` itself when it has that size.
    Differentiable, so attacks see through it.

    Shape: (N, C, H0, W0) -> (N, C, H, W).
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True).clamp(0.0, 1.0)


def _side_pair(size: Union[None, int, Tuple[int, int]], name: str = "defend_at") -> Optional[Tuple[int, int]]:
    """``size`` as (H, W): one side S for both, or a pair; None stays None. TypeError /
    ValueError for anything else (a string, a bool, a fraction, three sides, a side below 1)."""
    if size is None:
        return None
    if isinstance(size, (str, bytes)) or not isinstance(size, (tuple, list)):
        if isinstance(size, (str, bytes)):
            raise TypeError(f"{name} must be a side S or a pair (H, W) of whole numbers, got the string {size!r}")
        side = check_int(size, name)
        return (side, side)
    if len(size) != 2:
        raise ValueError(f"{name} must be a side S or a pair (H, W), got {len(size)} values: {tuple(size)}")
    return (check_int(size[0], f"{name} height"), check_int(size[1], f"{name} width"))


class Defended(nn.Module):
    """Classifier behind a preprocessing defense: ``logits = model(defense(x))``.

    For defenses with ``ensemble > 1`` (Guo et al.'s 30 random crops) the prediction is the
    mean softmax over that many independent draws (member ``k`` draws under the key's
    sub-stream ``("member", k)``); the returned "logits" are then the log of that mean, so
    ``argmax`` and cross-entropy behave as for a plain classifier.

    Args:
        defense: a :class:`Defense` (a plain module called as ``module(x, generator=g)`` is
            wrapped in :class:`~prepdefense.defenses.base.ModuleDefense`).
        model: a classifier taking [0,1] NCHW and returning logits.
        generator: default source of draws when ``forward`` gets none (a seed or
            ``torch.Generator`` keeps a deployed model reproducible); fresh draws if None.
        defend_at: side S (or (H, W)) at which the defense runs: the input is resized to it
            (:func:`resize_images`), defended, and the result resized to the model's input
            (``model.input_size`` when the model declares one, else the input's size).
            None (default): the defense runs on the input as given, at the model's resolution,
            which is the paper's setting for its model (Section 6.1: Inception V3 defended
            at its own 299x299 input). ``defend_at=299`` in front of a 224-px model is the
            paper's 299-px defense kept as is for a smaller model (issue 15 measures both).

    Shape: (N, C, H, W) -> (N, K).
    """

    def __init__(self, defense: Defense, model: nn.Module, *, generator: KeyLike = None,
                 defend_at: Union[None, int, Tuple[int, int]] = None) -> None:
        super().__init__()
        self.defense = as_defense(defense)
        if isinstance(model, type) or isinstance(model, (str, bytes)) or not callable(model):
            what = f"the class {model.__name__}: pass an instance, {model.__name__}()" if isinstance(model, type) else \
                f"{type(model).__name__} {model!r}" if isinstance(model, (str, bytes)) else type(model).__name__
            raise TypeError(f"Defended needs a classifier module mapping [0, 1] NCHW images to logits, got {what}")
        self.model = model
        self._generator = generator
        self.randomized = bool(getattr(defense, "randomized", False))
        self.ensemble = int(getattr(defense, "ensemble", 1))
        self.input_size = getattr(model, "input_size", None)
        self.defend_at = _side_pair(defend_at)

    def _defended_shape(self, x: torch.Tensor):
        return (*x.shape[:2], *self.defend_at) if self.defend_at is not None else tuple(x.shape)

    def _defend(self, x: torch.Tensor, params: Optional[Params]) -> torch.Tensor:
        """The model's input for one draw: the defense's output (run at ``defend_at`` and resized
        to the model's input, ``model.input_size`` or else the input's size, when set). EOT calls
        this for each draw of a chunk."""
        if self.defend_at is None:
            return self.defense.run(x, params)
        defended = self.defense.run(resize_images(x, self.defend_at), params)
        size = _side_pair(self.input_size, "the model's input_size") if isinstance(self.input_size, (int, tuple, list)) else None
        return resize_images(defended, size or tuple(x.shape[-2:]))

    def sample_params(self, x: torch.Tensor, generator: KeyLike = None) -> Optional[Params]:
        """The defense's draw for ``x`` (per ensemble member when ``ensemble > 1``), recorded
        as made for the size the defense runs at: ``defend_at`` when set (then it replays on
        inputs of any size), else ``x``'s height and width."""
        if not self.randomized:
            return None
        key = as_key(generator if generator is not None else self._generator, x.shape[0])
        defended = shaped_like(x, self._defended_shape(x))  # the draw is for the defended size
        if self.ensemble <= 1:
            return self.defense.sample_params(defended, key)
        return Params({str(k): self.defense.sample_params(defended, key.child("member", k))
                       for k in range(self.ensemble)}).for_images(defended)

    def apply(self, x: torch.Tensor, params: Optional[Params]) -> torch.Tensor:
        """Logits for a given draw. For an ensemble on a graph larger than
        :data:`ENSEMBLE_GRAPH_IMAGES` images, each member is checkpointed (same values and
        gradient, one member's activations at a time)."""
        if self.ensemble <= 1:
            return self.model(self._defend(x, params))
        recompute = (torch.is_grad_enabled() and x.requires_grad
                     and self.ensemble * x.shape[0] > ENSEMBLE_GRAPH_IMAGES)
        probs = None
        for k in range(self.ensemble):
            member = None if params is None else params[str(k)]
            p = (checkpoint(self._member_probs, x, member, use_reentrant=False) if recompute
                 else self._member_probs(x, member))
            probs = p if probs is None else probs + p
        return (probs / self.ensemble).clamp_min(1e-12).log()

    def _member_probs(self, x: torch.Tensor, member: Optional[Params]) -> torch.Tensor:
        """Softmax of the classifier on one ensemble member's defended view of ``x``."""
        return self.model(self._defend(x, member)).softmax(dim=1)

    def forward(self, x: torch.Tensor, *, generator: KeyLike = None, params: Optional[Params] = None) -> torch.Tensor:
        """Logits of the defended model on ``x``: a new draw from ``generator`` (else the
        model's own ``generator``, else fresh), or the saved draw ``params`` replayed
        (:func:`~prepdefense.defenses.base.check_draw`). A non-differentiable defense gives
        no gradient to ``x`` (attack through ``BPDA``).

        Shape: (N, C, H, W) in [0, 1] -> (N, K).

        Raises:
            TypeError / ValueError: ``x`` as :func:`~prepdefense.validation.check_images`;
                ``params`` as :func:`~prepdefense.defenses.base.check_draw`.
        """
        x = check_images(x, values=not self.defense.checks_values_in_apply)
        if params is not None:
            return replay(self, params, x, generator, self.apply, size=self.defend_at)  # None: x's own size
        return self.apply(x, self.sample_params(x, generator))


def undefended_at(model: nn.Module, defend_at: Union[None, int, Tuple[int, int]]) -> nn.Module:
    """The bare ``model`` as a model defended at ``defend_at`` sees its input: ``model`` itself,
    or ``Defended(Identity(), model, defend_at=defend_at)`` (resized from side S to the model's
    input). The transfer attack's source, the bare figures of ``judge`` and the attack checks
    use it, so they take the same S-px images as the defended model."""
    return model if defend_at is None else Defended(Identity(), model, defend_at=defend_at)

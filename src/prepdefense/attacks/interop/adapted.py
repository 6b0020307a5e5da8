"""What the peer adapters share: where each call's draw comes from, the defended model a peer
library differentiates, and the lazy import of a peer library.

A peer library (ART, foolbox, torchattacks) calls a model as ``model(x)``: it knows nothing of
draw keys. :class:`DrawSource` decides, call by call, which draw of a random defense that call
gets (fresh, a reproducible stream of fresh draws, or one fixed draw replayed on every call);
:class:`PeerModel` is ``Defended(BPDA(defense), classifier)``, optionally inside
``EOT(., n)``, drawing from a :class:`DrawSource` on every plain call.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Union

import torch
from torch import nn

from ...defenses import Defended, create as create_defense, normalize_name
from ...defenses.base import Defense, as_defense
from ...draws import DrawKey, KeyLike, Params, as_key
from ...seeding import child_seed, make_generator
from ...validation import check_images, check_int
from ..bpda import BPDA
from ..eot import EOT

__all__ = ["DrawSource", "PeerModel", "resolve_defense", "require_peer", "INSTALL_HINTS"]

#: How to install each peer library (the message of the ImportError when it is missing).
INSTALL_HINTS = {
    "art": "pip install 'prepdefense[art]' (adversarial-robustness-toolbox)",
    "foolbox": "pip install 'prepdefense[foolbox]' (foolbox 3)",
    "torchattacks": "pip install --no-deps torchattacks==3.5.1 (its own pins would replace torch)",
}


def require_peer(module: str, peer: str, what: str) -> Any:
    """Import ``module`` of a peer library, or raise an ImportError naming the extra.

    Args:
        module: the module to import (``"art.estimators.classification"``).
        peer: the key of :data:`INSTALL_HINTS` (``"art"``, ``"foolbox"``, ``"torchattacks"``).
        what: the function that needs it, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs {peer}, which is not installed: {INSTALL_HINTS[peer]}") from e


def resolve_defense(defense: Union[None, str, nn.Module]) -> Optional[Defense]:
    """A defense from a name (``"dct-distort"``, ``"fd+rand"``, ``"pkg.mod:Class"``), a module, or
    None; ``None`` and ``"none"`` mean no defense (returns None)."""
    if defense is None:
        return None
    if isinstance(defense, str):
        name = normalize_name(defense.strip())
        return None if name in ("", "none") else create_defense(name)
    if isinstance(defense, nn.Module):
        return as_defense(defense)
    raise TypeError(f"defense must be a name, a Defense (nn.Module) or None, got {type(defense).__name__}")


class DrawSource:
    """Which draw each call of a random defense gets, for callers that pass no key.

    Args:
        generator: ``None`` (a fresh, nondeterministic draw on every call); an ``int`` seed or a
            ``torch.Generator`` (a fresh draw on every call, from a stream that the seed makes
            reproducible); or a :class:`~prepdefense.draws.DrawKey` (one fixed draw, that key's,
            on every call: the key must be for exactly the batch each call gets).
        fixed: with an ``int`` seed, replay one draw on every call instead: call ``k`` of
            ``n`` images gets ``DrawKey(seed, n=n)``, image ``i`` of the batch the draw of id
            ``i`` (so a gradient is reproducible and comparable with prepdefense's own on the
            same key). A ``torch.Generator`` gives one seed for it, drawn now.

    Raises:
        ValueError: ``fixed`` without a seed.
    """

    def __init__(self, generator: KeyLike = None, *, fixed: bool = False) -> None:
        self._key: Optional[DrawKey] = None
        self._seed: Optional[int] = None
        self._stream: Optional[torch.Generator] = None
        if isinstance(generator, DrawKey):
            self._key = generator
        elif fixed:
            if generator is None:
                raise ValueError("a fixed draw needs a seed (an int), a torch.Generator or a DrawKey")
            self._seed = child_seed(generator) if isinstance(generator, torch.Generator) else int(as_key(generator, 1).seed)
        elif isinstance(generator, torch.Generator):
            self._stream = generator
        elif generator is not None:
            self._stream = make_generator(int(as_key(generator, 1).seed))
        self.fixed = self._key is not None or self._seed is not None

    def key(self, n: int) -> DrawKey:
        """The key of the next call's draw for a batch of ``n`` images.

        Raises:
            ValueError: a fixed :class:`DrawKey` for another number of images.
        """
        if self._key is not None:
            if len(self._key) != n:
                raise ValueError(f"the fixed draw key is for {len(self._key)} images but this call has {n}; "
                                 f"give a seed with fixed_draw=True (the draw then follows batch positions), or "
                                 f"make the peer attack's batch size match the key")
            return self._key
        if self._seed is not None:
            return DrawKey(self._seed, n=n)
        if self._stream is not None:
            return DrawKey(child_seed(self._stream), n=n)
        return as_key(None, n)

    def __repr__(self) -> str:
        kind = "fixed key" if self._key is not None else "fixed seed" if self._seed is not None else "seeded stream" if self._stream is not None else "fresh"
        return f"DrawSource({kind})"


class PeerModel(nn.Module):
    """A defended classifier as a peer library differentiates it: ``Defended(BPDA(defense),
    model)`` (or the bare ``model``), optionally inside ``EOT(., eot)``, called as ``model(x)``.

    The forward value is the real defense's output on the call's draw; the backward pass is
    BPDA's (:mod:`prepdefense.attacks.bpda`: identity through non-differentiable stages, the
    real gradient through differentiable ones, or ``approx``). With ``eot > 1`` a random
    defense is averaged over that many draws per call (:class:`~prepdefense.attacks.eot.EOT`,
    ``reduce`` as there: mean logits by default).

    Args:
        model: classifier mapping [0,1] NCHW to (N, K) logits.
        defense: a defense name, a :class:`~prepdefense.defenses.Defense`, or None / ``"none"``.
        eot: draws averaged per call (1: one draw per call).
        generator, fixed_draw: where each call's draw comes from (:class:`DrawSource`).
        approx: BPDA's backward approximation (None: auto; ``"identity"``; a module).
        bpda: False keeps the defense's own gradient (none through a non-differentiable
            defense: what a naive attack sees).
        reduce: EOT's reduction (``"logits"`` or ``"prob"``).

    A prepdefense attack may call it too: ``model(x, generator=key)`` then uses ``key`` instead
    of the source.

    Shape: (N, C, H, W) in [0, 1] -> (N, K).
    """

    #: It runs its defense's draws itself: an attack does not look for defenses inside it
    #: (:func:`prepdefense.attacks.base.check_model`).
    holds_own_draws = True

    def __init__(self, model: nn.Module, defense: Union[None, str, nn.Module] = None, *, eot: int = 1,
                 generator: KeyLike = None, fixed_draw: bool = False, approx: Union[None, str, nn.Module] = None,
                 bpda: bool = True, reduce: str = "logits") -> None:
        super().__init__()
        eot = check_int(eot, "eot")
        if reduce not in ("logits", "prob"):
            raise ValueError(f"reduce must be 'logits' or 'prob', got {reduce!r}")
        d = resolve_defense(defense)
        inner: nn.Module = model
        if d is not None:
            inner = Defended(BPDA(d, approx) if bpda else d, model)
            if int(eot) > 1 and inner.randomized:
                inner = EOT(inner, int(eot), reduce=reduce)
        self.inner = inner
        self.defense = d
        self.eot = int(eot)
        self.source = DrawSource(generator, fixed=fixed_draw)
        self.randomized = bool(getattr(inner, "randomized", False))
        for attr in ("input_size", "num_classes"):
            if getattr(model, attr, None) is not None:
                setattr(self, attr, int(getattr(model, attr)))

    def sample_params(self, x: torch.Tensor, generator: KeyLike = None) -> Optional[Params]:
        """The draw of one call (the source's when ``generator`` is None)."""
        if not self.randomized:
            return None
        key = as_key(generator, x.shape[0]) if generator is not None else self.source.key(x.shape[0])
        return self.inner.sample_params(x, key)

    def apply(self, x: torch.Tensor, params: Optional[Params]) -> torch.Tensor:
        """Logits for a given draw."""
        return self.inner.apply(x, params) if self.randomized else self.inner(x)

    def forward(self, x: torch.Tensor, *, generator: KeyLike = None) -> torch.Tensor:
        x = check_images(x)
        return self.apply(x, self.sample_params(x, generator))

    def extra_repr(self) -> str:
        return f"eot={self.eot}, draws={self.source!r}"

"""IBM ART (adversarial-robustness-toolbox) both ways (issue 12, item 3).

* :func:`as_art_preprocessor`: a prepdefense defense as an ART ``PreprocessorPyTorch``, for
  ``PyTorchClassifier(..., preprocessing_defences=[...])``. Its ``forward`` runs the real
  defense with BPDA's gradient, so ART's attacks (``ProjectedGradientDescent``, anything
  calling ``loss_gradient`` / ``class_gradient``) get the same gradient as prepdefense's
  ``with_bpda`` on the same draw; ``eot > 1`` averages the gradient over draws.
* :func:`as_art_classifier`: the whole defended model (defense, BPDA, EOT) inside an ART
  ``PyTorchClassifier`` — for a defense a preprocessor cannot express (an ensemble defense such
  as ``crop``, which averages the classifier's softmax over draws).
* :func:`from_art_classifier`: an ART ``PyTorchClassifier`` (with its own ``preprocessing``
  and PyTorch preprocessing defences) as a plain ``nn.Module`` of [0,1] NCHW -> logits, which
  every prepdefense attack and the verdict accept.

ART is imported only inside these functions; without it they raise an ImportError naming the
``art`` extra. ART wants one-hot labels in ``generate(x, y)``; its arrays are float32 NCHW
(``channels_first=True``) numpy arrays.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ...draws import KeyLike
from ...validation import check_images
from .adapted import PeerModel, require_peer, resolve_defense

__all__ = ["as_art_preprocessor", "as_art_classifier", "from_art_classifier", "ArtClassifierModel"]


def as_art_preprocessor(defense: Union[str, nn.Module], *, eot: int = 1, generator: KeyLike = None,
                        fixed_draw: bool = False, approx: Union[None, str, nn.Module] = None, bpda: bool = True,
                        clip_values: Tuple[float, float] = (0.0, 1.0), device_type: str = "gpu",
                        apply_fit: bool = False, apply_predict: bool = True):
    """A prepdefense defense as an ART ``PreprocessorPyTorch`` whose ``forward`` carries BPDA.

    Args:
        defense: a defense name (``"dct-distort"``, ``"fd+rand"``, ``"pkg.mod:Class"``) or a
            :class:`~prepdefense.defenses.Defense`.
        eot: draws a gradient is averaged over (Athalye et al.'s EOT). ART sees a batch of
            ``N * eot`` rows (image ``i``'s draws together) whenever a gradient is asked for,
            so its mean loss averages the per-draw losses (``loss_gradient``) and
            ``class_gradient`` is the average of the per-draw class gradients; ``predict``
            sees one draw per image.
        generator: where each call's draw comes from
            (:class:`~prepdefense.attacks.interop.adapted.DrawSource`): None fresh draws; an int
            or ``torch.Generator`` a reproducible stream of fresh draws; a ``DrawKey`` one fixed
            draw for batches of exactly its images.
        fixed_draw: with an int seed, the same draw on every call (image ``i`` of a batch of
            ``n`` gets ``DrawKey(seed, n=n)``'s draw for id ``i``): the gradient then equals
            ``with_bpda(Defended(defense, clf))(x, generator=seed)``'s.
        approx: BPDA's backward approximation (None: auto, per stage; ``"identity"``; a module).
        bpda: False keeps the defense's own gradient (ART then finds none through a
            non-differentiable defense).
        clip_values: the classifier's value range; the defense works on [0, 1], so other
            ranges are mapped there and back.
        device_type: ART's device for its numpy ``__call__`` (``"gpu"`` when available).
        apply_fit, apply_predict: ART's flags (default: at prediction only).

    Returns:
        a ``DefensePreprocessor`` (a subclass of ART's ``PreprocessorPyTorch``).

    Raises:
        ImportError: ART is not installed.
        ValueError: ``eot < 1``, bad ``clip_values``, a fixed draw without a seed, or an
            ensemble defense (use :func:`as_art_classifier`).

    Shape: ``forward``: (N, C, H, W) -> (N, C, H', W'), or (N * eot, ...) with a gradient.
    """
    require_peer("art.defences.preprocessor.preprocessor", "art", "as_art_preprocessor")
    from ._art_preprocessor import DefensePreprocessor

    d = resolve_defense(defense)
    if d is None:
        raise ValueError("as_art_preprocessor needs a defense; 'none' would be no preprocessing at all")
    return DefensePreprocessor(d, eot=eot, generator=generator, fixed_draw=fixed_draw, approx=approx, bpda=bpda,
                               clip_values=clip_values, device_type=device_type, apply_fit=apply_fit,
                               apply_predict=apply_predict)


def _num_classes(model: nn.Module, input_shape: Sequence[int]) -> int:
    k = getattr(model, "num_classes", None)
    if k is not None:
        return int(k)
    p = next(model.parameters(), None)
    with torch.no_grad():
        z = model(torch.full((1, *input_shape), 0.5, device=None if p is None else p.device))
    return int(z.shape[1])


def as_art_classifier(model: nn.Module, defense: Union[None, str, nn.Module] = None, *, eot: int = 1,
                      generator: KeyLike = None, fixed_draw: bool = False, approx: Union[None, str, nn.Module] = None,
                      bpda: bool = True, input_shape: Optional[Sequence[int]] = None, nb_classes: Optional[int] = None,
                      loss: Optional[nn.Module] = None, device_type: str = "gpu"):
    """The defended model ``Defended(BPDA(defense), model)`` (inside ``EOT(., eot)`` when
    ``eot > 1``) as an ART ``PyTorchClassifier`` on [0, 1] images.

    ``model`` is put in eval mode (what the peer library expects; a prepdefense attack instead
    restores each module's mode when it returns) and is left so: call ``model.train()`` to train it again.

    Every call of ART (``predict``, ``loss_gradient``) gets its own draw from ``generator``
    (:class:`~prepdefense.attacks.interop.adapted.PeerModel`); EOT averages logits over draws.

    Args:
        model: classifier on [0,1] NCHW (a model expecting normalised input goes in
            :class:`prepdefense.models.Normalize` first: the defense must see [0, 1] images, so
            ART's own ``preprocessing=(mean, std)``, applied before the model, cannot be used).
        defense, eot, generator, fixed_draw, approx, bpda: as :class:`PeerModel`.
        input_shape: (C, H, W) (default: ``(3, s, s)`` from ``model.input_size``).
        nb_classes: number of classes (default: ``model.num_classes``, else one forward pass).
        loss: ART's loss (default ``nn.CrossEntropyLoss()``).

    Raises:
        ImportError: ART is not installed.
        ValueError: no ``input_shape`` and the model declares no ``input_size``.
    """
    cls = require_peer("art.estimators.classification", "art", "as_art_classifier").PyTorchClassifier
    if input_shape is None:
        size = getattr(model, "input_size", None)
        if size is None:
            raise ValueError("give input_shape=(C, H, W): the model declares no input_size")
        input_shape = (3, int(size), int(size))
    peer = PeerModel(model, defense, eot=eot, generator=generator, fixed_draw=fixed_draw, approx=approx, bpda=bpda).eval()
    k = int(nb_classes) if nb_classes is not None else _num_classes(model, input_shape)
    return cls(peer, loss=loss if loss is not None else nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
               nb_classes=k, clip_values=(0.0, 1.0), channels_first=True, device_type=device_type)


class ArtClassifierModel(nn.Module):
    """An ART ``PyTorchClassifier`` as a plain module: [0,1] NCHW -> logits, differentiable.

    The input is mapped to the classifier's ``clip_values`` range (when it has one other than
    (0, 1)) and its layout (NHWC when ``channels_first`` is False), then run through ART's own
    preprocessing chain (its defences, then ``preprocessing=(mean, std)``) and model in torch,
    on the autograd graph, as ART's framework-native prediction does. A preprocessing chain
    that repeats images (an EOT preprocessor under a gradient) is averaged back to one row per
    image (mean logits over the draws).

    The classifier's module is registered, so ``eval()`` and ``parameters()`` reach it.

    Shape: (N, C, H, W) in [0, 1] -> (N, K).
    """

    #: It runs its defense's draws itself: an attack does not look for defenses inside it
    #: (:func:`prepdefense.attacks.base.check_model`).
    holds_own_draws = True

    def __init__(self, classifier: Any) -> None:
        super().__init__()
        if not getattr(classifier, "all_framework_preprocessing", False):
            names = ", ".join(type(p).__name__ for p in getattr(classifier, "preprocessing_operations", []) or [])
            raise ValueError(
                "from_art_classifier needs every preprocessing step of the classifier to run in PyTorch "
                f"(PreprocessorPyTorch or preprocessing=(mean, std)); this one has: {names or 'none'}"
            )
        self.classifier = classifier
        self.net = classifier.model  # the user's module, registered for eval() / parameters()
        clip = classifier.clip_values
        self._clip = None if clip is None else (float(torch.as_tensor(clip[0]).min()), float(torch.as_tensor(clip[1]).max()))
        self.channels_first = bool(classifier.channels_first)
        self.num_classes = int(classifier.nb_classes)
        shape = tuple(classifier.input_shape)
        c_h_w = shape if self.channels_first else (shape[-1], *shape[:-1])
        if len(c_h_w) == 3 and c_h_w[1] == c_h_w[2]:
            self.input_size = int(c_h_w[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_images(x)
        n = x.shape[0]
        if self._clip is not None and self._clip != (0.0, 1.0):
            lo, hi = self._clip
            x = x * (hi - lo) + lo
        if not self.channels_first:
            x = x.permute(0, 2, 3, 1)
        z, _ = self.classifier._predict_framework(x)
        if z.shape[0] != n:
            if n == 0 or z.shape[0] % n:
                raise ValueError(f"the ART classifier returned {z.shape[0]} rows for {n} images")
            z = z.view(n, z.shape[0] // n, *z.shape[1:]).mean(dim=1)
        return z


def from_art_classifier(classifier: Any) -> ArtClassifierModel:
    """An ART ``PyTorchClassifier`` as an ``nn.Module`` of [0,1] NCHW -> logits
    (:class:`ArtClassifierModel`), for prepdefense's attacks and verdict.

    Raises:
        ValueError: a preprocessing step of the classifier runs in numpy (no gradient through it).
    """
    return ArtClassifierModel(classifier)

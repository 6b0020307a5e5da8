"""What every attack takes and returns, and the one skeleton that runs it (STYLE.md, the
foolbox 3 / torchattacks shape).

An attack is a callable object whose hyperparameters are keyword-only constructor arguments
with the paper's defaults, and whose call is::

    result = attack(model, x, labels=y, targets=t_or_None, generator=seed_or_key, ids=None)

``model`` is any module mapping [0,1] NCHW to logits (a bare classifier, a ``Defended``
model, ``BPDA``/``EOT`` wrappers around one); the model is an argument, never state.

The call is final (:meth:`Attack.__call__`): it checks the inputs, builds the run's
:class:`~prepdefense.draws.DrawKey` (image ``i``'s randomness depends only on the seed, its id
and what it is used for), puts the model in eval mode for the duration and restores it,
splits the images into batches of ``batch_size``, runs :meth:`Attack.run` on each and merges
the results, then calls :meth:`Attack.finish` on the whole. An attack implements ``run``
(one batch) and, if it reports figures over all images, ``finish``. Losses are per sample
(``reduction='none'``) and summed, so batch size never changes a step; with per-image draws
the result of every image is the same whatever the batch size.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..defenses.base import Defense
from ..defenses.defended import Defended
from ..draws import DrawKey, KeyLike, as_key, image_id
from ..model_state import eval_mode
from ..validation import check_images, check_labels, check_targets
from .verdict import merge_histories

__all__ = ["Attack", "AttackResult", "GradientStats", "blocked_gradient", "gradient_health", "check_attack_inputs", "check_model", "eval_mode", "forward", "root_key"]


@dataclass
class AttackResult:
    """Outcome of an attack on a batch.

    Attributes:
        adversarial: the adversarial images, (N, C, H, W) in [0, 1].
        success: per-image success as judged by the attack (targeted: predicted as the
            target; untargeted: not predicted as the true label), (N,) bool.
        history: per-round records when the attack is iterative and asked to keep them,
            e.g. ``[{"round": 1, "accuracy": 0.9, "asr": 0.05, ...}, ...]``.
        info: anything else worth reporting (per-image rounds, distances, diagnostics).
    """

    adversarial: torch.Tensor
    success: torch.Tensor
    history: List[Dict[str, Any]] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)


def check_attack_inputs(x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], *, num_classes: Optional[int] = None):
    """The attack boundary (:mod:`prepdefense.validation`): returns ``(x, labels, targets)``,
    ``x`` clamped into [0, 1] within the documented tolerance; TypeError / ValueError otherwise."""
    x = check_images(x)
    labels = check_labels(labels, x.shape[0], num_classes=num_classes)
    targets = check_targets(targets, labels, num_classes=num_classes)
    return x, labels, targets


def _first_tensor(model: nn.Module) -> Optional[torch.Tensor]:
    """The model's first floating parameter or buffer (None if it has none)."""
    return next((t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)


def _num_classes(model: nn.Module, x: torch.Tensor, key: DrawKey) -> Optional[int]:
    """K from one forward pass on one image (None for an empty batch; a ValueError for an
    output that is not (N, K) logits).

    A failing pass whose cause is the input's device or dtype against the model's own is
    re-raised as one line that says so. Outputs that are probabilities (non-negative, summing
    to 1) get a warning: the attacks' losses take logits."""
    if x.shape[0] == 0:
        return None
    try:
        with torch.no_grad():
            z = forward(model, x[:1], key.child("probe").select(slice(0, 1)))
    except RuntimeError as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        own = _first_tensor(model) if isinstance(model, nn.Module) else None
        about = text.lower()
        if own is not None and own.device != x.device and "device" in about:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {own.device}: move one to the "
                             f"other (x.to('{own.device}') or model.to('{x.device}')); torch said: {text}") from e
        if own is not None and own.dtype != x.dtype and ("type" in about or "dtype" in about):
            raise TypeError(f"x has dtype {x.dtype} but the model's parameters have dtype {own.dtype}: pass "
                            f"x.to({own.dtype}) (or convert the model); torch said: {text}") from e
        raise
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"the model must map (N, C, H, W) images to (N, K) logits; it returned {tuple(getattr(z, 'shape', ()))}")
    if not torch.isfinite(z).all():
        raise ValueError("the model returned NaN or infinite logits on the first image; check the model and its input scaling")
    if z.shape[1] > 1 and float(z.min()) >= 0 and float(z.max()) <= 1 and abs(float(z.double().sum()) - 1) < 1e-4:
        warnings.warn("the model's output on the first image is a probability vector (non-negative, summing to 1), "
                      "not logits: the attacks' losses (cross-entropy, DLR, margin) take logits and their gradients "
                      "vanish on probabilities; remove the final softmax (or return its log)", UserWarning, stacklevel=3)
    return int(z.shape[1])


def _holds_own_draws(m: nn.Module) -> bool:
    """A module that runs its defense's draws itself (the peer adapters: ``PeerModel``, and the
    foreign classifiers of ``from_art_classifier`` / ``from_foolbox_model``): not searched."""
    return bool(getattr(m, "holds_own_draws", False))


def _nested_defenses(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, module)`` of every :class:`Defense` or :class:`Defended` inside ``model`` that an
    attack cannot reach: all of them, except the top model's own defense when the top model
    (under ``EOT`` wrappers) is a ``Defended``. Neither a defense's own insides (a ``BPDA``
    holds the defense it approximates) nor a module that holds its own draws are searched."""
    from .eot import EOT

    while isinstance(model, EOT):
        model = model.model
    if not isinstance(model, nn.Module) or _holds_own_draws(model):
        return
    # the top Defended's own defense is the one attacks reach; its classifier is searched
    start = [("model", model.model)] if isinstance(model, Defended) else list(model.named_children())
    stack = list(reversed(start))
    while stack:
        name, m = stack.pop()
        if _holds_own_draws(m):
            continue
        if isinstance(m, (Defense, Defended)):
            yield name, m
            continue
        stack.extend((f"{name}.{k}", c) for k, c in reversed(list(m.named_children())))


def check_model(model: nn.Module, *, uses_gradient: bool = True) -> None:
    """Refuse a model that holds a defense where an attack cannot reach it
    (``nn.Sequential(defense, classifier)``, the ART / torchattacks way): a random one, whose
    draws would be neither seeded (``generator`` ignored) nor averaged (EOT sees a
    deterministic model, and the verdict judges on one draw); or, for an attack that uses a
    gradient (``uses_gradient``), a non-differentiable one, around which BPDA cannot be put.

    Raises:
        TypeError: ``model`` is not callable.
        ValueError: such a defense, named with where it sits and the fix.
    """
    if not callable(model):
        raise TypeError(f"model must be a callable module mapping [0, 1] NCHW images to logits, got {type(model).__name__}")
    for name, m in _nested_defenses(model):
        inner = m.defense if isinstance(m, Defended) else m
        random = bool(getattr(inner, "randomized", False))
        blocked = uses_gradient and not getattr(inner, "differentiable", False)
        if not (random or blocked):
            continue
        why = []
        if random:
            why.append("it is random, and its draws would be neither seeded by generator= nor averaged by EOT")
        if blocked:
            why.append("it is not differentiable, and BPDA could not be put around it")
        fix = ("pass the Defended model itself, not wrapped in another module" if isinstance(m, Defended)
               else "build the model as prepdefense.defenses.Defended(defense, classifier) and pass that")
        raise ValueError(f"the model holds the defense {type(inner).__name__} at '{name}' inside {type(model).__name__}, "
                         f"where attacks cannot reach it: {'; '.join(why)}; {fix}")


def _image_ids(ids: Union[torch.Tensor, Sequence[Any]], n: int) -> torch.Tensor:
    """``ids`` as an int64 tensor of shape (n,): non-negative integers as they are, names
    (``str``, e.g. the file names :func:`prepdefense.data.load_images` returns) through
    :func:`~prepdefense.draws.image_id`."""
    what = f"ids must be one non-negative integer or one name (str) per image, shape ({n},)"
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{what}; got a single {type(ids).__name__}")
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{what}; got a {ids.dtype} tensor")
        t = ids.detach().to("cpu", torch.int64)
    else:
        items = list(ids)
        if items and all(isinstance(i, str) for i in items):
            t = torch.tensor([image_id(i) for i in items], dtype=torch.int64)
        elif all(isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) for i in items):
            t = torch.tensor([int(i) for i in items], dtype=torch.int64)
        else:
            kinds = sorted({type(i).__name__ for i in items})
            raise TypeError(f"{what}; got {', '.join(kinds)}")
    if t.shape != (n,):
        raise ValueError(f"{what}; got shape {tuple(t.shape)}")
    if n and int(t.min()) < 0:
        raise ValueError(f"{what}; got a negative id ({int(t.min())})")
    return t


def root_key(generator: KeyLike, n: int, ids: Union[None, torch.Tensor, Sequence[Any]] = None) -> DrawKey:
    """The run's key: ``generator`` as :func:`~prepdefense.draws.as_key` reads it, with the
    images' own ``ids`` when given (then draws follow the images, not their positions).

    Raises:
        TypeError / ValueError: ``ids`` that are not one non-negative integer or one name per image.
    """
    key = as_key(generator, n)
    if ids is None:
        return key
    return DrawKey(key.seed, _image_ids(ids, n), key.path)


def forward(model: nn.Module, x: torch.Tensor, key: DrawKey) -> torch.Tensor:
    """``model(x)``, with the draws of ``key`` when the model is random."""
    if getattr(model, "randomized", False):
        return model(x, generator=key)
    return model(x)


def blocked_gradient(model: nn.Module) -> Optional[nn.Module]:
    """The defense that stops the gradient inside ``model`` (a ``Defended`` model, possibly in
    ``EOT``, whose defense is not differentiable and not BPDA), or None."""
    from .eot import EOT

    while isinstance(model, EOT):
        model = model.model
    if isinstance(model, Defended) and not getattr(model.defense, "differentiable", False):
        return model.defense
    return None


def gradient_health(grad: torch.Tensor):
    """Per-image masks ``(zero, nonfinite)`` of a gradient batch (N, ...): all exactly zero
    (a shattered or masked gradient), or holding NaN/inf."""
    flat = grad.detach().flatten(1)
    nonfinite = ~torch.isfinite(flat).all(1)
    return (flat.abs().amax(1) == 0) & ~nonfinite, nonfinite


class GradientStats:
    """Counts of the per-image gradients an attack got that were all zero or held NaN/inf,
    reported as ``result.info["gradient_stats"]`` (so a silent failure shows in the result)."""

    def __init__(self) -> None:
        self.zero = self.nonfinite = self.evaluations = 0

    def add(self, grad: torch.Tensor) -> torch.Tensor:
        """Count a gradient batch; returns its per-image non-finite mask."""
        zero, bad = gradient_health(grad)
        self.zero += int(zero.sum())
        self.nonfinite += int(bad.sum())
        self.evaluations += int(grad.shape[0])
        return bad

    def as_dict(self) -> Dict[str, int]:
        return {"zero_gradients": self.zero, "nonfinite_gradients": self.nonfinite, "gradient_evaluations": self.evaluations}


def _merge_info(parts: List[Dict[str, Any]], sizes: List[int]) -> Dict[str, Any]:
    """See :meth:`Attack.merge_info`."""
    if len(parts) == 1:
        return dict(parts[0])
    merged: Dict[str, Any] = {}
    for k, v in parts[0].items():
        values = [p.get(k) for p in parts]
        if isinstance(v, torch.Tensor) and v.dim() > 0 and all(isinstance(t, torch.Tensor) and t.shape[0] == s for t, s in zip(values, sizes)):
            merged[k] = torch.cat(values, dim=0)
        elif isinstance(v, list) and all(isinstance(t, list) and len(t) == s for t, s in zip(values, sizes)):
            merged[k] = [e for t in values for e in t]
        elif isinstance(v, dict) and v and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v.values()):
            total: Dict[str, Any] = {}
            for t in values:
                for kk, e in (t or {}).items():
                    total[kk] = total.get(kk, 0) + e
            merged[k] = total
        else:
            merged[k] = v
    return merged


class Attack:
    """Base of every attack: the final call (module docstring) around :meth:`run`.

    Each attack names its hyperparameters in ``HYPERPARAMETERS`` (the attributes its
    constructor sets), which :meth:`hyperparameters` records beside results and ``repr``
    shows. ``batch_size`` (None: all images at once) and ``progress`` (a callable
    ``progress(done, total)``, not a hyperparameter) are common to all.
    """

    HYPERPARAMETERS: Tuple[str, ...] = ()
    #: The attack's registered name (set by subclasses).
    name: str = "attack"
    batch_size: Optional[int] = None
    progress: Any = None
    supports_targeted: bool = True
    supports_untargeted: bool = True
    #: The attack puts BPDA through a non-differentiable defense itself (``bpda``, ``adaptive``);
    #: the others refuse a model whose defense has no gradient (:func:`blocked_gradient`).
    composes_bpda: bool = False
    #: The attack differentiates the model (False: it queries outputs only, ``square``, ``spsa``).
    uses_gradient: bool = True

    def hyperparameters(self) -> Dict[str, Any]:
        """Every setting, as recorded beside results."""
        return {k: getattr(self, k) for k in self.HYPERPARAMETERS}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    # -- what an attack implements -----------------------------------------------------------
    def run(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], key: DrawKey) -> AttackResult:
        """Attack one batch (inputs checked and detached, model in eval mode)."""
        raise NotImplementedError(f"{type(self).__name__} must implement run()")

    def finish(self, result: AttackResult, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor], key: DrawKey) -> AttackResult:
        """Figures over all images once every batch has run (default: none)."""
        return result

    def steps_per_batch(self) -> int:
        """Progress units one batch takes (for ``progress``)."""
        return 1

    def _advance(self, *, to: Optional[int] = None, extra: Any = None) -> None:
        """Report progress: one unit done (or all units up to ``to``) as
        ``progress(done, total)`` (``progress(done, total, extra)`` when ``extra`` is given)."""
        done = getattr(self, "_progress_done", 0)
        new = done + 1 if to is None else max(done, to)
        if new == done:
            return
        self._progress_done = new
        if self.progress is not None:
            total = getattr(self, "_progress_total", new)
            self.progress(new, total) if extra is None else self.progress(new, total, extra)

    # -- the skeleton --------------------------------------------------------------------------
    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        *,
        labels: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        generator: KeyLike = None,
        ids: Union[None, torch.Tensor, Sequence[int], Sequence[str]] = None,
    ) -> AttackResult:
        """Attack ``model`` on ``x``.

        Args:
            model: maps [0,1] NCHW to logits.
            x: (N, C, H, W) images in [0, 1].
            labels: (N,) integer true classes (any integer dtype; used as int64).
            targets: (N,) integer target classes (targeted), or None (untargeted).
            generator: the run's seed: an int, a ``torch.Generator``, a ``DrawKey`` or None.
            ids: (N,) non-negative integer image ids, or N names (str, e.g. file names); the
                randomness of image ``i`` depends only on the seed and ``ids[i]`` (default:
                positions ``0..N-1``).

        Returns:
            an :class:`AttackResult` over all N images.

        Raises:
            TypeError / ValueError: inputs that fail :func:`check_attack_inputs`, a model that
                :func:`check_model` refuses, a model whose gradient a non-differentiable
                defense blocks (the message names BPDA), ``x`` on another device or of another
                dtype than the model. A model whose output is probabilities gets a warning.
        """
        check_model(model, uses_gradient=self.uses_gradient)
        x, labels, targets = check_attack_inputs(x, labels, targets)
        if targets is None and not self.supports_untargeted:
            raise ValueError(f"{self.name} is a targeted attack; pass targets")
        if targets is not None and not self.supports_targeted:
            raise ValueError(f"{self.name} is an untargeted attack; call it with targets=None")
        blocked = None if self.composes_bpda else blocked_gradient(model)
        if blocked is not None:
            raise ValueError(
                f"{self.name} differentiates the model, but its defense {type(blocked).__name__} is not differentiable "
                f"(the gradient would be zero or missing); attack with_bpda(model) (prepdefense.attacks.bpda) or "
                f"Defended(BPDA(defense), classifier), or use an attack that composes BPDA itself (bpda, bpda-eot, adaptive)"
            )
        x = x.detach()
        key = root_key(generator, x.shape[0], ids)
        with eval_mode(model):
            k = _num_classes(model, x, key)
        check_attack_inputs(x, labels, targets, num_classes=k)
        labels = labels.to(x.device)
        targets = None if targets is None else targets.to(x.device)
        n = x.shape[0]
        size = self.batch_size or max(n, 1)
        slices = [slice(s, min(s + size, n)) for s in range(0, n, size)]
        per_batch = self.steps_per_batch()
        self._progress_done, self._progress_total = 0, per_batch * len(slices)
        with eval_mode(model):
            results = []
            for b, sl in enumerate(slices):
                self._progress_base = b * per_batch
                results.append(self.run(model, x[sl], labels[sl], None if targets is None else targets[sl], key.select(sl)))
                self._advance(to=(b + 1) * per_batch)
            result = self._merge(results, [sl.stop - sl.start for sl in slices]) if results else AttackResult(x.clone(), torch.zeros(0, dtype=torch.bool))
            return self.finish(result, model, x, labels, targets, key)

    def merge_info(self, parts: List[Dict[str, Any]], sizes: List[int]) -> Dict[str, Any]:
        """The ``info`` of consecutive batches joined: per-image entries (lists or tensors with
        one row per image) in order, counter dicts summed, anything else from the first batch."""
        return _merge_info(parts, sizes)

    def _merge(self, results: List[AttackResult], sizes: List[int]) -> AttackResult:
        if len(results) == 1:
            return results[0]
        return AttackResult(
            adversarial=torch.cat([r.adversarial for r in results]),
            success=torch.cat([r.success.to(results[0].success.device) for r in results]),
            history=merge_histories([r.history for r in results]),
            info=self.merge_info([r.info for r in results], sizes),
        )

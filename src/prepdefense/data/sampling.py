"""The protocol sample: N correctly classified images and a target label each, from a seed
(PROTOCOL.md, "Protocol sample"; paper Section 6.1).

Candidates are visited in an order drawn from the seed and classified in batches by the
undefended model until ``n`` correctly classified ones are found (so only about
``n / accuracy`` images are decoded). Each picked image gets a target drawn uniformly
among the ``K - 1`` other classes of the model's ``K``: ``target = (label + U{1..K-1}) mod K``
(``K = 1000`` for ImageNet; ``K`` is the model's ``num_classes``, else its output width). The visiting order
and the targets come from two generators derived from the seed, so the same seed and data
give the same picks, and the i-th target offset depends only on the seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import DataError
from ..model_state import eval_mode
from ..seeding import child_seed, make_generator
from .loading import NUM_CLASSES, ImageDataset, iter_batches, load_dataset


@dataclass
class ProtocolSample:
    """``n`` images the model classifies correctly, with their labels, targets and ids.

    Shape: x (n, 3, S, S) float [0,1] on the CPU; labels, targets (n,) long.
    """

    x: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    ids: List[str]
    seed: int = 0
    source: str = ""
    #: Readable candidates classified to find the sample, and how many of them were correct.
    tried: int = 0
    correct: int = 0
    skipped: int = 0
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def draw_targets(labels: torch.Tensor, generator: torch.Generator, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """A target per label, uniform among the ``num_classes - 1`` other classes (the model's
    classes: pass its ``num_classes``; 1000 for ImageNet)."""
    if num_classes < 2:
        raise DataError(f"targets need at least 2 classes, got num_classes={num_classes}")
    offsets = torch.randint(1, num_classes, (labels.numel(),), generator=generator)
    return (labels.cpu().long() + offsets) % num_classes


def protocol_sample(
    model: nn.Module,
    source_or_dataset: Union[str, os.PathLike, ImageDataset],
    *,
    n: int,
    seed: int,
    size: Optional[int] = None,
    batch_size: int = 32,
    device: Union[str, torch.device] = "cpu",
    exclude_ids: Iterable[str] = (),
    num_classes: Optional[int] = None,
    load_size: Optional[int] = None,
) -> ProtocolSample:
    """Pick ``n`` images the undefended ``model`` classifies correctly, and a target each.

    Args:
        model: classifier taking [0,1] NCHW, already on ``device`` (run in eval mode here and
            returned in its own mode).
        source_or_dataset: a folder, ``"builtin"``, or an :class:`ImageDataset`.
        n: how many images to pick (the protocol uses 100).
        seed: fixes both the visiting order and the targets.
        size: image side when a source is given (default: ``model.input_size``).
        batch_size: images classified per forward pass.
        device: where the model runs.
        exclude_ids: ids never picked (keeps, e.g., a table-learning set disjoint from
            the evaluation set).
        num_classes: the model's number of classes K, targets are drawn below it (default:
            ``model.num_classes``, else the width of the model's logits).
        load_size: return the picked images at this side instead (read again from the
            source): the sample is still picked by the model at ``size``, but the attacked
            images live at another resolution, e.g. for a defense run at the paper's 299 px
            in front of a 224-px model (``Defended(..., defend_at=299)``). Needs a source.

    Raises:
        TypeError: ``model`` not a module, or ``n``/``seed``/``batch_size`` not integers.
        DataError: ``n`` or ``batch_size`` below 1, a negative ``seed``, a label outside the
            model's classes, or fewer than ``n`` eligible images classified correctly.
    """
    for name, value, least in (("n", n, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
        if int(value) < least:
            raise DataError(f"{name} must be at least {least}, got {value}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module mapping [0,1] NCHW images to logits, got {type(model).__name__}")
    declared = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    if isinstance(source_or_dataset, ImageDataset):
        ds = source_or_dataset
    else:
        side = size or getattr(model, "input_size", None)
        if side is None:
            raise DataError("protocol_sample needs size= for a model without input_size")
        ds = load_dataset(source_or_dataset, size=int(side),
                          num_classes=int(declared) if declared is not None else NUM_CLASSES)
    excluded = set(exclude_ids)
    candidates = [i for i, e in enumerate(ds.entries) if e.id not in excluded]

    root = make_generator(seed)
    order_gen = make_generator(child_seed(root))
    target_gen = make_generator(child_seed(root))
    order = [candidates[j] for j in torch.randperm(len(candidates), generator=order_gen).tolist()]

    xs: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    ids: List[str] = []
    tried = 0
    k = int(declared) if declared is not None else None
    device = torch.device(device)
    with torch.no_grad(), eval_mode(model):  # the user's model comes back in its own mode
        for x, y, batch_ids in iter_batches(ds, batch_size, indices=order):
            tried += len(batch_ids)
            logits = model(x.to(device))
            k = int(logits.shape[1]) if k is None else k
            if int(y.max()) >= k:
                raise DataError(f"label {int(y.max())} in {ds.source} is outside the model's {k} classes (0..{k - 1})")
            pred = logits.argmax(dim=1).cpu()
            ok = (pred == y).nonzero().flatten().tolist()
            for j in ok:
                xs.append(x[j])
                labels.append(y[j])
                ids.append(batch_ids[j])
            if len(ids) >= n:
                break
    correct = len(ids)
    if correct < n:
        raise DataError(
            f"only {correct} of the {tried} readable candidate images in {ds.source} are classified "
            f"correctly by the model ({len(excluded & set(ds.ids))} excluded); {n} were asked for"
        )
    label_t = torch.stack(labels[:n]).long()
    x_out = torch.stack(xs[:n])
    if load_size is not None and int(load_size) != int(x_out.shape[-1]):
        if isinstance(source_or_dataset, ImageDataset):
            raise DataError("load_size needs a folder or 'builtin' as the source, not a dataset")
        x_out, _ = reread_images(source_or_dataset, ids[:n], size=int(load_size), num_classes=declared)
    return ProtocolSample(
        x=x_out,
        labels=label_t,
        targets=draw_targets(label_t, target_gen, k),
        ids=ids[:n],
        seed=int(seed),
        source=ds.source,
        tried=tried,
        correct=correct,
        skipped=ds.skipped,
    )


def reread_images(source: Union[str, os.PathLike], ids: Sequence[str], *, size: int,
                  num_classes: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The images ``ids`` of ``source`` read again at ``size``, in that order, and their labels
    (to check a cached sample against the data it came from).

    Shape: -> x (len(ids), 3, size, size) in [0, 1]; labels (len(ids),) long.

    Raises:
        DataError: the source cannot be read, or an id is no longer listed or readable.
    """
    ds = load_dataset(source, size=int(size), num_classes=int(num_classes) if num_classes is not None else NUM_CLASSES)
    position = {e.id: i for i, e in enumerate(ds.entries)}
    missing = [i for i in ids if i not in position]
    if missing:
        raise DataError(f"{missing[0]} is no longer listed in {ds.source}")
    batches = list(iter_batches(ds, 32, indices=[position[i] for i in ids]))
    got = [i for b in batches for i in b[2]]
    if got != list(ids):
        lost = next(i for i in ids if i not in set(got))
        raise DataError(f"{lost} can no longer be read from {ds.source}")
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

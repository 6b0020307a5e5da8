"""The protocol sample of a run, cached in its store, and checked against the data on resume.

A run (``reproduce``, ``evaluate``) picks its images once (:func:`prepdefense.data.protocol_sample`)
and keeps them in the store, so a resumed run attacks the same images. The run's identity records
the data's path, not its contents; so on resume the cached images are read again from that path
and compared: if a file changed, vanished or got another label, the run refuses to resume
(a result would otherwise mix two versions of the data).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..data import protocol_sample
from ..data.sampling import reread_images
from ..errors import DataError
from .context import Sample
from .store import ConfigMismatchError, ResultStore

__all__ = ["load_or_draw_sample", "check_cached_sample"]


def check_cached_sample(cached: dict, data: Union[str, os.PathLike], *, num_classes: Optional[int] = None) -> None:
    """Read the cached sample's images again from ``data`` and compare them with the cache.

    A data folder that is gone is not checked (a warning): the cache is then all there is, as
    when a finished run is reopened to rebuild its report elsewhere.

    Raises:
        ConfigMismatchError: an image that cannot be read again, or whose pixels or label
            differ from the cached ones (naming the first), with the fix.
    """
    ids = list(cached["ids"])
    x = cached["x"]
    if str(data) != "builtin" and not Path(data).expanduser().exists():
        warnings.warn(f"{data} is not there to check this run's cached images against; resuming from the cache", UserWarning, stacklevel=3)
        return
    fix = ("the images under the data path changed since this run (or decode differently: another Pillow or "
           "prepdefense version); rerun with --fresh or into a new --out")
    try:
        again, labels = reread_images(data, ids, size=int(x.shape[-1]), num_classes=num_classes)
    except DataError as e:
        raise ConfigMismatchError(f"{fix} ({e})") from None
    for i, name in enumerate(ids):
        if not torch.equal(again[i], x[i]):
            raise ConfigMismatchError(f"{fix} ({name} has other pixels)")
        if int(labels[i]) != int(cached["labels"][i]):
            raise ConfigMismatchError(f"{fix} ({name} has label {int(labels[i])}, was {int(cached['labels'][i])})")


def load_or_draw_sample(store: ResultStore, classifier: nn.Module, data: Any, n: int, seed: int, device: torch.device,
                        *, load_size: Optional[int] = None) -> Sample:
    """The protocol sample (the first ``n`` images, in the seed's order, the classifier gets
    right; :func:`~prepdefense.data.protocol_sample`), cached in ``store``: a resumed run reads
    it back, after checking it against ``data`` (:func:`check_cached_sample`; not for a
    dataset object, which has no path to read again). Candidates are classified
    ``min(32, n)`` at a time (the pick does not depend on it).

    Raises:
        ConfigMismatchError: the cached images differ from ``data``'s.
        DataError: as :func:`~prepdefense.data.protocol_sample`.
    """
    cached = store.load_tensors("sample")
    if cached is not None and len(cached.get("ids", [])) == n:
        if isinstance(data, (str, os.PathLike)):
            check_cached_sample(cached, data, num_classes=getattr(classifier, "num_classes", None))
        return Sample(cached["x"], cached["labels"], cached["targets"], cached["ids"], cached.get("info"))
    s = protocol_sample(classifier, data, n=n, seed=seed, device=device, batch_size=min(32, max(1, n)), load_size=load_size)
    info = {"source": s.source, "tried": s.tried, "correct": s.correct, "skipped": s.skipped, "seed": s.seed}
    store.save_tensors("sample", {"x": s.x.cpu(), "labels": s.labels.cpu(), "targets": s.targets.cpu(), "ids": list(s.ids), "info": info})
    return Sample(s.x.cpu(), s.labels.cpu(), s.targets.cpu(), s.ids, info)

"""What every unit of ``prepdefense reproduce`` runs with, and the helpers the experiments share.

:class:`RunContext` holds the preset, the run's seed, the device, the store, the classifier
and the protocol sample; it hands out each unit's generator (from the run's seed and the
unit's id only, ``units.unit_seed``), image shards, defenses and defended models.
:func:`predict_draws` and :func:`image_records` turn predictions under R fresh draws of a
random defense into the per-image records the report reads.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..attacks.verdict import predictions_on_draws
from ..draws import DrawKey, KeyLike, image_id
from .. import seeding
from ..errors import PrepDefenseError
from ..metrics import l2_rms, linf
from . import units as U
from .store import ResultStore

#: How the units key their images' draws (recorded in a run's identity: resuming a run stored
#: under another keying would mix draws). ``unit-stream+image-id-v1``: seed from the run's seed
#: and the unit's id without its image shard (``Unit.stream``), one key per image id.
UNIT_DRAWS = "unit-stream+image-id-v1"

__all__ = ["UNIT_DRAWS", "Sample", "RunContext", "slug", "predict_draws", "image_records", "make_attack", "with_progress"]


class Sample:
    """The protocol sample (x on CPU, labels, targets, ids) plus how it was drawn."""

    def __init__(self, x, labels, targets, ids, info=None):
        self.x = x
        self.labels = labels
        self.targets = targets
        self.ids = list(ids)
        self.info = dict(info or {})

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------------------------
# run context: the model, the sample, defenses and generators for the units
# ---------------------------------------------------------------------------------------------
class RunContext:
    """What every unit needs: preset, seed, device, store, classifier and the sample."""

    def __init__(self, *, preset: U.Preset, seed: int, device: torch.device, store: ResultStore,
                 classifier: nn.Module, sample: Sample, data_source: Any, model_name: str) -> None:
        self.preset = preset
        self.seed = int(seed)
        self.device = torch.device(device)
        self.store = store
        self.classifier = classifier
        self.sample = sample
        self.data_source = data_source
        self.model_name = model_name
        self.progress_hook: Callable[[float], None] = lambda fraction: None
        #: What units of one run may share within this process (e.g. an image selection).
        self.cache: Dict[str, Any] = {}
        self._datasets: Dict[int, Any] = {}

    # -- randomness --------------------------------------------------------------------------
    def generator(self, unit_id: str, purpose: str = "") -> torch.Generator:
        """A CPU generator from the run's seed, the unit's id and a purpose tag."""
        return seeding.make_generator(U.unit_seed(self.seed, unit_id + ("#" + purpose if purpose else "")))

    def image_key(self, unit: U.Unit, ids: Sequence[str], purpose: str = "") -> DrawKey:
        """The draw key of ``unit``'s images ``ids`` (their names): image ``i``'s draws depend
        only on the run's seed, the unit's stream (its id without the image shard) and the
        image's own id (``draws.image_id``), never on the shard or the other images of the
        batch. Pass it as an attack's or a judge's ``generator``."""
        tag = unit.stream + ("#" + purpose if purpose else "")
        return DrawKey(U.unit_seed(self.seed, tag), [image_id(i) for i in ids])

    # -- images --------------------------------------------------------------------------------
    def shard(self, shard: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[str]]:
        """(x, labels, targets, ids) of an image shard of the sample, on the device."""
        sl = U.shard_slice(shard, self.preset.shard_size, len(self.sample))
        if sl.start >= len(self.sample):
            raise ValueError(f"shard {shard} is empty (the sample has {len(self.sample)} images)")
        s = self.sample
        return (s.x[sl].to(self.device), s.labels[sl].to(self.device), s.targets[sl].to(self.device), s.ids[sl])

    def dataset(self, size: Optional[int] = None):
        """The whole image source (Table 1, usability and the approximator's training images),
        read at ``size`` px (default: the classifier's input size)."""
        from ..data import ImageDataset, load_dataset

        model_size = int(getattr(self.classifier, "input_size", 224))
        size = model_size if size is None else int(size)
        if size not in self._datasets:
            if isinstance(self.data_source, ImageDataset) and self.data_source.size == size:
                self._datasets[size] = self.data_source
            elif isinstance(self.data_source, ImageDataset):
                self._datasets[size] = ImageDataset(self.data_source.entries, size=size, source=self.data_source.source,
                                                    crop_fraction=self.data_source.crop_fraction)
            elif isinstance(self.data_source, (str, Path)):
                self._datasets[size] = load_dataset(str(self.data_source), size=size)
            else:
                raise PrepDefenseError("no image source to draw Table 1 / usability / training images from (images were given directly)")
        return self._datasets[size]

    def load_indices(self, indices: Sequence[int], *, size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        """Images ``indices`` of :meth:`dataset` at ``size`` px (unreadable ones skipped)."""
        from ..data import iter_batches

        batches = list(iter_batches(self.dataset(size), 64, indices=list(indices)))
        if not batches:
            raise PrepDefenseError("none of the requested images could be read")
        return (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), sum((b[2] for b in batches), []))

    # -- defenses --------------------------------------------------------------------------------
    def defense(self, name: str, **params: Any) -> nn.Module:
        """``defenses.create(name, **params)`` on the device, the crop ensemble set by the preset."""
        from .. import defenses

        if name == "crop":
            params.setdefault("ensemble", int(self.preset.crop_ensemble))
        d = defenses.create(name, **params)
        if int(getattr(d, "ensemble", 1)) > 1 and int(d.ensemble) != self.preset.crop_ensemble:
            d.ensemble = int(self.preset.crop_ensemble)
        return d.to(self.device).eval()

    def defended(self, name: str, **params: Any) -> nn.Module:
        from ..defenses import Defended

        if name == "none":
            return self.classifier
        return Defended(self.defense(name, **params), self.classifier).eval()


# ---------------------------------------------------------------------------------------------
# small shared helpers
# ---------------------------------------------------------------------------------------------
def slug(text: str) -> str:
    """``text`` as a file-name-safe lower-case tag (cache entries of the experiments)."""
    return re.sub(r"[^A-Za-z0-9.=+-]+", "-", text).strip("-").lower()


@torch.no_grad()
def predict_draws(model: nn.Module, x: torch.Tensor, *, draws: int, generator: KeyLike) -> torch.Tensor:
    """Predicted labels under ``draws`` independent draws of a random model: (R, N) on CPU.

    A deterministic model is run once (R = 1), since every draw would agree.
    """
    return predictions_on_draws(model, x, draws=draws, key=generator).t()


def image_records(ids, labels, targets, preds: torch.Tensor, *, x=None, adv=None, extra: Optional[Dict[str, Sequence]] = None) -> List[Dict[str, Any]]:
    """Per-image records: first-draw prediction and the rates over all R draws."""
    labels_c, targets_c = labels.cpu(), targets.cpu()
    correct = preds == labels_c
    hit = preds == targets_c
    l2 = l2_rms(adv, x).cpu() if adv is not None else None
    li = linf(adv, x).cpu() if adv is not None else None
    out = []
    for i, image_id in enumerate(ids):
        rec = {
            "image_id": image_id,
            "label": int(labels_c[i]),
            "target": int(targets_c[i]),
            "prediction": int(preds[0, i]),
            "predictions": [int(p) for p in preds[:, i]],
            "correct": bool(correct[0, i]),
            "success": bool(hit[0, i]),
            "correct_rate": float(correct[:, i].float().mean()),
            "success_rate": float(hit[:, i].float().mean()),
            "draws": int(preds.shape[0]),
        }
        if l2 is not None:
            rec["l2"] = float(l2[i])
            rec["linf"] = float(li[i])
        for k, vals in (extra or {}).items():
            rec[k] = vals[i]
        out.append(rec)
    return out


def make_attack(name: str, **params: Any):
    """``attacks.create(name, **params)``, imported when a unit needs it (a missing attack fails
    that unit, not the run)."""
    from .. import attacks

    return attacks.create(name, **params)


def with_progress(params: Dict[str, Any], name: str, hook: Callable[[float], None]) -> Dict[str, Any]:
    """Add a ``progress`` callback when the attack's factory/class accepts one."""
    from .. import attacks

    try:
        factory = attacks.REGISTRY.get(name)
    except (KeyError, AttributeError):
        return params
    sig_ok = False
    try:
        sig = inspect.signature(factory)
        sig_ok = "progress" in sig.parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    except (TypeError, ValueError):
        pass
    if not sig_ok:
        return params

    def progress(done, total, *_rest):
        try:
            hook(min(1.0, float(done) / max(1.0, float(total))))
        except Exception:  # noqa: BLE001 - progress must never break an attack
            pass

    return {**params, "progress": progress}

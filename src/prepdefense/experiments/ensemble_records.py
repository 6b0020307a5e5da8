"""The attack ensemble's verdicts as store records, and back (``prepdefense evaluate``'s units,
``experiments/evaluation.py``, and ``reproduce``'s strong-attack chains, ``experiments/strong.py``).

A ``clean`` unit stores one record per image (``image_id``, ``label``, ``correct``: one bool per
verdict draw, ``correct_fraction``); an attack's unit one record per image it attacked
(``image_id``, ``correct``, ``correct_fraction``, ``distance`` in the threat model's norm, ``l2``
and ``linf``). Replaying them through :class:`~prepdefense.attacks.ensemble.EnsembleState`
gives back the state the next attack runs on (auto-attack's rule needs only the verdicts).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from ..attacks import ensemble as E
from ..errors import PrepDefenseError

__all__ = ["clean_records", "attack_records", "steps_from_records", "state_from_clean"]


def clean_records(state: E.EnsembleState, ids: Sequence[str], labels: torch.Tensor) -> List[Dict[str, Any]]:
    """One record per image: the clean verdict (R draws)."""
    return [{"image_id": i, "label": int(labels[j]), "correct": [bool(c) for c in state.correct[j]],
             "correct_fraction": float(state.correct[j].float().mean())} for j, i in enumerate(ids)]


def attack_records(step: E.StepOutcome, ids: Sequence[str], x: torch.Tensor) -> List[Dict[str, Any]]:
    """One record per attacked image: the verdict of its example and its distances."""
    from ..metrics import l2_rms, linf

    out = []
    for j, row in enumerate(step.rows.tolist()):
        rec = {"image_id": ids[row], "correct": [bool(c) for c in step.correct[j]], "correct_fraction": float(step.correct[j].float().mean())}
        if step.distance is not None and step.distance.numel():
            rec["distance"] = float(step.distance[j])
        if step.adversarial is not None:
            a, c = step.adversarial[j : j + 1], x[row : row + 1].to(step.adversarial.device)
            rec["l2"], rec["linf"] = float(l2_rms(a, c)), float(linf(a, c))
        out.append(rec)
    return out


def steps_from_records(label: str, kind: str, records: Sequence[Dict[str, Any]], ids: Sequence[str], draws: int,
                       offset: int = 0) -> E.StepOutcome:
    """The :class:`~prepdefense.attacks.ensemble.StepOutcome` a unit's records stand for
    (rows are positions in ``ids``, plus ``offset``)."""
    pos = {name: j for j, name in enumerate(ids)}
    recs = [r for r in records if r.get("image_id") in pos]
    rows = torch.tensor([pos[r["image_id"]] + offset for r in recs], dtype=torch.long)
    correct = torch.tensor([r["correct"] for r in recs], dtype=torch.bool).view(len(recs), draws)
    dist = torch.tensor([float(r.get("distance", 0.0)) for r in recs])
    order = rows.argsort()
    return E.StepOutcome(label, kind, rows[order], correct[order], None, dist[order])


def state_from_clean(records: Sequence[Dict[str, Any]], ids: Sequence[str]) -> E.EnsembleState:
    by = {r["image_id"]: r for r in records}
    missing = [i for i in ids if i not in by]
    if missing:
        raise PrepDefenseError(f"the clean verdict has no record of {missing[0]!r}")
    return E.EnsembleState(torch.tensor([by[i]["correct"] for i in ids], dtype=torch.bool))

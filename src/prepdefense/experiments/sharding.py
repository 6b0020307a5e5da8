"""``reproduce --shard K/N`` and ``evaluate --shard K/N``: which planned units shard K of N runs (issue 13, item 1).

A shard runs whole units, never part of one. Every unit's randomness comes from the run's
seed and the unit's id only (``units.unit_seed``), and its images are the preset's image
shard (``shard_size`` images, fixed by the preset, which is part of the run's identity), so a
unit gives the same records in whichever process computes it: shards merged
(``merge.py``) equal the unsharded run record for record.

How the units are split. Units that share a cached intermediate result form one *group* and
go to the same shard, so nothing is computed twice: a Table 2 attack on an image shard with
the Table 3 and Table 4 rows that defend its examples (``standard/<attack>/s<shard>``), and
the Section 6.4 approximator with every BPDA unit run through it (``learned/<defense>``), and
the strong attack's chain of a defense, norm and image shard (its clean verdict and each
attack of the ensemble, which attacks only what the ones before it left robust), and
``evaluate``'s chain of an image shard likewise (``evaluate --shard K/N`` runs only chains:
its checks and curve need every shard's verdict, so the run on the merged folder does them).
Every other unit is its own group. The groups, largest estimated cost first (``Unit.cost``;
ties in plan order), are dealt one by one to the shard with the least cost so far (ties: the
lowest shard). The plan and the costs depend only on the preset and ``--only``, so every
shard computes the same split without talking to the others.

Shards are numbered from 1: ``--shard 1/4`` .. ``--shard 4/4``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

from ..errors import PrepDefenseError
from .units import Unit

__all__ = ["ShardSpec", "parse_shard", "shard_spec", "group_key", "assign", "select"]


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise PrepDefenseError(f"--shard {self.index}/{self.count}: the number of shards must be at least 1")
        if not 1 <= self.index <= self.count:
            raise PrepDefenseError(
                f"--shard {self.index}/{self.count}: shards are numbered from 1 to {self.count} (e.g. --shard 1/{self.count})"
            )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def as_dict(self) -> Dict[str, int]:
        return {"index": self.index, "count": self.count}


_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> ShardSpec:
    """``"2/4"`` -> ``ShardSpec(2, 4)``; anything else is a :class:`PrepDefenseError` saying the form."""
    m = _SPEC.match(str(text))
    if not m:
        raise PrepDefenseError(f"--shard {text!r}: give K/N, shard K of N numbered from 1 (e.g. --shard 1/2 and --shard 2/2)")
    return ShardSpec(int(m.group(1)), int(m.group(2)))


def shard_spec(shard: Any) -> Optional[ShardSpec]:
    """None, a :class:`ShardSpec`, a ``(K, N)`` pair or ``"K/N"`` as a :class:`ShardSpec` (or None)."""
    if shard is None or isinstance(shard, ShardSpec):
        return shard
    if isinstance(shard, (tuple, list)) and len(shard) == 2:
        return ShardSpec(int(shard[0]), int(shard[1]))
    return parse_shard(str(shard))


_STANDARD = ("table2", "table3", "table4")


def group_key(unit: Unit) -> Hashable:
    """Units with the same key share cached work and run in the same shard (module docstring)."""
    if unit.experiment in _STANDARD:
        return ("standard", unit.attack, unit.shard)
    if unit.experiment == "learned":
        return ("learned", unit.defense)
    if unit.experiment == "evaluate" and unit.variant != "subset" and unit.attack != "curve":
        # ``evaluate``'s chain of an image shard: its clean verdict and each attack of the budget.
        return ("evaluate", unit.defense, unit.shard)
    if unit.experiment == "strong" and unit.attack != "diagnostics":
        # One chain of the attack ensemble: each link attacks what the links before it left robust.
        return ("strong", unit.defense, unit.variant, unit.shard)
    return ("unit", unit.id)


def assign(plan: Sequence[Unit], count: int) -> List[int]:
    """The shard (1-based) of every unit of ``plan``, in plan order."""
    if count < 1:
        raise ValueError("count must be at least 1")
    groups: Dict[Hashable, List[int]] = {}
    for i, u in enumerate(plan):
        groups.setdefault(group_key(u), []).append(i)
    cost = {k: sum(max(0.0, float(plan[i].cost)) for i in idx) for k, idx in groups.items()}
    order = sorted(groups, key=lambda k: (-cost[k], groups[k][0]))
    load = [0.0] * count
    shard_of = [0] * len(plan)
    for k in order:
        s = min(range(count), key=lambda j: (load[j], j))
        load[s] += cost[k]
        for i in groups[k]:
            shard_of[i] = s + 1
    return shard_of


def select(plan: Sequence[Unit], spec: ShardSpec) -> List[Unit]:
    """The units of ``plan`` that shard ``spec`` runs, in plan order."""
    return [u for u, s in zip(plan, assign(plan, spec.count)) if s == spec.index]


def split_summary(plan: Sequence[Unit], count: int) -> List[Tuple[int, float]]:
    """(units, estimated cost) of every shard, for logs and tests."""
    shard_of = assign(plan, count)
    out = [(0, 0.0) for _ in range(count)]
    for u, s in zip(plan, shard_of):
        n, c = out[s - 1]
        out[s - 1] = (n + 1, c + float(u.cost))
    return out

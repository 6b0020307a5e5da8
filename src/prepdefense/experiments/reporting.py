"""What every section of the report builds on: the stored run, statistics and Markdown/CSV.

:class:`ReportContext` reads ``run.json`` and the unit files of an output folder (``store.py``)
and answers what the sections ask: the finished and failed units of an experiment, its
records, and a "not available: <reason>" / "not selected" line when (part of) a section is
missing. The report is rebuilt from the unit files alone, so it can be written after a
resumed run or after merging the ``units/`` folders of several machines.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..attacks.verdict import bootstrap_interval, merge_histories as verdict_merge_histories
from . import paper_numbers as P
from .store import ResultStore, atomic_write_text
from .units import OUR_DEFENSE

__all__ = [
    "ReportContext",
    "bootstrap_mean_interval",
    "merge_histories",
    "mean",
    "fmt",
    "fmt_ci",
    "md_table",
    "write_csv",
    "defense_order",
    "defense_label",
]


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def bootstrap_mean_interval(values: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> Tuple[float, float]:
    """95% interval of the mean of per-image fractions ``values`` (each in [0, 1]; seeded, so
    reports repeat): the verdict's one bootstrap (:func:`prepdefense.attacks.verdict.bootstrap_interval`,
    which raises ``ValueError`` on a value outside [0, 1])."""
    return bootstrap_interval(list(values), seed=seed, resamples=resamples)


def mean(values: Iterable[Any]) -> Optional[float]:
    """The mean of the values that are not None (None when there is none)."""
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def merge_histories(histories: Sequence[Sequence[Dict[str, Any]]], initials: Sequence[Optional[Dict[str, Any]]] = ()) -> List[Dict[str, float]]:
    """Per-round ACC/ASR over all shards; a shard that stopped early keeps its last state
    (:func:`prepdefense.attacks.verdict.merge_histories` on stored records, whose counts are
    rebuilt from ``accuracy``/``asr`` and ``n`` where a record lacks them).

    Returns records with ``round``, ``accuracy``, ``asr``, ``n``; round 0 is the state before
    the attack when every shard recorded it.
    """
    hs = [[_with_counts(r) for r in h] for h in histories if h]
    if not hs:
        return []
    out = []
    inits = [_with_counts(i) for i in initials if i]
    if inits and len(inits) == len(hs) and sum(i["n"] for i in inits):
        out.extend({**r, "round": 0} for r in _merge([[i] for i in inits]))
    out.extend({**r, "round": k + 1} for k, r in enumerate(_merge(hs)) if r["n"])
    return [{k: r[k] for k in ("round", "accuracy", "asr", "n")} for r in out]


def _with_counts(rec: Dict[str, Any]) -> Dict[str, Any]:
    n = int(rec.get("n", 0) or 0)
    c = rec.get("n_correct")
    s = rec.get("n_success")
    return {"round": rec.get("round", 0), "n": n,
            "n_correct": float(c) if c is not None else float(rec.get("accuracy", 0.0)) * n,
            "n_success": float(s) if s is not None else float(rec.get("asr", 0.0)) * n}


def _merge(histories: List[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    nonempty = [h for h in histories if sum(r["n"] for r in h)]
    return verdict_merge_histories(nonempty) if nonempty else []


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------
def fmt(v: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals; "-" for None or NaN; strings unchanged."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{float(v):.{digits}f}"


def fmt_ci(lo_hi: Tuple[float, float]) -> str:
    """`` [lo, hi]`` for an interval; empty when it is undefined."""
    lo, hi = lo_hi
    if lo is None or math.isnan(lo):
        return ""
    return f" [{lo:.2f}, {hi:.2f}]"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """``rows`` under ``header`` as CSV, written atomically (None -> empty cell)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow(["" if c is None else c for c in r])
    atomic_write_text(path, buf.getvalue())


DEFENSE_ORDER = (OUR_DEFENSE, "fd", "rand", "shield", "tv", "jpeg", "bdr", "pd", "crop")


def defense_order(names: Iterable[str]) -> List[str]:
    """Our defense first, then the baselines in the paper's order, then anything else."""
    seen: List[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return [d for d in DEFENSE_ORDER if d in seen] + [d for d in seen if d not in DEFENSE_ORDER]


def defense_label(defense: str) -> str:
    """The paper's name of a defense (``paper_numbers.DEFENSE_LABELS``), else its registry name."""
    return P.DEFENSE_LABELS.get(defense, defense)


# ---------------------------------------------------------------------------------------------
# the stored run, as the sections read it
# ---------------------------------------------------------------------------------------------
class ReportContext:
    """A stored run as the report's sections read it (see the module docstring).

    Attributes:
        store: the run's :class:`~prepdefense.experiments.store.ResultStore`.
        cfg: ``run.json``; ``preset`` its resolved preset sizes and ``preset_name`` its name.
        selected: the experiments selected by the latest session (empty: all).
        units: experiment -> its stored units (finished or failed).
        tables, figures: where sections write ``*.csv`` and ``*.png``.
    """

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.cfg = store.read_config() or {}
        ident = self.cfg.get("identity", {})
        self.preset = ident.get("preset_sizes", {}) or {}
        self.preset_name = ident.get("preset", self.preset.get("name", "?"))
        latest = self.cfg.get("last_session", self.cfg)
        self.selected = set(latest.get("only") or [])
        self.units = {e: store.units(e) for e in store.experiments()}
        self.tables = store.root / "tables"
        self.figures = store.root / "figures"
        self._memo: Dict[str, Any] = {}

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per report: what several sections read (Fig. 4 curves, strong statistics)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def ok_units(self, exp: str) -> List[Dict[str, Any]]:
        return [u for u in self.units.get(exp, []) if u.get("status") == "ok"]

    def err_units(self, exp: str) -> List[Dict[str, Any]]:
        return [u for u in self.units.get(exp, []) if u.get("status") != "ok"]

    def records(self, exp: str) -> List[Dict[str, Any]]:
        return self.store.records(exp)

    def availability(self, exp: str, *, what: str = "", also_selected_by: Sequence[str] = ()) -> str:
        """Lines saying why (part of) a section is missing: errors, or not selected.

        ``also_selected_by`` names other experiments whose selection plans ``exp``'s units
        (Table 5 plans the strong attack on our defense).
        """
        errs = self.err_units(exp)
        lines = []
        if errs:
            by_reason: Dict[str, List[str]] = defaultdict(list)
            for u in errs:
                by_reason[(u.get("error") or "unknown error").splitlines()[0][:300]].append(u["unit_id"])
            for reason, ids in by_reason.items():
                shown = ", ".join(f"`{i}`" for i in ids[:4]) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")
                lines.append(f"- not available: {reason} ({shown})")
        if not self.units.get(exp) and not errs:
            if self.selected and exp not in self.selected and not (set(also_selected_by) & self.selected):
                lines.append(f"- not run: {what or exp} was not selected (`--only`).")
            else:
                lines.append(f"- not run yet: no finished unit of {what or exp} in this folder.")
        return "\n".join(lines)

    def with_availability(self, text: Sequence[str], exp: str, **kw: Any) -> str:
        """``text`` joined by newlines, with :meth:`availability`'s lines after a blank line when any."""
        av = self.availability(exp, **kw)
        return "\n".join(list(text) + (["", av] if av else []))

    def shrunk_note(self) -> str:
        return "quick run" if self.preset_name == "quick" else ("smoke run" if self.preset_name == "smoke" else "")

    def spec_notes(self) -> Dict[str, Dict[str, Any]]:
        """The preset's standard attacks (Tables 2-4) by row label."""
        return {a["label"]: a for a in self.preset.get("table2_attacks", [])}

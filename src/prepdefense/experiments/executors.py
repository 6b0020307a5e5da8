"""Who computes the units of ``prepdefense reproduce``: this process, or a Ray cluster (issue 13, item 2).

A unit's work is split in two so that it can run elsewhere than where it is stored:

* :func:`compute_unit` runs ``Experiment.run(ctx, unit)`` and returns a :class:`UnitResult`
  (status "ok", or "error" with the reason; records, summary, seconds). It writes no unit file,
  so it can run on any process that holds a :class:`~prepdefense.experiments.context.RunContext`.
* :func:`write_result` stores a result on the driver (``ResultStore.write_unit``, atomic), after
  the cache files the unit produced elsewhere (``UnitResult.cache_files``).

An *executor* maps the units to be run onto results, one ``(unit, result)`` pair at a time,
in whatever order they finish; ``reproduce.py`` writes each pair as it arrives and updates the
progress, so a run killed at any point resumes as before. :class:`LocalExecutor` runs them in
this process, in plan order (the default); ``ray_executor.RayExecutor`` (``--executor ray``, the
``ray`` extra) runs them on Ray actors; ``reproduce.make_executor`` picks one by name. Units are
deterministic given the run's seed, the unit's id and the images' ids (``RunContext.image_key``),
so both give the same records (CPU, as many torch threads per process).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

from ..errors import PrepDefenseError
from . import registry
from .experiment import Records
from .store import ResultStore, atomic_write_bytes
from .units import Unit

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from .context import RunContext
    from .progress import Progress

__all__ = ["RAY_EXTRA_HINT", "UnitResult", "compute_unit", "write_result", "Executor", "LocalExecutor", "EXECUTORS"]

#: The values of ``--executor``.
EXECUTORS = ("local", "ray")

#: What to do when ``--executor ray`` finds no Ray.
RAY_EXTRA_HINT = "install the 'ray' extra: pip install 'prepdefense[ray]' (ray==2.60.0)"


@dataclass
class UnitResult:
    """What computing one unit gave, before it is stored.

    Attributes:
        status: "ok" or "error".
        records: per-image records (plain JSON once stored).
        summary: the unit's summary, with ``cpu_seconds`` (and ``traceback`` on error).
        error: one line saying why the unit failed (None when ok).
        seconds: wall time of the computation.
        cache_files: files the unit wrote into a worker's tensor cache, by path relative to
            the store's ``cache/`` folder (POSIX form), written by the driver before the unit.
        worker: where it ran (for logs; never stored).
    """

    status: str
    records: List[Dict[str, Any]]
    summary: Dict[str, Any]
    error: Optional[str]
    seconds: float
    cache_files: Dict[str, bytes] = field(default_factory=dict)
    worker: Optional[str] = None


def _runner(experiment: str) -> Callable[["RunContext", Unit], Records]:
    run = registry.get(experiment).run
    if run is None:
        raise PrepDefenseError(f"experiment {experiment!r} has no units of its own to run")
    return run


def compute_unit(ctx: "RunContext", unit: Unit, *, run: Optional[Callable[["RunContext", Unit], Records]] = None) -> UnitResult:
    """Run one unit (``run``, default its registered experiment's) without storing it.

    A missing or failing piece gives status "error" and its message; the run goes on.
    KeyboardInterrupt and SystemExit propagate.
    """
    t0 = time.perf_counter()
    c0 = time.process_time()
    try:
        records, summary = (run or _runner(unit.experiment))(ctx, unit)
        status, error, tb = "ok", None, None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - a missing or failing piece must not stop the run
        records, summary = [], {}
        status, error = "error", f"{type(e).__name__}: {e}".strip()
        tb = traceback.format_exc(limit=8)
    seconds = time.perf_counter() - t0
    if tb:
        summary = {"traceback": tb}
    summary = {**summary, "cpu_seconds": round(time.process_time() - c0, 3)}
    return UnitResult(status, records, summary, error, seconds)


def _cache_target(store: ResultStore, relative: str) -> Path:
    """``store.cache_dir / relative``, refusing a path that would leave the cache folder."""
    rel = PurePosixPath(relative)
    if rel.is_absolute() or not rel.parts or ".." in rel.parts:
        raise PrepDefenseError(f"a worker returned a cache file outside the cache folder: {relative!r}")
    return store.cache_dir.joinpath(*rel.parts)


def write_result(store: ResultStore, unit: Unit, result: UnitResult) -> Path:
    """Store ``result`` as ``unit``'s file (atomic), after the cache files it carries."""
    for relative, data in result.cache_files.items():
        atomic_write_bytes(_cache_target(store, relative), data)
    return store.write_unit(unit.experiment, unit.id, key=unit.key, records=result.records, summary=result.summary,
                            status=result.status, error=result.error, seconds=result.seconds)


class Executor(Protocol):
    """Computes units and yields ``(unit, result)`` as each one finishes (it stores nothing)."""

    name: str

    def describe(self) -> str:
        """Where the units run, in words (for the log)."""

    def run(self, ctx: "RunContext", units: Sequence[Unit], progress: "Progress") -> Iterator[Tuple[Unit, UnitResult]]:
        """Compute ``units``; the caller stores each pair and calls ``progress.end_unit``."""


class LocalExecutor:
    """Every unit in this process, one after another, experiment by experiment in plan order."""

    name = "local"

    def describe(self) -> str:
        return "this process"

    def run(self, ctx: "RunContext", units: Sequence[Unit], progress: "Progress") -> Iterator[Tuple[Unit, UnitResult]]:
        for exp in registry.names():
            exp_units = [u for u in units if u.experiment == exp]
            if not exp_units:
                continue
            progress.start_experiment(exp, len(exp_units), sum(u.cost for u in exp_units))
            for unit in exp_units:
                progress.start_unit(unit)
                yield unit, compute_unit(ctx, unit)
            progress.end_experiment(exp)

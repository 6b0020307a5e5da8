"""What an experiment of ``prepdefense reproduce`` is: plan -> run -> store -> report.

An :class:`Experiment` is one table or figure of the paper (or our strong attack). It

* **plans** its units of work from the preset (``plan(preset, selected) -> [Unit]``);
* **runs** one unit (``run(ctx, unit) -> (records, summary)``); the driver
  (``reproduce.py``) stores the result atomically (``store.py``) and skips stored units on
  resume;
* **reports** from the stored units alone: each :class:`Section` returns Markdown (and may
  write ``tables/*.csv`` and ``figures/*.png``); ``rank`` places it in ``report.md``.

Each experiment lives in its own module (``table1.py``, ``standard_attacks.py``,
``delta_sweep.py``, ``fig4.py``, ``table5.py``, ``table6.py``, ``learned.py``,
``strong.py``) and is registered by one line in ``registry.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, AbstractSet, Any, Callable, Dict, List, Optional, Tuple

from .units import Preset, Unit

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from .context import RunContext
    from .reporting import ReportContext

__all__ = ["Experiment", "Section", "Records", "REPORT_RANKS"]

#: What a unit's run returns: per-image records and a summary (both plain JSON after
#: ``store.to_jsonable``).
Records = Tuple[List[Dict[str, Any]], Dict[str, Any]]

#: Where the report's fixed sections sit; experiment sections take ranks between them.
REPORT_RANKS: Dict[str, float] = {"about": 0.0, "samples": 95.0, "metadata": 1000.0}


@dataclass(frozen=True)
class Section:
    """One section of ``report.md``: ``write(rep)`` returns its Markdown; lower ``rank`` first."""

    rank: float
    write: Callable[["ReportContext"], str]


@dataclass(frozen=True)
class Experiment:
    """A registered experiment (see the module docstring).

    Attributes:
        name: the ``--only`` name, the ``units/<name>/`` folder and ``Unit.experiment``.
        title: one line for logs and the report's duration table.
        plan: ``plan(preset, selected)`` -> the units this experiment needs when selected
            (``selected`` is the set of selected names; a unit may belong to another
            experiment, as Table 5's measured row is the strong attack's units).
        run: ``run(ctx, unit)`` -> ``(records, summary)`` for a unit of this experiment;
            None for an experiment without units of its own (Table 5).
        sections: its parts of the report.
        aliases: other names ``--only`` accepts.
    """

    name: str
    title: str
    plan: Callable[[Preset, AbstractSet[str]], List[Unit]]
    run: Optional[Callable[["RunContext", Unit], Records]] = None
    sections: Tuple[Section, ...] = ()
    aliases: Tuple[str, ...] = ()

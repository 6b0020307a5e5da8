"""The experiments of ``prepdefense reproduce``, in the order a run computes them.

Each experiment is one module defining an :class:`~prepdefense.experiments.experiment.Experiment`
(its units, its run, its report sections). To add one: write the module and add one
``register(...)`` line at the end of this file (or call :func:`register` at run time, as the
tests do). ``reproduce.py`` plans, runs, stores and reports whatever is registered here.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

from . import delta_sweep, fig4, learned, standard_attacks, strong, table1, table5, table6, usability
from .experiment import Experiment
from .units import Preset, Unit, dedupe_units

__all__ = ["register", "unregister", "get", "names", "experiments", "title", "parse_only", "plan"]

_REGISTRY: Dict[str, Experiment] = {}


def register(experiment: Experiment, *, replace: bool = False) -> Experiment:
    """Add ``experiment`` after those registered so far (the plan runs them in this order).

    Raises:
        ValueError: the name (or an alias) is taken and ``replace`` is false.
    """
    others = [e for e in _REGISTRY.values() if not (replace and e.name == experiment.name)]
    taken = {n for e in others for n in (e.name, *e.aliases)}
    for n in (experiment.name, *experiment.aliases):
        if n in taken:
            raise ValueError(f"experiment name {n!r} is already registered")
    _REGISTRY[experiment.name] = experiment
    return experiment


def unregister(name: str) -> Experiment:
    """Remove a registered experiment (tests register toy ones); returns it."""
    return _REGISTRY.pop(name)


def get(name: str) -> Experiment:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(_REGISTRY)}") from None


def names() -> Tuple[str, ...]:
    """Registered experiment names, in run order."""
    return tuple(_REGISTRY)


def experiments() -> Tuple[Experiment, ...]:
    return tuple(_REGISTRY.values())


def title(name: str) -> str:
    """The experiment's one-line title ("" for an unknown name, e.g. a unit folder of another version)."""
    e = _REGISTRY.get(name)
    return e.title if e else ""


def parse_only(only: Optional[Iterable[str] | str]) -> Tuple[str, ...]:
    """``--only table1,fig4`` -> the experiments in plan order (all when empty or "all")."""
    every = names()
    if only is None:
        return every
    if isinstance(only, str):
        only = [only]
    aliases = {a: e.name for e in _REGISTRY.values() for a in e.aliases}
    chosen: List[str] = []
    for item in only:
        for part in str(item).replace(" ", ",").split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part == "all":
                return every
            part = aliases.get(part, part)
            if part not in _REGISTRY:
                raise ValueError(f"unknown experiment {part!r}; known: {', '.join(every)} (or all)")
            chosen.append(part)
    if not chosen:
        return every
    return tuple(e for e in every if e in chosen)


def plan(preset: Preset, selected: Optional[Iterable[str]] = None) -> List[Unit]:
    """Every unit the selected experiments (default: all) need, in run order, without duplicates.

    Units are grouped by the experiment that runs them (``Unit.experiment``), in registration
    order: Table 5 selected alone plans the strong attack's units on our defense.
    """
    chosen = frozenset(names() if selected is None else selected)
    units = [u for e in experiments() if e.name in chosen for u in e.plan(preset, chosen)]
    order = {n: i for i, n in enumerate(names())}
    units.sort(key=lambda u: order.get(u.experiment, len(order)))  # stable: each experiment's own order kept
    return dedupe_units(units)


# The paper's evaluation, cheap and reusable experiments first (Tables 3-4 reuse Table 2's
# examples; Table 5 reads Fig. 4 and the strong attack). One line per experiment.
register(table1.EXPERIMENT)
register(usability.EXPERIMENT)
register(standard_attacks.TABLE2)
register(standard_attacks.TABLE3)
register(delta_sweep.EXPERIMENT)
register(fig4.EXPERIMENT)
register(table6.EXPERIMENT)
register(learned.EXPERIMENT)
register(strong.EXPERIMENT)
register(table5.EXPERIMENT)

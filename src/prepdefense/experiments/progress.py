"""Progress of ``prepdefense reproduce``: one overall bar and one per experiment, or log lines."""

from __future__ import annotations

import sys
from typing import Optional

from . import registry
from .metadata import now_iso
from .units import Unit

__all__ = ["Progress"]


class Progress:
    """tqdm bars on a terminal (overall + current experiment, in estimated work units, so the
    ETA accounts for the cost of each unit); plain log lines with ``quiet`` or off a TTY."""

    def __init__(self, total_cost: float, total_units: int, *, quiet: bool, stream=None, desc: str = "reproduce") -> None:
        self.stream = stream or sys.stderr
        self.bars = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total_units = total_units
        self.done_units = 0
        self.overall = None
        self.current = None
        self._unit_cost = 0.0
        self._unit_frac = 0.0
        if self.bars:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self.overall = tqdm(total=max(total_cost, 1e-9), desc=desc, position=0, file=self.stream,
                                dynamic_ncols=True, bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]{postfix}")
            self.overall.set_postfix_str(f"0/{total_units} units")

    def log(self, msg: str) -> None:
        if self.bars:
            self._tqdm.write(msg, file=self.stream)
        else:
            print(f"[{now_iso()}] {msg}", file=self.stream, flush=True)

    def start_experiment(self, experiment: str, n_units: int, cost: float, title: Optional[str] = None) -> None:
        if self.bars:
            self.current = self._tqdm(total=max(cost, 1e-9), desc=f"  {experiment}", position=1, leave=False, file=self.stream,
                                      dynamic_ncols=True, bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]")
        title = registry.title(experiment) if title is None else title
        self.log(f"{experiment}: {n_units} unit(s) to run" + (f" ({title})" if title else ""))

    def start_unit(self, unit: Unit) -> None:
        self._unit_cost = unit.cost
        self._unit_frac = 0.0

    def rescale_unit(self, cost: float) -> None:
        """The unit in flight turns out to cost ``cost`` (e.g. auto-attack's rule left images
        out): the bars' totals follow, so the ETA stays a rate over the work really left."""
        cost = max(0.0, float(cost))
        delta = cost - self._unit_cost
        self._unit_cost = cost
        if self.bars and delta:
            for bar in (self.overall, self.current):
                if bar is not None:
                    bar.total = max(bar.n, bar.total + delta, 1e-9)
                    bar.refresh()

    def unit_fraction(self, fraction: float) -> None:
        """Intra-unit progress reported by an attack (0..1)."""
        fraction = max(self._unit_frac, min(1.0, fraction))
        delta = (fraction - self._unit_frac) * self._unit_cost
        self._unit_frac = fraction
        if self.bars and delta > 0:
            self.current.update(delta)
            self.overall.update(delta)

    def end_unit(self, unit: Unit, status: str, seconds: float, error: Optional[str]) -> None:
        self.unit_fraction(1.0)
        self.done_units += 1
        if self.bars:
            self.overall.set_postfix_str(f"{self.done_units}/{self.total_units} units")
        msg = f"[{self.done_units}/{self.total_units}] {unit.id}: {status} in {seconds:.1f}s"
        if error:
            msg += f" ({error.splitlines()[0][:200]})"
        if status != "ok" or not self.bars:
            self.log(msg)

    def end_experiment(self, experiment: str) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def close(self) -> None:
        if self.overall is not None:
            self.overall.close()

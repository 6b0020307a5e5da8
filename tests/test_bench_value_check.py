"""`benchmarks/bench_value_check.py` runs small and its two calls agree (it refuses to time
calls that differ)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_value_check.py"


def test_value_check_benchmark_runs_small(capsys):
    spec = importlib.util.spec_from_file_location("bench_value_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--pairs", "6", "--batch", "2", "--size", "24", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "checked / unchecked:" in out and "over 4 pairs" in out

"""The import graph of ``src/prepdefense`` (issue 9, item 5): no cycles, nothing imported upward.

Layers, low to high: utilities < defenses / models / data < attacks < experiments < cli; a
module imports only from its own layer or below (function-level imports count too). The
check is the shared tool ``../shared/tools/import_cycles.py``; the test skips, saying why,
where the checkout has no ``../shared`` beside it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO.parent / "shared" / "tools" / "import_cycles.py"


def test_no_import_cycles_and_no_upward_imports():
    if not TOOL.is_file():
        pytest.skip(f"import-graph tool not found at {TOOL} (needs ../shared/tools beside the repo)")
    proc = subprocess.run([sys.executable, str(TOOL), str(REPO / "src" / "prepdefense")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 import cycles, 0 upward imports" in proc.stdout, proc.stdout

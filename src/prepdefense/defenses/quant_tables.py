"""8x8 quantization tables for Step 1 of the defense, and Algorithm 2 that learns one.

Paper Section 5.2 and Algorithm 2; PROTOCOL.md "The defense g(x)":

- ``FD_TABLE``: the Feature Distillation table of the paper's released code (all 30,
  top-left 4x4 = 25), used by ``fd``, and by ``dct-distort`` only when no learned table is
  installed (the package ships one, ``tables/learned.json``).
- ``JPEG_LUMA_Q50``: the standard JPEG luminance table at quality 50 (ITU T.81 Annex K;
  equal to what Pillow's libjpeg writes at ``quality=50``).
- :func:`learn_quantization_table`: Algorithm 2. For every 8x8 block of every channel of
  every (clean, adversarial) pair, in the 0..255 domain, add 1 to a count table ``Q0`` at
  the argmax of ``|DCT(clean) - DCT(adv)|``; then ``Q = Q0 / max(Q0) * 80 + 20``.
- :func:`default_table` / :func:`resolve_table`: which table a defense uses and a short
  string saying where it came from (shown in the defense's ``repr``).
- :func:`shipped_tables`: the tables shipped in ``defenses/tables/``, each selectable by its
  file's stem (``learned`` is the default; an earlier learned table stays selectable under
  its own name when a new one replaces it).
- :func:`table_digest`: a short digest of a table's values, which run stores record so that
  a run never resumes under another table.

Tables are float64 tensors of shape (8, 8), indexed ``[vertical frequency, horizontal
frequency]`` (the layout of ``scipy.fft.dctn(block, norm="ortho")``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import PrepDefenseError
from ..atomic_io import atomic_write_text
from .block_dct import BLOCK, block_dct2d, pad_to_blocks, to_blocks

__all__ = [
    "FD_TABLE",
    "JPEG_LUMA_Q50",
    "LEARNED_TABLE_PATH",
    "TABLES_DIR",
    "learn_quantization_table",
    "save_table",
    "load_table",
    "default_table",
    "resolve_table",
    "shipped_tables",
    "table_digest",
    "canonical_table_spec",
]

#: The folder of shipped tables (``<name>.json``, written by :func:`save_table`).
TABLES_DIR = Path(__file__).resolve().parent / "tables"
#: Where the table learned by the project (C&W pairs, Algorithm 2) is shipped: the default.
LEARNED_TABLE_PATH = TABLES_DIR / "learned.json"

_FD = np.full((BLOCK, BLOCK), 30.0)
_FD[:4, :4] = 25.0
#: Feature Distillation table of the paper's released code (PROTOCOL.md).
FD_TABLE = torch.tensor(_FD, dtype=torch.float64)

#: Standard JPEG luminance quantization table, quality 50 (ITU T.81 Annex K, Table K.1).
JPEG_LUMA_Q50 = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float64,
)

_NO_LEARNED = "fd (no learned table shipped yet)"

TableSpec = Union[str, os.PathLike, torch.Tensor, np.ndarray]


def _check_table(table: Any, what: str = "quantization table") -> torch.Tensor:
    t = torch.as_tensor(np.asarray(table, dtype=np.float64) if not isinstance(table, torch.Tensor) else table)
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if t.shape != (BLOCK, BLOCK):
        raise PrepDefenseError(f"{what} must be {BLOCK}x{BLOCK}, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise PrepDefenseError(f"{what} must have finite entries > 0")
    return t.clone()


def _block_coefficients(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [0,1] -> DCT coefficients of every 8x8 block in 0..255, (N*C*nb, 64)."""
    padded, _ = pad_to_blocks(x.to(torch.float64) * 255.0)
    coefs = block_dct2d(to_blocks(padded))
    return coefs.reshape(-1, BLOCK * BLOCK)


def learn_quantization_table(
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    *,
    return_counts: bool = False,
    chunk_size: int = 16,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Algorithm 2 (paper Section 5.2): learn a defensive quantization table from pairs.

    Every channel of every image is reflect-padded to multiples of 8 and cut into 8x8
    blocks (PROTOCOL.md Step 1); for each block the orthonormal 2-D DCT of the clean and of
    the adversarial block are compared, and the count table ``Q0`` gets +1 at the
    coefficient where ``|DCT(clean) - DCT(adv)|`` is largest (the first one on ties, as
    ``numpy.argmax``; an unchanged block therefore counts for the DC coefficient, as the
    algorithm literally says). Finally ``Q = Q0 / max(Q0) * 80 + 20`` (Line 15), so the
    most-changed frequency gets 100 and never-changed ones 20.

    Args:
        clean: clean images in [0,1].
        adversarial: their adversarial versions, same shape.
        return_counts: also return the count table ``Q0``.
        chunk_size: images per batched step (bounds memory; the result does not depend on it).

    Returns:
        ``Q`` (float64, 8x8), or ``(Q, Q0)`` with ``Q0`` int64 when ``return_counts``.

    Shape:
        clean, adversarial: (N, C, H, W) with any H, W >= 1.
    """
    if not isinstance(clean, torch.Tensor) or not isinstance(adversarial, torch.Tensor):
        raise TypeError("clean and adversarial must be tensors")
    if clean.shape != adversarial.shape or clean.dim() != 4:
        raise ValueError(
            f"clean and adversarial must be NCHW batches of one shape, got {tuple(clean.shape)} and {tuple(adversarial.shape)}"
        )
    if clean.shape[0] == 0:
        raise ValueError("learn_quantization_table needs at least one image pair")
    counts = torch.zeros(BLOCK * BLOCK, dtype=torch.int64)
    with torch.no_grad():
        for start in range(0, clean.shape[0], max(1, int(chunk_size))):
            c = _block_coefficients(clean[start : start + chunk_size].detach().cpu())
            a = _block_coefficients(adversarial[start : start + chunk_size].detach().cpu())
            winner = (c - a).abs().argmax(dim=1)  # first maximal index, like numpy.argmax
            counts += torch.bincount(winner, minlength=BLOCK * BLOCK)
    counts = counts.view(BLOCK, BLOCK)
    table = counts.to(torch.float64) / counts.max().to(torch.float64) * 80.0 + 20.0
    return (table, counts) if return_counts else table


def save_table(path: Union[str, os.PathLike], table: Any, metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``table`` (8x8) and ``metadata`` as JSON, atomically (temp file + rename).

    The file holds ``{"table": [[...8 floats] x 8], "metadata": {...}}``; ``metadata``
    must be JSON-serialisable (record the model, images, attack and counts that made it).
    """
    t = _check_table(table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"table": t.tolist(), "metadata": dict(metadata or {})}
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    atomic_write_text(path, text)
    return path


def load_table(path: Union[str, os.PathLike]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Read a table written by :func:`save_table`: ``(table float64 8x8, metadata dict)``."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrepDefenseError(f"quantization table file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise PrepDefenseError(f"cannot read quantization table {path}: {e}") from None
    if not isinstance(payload, dict) or "table" not in payload:
        raise PrepDefenseError(f"{path} is not a quantization table file (no 'table' key)")
    metadata = payload.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise PrepDefenseError(f"{path}: 'metadata' must be an object")
    return _check_table(payload["table"], what=f"table in {path}"), metadata


def _describe_learned(path: Path, metadata: Dict[str, Any]) -> str:
    details = [str(metadata[k]) for k in ("attack", "model") if metadata.get(k)]
    settings = metadata.get("attack_settings") or {}
    if metadata.get("attack") and isinstance(settings, dict) and settings.get("binary_search_steps") and settings.get("steps"):
        details[0] += f" {settings['binary_search_steps']}x{settings['steps']}"  # e.g. "cw 5x200"
    n = metadata.get("n_images", metadata.get("n"))
    if n is not None:
        details.append(f"{n} images")
    return f"learned ({path.name}{': ' + ', '.join(details) if details else ''})"


#: A shipped table's file stem: a letter, then letters, digits, ``-``, ``_`` or ``.`` (so it
#: reads back as text in a bracketed name).
_SHIPPABLE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
#: Table names that are not files.
_RESERVED = ("default", "fd", "jpeg50", "jpeg", "q50")


def shipped_tables() -> Dict[str, Path]:
    """``{name: path}`` of every table shipped in :data:`TABLES_DIR`, by file stem in lower
    case; ``"learned"`` is :data:`LEARNED_TABLE_PATH` when it exists. Each name is a valid
    ``table=`` value (``dct-distort[table=NAME]``)."""
    out = {p.stem.lower(): p for p in sorted(TABLES_DIR.glob("*.json")) if p.is_file() and _SHIPPABLE.fullmatch(p.stem)}
    for reserved in _RESERVED:  # built-in names win; such a file is never listed
        out.pop(reserved, None)
    out.pop("learned", None)
    if LEARNED_TABLE_PATH.is_file():
        out["learned"] = LEARNED_TABLE_PATH
    return dict(sorted(out.items()))


def table_digest(table: Any) -> str:
    """``"sha256:<16 hex>"`` of a table's float64 values (8x8): equal tables, equal digests,
    whatever file or name they came from."""
    t = _check_table(table)
    return "sha256:" + hashlib.sha256(t.numpy().astype("<f8").tobytes()).hexdigest()[:16]


def default_table() -> Tuple[torch.Tensor, str]:
    """The table ``dct-distort`` and ``dct-quant`` use by default, and where it came from.

    The learned table shipped at ``defenses/tables/learned.json`` when it exists, else
    the FD table with source ``"fd (no learned table shipped yet)"``.
    """
    if LEARNED_TABLE_PATH.is_file():
        table, metadata = load_table(LEARNED_TABLE_PATH)
        return table, _describe_learned(LEARNED_TABLE_PATH, metadata)
    return FD_TABLE.clone(), _NO_LEARNED


_ALIASES = {"jpeg": "jpeg50", "q50": "jpeg50"}


def canonical_table_spec(spec: Any) -> Any:
    """A table name as one spelling: ``"FD"`` -> ``"fd"``, ``"JPEG"`` -> ``"jpeg50"``,
    ``" Learned "`` -> ``"learned"`` (built-in and shipped names are case-blind); anything
    else (a file path, a tensor) unchanged."""
    if not isinstance(spec, str):
        return spec
    key = spec.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in ("default", "fd", "jpeg50", "learned") or key in shipped_tables() else spec


def resolve_table(spec: TableSpec = "default") -> Tuple[torch.Tensor, str]:
    """Turn a table specification into ``(table float64 8x8, source string)``.

    Args:
        spec: ``"default"`` (:func:`default_table`), ``"learned"`` (the shipped learned
            table; an error if none is shipped), the name of another shipped table
            (:func:`shipped_tables`), ``"fd"``, ``"jpeg50"``, a path to a JSON file written
            by :func:`save_table`, or an 8x8 tensor/array.
    """
    if isinstance(spec, (torch.Tensor, np.ndarray, list, tuple)):
        return _check_table(spec), "custom"
    if isinstance(spec, os.PathLike):
        table, metadata = load_table(spec)
        return table, f"file {spec}"
    if not isinstance(spec, str):
        raise PrepDefenseError(f"cannot use {type(spec).__name__} as a quantization table")
    key = spec.strip().lower()
    if key == "default":
        return default_table()
    if key == "fd":
        return FD_TABLE.clone(), "fd"
    if _ALIASES.get(key, key) == "jpeg50":
        return JPEG_LUMA_Q50.clone(), "jpeg50"
    shipped = shipped_tables()
    if key in shipped:
        table, metadata = load_table(shipped[key])
        return table, _describe_learned(shipped[key], metadata)
    if key == "learned":
        raise PrepDefenseError(
            f"no learned table shipped at {LEARNED_TABLE_PATH}; run `prepdefense learn-table` "
            "or use table='fd'"
        )
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".json" or path.exists():
        table, _ = load_table(path)
        return table, f"file {spec}"
    names = ", ".join(dict.fromkeys(["default", "fd", "jpeg50", *shipped]))
    raise PrepDefenseError(f"unknown quantization table {spec!r}; use one of {names} or a JSON file path")

"""The results store of ``prepdefense reproduce``: atomic per-unit files, merged JSONL views.

Issue 5 ("Resumable and safe") asks that a run killed at any point and started again
completes without recomputing finished units, with no lost and no duplicated record.
The design that gives this without a database:

* A **unit of work** (experiment x defense x attack x image shard, see ``units.py``)
  computes all its records in memory and then writes ONE file,
  ``OUT/units/<experiment>/<unit>.json``, atomically: the bytes go to a hidden temporary
  file in the same folder, are flushed and ``fsync``-ed, and ``os.replace`` gives the
  file its name (then the folder is ``fsync``-ed). A reader therefore sees either no file
  or the whole file, never a part: a kill at any point loses at most the unit in flight,
  which the next run recomputes. A unit is *done* when its file exists with status "ok";
  a unit whose computation raised is stored with status "error" (the report says
  "not available: <reason>") and is tried again by the next run.
* ``OUT/results/<experiment>.jsonl`` (one record per unit and image, each carrying its
  unit key) is a **view** rebuilt from the unit files, itself replaced atomically after
  every unit; records are de-duplicated by (unit, image, kind) whenever they are read,
  so units computed twice (two machines of a cluster, say) merge into one copy.
* Tensors that later units reuse (the adversarial examples of Table 2, fed to the
  defended model in Tables 3 and 4) go to ``OUT/cache/*.pt``, written the same way.
* ``OUT/run.json`` records the run's configuration; its ``identity`` (data, model, seed,
  preset and its resolved sizes) must match for a run to resume (``--fresh`` starts over).
* A lock file stops two runs from writing into the same folder at once (the kernel
  releases it when a process dies, even by SIGKILL).

Everything is plain JSON so that the units of one run can be produced on many machines
(``reproduce --shard K/N``, ``sharding.py``) and merged by copying their ``units/`` folders
together (``prepdefense merge``, ``merge.py``, which also checks that they are one run's).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from ..errors import PrepDefenseError
from ..atomic_io import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)

__all__ = [
    "ResultStore",
    "ConfigMismatchError",
    "StoreLockedError",
    "atomic_write_bytes",
    "atomic_write_text",
    "record_key",
    "dedupe_records",
    "to_jsonable",
]

UNIT_SCHEMA = 1


class ConfigMismatchError(PrepDefenseError):
    """The output folder holds a run with another configuration (resume refused)."""


class StoreLockedError(PrepDefenseError):
    """Another ``reproduce`` or ``evaluate`` process is writing into the same output folder."""


# Atomic writes live in one place for the whole package; re-exported here for the experiments.
def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """The records of a JSONL file (none if it is absent); torn or garbled lines are skipped."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def to_jsonable(obj: Any) -> Any:
    """Tensors, NumPy values, tuples and paths as plain JSON values (NaN/inf become None)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None  # type: ignore
    if torch is not None and isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):  # NumPy scalars
        try:
            return to_jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "tolist"):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


_ABSENT = "(absent)"


def _leaf_differences(a: Any, b: Any, path: str, out: List[Tuple[str, Any, Any]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            va, vb = a.get(k, _ABSENT), b.get(k, _ABSENT)
            if va != vb:
                _leaf_differences(va, vb, f"{path}.{k}" if path else str(k), out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (va, vb) in enumerate(zip(a, b)):
            if va != vb:
                _leaf_differences(va, vb, f"{path}[{i}]", out)
    elif a != b:
        out.append((path, a, b))


def describe_differences(old: Dict[str, Any], new: Dict[str, Any], limit: int = 6, arrow: str = " -> ") -> str:
    """The fields where two configurations differ, as ``a.b: old -> new`` (nested dicts down to
    the differing leaves, so a changed preset names the field, not the whole preset), at most
    ``limit`` of them."""
    out: List[Tuple[str, Any, Any]] = []
    _leaf_differences(old, new, "", out)
    text = "; ".join(f"{k}: {a!r}{arrow}{b!r}" for k, a, b in out[:limit])
    return text + (f"; and {len(out) - limit} more" if len(out) > limit else "")


#: What a differing identity field means, added to the mismatch message in plain words.
IDENTITY_HINTS = {
    "defense_state": "the values behind the defense's name (its quantization table) are not those this run was "
                     "made with: the shipped learned table has changed since, or the run predates recording them",
    "default_table": "the paper's defense's default table (the shipped learned one) is not the one this run was "
                     "made with: it has changed since, or the run predates recording it",
    "bpda_gradient": "the protocol attacks (Fig. 4, Table 6) now take the paper's gradient, the identity over the "
                     "whole of a non-differentiable defense, with a stage-wise variant of Fig. 4 beside it that uses "
                     "the same draws; this run predates that (its 'bpda' rows differentiated dct-distort stage-wise, "
                     "or its stage-wise rows drew their own draws): rerun into a new --out",
}


#: A hint is not given when one of these fields differs too: the user's own change explains the
#: difference (another ``--defense`` has other values behind its name; an edited table file
#: that the defense names).
HINT_CAUSES = {"defense_state": ("defense", "defense_files")}


def identity_hints(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    """:data:`IDENTITY_HINTS` of the top-level fields where ``old`` and ``new`` differ, joined
    (leaving out those that a differing field of :data:`HINT_CAUSES` explains)."""
    def differs(key: str) -> bool:
        return old.get(key) != new.get(key)

    return "; ".join(text for key, text in IDENTITY_HINTS.items()
                     if differs(key) and not any(differs(cause) for cause in HINT_CAUSES.get(key, ())))


def record_key(record: Dict[str, Any]) -> tuple:
    """The identity of a record: its unit, its image (None for a unit summary) and its kind."""
    return (record.get("unit"), record.get("image_id"), record.get("kind", "image"))


def dedupe_records(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Keep the first record of every key, in order."""
    seen = set()
    out = []
    for r in records:
        k = record_key(r)
        if k in seen:
            continue
        seen.add(k)
        out.append(r)
    return out


_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def unit_file_name(unit_id: str) -> str:
    """A file name for a unit id: readable, and unique thanks to a short hash of the id."""
    readable = _SAFE.sub("-", unit_id.replace("/", "__")).strip("-")[:120]
    digest = hashlib.sha256(unit_id.encode("utf-8")).hexdigest()[:10]
    return f"{readable}.{digest}.json"


class ResultStore:
    """Unit files, merged JSONL views, a tensor cache and the run's configuration, under ``root``.

    Layout::

        root/run.json                    configuration (identity + everything recorded)
        root/units/<experiment>/*.json   one file per unit of work (atomic; the truth; ``written_by``
                                         names the revision, version and device that ran it)
        root/results/<experiment>.jsonl merged view, one record per unit and image
        root/cache/**/*.pt               tensors shared between units (atomic)
        root/tables/*.csv, root/figures/*.png, root/report.md   written by the report
    """

    GENERATED = ("units", "results", "cache", "tables", "figures", "report.md", "run.json", "sessions.jsonl")

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.units_dir = self.root / "units"
        self.results_dir = self.root / "results"
        self.cache_dir = self.root / "cache"
        self._lock_fd: Optional[int] = None
        # What wrote this invocation's units (git revision, prepdefense version, device), from the
        # configuration's metadata: a run resumed by another tree then says which units each ran.
        self.written_by: Dict[str, Any] = {}
        # Parsed unit files keyed by path, with the (mtime, size) they were read at: rebuilding
        # a view after every unit then reads only the files that changed.
        self._parsed: Dict[Path, tuple] = {}

    # ----------------------------------------------------------------- life cycle
    def open(self) -> "ResultStore":
        self.root.mkdir(parents=True, exist_ok=True)
        self.units_dir.mkdir(exist_ok=True)
        self.results_dir.mkdir(exist_ok=True)
        self.cache_dir.mkdir(exist_ok=True)
        return self

    def lock(self) -> None:
        """Take an exclusive lock on ``root/.lock`` (refuse if another process holds it)."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.root / ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise StoreLockedError(f"another `prepdefense reproduce` or `evaluate` is writing into {self.root}; wait for it or use another --out") from None
            raise
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            import fcntl

            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def reset(self) -> None:
        """``--fresh``: delete everything this store generated (and nothing else in ``root``)."""
        for name in self.GENERATED:
            p = self.root / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def clean_temporaries(self) -> int:
        """Remove temporary files left by a killed writer; returns how many."""
        n = 0
        if not self.root.exists():
            return 0
        for p in self.root.rglob(".*.tmp-*"):
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
        return n

    # ------------------------------------------------------------------ config
    @property
    def config_path(self) -> Path:
        return self.root / "run.json"

    def read_config(self) -> Optional[Dict[str, Any]]:
        if not self.config_path.is_file():
            return None
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    def check_or_write_config(self, config: Dict[str, Any]) -> bool:
        """Write ``config`` as ``run.json``, or check it against the stored one.

        ``config["identity"]`` is what must match for a run to resume; the rest (device,
        ``--only``, versions, git revision) is recorded and may change between sessions.
        The git revision, prepdefense version and device of ``config["metadata"]`` are stamped
        on every unit this store writes afterwards (``written_by``), so a run resumed by another
        tree or on another device says which units each one ran.

        Returns:
            True when an earlier run of the same configuration is resumed.

        Raises:
            ConfigMismatchError: ``run.json`` exists with another identity.
        """
        config = to_jsonable(config)
        meta = config.get("metadata") or {}
        self.written_by = {k: v for k, v in {"git_revision": meta.get("git_revision"),
                                             "prepdefense": (meta.get("versions") or {}).get("prepdefense"),
                                             "device": meta.get("device")}.items() if v is not None}
        old = self.read_config()
        if old is not None:
            old_id, new_id = old.get("identity", {}), config.get("identity", {})
            if old_id != new_id:
                diffs = describe_differences(old_id, new_id)
                hints = identity_hints(old_id, new_id)
                raise ConfigMismatchError(
                    f"{self.root} holds a run with another configuration ({diffs}){': ' + hints if hints else ''}; "
                    "rerun with the same arguments to resume, pass --fresh to start over, or choose another --out"
                    + (" (earlier shipped tables stay selectable by name, e.g. 'dct-distort[table=NAME]')" if hints else "")
                )
            merged = dict(old)
            merged["last_session"] = config
            atomic_write_text(self.config_path, json.dumps(merged, indent=2, sort_keys=True))
            return True
        atomic_write_text(self.config_path, json.dumps(config, indent=2, sort_keys=True))
        return False

    def update_config(self, **fields: Any) -> None:
        """Add or replace top-level fields of ``run.json`` (atomically)."""
        cfg = self.read_config() or {}
        cfg.update(to_jsonable(fields))
        atomic_write_text(self.config_path, json.dumps(cfg, indent=2, sort_keys=True))

    def append_session(self, session: Dict[str, Any]) -> None:
        """Record one invocation (start, end, units run) in ``sessions.jsonl`` (whole-file replace)."""
        path = self.root / "sessions.jsonl"
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        atomic_write_text(path, old + json.dumps(to_jsonable(session), sort_keys=True) + "\n")

    def sessions(self) -> List[Dict[str, Any]]:
        return read_jsonl(self.root / "sessions.jsonl")

    # ------------------------------------------------------------------ units
    def unit_path(self, experiment: str, unit_id: str) -> Path:
        return self.units_dir / experiment / unit_file_name(unit_id)

    def load_unit(self, experiment: str, unit_id: str) -> Optional[Dict[str, Any]]:
        """The stored unit, or None when absent or unreadable."""
        path = self.unit_path(experiment, unit_id)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return data if data.get("unit_id") == unit_id else None

    def is_done(self, experiment: str, unit_id: str) -> bool:
        unit = self.load_unit(experiment, unit_id)
        return unit is not None and unit.get("status") == "ok"

    def write_unit(
        self,
        experiment: str,
        unit_id: str,
        *,
        key: Dict[str, Any],
        records: List[Dict[str, Any]],
        summary: Optional[Dict[str, Any]] = None,
        status: str = "ok",
        error: Optional[str] = None,
        seconds: float = 0.0,
    ) -> Path:
        """Store a finished (or failed) unit atomically, then refresh its experiment's view.

        Every record gets the unit's key fields, ``unit`` (its id) and ``kind`` ("image"
        unless given), so that a record alone says where it came from.
        """
        stamped = []
        for r in records:
            rec = {"experiment": experiment, "unit": unit_id, **key, "kind": "image"}
            rec.update(r)
            stamped.append(rec)
        payload = {
            "schema": UNIT_SCHEMA,
            "experiment": experiment,
            "unit_id": unit_id,
            "key": key,
            "status": status,
            "error": error,
            "seconds": round(float(seconds), 3),
            "summary": summary or {},
            "records": stamped,
        }
        if self.written_by:
            payload["written_by"] = dict(self.written_by)
        path = self.unit_path(experiment, unit_id)
        atomic_write_text(path, json.dumps(to_jsonable(payload), sort_keys=True))
        self.rebuild_view(experiment)
        return path

    def iter_units(self, experiment: Optional[str] = None) -> Iterator[Dict[str, Any]]:
        """Every readable unit file (of one experiment, or all), in a stable order."""
        if not self.units_dir.is_dir():
            return
        dirs = [self.units_dir / experiment] if experiment else sorted(p for p in self.units_dir.iterdir() if p.is_dir())
        for d in dirs:
            if not d.is_dir():
                continue
            for p in sorted(d.glob("*.json")):
                if p.name.startswith("."):
                    continue
                try:
                    st = p.stat()
                    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                    hit = self._parsed.get(p)
                    if hit is not None and hit[0] == stamp:
                        yield hit[1]
                        continue
                    data = json.loads(p.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError):
                    continue
                self._parsed[p] = (stamp, data)
                yield data

    def units(self, experiment: Optional[str] = None, *, status: Optional[str] = None) -> List[Dict[str, Any]]:
        """Stored units, de-duplicated by unit id; ``status`` filters ("ok" or "error")."""
        seen = {}
        for u in self.iter_units(experiment):
            uid = u.get("unit_id")
            if uid in seen and seen[uid].get("status") == "ok":
                continue
            seen[uid] = u
        out = list(seen.values())
        if status is not None:
            out = [u for u in out if u.get("status") == status]
        return out

    def experiments(self) -> List[str]:
        if not self.units_dir.is_dir():
            return []
        return sorted(p.name for p in self.units_dir.iterdir() if p.is_dir())

    def records(self, experiment: str) -> List[Dict[str, Any]]:
        """The records of every finished unit of ``experiment``, de-duplicated by key."""
        recs: List[Dict[str, Any]] = []
        for u in self.units(experiment, status="ok"):
            recs.extend(u.get("records", []))
        return dedupe_records(recs)

    def rebuild_view(self, experiment: str) -> Path:
        """Rewrite ``results/<experiment>.jsonl`` from the unit files (atomic replace)."""
        lines = [json.dumps(r, sort_keys=True) for r in self.records(experiment)]
        path = self.results_dir / f"{experiment}.jsonl"
        atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
        return path

    def read_view(self, experiment: str) -> List[Dict[str, Any]]:
        """Records of ``results/<experiment>.jsonl`` (torn or repeated lines are skipped)."""
        return dedupe_records(read_jsonl(self.results_dir / f"{experiment}.jsonl"))

    # ------------------------------------------------------------------ tensors
    def cache_path(self, name: str) -> Path:
        return self.cache_dir / f"{name}.pt"

    def save_tensors(self, name: str, obj: Any) -> Path:
        """``torch.save`` ``obj`` to ``cache/<name>.pt`` atomically."""
        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        path = self.cache_path(name)
        atomic_write_bytes(path, buf.getvalue())
        return path

    def load_tensors(self, name: str) -> Optional[Any]:
        """The cached object, or None when absent (or unreadable)."""
        import torch

        path = self.cache_path(name)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed
            return None

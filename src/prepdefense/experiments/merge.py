"""``prepdefense merge OUT SHARD_OUT...``: the shards of one run combined into one store (issue 13, item 1).

Each ``reproduce --shard K/N --out SHARD_OUT`` stores whole units (``sharding.py``) in its own
folder. :func:`merge_shards` checks that the folders are shards of the same run (same
identity: data, model, weights, seed, preset and its sizes, draw scheme; same ``N``; the same
``--only``; the same protocol sample), reports missing and repeated shards, then copies every
unit file, the tensor cache and the sample strip into ``OUT`` and writes the report exactly as
an unsharded run does (``report.py`` reads only the stored units). ``OUT`` then holds the run
as if one process had computed it: ``OUT/run.json`` has the unsharded identity, so
``prepdefense reproduce`` with the same arguments and ``--out OUT`` resumes it (and computes
whatever a missing shard left out).

The shards of ``evaluate --shard K/N`` merge the same way, without a report: their units are
the chains (clean verdicts and attacks) of the image shards, and ``prepdefense evaluate``
with the same arguments and ``--out OUT`` reuses them and runs the checks, the curve and the
card, which need every image shard.

A unit stored by two shards (a shard given twice) is taken once, the first finished copy in
the order given; a unit's records are the same in any shard, since they depend only on the
run's seed and the unit's id.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO

from ..errors import PrepDefenseError
from .report import write_report
from .sample_strip import adversarial_candidates
from .store import ConfigMismatchError, ResultStore, atomic_write_bytes, atomic_write_text, describe_differences, to_jsonable

__all__ = ["MergeOutcome", "ShardMismatchError", "merge_shards"]


class ShardMismatchError(PrepDefenseError):
    """The folders given to ``merge`` are not the shards of one run, or some are missing."""


@dataclass
class MergeOutcome:
    out: Path
    report: Optional[Path]
    count: int
    shards: List[int]
    missing_shards: List[int]
    duplicate_shards: List[int]
    units: int
    failed_units: List[str] = field(default_factory=list)
    missing_units: List[str] = field(default_factory=list)
    command: str = "reproduce"

    def summary(self) -> str:
        """One line for the log."""
        text = f"merged shards {', '.join(map(str, self.shards))} of {self.count} into {self.out}: {self.units} unit(s)"
        if self.failed_units:
            text += f", {len(self.failed_units)} failed"
        if self.missing_units:
            text += f", {len(self.missing_units)} not run yet"
        if self.duplicate_shards:
            text += f"; shard(s) {', '.join(map(str, self.duplicate_shards))} given more than once (taken once)"
        if self.missing_shards:
            what = "the report is partial" if self.command == "reproduce" else "the finishing evaluate computes what they left"
            text += f"; shard(s) {', '.join(map(str, self.missing_shards))} of {self.count} missing ({what})"
        return text


def _read_shard(folder: Path) -> Dict[str, Any]:
    cfg_path = folder / "run.json"
    if not folder.is_dir():
        raise ShardMismatchError(f"{folder} is not a folder")
    if not cfg_path.is_file():
        raise ShardMismatchError(f"{folder} holds no run (no run.json); give the --out folders of "
                                 "`prepdefense reproduce --shard K/N` or `prepdefense evaluate --shard K/N`")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ShardMismatchError(f"{cfg_path} is unreadable ({type(e).__name__}); was the shard's run interrupted before it started?") from None
    ident = cfg.get("identity") or {}
    if not isinstance(ident.get("shard"), dict):
        raise ShardMismatchError(f"{folder} holds an unsharded run, not a shard (run the command with --shard K/N for each shard)")
    return cfg


def _sample_ids(folder: Path) -> Optional[List[str]]:
    store = ResultStore(folder)
    cached = store.load_tensors("sample")
    return None if cached is None else list(cached.get("ids", []))


def merge_shards(out: Path, shard_outs: Sequence[Path], *, allow_missing: bool = False, stream: Optional[TextIO] = None) -> MergeOutcome:
    """Combine the shard folders ``shard_outs`` into ``out`` and write its report (module docstring).

    Raises:
        ShardMismatchError: a folder is not a shard, the shards come from different runs (one
            line naming the first differences), shards are missing and not ``allow_missing``, or
            ``out`` already holds another run.
        StoreLockedError: another process writes into ``out``.
    """
    stream = stream if stream is not None else sys.stderr
    out = Path(out).expanduser()
    folders = [Path(p).expanduser() for p in shard_outs]
    if not folders:
        raise ShardMismatchError("give at least one shard folder to merge")
    for f in folders:
        if f.exists() and out.exists() and f.resolve() == out.resolve():
            raise ShardMismatchError(f"the output {out} is also one of the shards; merge into another folder")
    cfgs = [_read_shard(f) for f in folders]

    # One run: the same identity apart from the shard, the same number of shards and --only.
    def base(cfg: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in cfg["identity"].items() if k != "shard"}

    first, first_base = folders[0], base(cfgs[0])
    count = int(cfgs[0]["identity"]["shard"]["count"])
    first_only = (cfgs[0].get("shard") or {}).get("only")
    for f, cfg in zip(folders[1:], cfgs[1:]):
        if base(cfg) != first_base:
            raise ShardMismatchError(
                f"{f} and {first} are shards of different runs ({describe_differences(first_base, base(cfg), limit=4, arrow=' vs ')}); "
                "merge only the shards of one run (the same command and arguments apart from --shard)"
            )
        n = int(cfg["identity"]["shard"]["count"])
        if n != count:
            raise ShardMismatchError(f"{first} is a shard of {count} but {f} is a shard of {n}; merge shards of one split (the same N in --shard K/N)")
        only = (cfg.get("shard") or {}).get("only")
        if only != first_only:
            raise ShardMismatchError(f"{first} ran --only {','.join(first_only or [])} but {f} ran --only {','.join(only or [])}; "
                                     "the shards of one run must select the same experiments")
    samples = [_sample_ids(f) for f in folders]
    known = [s for s in samples if s is not None]
    for f, s in zip(folders, samples):
        if s is not None and s != known[0]:
            raise ShardMismatchError(f"{f} drew another protocol sample than {folders[samples.index(known[0])]} "
                                     "(did the image folder change between the shards?)")

    indices = [int(c["identity"]["shard"]["index"]) for c in cfgs]
    seen: List[int] = []
    duplicates: List[int] = []
    for i in indices:
        (duplicates if i in seen else seen).append(i)
    missing = [i for i in range(1, count + 1) if i not in seen]
    if missing and not allow_missing:
        raise ShardMismatchError(
            f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing; give every shard's --out folder, "
            "or pass --allow-missing to merge what there is (the rest is computed when the run is resumed on OUT)"
        )

    store = ResultStore(out)
    store.lock()
    try:
        store.open()
        store.clean_temporaries()
        run_cfg = {k: v for k, v in cfgs[0].items() if k not in ("shard", "last_session", "sample_strip_error", "merged_from")}
        run_cfg["identity"] = first_base
        run_cfg["only"] = list(first_only) if first_only is not None else run_cfg.get("only")
        try:
            store.check_or_write_config(run_cfg)
        except ConfigMismatchError:
            old = (store.read_config() or {}).get("identity", {})
            raise ShardMismatchError(
                f"{out} already holds another run ({describe_differences(old, first_base, limit=4, arrow=' vs ')}); merge into a new folder"
            ) from None
        store.update_config(merged_from=[{"folder": str(f.resolve()), "shard": f"{i}/{count}"} for f, i in zip(folders, indices)])

        # Units: the first finished copy of each, in the order the shards were given.
        touched = set()
        for f in folders:
            src = ResultStore(f)
            for unit in src.iter_units():
                exp, uid = unit.get("experiment"), unit.get("unit_id")
                if not exp or not uid:
                    continue
                if store.is_done(exp, uid):
                    continue
                atomic_write_text(store.unit_path(exp, uid), json.dumps(to_jsonable(unit), sort_keys=True))
                touched.add(exp)
        # The tensor cache (the protocol sample, examples later units and the strip reuse).
        for f in folders:
            cache = f / "cache"
            if not cache.is_dir():
                continue
            for p in sorted(cache.rglob("*")):
                if not p.is_file() or p.name.startswith("."):
                    continue
                target = store.cache_dir / p.relative_to(cache)
                if not target.exists():
                    atomic_write_bytes(target, p.read_bytes())
        # The sample strip: the one the unsharded run draws, from the strongest cached example,
        # which the shard that computed that example drew the same way.
        strip_src = None
        for name, _ in adversarial_candidates():
            strip_src = next((f for f in folders if (f / "cache" / f"{name}.pt").is_file()), None)
            if strip_src is not None:
                break
        strip = store.root / "figures" / "samples.png"
        if strip_src is not None and (strip_src / "figures" / "samples.png").is_file():
            atomic_write_bytes(strip, (strip_src / "figures" / "samples.png").read_bytes())
        else:
            if strip.is_file():
                strip.unlink()
            errors = [c.get("sample_strip_error") for f, c in zip(folders, cfgs) if f == strip_src and c.get("sample_strip_error")]
            if errors:
                store.update_config(sample_strip_error=errors[0])
        # Sessions: every shard's, each saying which shard it was.
        lines = []
        for f, i in zip(folders, indices):
            for s in ResultStore(f).sessions():
                lines.append(json.dumps(to_jsonable({**s, "shard": f"{i}/{count}"}), sort_keys=True))
        atomic_write_text(store.root / "sessions.jsonl", "".join(line + "\n" for line in lines))

        for exp in sorted(set(store.experiments()) | touched):
            store.rebuild_view(exp)
        assigned = [uid for c in cfgs for uid in (c.get("shard") or {}).get("units", [])]
        ok = {u["unit_id"] for u in store.units(status="ok")}
        failed = sorted(u["unit_id"] for u in store.units(status="error") if u["unit_id"] not in ok)
        missing_units = sorted({uid for uid in assigned if uid not in ok} - set(failed))
        evaluation = first_base.get("command") == "evaluate"
        report = None if evaluation else write_report(store)
        outcome = MergeOutcome(out=out, report=report, count=count, shards=sorted(seen), missing_shards=missing,
                               duplicate_shards=sorted(set(duplicates)), units=len(ok) + len(failed),
                               failed_units=failed, missing_units=missing_units,
                               command="evaluate" if evaluation else "reproduce")
        print(outcome.summary(), file=stream)
        return outcome
    finally:
        store.unlock()

"""``reproduce --executor ray``: the units on Ray actors, stored by the driver (issue 13, item 2).

One actor per GPU of the cluster (``num_gpus=1``), or one per CPU slot on a CPU-only cluster
(``num_cpus=threads``, that many torch threads; one by default), at most ``--ray-workers``.
Each actor is built once with the run's preset, seed, protocol sample and classifier (put once
in Ray's object store), rebuilds the :class:`~prepdefense.experiments.context.RunContext` from
them, then computes one unit per call (``executors.compute_unit``) and returns its records.
Nothing on a worker writes the store: the driver writes every unit as it arrives (``executors.write_result``), so
a killed run resumes exactly as a local one does, and the records equal the local executor's
(units are deterministic given the seed, the unit's id and the images' ids; CPU, with as many
torch threads per process as the local run: a float sum split over 2 threads may round
differently from one over 1, e.g. EfficientNet-Lite0's logits by 4e-6).

**Scheduling.** Units that share a cached intermediate result (a Table 2 attack's examples
with the Table 3-4 rows that defend them; the Section 6.4 approximator with its BPDA units,
``sharding.group_key``) form a group that one actor runs in plan order, so the cache entry a
unit writes is there for the next. Groups go out largest estimated cost first to whichever
actor is free, with at most ``in_flight`` units queued on an actor (so it never waits for the
driver).

**A worker's store** (:class:`WorkerCache`) is a scratch folder of the worker. The tensors a
unit writes there come back with its result (``UnitResult.cache_files``) and the driver writes
them into ``OUT/cache/``; what a unit reads comes from the scratch folder, else from the driver's
``OUT/cache/`` when the worker's node sees that folder (same machine or a shared file system,
checked against ``run.json``'s identity), else it is recomputed (the same tensors, since they
are deterministic). A unit that reads an earlier unit's stored result (a link of the strong
attack's chain reads the links before it, ``ctx.store.load_unit``) finds it in the scratch
folder too: the worker keeps every unit it computed there, and the driver sends, with the first
unit of a group it hands out, the units of that group already stored in ``OUT``.

**A worker that dies** (``RayActorError``: the process exited, was killed or lost its node)
is replaced; the unit it was computing and those queued behind it go back to the front of the
queue. A unit during which workers died ``max_attempts`` times is stored with status "error"
(the next run tries it again). A result is written only once: the driver checks the store
before writing.

**Where Ray runs.** Without ``--ray-address`` a one-node Ray is started in this process
(:func:`start_local_ray`) on 127.0.0.1 only: every server it starts listens on the loopback
address and every connection stays on it (checked in ``tests/test_ray_executor.py``), the
dashboard is off and usage statistics are not sent; it is shut down at the end. With
``--ray-address ADDR`` (``auto`` for a cluster started with ``ray start`` on this machine) the
run joins that cluster, whose network settings are its own; ``prepdefense`` must be importable
and ``--data`` readable at the same path on every node.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..errors import PrepDefenseError
from . import registry
from .executors import RAY_EXTRA_HINT, UnitResult, compute_unit
from .sharding import group_key
from .store import ResultStore, atomic_write_bytes, atomic_write_text, to_jsonable
from .units import Unit
from ..defenses.quant_tables import default_table, table_digest

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from .context import RunContext
    from .progress import Progress

__all__ = ["RayExecutor", "WorkerCache", "start_local_ray", "import_ray", "LOOPBACK", "RAY_EXTRA_HINT"]

#: The only address a Ray started by :func:`start_local_ray` uses.
LOOPBACK = "127.0.0.1"


def import_ray():
    """The ``ray`` module, or a :class:`PrepDefenseError` naming the ``ray`` extra."""
    try:
        import ray
    except ImportError as e:
        raise PrepDefenseError(f"--executor ray needs Ray, which is not installed ({e}); {RAY_EXTRA_HINT}") from None
    return ray


def start_local_ray(num_cpus: int, *, num_gpus: Optional[int] = None, **init_kwargs: Any) -> Dict[str, Any]:
    """Start a one-node Ray in this process, bound to 127.0.0.1; returns its ``address_info``.

    Ray binds its servers to every interface unless the node's address is the loopback
    address, and on Linux it turns a loopback ``_node_ip_address`` into the machine's own
    address unless it runs in its single-machine mode (the default on macOS and Windows). So
    that mode is switched on for the start (``ray_constants.ENABLE_RAY_CLUSTER``, read when
    the node's address is resolved), then restored. The dashboard is off and usage statistics
    are disabled (``RAY_USAGE_STATS_ENABLED=0``, inherited by Ray's processes).

    Raises:
        PrepDefenseError: Ray is missing, or the node did not come up on 127.0.0.1 (it is
            shut down again then).
    """
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray = import_ray()
    from ray._private import ray_constants

    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ctx = ray.init(address="local", num_cpus=int(num_cpus), num_gpus=num_gpus, include_dashboard=False,
                       _node_ip_address=LOOPBACK, configure_logging=False, log_to_driver=False, **init_kwargs)
    finally:
        if before is not None:
            ray_constants.ENABLE_RAY_CLUSTER = before
    info = dict(ctx.address_info)
    if info.get("node_ip_address") != LOOPBACK or not str(info.get("gcs_address", "")).startswith(LOOPBACK + ":"):
        ray.shutdown()
        raise PrepDefenseError(
            f"the local Ray came up on {info.get('node_ip_address')} (GCS {info.get('gcs_address')}), not on {LOOPBACK}, "
            "so it was shut down rather than left listening on the network (this Ray version does not take the "
            "loopback settings of ray_executor.start_local_ray; use --executor local, or a cluster via --ray-address)"
        )
    return info


# ---------------------------------------------------------------------------------------------
# the worker side
# ---------------------------------------------------------------------------------------------
def _files(root: Path) -> Dict[str, Tuple[int, int, int]]:
    """``{relative POSIX path: (inode, mtime_ns, size)}`` of the files under ``root``."""
    out = {}
    if root.is_dir():
        for p in root.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                st = p.stat()
                out[p.relative_to(root).as_posix()] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


class WorkerCache:
    """``ctx.store`` on a Ray worker: the run's tensor cache, nothing else (module docstring).

    Args:
        driver_root: the driver's ``OUT`` folder (read from, when this node sees it).
        identity: ``run.json``'s identity there (so that another run's folder is never read).
        scratch_parent: the driver's folder for its workers' scratch folders; used when this
            node sees it (the driver removes it at the end, even after a worker was killed),
            else a temporary folder of this node.
    """

    def __init__(self, driver_root: str, identity: Dict[str, Any], scratch_parent: Optional[str] = None) -> None:
        parent = scratch_parent if scratch_parent and Path(scratch_parent).is_dir() else None
        self.scratch = Path(tempfile.mkdtemp(prefix="prepdefense-ray-worker-", dir=parent))
        #: The worker's own store: the units it computed or was sent, and its tensor cache.
        self.local = ResultStore(self.scratch).open()
        self._cache = self.local.cache_dir
        self.driver_cache: Optional[Path] = None
        driver = ResultStore(Path(driver_root))
        try:
            cfg = driver.read_config()
        except (OSError, ValueError):
            cfg = None
        if cfg is not None and cfg.get("identity") == to_jsonable(identity):
            self.driver_cache = driver.cache_dir
        self._known = _files(self._cache)

    # What the experiments use of a store (``save_tensors``, ``load_tensors``, ``cache_dir``,
    # ``load_unit``).
    @property
    def cache_dir(self) -> Path:
        """The scratch cache, first given the driver's cache files it lacks (a unit opening a
        file by path, as the approximator's, then finds one that another worker made)."""
        if self.driver_cache is not None and self.driver_cache.is_dir():
            for rel in _files(self.driver_cache).keys() - _files(self._cache).keys():
                src, dst = self.driver_cache / rel, self._cache / rel
                try:
                    atomic_write_bytes(dst, src.read_bytes())
                except OSError:
                    continue
                st = dst.stat()
                self._known[rel] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return self._cache

    def cache_path(self, name: str) -> Path:
        return self._cache / f"{name}.pt"

    def save_tensors(self, name: str, obj: Any) -> Path:
        """Into the scratch cache; it goes to the driver with the unit's result."""
        import io

        buf = io.BytesIO()
        torch.save(obj, buf)
        return atomic_write_bytes(self.cache_path(name), buf.getvalue())

    def load_tensors(self, name: str) -> Optional[Any]:
        """From the scratch cache, else the driver's, else None (the unit recomputes it)."""
        for path in (self.cache_path(name), self.driver_cache / f"{name}.pt" if self.driver_cache else None):
            if path is not None and path.is_file():
                try:
                    return torch.load(path, map_location="cpu", weights_only=False)
                except Exception:  # noqa: BLE001 - an unreadable entry is recomputed, as in ResultStore
                    continue
        return None

    def load_unit(self, experiment: str, unit_id: str) -> Optional[Dict[str, Any]]:
        """A unit this worker computed or was sent (``keep``, ``add_stored``), or None."""
        return self.local.load_unit(experiment, unit_id)

    def keep(self, unit: Unit, result: UnitResult) -> None:
        """Store ``result`` here as the driver stores it there (the next units of its group read it)."""
        self.local.write_unit(unit.experiment, unit.id, key=unit.key, records=result.records, summary=result.summary,
                              status=result.status, error=result.error, seconds=result.seconds)

    def add_stored(self, stored: Dict[str, Any]) -> None:
        """A unit file of the driver's store, as it is there."""
        path = self.local.unit_path(stored["experiment"], stored["unit_id"])
        atomic_write_text(path, json.dumps(stored, sort_keys=True))

    def take_new_files(self) -> Dict[str, bytes]:
        """The scratch cache files written since the last call (by relative path)."""
        now = _files(self._cache)
        new = {rel: (self._cache / rel).read_bytes() for rel, sig in now.items() if self._known.get(rel) != sig}
        self._known = now
        return new

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"a Ray worker's store has no {name!r}: workers only compute units, the driver writes the store")


class UnitWorker:
    """The Ray actor (``ray.remote(UnitWorker)``): one per GPU or CPU slot, built once per run.

    Args:
        payload: the run's preset, seed, sample, classifier (on CPU), image source, model name,
            the driver's ``OUT`` and identity, and the experiments' run functions.
        device: this worker's device (``cuda`` on a GPU actor: Ray shows it one GPU).
        crash_once: test hook: the path of a marker file; the first unit of the cluster to
            create it kills its worker (``os._exit``) before computing anything.
    """

    def __init__(self, payload: Dict[str, Any], device: str, crash_once: Optional[str] = None) -> None:
        from .context import RunContext, Sample

        threads = 1
        try:
            import ray

            threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        except Exception:  # noqa: BLE001 - outside Ray (the tests' direct use) one thread
            pass
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.crash_once = crash_once
        self.runners: Dict[str, Callable] = payload["runners"]
        self.store = WorkerCache(payload["store_root"], payload["identity"], payload.get("scratch_parent"))
        #: Why this worker must not compute (its install ships another default table than the
        #: driver's run was made with), else None; each unit sent then comes back as an error.
        self.refusal = _table_refusal(payload["identity"])
        classifier = payload["classifier"].to(self.device).eval()
        for p in classifier.parameters():
            p.requires_grad_(False)
        x, labels, targets, ids, info = payload["sample"]
        self.ctx = RunContext(preset=payload["preset"], seed=payload["seed"], device=self.device, store=self.store,
                              classifier=classifier, sample=Sample(x, labels, targets, ids, info),
                              data_source=payload["data_source"], model_name=payload["model_name"])
        self.name = f"{socket.gethostname()}:{os.getpid()}/{self.device}"

    def ready(self) -> str:
        return self.name

    def compute(self, unit: Unit, stored: Sequence[Dict[str, Any]] = ()) -> UnitResult:
        """Compute ``unit`` (after taking in ``stored``, unit files of its group from the
        driver's store); records and summary as plain JSON, the cache files it wrote attached."""
        if self.refusal:
            return UnitResult("error", [], {}, self.refusal, 0.0, worker=self.name)
        for s in stored:
            self.store.add_stored(s)
        if self.crash_once:
            try:
                os.close(os.open(self.crash_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(17)
        result = compute_unit(self.ctx, unit, run=self.runners.get(unit.experiment))
        result.records = to_jsonable(result.records)
        result.summary = to_jsonable(result.summary)
        result.cache_files = self.store.take_new_files()
        result.worker = self.name
        self.store.keep(unit, result)
        return result

    def close(self) -> None:
        self.store.close()


def _table_refusal(identity: Dict[str, Any]) -> Optional[str]:
    """A message when this process's default quantization table (the shipped learned one) is
    not the one the run's identity records (a worker on another install), else None."""
    recorded = identity.get("default_table")
    here = table_digest(default_table()[0])
    if recorded is None or recorded == here:
        return None
    return (f"worker {socket.gethostname()}:{os.getpid()} ships another default quantization table ({here}) than "
            f"the run was made with ({recorded}); install the same prepdefense on every node")


# ---------------------------------------------------------------------------------------------
# the driver side
# ---------------------------------------------------------------------------------------------
class _Slot:
    """One worker place: its actor, its current group's remaining units, what it has in flight."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.queue: Deque[Unit] = collections.deque()
        self.in_flight: List[Tuple[Any, Unit]] = []


def _stored_unit(stored: Dict[str, Any]) -> Optional[Unit]:
    """The :class:`Unit` of a stored unit file (None when it does not say)."""
    key = stored.get("key") or {}
    try:
        return Unit(stored["experiment"], key["defense"], key["attack"], int(key["shard"]), key.get("variant", ""))
    except (KeyError, TypeError, ValueError):
        return None


def _groups(units: Sequence[Unit]) -> Deque[List[Unit]]:
    """Units sharing cached work or results (``sharding.group_key``), largest estimated cost first."""
    groups: Dict[Any, List[Unit]] = {}
    for u in units:
        groups.setdefault(group_key(u), []).append(u)
    first = {k: i for i, k in enumerate(groups)}
    order = sorted(groups, key=lambda k: (-sum(max(0.0, float(u.cost)) for u in groups[k]), first[k]))
    return collections.deque(groups[k] for k in order)


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    return model if devices <= {"cpu"} else copy.deepcopy(model).cpu()


class RayExecutor:
    """Units on Ray actors (module docstring).

    Args:
        address: a Ray cluster to join (``ray.init(address=...)``; ``auto`` for one started
            with ``ray start`` on this machine); None starts a local one on 127.0.0.1, with
            ``workers`` CPUs (default: this machine's CPU count), and shuts it down at the end.
            An already initialised Ray (in this process) is used as it is and left running.
        workers: at most this many actors (default: one per GPU of the cluster, else one per
            ``threads`` CPUs).
        threads: torch threads of each actor, and the CPUs it reserves (default 1).
        device: the run's ``--device``: ``cpu`` gives CPU actors; ``cuda`` needs GPUs in the
            cluster; ``auto`` uses GPU actors when the cluster has GPUs.
        in_flight: units queued on one actor at a time.
        max_attempts: worker deaths during one unit before it is stored as an error.
        start_timeout_s: how long actors may take to start (placement and loading) before the
            run goes on without them (an error when none started).
        crash_once: test hook, see :class:`UnitWorker`.
    """

    name = "ray"

    def __init__(self, *, address: Optional[str] = None, workers: Optional[int] = None, threads: int = 1,
                 device: str = "auto", in_flight: int = 2, max_attempts: int = 3, start_timeout_s: float = 300.0,
                 crash_once: Optional[str] = None) -> None:
        if workers is not None and int(workers) < 1:
            raise PrepDefenseError(f"--ray-workers {workers}: give at least 1")
        self.address = address
        self.workers = None if workers is None else int(workers)
        if int(threads) < 1:
            raise PrepDefenseError(f"--ray-threads {threads}: give at least 1")
        self.threads = int(threads)
        self.device = str(device)
        self.in_flight = max(1, int(in_flight))
        self.max_attempts = max(1, int(max_attempts))
        self.start_timeout_s = float(start_timeout_s)
        self.crash_once = crash_once
        self._where = "Ray"
        self._actor_class = None
        #: Of the last run: worker deaths, the units put back in the queue, and how long the
        #: first workers took to start (placement, imports, loading the model and sample).
        self.deaths = 0
        self.requeued: List[str] = []
        self.start_seconds = 0.0
        self.scratch_parent: Optional[str] = None

    def describe(self) -> str:
        return self._where

    # -- cluster -----------------------------------------------------------------------------
    def _connect(self, ray) -> bool:
        """Join or start Ray; True when this call started it (and so shuts it down)."""
        if ray.is_initialized():
            self._where = "Ray (already running in this process)"
            return False
        if self.address:
            ray.init(address=self.address, configure_logging=False, log_to_driver=False)
            self._where = f"Ray at {self.address}"
            return True
        n = (self.workers or max(1, (os.cpu_count() or 1) // self.threads)) * self.threads
        start_local_ray(n, num_gpus=0 if self.device == "cpu" else None)
        self._where = f"a local Ray on {LOOPBACK} ({n} CPU)"
        return True

    def _placement(self, ray) -> Tuple[int, Dict[str, Any], str]:
        """(number of actors, their resource options, their device)."""
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
        if self.device.startswith("cuda") and gpus < 1:
            raise PrepDefenseError(f"--device {self.device} with --executor ray: the Ray cluster has no GPU ({self._where})")
        if gpus >= 1 and self.device != "cpu":
            return (min(self.workers or gpus, gpus), {"num_gpus": 1, "num_cpus": self.threads}, "cuda")
        slots = cpus // self.threads
        if slots < 1:
            raise PrepDefenseError(f"the Ray cluster has {cpus} CPU(s), fewer than --ray-threads {self.threads} ({self._where})")
        return (min(self.workers or slots, slots), {"num_cpus": self.threads}, "cpu")

    # -- the run -------------------------------------------------------------------------------
    def run(self, ctx: "RunContext", units: Sequence[Unit], progress: "Progress") -> Iterator[Tuple[Unit, UnitResult]]:
        if not units:
            return
        ray = import_ray()
        started = self._connect(ray)
        slots: List[_Slot] = []
        self.scratch_parent = tempfile.mkdtemp(prefix="prepdefense-ray-")
        try:
            yield from self._run(ray, ctx, units, progress, slots)
        finally:
            self._stop(ray, slots)
            if started:
                ray.shutdown()
            shutil.rmtree(self.scratch_parent, ignore_errors=True)

    def _payload(self, ctx: "RunContext", units: Sequence[Unit]) -> Dict[str, Any]:
        s = ctx.sample
        stored = ctx.store.read_config() or {}
        return {
            "preset": ctx.preset, "seed": ctx.seed, "model_name": ctx.model_name, "data_source": ctx.data_source,
            "classifier": _cpu_copy(ctx.classifier),
            "sample": (s.x.cpu(), s.labels.cpu(), s.targets.cpu(), list(s.ids), dict(s.info)),
            "store_root": str(ctx.store.root.resolve()), "identity": stored.get("identity", {}),
            "runners": {e: registry.get(e).run for e in dict.fromkeys(u.experiment for u in units)},
            "scratch_parent": self.scratch_parent,
        }

    def _spawn(self, ray, payload_ref, options: Dict[str, Any], device: str) -> Any:
        if self._actor_class is None:
            self._actor_class = ray.remote(UnitWorker)
        return self._actor_class.options(max_restarts=0, max_task_retries=0, **options).remote(payload_ref, device, self.crash_once)

    def _start(self, ray, payload_ref, n: int, options: Dict[str, Any], device: str) -> List[_Slot]:
        actors = [self._spawn(ray, payload_ref, options, device) for _ in range(n)]
        refs = {a.ready.remote(): a for a in actors}
        done, late = ray.wait(list(refs), num_returns=len(refs), timeout=self.start_timeout_s)
        slots, errors = [], []
        for ref in done:
            try:
                ray.get(ref)
                slots.append(_Slot(refs[ref]))
            except Exception as e:  # noqa: BLE001 - reported below if no worker starts
                errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
                ray.kill(refs[ref])
        for ref in late:
            ray.kill(refs[ref])
        if not slots:
            why = errors[0] if errors else f"none started within {self.start_timeout_s:.0f} s (not enough free resources?)"
            raise PrepDefenseError(f"no Ray worker could start ({self._where}): {why}")
        return slots

    def _run(self, ray, ctx, units, progress, slots: List[_Slot]) -> Iterator[Tuple[Unit, UnitResult]]:
        from ray import exceptions as rex

        # What says "the worker (or its node, or the result on it) is gone": requeue and replace.
        lost_worker = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError, rex.OutOfMemoryError)

        n, options, device = self._placement(ray)
        groups = _groups(units)
        payload_ref = ray.put(self._payload(ctx, units))
        t0 = time.perf_counter()
        slots.extend(self._start(ray, payload_ref, min(n, len(groups)), options, device))
        self.start_seconds = time.perf_counter() - t0
        progress.start_experiment("ray", len(units), sum(u.cost for u in units),
                                  title=f"{len(slots)} worker(s) on {device}, {self._where}")
        attempts: Dict[str, int] = collections.Counter()
        pending: Dict[Any, _Slot] = {}
        self.deaths, self.requeued = 0, []
        # The units of each group already stored (ok): a worker starting the group is sent them.
        stored: Dict[Any, List[Tuple[str, str]]] = collections.defaultdict(list)
        wanted = {group_key(u) for u in units}
        for exp in dict.fromkeys(u.experiment for u in units):
            for s in ctx.store.iter_units(exp):
                u = _stored_unit(s)
                if u is not None and s.get("status") == "ok" and group_key(u) in wanted:
                    stored[group_key(u)].append((u.experiment, u.id))
        while True:
            for slot in slots:  # keep every actor busy, its group's units in plan order
                while len(slot.in_flight) < self.in_flight and (slot.queue or groups):
                    sent: List[Dict[str, Any]] = []
                    if not slot.queue:
                        slot.queue.extend(groups.popleft())
                        sent = [s for e, i in stored[group_key(slot.queue[0])] for s in [ctx.store.load_unit(e, i)] if s]
                    unit = slot.queue.popleft()
                    ref = slot.actor.compute.remote(unit, sent)
                    slot.in_flight.append((ref, unit))
                    pending[ref] = slot
            if not pending:
                progress.end_experiment("ray")
                return
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                slot = pending.pop(ref, None)
                if slot is None:  # a ref of a worker already replaced
                    continue
                try:
                    result = ray.get(ref)
                except lost_worker as e:
                    yield from self._replace(ray, slot, e, groups, attempts, pending, progress, payload_ref, options, device)
                    continue
                except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be sent back
                    msg = str(e).strip().splitlines()
                    result = UnitResult("error", [], {}, f"{type(e).__name__}: {msg[-1] if msg else ''}", 0.0)
                unit = next(u for r, u in slot.in_flight if r == ref)
                slot.in_flight = [(r, u) for r, u in slot.in_flight if r != ref]
                if result.status == "ok":  # stored by the caller before the next unit goes out
                    stored[group_key(unit)].append((unit.experiment, unit.id))
                progress.start_unit(unit)
                yield unit, result

    def _replace(self, ray, slot: _Slot, error: Exception, groups, attempts, pending, progress,
                 payload_ref, options, device) -> Iterator[Tuple[Unit, UnitResult]]:
        """``slot``'s worker died: requeue what it held (the unit it was computing, its oldest
        in flight, counts an attempt), and start another worker in its place.

        The unit of the attempt is the oldest in flight: an actor runs its calls in the order
        they were sent, so the others had not started."""
        self.deaths += 1
        lost = [u for _, u in slot.in_flight] + list(slot.queue)
        for r, _ in slot.in_flight:
            pending.pop(r, None)
        slot.in_flight, slot.queue = [], collections.deque()
        try:
            ray.kill(slot.actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
        running = lost[0]
        attempts[running.id] += 1
        if attempts[running.id] >= self.max_attempts:
            lines = str(error).strip().splitlines()
            why = (f"the Ray worker computing this unit died {attempts[running.id]} times "
                   f"(last: {type(error).__name__}: {lines[0] if lines else ''})")
            lost = lost[1:]
            progress.start_unit(running)
            yield running, UnitResult("error", [], {}, why, 0.0)
        if lost:
            self.requeued.extend(u.id for u in lost)
            groups.appendleft(lost)
        # Not waited for: its units queue until it is up, and a worker that cannot start fails
        # them as a death would (each unit's attempts bound how often).
        slot.actor = self._spawn(ray, payload_ref, options, device)

    def _stop(self, ray, slots: List[_Slot]) -> None:
        """Idle workers remove their scratch folders and end; busy ones (an interrupted run)
        are ended at once."""
        closing = []
        for slot in slots:
            if not slot.in_flight:
                try:
                    closing.append(slot.actor.close.remote())
                except Exception:  # noqa: BLE001 - already gone
                    pass
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=10.0)
        for slot in slots:
            try:
                ray.kill(slot.actor)
            except Exception:  # noqa: BLE001 - already gone
                pass

"""``reproduce --executor ray`` (issue 13, item 2): the units on Ray actors equal the local
executor's records, record for record; a worker that dies has its unit requeued (nothing lost,
nothing twice); a second run resumes with nothing to do (and, marked slow, a run that lost some
units recomputes only those); and the local Ray it starts keeps every socket on 127.0.0.1.

A local Ray with 2 CPUs on 127.0.0.1 is started once for the module (``start_local_ray``, the
executor's own start) and shut down at the end; every Ray step is bounded in time. One Ray run
(2 workers, the first of which dies on its first unit) serves the first three tests, as the
workers' start dominates their time. Skipped when Ray (the ``ray`` extra) is not installed.
Uses ``test_reproduce.py``'s tiny classifier and generated image folder, and ``test_shards.py``'s
smoke-sized plan (Table 1, Tables 2-3, Fig. 4 and a chain of the strong attack ensemble, on 4
images in image shards of 2).
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import pytest

from prepdefense.cli.main import main
from prepdefense.experiments.reproduce import ReproduceConfig, reproduce
from prepdefense.experiments.store import ResultStore

from test_reproduce import TINY_MODEL_SRC, image_folder  # noqa: F401 - image_folder is a fixture
from test_shards import ONLY, OVERRIDES, _stored

# The tiny classifier of test_reproduce.py (same source, same weights) as a class of this
# module, so that Ray can send it to the workers (pickled by value, see the fixture).
_ns: dict = {"__name__": __name__}
exec(TINY_MODEL_SRC, _ns)  # noqa: S102
TinyClassifier = _ns["TinyClassifier"]
TinyClassifier.__qualname__ = "TinyClassifier"

#: Seconds any one Ray step (start, run, shutdown) may take before the test fails.
DEADLINE_S = 120


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Raise TimeoutError in the main thread if the block runs longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"{what} took longer than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------
# sockets of this process and its descendants (Ray's GCS, raylet, agents and workers)
# ---------------------------------------------------------------------------------------------
def _descendants(root: int) -> list:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _socket_inodes(pid: int) -> dict:
    inodes = {}
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[link[8:-1]] = comm
    except OSError:
        pass
    return inodes


def _address(hexaddr: str) -> str:
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:
        ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return f"{ip}:{int(port, 16)}"


def _ip(addr: str):
    ip = ipaddress.ip_address(addr.rsplit(":", 1)[0])
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None else ip


def on_loopback(local: str, remote: str, listening: bool) -> bool:
    """A socket bound to the loopback address, connected to it (or, listening, to nothing)."""
    return _ip(local).is_loopback and (_ip(remote).is_loopback or (listening and _ip(remote).is_unspecified))


def inet_sockets(root: int) -> list:
    """(process name, protocol, local address, remote address, listening) of every TCP/UDP
    socket (IPv4 and IPv6) held by ``root`` and its descendants."""
    owners = {}
    for pid in _descendants(root):
        owners.update(_socket_inodes(pid))
    rows = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in owners:
                listening = proto.startswith("tcp") and f[3] == "0A" or proto.startswith("udp")
                rows.append((owners[f[9]], proto, _address(f[1]), _address(f[2]), listening))
    return rows


class SocketWatcher:
    """Collects :func:`inet_sockets` of this process tree every ``period`` s while active."""

    def __init__(self, period: float = 0.25) -> None:
        self.period, self.seen, self._stop = period, set(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.seen.update(inet_sockets(os.getpid()))
            self._stop.wait(self.period)

    def __enter__(self) -> "SocketWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.seen.update(inet_sockets(os.getpid()))


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray (2 CPUs) on 127.0.0.1 for the module, shut down at the end."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (the 'ray' extra: pip install 'prepdefense[ray]')")
    from ray import cloudpickle

    from prepdefense.experiments.ray_executor import start_local_ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the tiny classifier travels by value
    if ray.is_initialized():
        pytest.skip("another Ray is already running in this process")
    with deadline(DEADLINE_S, "starting a local Ray"):
        info = start_local_ray(2)
    try:
        yield info
    finally:
        with deadline(DEADLINE_S, "stopping Ray"):
            ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _config(out: Path, data: Path, **kw) -> ReproduceConfig:
    return ReproduceConfig(out=out, data=str(data), preset="smoke", device="cpu", quiet=True, only=ONLY,
                           overrides=OVERRIDES, **kw)


def _run(out: Path, data: Path, **kw):
    return reproduce(_config(out, data, **kw), classifier=TinyClassifier(), stream=open(os.devnull, "w"))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, image_folder):  # noqa: F811 - the imported fixture
    """The reference: the same plan with the local executor, with one torch thread as each Ray
    worker (a sum split over 2 threads may round differently)."""
    import torch

    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outcome = _run(out, image_folder)
    finally:
        torch.set_num_threads(threads)
    assert outcome.failed == 0 and outcome.ran == outcome.planned > 8
    return out, outcome


@pytest.fixture(scope="module")
def ray_run(ray_cluster, tmp_path_factory, image_folder):  # noqa: F811
    """The plan on 2 Ray workers, the first of which dies on its first unit (``os._exit``),
    with every socket of the process tree watched meanwhile."""
    from prepdefense.experiments.ray_executor import RayExecutor

    out = tmp_path_factory.mktemp("ray")
    marker = out.parent / "worker-died"
    executor = RayExecutor(workers=2, crash_once=str(marker))
    with SocketWatcher() as watcher, deadline(DEADLINE_S, "the Ray run"):
        outcome = _run(out, image_folder, executor=executor)
    assert marker.is_file(), "the test hook did not kill a worker"
    return out, outcome, executor, watcher.seen


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_ray_equals_local_record_for_record(ray_run, local_run):  # ray_run first: no local run when Ray is absent
    (local_out, local), (ray_out, outcome, _, _) = local_run, ray_run
    assert (outcome.planned, outcome.ran, outcome.failed) == (local.planned, local.ran, 0)
    rec_local, units_local = _stored(local_out)
    rec_ray, units_ray = _stored(ray_out)
    assert rec_ray.keys() == rec_local.keys() and all(rec_local[e] for e in ("table1", "table2", "table3", "fig4", "strong"))
    assert rec_ray == rec_local
    assert units_ray == units_local
    # The cache entries the workers made came back to the driver (Table 2's examples, the
    # adversarial batches of the sample strip), and the report reads as the local run's.
    cache = lambda out: sorted(p.relative_to(out).as_posix() for p in (out / "cache").rglob("*.pt"))  # noqa: E731
    assert cache(ray_out) == cache(local_out) and any("table2" in c for c in cache(ray_out))
    assert (ray_out / "figures" / "samples.png").is_file()
    report = lambda out: (out / "report.md").read_text().split("## Run metadata")[0]  # noqa: E731
    assert report(ray_out) == report(local_out)
    sessions = ResultStore(ray_out).sessions()
    assert sessions[-1]["executor"] == "ray" and sessions[-1]["units_run"] == outcome.planned


def test_a_dying_worker_has_its_unit_requeued(ray_run):
    """The run above lost a worker on its first unit: that unit (and those queued behind it)
    went back to the queue and a new worker took its place; every unit is stored once."""
    out, outcome, executor, _ = ray_run
    assert executor.deaths == 1 and executor.requeued
    assert executor.scratch_parent and not Path(executor.scratch_parent).exists()  # the dead worker's scratch too
    st = ResultStore(out)
    ids = [u["unit_id"] for u in st.units()]
    assert len(ids) == len(set(ids)) == outcome.planned and all(u["status"] == "ok" for u in st.units())
    for exp in st.experiments():
        keys = [(r["unit"], r["image_id"], r["kind"]) for r in st.read_view(exp)]
        assert len(keys) == len(set(keys))


def test_local_ray_keeps_every_socket_on_loopback(ray_run):
    _, _, _, seen = ray_run
    ray_procs = {name for name, *_ in seen}
    assert {"gcs_server", "raylet"} <= ray_procs, f"Ray's processes were not found among {sorted(ray_procs)}"
    assert any(s[4] for s in seen), "no listening socket seen"
    off = [s for s in seen if not on_loopback(*s[2:])]
    assert not off, "sockets off the loopback address:\n" + "\n".join(map(str, sorted(off)))
    # The check itself: what Ray does by default (listen on every interface, connect to the
    # machine's own address) fails it.
    assert on_loopback("::ffff:127.0.0.1:39645", ":::0", True) and on_loopback("127.0.0.1:1", "127.0.0.1:2", False)
    assert not on_loopback(":::39645", ":::0", True) and not on_loopback("0.0.0.0:6379", "0.0.0.0:0", True)
    assert not on_loopback("::ffff:192.0.2.2:41417", "::ffff:192.0.2.2:55244", False)
    assert not on_loopback("127.0.0.1:5", "0.0.0.0:0", False)


def test_a_second_ray_run_has_nothing_to_do(ray_run, image_folder):  # noqa: F811
    from prepdefense.experiments.ray_executor import RayExecutor

    out, first, _, _ = ray_run
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "units").rglob("*.json")}
    with deadline(DEADLINE_S, "resuming a Ray run"):
        again = _run(out, image_folder, executor=RayExecutor(workers=2))
    assert (again.already_done, again.ran, again.resumed) == (first.planned, 0, True)
    assert {p: p.stat().st_mtime_ns for p in (out / "units").rglob("*.json")} == mtimes


@pytest.mark.slow
def test_a_ray_run_recomputes_only_the_lost_units(ray_run, image_folder, tmp_path):  # noqa: F811
    """Every link of a strong-attack chain but its clean verdict lost: the next Ray run
    computes those alone, on one worker that is sent the stored clean verdict the first link
    reads (``ctx.store.load_unit``), with the same records. (Slow: a worker's start costs
    4-10 s on 2 cores.)"""
    import shutil

    from prepdefense.experiments.ray_executor import RayExecutor

    out = tmp_path / "out"
    shutil.copytree(ray_run[0], out)
    before = _stored(out)
    lost = [p for p in (out / "units" / "strong").glob("*.json") if "__clean__" not in p.name and "__diagnostics__" not in p.name]
    assert len(lost) >= 2
    for p in lost:
        p.unlink()
    executor = RayExecutor(workers=2)
    with deadline(DEADLINE_S, "resuming a Ray run"):
        outcome = _run(out, image_folder, executor=executor)
    assert (outcome.ran, outcome.failed, outcome.already_done) == (len(lost), 0, ray_run[1].planned - len(lost))
    assert _stored(out) == before


# ---------------------------------------------------------------------------------------------
# without Ray
# ---------------------------------------------------------------------------------------------
def _cli(capsys, *args):
    rc = main(["reproduce", "--preset", "smoke", *args])
    return rc, capsys.readouterr().err


def test_ray_flags_are_checked_before_anything_loads(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "o")
    code, err = _cli(capsys, "--out", out, "--ray-workers", "2")
    assert code == 2 and "--ray-workers applies to --executor ray only" in err
    code, err = _cli(capsys, "--out", out, "--ray-threads", "1")
    assert code == 2 and "--ray-threads applies to --executor ray only" in err
    code, err = _cli(capsys, "--out", out, "--executor", "ray", "--ray-workers", "0")
    assert code == 2 and "--ray-workers must be at least 1" in err
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find_spec(name, *a))
    code, err = _cli(capsys, "--out", out, "--executor", "ray")
    assert code == 2 and "pip install 'prepdefense[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_missing_ray_names_the_extra(monkeypatch):
    from prepdefense.errors import PrepDefenseError
    from prepdefense.experiments.ray_executor import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(PrepDefenseError, match=r"the 'ray' extra"):
        import_ray()

"""Data parallelism over the images of a batch on the CPU: one single-threaded worker thread
per torch CPU thread.

Step 1 of the paper's defense (8x8 block-DCT quantization, Section 5.2) is a short chain of
torch calls per image: a padding copy, four small matrix products, a rounding, a clip and a
remap. When every call splits a whole 64-image batch across the intra-op threads, each one
streams the batch through memory (about 70 MB per pass at 299x299) and the threads meet at a
barrier after every call. Letting each of ``torch.get_num_threads()`` worker threads take
steps of one or two images, one after another, each worker with a single intra-op thread,
keeps a step's data in that core's cache from the first copy to the last write and
needs no barrier. torch lets go of Python's lock inside every call, so the workers run in
parallel; they still take turns at the lock between calls, so the callers keep the Python
work per step small (``dct_quant.quantize_and_read``). Every image goes through the same
single-threaded calls whatever the number of workers, so results do not depend on it.

:func:`map_steps` is the one entry point. The pool is made on first use, re-made
when the torch thread count (or the cap) changes or after a ``fork``, and shared by every caller. A call from
a worker thread (or with one torch thread, or ``PREPDEFENSE_CPU_WORKERS=1``) runs inline.

Worker threads get their single intra-op thread from ``torch.set_num_threads(1)``, called in
each worker as it starts (OpenMP's and MKL's thread counts are per thread). That call also
sets the default that threads read when they first run parallel work, so each worker reads
it at once, and the pool's creator sets the default back once every worker has started.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["worker_count", "map_steps", "step_ranges", "ENV_WORKERS"]

#: Environment variable capping the number of workers (``1`` turns the pool off).
ENV_WORKERS = "PREPDEFENSE_CPU_WORKERS"

_LOCK = threading.Lock()
_POOL: Optional[ThreadPoolExecutor] = None
_POOL_KEY: Optional[Tuple[int, int]] = None  # (pid, workers)
_WORKER = threading.local()
#: Set when workers could not be made single-threaded (torch's native, non-OpenMP thread
#: pool has one thread count for the whole process): everything then runs inline.
_UNAVAILABLE = False


def _env_cap() -> Optional[int]:
    value = os.environ.get(ENV_WORKERS, "").strip()
    if not value:
        return None
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"{ENV_WORKERS} must be a positive integer, got {value!r}") from None


def worker_count(device: torch.device, units: int) -> int:
    """Workers to use for ``units`` independent pieces of work on ``device``: 1 off the CPU,
    inside a worker, or with one torch thread; else ``min(torch threads, units, cap)``."""
    if torch.device(device).type != "cpu" or units < 2 or _UNAVAILABLE or getattr(_WORKER, "active", False):
        return 1
    workers = min(torch.get_num_threads(), units)
    cap = _env_cap()
    return max(1, min(workers, cap) if cap is not None else workers)


def _start_worker(barrier: threading.Barrier) -> int:
    torch.set_num_threads(1)
    # torch reads the default into a thread on its first parallel call; make that happen
    # now, while the default is 1, or the worker would take the creator's count later.
    threads = torch.get_num_threads()
    _WORKER.active = True
    barrier.wait()
    return threads


def _pool(workers: int) -> Optional[ThreadPoolExecutor]:
    """The shared pool of ``workers`` threads, or ``None`` if workers cannot be made
    single-threaded here."""
    global _POOL, _POOL_KEY, _UNAVAILABLE
    key = (os.getpid(), workers)
    with _LOCK:
        if _POOL_KEY != key and not _UNAVAILABLE:
            if _POOL is not None and _POOL_KEY[0] == key[0]:
                _POOL.shutdown(wait=False)
            threads = torch.get_num_threads()
            barrier = threading.Barrier(workers + 1)
            pool = ThreadPoolExecutor(workers, thread_name_prefix="prepdefense-cpu")
            # start every thread now, each with one intra-op thread
            started = [pool.submit(_start_worker, barrier) for _ in range(workers)]
            barrier.wait()
            torch.set_num_threads(threads)  # the creator's count, and the default for new threads
            if any(f.result() != 1 for f in started):
                pool.shutdown(wait=False)
                _POOL, _POOL_KEY, _UNAVAILABLE = None, None, True
            else:
                _POOL, _POOL_KEY = pool, key
        return _POOL


def step_ranges(n: int, step: int) -> List[Tuple[int, int]]:
    """``(lo, hi)`` of the steps of ``step`` images that cover images ``0..n-1``."""
    step = max(int(step), 1)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def map_steps(make_runner: Callable[[], Callable[[int, int], None]], n: int, device, *, step: int = 1) -> None:
    """Run every step of :func:`step_ranges` ``(n, step)``.

    ``make_runner()`` is called once per worker, in that worker, and returns the function
    that runs one step ``(lo, hi)`` (so each worker can make its own buffers once). On the
    CPU with several torch threads the steps go to the worker pool, each worker with a
    single intra-op thread, taking the next step whenever it finishes one: a core slowed
    down by other load simply runs fewer steps. Otherwise they all run here. A step must
    only write its own images' outputs, and computes them the same way whichever worker
    runs it. Waits for every worker; the first exception raised is re-raised, and no
    further steps start after it.
    """
    ranges = step_ranges(n, step)
    workers = worker_count(device, len(ranges))
    pool = None
    if workers > 1:
        pool = _pool(worker_count(device, torch.get_num_threads()))  # sized for the thread count, >= workers
    if pool is None:
        run = make_runner()
        for lo, hi in ranges:
            run(lo, hi)
        return
    taken = itertools.count()  # next() on it is atomic under the GIL
    failed = threading.Event()
    grad_mode = torch.is_grad_enabled()  # per thread in torch: hand the caller's to the workers

    def work() -> None:
        with torch.set_grad_enabled(grad_mode):
            steps()

    def steps() -> None:
        run = make_runner()
        while True:
            k = next(taken)
            if k >= len(ranges) or failed.is_set():
                return
            try:
                run(*ranges[k])
            except BaseException:
                failed.set()
                raise

    futures = [pool.submit(work) for _ in range(workers)]
    error = None
    for future in futures:  # wait for all, even after a failure: they write into shared outputs
        try:
            future.result()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            error = error or exc
    if error is not None:
        raise error

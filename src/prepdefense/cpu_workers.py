"""Data parallelism over the images of a batch on the CPU: single-threaded worker threads,
one per torch CPU thread by default.

Step 1 of the paper's defense (8x8 block-DCT quantization, Section 5.2) is a short chain of
torch calls per image: a padding copy, four small matrix products, a rounding, a clip and a
remap. When every call splits a whole 64-image batch across the intra-op threads, each one
streams the batch through memory (about 70 MB per pass at 299x299) and the threads meet at a
barrier after every call. Letting each worker thread take steps of one or two images, one
after another, each worker with a single intra-op thread, keeps a step's data in that
core's cache from the first copy to the last write and needs no barrier. torch lets go of
Python's lock inside every call, so the workers run in parallel; they still take turns at
the lock between calls, so the callers keep the Python work per step small
(``defenses/kernels/dct_quant.py``). Every image goes through the same single-threaded
calls whatever the number of workers, so results do not depend on it.

A :class:`CPUWorkers` object holds the settings (how many workers, how much data a step
holds) and its thread pool, made on first use and re-made when its size changes or after a
``fork``. Callers take the one in force with :func:`current`: the shared :data:`DEFAULT`
unless :func:`use` put another in place for the calls made inside it::

    with cpu_workers.use(CPUWorkers(max_workers=1)):   # everything inline, on this thread
        defense(x)

``PREPDEFENSE_CPU_WORKERS=N`` caps the workers of every instance left at
``max_workers=None`` (``1`` turns the pool off). A call from a worker thread (of any
instance) runs inline, as does one that has a single step or a single worker.

Worker threads get their single intra-op thread from ``torch.set_num_threads(1)``, called in
each worker as it starts (OpenMP's and MKL's thread counts are per thread). That call also
sets the default that threads read when they first run parallel work, so each worker reads
it at once, and the pool's creator sets the default back once every worker has started.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch

__all__ = ["CPUWorkers", "WorkerStats", "DEFAULT", "current", "use", "step_ranges", "ENV_WORKERS", "STEP_ELEMENTS"]

#: Environment variable capping the number of workers (``1`` turns the pool off).
ENV_WORKERS = "PREPDEFENSE_CPU_WORKERS"

#: Default data per step, in tensor elements: about 3 MB of float32, two 299x299 RGB images.
#: A step's padding copy, transforms, rounding, clip and read-out then work on data that stays
#: in one core's cache instead of streaming the whole batch through memory at every pass.
STEP_ELEMENTS = 3 << 18

#: Marks this library's worker threads (of every instance): a call made from one runs inline.
_IN_WORKER = threading.local()


def _env_cap() -> Optional[int]:
    value = os.environ.get(ENV_WORKERS, "").strip()
    if not value:
        return None
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"{ENV_WORKERS} must be a positive integer, got {value!r}") from None


def step_ranges(n: int, step: int) -> List[Tuple[int, int]]:
    """``(lo, hi)`` of the steps of ``step`` images that cover images ``0..n-1``."""
    step = max(int(step), 1)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


@dataclass
class WorkerStats:
    """What :meth:`CPUWorkers.map_steps` did, counted per instance (for tests and benchmarks;
    concurrent callers may lose a count)."""

    calls: int = 0  #: calls of map_steps
    pooled_calls: int = 0  #: of those, the ones whose steps ran on the worker threads
    steps: int = 0  #: steps run, in all
    most_steps: int = 0  #: the most steps one call had


class CPUWorkers:
    """Runs the steps of a batch on single-threaded worker threads (see the module docstring).

    Args:
        max_workers: at most this many worker threads (a call with fewer steps uses fewer;
            ``1`` runs everything inline). ``None``: one per torch thread
            (``torch.get_num_threads()`` at each call), capped by ``PREPDEFENSE_CPU_WORKERS``.
        step_elements: tensor elements a step may hold (:meth:`images_per_step`); a step
            always holds at least one image.

    Both are plain attributes, read at every call. ``stats`` counts what
    :meth:`map_steps` did. :meth:`close` (or leaving a ``with`` block) stops the threads.
    """

    def __init__(self, max_workers: Optional[int] = None, *, step_elements: int = STEP_ELEMENTS) -> None:
        if max_workers is not None and int(max_workers) < 1:
            raise ValueError(f"max_workers must be >= 1 or None, got {max_workers!r}")
        if int(step_elements) < 1:
            raise ValueError(f"step_elements must be >= 1, got {step_elements!r}")
        self.max_workers = None if max_workers is None else int(max_workers)
        self.step_elements = int(step_elements)
        self.stats = WorkerStats()
        self._lock = threading.Lock()
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_key: Optional[Tuple[int, int]] = None  # (pid, workers)
        # Set when workers could not be made single-threaded (torch's native, non-OpenMP
        # thread pool has one thread count for the whole process): everything then runs inline.
        self._unavailable = False

    def __repr__(self) -> str:
        return f"CPUWorkers(max_workers={self.max_workers}, step_elements={self.step_elements})"

    @property
    def available(self) -> bool:
        """False once workers turned out not to be single-threaded here (all runs inline)."""
        return not self._unavailable

    def size(self) -> int:
        """Workers a call may use at most: ``max_workers``, else the torch thread count capped
        by ``PREPDEFENSE_CPU_WORKERS``."""
        if self.max_workers is not None:
            return self.max_workers
        cap = _env_cap()
        threads = torch.get_num_threads()
        return max(1, threads if cap is None else min(threads, cap))

    def worker_count(self, device, units: int) -> int:
        """Workers for ``units`` independent pieces of work on ``device``: 1 off the CPU, with
        fewer than two units, inside a worker or where workers are unavailable; else
        ``min(size(), units)``."""
        if torch.device(device).type != "cpu" or units < 2 or self._unavailable or getattr(_IN_WORKER, "active", False):
            return 1
        return max(1, min(self.size(), units))

    def images_per_step(self, image_elements: int) -> int:
        """Images per step when one image holds ``image_elements`` tensor elements (at least 1)."""
        return max(1, self.step_elements // max(int(image_elements), 1))

    def map_steps(self, make_runner: Callable[[], Callable[[int, int], None]], n: int, device, *, step: int = 1) -> None:
        """Run every step of :func:`step_ranges` ``(n, step)``.

        ``make_runner()`` is called once per worker, in that worker, and returns the function
        that runs one step ``(lo, hi)`` (so each worker can make its own buffers once). With
        more than one worker (:meth:`worker_count`) the steps go to the pool, each worker with
        a single intra-op thread, taking the next step whenever it finishes one: a core slowed
        down by other load simply runs fewer steps. Otherwise they all run here. A step must
        only write its own images' outputs, and computes them the same way whichever worker
        runs it. Workers run in the caller's grad mode (it is per thread in torch). Waits for
        every worker; the first exception raised is re-raised, and no further steps start
        after it.
        """
        ranges = step_ranges(n, step)
        stats = self.stats
        stats.calls += 1
        stats.steps += len(ranges)
        stats.most_steps = max(stats.most_steps, len(ranges))
        workers = self.worker_count(device, len(ranges))
        pool = self._executor(self.size()) if workers > 1 else None  # sized for any call, >= workers
        if pool is None:
            run = make_runner()
            for lo, hi in ranges:
                run(lo, hi)
            return
        stats.pooled_calls += 1
        taken = itertools.count()  # next() on it is atomic under the GIL
        failed = threading.Event()
        grad_mode = torch.is_grad_enabled()  # per thread in torch: hand the caller's to the workers

        def work() -> None:
            with torch.set_grad_enabled(grad_mode):
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

    def close(self) -> None:
        """Stop the worker threads (a later call starts new ones)."""
        with self._lock:
            if self._pool is not None and self._pool_key[0] == os.getpid():
                self._pool.shutdown(wait=True)
            self._pool, self._pool_key = None, None

    def __enter__(self) -> "CPUWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start_worker(self, barrier: threading.Barrier) -> int:
        """Runs first in every new worker thread: one intra-op thread; returns the count the
        thread then has (1 where per-thread counts work)."""
        torch.set_num_threads(1)
        # torch reads the default into a thread on its first parallel call; make that happen
        # now, while the default is 1, or the worker would take the creator's count later.
        threads = torch.get_num_threads()
        _IN_WORKER.active = True
        barrier.wait()
        return threads

    def _executor(self, workers: int) -> Optional[ThreadPoolExecutor]:
        """The pool of ``workers`` threads, made if needed, or ``None`` if workers cannot be
        made single-threaded here."""
        key = (os.getpid(), workers)
        with self._lock:
            if self._pool_key != key and not self._unavailable:
                if self._pool is not None and self._pool_key[0] == key[0]:  # after a fork its threads are gone
                    self._pool.shutdown(wait=False)
                threads = torch.get_num_threads()
                barrier = threading.Barrier(workers + 1)
                pool = ThreadPoolExecutor(workers, thread_name_prefix="prepdefense-cpu")
                started = [pool.submit(self._start_worker, barrier) for _ in range(workers)]  # every thread now
                barrier.wait()
                torch.set_num_threads(threads)  # the creator's count, and the default for new threads
                if any(f.result() != 1 for f in started):
                    pool.shutdown(wait=False)
                    self._pool, self._pool_key, self._unavailable = None, None, True
                else:
                    self._pool, self._pool_key = pool, key
            return self._pool


#: The instance callers use unless :func:`use` says otherwise; its attributes may be set.
DEFAULT = CPUWorkers()

_CURRENT: contextvars.ContextVar[Optional[CPUWorkers]] = contextvars.ContextVar("prepdefense_cpu_workers", default=None)


def current() -> CPUWorkers:
    """The :class:`CPUWorkers` in force here: the one :func:`use` set, else :data:`DEFAULT`."""
    return _CURRENT.get() or DEFAULT


@contextlib.contextmanager
def use(workers: CPUWorkers) -> Iterator[CPUWorkers]:
    """Make ``workers`` the one :func:`current` returns for the calls made inside the block
    (in this thread or task; other threads keep theirs). It does not close ``workers``."""
    if not isinstance(workers, CPUWorkers):
        raise TypeError(f"expected a CPUWorkers, got {type(workers).__name__}")
    token = _CURRENT.set(workers)
    try:
        yield workers
    finally:
        _CURRENT.reset(token)

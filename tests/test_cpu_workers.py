"""prepdefense.cpu_workers: per-image data parallelism on single-threaded CPU worker threads."""

from __future__ import annotations

import threading

import pytest
import torch

from prepdefense import cpu_workers


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n,parts,multiple", [(64, 2, 1), (64, 2, 2), (5, 2, 2), (7, 3, 1), (3, 4, 1), (1, 2, 3)])
def test_split_ranges_cover_in_order_at_multiples(n, parts, multiple):
    ranges = cpu_workers.split_ranges(n, parts, multiple)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(lo < hi for lo, hi in ranges) and len(ranges) <= parts
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(lo % multiple == 0 for lo, _ in ranges)


def test_map_image_ranges_runs_every_image_once_on_single_threaded_workers(two_threads):
    seen = torch.zeros(10, dtype=torch.int64)
    threads = {}
    lock = threading.Lock()
    both_running = threading.Barrier(2, timeout=30)  # the two ranges run at the same time

    def job(lo, hi):
        seen[lo:hi] += 1
        with lock:
            threads[threading.current_thread().name] = torch.get_num_threads()
        both_running.wait()

    cpu_workers.map_image_ranges(job, 10, "cpu")
    assert torch.equal(seen, torch.ones(10, dtype=torch.int64))
    assert len(threads) == 2 and set(threads.values()) == {1}
    assert all(name.startswith("prepdefense-cpu") for name in threads)
    assert torch.get_num_threads() == 2  # the caller's count is left as it was


def test_inline_when_one_thread_off_cpu_or_capped(two_threads, monkeypatch):
    calls = []
    record = lambda lo, hi: calls.append((threading.current_thread() is threading.main_thread(), lo, hi))  # noqa: E731
    cpu_workers.map_image_ranges(record, 4, "meta")  # off the CPU: one call, here
    monkeypatch.setenv(cpu_workers.ENV_WORKERS, "1")
    cpu_workers.map_image_ranges(record, 4, "cpu")
    monkeypatch.delenv(cpu_workers.ENV_WORKERS)
    torch.set_num_threads(1)
    cpu_workers.map_image_ranges(record, 4, "cpu")
    assert calls == [(True, 0, 4)] * 3


def test_bad_env_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(cpu_workers.ENV_WORKERS, "two")
    with pytest.raises(ValueError, match=cpu_workers.ENV_WORKERS):
        cpu_workers.worker_count(torch.device("cpu"), 8)


def test_errors_reach_the_caller_after_every_range_finished(two_threads):
    done = []

    def job(lo, hi):
        if lo == 0:
            raise RuntimeError("boom")
        done.append((lo, hi))

    with pytest.raises(RuntimeError, match="boom"):
        cpu_workers.map_image_ranges(job, 8, "cpu")
    assert done == [(4, 8)]


def test_nested_calls_run_inline_in_the_worker(two_threads):
    inner = []

    def job(lo, hi):
        cpu_workers.map_image_ranges(lambda a, b: inner.append(threading.current_thread().name), 4, "cpu")

    cpu_workers.map_image_ranges(job, 4, "cpu")
    assert len(inner) == 2 and all(name.startswith("prepdefense-cpu") for name in inner)


def test_one_pool_serves_calls_of_any_size(two_threads):
    cpu_workers.map_image_ranges(lambda lo, hi: None, 8, "cpu")
    pool = cpu_workers._POOL
    for n in (2, 3, 64):
        cpu_workers.map_image_ranges(lambda lo, hi: None, n, "cpu")
        assert cpu_workers._POOL is pool


def test_runs_inline_where_workers_cannot_be_single_threaded(two_threads, monkeypatch):
    """torch's native thread pool has one count per process: then nothing goes to workers."""
    monkeypatch.setattr(cpu_workers, "_POOL", None)
    monkeypatch.setattr(cpu_workers, "_POOL_KEY", None)
    monkeypatch.setattr(cpu_workers, "_UNAVAILABLE", False)
    monkeypatch.setattr(cpu_workers, "_start_worker", lambda barrier: (barrier.wait(), 2)[1])
    calls = []
    cpu_workers.map_image_ranges(lambda lo, hi: calls.append((threading.current_thread().name, lo, hi)), 4, "cpu")
    assert calls == [(threading.current_thread().name, 0, 4)]
    assert cpu_workers.worker_count(torch.device("cpu"), 4) == 1

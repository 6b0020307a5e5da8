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


def runner_of(fn):
    """A ``make_runner`` whose runners all call ``fn(lo, hi)``."""
    return lambda: fn


@pytest.mark.parametrize("n,step", [(64, 2), (5, 2), (7, 3), (1, 4), (0, 1)])
def test_step_ranges_cover_in_order(n, step):
    ranges = cpu_workers.step_ranges(n, step)
    assert [i for lo, hi in ranges for i in range(lo, hi)] == list(range(n))
    assert all(lo % step == 0 and 0 < hi - lo <= step for lo, hi in ranges)


def test_map_steps_runs_every_step_once_on_single_threaded_workers(two_threads):
    seen = torch.zeros(10, dtype=torch.int64)
    threads, runners = {}, []
    lock = threading.Lock()
    both_running = threading.Barrier(2, timeout=30)  # both workers run at the same time

    def make_runner():
        with lock:
            runners.append(threading.current_thread().name)
            threads[threading.current_thread().name] = torch.get_num_threads()
        both_running.wait()

        def run(lo, hi):
            seen[lo:hi] += 1

        return run

    cpu_workers.map_steps(make_runner, 10, "cpu", step=3)
    assert torch.equal(seen, torch.ones(10, dtype=torch.int64))
    assert len(runners) == 2 and set(threads.values()) == {1}  # one runner per worker
    assert all(name.startswith("prepdefense-cpu") for name in threads)
    assert torch.get_num_threads() == 2  # the caller's count is left as it was


def test_a_slow_worker_runs_fewer_steps(two_threads):
    """Workers take the next step when they finish one, so a slowed core does less."""
    done = {}
    lock = threading.Lock()
    slow = threading.Event()

    def make_runner():
        with lock:
            is_slow = not slow.is_set()
            slow.set()

        def run(lo, hi):
            if is_slow:
                threading.Event().wait(0.05)
            with lock:
                done.setdefault(is_slow, []).append(lo)

        return run

    cpu_workers.map_steps(make_runner, 40, "cpu", step=1)
    assert sorted(done[True] + done.get(False, [])) == list(range(40))
    assert len(done[True]) < 20


def test_inline_when_one_thread_off_cpu_or_capped(two_threads, monkeypatch):
    calls = []
    record = lambda lo, hi: calls.append((threading.current_thread() is threading.main_thread(), lo, hi))  # noqa: E731
    cpu_workers.map_steps(runner_of(record), 4, "meta", step=4)  # off the CPU: here
    monkeypatch.setenv(cpu_workers.ENV_WORKERS, "1")
    cpu_workers.map_steps(runner_of(record), 4, "cpu", step=4)
    monkeypatch.delenv(cpu_workers.ENV_WORKERS)
    torch.set_num_threads(1)
    cpu_workers.map_steps(runner_of(record), 4, "cpu", step=4)
    assert calls == [(True, 0, 4)] * 3


def test_bad_env_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(cpu_workers.ENV_WORKERS, "two")
    with pytest.raises(ValueError, match=cpu_workers.ENV_WORKERS):
        cpu_workers.worker_count(torch.device("cpu"), 8)


def test_errors_reach_the_caller_and_stop_further_steps(two_threads):
    done = []

    def run(lo, hi):
        if lo == 0:
            raise RuntimeError("boom")
        threading.Event().wait(0.01)
        done.append(lo)

    with pytest.raises(RuntimeError, match="boom"):
        cpu_workers.map_steps(runner_of(run), 100, "cpu", step=1)
    assert len(done) < 99


def test_nested_calls_run_inline_in_the_worker(two_threads):
    inner = []

    def run(lo, hi):
        cpu_workers.map_steps(runner_of(lambda a, b: inner.append(threading.current_thread().name)), 4, "cpu")

    cpu_workers.map_steps(runner_of(run), 2, "cpu")
    assert len(inner) == 2 * 4 and all(name.startswith("prepdefense-cpu") for name in inner)


def test_one_pool_serves_calls_of_any_size(two_threads):
    cpu_workers.map_steps(runner_of(lambda lo, hi: None), 8, "cpu")
    pool = cpu_workers._POOL
    for n in (2, 3, 64):
        cpu_workers.map_steps(runner_of(lambda lo, hi: None), n, "cpu")
        assert cpu_workers._POOL is pool


def test_runs_inline_where_workers_cannot_be_single_threaded(two_threads, monkeypatch):
    """torch's native thread pool has one count per process: then nothing goes to workers."""
    monkeypatch.setattr(cpu_workers, "_POOL", None)
    monkeypatch.setattr(cpu_workers, "_POOL_KEY", None)
    monkeypatch.setattr(cpu_workers, "_UNAVAILABLE", False)
    monkeypatch.setattr(cpu_workers, "_start_worker", lambda barrier: (barrier.wait(), 2)[1])
    calls = []
    cpu_workers.map_steps(runner_of(lambda lo, hi: calls.append((threading.current_thread().name, lo, hi))), 4, "cpu", step=2)
    assert calls == [(threading.current_thread().name, 0, 2), (threading.current_thread().name, 2, 4)]
    assert cpu_workers.worker_count(torch.device("cpu"), 4) == 1

"""prepdefense.cpu_workers: per-image data parallelism on single-threaded CPU worker threads.

Each test makes the :class:`CPUWorkers` it needs (or puts one in force with ``use``); none
patches the module's state.
"""

from __future__ import annotations

import threading

import pytest
import torch

from prepdefense import cpu_workers
from prepdefense.cpu_workers import CPUWorkers




@pytest.fixture
def two_workers():
    with CPUWorkers(max_workers=2) as workers:
        yield workers


def runner_of(fn):
    """A ``make_runner`` whose runners all call ``fn(lo, hi)``."""
    return lambda: fn


def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@pytest.mark.parametrize("n,step", [(64, 2), (5, 2), (7, 3), (1, 4), (0, 1)])
def test_step_ranges_cover_in_order(n, step):
    ranges = cpu_workers.step_ranges(n, step)
    assert [i for lo, hi in ranges for i in range(lo, hi)] == list(range(n))
    assert all(lo % step == 0 and 0 < hi - lo <= step for lo, hi in ranges)


def test_map_steps_runs_every_step_once_on_single_threaded_workers(two_workers, two_threads):
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

    two_workers.map_steps(make_runner, 10, "cpu", step=3)
    assert torch.equal(seen, torch.ones(10, dtype=torch.int64))
    assert len(runners) == 2 and set(threads.values()) == {1}  # one runner per worker
    assert all(name.startswith("prepdefense-cpu") for name in threads)
    assert torch.get_num_threads() == 2  # the caller's count is left as it was
    stats = two_workers.stats
    assert (stats.calls, stats.pooled_calls, stats.steps, stats.most_steps) == (1, 1, 4, 4)


def test_a_slow_worker_runs_fewer_steps(two_workers):
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

    two_workers.map_steps(make_runner, 40, "cpu", step=1)
    assert sorted(done[True] + done.get(False, [])) == list(range(40))
    assert len(done[True]) < 20


def test_default_size_is_the_torch_thread_count_capped_by_the_environment(two_threads, monkeypatch):
    monkeypatch.delenv(cpu_workers.ENV_WORKERS, raising=False)
    workers = CPUWorkers()
    assert workers.size() == 2 and workers.worker_count("cpu", 8) == 2
    monkeypatch.setenv(cpu_workers.ENV_WORKERS, "1")
    assert workers.size() == 1 and workers.worker_count("cpu", 8) == 1
    monkeypatch.setenv(cpu_workers.ENV_WORKERS, "8")
    assert workers.size() == 2
    torch.set_num_threads(1)
    monkeypatch.delenv(cpu_workers.ENV_WORKERS)
    assert workers.size() == 1
    assert CPUWorkers(max_workers=3).size() == 3  # an explicit size: neither threads nor environment


def test_inline_off_cpu_with_one_step_capped_or_one_thread(two_threads, monkeypatch):
    calls = []
    record = lambda lo, hi: calls.append((on_main_thread(), lo, hi))  # noqa: E731
    workers = CPUWorkers()
    workers.map_steps(runner_of(record), 4, "meta", step=2)  # off the CPU: here
    workers.map_steps(runner_of(record), 4, "cpu", step=4)  # one step: here
    CPUWorkers(max_workers=1).map_steps(runner_of(record), 4, "cpu", step=2)
    monkeypatch.setenv(cpu_workers.ENV_WORKERS, "1")
    workers.map_steps(runner_of(record), 4, "cpu", step=2)
    monkeypatch.delenv(cpu_workers.ENV_WORKERS)
    torch.set_num_threads(1)
    workers.map_steps(runner_of(record), 4, "cpu", step=2)
    assert calls == [(True, 0, 2), (True, 2, 4), (True, 0, 4)] + [(True, 0, 2), (True, 2, 4)] * 3
    assert workers.stats.pooled_calls == 0


def test_bad_settings_are_clear_errors(monkeypatch):
    monkeypatch.setenv(cpu_workers.ENV_WORKERS, "two")
    with pytest.raises(ValueError, match=cpu_workers.ENV_WORKERS):
        CPUWorkers().worker_count(torch.device("cpu"), 8)
    with pytest.raises(ValueError, match="max_workers"):
        CPUWorkers(max_workers=0)
    with pytest.raises(ValueError, match="step_elements"):
        CPUWorkers(step_elements=0)
    with pytest.raises(TypeError):
        with cpu_workers.use(4):
            pass


def test_images_per_step():
    assert CPUWorkers(step_elements=100).images_per_step(30) == 3
    assert CPUWorkers(step_elements=10).images_per_step(30) == 1  # never fewer than one image
    assert CPUWorkers().images_per_step(3 * 304 * 304) == 2  # two 299x299 RGB images by default


def test_errors_reach_the_caller_and_stop_further_steps(two_workers):
    done = []

    def run(lo, hi):
        if lo == 0:
            raise RuntimeError("boom")
        threading.Event().wait(0.01)
        done.append(lo)

    with pytest.raises(RuntimeError, match="boom"):
        two_workers.map_steps(runner_of(run), 100, "cpu", step=1)
    assert len(done) < 99


def test_nested_calls_run_inline_in_the_worker(two_workers):
    inner = []

    def run(lo, hi):
        CPUWorkers(max_workers=2).map_steps(runner_of(lambda a, b: inner.append(threading.current_thread().name)), 4, "cpu")

    two_workers.map_steps(runner_of(run), 2, "cpu")
    assert len(inner) == 2 * 4 and all(name.startswith("prepdefense-cpu") for name in inner)


def test_one_pool_serves_calls_of_any_size(two_workers):
    threads = set()  # Thread objects, kept alive, so a new thread is a new entry
    lock = threading.Lock()

    def record(lo, hi):
        with lock:
            threads.add(threading.current_thread())
        threading.Event().wait(0.005)

    for n in (8, 2, 3, 64):
        two_workers.map_steps(runner_of(record), n, "cpu")
    assert len(threads) == 2  # the same two threads every time
    two_workers.close()  # a later call starts new threads
    two_workers.map_steps(runner_of(record), 64, "cpu")
    assert len(threads) > 2


def test_workers_take_the_callers_grad_mode(two_workers):
    modes = []
    lock = threading.Lock()

    def record(lo, hi):
        with lock:
            modes.append(torch.is_grad_enabled())

    with torch.no_grad():
        two_workers.map_steps(runner_of(record), 4, "cpu")
    with torch.enable_grad():
        two_workers.map_steps(runner_of(record), 4, "cpu")
    assert modes == [False] * 4 + [True] * 4


def test_use_puts_workers_in_force_here_only():
    mine = CPUWorkers(max_workers=1, step_elements=7)
    assert cpu_workers.current() is cpu_workers.DEFAULT
    seen_elsewhere = []
    with cpu_workers.use(mine) as workers:
        assert workers is mine and cpu_workers.current() is mine
        other = threading.Thread(target=lambda: seen_elsewhere.append(cpu_workers.current()))
        other.start()
        other.join()
        with cpu_workers.use(CPUWorkers()) as inner:
            assert cpu_workers.current() is inner
        assert cpu_workers.current() is mine
    assert cpu_workers.current() is cpu_workers.DEFAULT
    assert seen_elsewhere == [cpu_workers.DEFAULT]


class NativeThreadPoolWorkers(CPUWorkers):
    """Workers as under torch's native thread pool, which has one thread count per process:
    a worker thread cannot be made single-threaded."""

    def _start_worker(self, barrier):
        barrier.wait()
        return 2


def test_runs_inline_where_workers_cannot_be_single_threaded():
    workers = NativeThreadPoolWorkers(max_workers=2)
    calls = []
    workers.map_steps(runner_of(lambda lo, hi: calls.append((on_main_thread(), lo, hi))), 4, "cpu", step=2)
    assert calls == [(True, 0, 2), (True, 2, 4)]
    assert not workers.available and workers.worker_count(torch.device("cpu"), 4) == 1

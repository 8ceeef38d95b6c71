"""RequestQueue: native heap vs its pure-Python twin vs the stdlib queue.Queue.

    pytest benchmarks/bench_native_queue.py --benchmark-only

- push + pop of one item: native RequestQueue (push, pop_batch(1)), the heapq twin, and
  queue.Queue (put, get_nowait), the no-batching floor a hand-rolled service would use.
  The native/queue.Queue ratio is measured in the same run and asserted (target 3x).
- push 64 then one pop_batch(64): native vs twin.
- GIL release (pandas asv gil.py style): a pure-Python counting loop alone, then while
  another thread is blocked in pop_batch on an empty queue (it must keep its speed), then
  while another thread spins in Python (it must visibly slow: the benchmark can tell).
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import timeit
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchproc._native.request_queue import RequestQueue as NativeQueue

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference_queue import RequestQueue as ReferenceQueue

PUSH_POP_TARGET = 3.0       # native push+pop vs queue.Queue put+get_nowait
GIL_KEEP = 1.25             # counting loop with a blocked popper: at most this much slower
GIL_TELL = 1.4              # with a Python spinner: at least this much slower


def _best(fn: Callable[[], Any], number: int, repeat: int = 7) -> float:
    """Best seconds per call over several repeats."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def _interleaved(cases: list[tuple[Callable[[], Any], int]], rounds: int = 15) -> list[float]:
    """Best seconds per call of each case, measured in turn round after round, so load
    from other processes on a shared machine hits every case alike."""
    best = [math.inf] * len(cases)
    for _ in range(rounds):
        for k, (fn, number) in enumerate(cases):
            best[k] = min(best[k], timeit.timeit(fn, number=number) / number)
    return best


# ------------------------------------------------------------------ push + pop, one item


def _native_push_pop() -> Callable[[], Any]:
    q = NativeQueue(1024)
    push, pop = q.push, q.pop_batch
    return lambda: (push(1), pop(1))


def _reference_push_pop() -> Callable[[], Any]:
    q = ReferenceQueue(1024)
    push, pop = q.push, q.pop_batch
    return lambda: (push(1), pop(1))


def _stdlib_put_get() -> Callable[[], Any]:
    q: queue.Queue[int] = queue.Queue(1024)
    put, get = q.put, q.get_nowait
    return lambda: (put(1), get())


@pytest.mark.benchmark(group="queue-push+pop-1")
def test_bench_queue_push_pop_native(benchmark: Any) -> None:
    step = _native_push_pop()
    assert step()[1] == [1]
    benchmark(step)
    native, stdlib, twin = _interleaved(
        [(_native_push_pop(), 5_000), (_stdlib_put_get(), 5_000), (_reference_push_pop(), 1_000)])
    benchmark.extra_info["ns_native"] = round(native * 1e9)
    benchmark.extra_info["ns_queue_Queue"] = round(stdlib * 1e9)
    benchmark.extra_info["ns_twin"] = round(twin * 1e9)
    benchmark.extra_info["speedup_vs_queue_Queue"] = round(stdlib / native, 1)
    benchmark.extra_info["speedup_vs_twin"] = round(twin / native, 1)
    assert stdlib / native >= PUSH_POP_TARGET, (
        f"native push+pop only {stdlib / native:.1f}x queue.Queue put+get_nowait")


@pytest.mark.benchmark(group="queue-push+pop-1")
def test_bench_queue_push_pop_reference(benchmark: Any) -> None:
    benchmark(_reference_push_pop())


@pytest.mark.benchmark(group="queue-push+pop-1")
def test_bench_queue_put_get_stdlib(benchmark: Any) -> None:
    benchmark(_stdlib_put_get())


# ------------------------------------------------------------------ push 64, pop 64


def _push64_pop64(q: Any) -> Callable[[], list[Any]]:
    push, pop = q.push, q.pop_batch
    items = list(range(64))

    def step() -> list[Any]:
        for i in items:
            push(i, i & 3)
        return pop(64)

    return step


@pytest.mark.benchmark(group="queue-push64+pop_batch64")
def test_bench_queue_push64_pop64_native(benchmark: Any) -> None:
    step = _push64_pop64(NativeQueue(1024))
    assert len(step()) == 64
    benchmark(step)
    native, twin = _interleaved(
        [(_push64_pop64(NativeQueue(1024)), 200), (_push64_pop64(ReferenceQueue(1024)), 20)])
    benchmark.extra_info["ns_per_item_native"] = round(native * 1e9 / 64)
    benchmark.extra_info["ns_per_item_twin"] = round(twin * 1e9 / 64)
    benchmark.extra_info["speedup_vs_twin"] = round(twin / native, 1)


@pytest.mark.benchmark(group="queue-push64+pop_batch64")
def test_bench_queue_push64_pop64_reference(benchmark: Any) -> None:
    step = _push64_pop64(ReferenceQueue(1024))
    assert len(step()) == 64
    benchmark(step)


# ------------------------------------------------------------------ GIL release


def _count(n: int = 200_000) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


class _Background:
    """A thread doing `work` until stopped; started and stopped around a measurement."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.q = NativeQueue(4)
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.ready.set()
        if self.kind == "blocked-pop":
            while not self.stop.is_set():
                self.q.pop_batch(1)             # timeout=None: blocks until close()
        else:                                    # "python-spinner"
            x = 0
            while not self.stop.is_set():
                x += 1

    def __enter__(self) -> _Background:
        self.thread.start()
        assert self.ready.wait(10)
        if self.kind == "blocked-pop":
            while self.q._waiters()[0] != 1:    # really blocked before measuring
                threading.Event().wait(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.q.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def background(request: pytest.FixtureRequest) -> Iterator[_Background | None]:
    kind = request.param
    if kind == "alone":
        yield None
        return
    with _Background(kind) as bg:
        yield bg


@pytest.mark.benchmark(group="queue-gil-count-loop")
@pytest.mark.parametrize("background", ["alone", "blocked-pop", "python-spinner"],
                         indirect=True)
def test_bench_queue_gil(benchmark: Any, background: _Background | None) -> None:
    benchmark(_count)


@pytest.mark.benchmark(group="queue-gil-ratios")
def test_bench_queue_gil_ratios(benchmark: Any) -> None:
    """Serial vs parallel in one run: the blocked popper costs the loop (almost) nothing,
    the Python spinner costs it about half its speed. The three settings are measured in
    turn, round after round, and each keeps its best time, so load from other processes
    on a shared machine hits them alike."""
    best = {"alone": math.inf, "blocked-pop": math.inf, "python-spinner": math.inf}
    for _ in range(8):
        for kind in best:
            if kind == "alone":
                t = _best(_count, 2, repeat=2)
            else:
                with _Background(kind):
                    t = _best(_count, 2, repeat=2)
            best[kind] = min(best[kind], t)
    blocked = best["blocked-pop"] / best["alone"]
    spinner = best["python-spinner"] / best["alone"]
    benchmark.extra_info["ms_count_loop_alone"] = round(best["alone"] * 1e3, 2)
    benchmark.extra_info["slowdown_blocked_pop"] = round(blocked, 2)
    benchmark.extra_info["slowdown_python_spinner"] = round(spinner, 2)
    benchmark(_count)
    assert blocked <= GIL_KEEP, f"a blocked pop slowed the loop {blocked:.2f}x"
    assert spinner >= GIL_TELL, f"a Python spinner slowed it only {spinner:.2f}x"

"""Enqueue alone: what queueing one request costs the caller, with no batch running.

    pytest benchmarks/bench_intake.py --benchmark-only

``enqueue_predict`` (a thread's call) and ``enqueue_predict_async`` (a coroutine's), one
row of 64 float32 each, into a processor that was never started and into one that is
started and paused, its workers waiting for requests it holds. Measured in turn, round
after round, in one run. A pause holds the pops, so a request queued meanwhile must wake
no worker: the paused processor's intake is asserted to cost at most ``PAUSED_MAX``
times the other's. (It once cost about 1.5x from a thread and 4x from a coroutine: every
push woke a worker to find the queue still paused.) And the native intake against the
Python path it falls back to (for an item of a kind not described before), both APIs.
"""

from __future__ import annotations

import asyncio
import math
import timeit
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from batchproc import BatchProcessor, BatchProcessorConfig

ITEM = np.ones((1, 64), dtype=np.float32)
CALLS = 2_000       # per timing
ROUNDS = 15
PAUSED_MAX = 1.3    # paused processor's intake vs a processor not started


def _processor(paused: bool) -> BatchProcessor[Any, Any]:
    # Room for every call of the run; nothing is popped.
    p: BatchProcessor[Any, Any] = BatchProcessor(BatchProcessorConfig(
        max_batch_size=64, batch_timeout=0.005, max_queue_size=6 * ROUNDS * CALLS))
    if paused:
        p.start(lambda batch: batch)
        p.pause()
    return p


@pytest.fixture
def processors() -> Iterator[tuple[BatchProcessor[Any, Any], BatchProcessor[Any, Any]]]:
    idle, paused = _processor(False), _processor(True)
    try:
        yield idle, paused
    finally:
        paused.stop(timeout=0)
        idle.stop(timeout=0)


def _rounds(cases: list[Callable[[], Any]]) -> list[float]:
    """Best microseconds per call of each case, measured in turn round after round, so
    load from other processes on a shared machine hits every case alike."""
    best = [math.inf] * len(cases)
    for _ in range(ROUNDS):
        for k, fn in enumerate(cases):
            best[k] = min(best[k], timeit.timeit(fn, number=CALLS) / CALLS * 1e6)
    return best


@pytest.mark.benchmark(group="intake")
def test_bench_intake_thread(benchmark: Any, processors: Any) -> None:
    idle, paused = processors
    not_started_us, paused_us = _rounds([lambda: idle.enqueue_predict(ITEM),
                                         lambda: paused.enqueue_predict(ITEM)])
    benchmark.extra_info["us_not_started"] = round(not_started_us, 3)
    benchmark.extra_info["us_paused"] = round(paused_us, 3)
    benchmark.pedantic(idle.enqueue_predict, (ITEM,), rounds=ROUNDS, iterations=CALLS)
    assert paused_us <= PAUSED_MAX * not_started_us, (
        f"enqueue_predict into a paused processor: {paused_us:.2f} us against "
        f"{not_started_us:.2f} us into one not started")


@pytest.mark.benchmark(group="intake")
def test_bench_intake_asyncio(benchmark: Any, processors: Any) -> None:
    idle, paused = processors

    async def measure() -> list[float]:
        # On the running loop, as a coroutine's calls are.
        best = _rounds([lambda: idle.enqueue_predict_async(ITEM),
                        lambda: paused.enqueue_predict_async(ITEM)])
        benchmark.pedantic(idle.enqueue_predict_async, (ITEM,), rounds=ROUNDS,
                           iterations=CALLS)
        return best

    not_started_us, paused_us = asyncio.run(measure())
    benchmark.extra_info["us_not_started"] = round(not_started_us, 3)
    benchmark.extra_info["us_paused"] = round(paused_us, 3)
    assert paused_us <= PAUSED_MAX * not_started_us, (
        f"enqueue_predict_async into a paused processor: {paused_us:.2f} us against "
        f"{not_started_us:.2f} us into one not started")


class _Declining:
    """An intake that takes nothing: every request takes the Python path."""

    last_channel: Any = None

    def use_channel(self, channel: Any) -> None:
        self.last_channel = channel  # as the native one: the Python path finds it so

    def enqueue(self, *args: Any) -> None:
        return None

    enqueue_async = enqueue


@pytest.mark.benchmark(group="intake")
def test_bench_intake_native_against_the_python_path(benchmark: Any) -> None:
    """The native intake (``_native.intake``) against the Python path it falls back to,
    from a thread and from a coroutine, side by side: it must not cost more."""
    native, python = _processor(False), _processor(False)
    python._intake = _Declining()  # type: ignore[attr-defined]
    try:
        thread_native, thread_python = _rounds([lambda: native.enqueue_predict(ITEM),
                                                lambda: python.enqueue_predict(ITEM)])

        async def measure() -> list[float]:
            native.enqueue_predict_async(ITEM)  # this loop's channel, as its first call
            return _rounds([lambda: native.enqueue_predict_async(ITEM),
                            lambda: python.enqueue_predict_async(ITEM)])

        async_native, async_python = asyncio.run(measure())
        benchmark.pedantic(native.enqueue_predict, (ITEM,), rounds=ROUNDS, iterations=CALLS)
    finally:
        native.stop(timeout=0)
        python.stop(timeout=0)
    for name, value in [("us_thread_native", thread_native),
                        ("us_thread_python_path", thread_python),
                        ("us_async_native", async_native),
                        ("us_async_python_path", async_python)]:
        benchmark.extra_info[name] = round(value, 3)
    assert thread_native <= thread_python and async_native <= async_python, (
        f"native intake: {thread_native:.2f} us from a thread (Python path "
        f"{thread_python:.2f}), {async_native:.2f} us from a coroutine ({async_python:.2f})")

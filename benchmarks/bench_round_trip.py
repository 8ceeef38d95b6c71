"""One client, one request at a time: what a round trip through batchproc costs.

    pytest benchmarks/bench_round_trip.py --benchmark-only

At low load nothing can be batched, so a batcher can only add latency. Measured in one
run, each as the time of 200 sequential enqueue -> result round trips (identity model,
one row of 64 float32):

- floor: a bare native RequestQueue and a RequestFuture between the caller and one
  consumer thread that completes each future, its pops spinning as batchproc's workers'
  do (``RequestQueue.spin``) and its caller's ``result()`` as batchproc's callers' do;
  the GIL hand-offs any threaded batcher pays, with nothing else; floor-parked: the
  same, its pops parking at once (a thread wake-up more per round trip);
- batchproc with the default configuration (adaptive, 4 workers), the same with its
  workers' pops parking at once (batchproc-parked), with its callers parking at once in
  ``result()`` (batchproc-caller-parked: no ``RESULT_SPIN``), and with one worker;
- the minimal pure-Python batcher (benchmarks/minimal_batcher.py), which waits its full
  5 ms delay for a batch that never fills.

extra_info gives microseconds per round trip and, for batchproc, its distance to the floor
(best rounds), to batchproc-parked and to batchproc-caller-parked (median and best
rounds), each measured in turn with it.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchproc import BatchProcessor, BatchProcessorConfig
from batchproc._native.request_queue import RequestQueue
from batchproc._native.waiting import get_spin
from batchproc.engine.workers import POP_SPIN
from batchproc.futures import RequestFuture, set_result_spin

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minimal_batcher import MinimalBatcher

ROUND_TRIPS = 200
ITEM = np.ones((1, 64), dtype=np.float32)


def _identity(batch: Any) -> Any:
    return batch


class _Floor:
    """Caller -> native queue -> one consumer thread -> future: nothing else."""

    def __init__(self, spin: float = POP_SPIN) -> None:
        self.queue = RequestQueue(1024)
        self.queue.spin = spin
        self.thread = threading.Thread(target=self._consume, daemon=True)
        self.thread.start()

    def _consume(self) -> None:
        pop = self.queue.pop_batch
        while True:
            futures = pop(64)
            if not futures:
                return
            for future in futures:
                future.set_running_or_notify_cancel()
                future.set_result(ITEM)

    def submit(self, item: Any) -> RequestFuture:
        future = RequestFuture()
        self.queue.push(future)
        return future

    def close(self) -> None:
        self.queue.close()
        self.thread.join(10)


def _loop(submit: Callable[[Any], Any]) -> Callable[[], None]:
    def run() -> None:
        for _ in range(ROUND_TRIPS):
            submit(ITEM).result()

    return run


def _batchproc(workers: int = 4, spin: float = POP_SPIN) -> BatchProcessor[Any, Any]:
    config = BatchProcessorConfig(max_batch_size=64, batch_timeout=0.005, max_workers=workers)
    processor: BatchProcessor[Any, Any] = BatchProcessor(config)
    processor.start(_identity)
    processor._queue.spin = spin
    return processor


@contextlib.contextmanager
def _callers_parking() -> Iterator[None]:
    """Callers blocked in ``result()`` park at once (no RESULT_SPIN) within the block."""
    spin = get_spin()
    set_result_spin(0.0)
    try:
        yield
    finally:
        set_result_spin(spin)


def _caller_parked(run: Callable[[], None]) -> Callable[[], None]:
    """``run`` with callers blocked in ``result()`` parking at once."""
    def parked() -> None:
        with _callers_parking():
            run()

    return parked


@pytest.fixture(params=["floor", "floor-parked", "batchproc", "batchproc-parked",
                        "batchproc-caller-parked", "batchproc-1-worker", "minimal"])
def system(request: pytest.FixtureRequest) -> Iterator[tuple[str, Callable[[Any], Any]]]:
    kind = request.param
    if kind.startswith("floor"):
        floor = _Floor(0.0 if kind.endswith("parked") else POP_SPIN)
        yield kind, floor.submit
        floor.close()
    elif kind == "batchproc-caller-parked":
        with _callers_parking(), _batchproc() as processor:
            yield kind, processor.enqueue_predict
    elif kind.startswith("batchproc"):
        processor = _batchproc(1 if kind.endswith("1-worker") else 4,
                               0.0 if kind.endswith("parked") else POP_SPIN)
        with processor:
            yield kind, processor.enqueue_predict
    else:
        with MinimalBatcher(_identity, max_batch=64, max_delay=0.005) as minimal:
            yield kind, minimal.submit


@pytest.mark.benchmark(group="round-trip-1-client")
def test_bench_round_trip(benchmark: Any, system: tuple[str, Callable[[Any], Any]]) -> None:
    kind, submit = system
    run = _loop(submit)
    assert np.array_equal(submit(ITEM).result(timeout=10), ITEM)
    rounds = 3 if kind == "minimal" else 15  # the minimal batcher: 5 ms per trip
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["us_per_round_trip_min"] = round(
        benchmark.stats.stats.min * 1e6 / ROUND_TRIPS, 1)
    benchmark.extra_info["us_per_round_trip_median"] = round(
        benchmark.stats.stats.median * 1e6 / ROUND_TRIPS, 1)
    if kind == "batchproc":
        # Against the floor and against its workers parking at once, measured in turn
        # round after round (a shared machine's load hits them alike): what batchproc's
        # own per-batch work adds to a round trip, and what its spinning pops save.
        floor = _Floor()
        parked = _batchproc(spin=0.0)
        try:
            ours, bare, unspun, caller_parked = _interleaved(
                [run, _loop(floor.submit), _loop(parked.enqueue_predict),
                 _caller_parked(run)])
        finally:
            floor.close()
            parked.stop()
        us = 1e6 / ROUND_TRIPS
        benchmark.extra_info["us_floor"] = round(min(bare) * us, 1)
        benchmark.extra_info["us_batchproc"] = round(min(ours) * us, 1)
        benchmark.extra_info["us_added_by_batchproc"] = round((min(ours) - min(bare)) * us, 1)
        # Parked workers' best rounds come right after another loop kept the CPUs awake,
        # when a wake-up is quick; their median is what a wake-up usually costs.
        benchmark.extra_info["us_batchproc_median"] = round(statistics.median(ours) * us, 1)
        benchmark.extra_info["us_batchproc_parked_median"] = round(
            statistics.median(unspun) * us, 1)
        benchmark.extra_info["parked_over_spinning_median"] = round(
            statistics.median(unspun) / statistics.median(ours), 2)
        benchmark.extra_info["parked_over_spinning_best"] = round(min(unspun) / min(ours), 2)
        # The same processor, its callers parking at once in result(): what their
        # spin (batchproc.futures.RESULT_SPIN) saves.
        benchmark.extra_info["us_batchproc_caller_parked_median"] = round(
            statistics.median(caller_parked) * us, 1)
        benchmark.extra_info["caller_parked_over_spinning_median"] = round(
            statistics.median(caller_parked) / statistics.median(ours), 2)
        benchmark.extra_info["caller_parked_over_spinning_best"] = round(
            min(caller_parked) / min(ours), 2)


def _interleaved(runs: list[Callable[[], None]], rounds: int = 10) -> list[list[float]]:
    """Each run's time in each of ``rounds`` rounds, the runs taking turns."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for k, run in enumerate(runs):
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    return times

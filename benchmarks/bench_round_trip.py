"""One client, one request at a time: what a round trip through batchproc costs.

    pytest benchmarks/bench_round_trip.py --benchmark-only

At low load nothing can be batched, so a batcher can only add latency. Measured in one
run, each as the time of 200 sequential enqueue -> result round trips (identity model,
one row of 64 float32):

- floor: a bare native RequestQueue and a RequestFuture between the caller and one
  consumer thread that completes each future; the two thread wake-ups and the GIL hand-offs
  any threaded batcher pays, with nothing else;
- batchproc with the default configuration (adaptive, 4 workers) and with one worker;
- the minimal pure-Python batcher (benchmarks/minimal_batcher.py), which waits its full
  5 ms delay for a batch that never fills.

extra_info gives microseconds per round trip and, for batchproc, its distance to the floor
measured in turn with it.
"""

from __future__ import annotations

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
from batchproc.futures import RequestFuture

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minimal_batcher import MinimalBatcher

ROUND_TRIPS = 200
ITEM = np.ones((1, 64), dtype=np.float32)


def _identity(batch: Any) -> Any:
    return batch


class _Floor:
    """Caller -> native queue -> one consumer thread -> future: nothing else."""

    def __init__(self) -> None:
        self.queue = RequestQueue(1024)
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


@pytest.fixture(params=["floor", "batchproc", "batchproc-1-worker", "minimal"])
def system(request: pytest.FixtureRequest) -> Iterator[tuple[str, Callable[[Any], Any]]]:
    kind = request.param
    if kind == "floor":
        floor = _Floor()
        yield kind, floor.submit
        floor.close()
    elif kind.startswith("batchproc"):
        workers = 1 if kind.endswith("1-worker") else 4
        config = BatchProcessorConfig(max_batch_size=64, batch_timeout=0.005,
                                      max_workers=workers)
        with BatchProcessor(config) as processor:
            processor.start(_identity)
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
        # Against the floor, measured in turn round after round (a shared machine's load
        # hits both alike): what batchproc's own per-batch work adds to a round trip.
        floor = _Floor()
        try:
            ours, bare = _interleaved_best([run, _loop(floor.submit)])
        finally:
            floor.close()
        benchmark.extra_info["us_floor"] = round(bare * 1e6 / ROUND_TRIPS, 1)
        benchmark.extra_info["us_batchproc"] = round(ours * 1e6 / ROUND_TRIPS, 1)
        benchmark.extra_info["us_added_by_batchproc"] = round((ours - bare) * 1e6 / ROUND_TRIPS, 1)


def _interleaved_best(runs: list[Callable[[], None]], rounds: int = 10) -> list[float]:
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for k, run in enumerate(runs):
            t0 = time.perf_counter()
            run()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best

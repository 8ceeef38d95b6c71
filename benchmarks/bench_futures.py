"""RequestFuture vs the standard concurrent.futures.Future: what one request's future costs.

    pytest benchmarks/bench_futures.py --benchmark-only

- lifecycle: create, mark running, set the result, read it (what every request pays).
- create with 50,000 futures alive, garbage collector on: a burst keeps that many
  outstanding, and every young/old collection walks the objects each future tracks
  (eleven for Future, two for RequestFuture). Both are measured in turn in one run and
  the ratio goes into extra_info.
- a batch of 64: start and complete the futures of one batch the way a worker does, with
  one compiled call each (start_all, finish_all) against a Python loop of the per-future
  methods.
"""

from __future__ import annotations

import gc
import math
import timeit
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from batchproc._native.future_state import Request
from batchproc.futures import RequestFuture, finish_all, start_all

LIVE = 50_000
CREATE = 10_000
BATCH = 64


def _lifecycle(cls: type[Future[Any]]) -> Callable[[], Any]:
    def step() -> Any:
        f = cls()
        f.set_running_or_notify_cancel()
        f.set_result(1)
        return f.result()

    return step


def _create_with_live(cls: type[Future[Any]]) -> Callable[[], Any]:
    live = [cls() for _ in range(LIVE)]

    def step() -> Any:
        made = [cls() for _ in range(CREATE)]
        return len(made) + len(live) * 0

    return step


def _interleaved(cases: list[tuple[Callable[[], Any], int]], rounds: int = 7) -> list[float]:
    """Best seconds per call of each case, measured in turn round after round."""
    best = [math.inf] * len(cases)
    for _ in range(rounds):
        for k, (fn, number) in enumerate(cases):
            best[k] = min(best[k], timeit.timeit(fn, number=number) / number)
    return best


@pytest.mark.benchmark(group="future-lifecycle")
@pytest.mark.parametrize("cls", [RequestFuture, Future], ids=["RequestFuture", "Future"])
def test_bench_future_lifecycle(benchmark: Any, cls: type[Future[Any]]) -> None:
    step = _lifecycle(cls)
    assert step() == 1
    benchmark(step)
    if cls is RequestFuture:
        ours, std = _interleaved(
            [(_lifecycle(RequestFuture), 20_000), (_lifecycle(Future), 20_000)])
        benchmark.extra_info["ns_RequestFuture"] = round(ours * 1e9)
        benchmark.extra_info["ns_Future"] = round(std * 1e9)
        benchmark.extra_info["speedup"] = round(std / ours, 1)


@pytest.mark.benchmark(group="future-create-50k-live")
@pytest.mark.parametrize("cls", [RequestFuture, Future], ids=["RequestFuture", "Future"])
def test_bench_future_create_with_many_live(benchmark: Any, cls: type[Future[Any]]) -> None:
    assert gc.isenabled()
    step = _create_with_live(cls)
    assert step() == CREATE
    benchmark.pedantic(step, rounds=5, iterations=1)
    benchmark.extra_info["us_per_future"] = round(benchmark.stats.stats.min * 1e6 / CREATE, 2)
    if cls is RequestFuture:
        ours, std = _interleaved([(step, 1), (_create_with_live(Future), 1)], rounds=5)
        benchmark.extra_info["speedup"] = round(std / ours, 1)


def _batch_round(batched: bool) -> Callable[[], Any]:
    """Start and complete the futures of one batch of requests (fresh futures each call)."""
    results = list(range(BATCH))

    def step() -> Any:
        requests = [Request(RequestFuture(), None, None, 1, 0, 0, 0.0) for _ in range(BATCH)]
        if batched:
            live = start_all(requests)
            finish_all(live, results)
        else:
            live = [r for r in requests if r.future.set_running_or_notify_cancel()]
            for request, result in zip(live, results):
                request.future.set_result(result)
        return live

    return step


@pytest.mark.benchmark(group="future-batch-of-64")
@pytest.mark.parametrize("batched", [True, False], ids=["start_all+finish_all", "per-future"])
def test_bench_future_batch(benchmark: Any, batched: bool) -> None:
    step = _batch_round(batched)
    assert [r.future.result(timeout=0) for r in step()] == list(range(BATCH))
    benchmark(step)
    if batched:
        ours, loop = _interleaved([(_batch_round(True), 2_000), (_batch_round(False), 2_000)])
        benchmark.extra_info["us_batch_calls"] = round(ours * 1e6, 2)
        benchmark.extra_info["us_per_future_methods"] = round(loop * 1e6, 2)
        benchmark.extra_info["speedup"] = round(loop / ours, 2)

"""Rolling percentile window: native RollingWindow vs numpy.percentile over a deque.

    pytest benchmarks/bench_native_window.py --benchmark-only

The baseline is what a pure-Python service does: keep a deque(maxlen=1000) and call
numpy.percentile on a copy of it. The p99-query speed-up is measured in the same run
and asserted (target 10x).
"""

from __future__ import annotations

import timeit
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from batchproc._native.rolling_window import RollingWindow

N = 1000
QUERY_TARGET = 10.0


def _samples() -> list[float]:
    return np.random.default_rng(0).lognormal(size=N).tolist()


def _full_window() -> RollingWindow:
    w = RollingWindow(N)
    w.extend(_samples())
    return w


def _full_deque() -> deque[float]:
    return deque(_samples(), maxlen=N)


def _speedup(native: Callable[[], Any], baseline: Callable[[], Any]) -> float:
    best_native = best_base = float("inf")
    for _ in range(5):
        best_native = min(best_native, min(timeit.repeat(native, number=2000, repeat=3)))
        # 200 baseline calls, scaled to the 2000 native calls
        best_base = min(best_base, min(timeit.repeat(baseline, number=200, repeat=3)) * 10)
    return best_base / best_native


@pytest.mark.benchmark(group="window-p99-query-1000")
def test_bench_window_p99_native(benchmark: Any) -> None:
    w = _full_window()
    d = _full_deque()
    result = benchmark(w.percentile, 99)
    assert result == pytest.approx(np.percentile(np.array(d), 99), rel=1e-12)
    ratio = _speedup(lambda: w.percentile(99), lambda: np.percentile(np.array(d), 99))
    benchmark.extra_info["speedup_vs_np_percentile"] = round(ratio, 1)
    assert ratio >= QUERY_TARGET, f"native p99 only {ratio:.1f}x numpy.percentile"


@pytest.mark.benchmark(group="window-p99-query-1000")
def test_bench_window_p99_numpy(benchmark: Any) -> None:
    d = _full_deque()
    benchmark(lambda: np.percentile(np.array(d), 99))


@pytest.mark.benchmark(group="window-add+p99-1000")
def test_bench_window_add_p99_native(benchmark: Any) -> None:
    w = _full_window()
    values = iter(np.random.default_rng(1).random(10_000_000).tolist())

    def step() -> float:
        w.add(next(values))
        return w.percentile(99)

    benchmark(step)


@pytest.mark.benchmark(group="window-add+p99-1000")
def test_bench_window_add_p99_numpy(benchmark: Any) -> None:
    d = _full_deque()
    values = iter(np.random.default_rng(1).random(10_000_000).tolist())

    def step() -> float:
        d.append(next(values))
        return float(np.percentile(np.array(d), 99))

    benchmark(step)


@pytest.mark.benchmark(group="window-add-1000")
def test_bench_window_add_native(benchmark: Any) -> None:
    w = _full_window()
    benchmark(w.add, 0.5)


@pytest.mark.benchmark(group="window-mean+p50+p95+p99-1000")
def test_bench_window_stats_native(benchmark: Any) -> None:
    w = _full_window()
    benchmark(lambda: (w.mean(), w.percentiles((50, 95, 99))))


@pytest.mark.benchmark(group="window-extend-64-1000")
def test_bench_window_extend_batch_native(benchmark: Any) -> None:
    """The engine's pattern: a batch's 64 latencies at a time, percentiles read rarely
    (``get_stats()``); each read indexes what came since the last."""
    w = _full_window()
    batch = _samples()[:64]
    benchmark(w.extend, batch)
    assert len(w) == N

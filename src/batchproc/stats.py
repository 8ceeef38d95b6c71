"""BatchStats: thread-safe rolling statistics over recent batches.

The windows are the native RollingWindow: recording a batch writes its samples to the
windows' rings in a few native calls, and ``get_stats()`` indexes the samples added since
it was last called (O(log n) each) before reading its percentiles; it never sorts.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from typing import Any

from ._native.rolling_window import RollingWindow

# The keys BatchStats.get_stats() always returns; BatchProcessor.get_stats() adds its own.
STAT_KEYS = (
    "avg_processing_time", "avg_batch_size", "avg_queue_time", "avg_latency",
    "p50_latency", "p95_latency", "p99_latency", "max_latency", "throughput", "error_rate",
    "total_processed", "total_errors", "total_batches", "avg_queue_length", "uptime",
)


def _finite_or_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value


class BatchStats:
    """Rolling statistics of recent batches; every method is thread-safe.

    ``window_size`` bounds how many recent batches (and recent per-request latencies)
    the averages and percentiles look at. Totals count from construction.
    Times are seconds; ``throughput`` is requests completed per second of wall time since
    the first batch was recorded; ``error_rate`` is failed / (completed + failed) requests.
    """

    def __init__(self, window_size: int) -> None:
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be a positive int, got {window_size!r}")
        self.window_size = window_size
        self._lock = threading.Lock()
        self._processing_times = RollingWindow(window_size)
        self._batch_sizes = RollingWindow(window_size)
        self._queue_times = RollingWindow(window_size)
        self._queue_lengths = RollingWindow(window_size)
        self._latencies = RollingWindow(window_size)
        self._total_processed = 0
        self._total_errors = 0
        self._total_batches = 0
        self._created = time.monotonic()
        self._first_batch_at: float | None = None
        self._cache: dict[str, Any] | None = None

    def update(
        self,
        processing_time: float,
        batch_size: int,
        queue_time: float,
        latency: float = 0.0,
        queue_length: int = 0,
        *,
        requests: int | None = None,
        latencies: Iterable[float] | None = None,
    ) -> None:
        """Record one completed batch.

        ``batch_size`` counts rows; ``requests`` (default: ``batch_size``) counts the
        requests it completed. ``latencies`` gives each request's end-to-end latency;
        without it, ``latency`` (if > 0) is recorded once for the batch.
        """
        now = time.monotonic()
        with self._lock:
            if self._first_batch_at is None:
                # Throughput is measured from the start of the first batch, not from its end.
                self._first_batch_at = now - max(0.0, processing_time)
            self._processing_times.add(processing_time)
            self._batch_sizes.add(batch_size)
            self._queue_times.add(queue_time)
            self._queue_lengths.add(queue_length)
            if latencies is not None:
                self._latencies.extend(latencies)
            elif latency > 0.0:
                self._latencies.add(latency)
            self._total_processed += batch_size if requests is None else requests
            self._total_batches += 1
            self._cache = None

    def record_error(self, count: int = 1) -> None:
        """Record ``count`` failed requests."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count!r}")
        with self._lock:
            self._total_errors += count
            self._cache = None

    @property
    def total_processed(self) -> int:
        return self._total_processed

    @property
    def total_errors(self) -> int:
        return self._total_errors

    def get_stats(self) -> dict[str, Any]:
        """A fresh dict of the keys in ``STAT_KEYS`` (cached until the next update)."""
        with self._lock:
            if self._cache is not None and self._total_batches:
                stats = dict(self._cache)
            else:
                stats = self._compute()
                self._cache = dict(stats)
            now = time.monotonic()
            stats["uptime"] = now - self._created
            # Throughput keeps falling while idle, so it is computed at every call.
            if self._first_batch_at is not None:
                stats["throughput"] = self._total_processed / max(now - self._first_batch_at,
                                                                   1e-9)
            return stats

    def _compute(self) -> dict[str, Any]:
        p50, p95, p99 = (_finite_or_zero(v) for v in self._latencies.percentiles([50, 95, 99]))
        finished = self._total_processed + self._total_errors
        return {
            "avg_processing_time": _finite_or_zero(self._processing_times.mean()),
            "avg_batch_size": _finite_or_zero(self._batch_sizes.mean()),
            "avg_queue_time": _finite_or_zero(self._queue_times.mean()),
            "avg_latency": _finite_or_zero(self._latencies.mean()),
            "p50_latency": p50,
            "p95_latency": p95,
            "p99_latency": p99,
            "max_latency": _finite_or_zero(self._latencies.max()),
            "throughput": 0.0,
            "error_rate": self._total_errors / finished if finished else 0.0,
            "total_processed": self._total_processed,
            "total_errors": self._total_errors,
            "total_batches": self._total_batches,
            "avg_queue_length": _finite_or_zero(self._queue_lengths.mean()),
            "uptime": 0.0,
        }

"""The metrics-collector protocol, and the wrapper that makes calling it safe.

A metrics collector is any object with some of these methods; missing ones are skipped:

``record_batch(size, rows, queue_time, processing_time, outcome)``
    Once per ``process_func`` call that ends a batch: ``size`` requests, ``rows`` rows,
    mean queue time and processing time in seconds, ``outcome`` one of ``"ok"``,
    ``"error"``, ``"timeout"``.
``record_error(error, count)``
    Once per failure that reaches callers: the exception and how many requests got it.
``record_health(report)``
    After each periodic health check, with the dict ``BatchProcessor.health()`` returns.
``record_requests(latencies, queue_times, outcome)``
    Once per group of requests that reached an outcome together (a delivered batch, a
    failed part of one, the requests a ``stop()`` failed): each request's latency (enqueue
    to result) and queue time (enqueue to dispatch) in seconds, as two lists of the same
    length, and the ``outcome`` of all of them: ``"ok"`` (a result), ``"error"`` (a
    failure: the model's exception, a bad output, ``stop()``), ``"timeout"`` (their call
    ran past ``item_timeout``: ``BatchTimeoutError``) or ``"expired"`` (their
    ``max_queue_time`` ran out before their call: ``QueueTimeoutError``).
    Only collectors that have this method cost the workers the lists.
``record_rejected(count)``
    Requests refused at enqueue because the queue was full or the processor stopped,
    from every path (``enqueue_predict``, ``enqueue``, ``enqueue_predict_async``,
    ``apredict``).
``record_cancelled(count)``
    Requests cancelled by their callers before they were dispatched.
``record_batch_only_failure(size)``
    Once per batch of ``size`` requests that failed as a whole while each of its requests
    then succeeded on a smaller batch (``get_stats()["total_batch_only_failures"]``):
    ``process_func`` fails on batches, not on these inputs (out of memory at that size,
    an output that cannot be split), or its failure did not recur (a model that fails
    at random). Its callers got their results.
``bind_processor(processor)``
    Once, when the collector is given to a ``BatchProcessor``: for collectors that read
    its state when they are read themselves (queue depth, batches in flight).

Calls happen on the processor's own threads. An exception raised inside a collector is
logged (once per method, then at debug level) and never breaks processing.
"""

from __future__ import annotations

import inspect
import logging
import threading
import types
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

OUTCOME_OK, OUTCOME_ERROR, OUTCOME_TIMEOUT = "ok", "error", "timeout"
OUTCOME_EXPIRED = "expired"  # max_queue_time, never dispatched (OUTCOME_TIMEOUT: item_timeout)


@runtime_checkable
class MetricsCollector(Protocol):
    """The full protocol; a collector may implement any subset of it, one method at least
    (or ``bind_processor(processor)`` alone, to read the processor itself)."""

    def record_batch(self, size: int, rows: int, queue_time: float, processing_time: float,
                     outcome: str) -> None: ...

    def record_error(self, error: BaseException, count: int) -> None: ...

    def record_health(self, report: dict[str, Any]) -> None: ...

    def record_requests(self, latencies: list[float], queue_times: list[float],
                        outcome: str) -> None: ...

    def record_rejected(self, count: int) -> None: ...

    def record_cancelled(self, count: int) -> None: ...

    def record_batch_only_failure(self, size: int) -> None: ...


_RECORD_METHODS = ("record_batch", "record_error", "record_health", "record_requests",
                   "record_rejected", "record_cancelled", "record_batch_only_failure")


def collector_methods(collector: object) -> dict[str, Any]:
    """The ``MetricsCollector`` methods ``collector`` has, by name. ``TypeError`` for a
    class whose methods need an instance (one was meant: read off the class, they would
    fail on every call; a class of static or class methods is a collector) and for an
    object with none of them and no ``bind_processor`` (a string): it would be called
    for nothing."""
    if isinstance(collector, type) and any(
            isinstance(inspect.getattr_static(collector, name, None), types.FunctionType)
            for name in (*_RECORD_METHODS, "bind_processor")):
        raise TypeError(
            f"metrics_collector must be an instance, got the class "
            f"{collector.__qualname__}: make one ({collector.__qualname__}(...))")
    found = {name: method for name in _RECORD_METHODS
             if callable(method := getattr(collector, name, None))}
    if not found and not callable(getattr(collector, "bind_processor", None)):
        raise TypeError(
            f"metrics_collector must have one or more of {', '.join(_RECORD_METHODS)} "
            f"(the MetricsCollector protocol), got {collector!r}; for Prometheus: "
            "batchproc.observe.prometheus.PrometheusMetrics(name)")
    return found


class MetricsSink:
    """Calls its collectors' methods if they have them, swallowing and logging failures.

    One collector comes from ``BatchProcessor(metrics_collector=...)``; ``add`` attaches
    more later (an exporter attached to a running processor).
    """

    def __init__(self, collector: object | None, owner: object = None) -> None:
        self._methods: dict[str, tuple[Any, ...]] = {}
        self._warned: set[str] = set()
        self._adding = threading.Lock()
        # Read on every batch: without a collector that takes batches (or requests), the
        # dispatcher makes no call and builds no list for it.
        self.records_batches = False
        self.records_requests = False
        self._owner = owner
        if collector is not None:
            self.add(collector)

    def add(self, collector: object) -> None:
        """Attach a collector (also while the processor runs); its methods are called from
        the next event on. ``TypeError`` for an object with none of them and no
        ``bind_processor`` (a string, a class where an instance was meant): it would be
        called for nothing."""
        found = collector_methods(collector)
        bind = getattr(collector, "bind_processor", None)
        if callable(bind) and self._owner is not None:
            try:
                bind(self._owner)
            except Exception:
                # As for every other method: a collector never breaks the processor.
                logger.exception("metrics_collector.bind_processor raised; its other "
                                 "methods are still called")
        if not found:
            return  # it reads the processor itself (bound above)
        with self._adding:
            methods = dict(self._methods)
            for name, method in found.items():
                methods[name] = (*methods.get(name, ()), method)
            self._methods = methods  # one assignment: readers see the old or the new map
        self.records_batches = "record_batch" in methods
        self.records_requests = "record_requests" in methods

    def _call(self, name: str, *args: Any) -> None:
        for method in self._methods.get(name, ()):
            try:
                method(*args)
            except Exception:
                if name in self._warned:
                    logger.debug("metrics_collector.%s raised again", name, exc_info=True)
                else:
                    self._warned.add(name)
                    logger.exception("metrics_collector.%s raised; processing continues",
                                     name)

    def batch(self, size: int, rows: int, queue_time: float, processing_time: float,
              outcome: str) -> None:
        self._call("record_batch", size, rows, queue_time, processing_time, outcome)

    def error(self, error: BaseException, count: int) -> None:
        self._call("record_error", error, count)

    def health(self, report: dict[str, Any]) -> None:
        self._call("record_health", report)

    def requests(self, latencies: list[float], queue_times: list[float], outcome: str) -> None:
        self._call("record_requests", latencies, queue_times, outcome)

    def rejected(self, count: int) -> None:
        self._call("record_rejected", count)

    def cancelled(self, count: int) -> None:
        self._call("record_cancelled", count)

    def batch_only_failure(self, size: int) -> None:
        self._call("record_batch_only_failure", size)

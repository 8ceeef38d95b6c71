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

Calls happen on the processor's own threads. An exception raised inside a collector is
logged (once per method, then at debug level) and never breaks processing.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

OUTCOME_OK, OUTCOME_ERROR, OUTCOME_TIMEOUT = "ok", "error", "timeout"


@runtime_checkable
class MetricsCollector(Protocol):
    """The full protocol; a collector may implement any subset of it."""

    def record_batch(self, size: int, rows: int, queue_time: float, processing_time: float,
                     outcome: str) -> None: ...

    def record_error(self, error: BaseException, count: int) -> None: ...

    def record_health(self, report: dict[str, Any]) -> None: ...


class MetricsSink:
    """Calls a collector's methods if it has them, swallowing and logging its failures."""

    _METHODS = ("record_batch", "record_error", "record_health")

    def __init__(self, collector: object | None) -> None:
        self._methods: dict[str, Any] = {}
        self._warned: set[str] = set()
        # Read on every batch: without a collector that takes batches, the dispatcher
        # does not make the call at all.
        self.records_batches = False
        if collector is None:
            return
        for name in self._METHODS:
            method = getattr(collector, name, None)
            if callable(method):
                self._methods[name] = method
        self.records_batches = "record_batch" in self._methods
        if not self._methods:
            logger.warning("metrics_collector %r has none of %s; it will not be called",
                           collector, ", ".join(self._METHODS))

    def _call(self, name: str, *args: Any) -> None:
        method = self._methods.get(name)
        if method is None:
            return
        try:
            method(*args)
        except Exception:
            if name in self._warned:
                logger.debug("metrics_collector.%s raised again", name, exc_info=True)
            else:
                self._warned.add(name)
                logger.exception("metrics_collector.%s raised; processing continues", name)

    def batch(self, size: int, rows: int, queue_time: float, processing_time: float,
              outcome: str) -> None:
        self._call("record_batch", size, rows, queue_time, processing_time, outcome)

    def error(self, error: BaseException, count: int) -> None:
        self._call("record_error", error, count)

    def health(self, report: dict[str, Any]) -> None:
        self._call("record_health", report)

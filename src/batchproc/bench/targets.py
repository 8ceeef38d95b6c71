"""The systems a load runs against, behind one small interface.

A *target* is started with a model, then takes requests from many threads:

- ``submit(item, priority) -> Future`` (a ``concurrent.futures.Future``) — thread-safe;
- ``call(item, priority)`` — submit and wait, used by closed-loop clients;
- ``stop()``.

An *async target* (``is_async = True``, e.g. Ray Serve's ``serve.batch``) instead offers
``async acall(item, priority)``; the load generators drive it from one asyncio loop.
``priority`` is an int, 0 (most urgent) to 4, as :class:`batchproc.BatchPriority`.

Peer adapters live in ``benchmarks/peers/`` and follow the same interface.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any, Protocol

import numpy as np

from ..metrics import OUTCOME_ERROR
from .minimal import MinimalBatcher
from .models import Model

# How long stopping a processor after its run may take, in seconds: time for its threads
# to exit, not for a backlog to be served.
STOP_TIMEOUT_S = 0.5


class Target(Protocol):
    name: str
    is_async: bool

    def start(self, model: Model) -> None: ...
    def stop(self) -> None: ...


class SyncTarget:
    """Base for thread-driven targets: ``call`` is ``submit(...).result()``."""

    name = "?"
    is_async = False

    def start(self, model: Model) -> None:
        raise NotImplementedError

    def submit(self, item: np.ndarray, priority: int) -> Future[Any]:
        raise NotImplementedError

    def call(self, item: np.ndarray, priority: int) -> Any:
        return self.submit(item, priority).result()

    def stop(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        """Extra figures the system reports about itself (JSON only)."""
        return {}


class NoBatching(SyncTarget):
    """The model called on each request alone, in the caller's thread.

    Closed-loop clients each call the model themselves (serialized only as far as the
    model demands: ``fixed`` holds its lock, ``mlp`` runs where numpy lets it); burst and
    open-loop generators run it inline, so a model slower than the arrival rate shows
    as queueing delay, measured from each request's scheduled arrival.
    """

    name = "no batching"
    _loop_model: Any = None  # an async model's batchproc.async_model.AsyncModel

    def start(self, model: Model) -> None:
        from batchproc.async_model import AsyncModel, is_async_callable

        self._loop_model = None
        if is_async_callable(model):
            # Awaited on an event loop of its own, as a processor awaits it on its own:
            # each call blocks its caller until the coroutine ends.
            self._loop_model = AsyncModel(model)
            self._loop_model.start()
            model = self._loop_model
        self._model = model

    def call(self, item: np.ndarray, priority: int) -> Any:
        return self._model(item)

    def submit(self, item: np.ndarray, priority: int) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(self._model(item))
        except BaseException as exc:  # SystemExit too: the model's, failing this request
            fut.set_exception(exc)
        return fut

    def stop(self) -> None:
        if self._loop_model is not None:
            self._loop_model.close(time.monotonic() + STOP_TIMEOUT_S)


class Minimal(SyncTarget):
    """:class:`MinimalBatcher` (priorities are ignored: it is FIFO)."""

    name = "minimal batcher"

    def __init__(self, max_batch: int = 64, max_delay: float = 0.005):
        self.max_batch = max_batch
        self.max_delay = max_delay

    def start(self, model: Model) -> None:
        self._b = MinimalBatcher(model, self.max_batch, self.max_delay).start()
        self._submit = self._b.submit

    def submit(self, item: np.ndarray, priority: int) -> Future[Any]:
        return self._submit(item)

    def call(self, item: np.ndarray, priority: int) -> Any:
        return self._submit(item).result()

    def stop(self) -> None:
        self._b.stop()


class _DropStopSummary(logging.Filter):
    """Drops the processor's "batchproc stopped: N requests failed" warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("batchproc stopped")


@contextlib.contextmanager
def _without_stop_summary() -> Iterator[None]:
    """A run's end gives up on what is still queued on purpose, and reports it itself
    (as unfinished): the processor's own warning would repeat it, with another count."""
    log = logging.getLogger("batchproc.processor")
    drop = _DropStopSummary()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class _FailedCalls:
    """A metrics collector counting the batches whose attempt failed: the model raised,
    its output was refused (``BatchOutputError``), or the batch could not be built.
    batchproc retries and searches such batches, so their requests may all complete: a
    broken model would otherwise look healthy in a run."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def record_batch(self, size: int, rows: int, queue_time: float, processing_time: float,
                     outcome: str) -> None:
        if outcome == OUTCOME_ERROR:
            with self._lock:
                self.count += 1


class Batchproc(SyncTarget):
    """``batchproc.BatchProcessor`` configured from the bench flags.

    ``fields`` (``BatchProcessorConfig`` keyword arguments) override the flags; ``name``
    names the system in tables and plots.
    """

    name = "batchproc"

    def __init__(
        self,
        max_batch: int = 64,
        max_delay: float = 0.005,
        workers: int | None = None,
        strategy: str = "adaptive",
        priorities: bool = False,
        queue_size: int = 1000,
        fields: dict[str, Any] | None = None,
        name: str | None = None,
    ):
        if name is not None:
            self.name = name
        self.settings: dict[str, Any] = {
            "max_batch_size": max_batch,
            "initial_batch_size": max_batch,
            "batch_timeout": max_delay,
            "enable_priority_queue": priorities,
            "max_queue_size": queue_size,
            # A burst fills the queue on purpose: do not log it as a health problem.
            "queue_warning_threshold": queue_size,
            "queue_critical_threshold": queue_size,
        }
        if workers is not None:
            self.settings["max_workers"] = workers
        self.settings["processing_strategy"] = strategy
        self.settings.update(fields or {})
        for level in ("queue_warning_threshold", "queue_critical_threshold"):
            if level not in (fields or {}):  # follows a max_queue_size the user gave
                self.settings[level] = self.settings["max_queue_size"]
        self._stats: dict[str, Any] = {}

    def config(self) -> Any:
        from batchproc import BatchProcessorConfig

        return BatchProcessorConfig(**self.settings)

    def start(self, model: Model) -> None:
        from batchproc import BatchPriority, BatchProcessor

        self._levels = [BatchPriority(p) for p in range(5)]
        self._failed = _FailedCalls()
        self._p: BatchProcessor[Any, Any] = BatchProcessor(self.config(), self._failed)
        self._p.start(model)
        self._enqueue = self._p.enqueue_predict

    def submit(self, item: np.ndarray, priority: int) -> Future[Any]:
        return self._enqueue(item, priority=self._levels[priority])

    def call(self, item: np.ndarray, priority: int) -> Any:
        return self._enqueue(item, priority=self._levels[priority]).result()

    def stop(self) -> None:
        """Give up on what is still queued: the run has ended (what it left unfinished
        is counted as such), and serving it would take the machine from the next run."""
        try:
            self._stats = dict(self._p.get_stats())
        finally:
            with _without_stop_summary():
                self._p.stop(timeout=STOP_TIMEOUT_S)

    def stats(self) -> dict[str, Any]:
        return {k: v for k, v in self._stats.items() if isinstance(v, (int, float, bool, str))}

    def failed_calls(self) -> int:
        """Attempts at a batch that failed in the run (see ``_FailedCalls``); 0 before
        ``start``."""
        failed = getattr(self, "_failed", None)
        return 0 if failed is None else failed.count


class BatchprocAsync(Batchproc):
    """The same processor driven from one asyncio loop through
    ``enqueue_predict_async``: the client shape of Ray Serve's ``serve.batch``."""

    name = "batchproc asyncio"
    is_async = True

    async def acall(self, item: np.ndarray, priority: int) -> Any:
        return await self._p.enqueue_predict_async(item, self._levels[priority])

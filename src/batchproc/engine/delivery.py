"""Completing futures: results, failures and expired deadlines, counted first.

Per-batch work: the per-request loops (``finish_all``, ``start_all``) are native. A
batch's outcome is counted in the statistics before any of its futures completes, so a
caller holding its result sees it counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from typing import Any

from .._native.future_state import Request, enqueued_of, start_all
from ..config import BatchProcessorConfig
from ..controller import Controller
from ..errors import BatchOutputError, QueueTimeoutError, for_callers
from ..formats.chunks import handed_back, queued_again
from ..futures import RequestFuture, fail, finish_all, invoke_callbacks
from ..log_limits import plural, seconds
from ..metrics import (
    OUTCOME_ERROR,
    OUTCOME_EXPIRED,
    OUTCOME_OK,
    OUTCOME_TIMEOUT,
    MetricsSink,
)
from ..stats import BatchStats
from .batch import Batch, Board

logger = logging.getLogger(__name__)

_monotonic = time.monotonic


class Delivery:
    def __init__(self, config: BatchProcessorConfig, board: Board, queue: Any,
                 controller: Controller, stats: BatchStats, metrics: MetricsSink,
                 count_cancelled: Callable[[int], None]) -> None:
        self._config = config
        self._board = board
        self._queue = queue
        self._controller = controller
        self._stats = stats
        self._metrics = metrics
        self._count_cancelled = count_cancelled
        self._expired_lock = threading.Lock()
        self.expired = 0  # max_queue_time ran out (QueueTimeoutError)
        self.timed_out = 0  # their call ran past item_timeout (BatchTimeoutError)
        self.handed_back = 0  # map chunks that failed and came back as their items

    def deliver(self, batch: Batch, requests: list[Request], parts: list[Any],
                elapsed: float, rows: int, target: int) -> bool:
        """Complete ``requests`` with their ``parts`` of a call's output; False when the
        batch was abandoned (``stop`` gave up on it) after the call returned: its callers
        were failed by the stop, nothing is delivered."""
        board = self._board
        # What this batch left waiting, read before another worker may pop it: the
        # controller sizes the calls in flight on it.
        left_waiting = self._queue.rows
        # A whole batch keeps its call slot through its delivery unless another worker
        # handed it now could start a call meanwhile; a part of a batch (a failure
        # search) frees the model for other calls at once.
        keep_slot = (len(requests) == len(batch.requests)
                     and not self._next_call_can_start(left_waiting, target, elapsed))
        ok, holds_slot, ends_flight = board.begin_delivery(batch, requests, keep_slot)
        if not ok:
            return False
        deferred: list[RequestFuture] | None = None if batch.deferred is None else []
        self._answer(holds_slot, ends_flight)
        try:
            now = _monotonic()
            enqueued = enqueued_of(requests)
            queue_time = batch.dispatched_at - sum(enqueued) / len(enqueued)
            latencies = ([now - t for t in enqueued] if self._config.enable_monitoring
                         else None)
            # Counted before any future completes: a caller holding its result sees it.
            self._count_call(requests, rows, elapsed, queue_time, target, left_waiting,
                             latencies)
            metrics = self._metrics
            if metrics.records_requests:
                dispatched = batch.dispatched_at
                metrics.requests(latencies or [now - t for t in enqueued],
                                 [dispatched - t for t in enqueued], OUTCOME_OK)
            if self._config.debug_mode:
                logger.debug("delivered %s (%s) in %.3f ms after %.3f ms queued",
                             plural(len(requests), "request"), plural(rows, "row"),
                             elapsed * 1e3, queue_time * 1e3)
            # With a full batch queued the model waits for this worker's next call: it
            # wakes the callers keeping the GIL, or it would take the GIL back only
            # after each of them had run.
            full = left_waiting >= target
            if finish_all(requests, parts, deferred, full):  # pragma: no cover - a batchproc bug
                logger.error("a future was completed twice; result dropped")
        finally:
            self._end_delivery(batch, deferred)
        return True

    def call_returned(self, batch: Batch, chunk: Request, rows: int,
                      elapsed: float) -> None:
        """A call of ``chunk``, a piece of a request cut into chunks, returned and the
        request is not delivered with it (more chunks follow): counted as the model call
        it was, the request not yet (``deliver`` counts it, with its last chunk's call)."""
        self._count_call([chunk], rows, elapsed, batch.dispatched_at - chunk.enqueued_at,
                         self._config.max_batch_size, self._queue.rows, completed=False)

    def _count_call(self, requests: list[Request], rows: int, elapsed: float,
                    queue_time: float, target: int, left_waiting: int,
                    latencies: list[float] | None = None, completed: bool = True) -> None:
        """A model call of ``requests`` (``rows`` in ``elapsed`` seconds) that returned:
        a batch in the statistics (its requests, and their ``latencies``, only if it
        ``completed`` them), the controller's fit and the metrics' batch figures."""
        self._stats.update(elapsed, rows, queue_time, queue_length=len(self._queue),
                           requests=len(requests) if completed else 0, latencies=latencies)
        self._controller.observe_batch(rows, elapsed, target, left_waiting)
        if self._metrics.records_batches:
            self._metrics.batch(len(requests), rows, queue_time, elapsed, OUTCOME_OK)

    def _answer(self, holds_slot: bool, ends_flight: bool) -> None:
        """A delivery begins (``Board.begin_delivery``): tell the queue that what arrives
        from now on is the wave of the callers it answers; end the batch's flight first
        when its calls are over, and only then free its call slot, so that a worker woken
        by it pops under the same rule as this one will after the delivery."""
        controller = self._controller
        controller.batch_answered()
        if ends_flight:
            controller.batch_ended()
        if holds_slot:
            controller.slots.release(wake=self.others_needed())

    def _end_delivery(self, batch: Batch, deferred: list[RequestFuture] | None) -> None:
        left = self._board.end_delivery(batch, deferred)
        if left:
            invoke_callbacks(left)

    def run_deferred(self, batch: Batch) -> None:
        """Run the done-callbacks its failure search deferred (``Batch.deferred``): by
        its worker once its calls are over, or by stop giving up on it (a call of it
        abandoned past ``item_timeout`` hands them to the callbacks thread instead).
        Timed as a delivery is (``Batch.callbacks_started``): one that blocks is a stuck
        batch."""
        callbacks = self._board.take_deferred(batch)
        if not callbacks:
            return
        batch.callbacks_started = _monotonic()
        try:
            invoke_callbacks(callbacks)
        finally:
            batch.callbacks_started = 0.0

    def _next_call_can_start(self, left_waiting: int, target: int, elapsed: float) -> bool:
        """Whether a worker handed this batch's call slot now could start a call during
        its delivery: a full batch waits, or a request past ``batch_timeout`` (either
        goes at once, or waits only for the wave this delivery brings back); or, where
        pops do not keep filling while a batch is in flight (not ADAPTIVE), requests
        were still arriving in the second half of the call just ended (an open load:
        no wave of this batch's clients is coming back for the next pop to wait for).
        Otherwise the woken worker's pop would mostly wait for the clients this delivery
        answers (the wave rule), and this worker, back from it, for a slot: two thread
        wake-ups a batch, for nothing.

        Never while the model's calls take turns (``Controller.calls_serialize``: the
        GIL): a call started during this delivery would contend with it for the GIL, and
        every batch would move to another thread, a wake-up each."""
        if self._controller.calls_serialize:
            return False
        if left_waiting >= target:
            return True
        if left_waiting <= 0:
            return False
        queue = self._queue
        if queue.oldest_age() >= self._config.batch_timeout:
            return True
        return (not self._controller.fills_while_in_flight
                and queue.newest_age() < elapsed / 2)

    def fail(self, batch: Batch, requests: list[Request], error: BaseException) -> None:
        """Fail ``requests`` of a batch this worker still owns."""
        ok, holds_slot, ends_flight = self._board.begin_delivery(
            batch, requests, keep_slot=len(requests) == len(batch.requests))
        if not ok:
            return
        deferred: list[RequestFuture] | None = None if batch.deferred is None else []
        self._answer(holds_slot, ends_flight)
        try:
            self.fail_pending(requests, error, dispatched_at=batch.dispatched_at,
                              deferred=deferred)
        finally:
            self._end_delivery(batch, deferred)

    def fail_pending(self, requests: list[Request], error: BaseException,
                     outcome: str = OUTCOME_ERROR, dispatched_at: float | None = None,
                     deferred: list[RequestFuture] | None = None) -> int:
        """Fail the requests not yet done; ``dispatched_at``: when their batch was popped
        (for the metrics' queue times; ``None``: never dispatched); ``deferred``: where
        their done-callbacks wait (``futures.fail``), else they run once every one of
        them has its error (as ``finish_all`` runs a delivery's: a callback that blocks
        holds up the callbacks after it, not the other requests' outcomes)."""
        pending = [r for r in requests if not r.future.done()]
        if not pending:
            return 0
        counted = self._counted(pending, error, outcome)
        if counted:
            self._stats.record_error(len(counted))
            self._metrics.error(error, len(counted))
            if self._metrics.records_requests:
                record_requests(self._metrics, counted, outcome, dispatched_at)
        error = for_callers(error)
        callbacks: list[RequestFuture] = [] if deferred is None else deferred
        for request in pending:
            try:
                fail(request.future, error, callbacks)
            except InvalidStateError:  # pragma: no cover - would be a batchproc bug
                logger.error("a future was completed twice; error dropped")
        if deferred is None:
            invoke_callbacks(callbacks)
        return len(pending)

    def time_out(self, requests: list[Request], error: BaseException,
                 dispatched_at: float, deferred: list[RequestFuture] | None = None) -> int:
        """Fail the requests of a call abandoned past ``item_timeout``, counted in
        ``timed_out`` (as in the statistics' errors) before any future completes;
        ``deferred`` as for ``fail_pending``."""
        return self.fail_pending(requests, error, OUTCOME_TIMEOUT, dispatched_at, deferred)

    def _counted(self, pending: list[Request], error: BaseException,
                 outcome: str) -> list[Request]:
        """The failed requests that count as failures: not a map chunk whose items are
        queued again one by one, here, before its future fails (``queued_again``), whose
        items then count each (once, as the requests they become: ``handed_back`` takes
        it out of the accepted too). Time-outs are also counted in ``timed_out`` here."""
        counted = [r for r in pending
                   if not (handed_back(r, error) and queued_again(r, error))]
        timed_out = len(counted) if outcome is OUTCOME_TIMEOUT else 0
        if timed_out or len(counted) != len(pending):
            with self._expired_lock:
                self.handed_back += len(pending) - len(counted)
                self.timed_out += timed_out
        return counted

    def expire(self, requests: list[Request],
               deferred: list[RequestFuture] | None = None) -> int:
        """Fail requests whose ``max_queue_time`` ran out while they were queued (or
        parked for a retry) with ``QueueTimeoutError``; they do not reach the model
        again. ``deferred`` as for ``fail_pending``."""
        live = start_all(requests)
        if len(live) != len(requests):
            self._count_cancelled(len(requests) - len(live))
        if not live:
            return 0
        now = _monotonic()
        with self._expired_lock:
            self.expired += len(live)
        if self._metrics.records_requests:
            record_requests(self._metrics, live, OUTCOME_EXPIRED, None)
        # Run once every one has its error.
        callbacks: list[RequestFuture] = [] if deferred is None else deferred
        for request in live:
            error = expiry_error(request, now)
            self._metrics.error(error, 1)
            try:
                fail(request.future, error, callbacks)
            except InvalidStateError:  # pragma: no cover - would be a batchproc bug
                logger.error("a future was completed twice; error dropped")
        if deferred is None:
            invoke_callbacks(callbacks)
        return len(live)

    def others_needed(self) -> bool:
        """Should a slot this worker gives back before delivering wake another worker?
        Only for requests already waiting."""
        queue = self._queue
        return len(queue) > 0 or queue.closed


def expiry_error(request: Request, now: float) -> QueueTimeoutError:
    """The error of a request whose ``max_queue_time`` ran out at ``now``: a request
    never processed says so; one queued again after a call that ended without its result
    (abandoned past ``item_timeout``) says so, that end its ``__cause__``; one parked for a
    retry says how often it failed, and its first failure (the one it is retried after)
    is the ``__cause__``."""
    waited = now - request.enqueued_at
    ran_out = (f"request waited {seconds(waited)}, past its max_queue_time of "
               f"{seconds(request.max_queue_time)}")
    if request.error is None:
        return QueueTimeoutError(f"{ran_out} in the queue; it was never processed")
    tries = request.attempt
    if not tries:
        error = QueueTimeoutError(
            f"{ran_out} in the queue to run again alone: it was in a call that ended "
            f"without its result ({type(request.error).__name__}: {request.error}, the "
            "__cause__)")
        error.__cause__ = request.error
        return error
    error = QueueTimeoutError(
        f"{ran_out} while parked to be retried: it was processed and failed "
        f"{tries} time{'s' if tries != 1 else ''} on its own; its first failure: "
        f"{type(request.error).__name__}: {request.error} (the __cause__)")
    error.__cause__ = request.error
    return error


def record_requests(metrics: MetricsSink, requests: list[Request], outcome: str,
                    dispatched_at: float | None) -> None:
    """Report requests that ended together; ``dispatched_at`` None: never dispatched (their
    whole wait was queue time)."""
    now = _monotonic()
    enqueued = enqueued_of(requests)
    latencies = [now - t for t in enqueued]
    queue_times = (latencies if dispatched_at is None
                   else [max(0.0, dispatched_at - t) for t in enqueued])
    metrics.requests(latencies, queue_times, outcome)


def final_error(request: Request, error: BaseException,
                origin: BaseException | None = None) -> BaseException:
    """The error a request that failed for good gets: what ``process_func`` raised, as
    it raised it; for an output that could not be split, the message also names the batch
    where the request first failed, as the model saw it (its rows and the output's
    length), when the last failure was on a smaller batch. ``origin``: the failure of
    the batch it was popped in."""
    first = request.error if request.error is not None else origin
    if (isinstance(error, BatchOutputError) and isinstance(first, BatchOutputError)
            and str(first) != str(error)):
        combined = BatchOutputError(f"{first}; then on this request alone: {error}")
        combined.__cause__ = error
        return combined
    return error

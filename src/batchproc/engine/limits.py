"""Time limits: a ``process_func`` call running past ``item_timeout`` is abandoned.

The supervisor calls ``expire_stuck`` at a fine tick. The worker is left to finish alone
(its late result is discarded: ``Board.end_call`` refuses it) and a fresh worker takes
its place. Which request of a call made it hang is unknown, and a search by calls (as
for an exception) would leave one more thread stuck, and one ``item_timeout`` more of
waiting, per step: so a call of several requests fails none of them. Each of them, and
each request of its batch not in the call (a failure search runs parts of a batch) and
not done yet, is queued again at once, alone. Only a call of one request fails it with
``BatchTimeoutError``: a request times out only when it ran past the limit on its own,
and each request that does leaves at most one more thread stuck. A time-out is never
retried (each try would leave another thread stuck). As for a failure
(engine/execution.py), the target size halves only for a hang that no request explains:
once every request of the call has ended, none of them timed out alone and none ran out
of its deadline meanwhile (``_HungCall``).
"""

from __future__ import annotations

import logging
import queue as _stdlib_queue
import time
from typing import Any

from .._native.future_state import Request, total_rows
from ..config import BatchProcessorConfig
from ..controller import Controller
from ..errors import BatchTimeoutError
from ..futures import RequestFuture
from ..log_limits import LogLimiter, plural, seconds
from ..metrics import OUTCOME_TIMEOUT, MetricsSink
from .batch import ABANDONED, CALLING, Board
from .callbacks import NAME as CALLBACKS_THREAD
from .callbacks import CallbackThread
from .delivery import Delivery
from .workers import WorkerPool

logger = logging.getLogger(__name__)

_monotonic = time.monotonic
# Calls abandoned past item_timeout are logged at once, then at most once per this many
# seconds (with how many there were meanwhile).
OVERDUE_LOG_S = 10.0


def _what_became_of(calls: int, failed: bool) -> str:
    """What became of the requests of ``calls`` abandoned calls, each of one request
    (``failed``) or of several."""
    if failed:
        return ("it failed its request with BatchTimeoutError" if calls == 1 else
                "each failed its request with BatchTimeoutError")
    return ("its requests were queued again alone" if calls == 1 else
            "the requests of each were queued again alone")


class TimeLimits:
    def __init__(self, config: BatchProcessorConfig, board: Board, queue: Any,
                 pool: WorkerPool, controller: Controller, delivery: Delivery,
                 metrics: MetricsSink, callbacks: CallbackThread) -> None:
        self._limit = config.item_timeout
        self._board = board
        self._queue = queue
        self._pool = pool
        self._controller = controller
        self._delivery = delivery
        self._metrics = metrics
        self._callbacks = callbacks
        # Calls of several requests that timed out, until their requests have all ended
        # (only the supervisor's thread touches it).
        self._hung: list[_HungCall] = []
        # By whether the call failed its request (one) or queued its requests again.
        self._log_limiter: LogLimiter[bool] = LogLimiter(OVERDUE_LOG_S)

    def expire_stuck(self) -> int:
        """Abandon batches whose process_func call has run past ``item_timeout``."""
        limit = self._limit
        now = _monotonic()
        overdue = self._board.abandon(
            lambda b: b.state is CALLING and now - b.call_started > limit)
        for batch, holds_slot, in_flight in overdue:
            self._pool.replace(batch.worker)
            if holds_slot:
                self._controller.slots.release()
            if in_flight:
                self._controller.batch_ended()
            calling = batch.requests if batch.calling is None else batch.calling
            # A call of several requests fails none of them: each is queued again alone.
            own = calling if len(calling) == 1 else []
            self._log_overdue(now - batch.call_started, len(calling), bool(own),
                              batch.worker.name)
            self._metrics.batch(len(calling), total_rows(calling),
                                0.0, now - batch.call_started, OUTCOME_TIMEOUT)
            error = BatchTimeoutError(f"process_func exceeded item_timeout={limit} s")
            # The done-callbacks of what it fails run on the callbacks thread: one that
            # blocked here would hold up every later time limit.
            callbacks: list[RequestFuture] = []
            self._delivery.time_out(own, error, batch.dispatched_at, callbacks)
            if own:
                self._may_be_own(own)
            else:
                self._hung.append(_HungCall(calling))
            failed = {id(r.future) for r in own}  # a chunk shares its request's future
            self._queue_again([r for r in batch.requests
                               if id(r.future) not in failed and not r.future.done()],
                              error, batch.dispatched_at, callbacks)
            # The parts its failure search delivered before the call that hung: their
            # done-callbacks must not wait for a call that may never return either.
            if batch.deferred:
                self._callbacks.run(self._board.take_deferred(batch))
            self._callbacks.run(callbacks)
        if self._hung:
            self._settle_hung(now)
        return len(overdue)

    def _log_overdue(self, ran: float, requests: int, failed: bool, worker: str) -> None:
        """One line per ``OVERDUE_LOG_S`` at most (a model hanging on every call)."""
        admitted = self._log_limiter.admit(failed)
        if admitted is None:
            return
        more = (f" ({plural(admitted.left_out, 'more call')} like it in the last "
                f"{seconds(admitted.since)})" if admitted.left_out else "")
        logger.error(
            "process_func ran %s on a batch of %s, past item_timeout=%s; %s and replacing "
            "worker %s%s", seconds(ran), plural(requests, "request"), seconds(self._limit),
            "failing it with BatchTimeoutError" if failed else "queueing each again alone",
            worker, more)

    def flush_log(self, final: bool = False) -> None:
        """Log a summary of the abandoned calls ``_log_overdue`` held back, once none has
        come for an interval (``LogLimiter.held``; at stop, ``final``: all of them)."""
        for failed, held in self._log_limiter.held(final):
            logger.error(
                "%s ran past item_timeout=%s in the last %s (not logged one by one); %s",
                plural(held.left_out, "more process_func call"), seconds(self._limit),
                seconds(held.since), _what_became_of(held.left_out, failed))

    def _may_be_own(self, requests: list[Request]) -> None:
        """``requests`` timed out alone, or without running alone after a call of several
        (stop began, or no room): a hung call of several they were in may be theirs."""
        keys = {id(r.future) for r in requests}
        for call in self._hung:
            if not keys.isdisjoint(call.futures):
                call.explained = True

    def _settle_hung(self, now: float) -> None:
        """Halve the target for each hung call whose requests have all ended, none of
        them timing out alone: the hang was the batch's (its size, say), as for a
        failure no request explains. A request whose deadline passed may have expired
        before it ran alone: it might be the one that hangs, so the target stays."""
        left = []
        for call in self._hung:
            if call.explained:
                continue
            if not all(r.future.done() for r in call.requests):
                left.append(call)
            elif all(r.deadline > now for r in call.requests):
                self._controller.observe_failure()
        self._hung = left

    def _queue_again(self, requests: list[Request], error: BaseException,
                     dispatched_at: float, deferred: list[RequestFuture]) -> None:
        """Queue the requests of an abandoned batch that its time-out did not fail; each
        is popped alone (parked, due now; its own deadline still holds). Once stop has
        begun, or with no room, they time out with the call instead: never lost (their
        callbacks join ``deferred``)."""
        now = _monotonic()
        left = []
        with self._board.lock:  # stop sets closing under it before it drains the queue
            for r in requests:
                if self._board.closing:
                    left.append(r)
                    continue
                again = r.requeued(error)  # says why it ran before, should it expire
                try:
                    self._queue.park(again, r.priority, r.rows, r.nbytes, r.key,
                                     r.queue_length, now, r.deadline)
                except (_stdlib_queue.Full, MemoryError):
                    left.append(r)
        if left:
            self._delivery.time_out(left, error, dispatched_at, deferred)
            self._may_be_own(left)

    def stuck_batches(self) -> list[dict[str, Any]]:
        """Batches whose call is past ``item_timeout``, abandoned or about to be, and
        those whose delivery is (``delivering``: a done-callback that blocks holds its
        worker as surely as a call that hangs, and nothing abandons it), the callbacks a
        failure search deferred to its end included."""
        limit = self._limit
        now = _monotonic()
        stuck = []
        with self._board.lock:
            for b in self._board.active:
                delivering = True
                if b.delivering:  # DELIVERING, or given up on by stop during it
                    started = b.delivery_started
                elif b.callbacks_started > 0.0:
                    started = b.callbacks_started
                elif b.state in (CALLING, ABANDONED):
                    started, delivering = b.call_started, False
                else:
                    continue
                if started > 0.0 and now - started > limit:
                    stuck.append({"worker": b.worker.name, "requests": len(b.requests),
                                  "running_for": now - started,
                                  "abandoned": b.state is ABANDONED,
                                  "delivering": delivering})
        return stuck

    def stuck_callbacks(self) -> list[dict[str, Any]]:
        """The callbacks thread, as ``stuck_batches`` shows a delivery, when the
        done-callbacks it runs have run past ``item_timeout`` (one blocks): it holds up
        the callbacks after it, though no worker."""
        requests, started = self._callbacks.running()
        running_for = _monotonic() - started
        if not requests or running_for <= self._limit:
            return []
        return [{"worker": CALLBACKS_THREAD, "requests": requests,
                 "running_for": running_for, "abandoned": False, "delivering": True}]


class _HungCall:
    """The requests of a call of several that ran past ``item_timeout``."""

    __slots__ = ("explained", "futures", "requests")

    def __init__(self, requests: list[Request]) -> None:
        self.requests = requests
        self.futures = {id(r.future) for r in requests}
        self.explained = False  # one of them may hang on its own

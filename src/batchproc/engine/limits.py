"""Time limits: a ``process_func`` call running past ``item_timeout`` is abandoned.

The supervisor calls ``expire_stuck`` at a fine tick. The requests of the call fail with
``BatchTimeoutError``; those of its batch that were not in the call (a failure search
runs parts of a batch) and are not done yet are queued again, each alone, at once. The
worker is left to finish alone (its late result is discarded: ``Board.end_call`` refuses
it) and a fresh worker takes its place.
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
from ..metrics import OUTCOME_TIMEOUT, MetricsSink
from .batch import ABANDONED, CALLING, Board
from .delivery import Delivery
from .workers import WorkerPool

logger = logging.getLogger(__name__)

_monotonic = time.monotonic
_INF = float("inf")


class TimeLimits:
    def __init__(self, config: BatchProcessorConfig, board: Board, queue: Any,
                 pool: WorkerPool, controller: Controller, delivery: Delivery,
                 metrics: MetricsSink) -> None:
        self._limit = config.item_timeout
        self._board = board
        self._queue = queue
        self._pool = pool
        self._controller = controller
        self._delivery = delivery
        self._metrics = metrics

    def expire_stuck(self) -> int:
        """Abandon batches whose process_func call has run past ``item_timeout``."""
        limit = self._limit
        now = _monotonic()
        overdue = self._board.abandon(
            lambda b: b.state is CALLING and now - b.call_started > limit)
        for batch, holds_slot in overdue:
            batch.worker.abandoned = True
            if holds_slot:
                self._controller.slots.release()
            self._controller.batch_ended()
            calling = batch.requests if batch.calling is None else batch.calling
            logger.error(
                "process_func ran %.3f s on a batch of %d requests, past item_timeout=%.3f s;"
                " failing them with BatchTimeoutError and replacing worker %s",
                now - batch.call_started, len(calling), limit, batch.worker.name)
            self._metrics.batch(len(calling), total_rows(calling),
                                0.0, now - batch.call_started, OUTCOME_TIMEOUT)
            error = BatchTimeoutError(f"process_func exceeded item_timeout={limit} s")
            self._delivery.time_out(calling, error, batch.dispatched_at)
            in_call = {id(r.future) for r in calling}  # a chunk shares its request's future
            self._queue_again([r for r in batch.requests
                               if id(r.future) not in in_call and not r.future.done()],
                              error, batch.dispatched_at)
            self._pool.spawn()
        return len(overdue)

    def _queue_again(self, requests: list[Request], error: BaseException,
                     dispatched_at: float) -> None:
        """Queue the requests of an abandoned batch that were not in its call; each is
        popped alone (parked, due now). Once stop has begun, or with no room, they time
        out with the call instead: never lost."""
        now = _monotonic()
        left = []
        with self._board.lock:  # stop sets closing under it before it drains the queue
            for r in requests:
                if self._board.closing:
                    left.append(r)
                    continue
                try:
                    self._queue.park(r, r.priority, r.rows, r.nbytes, r.key, r.queue_length,
                                     now, None if r.deadline == _INF else r.deadline)
                except (_stdlib_queue.Full, MemoryError):
                    left.append(r)
        if left:
            self._delivery.time_out(left, error, dispatched_at)

    def stuck_batches(self) -> list[dict[str, Any]]:
        """Batches whose call is past ``item_timeout``, abandoned or about to be."""
        limit = self._limit
        now = _monotonic()
        with self._board.lock:
            return [{"worker": b.worker.name, "requests": len(b.requests),
                     "running_for": now - b.call_started,
                     "abandoned": b.state is ABANDONED}
                    for b in self._board.active
                    if b.state in (CALLING, ABANDONED) and b.call_started > 0.0
                    and now - b.call_started > limit]

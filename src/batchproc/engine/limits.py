"""Time limits: a ``process_func`` call running past ``item_timeout`` is abandoned.

The supervisor calls ``expire_stuck`` at a fine tick. An abandoned batch's requests fail
with ``BatchTimeoutError``, its worker is left to finish alone (its late result is
discarded: ``Board.end_call`` refuses it) and a fresh worker takes its place.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .._native.future_state import total_rows
from ..config import BatchProcessorConfig
from ..controller import Controller
from ..errors import BatchTimeoutError
from ..metrics import OUTCOME_TIMEOUT, MetricsSink
from .batch import ABANDONED, CALLING, Board
from .delivery import Delivery
from .workers import WorkerPool

logger = logging.getLogger(__name__)

_monotonic = time.monotonic


class TimeLimits:
    def __init__(self, config: BatchProcessorConfig, board: Board, pool: WorkerPool,
                 controller: Controller, delivery: Delivery, metrics: MetricsSink) -> None:
        self._limit = config.item_timeout
        self._board = board
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
            logger.error(
                "process_func ran %.3f s on a batch of %d requests, past item_timeout=%.3f s;"
                " failing them with BatchTimeoutError and replacing worker %s",
                now - batch.call_started, len(batch.requests), limit, batch.worker.name)
            self._metrics.batch(len(batch.requests), total_rows(batch.requests),
                                0.0, now - batch.call_started, OUTCOME_TIMEOUT)
            self._delivery.time_out(
                batch.requests,
                BatchTimeoutError(f"process_func exceeded item_timeout={limit} s"),
                batch.dispatched_at)
            self._pool.spawn()
        return len(overdue)

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

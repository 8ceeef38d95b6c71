"""The asyncio front door: requests whose results land on an event loop.

``BatchProcessor.enqueue_predict_async`` returns an ``asyncio.Future`` of the caller's
running loop. Wrapping a ``concurrent.futures.Future`` instead (``asyncio.wrap_future``)
costs a ``call_soon_threadsafe`` per request: a write to the loop's wake-up socket and
a callback per result. Here a worker hands a loop every result of a batch at once: the
first result posted to an idle ``LoopChannel`` schedules one flush on the loop, later
ones join it, and the flush completes them all in one pass of the loop, waking their
awaiters in the same pass (``awaiters.complete``; benchmarks/compare_peers.py, "batchproc
asyncio", measures the difference).

``AsyncRequest`` (native, ``_native.future_state``) stands in the queue where a
``RequestFuture`` would. Thread rules: the asyncio future is only
completed on its loop (in the flush); workers only read whether it was cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from typing import Any

from .awaiters import complete
from .futures import CancelQueued, cancel_queued

logger = logging.getLogger(__name__)

class QueuedFuture(asyncio.Future):  # type: ignore[type-arg]
    """The asyncio future of a queued request, whose ``cancel()`` also takes the request
    out of the queue at once, as ``enqueue_predict``'s future does. Cancelling a task
    that awaits it cancels it too (``Task.cancel`` cancels the future it waits on)."""

    # Set once queued. Slots: no per-request __dict__ (as cheap as loop.create_future()).
    __slots__ = ("_bp_cancel_queued", "_bp_token")
    _bp_cancel_queued: CancelQueued  # its way out of the queue (futures.cancel_queued)
    _bp_token: int

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        ref = getattr(self, "_bp_cancel_queued", None)
        if ref is not None:
            # False once a worker popped it: that worker then counts it as cancelled.
            cancel_queued(ref, self._bp_token)
        return True


class LoopChannel:
    """Results travelling from worker threads to one event loop, a batch at a time.

    It holds its loop weakly: a processor keeps a channel per loop that ever used it, and
    must not keep every loop of a program that calls ``asyncio.run`` again and again.
    (Whatever is still pending on a loop holds that loop through its futures.)"""

    __slots__ = ("_lock", "_pending", "_scheduled", "loop_ref")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop_ref = weakref.ref(loop)
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Future[Any], bool, Any]] = []
        self._scheduled = False

    def post(self, future: asyncio.Future[Any], ok: bool, value: Any) -> None:
        """From any thread: complete ``future`` on its loop, soon."""
        with self._lock:
            self._pending.append((future, ok, value))
            if self._scheduled:
                return  # a flush is already on its way and will take this one too
            self._scheduled = True
        self._schedule_flush()

    def post_many(self, items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
        """From any thread: ``post`` each ``(future, ok, value)``, in one step (a worker's
        results of one batch: future_state.finish_all)."""
        with self._lock:
            self._pending.extend(items)
            if self._scheduled:
                return
            self._scheduled = True
        self._schedule_flush()

    def serving(self) -> bool:
        """Whether its loop is running (may run what is posted soon): not closed, not
        stopped, not gone."""
        loop = self.loop_ref()
        return loop is not None and loop.is_running()

    def _schedule_flush(self) -> None:
        loop = self.loop_ref()
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._flush)
                return
            except RuntimeError:  # the loop is closed
                pass
        # Closed or gone: nobody can await these any more.
        with self._lock:
            dropped, self._pending, self._scheduled = len(self._pending), [], False
        logger.debug("event loop closed; %d results dropped", dropped)

    def drop_if_closed(self) -> None:
        """From any thread (the supervisor, at its tick): a flush scheduled on a loop that
        closed before running it never runs; drop what waited for it, which holds the
        loop (its futures) for as long as this channel lives. (A post meanwhile finds the
        loop closed and drops its results itself.)"""
        if not self._scheduled:
            return
        loop = self.loop_ref()
        if loop is not None and not loop.is_closed():
            return
        with self._lock:
            dropped, self._pending, self._scheduled = len(self._pending), [], False
        logger.debug("event loop closed; %d results dropped", dropped)

    def _flush(self) -> None:
        """On the loop: complete everything posted so far, and wake its awaiters."""
        with self._lock:
            outcomes, self._pending, self._scheduled = self._pending, [], False
        complete(self.loop_ref(), outcomes)

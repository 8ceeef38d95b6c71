"""Async models: an ``async def`` process_func runs on an event loop the processor owns.

The workers stay threads and never learn that the model is a coroutine function.
``AsyncModel`` is a plain callable standing in for the model: called on a worker thread,
it starts the coroutine on the processor's loop and blocks that thread (without the GIL)
until the coroutine ends, then returns its result or raises its exception, exactly as a
sync model would. Each worker waits for its own call, so up to ``max_workers`` calls are
in flight on the one loop at once, overlapping wherever the model awaits.

Cancellation: a call abandoned by the processor (past ``item_timeout``, or left over when
``stop()`` gives up) has its coroutine cancelled, so the model's awaits end with
``asyncio.CancelledError`` instead of running on for nobody.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from .errors import BatchTimeoutError, ProcessorStoppedError

logger = logging.getLogger(__name__)

_monotonic = time.monotonic

LOOP_THREAD_NAME = "batchproc-loop"

# Seconds close() waits for the loop to end past its deadline (see close).
_STOP_GRACE = 0.1


def is_async_callable(func: object) -> bool:
    """True if calling ``func`` returns a coroutine: an ``async def`` function or method,
    an object whose ``__call__`` is ``async def``, or a ``functools.partial`` of either.

    A plain function that happens to return an awaitable is not recognised; mark it with
    ``inspect.markcoroutinefunction`` (Python 3.12+).
    """
    while isinstance(func, functools.partial):
        func = func.func
    if inspect.iscoroutinefunction(func):
        return True
    if (inspect.isfunction(func) or inspect.ismethod(func) or inspect.isbuiltin(func)
            or isinstance(func, type)):
        return False
    return callable(func) and inspect.iscoroutinefunction(func.__call__)


class _Call(Future[Any]):
    """One model call: completed on the loop, waited for on a worker thread."""

    def __init__(self, started: float) -> None:
        super().__init__()
        self.started = started
        self.task: asyncio.Task[None] | None = None
        self.cancelling = False  # a cancel was sent; send it once


def _settle(call: _Call, result: Any = None, error: BaseException | None = None) -> None:
    # The loop and close() may both try; the first one wins.
    try:
        if error is None:
            call.set_result(result)
        else:
            call.set_exception(error)
    except InvalidStateError:
        pass


class AsyncModel:
    """Runs an async ``process_func`` on its own event loop, in its own thread.

    ``start()`` starts the loop thread; calling the instance (on a worker thread) runs
    one batch; ``cancel_started_before(t)`` cancels calls that started before monotonic
    time ``t``; ``close(deadline)`` cancels what is still running, stops the loop and
    joins its thread until ``deadline``.
    """

    def __init__(self, func: Callable[[Any], Awaitable[Any]]) -> None:
        self._func = func
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=LOOP_THREAD_NAME,
                                        daemon=True)
        self._lock = threading.Lock()
        self._calls: set[_Call] = set()
        self._closed = False
        self._shut_down = False  # set by the shutdown close() begins, as it stops the loop
        self._interruption_logged = False  # the loop ended otherwise, and it was said

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        self._thread.start()

    # ----------------------------------------------------------------- worker side

    def __call__(self, batch: Any) -> Any:
        call = _Call(_monotonic())
        with self._lock:
            if self._closed:
                raise ProcessorStoppedError("the processor's event loop is stopped")
            self._calls.add(call)
        try:
            try:
                self._loop.call_soon_threadsafe(self._begin, call, batch)
            except RuntimeError:  # close() closed the loop since the check above
                raise ProcessorStoppedError("the processor's event loop is stopped") from None
            return call.result()
        finally:
            with self._lock:
                self._calls.discard(call)

    # ----------------------------------------------------------------- loop side

    def _run_loop(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            # The loop is the processor's: it ends when close() shuts it down, not when a
            # model stops it (``loop.stop()``) or a callback's SystemExit escapes it, or
            # the calls waiting on it would wait until item_timeout.
            while not self._shut_down:
                try:
                    loop.run_forever()
                except BaseException as exc:
                    if loop.is_closed():
                        return
                    self._note_interruption(f"interrupted by {type(exc).__name__}", exc)
                else:
                    if not self._shut_down:
                        self._note_interruption("stopped by something other than the "
                                                "processor (loop.stop() in the model?)")
        finally:
            if not loop.is_closed():
                try:
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

    def _note_interruption(self, how: str, exc: BaseException | None = None) -> None:
        if not self._interruption_logged:  # once: a model may do it on every call
            logger.error("the event loop of an async process_func was %s; it runs on",
                         how, exc_info=exc)
            self._interruption_logged = True

    def _begin(self, call: _Call, batch: Any) -> None:
        if call.done():
            return  # failed by close() before the loop got to it
        if self._closed:
            # Closing: a task made now could escape the shutdown's cancellation.
            _settle(call, error=ProcessorStoppedError("processor stopped before this call"))
            return
        try:
            awaitable = self._func(batch)
        except BaseException as exc:
            _settle(call, error=exc)
            return
        if not inspect.isawaitable(awaitable):
            _settle(call, awaitable)  # a callable that answered without awaiting
            return
        call.task = self._loop.create_task(self._drive(call, awaitable))

    async def _drive(self, call: _Call, awaitable: Awaitable[Any]) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError as exc:
            _settle(call, error=exc)
            raise
        except BaseException as exc:
            # KeyboardInterrupt and the like too: the batch fails with it, as for a sync
            # model, and the loop keeps serving the other calls.
            _settle(call, error=exc)
        else:
            _settle(call, result)

    def _cancel(self, call: _Call, reason: BaseException) -> None:
        task = call.task
        if task is not None and not task.done():
            task.cancel(str(reason))
        elif task is None:
            _settle(call, error=reason)  # not begun yet: it never will be

    # ----------------------------------------------------------------- time limits, stop

    def cancel_started_before(self, started_before: float, limit: float) -> int:
        """Cancel every call that started before monotonic time ``started_before``: the
        processor has abandoned them (past ``item_timeout``, which is ``limit``).
        Returns how many cancels were sent."""
        with self._lock:
            if self._closed:
                return 0
            overdue = [c for c in self._calls if c.started < started_before
                       and not c.cancelling and not c.done()]
            for call in overdue:
                call.cancelling = True
        for call in overdue:
            reason = BatchTimeoutError(f"process_func exceeded item_timeout={limit} s")
            try:
                self._loop.call_soon_threadsafe(self._cancel, call, reason)
            except RuntimeError:  # the loop closed meanwhile
                _settle(call, error=reason)
        return len(overdue)

    def close(self, deadline: float) -> bool:
        """Cancel every call still running and the loop's other tasks, stop the loop and
        join its thread until monotonic ``deadline`` (``inf``: wait). True if it ended.
        Called on the loop's own thread, it does not wait: the loop ends after it returns.

        Called after the workers were joined or abandoned: nothing waits for these calls'
        results any more."""
        with self._lock:
            if self._closed:
                return not self._thread.is_alive()
            self._closed = True
            calls = list(self._calls)
        on_loop = self._thread is threading.current_thread()
        if self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._begin_shutdown)
            except RuntimeError:
                pass  # already closed
            # A short grace past the deadline: stop() may call this with no time left,
            # and cancelling takes the loop one turn.
            remaining = deadline - _monotonic()
            # stop() called on the loop (by the model itself): it ends after this returns.
            if not on_loop:
                # Longer than a thread can wait (join would raise OverflowError): as
                # long as it takes.
                self._thread.join(None if remaining > threading.TIMEOUT_MAX - _STOP_GRACE
                                  else max(0.0, remaining) + _STOP_GRACE)
        elif not self._loop.is_closed():
            self._loop.close()  # never started
        error = ProcessorStoppedError("processor stopped before this call finished")
        for call in calls:
            _settle(call, error=error)
        ended = not self._thread.is_alive()
        if not ended and not on_loop:
            logger.warning("the event loop of an async process_func did not stop in time; "
                           "a coroutine may be ignoring cancellation")
        return ended

    def _begin_shutdown(self) -> None:
        self._loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        loop = self._loop
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks(loop) if t is not current]
        for task in tasks:
            task.cancel("processor stopped")
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.shutdown_default_executor()
        self._shut_down = True
        loop.stop()

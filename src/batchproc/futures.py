"""The future ``enqueue_predict`` returns: a ``concurrent.futures.Future``, made light.

Why: every request gets a future, so its cost is paid per request. The standard
``Future.__init__`` builds a ``threading.Condition`` (an RLock, a deque and five bound
methods): eleven objects the cyclic garbage collector tracks, per request. With tens of
thousands of requests outstanding, collections that walk them cost as much as the rest
of the request path (benchmarks/bench_futures.py measures both).

``RequestFuture`` keeps the same states, the same attributes that
``concurrent.futures.wait()`` and ``as_completed()`` use, and the same behaviour, but:

- its one lock is a plain ``_thread`` lock, which the collector does not track;
- a thread blocked in ``result()``/``exception()`` waits on a lock of its own, created
  only when somebody actually waits (the way ``Condition.wait`` works inside);
- lists of callbacks and waiters exist only once something is added to them;
- ``done()``, ``running()`` and ``cancelled()`` read the state without the lock (one
  attribute read is atomic; the standard version takes the lock only to read it).

``concurrent.futures.wait()`` and ``as_completed()`` only acquire and release
``_condition`` and append to ``_waiters``; every ``Future`` method that would wait on or
notify a condition is overridden here (a test checks that no new one appears unnoticed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeoutError  # not builtin on 3.10
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    LOGGER,
    PENDING,
    RUNNING,
)
from typing import Any

_Lock = threading.Lock
_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))
_CANCELLED = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED))
_DESCRIPTION = {PENDING: "pending", RUNNING: "running", CANCELLED: "cancelled",
                CANCELLED_AND_NOTIFIED: "cancelled", FINISHED: "finished"}


class RequestFuture(Future):  # type: ignore[type-arg]
    """A ``concurrent.futures.Future`` without per-instance Condition, lists or dict churn.

    Thread-safe in the same way as ``Future``; ``isinstance(f, Future)`` holds.
    """

    # Class-level defaults: an instance gets its own only once it needs one.
    _done_callbacks: Any = ()   # a list once a callback is added
    _waiter_list: list[Any] | None = None  # wait()/as_completed() waiters
    _sleepers: list[Any] | None = None  # locks of threads blocked in result()/exception()

    def __init__(self) -> None:
        # Future.__init__ is deliberately not called: it builds the Condition.
        # _condition is a plain lock: wait() and as_completed() only acquire, release and
        # use it as a context manager, and nothing here waits on or notifies it.
        self._condition = _Lock()  # type: ignore[assignment]
        self._state = PENDING
        self._result = None
        self._exception: BaseException | None = None

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        """For wait()/as_completed(), which hold ``_condition`` while they touch it."""
        waiters = self._waiter_list
        if waiters is None:
            waiters = self._waiter_list = []
        return waiters

    def __repr__(self) -> str:
        state = self._state
        name = type(self).__name__
        head = f"<{name} at {id(self):#x} state={_DESCRIPTION[state]}"
        if state == FINISHED:
            if self._exception is not None:
                return f"{head} raised {type(self._exception).__name__}>"
            return f"{head} returned {type(self._result).__name__}>"
        return head + ">"

    # ----------------------------------------------------------------- queries

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def running(self) -> bool:
        return self._state == RUNNING

    def done(self) -> bool:
        return self._state in _DONE

    def result(self, timeout: float | None = None) -> Any:
        if self._state != FINISHED:
            self._wait(timeout)
        state = self._state
        if state == FINISHED:
            error = self._exception
            if error is None:
                return self._result
            try:
                raise error
            finally:
                error = None  # no cycle frame -> error -> traceback -> frame
        if state in _CANCELLED:
            raise CancelledError()
        raise FutureTimeoutError()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state != FINISHED:
            self._wait(timeout)
        state = self._state
        if state == FINISHED:
            return self._exception
        if state in _CANCELLED:
            raise CancelledError()
        raise FutureTimeoutError()

    def _wait(self, timeout: float | None) -> None:
        """Block until done or until ``timeout`` passes (``Condition.wait`` semantics:
        None waits for ever, <= 0 does not wait)."""
        with self._condition:
            if self._state in _DONE:
                return
            sleeper = _Lock()
            sleeper.acquire()
            if self._sleepers is None:
                self._sleepers = [sleeper]
            else:
                self._sleepers.append(sleeper)
        if timeout is None:
            woken = sleeper.acquire()
        elif timeout > 0:
            woken = sleeper.acquire(True, timeout)
        else:
            woken = sleeper.acquire(False)
        if not woken:
            with self._condition:
                sleepers = self._sleepers
                if sleepers is not None and sleeper in sleepers:
                    sleepers.remove(sleeper)

    def _wake_sleepers(self) -> None:
        # Under _condition.
        sleepers = self._sleepers
        if sleepers is not None:
            self._sleepers = None
            for sleeper in sleepers:
                sleeper.release()

    # ----------------------------------------------------------------- callbacks

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        with self._condition:
            if self._state not in _DONE:
                callbacks = self._done_callbacks
                if callbacks:
                    callbacks.append(fn)
                else:
                    self._done_callbacks = [fn]
                return
        try:
            fn(self)
        except Exception:
            LOGGER.exception("exception calling callback for %r", self)

    def _invoke_callbacks(self) -> None:
        for callback in self._done_callbacks:
            try:
                callback(self)
            except Exception:
                LOGGER.exception("exception calling callback for %r", self)

    # ----------------------------------------------------------------- transitions

    def cancel(self) -> bool:
        with self._condition:
            state = self._state
            if state in (RUNNING, FINISHED):
                return False
            if state in _CANCELLED:
                return True
            self._state = CANCELLED
            self._wake_sleepers()
        self._invoke_callbacks()
        return True

    def set_running_or_notify_cancel(self) -> bool:
        with self._condition:
            state = self._state
            if state == PENDING:
                self._state = RUNNING
                return True
            if state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiter_list or ():
                    waiter.add_cancelled(self)
                return False
        LOGGER.critical("Future %s in unexpected state: %s", id(self), state)
        raise RuntimeError("Future in unexpected state")

    def set_result(self, result: Any) -> None:
        with self._condition:
            state = self._state
            if state in _DONE:
                raise InvalidStateError(f"{state}: {self!r}")
            self._result = result
            self._state = FINISHED
            if self._waiter_list:
                for waiter in self._waiter_list:
                    waiter.add_result(self)
            if self._sleepers is not None:
                self._wake_sleepers()
        if self._done_callbacks:
            self._invoke_callbacks()

    def set_exception(self, exception: BaseException | None) -> None:
        with self._condition:
            state = self._state
            if state in _DONE:
                raise InvalidStateError(f"{state}: {self!r}")
            self._exception = exception
            self._state = FINISHED
            if self._waiter_list:
                for waiter in self._waiter_list:
                    waiter.add_exception(self)
            if self._sleepers is not None:
                self._wake_sleepers()
        if self._done_callbacks:
            self._invoke_callbacks()

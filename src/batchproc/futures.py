"""The future ``enqueue_predict`` returns: a ``concurrent.futures.Future``, made light.

Why: every request gets a future, so its cost is paid per request. The standard
``Future.__init__`` builds a ``threading.Condition`` (an RLock, a deque and five bound
methods): eleven objects the cyclic garbage collector tracks, per request, and every
call takes the lock. With tens of thousands of requests outstanding, collections that
walk those objects cost as much as the rest of the request path
(benchmarks/bench_futures.py measures both).

``RequestFuture`` keeps the same states, the same attributes that
``concurrent.futures.wait()`` and ``as_completed()`` use, and the same behaviour, but:

- it owns no lock: each state transition is one call into compiled code that no other
  Python thread can interleave with (``batchproc._native.future_state`` says why);
- a thread blocked in ``result()``/``exception()`` waits on a lock of its own, created
  only when somebody actually waits (the way ``Condition.wait`` works inside), after
  busy-waiting a moment for it without the GIL (``batchproc._native.waiting``);
- lists of callbacks and waiters exist only once something is added to them;
- a ``timeout`` longer than a thread can wait (``threading.TIMEOUT_MAX``, ``inf``)
  waits as long as it takes, where the standard one raises ``OverflowError``.

The one exception is a future handed to ``concurrent.futures.wait()`` or
``as_completed()``: they hold ``_condition`` (a plain lock here, created on first use)
while they read the state and register their waiter, so once it exists every
transition of that future takes it too (the ``_locked`` methods below). Every ``Future``
method that would wait on or notify a condition is overridden (a test checks that no
new one appears unnoticed).
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

from ._native import future_state as _atomic
from ._native import waiting as _waiting

_Lock = threading.Lock
_NEED_LOCK = _atomic.NEED_LOCK
_INVALID = _atomic.INVALID
_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))
_CANCELLED = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED))
_DESCRIPTION = {PENDING: "pending", RUNNING: "running", CANCELLED: "cancelled",
                CANCELLED_AND_NOTIFIED: "cancelled", FINISHED: "finished"}
# Makes a future's lock exactly once, whichever thread asks first (rare: wait() only).
_lock_creation = _Lock()

# How long a thread blocked in result() busy-waits for it before it parks
# (batchproc._native.waiting): a result that comes within microseconds then costs no
# thread wake-up (benchmarks/bench_round_trip.py).
RESULT_SPIN = 30e-6
_spin_unset = True


def result_spin(cpus: float) -> float:
    """RESULT_SPIN where spinning pays with ``cpus`` CPUs' worth of time
    (``engine.cpus.spinning_pays``), else 0.0."""
    # Not at import: the engine package imports this module.
    from .engine.cpus import spinning_pays
    return RESULT_SPIN if spinning_pays(cpus) else 0.0


def set_result_spin(seconds: float) -> None:
    """Set how long a blocked ``result()`` busy-waits at least before it parks, in
    seconds (0.0: never), for the whole process: a number from 0 to 1 (``TypeError`` for
    anything else than a number, ``ValueError`` outside). By default ``RESULT_SPIN``
    (30 us) where the process may use two CPUs' worth of time or more, else 0.0. Where a
    parked caller's wake-up costs more than half of it, a spin lasts twice that cost, up
    to ``SPIN_STRETCH_MAX`` (4) times the setting and never past ``SPIN_STRETCH_LIMIT``
    (1 ms) through that stretch (``batchproc._native.waiting``)."""
    global _spin_unset
    _waiting.set_spin(seconds)
    _spin_unset = False


def get_result_spin() -> float:
    """How long a blocked ``result()`` busy-waits at least, in seconds
    (``set_result_spin``; the default once known)."""
    if _spin_unset:
        _set_spin()
    return float(_waiting.get_spin())


def _set_spin() -> None:
    # On the first wait, not at import: the CPU quota is read from the cgroup files.
    from .engine.cpus import usable_cpus
    set_result_spin(result_spin(usable_cpus()))


class RequestFuture(Future):  # type: ignore[type-arg]
    """A ``concurrent.futures.Future`` without a lock, Condition or lists of its own.

    Thread-safe in the same way as ``Future``; ``isinstance(f, Future)`` holds.
    """

    # Class-level defaults: an instance gets its own only once it needs one.
    _cond: Any = None           # the lock behind _condition, once something asks for it
    _waiter_list: list[Any] | None = None  # wait()/as_completed() waiters

    def __init__(self) -> None:
        # Future.__init__ is deliberately not called: it builds the Condition.
        self._state = PENDING
        self._result = None
        self._exception: BaseException | None = None
        # Every attribute the lock-free transitions store (future_state) exists from the
        # start: storing a new one may make the instance's dict, so start a collection
        # between a transition's read of the state and its store.
        self._first_callback: Any = None  # the first callback added, on its own (no list)
        self._done_callbacks: Any = ()  # a list of the others, once a second one is added
        # waiting.Sleeper of each thread in result()/exception()
        self._sleepers: list[Any] | None = None

    @property
    def _condition(self) -> Any:  # type: ignore[override]
        """A plain lock, made on first use: wait() and as_completed() only acquire and
        release it, and nothing here waits on or notifies it."""
        cond = self._cond
        if cond is None:
            with _lock_creation:
                cond = self._cond
                if cond is None:
                    cond = self._cond = _Lock()
        return cond

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        """For wait()/as_completed(), which hold ``_condition`` while they touch it."""
        waiters = self._waiter_list
        if waiters is None:
            waiters = self._waiter_list = []
        return waiters

    def __repr__(self) -> str:
        state = self._state
        head = f"<{type(self).__name__} at {id(self):#x} state={_DESCRIPTION[state]}"
        if state == FINISHED:
            if self._exception is not None:
                return f"{head} raised {type(self._exception).__name__}>"
            return f"{head} returned {type(self._result).__name__}>"
        return head + ">"

    def __reduce__(self) -> Any:
        # A copy would carry this future's way out of the queue: cancelling the copy would
        # withdraw the request and leave this future pending forever. (copy.copy,
        # copy.deepcopy and pickle all come here.)
        raise TypeError(
            f"{type(self).__name__} cannot be copied or pickled: it stands for one queued "
            "request; pass the future itself, or its result()")

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
        if _spin_unset:
            _set_spin()
        sleeper = _waiting.Sleeper()
        registered = _atomic.add_sleeper(self, sleeper)
        if registered == _NEED_LOCK:
            with self._condition:
                registered = 0 if self._state in _DONE else 1
                if registered:
                    self._sleepers = [*(self._sleepers or ()), sleeper]
        if not registered:
            return
        try:
            woken = sleeper.wait(timeout)
        except BaseException:  # a signal's handler raised (Ctrl-C): this wait is over
            self._forget(sleeper)
            raise
        if not woken:
            self._forget(sleeper)

    def _forget(self, sleeper: Any) -> None:
        """A wait that ended without its release: the future no longer holds its sleeper
        (released meanwhile, it is gone already)."""
        if _atomic.remove_sleeper(self, sleeper) == _NEED_LOCK:
            with self._condition:
                sleepers = self._sleepers
                if sleepers is not None and sleeper in sleepers:
                    sleepers.remove(sleeper)

    def _wake_sleepers(self) -> None:
        # Locked path only (the atomic functions wake them themselves).
        sleepers = self._sleepers
        if sleepers is not None:
            self._sleepers = None
            for sleeper in sleepers:
                sleeper.release()

    # ----------------------------------------------------------------- callbacks

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        added = _atomic.add_callback(self, fn)
        if added == _NEED_LOCK:
            with self._condition:
                added = 0 if self._state in _DONE else 1
                if added:
                    if self._first_callback is None:
                        self._first_callback = fn
                    else:
                        self._done_callbacks = [*self._done_callbacks, fn]
        if not added:
            self._call(fn)

    def _invoke_callbacks(self) -> None:
        # On completion, whoever completes (a worker delivering a whole batch) runs every
        # callback and goes on, whatever one raises: a SystemExit or KeyboardInterrupt
        # from a callback must not fail the other requests of its batch.
        first = self._first_callback
        if first is None:
            return
        self._call(first, BaseException)
        for callback in self._done_callbacks:
            self._call(callback, BaseException)

    def _call(self, callback: Callable[[Future[Any]], object],
              caught: type[BaseException] = Exception) -> None:
        try:
            callback(self)
        except caught:
            LOGGER.exception("exception calling callback for %r", self)

    # ----------------------------------------------------------------- transitions

    def cancel(self) -> bool:
        return self._cancel() != 0

    def _cancel(self) -> int:
        """``cancel``'s transition: 1 cancelled by this call (its callbacks run), 2 it
        already was, 0 it cannot be (running or finished)."""
        code = _atomic.cancel(self)
        if code == _NEED_LOCK:
            with self._condition:
                state = self._state
                if state in (RUNNING, FINISHED):
                    code = 0
                elif state in _CANCELLED:
                    code = 2
                else:
                    self._state = CANCELLED
                    self._wake_sleepers()
                    code = 1
        if code == 1:
            self._invoke_callbacks()
        return code

    def set_running_or_notify_cancel(self) -> bool:
        code = _atomic.start(self)
        if code == _NEED_LOCK:
            with self._condition:
                state = self._state
                if state == PENDING:
                    self._state = RUNNING
                    code = 1
                elif state == CANCELLED:
                    self._state = CANCELLED_AND_NOTIFIED
                    for waiter in self._waiter_list or ():
                        waiter.add_cancelled(self)
                    code = 0
                else:
                    code = _INVALID
        if code == _INVALID:
            LOGGER.critical("Future %s in unexpected state: %s", id(self), self._state)
            raise RuntimeError("Future in unexpected state")
        return code == 1

    def set_result(self, result: Any) -> None:
        self._complete(result, False)

    def set_exception(self, exception: BaseException | None) -> None:
        self._complete(exception, True)

    def _complete(self, value: Any, is_exception: bool,
                  deferred: list[RequestFuture] | None = None) -> None:
        code = _atomic.finish(self, value, is_exception)
        if code == _NEED_LOCK:
            code = self._finish_locked(value, is_exception)
        if code == _INVALID:
            raise InvalidStateError(f"{self._state}: {self!r}")
        if code == 1:
            if deferred is None:
                self._invoke_callbacks()
            else:
                deferred.append(self)

    def _finish_locked(self, value: Any, is_exception: bool) -> int:
        """``_atomic.finish`` under the lock, notifying wait()/as_completed() waiters."""
        with self._condition:
            if self._state in _DONE:
                return _INVALID
            if is_exception:
                self._exception = value
            else:
                self._result = value
            self._state = FINISHED
            for waiter in self._waiter_list or ():
                if is_exception:
                    waiter.add_exception(self)
                else:
                    waiter.add_result(self)
            self._wake_sleepers()
        return 0 if self._first_callback is None else 1


# A worker's per-batch loops over its requests' futures, compiled (see future_state):
# start_all(requests) -> the requests still live; finish_all(requests, results) -> how
# many futures were already done. Futures of other kinds go through their own methods.
_atomic.bind(RequestFuture)
start_all = _atomic.start_all
finish_all = _atomic.finish_all


# A queued request's way out of its queue: the weakref.WeakMethod of its processor's
# _cancel_queued (a future its caller keeps must not keep the processor alive).
CancelQueued = Callable[[], Callable[[int], bool] | None]


def cancel_queued(ref: CancelQueued, token: int) -> bool:
    """Take the request of ``token`` out of its queue through ``ref`` (a future's
    ``_bp_cancel_queued``). True if no worker will ever see it: taken out now, or its
    processor is gone (a processor never started, dropped: its workers hold it while they
    run); False if a worker took it, and will see the cancellation."""
    cancel = ref()
    return cancel is None or cancel(token)


def fail(future: Future[Any], error: BaseException,
         deferred: list[RequestFuture] | None = None) -> None:
    """``future.set_exception(error)``; with ``deferred``, a ``RequestFuture`` whose
    callbacks are still to run is appended to it instead (as ``finish_all`` does).
    Raises ``InvalidStateError`` if the future is done."""
    if deferred is not None and isinstance(future, RequestFuture):
        future._complete(error, True, deferred)
    else:
        future.set_exception(error)


def invoke_callbacks(futures: list[RequestFuture]) -> None:
    """Run the done-callbacks ``finish_all`` or ``fail`` deferred, in order; whatever
    one raises is logged, as on completion."""
    for future in futures:
        future._invoke_callbacks()

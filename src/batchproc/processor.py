"""BatchProcessor: the public face of batchproc (docs/reference.md).

Intake (``enqueue_predict``) runs on the caller's thread and does the per-request work:
describe the item, create its future, push it onto the native queue. Everything after
that happens on the processor's threads: the workers (``engine/``), one supervisor
that fails requests whose ``max_queue_time`` ran out, enforces ``item_timeout`` and runs
the health checks, and, started on first need, one that runs the done-callbacks of the
requests the supervisor fails (``engine/callbacks.py``), so that none holds it up.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import os
import queue as _stdlib_queue
import threading
import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Generic, NoReturn, TypeVar

from . import bulk, exiting, forking, shielded
from ._native.future_state import AsyncRequest, Request, start_all
from ._native.intake import Intake
from ._native.request_queue import QueueClosed, RequestQueue
from .aio import LoopChannel, QueuedFuture
from .async_model import AsyncModel, is_async_callable
from .backpressure import RoomWaiters, apredict, room_wait, timeout_arg
from .config import (
    FIELD_NAMES,
    BatchPriority,
    BatchProcessorConfig,
    _closest,
    read_only_copy,
    require_number,
)
from .controller import Controller
from .engine import Engine
from .engine.delivery import record_requests
from .engine.workers import DELIVERY_GRACE
from .errors import (
    BatchProcessorError,
    ProcessorForkedError,
    ProcessorStoppedError,
    QueueFullError,
    interrupts,
)
from .formats import make_describer
from .futures import CancelQueued, RequestFuture, cancel_queued
from .health import FORKED, PAUSED, HealthMonitor
from .log_limits import LogLimiter, plural, seconds
from .metrics import OUTCOME_ERROR, MetricsSink
from .stats import BatchStats

logger = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")

_NEW, _RUNNING, _STOPPING, _STOPPED = "new", "running", "stopping", "stopped"
_monotonic = time.monotonic
_running_loop = asyncio.get_running_loop
_INF = float("inf")


class _ConfigDefault:
    """The default of ``max_queue_time`` keywords: the config's value."""

    def __repr__(self) -> str:
        return "<config default>"


_CONFIG = _ConfigDefault()

# How long a start() that failed part-way waits for the threads it started to exit.
START_ABORT_JOIN = 5.0

# How soon stop() sees that its caller was interrupted while it waits for the work.
INTERRUPT_POLL = 0.05

# How long stop() waits for the supervisor thread to end however little time is left (s).
SUPERVISOR_EXIT = 0.5

# enqueue() logs a failure of each exception type at once, then at most once per this many
# seconds, with the count of those it left out.
FAILURE_LOG_INTERVAL = 10.0


class _RequestFuture(RequestFuture):
    """A future whose ``cancel()`` also removes the request from the queue at once."""

    # Set once queued: the request's way out of the queue (futures.cancel_queued).
    _bp_cancel_queued: CancelQueued | None = None
    _bp_token = -1
    # A map chunk's: queues its items again should it fail (bulk.Window.queue_again).
    _bp_again: Any = None

    def cancel(self) -> bool:
        code = self._cancel()
        ref = self._bp_cancel_queued
        # Only the call that cancelled it: a second one finds it told already.
        if code == 1 and ref is not None and cancel_queued(ref, self._bp_token):
            # No worker will ever see it: tell concurrent.futures.wait()/as_completed()
            # now, as a worker would have.
            self.set_running_or_notify_cancel()
        return code != 0


def _refuse_config_in_pieces(config: object, config_fields: Mapping[str, object]) -> None:
    """``TypeError`` showing the call to write where ``BatchProcessor`` was given its model,
    its config's fields as keywords, or a dict of them, in place of a
    `BatchProcessorConfig` (Python's own error names ``__init__`` and no fix)."""
    if callable(config) and not isinstance(config, BatchProcessorConfig):
        raise TypeError(
            f"BatchProcessor takes a BatchProcessorConfig, got the callable {config!r}: "
            "the model goes to start(process_func), or use @batchproc.batch(...)")
    for name in config_fields:
        if name not in FIELD_NAMES:
            close = _closest(name, (*FIELD_NAMES, "config", "metrics_collector"))
            hint = f" (did you mean {close!r}?)" if close else ""
            raise TypeError(f"BatchProcessor() got an unexpected keyword argument {name!r}"
                            f"{hint}: it takes config (a BatchProcessorConfig) and "
                            "metrics_collector")
    if config_fields:
        fields = ", ".join(f"{name}={value!r}" for name, value in config_fields.items())
        if config is None:
            raise TypeError("BatchProcessor takes a BatchProcessorConfig, not its fields as "
                            f"keywords: BatchProcessor(BatchProcessorConfig({fields}))")
        raise TypeError("BatchProcessor takes a BatchProcessorConfig, not its fields as "
                        "keywords: to change a config's fields, "
                        f"BatchProcessor(dataclasses.replace(config, {fields}))")
    if isinstance(config, dict) and config and all(name in FIELD_NAMES for name in config):
        raise TypeError("BatchProcessor takes a BatchProcessorConfig, got a dict of its "
                        "fields: BatchProcessor(BatchProcessorConfig(**fields))")


class BatchProcessor(Generic[T, U]):
    """Groups requests from many threads into batches for one ``process_func``.

    ``config`` is validated again here (``ValueError`` naming the field for one changed
    into a bad value after it was made; ``TypeError`` for what is not a
    `BatchProcessorConfig`) and the processor keeps its own copy, ``config``, read-only:
    later changes to the object passed in change nothing in the processor. A config's
    fields given here as keywords (``config_fields``) are refused with a ``TypeError``
    showing the call to write: ``BatchProcessor(BatchProcessorConfig(max_batch_size=8))``.

    >>> import numpy as np
    >>> from batchproc import BatchProcessor, BatchProcessorConfig
    >>> with BatchProcessor(BatchProcessorConfig(max_batch_size=64)) as p:
    ...     p.start(lambda batch: batch * 2)
    ...     p.enqueue_predict(np.array([[1.0, 2.0]])).result()
    array([[2., 4.]])
    """

    def __init__(self, config: BatchProcessorConfig | None = None,
                 metrics_collector: object | None = None,
                 # NoReturn: a type checker still refuses every keyword beyond the two above.
                 **config_fields: NoReturn) -> None:
        _refuse_config_in_pieces(config, config_fields)
        # Checked again and copied (the caller's object may have been changed since it
        # was made, and may be changed later); read-only, as everything is built from it.
        config = read_only_copy(BatchProcessorConfig() if config is None else config)
        self._config = config
        self.shutdown_event = threading.Event()
        self._stopped = threading.Event()  # set when stop() has returned
        self._stopping_thread: threading.Thread | None = None
        self._state = _NEW
        self._lifecycle = threading.Lock()
        self._resume = threading.Event()
        self._resume.set()
        self._queue = RequestQueue(config.max_queue_size, config.enable_priority_queue,
                                   config.max_priority_wait)
        self._describer = make_describer(config)
        self._describe = self._describer.describe
        # Every queued request's way out of the queue (futures.cancel_queued).
        self._cancel_queued_ref = weakref.WeakMethod(self._cancel_queued)
        self._intake = Intake(self._queue, self._describer.known_arrays, _RequestFuture,
                              QueuedFuture, self._cancel_queued_ref)
        self._stats = BatchStats(config.monitoring_window)
        self._controller = Controller(config, self._queue)
        self._metrics = MetricsSink(metrics_collector, self)
        self._counts_lock = threading.Lock()
        self._cancelled = 0
        self._rejected = 0
        self._dispatcher = Engine(config, self._queue, self._controller, self._stats,
                                  self._metrics, self._resume, self._count_cancelled)
        self._health = HealthMonitor(
            config, self._controller, self._metrics,
            queue_size=self._queue.__len__,
            stuck_batches=self._dispatcher.stuck_batches,
            stuck_callbacks=self._dispatcher.stuck_callbacks,
            returned_call_began=self._dispatcher.returned_call_began,
            workers=self._dispatcher.alive_workers,
            state=self._lifecycle_state)
        self._async_model: AsyncModel | None = None
        self._process_func: Callable[[Any], Any] | None = None  # as given to start()
        # Set in a forked child of the process that started this processor (forking.py).
        self._forked = False
        self._started_in_pid = 0
        self._supervisor: threading.Thread | None = None
        self._supervisor_stop = threading.Event()
        # Work handed to the supervisor by code that may not take locks (_run_soon).
        self._soon: collections.deque[Callable[[], object]] = collections.deque()
        # enqueue_predict_async: one LoopChannel per event loop (neither holds the loop);
        # the intake keeps the last one used.
        self._channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopChannel] = (
            weakref.WeakKeyDictionary())
        self._channels_lock = threading.Lock()
        self._failure_log = FailureLog()
        self._max_queue_time = config.max_queue_time

    # ----------------------------------------------------------------- lifecycle

    def start(self, process_func: Callable[[Any], Any]) -> None:
        """Start the workers, which call ``process_func`` with each batch. Work queued
        before start is kept.

        Called again while running: with the same function (``==``, so the same bound
        method counts) it does nothing; with another it raises ``RuntimeError``, naming
        both (a processor runs one function for its whole life).

        An ``async def`` ``process_func`` (or an object whose ``__call__`` is one, or a
        ``functools.partial`` of either) runs on an event loop the processor starts here,
        in a thread of its own, and stops in ``stop()`` after the workers (docs/asyncio.md).

        Once running, it is stopped at interpreter exit if ``stop()`` was not called: its
        queued work finishes first, as a ``ThreadPoolExecutor``'s does (see ``stop``).

        Raises ``TypeError`` when ``process_func`` is not callable (``None`` included),
        ``ProcessorStoppedError`` once ``stop()`` was called (a stopped processor is never
        started again: make a new one) or once the interpreter's exit hook has run
        (nothing would stop it), ``ProcessorForkedError`` in a forked child of the
        process that started it. ``RuntimeError`` when the system refuses one of its
        threads (too many threads in the process), naming how many workers started and
        chained to the system's error: start is all or nothing, so the threads it did
        start are stopped and joined first, the processor is stopped as by ``stop()``
        (requests queued before start fail with ``ProcessorStoppedError`` unprocessed)
        and cannot be started again.
        """
        if not callable(process_func):
            raise TypeError(
                "process_func must be a callable taking a batch and returning one result "
                f"per row, got {process_func!r} ({type(process_func).__name__})")
        with self._lifecycle:
            if self._forked:
                raise self._forked_error()
            if self._state == _RUNNING:
                running = self._process_func
                if _same_function(process_func, running):
                    return
                raise RuntimeError(
                    f"this BatchProcessor is already running {running!r}; it cannot be "
                    f"started with {process_func!r} as well (one processor runs one "
                    "function: make another BatchProcessor for it)")
            if self._state != _NEW:
                raise ProcessorStoppedError(
                    "a stopped BatchProcessor cannot be started again; create a new one")
            if exiting.has_run():
                # Nothing would stop it and finish its work (and from CPython 3.12 on, no
                # thread starts now).
                raise ProcessorStoppedError(
                    "the interpreter is exiting (batchproc's exit hook has run): no "
                    "processor starts now")
            self._state = _RUNNING
            self._process_func = process_func
            self._started_in_pid = os.getpid()
            forking.track(self)
            # No worker takes work until every thread started: a start that fails then
            # has run nothing (a pause by the caller stays as it is).
            hold = self._resume.is_set()
            if hold:
                self._queue.pause()
            try:
                self._start_threads(process_func)
            except RuntimeError as exc:
                failure: RuntimeError | None = exc
            else:
                failure = None
                if hold:
                    self._queue.resume()
                shielded.keep_standby()  # for the exit hook, where no thread can start
                exiting.stop_at_exit(self)
        if failure is not None:
            # Atomic: what did start is stopped and joined before the error is raised.
            self._abort_start()
            raise failure
        logger.info("batchproc started: %d workers, strategy %s, max batch %d rows",
                    self.config.max_workers, self._controller.strategy.name,
                    self.config.max_batch_size)

    def _start_threads(self, process_func: Callable[[Any], Any]) -> None:
        """``RuntimeError`` when the system refuses a thread, naming which (chained to
        its error); the threads started until then are left running."""
        if is_async_callable(process_func):
            # The workers call it like any model; it runs the coroutine on the loop.
            async_model = AsyncModel(process_func)
            try:
                async_model.start()
            except Exception as exc:
                async_model.close(_monotonic())  # closes the loop it made
                raise RuntimeError(
                    f"could not start the event loop thread of an async process_func: "
                    f"{exc}") from exc
            self._async_model = process_func = async_model
        self._dispatcher.start(process_func)  # RuntimeError naming the workers it started
        supervisor = threading.Thread(target=self._supervise, name="batchproc-supervisor",
                                      daemon=True)
        try:
            supervisor.start()
        except Exception as exc:
            raise RuntimeError(
                f"could not start the supervisor thread (all {self.config.max_workers} "
                f"workers started): {exc}") from exc
        self._supervisor = supervisor

    def _abort_start(self) -> None:
        """start() could not start every thread: stop at once, without running queued
        work (it fails with ``ProcessorStoppedError``), and join the threads it did start
        (bounded by ``START_ABORT_JOIN``; one stuck in a model call is left)."""
        # Before intake closes (which ends the queue's pause): from here on a pop fails
        # what it takes instead of running it.
        # Nothing ran: a request a pop takes now was never dispatched, and says so.
        self._dispatcher.abandon_all(
            lambda: ProcessorStoppedError(
                "processor stopped before this request was dispatched"))
        with self._lifecycle:
            self._close_intake()
        try:
            self._shut_down(_monotonic(), was_running=True)
            deadline = _monotonic() + START_ABORT_JOIN
            self._dispatcher.join(deadline)
            for thread in self._threads():
                if thread.is_alive():
                    thread.join(max(0.0, deadline - _monotonic()))
        finally:
            with self._lifecycle:
                self._state = _STOPPED
            self._stopped.set()

    def _close_intake(self, deadline: float | None = None) -> None:
        """Begin stopping, holding ``_lifecycle``: refuse new requests, end a pause. A
        request parked for a retry due after ``deadline`` (stop's) is not waited for:
        it could never run in time, and fails as the stop ends."""
        self._state = _STOPPING
        self._stopping_thread = threading.current_thread()
        # Also ends a pause of the queue: stop drains as usual.
        self._queue.close(parked_until=deadline)
        # Workers waiting for a call slot look again: behind a call that overruns they
        # drain at once (no request waits to fill a batch any more), or exit.
        self._controller.slots.wake_all()
        if self._room is not None:
            self._room.close()  # coroutines awaiting room in apredict: refused
        self._resume.set()
        # Last: whoever sees the event must find intake already closed.
        self.shutdown_event.set()
        exiting.forget(self)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop intake, finish queued and in-flight work within ``timeout`` seconds, fail
        what is left with ``ProcessorStoppedError`` and join the threads.

        Idempotent, safe before ``start``; never blocks much past ``timeout``
        (``None`` waits for all work to finish). When it returns, every request accepted
        before it has its outcome: a result, the model's error, or
        ``ProcessorStoppedError``; no call, delivery or retry starts afterwards. Only the
        requests whose results a worker was completing when time ran out (a done-callback
        of one of them still running) are completed by that worker, after stop returns;
        likewise the done-callbacks of requests that expired or timed out before the
        stop, which run on the processor's callbacks thread: stop waits for them as it
        waits for deliveries, and one still blocking leaves the rest to that thread.

        Called on one of the processor's own threads (a done-callback running on a worker
        or the callbacks thread, an ``async def`` model on the event loop), it does the same
        but never waits for that thread: the work it is doing is given up (its other
        requests fail with ``ProcessorStoppedError``), and the thread exits once its
        current callback or call returns. Returns ``None`` in every case.

        While another call is stopping the processor, it waits for that call to return
        (up to ``timeout``); on the processor's own threads, or on that call's thread (a
        done-callback of a request it fails), it returns at once. A ``KeyboardInterrupt``
        (Ctrl-C) during the wait gives up at once on what is left, as when ``timeout``
        runs out, and is then raised, once, however many arrive: on the main thread the
        work runs on a helper thread (``batchproc.shielded``) that interrupts cannot cut
        short. There, a done-callback that blocks (run as stop fails its request) holds
        stop at most ``shielded.GRACE`` (2) seconds past ``timeout`` or past a Ctrl-C;
        the rest of the stop then finishes on that thread, after stop returns.

        A processor still running at interpreter exit is stopped then (an ``atexit``
        hook, ``batchproc.exiting``), within ``exiting.EXIT_TIMEOUT`` (5) seconds for all
        processors together: its queued work is finished, not dropped with its daemon
        threads (a Ctrl-C then gives up on it at once). ``timeout``: ``TypeError`` if
        not ``None`` or a number (a bool included), ``ValueError`` if NaN or negative.
        """
        timeout = timeout_arg(timeout)
        deadline = _INF if timeout is None else _monotonic() + timeout
        shielded.run(functools.partial(self._stop, deadline), name="batchproc-stop",
                     wait_until=deadline)

    def _stop(self, deadline: float, shield: shielded.Shield) -> None:
        """stop()'s work, out of reach of interrupts of its caller: an interrupt of the
        wait (``shield.interrupted``) gives up at once on what is left."""
        with self._lifecycle:
            if self._forked:
                return  # a forked child's copy: its queue and threads are the parent's
            stopping_already = self._state in (_STOPPING, _STOPPED)
            if not stopping_already:
                was_running = self._state == _RUNNING
                self._close_intake(deadline)
        if stopping_already:
            # Another call is stopping: wait for it (within this timeout), except on a
            # thread that call may itself be waiting for, or its own (a done-callback of
            # a request it fails).
            me = threading.current_thread()
            if me is not self._stopping_thread and me not in self._threads():
                while not (self._stopped.is_set() or shield.interrupted):
                    remaining = deadline - _monotonic()
                    if remaining <= 0.0:
                        break
                    self._stopped.wait(min(remaining, INTERRUPT_POLL))
            return
        try:
            self._shut_down(deadline, was_running, shield)
        finally:
            with self._lifecycle:
                self._state = _STOPPED
            self._stopped.set()

    def _shut_down(self, deadline: float, was_running: bool,
                   shield: shielded.Shield | None = None) -> None:
        """stop()'s work once intake is closed: drain until ``deadline`` (or until
        ``shield.interrupted``), give up on what is left, fail it, join the threads."""
        model_loop = self._async_model
        if model_loop is not None and model_loop.thread is threading.current_thread():
            # Called by an async model: the loop every call in flight (and every queued
            # one) needs is this thread, held here, so no call can end while stop waits.
            deadline = _monotonic()
        drained = not was_running or self._drain(deadline, shield)
        if shield is not None and shield.interrupted:
            deadline = _monotonic()  # giving up at once: no more waiting below
        leftover = 0
        if not drained:
            leftover += self._dispatcher.abandon_all(
                lambda: ProcessorStoppedError("processor stopped before this request finished"))
        # No pop starts any more (one would expire entries on its look): what expired is
        # failed as expired, the rest as stopped.
        self._dispatcher.expire_queued(self._queue.take_expired())
        leftover += self._fail_queued()
        if not drained:
            # A pop still waiting for a parked retry (taken just now) ends once woken:
            # close() again wakes every waiter.
            self._queue.close()
            self._dispatcher.wait_for_pops()
        if self._async_model is not None:
            # After the workers: a call still running now was abandoned; cancel it.
            self._async_model.close(deadline)
        self._supervisor_stop.set()
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            # Even when giving up at once: it only waits on its stop event, so it ends
            # at once unless a health check is running.
            supervisor.join(min(max(deadline - _monotonic(), SUPERVISOR_EXIT), 1.0))
        self._run_soon_now()  # what the supervisor had no tick left for
        self._join_callbacks(deadline, shield)
        self._flush_logs(final=True)
        if leftover:
            logger.warning("batchproc stopped: %s failed with ProcessorStoppedError",
                           plural(leftover, "request"))
        else:
            logger.info("batchproc stopped")

    def _join_callbacks(self, deadline: float, shield: shielded.Shield | None) -> None:
        """The done-callbacks the supervisor handed to the callbacks thread run before
        stop returns (those handed over from now on run where they are handed over):
        waited for as the workers' deliveries are, until ``deadline``, and at least
        ``DELIVERY_GRACE`` (a callback in progress when time ran out, or at once on an
        interrupt); one that blocks past that is left to finish, and the thread runs
        the rest after it."""
        callbacks = self._dispatcher.callbacks
        callbacks.close()
        until = max(deadline, _monotonic() + DELIVERY_GRACE)
        while True:
            now = _monotonic()
            if shield is not None and shield.interrupted:
                until = min(until, now + DELIVERY_GRACE)
            if callbacks.join(max(0.0, min(until, now + INTERRUPT_POLL) - now)):
                return
            if callbacks.thread is threading.current_thread() or _monotonic() >= until:
                return

    def _drain(self, deadline: float, shield: shielded.Shield | None) -> bool:
        """Wait until ``deadline`` for the workers to finish the queued work and exit;
        in slices, so that an interrupt of stop's caller ends the wait at once. True if
        they did."""
        while True:
            step = min(deadline, _monotonic() + INTERRUPT_POLL)
            if self._dispatcher.join(step):
                return True
            if _monotonic() < step:
                return False  # not for want of time: the caller is a worker, never joined
            if (shield is not None and shield.interrupted) or step >= deadline:
                return False

    def _fail_queued(self) -> int:
        """Fail what is left in the queue: requests never dispatched, and requests
        parked for a retry after a failed call (their error's cause is that failure)."""
        # The queue's last look: a failed map chunk's items queued after it would never
        # run, so from here on they are not queued at all (Engine.seal).
        self._dispatcher.seal()
        queued = self._queue.drain()
        failed = start_all(queued)  # requests parked for a retry are running already
        if len(failed) != len(queued):
            self._count_cancelled(len(queued) - len(failed))
        never_run = ProcessorStoppedError(
            "processor stopped before this request was dispatched")
        for request in failed:
            if request.attempt:
                error = ProcessorStoppedError(
                    f"processor stopped while this request was waiting to be retried "
                    f"(after {request.attempt} failed "
                    f"{'call' if request.attempt == 1 else 'calls'})")
                error.__cause__ = request.error
            elif request.error is not None:
                error = ProcessorStoppedError(
                    "processor stopped while this request was waiting to run again alone "
                    "(its call ended without its result)")
                error.__cause__ = request.error
            else:
                error = never_run
            request.future.set_exception(error)
        if failed:
            self._stats.record_error(len(failed))
            self._metrics.error(never_run, len(failed))
            if self._metrics.records_requests:
                record_requests(self._metrics, failed, OUTCOME_ERROR, None)
        return len(failed)

    def pause(self) -> None:
        """No batch is dispatched until ``resume()``; intake continues."""
        # Under the lock, as resume() is: the queue's pause and the event change together,
        # so a pause and a resume racing leave it paused or running, never the queue
        # paused while the processor says it runs.
        with self._lifecycle:
            if self._state not in (_STOPPING, _STOPPED) and not self._forked:
                self._resume.clear()
                self._queue.pause()  # waiting workers stop popping, not just dispatching

    def resume(self) -> None:
        """Dispatch again after ``pause()``."""
        with self._lifecycle:
            if self._forked:
                return
            self._queue.resume()
            self._resume.set()
        self._controller.slots.wake_dozer()  # the watch for overdue requests, off while paused

    def __enter__(self) -> BatchProcessor[T, U]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __reduce__(self) -> Any:
        # A copy would share this processor's queue and workers: stopping either would
        # stop both, and neither would own them. (copy.copy, copy.deepcopy and pickle
        # all come here.)
        raise TypeError(
            f"{type(self).__name__} cannot be copied or pickled: it owns a running queue "
            "and worker threads; make another with BatchProcessor(config)")

    # ----------------------------------------------------------------- intake

    def enqueue_predict(self, item: T, timeout: float | None = None,
                        priority: BatchPriority | int = BatchPriority.NORMAL,
                        max_queue_time: float | _ConfigDefault | None = _CONFIG,
                        ) -> Future[U]:
        """Queue ``item`` and return the Future of its result.

        ``timeout`` bounds the wait for room in a full queue (``None`` waits, like
        ``queue.Queue.put``), and so does ``max_queue_time``, which counts from the call;
        then ``QueueFullError``. After stop: ``ProcessorStoppedError``. A refusal, or a
        wait for room a Ctrl-C ends, counts in ``get_stats()["total_rejected"]``.
        ``priority``: a ``BatchPriority``, or any int in [0, 2**31-1] (lower is served
        first, with ``enable_priority_queue``; ``operator.index`` reads it, so a numpy
        integer, or a bool as the int it is, goes too); ``TypeError`` for a float or a
        string, ``ValueError`` outside that range.
        A processing failure reaches the future as the exception ``process_func`` raised.
        ``max_queue_time`` (seconds; default: the config's): if the request is still
        waiting for its call that long after this call, it fails with
        ``QueueTimeoutError`` and is never processed; ``None``: no limit. It takes what
        the config's field takes (any finite real number > 0, numpy's too; ``None``, not
        ``inf``, for no limit): ``ConfigTypeError`` for what is no number (a bool too),
        ``ValueError`` for one out of range.
        In a forked child of the process that started the processor:
        ``ProcessorForkedError`` (a ``ProcessorStoppedError``).
        """
        if self._forked:
            raise self._forked_error()
        if max_queue_time is _CONFIG:
            max_queue_time = self._max_queue_time
        if timeout is None:
            # The common case, in one native call (its wait for room included); None:
            # the rest of this method.
            try:
                future = self._intake.enqueue(item, priority, max_queue_time)
            except BaseException as exc:
                self._count_interrupted_wait(exc)
                raise
            if future is not None:
                return future  # type: ignore[no-any-return]
        else:  # checked as apredict's and stop's are (NaN, bools)
            timeout = timeout_arg(timeout)
        if self._state is _STOPPING or self._state is _STOPPED:
            raise self._refusal_after_stop(timeout)
        future = _RequestFuture()
        now = _monotonic()
        limit = _INF if max_queue_time is None else _queue_time_arg(max_queue_time)
        request, rows, nbytes, key, length = self._describe(item, future, now, priority, limit)
        wait = room_wait(timeout, limit)
        try:
            token = self._queue.push(request, priority, rows, nbytes, key, wait.seconds,
                                     length, request.deadline)
        except (_stdlib_queue.Full, QueueClosed) as exc:
            raise self._refusal(exc, *wait) from None
        except BaseException as exc:
            self._count_interrupted_wait(exc)
            raise
        future._bp_token = token
        future._bp_cancel_queued = self._cancel_queued_ref
        return future

    def enqueue_predict_async(self, item: T,
                              priority: BatchPriority | int = BatchPriority.NORMAL,
                              max_queue_time: float | _ConfigDefault | None = _CONFIG,
                              ) -> asyncio.Future[U]:
        """From a coroutine: queue ``item`` and return an ``asyncio.Future`` of its result
        on the running event loop (``await processor.enqueue_predict_async(x)``).

        Results reach the loop a batch at a time (one wake-up of the loop per batch, not
        per request, as ``asyncio.wrap_future(enqueue_predict(x))`` would cost). It never
        blocks the loop: a full queue raises ``QueueFullError`` at once. After stop:
        ``ProcessorStoppedError``. Cancelling the future (or a task awaiting it) before
        the request is dispatched takes it out of the queue at once, counted in
        ``total_cancelled``; it is never processed. After dispatch its result is
        discarded.
        ``RuntimeError`` if no event loop is running in this thread;
        ``ProcessorForkedError`` in a forked child, as for ``enqueue_predict``.
        ``max_queue_time`` as for ``enqueue_predict``.
        """
        if self._forked:
            raise self._forked_error()
        if max_queue_time is _CONFIG:
            max_queue_time = self._max_queue_time
        # The common case, in one native call; None: the rest of this method.
        future = self._intake.enqueue_async(item, priority, max_queue_time)
        if future is not None:
            return future  # type: ignore[no-any-return]
        try:
            loop = _running_loop()
        except RuntimeError:
            raise RuntimeError(
                "enqueue_predict_async needs a running event loop: await it in a "
                "coroutine; from a thread, call enqueue_predict") from None
        if self._state is _STOPPING or self._state is _STOPPED:
            raise self._refusal_after_stop(0)
        channel = self._channel_for(loop)
        future = QueuedFuture(loop=loop)
        now = _monotonic()
        limit = _INF if max_queue_time is None else _queue_time_arg(max_queue_time)
        request, rows, nbytes, key, length = self._describe(
            item, AsyncRequest(future, channel), now, priority, limit)
        try:
            token = self._queue.push(request, priority, rows, nbytes, key, 0, length,
                                     request.deadline)
        except (_stdlib_queue.Full, QueueClosed) as exc:
            raise self._refusal(exc, 0) from None
        future._bp_token = token
        future._bp_cancel_queued = self._cancel_queued_ref
        return future

    async def apredict(self, item: T, timeout: float | None = None,
                       priority: BatchPriority | int = BatchPriority.NORMAL,
                       max_queue_time: float | _ConfigDefault | None = _CONFIG) -> U:
        """From a coroutine: queue ``item`` and return its result
        (``await processor.apredict(x)``).

        Unlike ``enqueue_predict_async``, a full queue does not refuse: the coroutine
        waits for room without blocking the loop (as ``asyncio.Queue.put`` does), up to
        ``timeout`` seconds (``None``: as long as it takes); then ``QueueFullError``.
        Callers are served in arrival order: one arriving while others wait for room (or
        were handed room they have not taken yet) waits behind them even if the queue has
        room (with ``timeout=0``: ``QueueFullError``). ``enqueue_predict`` (threads) and
        ``enqueue_predict_async`` do not wait in this line. Cancelling the awaiting task
        withdraws a queued request at once (it is never processed); after dispatch its
        result is dropped.
        After stop: ``ProcessorStoppedError``; in a forked child: ``ProcessorForkedError``.
        Results reach the loop a batch at a time, as with ``enqueue_predict_async``.
        ``max_queue_time`` as for ``enqueue_predict``, counted from this call: a wait for
        room counts, and ends by it as by ``timeout`` (``QueueFullError``). A call that
        stops waiting for room (refused, or its task cancelled) counts in
        ``total_rejected``: its request was never accepted. ``timeout``: ``TypeError`` if
        not a number, ``ValueError`` if NaN or negative.
        """
        if self._forked:
            raise self._forked_error()
        if max_queue_time is _CONFIG:
            max_queue_time = self._max_queue_time
        limit = None if max_queue_time is None else _queue_time_arg(max_queue_time)
        return await apredict(self, item, timeout, priority, limit)

    _room: RoomWaiters | None = None

    def _run_soon(self, work: Callable[[], object]) -> None:
        """Have the supervisor run ``work`` at its next tick (at most 0.5 s): for code
        that may run where it must not take locks (a finalizer run by a garbage
        collection). Taking no lock itself (``deque.append`` is atomic), it may be called
        anywhere. ``stop()`` runs what is left when the supervisor has ended; handed
        over after that, ``get_stats()`` runs it (a count), or it is dropped with the
        processor (nothing is queued then)."""
        self._soon.append(work)

    def _run_soon_now(self) -> None:
        """The supervisor runs what ``_run_soon`` handed it."""
        soon = self._soon
        while soon:
            work = soon.popleft()
            try:
                work()
            except Exception:
                logger.exception("batchproc: deferred work failed")

    def _room_waiters(self) -> RoomWaiters:
        """The coroutines awaiting room (apredict); made on first need, after which the
        workers report each batch they pop to it."""
        with self._channels_lock:
            if self._room is None:
                self._room = RoomWaiters(self._queue, defer=self._run_soon)
                self._dispatcher.room = self._room
            return self._room

    def _count_refusal(self) -> None:
        """Count one request refused at enqueue, in ``get_stats()`` and the metrics."""
        with self._counts_lock:
            self._rejected += 1
        self._metrics.rejected(1)

    def _count_interrupted_wait(self, exc: BaseException) -> None:
        """A push raised ``exc``: if an interrupt (Ctrl-C) ended its wait for room, its
        request was never accepted, and is counted as refused, as an ``apredict`` caller
        that stops waiting is (any other exception is the caller's error: counted
        nowhere)."""
        if interrupts(exc):
            self._count_refusal()

    def _refusal(self, exc: BaseException, waited: float | None,
                 by_max_queue_time: bool = False) -> BatchProcessorError:
        """The error a caller gets when the queue refused its request (every path comes
        here: one count for ``get_stats()`` and the metrics collector alike); ``waited``:
        how long it could wait for room, set by its ``max_queue_time`` or its timeout."""
        self._count_refusal()
        if isinstance(exc, QueueClosed):
            return ProcessorStoppedError("processor is stopped; request refused")
        waiting = "" if waited is None else f" for {seconds(waited)}"
        if by_max_queue_time:
            waiting += ": the request's max_queue_time ended its wait for room"
        size = plural(self.config.max_queue_size, "request")
        return QueueFullError(f"queue full ({size}){waiting}")

    def _refusal_after_stop(self, waited: float | None) -> BatchProcessorError:
        """Refuse a request once stop() began, before any work on it (the queue, closed
        by then, would refuse it too). The caller first lets go of the GIL once: callers
        that keep enqueuing after their refusals would otherwise hold it between them,
        and each wait of the stopping threads (stop's, the workers') needs it back."""
        time.sleep(0)
        return self._refusal(QueueClosed(), waited)

    def _channel_for(self, loop: asyncio.AbstractEventLoop) -> LoopChannel:
        """The ``LoopChannel`` of ``loop``, made on first use; the last one used is found
        without the lock."""
        channel: LoopChannel | None = self._intake.last_channel
        if channel is not None and channel.loop_ref() is loop:
            return channel
        with self._channels_lock:
            channel = self._channels.get(loop)
            if channel is None:
                channel = self._channels[loop] = LoopChannel(loop)
            self._intake.use_channel(channel)
        return channel

    def enqueue(self, item: T, timeout: float | None = None,
                priority: BatchPriority | int = BatchPriority.NORMAL,
                max_queue_time: float | _ConfigDefault | None = _CONFIG) -> None:
        """Fire and forget: failures are logged and counted, never raised to the caller.

        A full queue is waited for as by ``enqueue_predict`` (``timeout``: ``None`` waits
        as long as it takes; past it, the request is refused): it blocks, so do not call
        it on an event loop's thread.
        A refused or failed request is logged once, as a warning on the
        ``batchproc.processor`` logger; repeats of one exception type are logged at most
        once per ``FAILURE_LOG_INTERVAL`` (10) seconds, with the number left out. Refusals
        (a full queue, a stopped processor) count in ``get_stats()["total_rejected"]`` as
        from every other path, failures in ``total_errors`` (expired ones in
        ``total_expired``); an item or argument ``enqueue_predict`` would raise for (a
        0-d array, a bad ``max_queue_time``) is only logged. ``max_queue_time`` as for
        ``enqueue_predict``.
        """
        try:
            future = self.enqueue_predict(item, timeout, priority, max_queue_time)
        except Exception as exc:
            self._failure_log("refused", exc)
            return
        future.add_done_callback(self._failure_log.future_done)

    def map(self, items: Iterable[T], *, chunksize: int | None = None,
            buffersize: int | None = None,
            priority: BatchPriority | int = BatchPriority.NORMAL,
            max_queue_time: float | _ConfigDefault | None = _CONFIG,
            return_exceptions: bool = False) -> Iterator[U]:
        """Process every item of ``items`` and return an iterator of their results, in
        order: the result for each item is what ``enqueue_predict(item).result()`` gives
        (docs/bulk.md).

        An item is what ``enqueue_predict`` takes: an array ``(r, ...)`` counts ``r``
        rows (``(1, features)`` for one sample; with ``stack_items=True`` a sample
        ``(features,)``), a tensor likewise, a dict or tuple of them, or any other object.
        Consecutive items of one kind are queued together as one request (a chunk) of
        the processor's target rows (``current_batch_size`` as the chunk opens), at most
        ``chunksize`` (default and maximum: ``max_batch_size``), so a bulk job
        costs no future per item. At most ``buffersize`` such chunks (default
        ``2 * max_workers``) are queued or waiting to be read: ``items`` (any iterable,
        infinite or lazy) is read only as results are consumed. Nothing is read before
        the first ``next()``. Results that are ready are handed out before the window
        is refilled, so a stream slower than the model gets each as its chunk is done;
        a read that goes on for ``batch_timeout`` (at least ``bulk.READ_WAIT_MIN``,
        20 ms) is waiting on a slow source and queues the open chunk with the item that
        came last. While the source keeps a read waiting, nothing is handed out (use
        ``amap`` with an async source for a stream that can go quiet; docs/bulk.md).
        Results are
        handed out a group of chunks at a time: while the oldest chunk is pending, the
        iteration waits for the one half a window after it, at most
        ``bulk.GROUP_WAIT_S`` (2 ms), which saves the model a GIL hand-off per chunk.

        A failing item fails its position only: the chunk holding it is not retried
        whole; its items are queued again one by one as it fails, each retried as the
        config says as it would be alone (a ``stop()`` before the iteration reaches them
        drains them as requests accepted before it). As with
        ``concurrent.futures.Executor.map``, an item's exception is raised when the
        iteration reaches its position, and the iteration ends there; with
        ``return_exceptions=True`` it is yielded in place of the result instead and the
        iteration goes on. Bad input (an item ``enqueue_predict`` would refuse) fails its
        own position the same way. Always raised, ending the iteration, whatever
        ``return_exceptions`` says: ``ProcessorStoppedError`` at the first position not
        finished when the processor stopped, a ``KeyboardInterrupt`` or ``SystemExit``
        of the model's, and an exception of the input iterator after the results of the
        items read before it.

        ``priority`` and ``max_queue_time`` (seconds, counted for each chunk from when it is
        submitted, a wait for room included) as for ``enqueue_predict``. Closing the
        iterator (``close()``, or dropping it) withdraws its queued chunks. In
        ``get_stats()`` a chunk counts as one request and its rows as rows; a chunk whose
        items were queued again one by one counts as those requests instead. Checked at the
        call, as the same arguments are elsewhere: ``chunksize`` and ``buffersize`` are
        integers as in the config (an int or a numpy integer), ``priority`` and
        ``max_queue_time`` as for ``enqueue_predict``. ``TypeError`` for a wrong type (a
        bool or a float where an integer goes, a string), ``ValueError`` for a value out of
        range (a ``chunksize`` outside [1, max_batch_size], a ``buffersize`` below 1, a
        ``priority`` outside [0, 2**31-1]) and for a bad ``max_queue_time``; ``TypeError``
        for ``items`` that is not iterable and a ``return_exceptions`` that is not a bool;
        ``ProcessorForkedError`` in a forked child.
        """
        return bulk.map_results(self, items, self._bulk_settings(
            chunksize, buffersize, priority, max_queue_time, return_exceptions))

    def amap(self, items: Iterable[T] | AsyncIterable[T], *, chunksize: int | None = None,
             buffersize: int | None = None,
             priority: BatchPriority | int = BatchPriority.NORMAL,
             max_queue_time: float | _ConfigDefault | None = _CONFIG,
             return_exceptions: bool = False) -> AsyncIterator[U]:
        """``map`` for asyncio: an async iterator of the results, in order
        (``async for result in processor.amap(items)``).

        ``items`` may be an iterable or an async iterable; an async iterable is read
        in a task of amap's own (one for all its reads), so results are handed out
        while the source is quiet; a plain iterable is read on the event loop, so it
        must not block (make a blocking source an async generator; give items in
        memory as a plain iterable). Nothing blocks the loop: a full queue is waited
        for as ``apredict`` waits, and results reach the loop a batch at a time.
        Everything else as for
        ``map``; cancelling the task that iterates it, or closing it with ``await
        results.aclose()`` (``contextlib.aclosing``), withdraws its queued chunks at once.
        """
        return bulk.amap_results(self, items, self._bulk_settings(
            chunksize, buffersize, priority, max_queue_time, return_exceptions))

    def _bulk_settings(self, chunksize: int | None, buffersize: int | None,
                       priority: BatchPriority | int,
                       max_queue_time: float | _ConfigDefault | None,
                       return_exceptions: bool) -> bulk.Settings:
        if self._forked:
            raise self._forked_error()
        if max_queue_time is _CONFIG:
            max_queue_time = self._max_queue_time
        if max_queue_time is not None:
            max_queue_time = _queue_time_arg(max_queue_time)
        return bulk.Settings(self, chunksize, buffersize, priority, max_queue_time,
                             return_exceptions)

    def _push_accepted(self, requests: list[Request]) -> list[int | BaseException] | None:
        """Queue requests accepted already, each as an arrival of its own: the items of a
        map chunk that failed, queued again one by one as its failure is delivered
        (``bulk.Window.queue_again``). Never waits (a worker or the supervisor calls it),
        may go past ``max_queue_size`` (the items held their place in it as their chunk),
        and is taken while ``stop()`` drains the queue: the chunk was accepted before the
        stop, and so are its items, which the draining workers run or stop fails. None,
        queueing nothing, once stop has taken what was left in the queue for the last
        time (``Engine.seal``): nobody would run them.

        Each item counts as accepted (the queue's ``pushed``) and its chunk no more
        (``Delivery.handed_back``), so ``get_stats()`` stays balanced. Per request: its
        token, or the error that refused it (``QueueFullError``: the queue holds its most,
        2**24 entries, or memory ran out), counted in ``total_rejected``."""
        tokens = self._dispatcher.push_accepted(requests)
        if tokens is not None:
            for k, token in enumerate(tokens):
                if isinstance(token, BaseException):
                    self._count_refusal()
                    tokens[k] = QueueFullError(
                        f"no room to queue this item again after its map chunk failed "
                        f"({type(token).__name__}: the queue holds its most entries, or "
                        f"memory ran out)")
        return tokens

    def _cancel_queued(self, token: int) -> bool:
        if self._queue.cancel(token):
            self._count_cancelled(1)
            if self._room is not None:
                self._room.release(1)
            return True
        return False

    def _count_cancelled(self, count: int) -> None:
        with self._counts_lock:
            self._cancelled += count
        self._metrics.cancelled(count)

    # ----------------------------------------------------------------- control and state

    @property
    def config(self) -> BatchProcessorConfig:
        """This processor's own copy of its settings, taken at construction; read-only.

        Assigning a field raises ``dataclasses.FrozenInstanceError`` (an
        ``AttributeError``): the queue, workers and controller were built from it. Change
        the target batch size with `update_batch_size`; for other settings make a new
        processor from ``dataclasses.replace(processor.config, ...)``, an ordinary config.
        Assigning the whole config raises the same error.
        """
        return self._config

    @config.setter
    def config(self, value: object) -> None:
        raise dataclasses.FrozenInstanceError(
            "cannot replace a BatchProcessor's config: it is fixed when the processor is "
            "made (its queue, workers and controller were built from it). Use "
            "processor.update_batch_size(n) to change the target batch size, or make a new "
            "processor from dataclasses.replace(processor.config, ...)")

    def update_batch_size(self, new_size: int) -> None:
        """Set the target rows per batch, clamped into [min_batch_size, max_batch_size].

        ``new_size`` is any integer (numpy's too; ``TypeError`` for anything else, a
        ``bool`` included); one outside the range is clamped, not refused. The target
        applies to the next batch a worker takes: a worker already waiting for requests,
        or for a batch to fill, plans its batch again (a batch already taken runs as it
        is). With ``FIXED`` (or ``enable_adaptive_batching=False``) the target then
        stays until the next call; ``ADAPTIVE`` and ``GREEDY`` start from it and move it
        again as they measure (a backed-up queue doubles it at once)."""
        self._controller.set_batch_size(new_size)

    @property
    def current_batch_size(self) -> int:
        """The target rows per batch, as the controller (or ``update_batch_size``) set it."""
        return self._controller.current_batch_size

    @property
    def _current_batch_size(self) -> int:
        return self._controller.current_batch_size

    @property
    def running(self) -> bool:
        """Started and not stopped (False in a forked child: see ``ProcessorForkedError``)."""
        return self._state == _RUNNING and not self._forked

    @property
    def is_paused(self) -> bool:
        """Paused by ``pause()`` and not yet resumed."""
        return not self._resume.is_set()

    def get_stats(self) -> dict[str, Any]:
        """Statistics of recent batches and the processor's state; times in seconds.

        Keys: ``avg_processing_time``, ``avg_batch_size`` (rows), ``avg_queue_time``,
        ``avg_latency``, ``p50_latency``, ``p95_latency``, ``p99_latency`` and
        ``max_latency`` (from enqueue to result, over the last ``monitoring_window``
        requests), ``throughput`` (requests per second), ``error_rate`` (of
        ``total_processed`` and ``total_errors``, below), ``total_batches`` (model
        calls whose results were delivered),
        ``avg_queue_length``, ``uptime``; and the processor's own:
        ``current_batch_size`` (target rows), ``system_load`` (batches in progress /
        ``max_workers``), ``active_batches``, ``queue_size`` (requests), ``queued_rows``,
        ``is_paused``, ``is_stopping``, ``is_running``, ``strategy``, ``memory_level``;
        and the counts of requests by
        outcome, from start (docs/services.md, "Counts of requests"):
        ``total_accepted`` (queued by any path), ``total_processed`` (a result),
        ``total_errors`` (failed after acceptance: the model's exception, a bad output,
        ``stop()``, and ``total_timed_out``), ``total_timed_out`` (their call ran past
        ``item_timeout``: ``BatchTimeoutError``), ``total_expired`` (``max_queue_time``
        ran out before their call: ``QueueTimeoutError``; not in ``total_errors``),
        ``total_cancelled`` (by their callers, before dispatch), ``total_rejected``
        (refused at enqueue, by any path, because the queue was full or the processor
        stopped; never accepted); and ``total_batch_only_failures``: batches that failed
        whole while each of their requests then succeeded on a smaller batch
        (``process_func`` fails on batches, not on these inputs: an output of the wrong
        rows, out of memory on the batch's size; or a failure that did not recur, at
        random; each halves the target and costs a search of calls, docs/failures.md).

        ``ProcessorForkedError`` in a forked child: the statistics are the parent's.
        """
        if self._forked:
            raise self._forked_error()
        if self._state is _STOPPED:
            # No supervisor any more: what a garbage collection handed it since (a
            # caller's count) is run here, on the caller's thread.
            self._run_soon_now()
        # Read in the order a request moves (the outcomes, then the queue, then the
        # arrivals), so that while requests flow no snapshot counts more of them ended
        # or queued than accepted: total_accepted >= the outcomes + queue_size, always.
        stats = self._stats.get_stats()
        dispatcher = self._dispatcher
        expired, timed_out = dispatcher.expired, dispatcher.timed_out
        with self._counts_lock:
            cancelled, rejected = self._cancelled, self._rejected
        queue = self._queue
        queue_size, queued_rows = len(queue), queue.rows
        active = dispatcher.active_batches()
        # The native queue counts arrivals already. A map chunk whose items were queued
        # again one by one is counted as those items, not as a request of its own
        # (read first: the items are pushed before the chunk is counted as handed back).
        handed_back = dispatcher.handed_back
        accepted = queue.pushed - handed_back
        stats.update(
            current_batch_size=self._controller.current_batch_size,
            system_load=min(1.0, active / self.config.max_workers),
            active_batches=active,
            queue_size=queue_size,
            queued_rows=queued_rows,
            is_paused=self.is_paused,
            is_stopping=self._state in (_STOPPING, _STOPPED),
            is_running=self._state == _RUNNING,
            total_accepted=accepted,
            total_cancelled=cancelled,
            total_rejected=rejected,
            total_expired=expired,
            total_timed_out=timed_out,
            total_batch_only_failures=dispatcher.batch_only_failures,
            strategy=self._controller.strategy.name,
            memory_level=self._controller.memory_level,
        )
        return stats

    def health(self) -> dict[str, Any]:
        """A health report for a health endpoint or a Kubernetes probe.

        Keys: ``ready`` (bool: serve traffic to this process: running, not paused, live,
        and no check critical), ``live`` (bool: False only when the processor cannot
        recover in this process: a forked child's copy, workers missing, or as many
        batches stuck past ``item_timeout`` as ``max_workers`` and no call begun after
        the newest of them returned; fewer stuck are a warning), ``state`` (new, running,
        paused, stopping, stopped, forked), ``status`` (healthy, degraded, unhealthy:
        the worst check; unhealthy whenever the processor is not started or stopped,
        at least degraded while paused), ``timestamp`` (Unix seconds) and ``checks``:
        each check's ``status`` (ok, warning, critical, unknown) and ``value``: memory
        (percent of the container's memory limit, cgroup v2 or v1, where there is one;
        else of the machine's memory), queue (requests), stuck_batches (batches whose
        call, or whose delivery: its futures' done-callbacks, runs past
        ``item_timeout``; and the callbacks thread, running the done-callbacks of
        requests that expired or timed out, past it: a warning only), workers.
        See docs/services.md, "Health endpoints".
        """
        return self._health.check()

    def _lifecycle_state(self) -> str:
        if self._forked:
            return FORKED
        state = self._state
        if state == _RUNNING and not self._resume.is_set():
            return PAUSED
        return state

    # ----------------------------------------------------------------- fork

    def _forked_in_child(self) -> None:
        """In a forked child (forking.py), with only the forking thread alive: refuse
        from now on. Locks a vanished thread may have held are replaced; the queue and
        the workers' state are the parent's and are never touched again here."""
        self._forked = True
        self._lifecycle = threading.Lock()
        self._counts_lock = threading.Lock()
        self._failure_log = FailureLog()
        self._dispatcher.callbacks.forked_in_child()  # its thread is the parent's

    def _forked_error(self) -> ProcessorForkedError:
        return ProcessorForkedError(
            f"this BatchProcessor was started in process {self._started_in_pid} and this "
            f"process ({os.getpid()}) is a fork of it: its worker threads did not survive "
            "the fork. Create and start a BatchProcessor in this process instead (for "
            "gunicorn --preload: in a post_fork hook, or on first use)")

    # ----------------------------------------------------------------- supervisor

    def _supervise(self) -> None:
        """Fail requests whose max_queue_time ran out as soon as it does (the queue wakes
        this thread then); enforce item_timeout at a fine tick; take back room handed to
        ``apredict`` waiters whose loop stopped since (``RoomWaiters.reclaim``) and drop
        results posted to loops closed since; run health checks at their interval."""
        cfg = self.config
        # Fine enough for item_timeout and for health checks due every interval.
        tick = max(min(cfg.item_timeout / 10.0, cfg.health_check_interval, 0.5), 0.005)
        next_health = _monotonic() + cfg.health_check_interval
        queue = self._queue
        stop = self._supervisor_stop
        while not stop.is_set():
            try:
                if queue.closed:  # take_expired would not wait any more
                    if stop.wait(tick):
                        break
                else:
                    expired = queue.take_expired(tick)
                    if expired:
                        # Their done-callbacks run on the callbacks thread, as those
                        # of the calls expire_stuck abandons: none holds a time limit.
                        self._dispatcher.expire_queued(expired, aside=True)
                room = self._room
                if room is not None:
                    room.reclaim()
                self._drop_closed_loops()
                self._run_soon_now()
                checked_at = _monotonic()
                self._dispatcher.expire_stuck()
                self._dispatcher.fill_vacancies()
                self._flush_logs()
                if self._async_model is not None:
                    # Every call that began before checked_at - item_timeout was abandoned
                    # just now (or before): cancel its coroutine.
                    self._async_model.cancel_started_before(
                        checked_at - cfg.item_timeout, cfg.item_timeout)
                now = _monotonic()
                if cfg.enable_health_monitoring and now >= next_health:
                    # On the interval's own grid: a check found due up to a tick late
                    # does not put the next one later (after a longer stall, no burst).
                    next_health += cfg.health_check_interval
                    if next_health <= now:
                        next_health = now + cfg.health_check_interval
                    self._health.check_and_act()
            except Exception:
                logger.exception("supervisor check failed; will retry")

    def _drop_closed_loops(self) -> None:
        """Results posted to a loop that closed before it ran their flush stay in its
        channel, and hold the loop (through their futures) as the value of the loop's
        own weak key: drop them (``LoopChannel.drop_if_closed``), so the loop can go."""
        if not self._channels:
            return
        with self._channels_lock:
            channels = list(self._channels.values())
        for channel in channels:
            channel.drop_if_closed()

    def _flush_logs(self, final: bool = False) -> None:
        """Summaries of the log lines held back by their limits (``log_limits``): at each
        tick those of kinds gone quiet for an interval, at stop all."""
        self._failure_log.flush(final)
        self._dispatcher.flush_logs(final)

    def _threads(self) -> list[threading.Thread]:
        threads = self._dispatcher.threads()
        if self._supervisor is not None:
            threads.append(self._supervisor)
        callbacks = self._dispatcher.callbacks.thread
        if callbacks is not None:
            threads.append(callbacks)
        if self._async_model is not None:
            threads.append(self._async_model.thread)
        return threads


def _same_function(a: Callable[[Any], Any], b: Callable[[Any], Any] | None) -> bool:
    """Whether ``start(a)`` asks for what ``start(b)`` started: the same object, or an
    equal one (``obj.method`` makes a new bound method on each access)."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # an __eq__ that refuses the comparison: not the same
        return False


def _queue_time_arg(value: Any) -> float:
    """A call's own ``max_queue_time`` (not None), read as the config's field is: any
    real number of seconds > 0 (numpy's, ``Fraction``, ``Decimal``); ``ConfigTypeError``
    (a ``TypeError`` and a ``ValueError``) for what is no number, ``ValueError`` for one
    out of range."""
    return require_number("max_queue_time", value, minimum=0.0, allow_zero=False,
                           unlimited="no limit")


class FailureLog:
    """Logs what ``enqueue`` (fire and forget) refused or saw fail, where nobody else will
    see it: the first failure of each exception type at once, then at most one line per
    ``interval`` seconds for that type, saying how many were left out since the last line.

    A model failing on every request then costs one log line per interval, not one per
    request. Thread-safe: ``future_done`` runs on the processor's worker threads.
    """

    def __init__(self, interval: float = FAILURE_LOG_INTERVAL,
                 clock: Callable[[], float] = _monotonic) -> None:
        self.interval = interval
        self._limiter: LogLimiter[tuple[str, type[BaseException]]] = LogLimiter(interval, clock)

    def __call__(self, what: str, exc: BaseException) -> None:
        admitted = self._limiter.admit((what, type(exc)))
        if admitted is None:
            return
        if admitted.left_out:
            logger.warning("enqueue: request %s: %r (and %s more %s in the last %.0f s)",
                           what, exc, f"{admitted.left_out:,}", type(exc).__name__,
                           admitted.since)
        else:
            logger.warning("enqueue: request %s: %r", what, exc)

    def flush(self, final: bool = False) -> None:
        """Log what was left out for each exception type none of which has come for an
        interval (``LogLimiter.held``; at stop, ``final``: all of it)."""
        for (what, kind), held in self._limiter.held(final):
            logger.warning("enqueue: %s %s with %s in the last %s",
                           plural(held.left_out, "more request"), what, kind.__name__,
                           seconds(held.since))

    def future_done(self, future: Future[Any]) -> None:
        if not future.cancelled():
            exc = future.exception()
            if exc is not None:
                self("failed", exc)

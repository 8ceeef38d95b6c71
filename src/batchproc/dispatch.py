"""Workers: pop a batch, run ``process_func`` on it, hand each caller its part.

Each of the ``max_workers`` worker threads runs the whole dispatch loop itself (no hand-off
to a pool, so no extra thread wake-up per batch): ask the controller for a plan, pop a
batch from the native queue (waiting without the GIL), have the requests' format build it
(in the worker's reused buffers), call ``process_func``, have the format check and split
the output, then count and deliver. Everything that depends on the kind of data is the
format's (``formats/``); this module never looks at items or outputs. An idle worker blocked in the
queue is woken by the push itself, which is what keeps latency low at low load.

Failure handling (docs/failures.md): a failing batch of several requests is
bisected; a failing single request is retried ``max_retries`` times after
``retry_delay * 2**k``; a call running past ``item_timeout`` is abandoned by the
supervisor (``expire_stuck``), its requests fail with ``BatchTimeoutError`` and a fresh
worker takes its place; its late result is discarded.

Exactly-once: a batch's futures are completed either by its worker or, after it was
abandoned (time-out or stop), by whoever abandoned it, never both. The hand-over is the
``_Batch`` flags ``abandoned`` and ``delivering``, changed only under ``Dispatcher._lock``.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from typing import Any

from ._native.future_state import Request, enqueued_of, total_rows
from .config import BatchProcessorConfig
from .controller import Controller
from .errors import BatchTimeoutError, ProcessorStoppedError
from .formats import Limits, Workspace
from .futures import finish_all, start_all
from .metrics import OUTCOME_ERROR, OUTCOME_OK, OUTCOME_TIMEOUT, MetricsSink
from .stats import BatchStats

logger = logging.getLogger(__name__)

_monotonic = time.monotonic

# How long a blocked pop waits before the worker looks at its own state again. Pushes,
# close() and pause changes do not need it; it only bounds how long an abandoned or
# surplus worker can linger.
_POP_POLL = 1.0

# How long a worker that finished its call steps off the GIL for another one starting its
# call (see _deliver): any sleep, rounded up by the kernel's timer slack.
_HAND_OVER_S = 1e-6

# Results of one process_func attempt.
_OK, _FAILED, _ABANDONED = 0, 1, 2


class _Worker:
    __slots__ = ("abandoned", "name", "thread")

    def __init__(self, name: str) -> None:
        self.name = name
        self.abandoned = False
        self.thread: threading.Thread | None = None


class _Batch:
    """The requests one worker popped together, while that worker holds them."""

    __slots__ = ("abandoned", "call_started", "delivering", "dispatched_at", "holds_slot",
                 "in_flight", "requests", "worker")

    def __init__(self, requests: list[Request], worker: _Worker) -> None:
        self.requests = requests
        self.worker = worker
        self.dispatched_at = _monotonic()
        self.call_started: float | None = None  # set while process_func runs
        self.abandoned = False
        self.delivering = False
        self.holds_slot = True  # one of the controller's CallSlots, until the call is done
        self.in_flight = False  # counted in the queue's in_flight until delivered


class Dispatcher:
    # Told how many requests each pop took out of the queue, once something awaits room in
    # it (backpressure.RoomWaiters); until then the workers pay one attribute read.
    room: Any = None

    def __init__(
        self,
        config: BatchProcessorConfig,
        queue: Any,
        controller: Controller,
        stats: BatchStats,
        metrics: MetricsSink,
        resume: threading.Event,
        count_cancelled: Callable[[int], None],
    ) -> None:
        self._config = config
        self._queue = queue
        self._controller = controller
        self._stats = stats
        self._metrics = metrics
        self._resume = resume
        self._slots = controller.slots
        self._count_cancelled = count_cancelled
        self._process_func: Callable[[Any], Any] | None = None
        self._byte_cap = config.max_batch_bytes
        self._token_cap = config.max_batch_tokens or 0
        self._limits = Limits(config.max_batch_size, self._byte_cap, self._token_cap)
        self._lock = threading.Lock()
        self._active: set[_Batch] = set()
        self._workers: list[_Worker] = []
        self._worker_ids = 0
        self._closing = False
        # Workers between entering pop_batch and registering what they popped in _active:
        # abandon_all waits for them, so no popped request escapes stop(). _settled is
        # notified when such a pop ends and when a delivery ends (abandon_all waits for
        # both).
        self._popping = 0
        self._settled = threading.Condition(self._lock)
        # Set when stop gives up on in-flight work: waits on the event (backoff, pacing)
        # end at once, and every pop reads the flag under _lock.
        self._abandon_all = threading.Event()
        self._gave_up = False
        self._pace_lock = threading.Lock()
        self._next_start = 0.0
        self._last_gc = 0.0

    # ----------------------------------------------------------------- lifecycle

    def start(self, process_func: Callable[[Any], Any]) -> None:
        self._process_func = process_func
        for _ in range(self._config.max_workers):
            self._spawn_worker()

    def _spawn_worker(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._worker_ids += 1
            worker = _Worker(f"batchproc-worker-{self._worker_ids}")
            # Daemon: a worker stuck in process_func must never keep the interpreter alive.
            thread = threading.Thread(target=self._worker_main, args=(worker,),
                                      name=worker.name, daemon=True)
            # Started under the lock: join() (stop) must never see a thread it cannot join
            # yet (the supervisor replacing a stuck worker while stop() began).
            thread.start()
            worker.thread = thread
            self._workers.append(worker)

    def join(self, deadline: float) -> bool:
        """Wait until ``deadline`` for the workers to drain the closed queue and exit."""
        with self._lock:
            self._closing = True
            workers = list(self._workers)
        for worker in workers:
            if worker.thread is not None:
                remaining = deadline - _monotonic()
                worker.thread.join(None if remaining == float("inf") else max(0.0, remaining))
        return not any(w.thread is not None and w.thread.is_alive() and not w.abandoned
                       for w in workers)

    def abandon_all(self, error_factory: Callable[[], BaseException]) -> int:
        """Fail every request still held by a worker (stop ran out of time)."""
        with self._lock:
            self._closing = True
            # The queue is closed, so a worker inside pop_batch returns at once: wait for
            # it to register what it popped (bounded, should a pop be stuck somehow).
            wait_until = _monotonic() + 0.2
            while self._popping and _monotonic() < wait_until:
                self._settled.wait(max(0.0, wait_until - _monotonic()))
            # Under the lock: _register sees it, or its batch is taken here.
            self._gave_up = True
            self._abandon_all.set()
            taken = [b for b in self._active if not b.abandoned and not b.delivering]
            for batch in taken:
                batch.abandoned = True
                batch.worker.abandoned = True
            # Batches being delivered belong to their workers, which are completing their
            # futures right now: let them finish (same bounded grace), so that no future
            # is still pending when stop() returns.
            while (any(b.delivering for b in self._active)
                   and _monotonic() < wait_until):
                self._settled.wait(max(0.0, wait_until - _monotonic()))
        failed = 0
        for batch in taken:
            self._release_slot(batch)
            self._end_in_flight(batch)
            failed += self._fail_pending(batch.requests, error_factory(), OUTCOME_ERROR,
                                         batch.dispatched_at)
        return failed

    def alive_workers(self) -> tuple[int, int]:
        with self._lock:
            alive = sum(1 for w in self._workers
                        if not w.abandoned and w.thread is not None and w.thread.is_alive())
        return alive, (0 if self._closing or self._process_func is None
                       else self._config.max_workers)

    def active_batches(self) -> int:
        with self._lock:
            return sum(1 for b in self._active if not b.abandoned)

    def threads(self) -> list[threading.Thread]:
        with self._lock:
            return [w.thread for w in self._workers if w.thread is not None]

    # ----------------------------------------------------------------- time limits

    def expire_stuck(self) -> int:
        """Abandon batches whose process_func call has run past ``item_timeout``."""
        limit = self._config.item_timeout
        now = _monotonic()
        with self._lock:
            overdue = [b for b in self._active
                       if not b.abandoned and not b.delivering and b.call_started is not None
                       and now - b.call_started > limit]
            for batch in overdue:
                batch.abandoned = True
                batch.worker.abandoned = True
        for batch in overdue:
            self._release_slot(batch)
            self._end_in_flight(batch)
            started = batch.call_started or now
            logger.error(
                "process_func ran %.3f s on a batch of %d requests, past item_timeout=%.3f s;"
                " failing them with BatchTimeoutError and replacing worker %s",
                now - started, len(batch.requests), limit, batch.worker.name)
            self._metrics.batch(len(batch.requests), total_rows(batch.requests),
                                0.0, now - started, OUTCOME_TIMEOUT)
            self._fail_pending(
                batch.requests,
                BatchTimeoutError(f"process_func exceeded item_timeout={limit} s"),
                OUTCOME_TIMEOUT, batch.dispatched_at)
            self._spawn_worker()
        return len(overdue)

    def stuck_batches(self) -> list[dict[str, Any]]:
        """Batches whose call is past ``item_timeout``, abandoned or about to be."""
        limit = self._config.item_timeout
        now = _monotonic()
        with self._lock:
            return [{"worker": b.worker.name, "requests": len(b.requests),
                     "running_for": now - b.call_started, "abandoned": b.abandoned}
                    for b in self._active
                    if b.call_started is not None and now - b.call_started > limit]

    # ----------------------------------------------------------------- the loop

    def _worker_main(self, worker: _Worker) -> None:
        workspace = Workspace()
        queue = self._queue
        controller = self._controller
        resume = self._resume
        byte_cap = self._byte_cap
        token_cap = self._token_cap
        slots = self._slots
        try:
            while not worker.abandoned:
                # A worker pops only once it may also run the batch: the others wait here
                # instead of each taking a few requests to queue them at a busy model.
                if not slots.acquire(_POP_POLL):
                    if queue.closed and not len(queue):
                        return
                    continue
                try:
                    plan = controller.plan(queue.rows)
                    with self._lock:
                        # Once stop() has given up on in-flight work it fails what is
                        # still queued itself: a pop now would race it for those requests
                        # (they could still be pending when stop() returns).
                        gave_up = self._gave_up
                        if not gave_up:
                            self._popping += 1
                    if gave_up:
                        slots.release(wake=True)
                        return
                    try:
                        requests = queue.pop_batch(
                            plan.target_rows, byte_cap, max_tokens=token_cap,
                            fill_rows=plan.target_rows,
                            max_wait=plan.max_wait, idle_gap=plan.idle_gap, timeout=_POP_POLL)
                    except BaseException:
                        self._register([], worker)  # only to end the pop
                        raise
                    batch = self._register(requests, worker)
                except BaseException:
                    slots.release()
                    raise
                if not requests:
                    slots.release(wake=queue.closed)
                    if queue.closed:
                        return  # closed and drained
                    continue
                room = self.room
                if room is not None:
                    room.release(len(requests))
                if batch is None:
                    continue  # all cancelled, or failed because stop() gave up
                if queue.paused:
                    # Popped just as pause began (the queue holds pops while paused):
                    # hold the batch until resume; stop resumes. (pause() clears the
                    # event before it pauses the queue, resume() sets it after.)
                    resume.wait()
                self._dispatch(batch, workspace, plan.target_rows)
        except BaseException:
            # Only a bug in batchproc itself gets here: make it loud, and keep serving.
            logger.critical("worker %s crashed; starting a replacement", worker.name,
                            exc_info=True)
            worker.abandoned = True
            self._spawn_worker()

    def _register(self, requests: list[Request], worker: _Worker) -> _Batch | None:
        """End a pop: make what it took an in-flight batch at once, so that stop() always
        sees popped requests (in the queue, or in _active), never between the two."""
        # From here on a request can no longer be cancelled; one already cancelled (or
        # completed by its caller, which the Future API allows) is dropped unprocessed
        # and counted as cancelled.
        live = start_all(requests)
        batch = _Batch(live, worker) if live else None
        with self._lock:
            self._popping -= 1
            if self._closing and not self._popping:
                self._settled.notify_all()  # abandon_all may be waiting for this pop
            late = self._gave_up
            if batch is not None and not late:
                self._active.add(batch)
        if len(live) != len(requests):
            self._count_cancelled(len(requests) - len(live))
            if not live:
                self._slots.release(wake=self._others_needed())
                return None
        if batch is not None and late:
            # stop() gave up on in-flight work (only after its grace for pops).
            self._release_slot(batch)
            self._fail_pending(live, ProcessorStoppedError(
                "processor stopped before this request finished"), OUTCOME_ERROR,
                batch.dispatched_at)
            return None
        return batch

    def _dispatch(self, batch: _Batch, workspace: Workspace, target: int) -> None:
        live = batch.requests
        if self._config.min_batch_interval > 0.0:
            self._pace()  # in _active meanwhile: stop() can fail it; _attempt then skips it
        batch.dispatched_at = _monotonic()
        # The next pop keeps filling until this batch is delivered (see RequestQueue).
        batch.in_flight = True
        self._queue.begin_batch()
        try:
            # A request too large for one batch (it was popped alone) runs in chunks.
            chunks = live[0].format.chunks(live[0], self._limits) if len(live) == 1 else None
            if chunks is not None:
                self._run_chunked(batch, live[0], chunks, workspace)
            else:
                self._run(batch, live, workspace, target)
        except BaseException as exc:  # a BaseException from process_func, or our own bug
            logger.exception("batch of %d requests failed outside the retry logic", len(live))
            self._fail(batch, live, exc)
        finally:
            self._finish(batch)
        cfg = self._config
        if cfg.enable_memory_optimization and len(live) >= cfg.gc_batch_threshold:
            self._collect_young()

    def _finish(self, batch: _Batch) -> None:
        """The worker is done with the batch: whatever it still holds, it gives back (one
        lock round for the three; this runs once per batch)."""
        with self._lock:
            self._active.discard(batch)
            in_flight, batch.in_flight = batch.in_flight, False
            holds_slot, batch.holds_slot = batch.holds_slot, False
        if in_flight:
            self._queue.end_batch()
        if holds_slot:
            self._slots.release(wake=self._others_needed())

    def _release_slot(self, batch: _Batch) -> None:
        """Let another batch start while this worker cannot: it was abandoned (a stuck
        call must not hold its slot) or it is backing off before a retry."""
        with self._lock:
            if not batch.holds_slot:
                return
            batch.holds_slot = False
        self._slots.release()

    def _others_needed(self) -> bool:
        """Should a slot this worker gives back wake another worker? Only for requests
        already waiting: this one goes back to popping right after."""
        queue = self._queue
        return len(queue) > 0 or queue.closed

    def _end_in_flight(self, batch: _Batch) -> None:
        with self._lock:
            if not batch.in_flight:
                return
            batch.in_flight = False
        self._queue.end_batch()

    def _pace(self) -> None:
        """Keep batch starts at least ``min_batch_interval`` apart, across workers."""
        with self._pace_lock:
            now = _monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self._config.min_batch_interval
        if start > now:
            self._abandon_all.wait(start - now)  # stop() giving up ends the wait

    def _collect_young(self) -> None:
        # Large batches leave many temporaries; a young-generation collection frees them
        # in microseconds (a full collection would stall this worker for milliseconds).
        # At most ten a second, whatever the batch rate.
        now = _monotonic()
        if now - self._last_gc >= 0.1:
            self._last_gc = now
            gc.collect(0)

    # ----------------------------------------------------------------- one batch

    def _attempt(self, batch: _Batch, requests: list[Request], workspace: Workspace,
                 ) -> tuple[int, Any, float, int]:
        """Build, call, check and split once: (status, each request's part or the error,
        seconds, rows)."""
        if batch.abandoned:
            return _ABANDONED, None, 0.0, 0
        fmt = requests[0].format
        try:
            built = fmt.build(requests, workspace)
        except Exception as exc:
            return _FAILED, exc, 0.0, total_rows(requests)
        rows = built.rows
        started = _monotonic()
        batch.call_started = started
        try:
            out = self._process_func(built.inputs)  # type: ignore[misc]
            status = _OK
        except BaseException as exc:
            out, status = exc, _FAILED
        finally:
            elapsed = _monotonic() - started
            batch.call_started = None
        with self._lock:
            if batch.abandoned:
                return _ABANDONED, None, elapsed, rows
        if status == _OK:
            try:
                out = fmt.split(out, requests, built)
            except Exception as exc:
                out, status = exc, _FAILED
        return status, out, elapsed, rows

    def _run(self, batch: _Batch, requests: list[Request], workspace: Workspace,
             target: int) -> None:
        status, out, elapsed, rows = self._attempt(batch, requests, workspace)
        if status == _OK:
            self._deliver(batch, requests, out, elapsed, rows, target)
            return
        if status == _ABANDONED:
            return
        self._metrics.batch(len(requests), rows,
                            _queue_time(batch, enqueued_of(requests)), elapsed,
                            OUTCOME_ERROR)
        self._controller.observe_failure()
        if not isinstance(out, Exception):
            # KeyboardInterrupt-like: not retried, but never lost: the batch fails with it.
            logger.error("process_func raised %r; failing its %d requests without retry",
                         out, len(requests))
            self._fail(batch, requests, out)
            return
        if len(requests) > 1:
            # Bisect: the good halves still succeed, only the guilty requests fail.
            if self._config.debug_mode:
                logger.debug("batch of %d failed (%r): bisecting", len(requests), out)
            mid = len(requests) // 2
            self._run(batch, requests[:mid], workspace, target)
            self._run(batch, requests[mid:], workspace, target)
            return
        self._retry_single(batch, requests, workspace, out, target)

    def _retry_single(self, batch: _Batch, requests: list[Request], workspace: Workspace,
                      error: BaseException, target: int) -> None:
        cfg = self._config
        for attempt in range(cfg.max_retries):
            delay = cfg.retry_delay * 2 ** attempt
            if delay > 0.0:
                self._release_slot(batch)  # never hold up other batches while backing off
                self._abandon_all.wait(delay)
            if batch.abandoned:
                return
            status, out, elapsed, rows = self._attempt(batch, requests, workspace)
            if status == _OK:
                self._deliver(batch, requests, out, elapsed, rows, target)
                return
            if status == _ABANDONED:
                return
            error = out
            if not isinstance(error, Exception):
                break
        # Debug only: the caller gets the error (enqueue logs it for fire and forget).
        logger.debug("request failed after %d retries: %r", cfg.max_retries, error)
        self._fail(batch, requests, error)

    def _run_chunked(self, batch: _Batch, request: Request, chunks: list[Request],
                     workspace: Workspace) -> None:
        """One item larger than a batch: run it in chunks that fit, join the results."""
        cfg = self._config
        parts: list[Any] = []
        total_elapsed = 0.0
        for chunk in chunks:
            status, out, elapsed, _ = self._attempt(batch, [chunk], workspace)
            attempt = 0
            while status == _FAILED and isinstance(out, Exception) and attempt < cfg.max_retries:
                self._controller.observe_failure()
                self._abandon_all.wait(cfg.retry_delay * 2 ** attempt)
                attempt += 1
                status, out, elapsed, _ = self._attempt(batch, [chunk], workspace)
            if status == _ABANDONED:
                return
            if status == _FAILED:
                if isinstance(out, Exception):
                    logger.debug("request of %d rows failed on a chunk after %d retries: %r",
                                 request.rows, cfg.max_retries, out)
                else:
                    logger.error("process_func raised %r on a chunk of a %d-row request; "
                                 "failing it without retry", out, request.rows)
                self._fail(batch, [request], out)
                return
            parts.append(out[0])
            total_elapsed += elapsed
        try:
            joined = request.format.join(parts)
        except Exception as exc:
            self._fail(batch, [request], exc)
            return
        self._deliver(batch, [request], [joined], total_elapsed, request.rows,
                      cfg.max_batch_size)

    # ----------------------------------------------------------------- completion

    def _deliver(self, batch: _Batch, requests: list[Request], parts: list[Any],
                 elapsed: float, rows: int, target: int) -> None:
        with self._lock:
            if batch.abandoned:
                return
            batch.delivering = True
            holds_slot, batch.holds_slot = batch.holds_slot, False
            next_call_waits = len(self._active) > 1 and any(
                b.call_started is not None for b in self._active if b is not batch)
        if holds_slot:
            # The model is free: the next batch may start while this one is delivered.
            self._slots.release(wake=self._others_needed())
        if next_call_waits:
            # Another worker is inside process_func, and the model this batch just left
            # is now its to start, but starting takes the GIL, which this thread would
            # hold through the whole delivery. Step off it first (a sleep of ~50 us with
            # Linux's default timer slack) so the model is busy again before results go
            # out (benchmarks/compare_peers.py, fixed model: the gap between calls).
            time.sleep(_HAND_OVER_S)
        try:
            now = _monotonic()
            enqueued = enqueued_of(requests)
            queue_time = _queue_time(batch, enqueued)
            latencies = ([now - t for t in enqueued] if self._config.enable_monitoring
                         else None)
            # Counted before any future completes: a caller holding its result sees it.
            self._stats.update(elapsed, rows, queue_time, queue_length=len(self._queue),
                               requests=len(requests), latencies=latencies)
            self._controller.observe_batch(rows, elapsed, target, self._queue.rows)
            metrics = self._metrics
            if metrics.records_batches:
                metrics.batch(len(requests), rows, queue_time, elapsed, OUTCOME_OK)
            if metrics.records_requests:
                dispatched = batch.dispatched_at
                metrics.requests(latencies or [now - t for t in enqueued],
                                 [dispatched - t for t in enqueued], OUTCOME_OK)
            if self._config.debug_mode:
                logger.debug("delivered %d requests (%d rows) in %.3f ms after %.3f ms queued",
                             len(requests), rows, elapsed * 1e3, queue_time * 1e3)
            if finish_all(requests, parts):  # pragma: no cover - would be a batchproc bug
                logger.error("a future was completed twice; result dropped")
        finally:
            self._end_delivery(batch)

    def _fail(self, batch: _Batch, requests: list[Request], error: BaseException) -> None:
        with self._lock:
            if batch.abandoned:
                return
            batch.delivering = True
        try:
            self._fail_pending(requests, error, OUTCOME_ERROR, batch.dispatched_at)
        finally:
            self._end_delivery(batch)

    def _end_delivery(self, batch: _Batch) -> None:
        batch.delivering = False
        if self._closing:  # abandon_all may be waiting for this delivery
            with self._lock:
                self._settled.notify_all()

    def _fail_pending(self, requests: list[Request], error: BaseException, outcome: str,
                      dispatched_at: float) -> int:
        pending = [r for r in requests if not r.future.done()]
        if not pending:
            return 0
        self._stats.record_error(len(pending))
        self._metrics.error(error, len(pending))
        if self._metrics.records_requests:
            record_requests(self._metrics, pending, outcome, dispatched_at)
        for request in pending:
            try:
                request.future.set_exception(error)
            except InvalidStateError:  # pragma: no cover - would be a batchproc bug
                logger.error("a future was completed twice; error dropped")
        return len(pending)


def record_requests(metrics: MetricsSink, requests: list[Request], outcome: str,
                    dispatched_at: float | None) -> None:
    """Report requests that failed together; ``dispatched_at`` None: never dispatched (their
    whole wait was queue time)."""
    now = _monotonic()
    enqueued = enqueued_of(requests)
    latencies = [now - t for t in enqueued]
    queue_times = (latencies if dispatched_at is None
                   else [max(0.0, dispatched_at - t) for t in enqueued])
    metrics.requests(latencies, queue_times, outcome)


def _queue_time(batch: _Batch, enqueued: list[float]) -> float:
    """How long a batch's requests waited, on average, between enqueue and dispatch."""
    return batch.dispatched_at - sum(enqueued) / len(enqueued)


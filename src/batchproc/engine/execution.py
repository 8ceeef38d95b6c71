"""Running one popped batch: build, call, check and split; isolate failures; retry.

Failure scheduling (docs/failures.md):

* A failing batch of several requests is searched on the worker, without waiting, for
  the one request that fails (``Executor._isolate``): each call runs half of the
  suspects with the requests set aside so far (presumed good), so a single failing
  request is found in log2(n) calls and the others have their results within one more;
  then it runs alone, so that only a request that fails on its own gets an error. When
  more than one fails, the rest is bisected: both halves run, and each that fails is
  bisected again. Each part gets its results (or errors) as its call ends; the parts'
  done-callbacks run once the search is over (``Batch.deferred``).
* A ``map`` chunk of several items that fails on its own is not retried: it fails at
  once, and ``map`` queues its items again one by one (formats/chunks.py), each then
  searched and retried as it would have been had it been queued alone.
* An item too large for one batch runs in chunks that fit; a failing chunk sends it to
  be retried from that chunk, the chunks before it keeping their results
  (``_run_chunked``).
* A request that fails on its own is never waited for on the worker: it is parked in the
  native queue (``RequestQueue.park``) until its backoff, ``retry_delay * 2**k``, is
  over, then popped as a batch of its own by whichever worker is free. Backoff holds no
  worker and no call slot, and nothing else waits for it.
* ``retry_on`` says which exceptions are retried; others fail the request at once. A
  ``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``; asyncio's
  ``CancelledError`` excepted, ``errors.interrupts``) fails its whole call at once, unsearched
  and never retried, whatever ``retry_on`` says. An output that breaks the
  output rule (``BatchOutputError``) is batchproc's own check of the model's contract,
  and an item changed while queued (``ItemChangedError``) of the caller's: not transient
  failures; once the request fails it alone, it fails at once unless ``retry_on`` names
  that class (or a subclass) itself (``retried``).
* The target size shrinks once per failed batch whose search then answered every one
  of its requests (a failure of the batch, such as out of memory on its size); never per
  step of the search or per retry, nor for a request's own failure or an interrupting
  error's.
* A call past ``item_timeout`` is not searched here: its worker is stuck in it, and the
  time limit (engine/limits.py) queues each of its requests again alone.
"""

from __future__ import annotations

import logging
import math
import queue as _stdlib_queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .._native.future_state import Request, enqueued_of, total_rows
from ..config import MAX_SECONDS, BatchProcessorConfig
from ..controller import Controller
from ..errors import BatchOutputError, ItemChangedError, interrupts
from ..formats import Limits, Workspace
from ..formats.chunks import handed_back
from ..log_limits import LogLimiter, plural, seconds
from ..metrics import OUTCOME_ERROR, MetricsSink
from .batch import ABANDONED as ABANDONED_BATCH
from .batch import HELD, Batch, Board
from .delivery import Delivery, final_error

logger = logging.getLogger(__name__)

_monotonic = time.monotonic

# How long a worker whose call returned steps off the GIL for another one starting its
# call (Executor.attempt): any sleep, rounded up by the kernel's timer slack (~50 us).
_HAND_OVER_S = 1e-6

# A batch that fails while each of its requests succeeds alone is logged at once, then
# at most once per this many seconds (with how many there were meanwhile).
BATCH_ONLY_FAILURE_LOG_S = 60.0
# A call that raised a BaseException that is no Exception (SystemExit, KeyboardInterrupt)
# is logged at once, then at most once per this many seconds per exception type (with how
# many there were meanwhile): a model raising it on every call must not flood the log.
INTERRUPT_LOG_S = 10.0


def backoff(retry_delay: float, attempt: int) -> float:
    """Seconds before retry ``attempt`` (from 0): ``retry_delay * 2**attempt``, at most
    ``MAX_SECONDS``; never an error (``retry_delay * 2**1024`` does not fit a float)."""
    try:
        return min(math.ldexp(retry_delay, attempt), MAX_SECONDS)
    except OverflowError:
        return MAX_SECONDS

# Results of one process_func attempt.
OK, FAILED, ABANDONED = 0, 1, 2


class Executor:
    def __init__(self, config: BatchProcessorConfig, board: Board, queue: Any,
                 controller: Controller, delivery: Delivery, metrics: MetricsSink) -> None:
        self._config = config
        self._board = board
        self._queue = queue
        self._controller = controller
        self._delivery = delivery
        self._metrics = metrics
        self._retry_on = config.retry_on
        self._limits = Limits(config.max_batch_size, config.max_batch_bytes,
                              config.max_batch_tokens or 0)
        self.process_func: Callable[[Any], Any] | None = None
        self._batch_only_log: LogLimiter[None] = LogLimiter(BATCH_ONLY_FAILURE_LOG_S)
        # Batches that failed whole while each of their requests succeeded on a smaller
        # one (get_stats: without logging set up, the warning alone is never seen).
        self._counts_lock = threading.Lock()
        self.batch_only_failures = 0
        # By the exception type's name.
        self._interrupt_log: LogLimiter[str] = LogLimiter(INTERRUPT_LOG_S)

    def run(self, batch: Batch, workspace: Workspace, target: int) -> None:
        """Run a popped batch until each of its requests is delivered, failed or parked."""
        live = batch.requests
        try:
            # A request too large for one batch (it was popped alone) runs in chunks; a
            # single row is never cut.
            try:
                chunks = (live[0].format.chunks(live[0], self._limits)
                          if len(live) == 1 and live[0].rows > 1 else None)
            except ItemChangedError as exc:  # the caller's, not transient: as a build's
                self._delivery.fail(batch, live, exc)
                return
            if chunks is not None:
                self._run_chunked(batch, live[0], chunks, workspace)
            else:
                self._run(batch, live, workspace, target)
        except BaseException as exc:  # a BaseException from process_func, or our own bug
            logger.exception("batch of %s failed outside the retry logic",
                             plural(len(live), "request"))
            self._delivery.fail(batch, live, exc)
        finally:
            if batch.deferred is not None:
                self._delivery.run_deferred(batch)

    # ----------------------------------------------------------------- one call

    def attempt(self, batch: Batch, requests: list[Request], workspace: Workspace,
                ) -> tuple[int, Any, float, int]:
        """Build, call, check and split once: (status, each request's part or the error,
        seconds, rows)."""
        fmt = requests[0].format
        try:
            built = fmt.build(requests, workspace)
        except Exception as exc:
            return FAILED, exc, 0.0, total_rows(requests)
        rows = built.rows
        if not self._board.begin_call(batch, requests):
            return ABANDONED, None, 0.0, rows
        started = _monotonic()
        try:
            out = self.process_func(built.inputs)  # type: ignore[misc]
            status = OK
        except BaseException as exc:
            out, status = exc, FAILED
        elapsed = _monotonic() - started
        board = self._board
        if not board.end_call(batch):
            return ABANDONED, None, elapsed, rows
        if board.other_calling(batch):
            # Another worker is inside process_func, and the model this call just left
            # is now its to start, but starting takes the GIL, which this thread would
            # hold through the split and the delivery. Step off it first so the model is
            # busy again before results go out (the gap between calls of a model behind
            # one lock: benchmarks/saturation_floor.py --model fixed).
            time.sleep(_HAND_OVER_S)
        if status == OK:
            try:
                out = fmt.split(out, requests, built)
            except Exception as exc:
                out, status = exc, FAILED
                if isinstance(exc, BatchOutputError) and batch.uncut is None:
                    batch.uncut = exc
        return status, out, elapsed, rows

    def _try(self, batch: Batch, requests: list[Request], workspace: Workspace,
             target: int) -> tuple[int, Any]:
        """One attempt; delivers on success. (status, the error if it failed).

        Once an output of the batch could not be cut into its requests' parts
        (``Batch.uncut``), a call of several of them is not made: it fails as that one
        did, so the search runs each request alone. A smaller call's output may pass the
        length check by coincidence (an LSTM's ``(num_layers, batch, hidden)`` state in
        a call of ``num_layers`` rows, a list of two results for two requests) and be
        cut wrongly, handing callers each other's data; alone, a caller gets its own."""
        if batch.uncut is not None and len(requests) > 1:
            return FAILED, batch.uncut
        status, out, elapsed, rows = self.attempt(batch, requests, workspace)
        if status == OK:
            if self._delivery.deliver(batch, requests, out, elapsed, rows, target):
                batch.answered += len(requests)
            return OK, None
        if status == FAILED:
            self._count_failed_call(batch, requests, rows, elapsed)
        return status, out

    def _count_failed_call(self, batch: Batch, requests: list[Request], rows: int,
                           elapsed: float) -> None:
        """A model call of ``requests`` that failed: in the metrics' batch figures (the
        statistics count calls that returned)."""
        self._metrics.batch(len(requests), rows,
                            batch.dispatched_at - _mean(enqueued_of(requests)), elapsed,
                            OUTCOME_ERROR)

    # ----------------------------------------------------------------- failures

    def _run(self, batch: Batch, requests: list[Request], workspace: Workspace,
             target: int) -> None:
        status, error = self._try(batch, requests, workspace, target)
        if status != FAILED:
            return
        if len(requests) > 1:
            # The search completes the batch one part at a time: the parts' done-callbacks
            # wait for its end (Batch.deferred).
            batch.deferred = []
            if self._config.debug_mode:
                logger.debug("batch of %d failed (%r): isolating", len(requests), error)
        self._failed(batch, requests, workspace, target, error, error, self._isolate)
        if (len(requests) > 1 and batch.answered == len(requests)
                and requests[0].attempt == 0 and batch.state is not ABANDONED_BATCH):
            # The batch failed, yet the calls of its search answered every one of its
            # requests: a failure of the batch (out of memory on its size, say), so
            # smaller ones may get through. (Counted, not inferred from no request
            # failing alone: an interrupting error fails them all unsearched.)
            # Once per failed batch, never per step of the search or per retry.
            self._controller.observe_failure()
            self._note_batch_only_failure(len(requests), error)

    def _note_batch_only_failure(self, n: int, error: BaseException) -> None:
        """Count it and warn (rate-limited): callers get their results, yet every such
        batch costs a search of calls and halves the target: a model that only fails on
        batches (an output that cannot be split, out of memory) must not go unnoticed."""
        with self._counts_lock:
            self.batch_only_failures += 1
        self._metrics.batch_only_failure(n)
        admitted = self._batch_only_log.admit(None)
        if admitted is None:
            return
        logger.warning(
            "a batch of %d requests failed (%s: %s), yet each of its requests succeeded "
            "on a smaller batch: process_func fails on batches, not on these inputs (or its "
            "failure did not recur: a model that fails at random); %d "
            "such batch(es) since the last warning (each costs a search of calls and "
            "halves the batch target)", n, type(error).__name__, error,
            admitted.left_out + 1)

    def flush_log(self, final: bool = False) -> None:
        """Log a summary of the batch-only failures and the interrupting calls the
        warnings held back, once none has come for an interval (``LogLimiter.held``; at
        stop, ``final``: all of them)."""
        for _, held in self._batch_only_log.held(final):
            logger.warning(
                "%s failed in the last %s while each of %s requests succeeded on a smaller "
                "batch (process_func fails on batches, not on these inputs, or at random)",
                plural(held.left_out, "more batch", "more batches"), seconds(held.since),
                "its" if held.left_out == 1 else "their")
        for kind, held in self._interrupt_log.held(final):
            logger.error("process_func raised %s in %s in the last %s (not logged one by "
                         "one); their requests failed without retry", kind,
                         plural(held.left_out, "more call"), seconds(held.since))

    def _log_interrupt(self, error: BaseException, what: str, on: str = "") -> None:
        """The ERROR line of a call (``on`` what, if not a batch) that raised ``error``
        (``interrupts``), failing ``what`` without retry: one per ``INTERRUPT_LOG_S`` per
        exception type at most."""
        admitted = self._interrupt_log.admit(type(error).__name__)
        if admitted is None:
            return
        more = (f" ({plural(admitted.left_out, 'more call')} raised it in the last "
                f"{seconds(admitted.since)})" if admitted.left_out else "")
        logger.error("process_func raised %r%s; failing %s without retry%s", error, on, what,
                     more)

    def _failed(self, batch: Batch, group: list[Request], workspace: Workspace,
                target: int, error: BaseException, origin: BaseException,
                search: Callable[..., None]) -> None:
        """A call on exactly ``group`` failed with ``error``: settle its requests."""
        if interrupts(error):
            # KeyboardInterrupt-like: not retried, but never lost: the group fails with it.
            self._log_interrupt(error, f"its {plural(len(group), 'request')}")
            self._delivery.fail(batch, group, error)
        elif len(group) == 1:
            self._retry_or_fail(batch, group[0], error, origin)
        else:
            search(batch, group, workspace, target, error, origin)

    def _settle(self, batch: Batch, group: list[Request], workspace: Workspace,
                target: int, origin: BaseException) -> None:
        """Run a group not known to fail; if it does, isolate its failure."""
        status, error = self._try(batch, group, workspace, target)
        if status == FAILED:
            self._failed(batch, group, workspace, target, error, origin, self._isolate)

    def _isolate(self, batch: Batch, group: list[Request], workspace: Workspace,
                 target: int, error: BaseException, origin: BaseException) -> None:
        """``group`` (two or more requests) failed as a whole: search for the one that
        fails, expecting a single one.

        Each call runs half of the suspects together with the requests set aside so far
        (not run since a failing call; presumed good). If it succeeds, they all have
        their results and the failure is in the other half; if it fails, that other half
        is set aside too. A single failing request is found in log2(n) calls and the
        others have their results within one more; then it runs alone for its own error,
        unless the search's last call already ran it alone. Should the requests set
        aside fail on their own, several requests fail: the rest is bisected instead
        (``_bisect``).
        """
        suspects = group
        aside: list[Request] = []
        alone_failure: BaseException | None = None  # the suspect's own, once run alone
        while len(suspects) > 1:
            mid = len(suspects) // 2
            half, rest = suspects[:mid], suspects[mid:]
            tried = aside + half
            status, failure = self._try(batch, tried, workspace, target)
            if status == ABANDONED:
                return
            if status == OK:
                suspects, aside = rest, []
                continue
            if interrupts(failure):
                self._failed(batch, tried, workspace, target, failure, origin,
                             self._isolate)
                self._settle(batch, rest, workspace, target, origin)
                return
            suspects, aside = half, aside + rest
            alone_failure = failure if len(tried) == 1 else None
        if aside:
            status, failure = self._try(batch, aside, workspace, target)
            if status == ABANDONED:
                return
            if status == FAILED:
                # The requests set aside fail too: the suspect's own health is unknown,
                # unless the search's last call ran it alone.
                if alone_failure is not None:
                    self._retry_or_fail(batch, suspects[0], alone_failure, origin)
                else:
                    self._settle(batch, suspects, workspace, target, origin)
                self._failed(batch, aside, workspace, target, failure, origin,
                             self._bisect)
                return
        # Every other request of a failing call has its result. Whether this one fails
        # on its own is seen by running it alone: a failure that depends on the batch
        # (its size, say) must never fail a request that would succeed by itself.
        if alone_failure is not None:
            self._retry_or_fail(batch, suspects[0], alone_failure, origin)
        else:
            self._settle(batch, suspects, workspace, target, origin)

    def _bisect(self, batch: Batch, group: list[Request], workspace: Workspace,
                target: int, error: BaseException, origin: BaseException) -> None:
        """``group`` (two or more requests) failed as a whole and is likely to hold
        several failures: run both halves, then look into those that fail."""
        mid = len(group) // 2
        first, second = group[:mid], group[mid:]
        status, error_first = self._try(batch, first, workspace, target)
        if status == ABANDONED:
            return
        if status == OK:
            # The failure is in the second half: split it without running it whole.
            if len(second) == 1:
                self._settle(batch, second, workspace, target, origin)
            else:
                self._bisect(batch, second, workspace, target, error, origin)
            return
        status, error_second = self._try(batch, second, workspace, target)
        if status == ABANDONED:
            return
        self._failed(batch, first, workspace, target, error_first, origin, self._bisect)
        if status == FAILED:
            self._failed(batch, second, workspace, target, error_second, origin,
                         self._bisect)

    def _retry_or_fail(self, batch: Batch, request: Request, error: BaseException,
                       origin: BaseException,
                       done_parts: tuple[int, list[Any]] | None = None) -> None:
        """Park a single failing request for a retry after its backoff, or fail it;
        ``done_parts``: what it completed so far, kept for the retry (``_run_chunked``).

        A map chunk of several items is not a single request: it fails at once, and its
        items are queued again one by one (``handed_back``), as a failing batch of
        several requests is searched at once. Retried and parked whole, it would make
        every item wait for a backoff it may not outlive (``max_queue_time``)."""
        if handed_back(request, error):
            self._delivery.fail(batch, [request], error)
            return
        cfg = self._config
        if (retried(error, self._retry_on) and request.attempt < cfg.max_retries
                and self._park(batch, request, error, origin, done_parts)):
            return
        if cfg.debug_mode:  # the caller gets the error (enqueue logs it for fire and forget)
            logger.debug("request failed after %d retries: %r", request.attempt, error)
        self._delivery.fail(batch, [request], final_error(request, error, origin))

    def _park(self, batch: Batch, request: Request, error: BaseException,
              origin: BaseException, done_parts: tuple[int, list[Any]] | None) -> bool:
        delay = backoff(self._config.retry_delay, request.attempt)
        retry = request.for_retry(request.error if request.error is not None else origin,
                                  done_parts)
        # Under the board's lock: either stop gave up on this batch first (and fails the
        # request with the batch), or the request is parked before stop drains the queue.
        with self._board.lock:
            if batch.state is not HELD:
                return True  # abandoned: whoever abandoned it completes the future
            try:
                self._queue.park(retry, request.priority, request.rows, request.nbytes,
                                 request.key, request.queue_length, _monotonic() + delay,
                                 request.deadline)
            except (_stdlib_queue.Full, MemoryError):
                return False
            # No longer this batch's: a time limit on its later calls must not fail it.
            batch.requests = [r for r in batch.requests if r is not request]
        if self._config.debug_mode:
            logger.debug("request failed (%r): retry %d in %.3f s", error,
                         request.attempt + 1, delay)
        return True

    def _run_chunked(self, batch: Batch, request: Request, chunks: list[Request],
                     workspace: Workspace) -> None:
        """One item larger than a batch: run it in chunks that fit, join the results. A
        failing chunk sends the request to be retried from that chunk: the chunks before
        it keep their results (``Request.done_parts``), so a model that fails now and then
        costs a large item a retry per failure, not a rerun of every chunk; or fails it."""
        done_rows, parts = _done_parts(request, chunks)
        # Each chunk's call is a model call of its own rows (the statistics, the
        # controller's fit, the metrics); the request completes once, with the last.
        # (An attempt always has a chunk left: a retry starts at the chunk that failed.)
        remaining = chunks[len(parts):]
        for k, chunk in enumerate(remaining):
            status, out, elapsed, rows = self.attempt(batch, [chunk], workspace)
            if status == ABANDONED:
                return
            if status == FAILED:
                self._count_failed_call(batch, [chunk], rows, elapsed)
                if interrupts(out):
                    self._log_interrupt(out, "it", f" on a chunk of a {request.rows}-row "
                                        "request")
                    self._delivery.fail(batch, [request], out)
                else:
                    self._retry_or_fail(batch, request, out, out, (done_rows, parts))
                return
            parts.append(out[0])
            done_rows += chunk.rows
            if k < len(remaining) - 1:
                self._delivery.call_returned(batch, chunk, rows, elapsed)
        try:
            joined = request.format.join(parts)
        except Exception as exc:
            self._delivery.call_returned(batch, chunk, rows, elapsed)
            self._delivery.fail(batch, [request], exc)
            return
        self._delivery.deliver(batch, [request], [joined], elapsed, rows,
                               self._config.max_batch_size)


def retried(error: BaseException,
            retry_on: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
    """Whether a single request's failure ``error`` is retried under ``retry_on``.

    A broken contract (``BatchOutputError``, ``ItemChangedError``) comes back the same on
    every try: only a class of ``retry_on`` that is that class or a subclass of it retries
    it, never a broader one (``Exception``, ``ValueError``)."""
    for contract in _CONTRACTS:
        if isinstance(error, contract):
            classes = retry_on if isinstance(retry_on, tuple) else (retry_on,)
            retry_on = tuple(t for t in classes if issubclass(t, contract))
            break
    return isinstance(error, retry_on)


# Failures no retry mends: batchproc's checks of the model's contract and of the caller's.
_CONTRACTS = (BatchOutputError, ItemChangedError)


def _done_parts(request: Request, chunks: list[Request]) -> tuple[int, list[Any]]:
    """What earlier attempts of ``request`` completed, as (rows, outputs) of its first
    chunks, when it is still cut into the same ``chunks`` (else nothing): a copy, which
    this attempt extends."""
    if request.done_parts is None:
        return 0, []
    rows, parts = request.done_parts
    if len(parts) > len(chunks) or total_rows(chunks[:len(parts)]) != rows:
        return 0, []
    return rows, list(parts)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)

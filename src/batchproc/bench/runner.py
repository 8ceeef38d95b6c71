"""Run one load against one system — or the limit — and turn the timings into figures.

The limit is the model called back to back on full batches (``max_batch`` rows) from one
thread, with no queue at all: its throughput is requests / time and its latency is one call.
No batcher can beat it on throughput; how close one gets is the figure that matters.

Every system gets the model wrapped in :class:`CountingModel`, so the mean batch size is
measured the same way everywhere (rows the model saw / calls), not taken from a system's
own statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from ..log_limits import plural
from .inputs import Batch, FeatureRows, rows_of
from .loads import DRAIN_MAX_S, DRAIN_MIN_S, Bounds, Load, LoadResult, drain_window, run_load
from .models import Model, OwnLoop, error_text, is_async_model
from .targets import STOP_TIMEOUT_S

log = logging.getLogger(__name__)

LIMIT = "limit"
PRIORITY_NAMES = ("CRITICAL", "HIGH", "NORMAL", "LOW", "BACKGROUND")
# How long from a run's stop the calls of the model it left running (closed-loop clients
# of no batching queued on the model's lock) get to end before the next run starts.
LEFT_RUNNING_WAIT_S = DRAIN_MAX_S


@dataclass
class _LeftBehind:
    """A run that ended with calls of its model still running: its ``model`` (a
    ``CountingModel`` or ``_Limit``: what has ``running``), its progress ``label``, when
    it stopped (``perf_counter``) and the longest a call of its left may take to end
    after the one before (``stall_s``: its settle) while the next run waits for them;
    ``given_up`` once a run has waited for them as long as that: no later run waits."""

    model: Any
    label: str
    stopped: float
    stall_s: float
    given_up: bool = False


# Runs of this process whose calls may still be running: a run that starts beside them
# shares the machine with them.
_left_behind: list[_LeftBehind] = []


def calls_left_behind() -> int:
    """Calls of the model that earlier runs in this process left running, still running."""
    _left_behind[:] = [run for run in _left_behind if run.model.running]
    return sum(run.model.running for run in _left_behind)


def let_calls_end(progress: Progress, deadline: float = math.inf) -> int:
    """Before a run: wait for the calls of the model that earlier runs left running to
    end, each run's on a progress line of its own, for as long as one ends at least every
    ``stall_s`` (calls queued on the model draining; a hung one is not waited for), until
    ``LEFT_RUNNING_WAIT_S`` from that run's stop. How many are still running then (the
    run about to start says it started beside them). ``deadline`` (``perf_counter``)
    ends the wait sooner, for a caller with no time for a run after it (``tune``'s
    budget): the calls still running then are waited for again before the next run.
    Ctrl-C ends the wait (the line says "interrupted") as it would the run: the runs
    that finished are kept."""
    for run in list(_left_behind):
        left = run.model.running
        if not left or run.given_up:
            continue
        waited_for = left
        progress.start(f"{run.label} · {plural(left, 'call')} left running", waited_for, None)
        now = time.perf_counter()
        until, ended_by = run.stopped + LEFT_RUNNING_WAIT_S, now + run.stall_s
        try:
            while left and now < min(until, ended_by, deadline):
                still = run.model.wait_idle(min(0.1, until - now, ended_by - now,
                                                deadline - now))
                now = time.perf_counter()
                if still < left:
                    ended_by = now + run.stall_s
                left = still
                progress.update(max(waited_for - left, 0))
        except KeyboardInterrupt:
            progress.finish("interrupted")
            raise
        if not left:
            progress.finish("ended")
            continue
        if now >= deadline and now < min(until, ended_by):
            progress.finish(f"{plural(left, 'call')} still running when the time given for "
                            "the wait ran out")
            break
        run.given_up = True
        why = (f"{LEFT_RUNNING_WAIT_S:g} s from its stop" if now >= until
               else f"none ended for {run.stall_s:g} s")
        progress.finish(f"{plural(left, 'call')} still running ({why}); runs from now on "
                        "start beside them")
    return calls_left_behind()


class Progress(Protocol):
    def start(self, label: str, total: int | None, duration: float | None) -> None: ...
    def update(self, done: int) -> None: ...
    def finish(self, summary: str) -> None: ...


class NullProgress:
    def start(self, label: str, total: int | None, duration: float | None) -> None:
        pass

    def update(self, done: int) -> None:
        pass

    def finish(self, summary: str) -> None:
        pass

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        pass


class CountingModel:
    """Wraps a model; counts calls, rows, the calls that raised and the calls in
    progress (thread-safe, a lock per batch).

    Whatever a call raises counts, ``SystemExit``, ``KeyboardInterrupt`` and
    ``GeneratorExit`` included: the model runs on the systems' threads, never on the
    main one, where alone a real Ctrl-C arrives. Raised again as it was."""

    def __init__(self, model: Model):
        self.model = model
        self.calls = 0
        self.rows = 0
        # Calls that raised (a system may retry them: their requests can still complete
        # or only be late) and the first one's error, on one line.
        self.raised = 0
        self.first_raised: str | None = None
        self._running = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def __call__(self, batch: Any) -> Any:
        self._started(batch)
        try:
            return self.model(batch)
        except BaseException as exc:
            self._raised(exc)
            raise
        finally:
            self._ended()

    def _started(self, batch: Any) -> None:
        n = rows_of(batch)
        with self._lock:
            self.calls += 1
            self.rows += n
            self._running += 1

    def _raised(self, exc: BaseException) -> None:
        with self._lock:
            self.raised += 1
            if self.first_raised is None:
                self.first_raised = error_text(exc)

    def _ended(self) -> None:
        with self._lock:
            self._running -= 1
            if not self._running:
                self._idle.notify_all()

    @property
    def running(self) -> int:
        """Calls of the model in progress now."""
        return self._running

    def wait_idle(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the calls in progress to return; how many
        are still running then."""
        with self._idle:
            self._idle.wait_for(lambda: not self._running, max(timeout, 0.0))
            return self._running

    @property
    def mean_batch(self) -> float:
        return self.rows / self.calls if self.calls else 0.0


class AsyncCountingModel(CountingModel):
    """A :class:`CountingModel` of an ``async def`` model: itself a coroutine function,
    so that batchproc sees one and awaits it on its event loop, as it would the model.
    A call cancelled (a system gave up on it: its time limit, its stop) is not counted
    as raising."""

    async def __call__(self, batch: Any) -> Any:
        self._started(batch)
        try:
            return await self.model(batch)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._raised(exc)
            raise
        finally:
            self._ended()


def _model_errors(counted: CountingModel, target: Any) -> tuple[int, str | None]:
    """The model's failed calls in a run and the first one's error: those that raised,
    and, where the target counts its failed batches (``failed_calls``: batchproc), those
    whose output it refused. Either way the model is broken, even where retries let
    every request complete."""
    failed = getattr(target, "failed_calls", None)
    refused = max(0, failed() - counted.raised) if failed is not None else 0
    first = counted.first_raised
    if refused and first is None:
        first = (f"batchproc refused the output of {refused:,} call(s) (BatchOutputError), "
                 "or could not build their batch: the warnings it logged say why")
    return counted.raised + refused, first


@dataclass
class RunResult:
    system: str
    model: str
    load: str
    throughput: float  # completed requests per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    mean_batch: float  # rows per model call
    batches: int
    submitted: int
    completed: int
    errors: int
    elapsed_s: float
    stopped_by: str  # "requests" | "duration" | "failed" (the run raised)
    # Offered but not done when the run's drain ended: not in ``completed`` nor the
    # throughput; in the latency figures at their wait so far (a lower bound).
    unfinished: int = 0
    first_error: str | None = None
    scheduled: int | None = None  # open loop: arrivals scheduled within the run
    # Open loop: the window (seconds) they arrive in, and the load offered: scheduled /
    # window_s, in requests/s (the rate asked, to rounding).
    window_s: float | None = None
    arrival_rate: float | None = None
    # Open loop and burst: requests the system refused at submit (a full queue); not in
    # ``submitted``, the throughput nor the latencies.
    refused: int = 0
    first_refusal: str | None = None
    note: str = ""
    by_priority: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    gc_s: float = 0.0  # seconds the process spent in cyclic garbage collections
    gc_full: int = 0  # how many of them were full (generation 2) collections
    failed: str | None = None  # the run itself raised (what, and on what): no figures
    # Calls of the model that raised (a system that retries them can still complete their
    # requests, or leave them late) and the first one's error, on one line.
    model_errors: int = 0
    first_model_error: str | None = None
    # Calls of the model still running when the run had waited for them (they share the
    # machine with the runs after it), and those of earlier runs still running when this
    # one started (it shared the machine with them: its throughput is not compared).
    left_running: int = 0
    started_beside: int = 0
    # An open loop too short to show a rate (LoadResult.too_short): not compared.
    too_short: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def failed_run(system: str, model_name: str, load: Load, failure: str) -> RunResult:
    """The result of a run that raised: no figures, ``failed`` says why. The other
    systems' runs are kept; the command exits non-zero at the end."""
    nan = float("nan")
    return RunResult(
        system=system, model=model_name, load=load.label, throughput=nan, p50_ms=nan,
        p95_ms=nan, p99_ms=nan, mean_ms=nan, mean_batch=nan, batches=0, submitted=0,
        completed=0, errors=0, elapsed_s=nan, stopped_by="failed", failed=failure,
    )


class GcClock:
    """Time spent in CPython's cyclic garbage collector while it is entered, in seconds,
    from ``gc.callbacks``: any thread's collection stops every thread, so it counts
    against the whole run."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._started
        self.full += info.get("generation") == 2

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Collect, then freeze what exists (``gc.freeze``) for the block: a collection
    during a run scans what the run made, not the process's whole heap (every system's
    modules, what earlier runs and peers left behind), so one system's figures do not
    depend on which ran before it. A heap something else froze first (a pre-forking
    server; CPython 3.12.1 itself, at start) is left as found: ``gc.unfreeze`` would thaw
    that too."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _pct(lat_s: np.ndarray) -> tuple[float, float, float, float]:
    if lat_s.size == 0:
        nan = float("nan")
        return nan, nan, nan, nan
    p50, p95, p99 = np.percentile(lat_s, [50, 95, 99]) * 1000.0
    return float(p50), float(p95), float(p99), float(lat_s.mean() * 1000.0)


def _by_priority(res: LoadResult) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for level in np.unique(res.priorities):
        lat = res.latencies[res.priorities == level]
        p50, _, p99, _ = _pct(lat)
        out[PRIORITY_NAMES[int(level)]] = {"count": int(lat.size), "p50_ms": p50, "p99_ms": p99}
    return out


def run_target(
    target: Any,
    model: Model,
    model_name: str,
    load: Load,
    bounds: Bounds,
    progress: Progress | None = None,
    label: str | None = None,
    settle_s: float = STOP_TIMEOUT_S,
) -> RunResult:
    """Start ``target`` on ``model``, drive it with ``load`` until ``bounds``, stop it.

    ``label`` names the run on the progress display (default: model, load and system).
    Once the target is stopped, the calls of the model still in progress (a closed-loop
    client or generator of no batching in the model, a processor's worker its stop gave
    up on) are waited for until ``settle_s`` seconds from the stop within the run (what
    ends then counts in it); those still running then are reported (``left_running``),
    and the next run (this function's or :func:`run_limit`) first waits for them on a
    progress line of their own, for as long as one ends at least every ``settle_s`` (a
    queue of them draining; not a hung one), until ``LEFT_RUNNING_WAIT_S`` from the stop.
    A run that starts while some still run says how many (``started_beside``):
    :func:`.report.not_compared` compares its throughput with none.

    Ctrl-C (``KeyboardInterrupt``) during the run ends it: the load's threads end, the
    target is stopped, the progress line says "interrupted", and the interrupt goes on
    to the caller (:mod:`.interrupts`), with no wait for the model's calls (no run
    follows).
    """
    progress = progress or NullProgress()
    counted = (AsyncCountingModel if is_async_model(model) else CountingModel)(model)
    label = label or f"{model_name} · {load.label} · {target.name}"
    beside = let_calls_end(progress)
    gc.collect()
    total = _expected(load, bounds)
    progress.start(label, total, bounds.duration)
    stopped = time.perf_counter()
    try:
        target.start(counted)
        try:
            with _frozen_heap(), GcClock() as gc_clock:
                res = run_load(target, load, bounds, progress.update)
        except KeyboardInterrupt:
            settle_s = 0.0  # no run follows: the model's calls are not waited for
            raise
        finally:
            stopped = time.perf_counter()
            try:
                target.stop()
            finally:
                counted.wait_idle(stopped + settle_s - time.perf_counter())
    except KeyboardInterrupt:
        progress.finish("interrupted")
        raise
    except Exception as exc:  # the system itself broke: keep the other systems' runs
        log.debug("%s failed", target.name, exc_info=True)
        progress.finish("failed")
        out = failed_run(target.name, model_name, load, error_text(exc))
        out.model_errors, out.first_model_error = _model_errors(counted, target)
        out.started_beside = beside
        out.left_running = _leaves_behind(counted, label, stopped, settle_s)
        return out
    left = _leaves_behind(counted, label, stopped, settle_s)
    p50, p95, p99, mean = _pct(res.latencies)
    model_errors, first_model_error = _model_errors(counted, target)
    out = RunResult(
        system=target.name,
        model=model_name,
        load=load.label,
        throughput=res.throughput,
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        mean_ms=mean,
        mean_batch=counted.mean_batch,
        batches=counted.calls,
        submitted=res.submitted,
        completed=res.completed,
        errors=res.errors,
        elapsed_s=res.elapsed,
        stopped_by=res.stopped_by,
        unfinished=res.unfinished,
        first_error=res.first_error,
        scheduled=res.scheduled,
        window_s=res.window,
        arrival_rate=res.offered_rate,
        refused=res.refused,
        first_refusal=res.first_refusal,
        by_priority=_by_priority(res) if load.priorities else {},
        gc_s=gc_clock.seconds,
        gc_full=gc_clock.full,
        extra=dict(getattr(target, "stats", dict)()),
        model_errors=model_errors,
        first_model_error=first_model_error,
        left_running=left,
        started_beside=beside,
        too_short=res.too_short,
    )
    if res.errors:
        log.warning("%s: %s failed, first: %s", target.name, plural(res.errors, "request"),
                    res.first_error)
    late = f", {res.unfinished:,} unfinished" if res.unfinished else ""
    late += f", {res.refused:,} refused" if res.refused else ""
    late += f", the model raised {plural(counted.raised, 'time')}" if counted.raised else ""
    late += (f", started beside {plural(beside, 'model call')} an earlier run left running"
             if beside else "")
    late += f", {plural(left, 'model call')} left running" if left else ""
    progress.finish(f"{res.throughput:,.0f} req/s{late}")
    return out


def _leaves_behind(model: Any, label: str, stopped: float, stall_s: float) -> int:
    """How many calls of ``model`` a run left running; the next run waits for them."""
    left: int = model.running
    if left:
        _left_behind.append(_LeftBehind(model, label, stopped, stall_s))
    return left


def _batch_words(batch: Batch) -> str:
    """``a batch of 4 rows (4 requests)``."""
    return (f"a batch of {plural(batch.rows, 'row')} "
            f"({plural(batch.requests, 'request')})")


def _expected(load: Load, bounds: Bounds) -> int | None:
    n = bounds.requests
    if load.kind == "burst":
        n = min(n, load.burst) if n is not None else load.burst
    return n


def run_limit(
    model: Model,
    model_name: str,
    load: Load,
    bounds: Bounds,
    max_batch: int,
    progress: Progress | None = None,
) -> RunResult:
    """The model called back to back on full batches from one thread: requests / time.

    A full batch is whole requests of the load's source, up to ``max_batch`` rows; the
    batches of :meth:`~.inputs.RequestSource.limit_plan` are sent in turn, so the limit
    sends the requests the loads send. The run stops at ``bounds`` as the other systems'
    do: after exactly ``bounds.requests`` requests (the last call takes only those still
    wanted) or ``bounds.duration`` seconds, whichever comes first; a call still running
    then has the drain the other systems' runs have (:func:`~.loads.drain_window`). A
    model call that raises, returns an output batchproc refuses (checked on the first
    call of each batch) or has not returned by the end of the drain ends the run as
    :func:`failed_run`, saying the batch's rows. The calls run on a thread of their own,
    which a call that never returns is left to. Ctrl-C ends the run as it does
    :func:`run_target`'s: no other call starts, the line says "interrupted", and the
    interrupt goes on to the caller.
    """
    progress = progress or NullProgress()
    wanted = _expected(load, bounds)  # None: bounded by time alone
    dur = bounds.duration if bounds.duration is not None else float("inf")
    source = load.source or FeatureRows(load.features)
    plan = source.limit_plan(max_batch, load.seed)
    # Every request larger than a batch: the plan's batches are whole requests, which
    # batchproc would cut into chunks of max_batch rows (the note says so).
    largest = max((sum(rows_of(r) for r in batch) for batch in plan), default=0)
    limit = _Limit(model, source, plan, wanted, dur)
    beside = let_calls_end(progress)
    gc.collect()
    progress.start(f"{model_name} · {load.label} · {LIMIT}", wanted, bounds.duration)
    bound = dur + drain_window(dur) if math.isfinite(dur) else math.inf
    worker = threading.Thread(target=limit.run, name="batchproc-bench-limit", daemon=True)
    pc = time.perf_counter
    deadline = pc() + bound
    try:
        worker.start()
        while not limit.finished.wait(min(0.1, max(deadline - pc(), 0.0))):
            progress.update(limit.done)
            if pc() >= deadline:
                break
    except KeyboardInterrupt:
        progress.finish("interrupted")
        raise
    finally:
        limit.give_up()  # a call that returns after the end starts no other
    if not limit.finished.is_set():
        batch = limit.current
        on = _batch_words(batch) if batch is not None else "its last batch"
        limit.failure = (f"the model did not return within {bound:.3g} s (the run's duration "
                         f"and drain) on {on}; the call was left running")
        _leaves_behind(limit, f"{model_name} · {load.label} · {LIMIT}", pc(), DRAIN_MIN_S)
    if limit.failure is not None:
        progress.finish("failed")
        failed = failed_run(LIMIT, model_name, load, limit.failure)
        failed.started_beside = beside
        failed.left_running = limit.running
        if limit.model_error is not None:
            failed.model_errors, failed.first_model_error = 1, limit.model_error
        return failed
    done, elapsed, times = limit.done, limit.elapsed, limit.times
    lat = np.asarray(times)
    p50, p95, p99, mean = _pct(lat)
    progress.finish(f"{done / elapsed:,.0f} req/s" + (
        f", started beside {plural(beside, 'model call')} an earlier run left running"
        if beside else ""))
    return RunResult(
        system=LIMIT,
        model=model_name,
        load=load.label,
        throughput=done / elapsed,
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        mean_ms=mean,
        mean_batch=limit.rows / len(times) if times else 0.0,
        batches=len(times),
        submitted=done,
        completed=done,
        errors=0,
        elapsed_s=elapsed,
        stopped_by=limit.stopped_by,
        note="model on full batches, one thread, no queue; latency = one call",
        extra={"rows_over_max_batch": largest} if largest > max_batch else {},
        started_beside=beside,
    )


class _Limit:
    """The limit's calls (:func:`run_limit`), made by :meth:`run` on a thread of their
    own; the thread that started it watches ``done`` and ``finished``, and sets ``stop``
    when it gives up on a call."""

    def __init__(self, model: Model, source: Any, plan: list[list[Any]], wanted: int | None,
                 dur: float) -> None:
        self.model = model
        self.source = source
        self.plan = plan
        self.batches = [source.batch(requests) for requests in plan]
        self.checked = [False] * len(plan)  # each batch's output is checked on its first call
        self.wanted = wanted
        self.dur = dur
        self.done = 0  # requests done; for progress, updated every 0.1 s and at the end
        self.rows = 0
        self.times: list[float] = []
        self.elapsed = 0.0
        self.stopped_by = "requests"
        self.current: Batch | None = None  # the batch of the call in progress
        self.failure: str | None = None
        # The error of the model's call that ended the run (it raised, or batchproc
        # refuses its output): a failed call of the model, counted as every system's are.
        self.model_error: str | None = None
        self.stop = False
        self.finished = threading.Event()
        # An async model's calls are awaited back to back on an event loop of their own.
        self._own_loop = OwnLoop() if is_async_model(model) else None

    def run(self) -> None:
        try:
            if self._own_loop is not None:
                self._own_loop.run(self._acalls())
            else:
                self._calls()
        except BaseException as exc:  # the bench's own failure: a failed run, not a hang
            if self.failure is None and not self.stop:
                self.failure = f"the limit failed: {error_text(exc)}"
        finally:
            self.finished.set()

    @property
    def running(self) -> int:
        """Calls of the model in progress now (0 or 1)."""
        return 0 if self.finished.is_set() else 1

    def wait_idle(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the call in progress to return; ``running``
        then."""
        self.finished.wait(max(timeout, 0.0))
        return self.running

    def give_up(self) -> None:
        """Start no other call; cancel an async model's call in progress."""
        self.stop = True
        if self._own_loop is not None:
            self._own_loop.cancel()

    def _call_failed(self, failure: str, exc: BaseException) -> None:
        """A call of the model failed with ``exc`` (it raised, or batchproc refuses its
        output): the run's ``failure``, and a failed call of the model unless the run had
        given up on it (an async call cancelled, a call past the run's end)."""
        self.failure = failure
        if not self.stop:
            self.model_error = error_text(exc)

    def _plan(self) -> list[tuple[Batch, Any, int, int]]:
        """Each batch with its inputs, requests and rows, unpacked once for the calls."""
        return [(b, b.inputs, b.requests, b.rows) for b in self.batches]

    def _cut(self, k: int, left: int) -> tuple[Batch, Any, int, int]:
        """The last call's batch: the first ``left`` requests of batch ``k``."""
        b = self.source.batch(self.plan[k][:left])
        return b, b.inputs, b.requests, b.rows

    def _checked(self, batch: Batch, k: int, out: Any) -> bool:
        """Whether ``out`` passes batchproc's output rule (checked on each batch's first
        call, and on the last); sets ``failure`` if not."""
        from batchproc.errors import BatchOutputError

        try:
            batch.check(out)
        except BatchOutputError as exc:
            self._call_failed(f"batchproc refuses the model's output on "
                              f"{_batch_words(batch)}: {error_text(exc)}", exc)
            return False
        self.checked[k] = True
        return True

    # The two loops below are one loop, but for the model's call (awaited in the second):
    # kept apart, and lean, as the limit of a fast model is the loop's own speed.

    def _calls(self) -> None:
        model, wanted, dur, checked = self.model, self.wanted, self.dur, self.checked
        plan = self._plan()
        append = self.times.append
        done = rows = k = 0
        pc = time.perf_counter
        t0 = last_tick = pc()
        while wanted is None or done < wanted:
            batch, inputs, per_call, n = plan[k]
            last = wanted is not None and wanted - done < per_call
            if last:
                batch, inputs, per_call, n = self._cut(k, wanted - done)  # type: ignore[operator]
            t = pc()
            if t - t0 >= dur:
                self.stopped_by = "duration"
                break
            self.current = batch
            try:
                out = model(inputs)
            except BaseException as exc:
                self._call_failed(f"the model raised on {_batch_words(batch)}: "
                                  f"{error_text(exc)}", exc)
                return
            t1 = pc()
            append(t1 - t)
            if (last or not checked[k]) and not self._checked(batch, k, out):
                return
            del out
            done += per_call
            rows += n
            k = k + 1 if k + 1 < len(plan) else 0
            if t1 - last_tick > 0.1:
                self.done = done
                last_tick = t1
                if self.stop:  # given up on (a call past the run's bound, or Ctrl-C)
                    return
        self.elapsed = pc() - t0
        self.done, self.rows = done, rows

    async def _acalls(self) -> None:
        model, wanted, dur, checked = self.model, self.wanted, self.dur, self.checked
        plan = self._plan()
        append = self.times.append
        done = rows = k = 0
        pc = time.perf_counter
        t0 = last_tick = pc()
        while wanted is None or done < wanted:
            batch, inputs, per_call, n = plan[k]
            last = wanted is not None and wanted - done < per_call
            if last:
                batch, inputs, per_call, n = self._cut(k, wanted - done)  # type: ignore[operator]
            t = pc()
            if t - t0 >= dur:
                self.stopped_by = "duration"
                break
            self.current = batch
            try:
                out = await model(inputs)
            except BaseException as exc:  # CancelledError too: the watcher gave up
                self._call_failed(f"the model raised on {_batch_words(batch)}: "
                                  f"{error_text(exc)}", exc)
                return
            t1 = pc()
            append(t1 - t)
            if (last or not checked[k]) and not self._checked(batch, k, out):
                return
            del out
            done += per_call
            rows += n
            k = k + 1 if k + 1 < len(plan) else 0
            if t1 - last_tick > 0.1:
                self.done = done
                last_tick = t1
                if self.stop:
                    return
        self.elapsed = pc() - t0
        self.done, self.rows = done, rows

"""Load generators: closed loop, Poisson open loop, burst.

Requests come from the load's request source (:mod:`.inputs`: one float32 row of
``features`` values unless ``--input`` says otherwise), cycled in order. A run is
bounded by a request count and/or a duration, whichever comes first, so that slow
configurations (no batching on the ``fixed`` model) still finish; the result says which
bound ended it.

- closed loop (``clients=N``): N threads each submit one request, wait for its result,
  repeat. Latency: submit to result.
- open loop (``rate=R``): one generator thread, futures collected. The schedule holds
  ``round(R * duration)`` arrivals (at least one) within the duration, placed as a
  Poisson process places that many (exponential gaps, scaled to the window: the sorted
  times of uniform arrivals), so the load offered is R, not one draw's count of it.
  Latency is measured from each request's *scheduled* arrival, so a system that falls
  behind shows its queueing delay (no coordinated omission). A request the target
  refuses (its submit raises: a full queue) is counted *refused* and the generator goes
  on with the next arrival, so every arrival is accounted: completed, failed, refused or
  unfinished. Its throughput is its completed arrivals over the arrival window (see
  :func:`open_span`).
- burst (``burst=N``): one thread submits N requests as fast as it can, then waits for
  them all. Latency: from the start of the burst (all N arrive at once) to completion,
  so a system that cannot take requests as fast as they come is charged for it.

Sync targets are driven from threads; async targets (``is_async``) from one asyncio loop
in its own thread, with the same shapes (N client coroutines, one generator coroutine).
The calling thread only watches: it reports progress through ``tick(done)`` every 0.1 s.

A run's length is bounded, however overloaded the system: no arrival is scheduled past
the duration, and what was scheduled has a drain of :func:`drain_window` to finish. An
open loop or burst that falls behind still submits every arrival, late (its latency
counted from its schedule), until the drain ends. What has not finished by then (still
queued or running, a submit still blocked, arrivals that a blocked or slow generator
never got to submit) is
*unfinished*: not counted as completed, its latency taken as its wait until the end of
the drain (a lower bound), so that an overloaded system's percentiles are not flattered
by leaving out its slowest requests. One horizon for every system and every request left
(queued, running or never sent): a system that stops taking requests early (no batching,
whose generator runs the model itself) is charged as long a wait as one that queued them.
A run that leaves any is reported ``stopped_by="duration"``: the time bound ended it.
The caller then stops the target (``run_target``), which gives up on what is left.

Ctrl-C (or any exception) in the watching thread ends the run on its way out: the
clients and the generator submit nothing more and end after their call in progress, an
asyncio run's tasks are cancelled, and the exception goes on to the caller, which stops
the target (:mod:`.interrupts`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import BenchError
from .inputs import FeatureRows, RequestSource
from .models import error_text

NORMAL = 2  # BatchPriority.NORMAL
N_LEVELS = 5
# What a run offered has until DRAIN_MULTIPLE times its duration after the duration ends
# to finish, at least DRAIN_MIN_S (so a short run's last batches are not cut off) and at
# most DRAIN_MAX_S. Counted from the duration, not from the last submission: a burst
# offers everything at once and then needs its whole duration to be served.
DRAIN_MULTIPLE = 1.0
DRAIN_MIN_S = 0.5
DRAIN_MAX_S = 60.0
# The most clients of a closed loop: each is a thread, and past a few thousand a run
# measures the scheduler and the drain more than the system (an open loop, --rate, offers
# more load from one thread).
MAX_CLIENTS = 4096
# The most arrivals one open-loop run or burst may offer: its schedule and the record of
# each request are held in memory, and a run past it would take far longer than its
# bound to count (a rate, duration or capacity that would go past it is refused).
MAX_ARRIVALS = 2_000_000
# An open loop's throughput: the arrivals that came in this first share of the window
# give the lag a run that keeps up shows (see open_span).
EARLY_SHARE = 0.1


def drain_window(duration_s: float) -> float:
    """Seconds past its duration that what a run of ``duration_s`` offered gets to finish."""
    return min(max(DRAIN_MULTIPLE * duration_s, DRAIN_MIN_S), DRAIN_MAX_S)


def _drained_by(t0: float, dur: float) -> float:
    """When a run started at ``t0`` with duration ``dur`` stops waiting for what it
    offered (``time.perf_counter`` time)."""
    return t0 + dur + drain_window(dur)


def _horizon(t0: float, dur: float, end: float) -> float:
    """Until when a request a run left unfinished counts as waiting: the end of the drain
    (or the run's ``end``, if later), whenever the run stopped waiting for it."""
    drained = _drained_by(t0, dur)
    return max(end, drained) if math.isfinite(drained) else end


def fmt_load_rate(rate: float) -> str:
    """A rate of requests/s as labels show it: whole from 10 (``1,125``), else 3
    significant digits."""
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.3g}"


@dataclass(frozen=True)
class Load:
    """The shape of a load. Exactly one of clients / rate / burst is the driver.

    ``seed`` makes the requests, priorities and arrivals; ``draw`` picks another arrival
    schedule of the same seed (0 for a load's first run, k for its k-th rerun): loads of
    one seed, rate and draw share their schedule, so systems compared on them see the
    same arrivals, and a rerun is not the same draw again."""

    kind: str  # "closed" | "rate" | "burst"
    clients: int = 1
    rate: float = 0.0
    burst: int = 0
    priorities: bool = False
    features: int = 64
    seed: int = 0
    source: RequestSource | None = None  # None: one float32 row of ``features`` values
    draw: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("closed", "rate", "burst"):
            raise BenchError(f"unknown load kind {self.kind!r}")
        if self.kind == "closed" and not 1 <= self.clients <= MAX_CLIENTS:
            raise BenchError(f"--clients must be from 1 to {MAX_CLIENTS:,} (each client is a "
                             f"thread; --rate offers more load from one), got {self.clients}")
        if self.kind == "rate" and not (self.rate > 0 and math.isfinite(self.rate)):
            raise BenchError(f"--rate must be a positive number, got {self.rate}")
        if self.kind == "burst" and self.burst < 1:
            raise BenchError(f"--burst must be >= 1, got {self.burst}")
        if self.features < 1:
            raise BenchError(f"--features must be >= 1, got {self.features}")
        if self.seed < 0:
            raise BenchError(f"--seed must be >= 0, got {self.seed}")
        if self.draw < 0:
            raise BenchError(f"a load's draw must be >= 0, got {self.draw}")

    @property
    def label(self) -> str:
        base = {
            "closed": f"{self.clients} client{'s' if self.clients != 1 else ''}",
            "rate": f"{fmt_load_rate(self.rate)} req/s Poisson",
            "burst": f"burst {self.burst}",
        }[self.kind]
        return base + (", mixed priorities" if self.priorities else "")

    def requests(self) -> list[Any]:
        """The sample requests this load cycles through (at least one)."""
        return (self.source or FeatureRows(self.features)).requests(self.seed)

    @property
    def n_threads(self) -> int:
        return self.clients if self.kind == "closed" else 1


@dataclass(frozen=True)
class Bounds:
    """Stop after ``requests`` requests or ``duration`` seconds, whichever comes first."""

    requests: int | None = None
    duration: float | None = None

    def __post_init__(self) -> None:
        if self.requests is None and self.duration is None:
            raise BenchError("give --requests or --duration (or both)")
        if self.requests is not None and self.requests < 1:
            raise BenchError(f"--requests must be >= 1, got {self.requests}")
        if self.duration is not None and not (self.duration > 0 and math.isfinite(self.duration)):
            raise BenchError(
                f"--duration must be a positive number of seconds, got {self.duration}"
            )


@dataclass(frozen=True)
class Schedule:
    """What an open loop or burst offers: ``n`` arrivals; an open loop's within its
    arrival ``window`` (seconds from the start), a burst's all at once (``window``
    None)."""

    n: int
    window: float | None

    @property
    def rate(self) -> float | None:
        """The load offered, in requests/s: the arrivals over the window."""
        return None if self.window is None else self.n / self.window


def schedule_of(load: Load, bounds: Bounds) -> Schedule | None:
    """The arrivals ``load`` offers within ``bounds`` (None for a closed loop).

    An open loop offers ``round(rate * duration)`` arrivals (at least one) over the
    duration, or, when ``bounds.requests`` is fewer, that many over the time they take
    at the rate (``requests / rate``): either way the arrivals over the window are the
    rate, to rounding. A burst offers its size (at most ``bounds.requests``).

    Raises:
        BenchError: more than :data:`MAX_ARRIVALS` arrivals.
    """
    if load.kind == "closed":
        return None
    if load.kind == "burst":
        n = load.burst if bounds.requests is None else min(load.burst, bounds.requests)
        if n > MAX_ARRIVALS:
            raise BenchError(f"--burst {n:,} is more than a run offers: at most "
                             f"{MAX_ARRIVALS:,} requests")
        return Schedule(n, None)
    if bounds.duration is not None:
        timed = load.rate * bounds.duration
        if bounds.requests is None or bounds.requests >= max(1, round(min(timed, 1e18))):
            check_arrivals(load.rate, bounds.duration,
                           f"--rate {fmt_load_rate(load.rate)} for --duration "
                           f"{bounds.duration:g}")
            return Schedule(max(1, round(timed)), bounds.duration)
    assert bounds.requests is not None
    n = bounds.requests
    if n > MAX_ARRIVALS:
        raise BenchError(f"--requests {n:,} at --rate {fmt_load_rate(load.rate)} is more "
                         f"than a run offers: at most {MAX_ARRIVALS:,} arrivals")
    return Schedule(n, n / load.rate)


def _fmt_count(n: float) -> str:
    return f"{n:,.0f}" if n < 1e15 else f"{n:.3g}"


def check_arrivals(rate: float, duration: float, what: str) -> None:
    """Refuse an open loop of ``rate`` requests/s for ``duration`` s whose schedule would
    hold more than :data:`MAX_ARRIVALS` arrivals: ``BenchError`` on one line, starting
    with ``what`` (the flags that make it)."""
    n = rate * duration
    if n > MAX_ARRIVALS:
        raise BenchError(
            f"{what} makes {_fmt_count(round(n) if math.isfinite(n) else n)} arrivals in "
            f"one run; a run offers at most {MAX_ARRIVALS:,}: lower the rate or the "
            "duration")


def open_span(window: float, arrived: np.ndarray, finished: np.ndarray,
              unfinished: bool = False, refused: bool = False) -> float:
    """The seconds an open loop's throughput counts its completed requests over.

    ``arrived`` and ``finished``: each completed request's scheduled arrival and its
    completion, in seconds from the start of the run. The throughput is the completed
    arrivals over the arrival ``window``, so a run that keeps up reads the load it was
    offered, whatever the latency of its last requests (one slow request is a tail, not
    a backlog); unless it fell behind: it ``refused`` requests, or its last arrivals,
    those of the last :data:`EARLY_SHARE` of the window, trailed their arrivals (the
    median of their lags, completion less arrival) by more than any of those of the
    first :data:`EARLY_SHARE` (at least the first) did, or none of them completed while
    requests were left ``unfinished``. Such a run served from its first arrival to its
    last completion, less the shortest early lag (the time any request takes): the
    throughput then reads the rate it served at. A run that kept up but left a request
    or two stuck still reads what it was offered.
    """
    if arrived.size == 0:
        return window
    early = arrived <= max(EARLY_SHARE * window, float(arrived.min()))
    lags = finished[early] - arrived[early]
    last = arrived >= (1.0 - EARLY_SHARE) * window
    if last.any():
        # Its last arrivals completed later after arriving than any early one: a backlog.
        trailing = float(np.median(finished[last] - arrived[last])) > float(lags.max())
    else:
        trailing = unfinished  # none of its last arrivals completed
    if not (refused or trailing):
        return window
    return max(window, float(finished.max()) - float(lags.min()))


@dataclass
class LoadResult:
    # Seconds, one per completed request, then one per unfinished request (its wait until
    # the end of the drain: a lower bound of its latency).
    latencies: np.ndarray
    priorities: np.ndarray  # int8, aligned with latencies
    submitted: int
    completed: int
    errors: int
    # From the first submission to the last completion; to the end of the drain when
    # requests were left unfinished.
    elapsed: float
    # "requests": all done; "duration": the time bound (duration, then drain) ended it.
    stopped_by: str
    # Offered but not done when the drain ended (see the module docstring).
    unfinished: int = 0
    first_error: str | None = None
    # Open loop: the arrivals its schedule puts within the run (however late a system
    # that cannot keep up takes them) and the window they arrive in, in seconds:
    # scheduled / window is the load offered.
    scheduled: int | None = None
    window: float | None = None
    # Open loop and burst: requests the target refused at submit (not in ``submitted``,
    # nor in the latencies: they were answered at once, with an error).
    refused: int = 0
    first_refusal: str | None = None
    # The seconds the throughput counts over (an open loop: open_span); None: elapsed.
    span: float | None = None
    # An open loop whose arrivals all came within its quickest request's time: too short
    # a run to show a rate it sustains (a slow system reads about what a fast one does).
    too_short: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        over = self.elapsed if self.span is None else self.span
        return self.completed / over if over > 0 else 0.0

    @property
    def offered_rate(self) -> float | None:
        """An open loop's offered load, in requests/s: its arrivals over its window."""
        if self.scheduled is None or not self.window:
            return None
        return self.scheduled / self.window


Tick = Callable[[int], None]


def _noop_tick(done: int) -> None:
    pass


def _priority_table(load: Load, n: int) -> list[int]:
    if not load.priorities:
        return [NORMAL]
    rng = np.random.default_rng(load.seed + 1)
    return rng.integers(0, N_LEVELS, size=max(1, min(n, 1 << 16))).tolist()  # type: ignore[no-any-return]


def run_load(target: Any, load: Load, bounds: Bounds, tick: Tick = _noop_tick) -> LoadResult:
    """Drive ``target`` (already started) with ``load`` until ``bounds``; measure it."""
    plan = schedule_of(load, bounds)
    n = bounds.requests if bounds.requests is not None else 1 << 62
    if plan is not None:
        n = plan.n
    dur = bounds.duration if bounds.duration is not None else math.inf
    if getattr(target, "is_async", False):
        return _run_async(target, load, n, dur, plan, tick)
    if load.kind == "closed":
        return _closed(target, load, n, dur, tick)
    assert plan is not None
    return _open(target, load, dur, plan, tick)


# -- sync drivers -------------------------------------------------------------------------


def _watch(threads: list[threading.Thread], count: Callable[[], int], tick: Tick) -> None:
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.1)
            tick(count())
    tick(count())


def _join_until(threads: list[threading.Thread], until: float, count: Callable[[], int],
                tick: Tick) -> None:
    """Wait for ``threads`` until the ``until`` (perf_counter) deadline, ticking."""
    pc = time.perf_counter
    for t in threads:
        while t.is_alive() and pc() < until:
            t.join(min(0.1, max(until - pc(), 0.0)))
            tick(count())


def _closed(target: Any, load: Load, n: int, dur: float, tick: Tick) -> LoadResult:
    tickets = itertools.count()
    prios = _priority_table(load, n)
    n_prios = len(prios)
    lats: list[list[float]] = [[] for _ in range(load.clients)]
    pris: list[list[int]] = [[] for _ in range(load.clients)]
    errors: list[BaseException] = []
    bound = ["requests"]
    start_gate = threading.Barrier(load.clients + 1)
    t0_box = [0.0]
    pool = load.requests()
    n_pool = len(pool)
    # Each client's call in progress (its start), and its lock: the run's end takes each
    # lock once, so a call that returns after it is not counted as completed too.
    inflight: list[tuple[float, int] | None] = [None] * load.clients
    locks = [threading.Lock() for _ in range(load.clients)]
    closed = [False]

    def client(i: int) -> None:
        call = target.call
        pc = time.perf_counter
        lat, pri, lock = lats[i], pris[i], locks[i]
        try:
            start_gate.wait()
        except threading.BrokenBarrierError:
            return  # the run ended before it began (Ctrl-C)
        deadline = t0_box[0] + dur
        while True:
            k = next(tickets)
            if k >= n:
                return
            t = pc()
            if t >= deadline:
                bound[0] = "duration"
                return
            p = prios[k % n_prios]
            inflight[i] = (t, p)
            failure = None
            try:
                call(pool[k % n_pool], p)
            except BaseException as exc:  # the model's SystemExit too: this request failed
                failure = exc
            with lock:
                if closed[0]:
                    return  # the run ended while this call was in progress
                inflight[i] = None
                if failure is not None:
                    errors.append(failure)
                    continue
                lat.append(pc() - t)
                pri.append(p)

    threads = [
        threading.Thread(target=client, args=(i,), name=f"bench-client-{i}", daemon=True)
        for i in range(load.clients)
    ]
    pc = time.perf_counter

    def count() -> int:
        return sum(map(len, lats))

    try:
        for t in threads:
            t.start()
        t0 = t0_box[0] = pc()
        start_gate.wait()
        _join_until(threads, t0 + dur, count, tick)
        _join_until(threads, _drained_by(t0, dur), count, tick)
    except BaseException:  # interrupted (Ctrl-C): the clients end
        closed[0] = True  # each after its call in progress
        start_gate.abort()  # ... or at once, if still waiting to begin
        raise
    closed[0] = True
    for lock in locks:
        with lock:
            pass  # a client in its bookkeeping has finished it; the others see closed
    end = pc()
    horizon = _horizon(t0, dur, end)
    late = [c for c in inflight if c is not None]
    if late:
        bound[0] = "duration"
    done = count()
    tick(done)
    return LoadResult(
        latencies=np.fromiter(itertools.chain(itertools.chain.from_iterable(lats),
                                              (horizon - t for t, _ in late)), float),
        priorities=np.fromiter(itertools.chain(itertools.chain.from_iterable(pris),
                                               (p for _, p in late)), np.int8),
        submitted=done + len(errors) + len(late),
        completed=done,
        errors=len(errors),
        elapsed=end - t0,
        stopped_by=bound[0],
        unfinished=len(late),
        first_error=_describe(errors[0]) if errors else None,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _Escaping) and exc.__cause__ is not None:
        exc = exc.__cause__
    return error_text(exc)


class _Escaping(Exception):
    """A request's ``SystemExit`` or ``KeyboardInterrupt`` (its ``__cause__``), raised
    by the model and passed on by the system, carried through an asyncio run as an
    ``Exception``: asyncio lets those two out of its loop, which would end the run."""


def _contained(acall: Callable[..., Any]) -> Callable[..., Any]:
    """``acall``, raising what asyncio would let out of its loop as :class:`_Escaping`;
    no real Ctrl-C arrives there (the loop runs on a thread of its own)."""

    async def call(item: Any, priority: int) -> Any:
        try:
            return await acall(item, priority)
        except (SystemExit, KeyboardInterrupt) as exc:
            raise _Escaping(_describe(exc)) from exc

    return call


def _schedule(load: Load, plan: Schedule) -> np.ndarray | None:
    """Arrival offsets (seconds from start) for an open loop; None for a burst: the
    ``plan.n`` arrivals of a Poisson process that has that many in ``plan.window`` (its
    exponential gaps, the one after the last included, scaled to the window)."""
    if load.kind != "rate" or plan.window is None:
        return None
    rng = np.random.default_rng((load.seed, load.draw))
    times = np.cumsum(rng.exponential(1.0, size=plan.n + 1))
    return times[:-1] * (plan.window / times[-1])  # type: ignore[no-any-return]


def arrival_times(load: Load, bounds: Bounds) -> np.ndarray | None:
    """The arrival offsets (seconds from the start) an open loop of ``load`` within
    ``bounds`` is run with; None for another kind of load."""
    plan = schedule_of(load, bounds)
    return None if plan is None else _schedule(load, plan)


def _unsent(t0: float, sched: np.ndarray | None, first: int, total: int) -> np.ndarray:
    """The arrivals (``time.perf_counter`` times) of requests ``first`` to ``total`` of a
    run started at ``t0``: all at ``t0`` for a burst, else as scheduled."""
    if first >= total:
        return np.empty(0)
    if sched is None:
        return np.full(total - first, t0)
    return t0 + sched[first:total]


class _Marks:
    """When each request of a run completed, as its done-callback saw it. ``mark`` is the
    one callback shared by every request: one dict store per request, whichever thread
    completes it (the harness's own cost is in every system's figures, and a callback
    made per request, a ``partial``, would add objects for the cyclic garbage collector to
    walk). A future a target returns for several requests (a cache's) has its callback
    run once per request, in their order: those later times are kept apart. Each future
    stays referenced for the run, so its id is not reused; ``len()`` is the progress."""

    def __init__(self) -> None:
        first: dict[int, float] = {}
        again: list[tuple[int, float]] = []
        pc = time.perf_counter

        def mark(fut: Any) -> None:
            key = id(fut)
            if key in first:
                again.append((key, pc()))
            else:
                first[key] = pc()

        self.mark = mark
        self._first = first
        self._again = again

    def __len__(self) -> int:
        return len(self._first) + len(self._again)

    def times(self, futs: list[Any]) -> list[float | None]:
        """The completion time of each request of ``futs`` (its futures, in the order
        the requests were submitted); None where none was seen."""
        later: dict[int, collections.deque[float]] = {}
        for key, t in list(self._again):
            later.setdefault(key, collections.deque()).append(t)
        seen: set[int] = set()
        out: list[float | None] = []
        for f in futs:
            key = id(f)
            if key in seen:
                kept = later.get(key)
                out.append(kept.popleft() if kept else None)
            else:
                seen.add(key)
                out.append(self._first.get(key))
        return out


def _submitted_arrivals(submitted: int, refused_at: list[int]) -> list[int] | range:
    """The arrival index of each submitted request, in order, given the arrivals refused
    (``refused_at``, ascending) among the first ``submitted + len(refused_at)``."""
    if not refused_at:
        return range(submitted)
    refused = set(refused_at)
    return [i for i in range(submitted + len(refused_at)) if i not in refused]


def _wait_for_all(futs: list[Any], until: float, count: Callable[[], int],
                  tick: Tick) -> None:
    """Wait until every one of ``futs`` is done or the ``until`` (perf_counter) deadline,
    reporting progress. The newest first: once it is done most others are too, so the
    watching thread wakes about every 0.1 s, not per request, and takes no CPU from the
    system under test while it serves the run."""
    pc = time.perf_counter
    for f in reversed(futs):
        while True:
            left = until - pc()
            if left <= 0.0:
                return
            try:
                f.exception(timeout=min(left, 0.1))
            except FutureTimeout:
                tick(count())
                continue
            except CancelledError:
                pass
            break


def _open(target: Any, load: Load, dur: float, plan: Schedule, tick: Tick) -> LoadResult:
    """Burst and Poisson open loop: one generator thread, futures collected."""
    total = plan.n
    sched = _schedule(load, plan)
    prios = _priority_table(load, total)
    n_prios = len(prios)
    pool = load.requests()
    n_pool = len(pool)
    sub: list[float] = []
    futs: list[Future[Any]] = []
    state = _open_state(plan, sched)
    # No lock between the generator and the run's end: the generator alone writes `sub`,
    # `futs` and `refused_at` (the arrivals refused), each arrival's outcome in one store
    # (`sub` before `futs`), and checks `closed` before each arrival. The end sets
    # `closed`, then reads how many were submitted, then how many refused: the arrival in
    # progress is in at most one of the two, and every arrival after those counted is late.
    refused_at: list[int] = []
    closed = [False]
    marks = _Marks()
    mark = marks.mark

    def generate() -> None:
        submit = target.submit
        pc = time.perf_counter
        sleep = time.sleep
        add_arrival, add_future = sub.append, futs.append
        t0 = state["t0"]
        for i in range(total):
            if closed[0]:
                return  # the drain has ended: what is left is counted late
            if sched is not None:
                t = t0 + sched[i]
                now = pc()
                if t > now:
                    sleep(t - now)
            else:
                t = t0  # a burst arrives all at once
            try:
                f = submit(pool[i % n_pool], prios[i % n_prios])
            except BaseException as exc:  # refused (a full queue): the next arrival still comes
                state["first_refusal"] = state["first_refusal"] or _describe(exc)
                refused_at.append(i)
                continue
            add_arrival(t)
            add_future(f)
            f.add_done_callback(mark)

    gen = threading.Thread(target=generate, name="bench-generator", daemon=True)
    pc = time.perf_counter
    t0 = state["t0"] = pc()
    try:
        gen.start()
        _join_until([gen], t0 + dur, marks.__len__, tick)
        drained_by = _drained_by(t0, dur)
        _join_until([gen], drained_by, marks.__len__, tick)
        # Wait for what was submitted (bounded), still reporting progress.
        _wait_for_all(futs[:], drained_by, marks.__len__, tick)
    except BaseException:  # interrupted (Ctrl-C): the generator submits nothing more
        closed[0] = True
        raise
    closed[0] = True
    m = len(futs)
    refused = len(refused_at)
    # The counts as read: an arrival still in progress is late, its refusal too.
    counted = dict(state, refused=refused,
                   first_refusal=state["first_refusal"] if refused else None)
    end = pc()
    # Arrivals the generator never submitted, blocked in a submit past the drain or too
    # slow to keep to its schedule, are late too.
    late = _unsent(t0, sched, m + refused, total)
    arrivals = _submitted_arrivals(m, refused_at[:refused])
    res = _collect(futs[:m], sub, marks.times(futs[:m]), prios, counted, end,
                   _horizon(t0, dur, end), late, arrivals)
    tick(res.completed + res.errors)
    return res


def _open_state(plan: Schedule, sched: np.ndarray | None) -> dict[str, Any]:
    """The bookkeeping an open loop or burst shares with :func:`_collect`."""
    return {"t0": 0.0, "first_refusal": None, "refused": 0,
            "scheduled": None if sched is None else plan.n, "window": plan.window}


def _collect(
    futs: list[Any],
    sub: list[float],
    done: list[float | None],
    prios: list[int],
    state: dict[str, Any],
    end: float,
    horizon: float,
    late: np.ndarray,
    arrivals: Sequence[int] | None = None,
) -> LoadResult:
    """The result of an open loop: ``futs`` (``sub``: their arrivals, ``done``: when their
    done-callbacks saw them complete, None if not yet) submitted by ``end``, and
    ``late``: the arrivals of requests never submitted by then. A future not done when
    this looks at it is unfinished; it and ``late`` wait until ``horizon``; a cancelled
    one failed. ``state["refused"]`` requests were refused at submit; ``arrivals``: the
    arrival index of each of ``futs`` (its priority's), by default its position."""
    m = len(futs)
    lat: list[float] = []
    pri: list[int] = []
    arrived: list[float] = []
    errors = 0
    first_error = None
    t0 = state["t0"]
    last = t0
    n_prios = len(prios)
    if arrivals is None:
        arrivals = range(m)
    # Each future is looked at once: one that completes meanwhile (the target is still
    # running) is counted completed or unfinished, never both.
    unfinished: list[tuple[float, int]] = []
    for i in range(m):
        f = futs[i]
        if not f.done():
            unfinished.append((sub[i], i))
            continue
        exc = CancelledError() if f.cancelled() else f.exception()
        if exc is not None:
            errors += 1
            first_error = first_error or _describe(exc)
            continue
        d = done[i]
        if d is None:  # completed between the last check and now; callback not yet run
            d = time.perf_counter()
        lat.append(d - sub[i])
        arrived.append(sub[i])
        pri.append(prios[arrivals[i] % n_prios])
        last = max(last, d)
    completed = len(lat)
    window = state.get("window")
    span = None
    too_short = False
    if window is not None:  # an open loop: the completed arrivals over its window
        start = np.asarray(arrived, dtype=float) - t0
        span = open_span(window, start, start + np.asarray(lat, dtype=float),
                         unfinished=len(unfinished) + len(late) > 0,
                         refused=state.get("refused", 0) > 0)
        too_short = bool(completed > 0 and window < min(lat))
    # Unfinished requests: their wait until the horizon, a lower bound of their latency.
    lat += [horizon - t for t, _ in unfinished]
    pri += [prios[arrivals[i] % n_prios] for _, i in unfinished]
    refused = state.get("refused", 0)
    first_late = m + refused
    late_pri = np.take(np.asarray(prios, dtype=np.int8),
                       np.arange(first_late, first_late + len(late)) % n_prios)
    left = len(unfinished) + len(late)
    return LoadResult(
        latencies=np.concatenate([np.asarray(lat, dtype=float), horizon - late]),
        priorities=np.concatenate([np.asarray(pri, dtype=np.int8), late_pri]),
        submitted=m,
        completed=completed,
        errors=errors,
        elapsed=max((end if left else last) - t0, 1e-9),
        # Every arrival answered: the run ended with its requests (an open loop's window
        # only set how many there were).
        stopped_by="duration" if left else "requests",
        unfinished=left,
        first_error=first_error,
        scheduled=state.get("scheduled"),
        window=window,
        refused=refused,
        first_refusal=state.get("first_refusal"),
        span=span,
        too_short=too_short,
    )


# -- async driver (targets with ``acall``) ------------------------------------------------


def _run_async(target: Any, load: Load, n: int, dur: float, plan: Schedule | None,
               tick: Tick) -> LoadResult:
    box: dict[str, Any] = {}
    progress = [0]  # a closed loop's completions
    marks = _Marks()  # an open loop's
    abandoned = threading.Event()

    async def main() -> LoadResult:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        box["cancel"] = functools.partial(loop.call_soon_threadsafe, task.cancel)
        if abandoned.is_set():  # interrupted before ``cancel`` was there to be called
            raise asyncio.CancelledError
        return await _async_main(target, load, n, dur, plan, progress, marks)

    def thread_main() -> None:
        try:
            box["result"] = asyncio.run(main())
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=thread_main, name="bench-asyncio", daemon=True)
    try:
        t.start()
        while t.is_alive():
            t.join(0.1)
            tick(progress[0] + len(marks))
    except BaseException:  # interrupted (Ctrl-C): the loop's clients and requests end
        abandoned.set()
        cancel = box.get("cancel")
        if cancel is not None:
            with contextlib.suppress(RuntimeError):  # its loop has closed: it was done
                cancel()
        raise
    if "error" in box:
        raise box["error"]
    res: LoadResult = box["result"]
    tick(res.completed)
    return res


async def _async_main(
    target: Any, load: Load, n: int, dur: float, plan: Schedule | None, progress: list[int],
    marks: _Marks,
) -> LoadResult:
    acall = _contained(target.acall)
    prios = _priority_table(load, n)
    n_prios = len(prios)
    pool = load.requests()
    n_pool = len(pool)
    pc = time.perf_counter
    if load.kind == "closed":
        tickets = itertools.count()
        lat: list[float] = []
        pri: list[int] = []
        errors: list[BaseException] = []
        bound = ["requests"]
        inflight: list[tuple[float, int] | None] = [None] * load.clients
        t0 = pc()
        deadline = t0 + dur

        async def client(i: int) -> None:
            while True:
                k = next(tickets)
                if k >= n:
                    return
                t = pc()
                if t >= deadline:
                    bound[0] = "duration"
                    return
                p = prios[k % n_prios]
                inflight[i] = (t, p)
                try:
                    await acall(pool[k % n_pool], p)
                except asyncio.CancelledError:
                    raise  # the run's end
                except BaseException as exc:  # the model's GeneratorExit too
                    errors.append(exc)
                    continue
                finally:
                    inflight[i] = None
                lat.append(pc() - t)
                pri.append(p)
                progress[0] += 1

        clients = [asyncio.ensure_future(client(i)) for i in range(load.clients)]
        await _wait_until(clients, deadline)
        await _wait_until(clients, _drained_by(t0, dur))
        end = pc()
        horizon = _horizon(t0, dur, end)
        late = [c for c in inflight if c is not None]
        await _cancel(clients)
        if late:
            bound[0] = "duration"
        return LoadResult(
            latencies=np.asarray(lat + [horizon - t for t, _ in late], dtype=float),
            priorities=np.asarray(pri + [p for _, p in late], dtype=np.int8),
            submitted=len(lat) + len(errors) + len(late),
            completed=len(lat),
            errors=len(errors),
            elapsed=end - t0,
            stopped_by=bound[0],
            unfinished=len(late),
            first_error=_describe(errors[0]) if errors else None,
        )

    assert plan is not None
    total = plan.n
    sched = _schedule(load, plan)
    sub: list[float] = []
    futs: list[asyncio.Task[Any]] = []
    state = _open_state(plan, sched)
    state["t0"] = pc()
    drained_by = _drained_by(state["t0"], dur)

    mark = marks.mark
    loop = asyncio.get_running_loop()
    for i in range(total):
        now = pc()
        if now >= drained_by:
            break  # the drain has ended: what is left is counted late
        if sched is not None:
            # Behind its schedule, it still yields once per arrival, so that the
            # requests it made run and the drain's end is seen.
            t = state["t0"] + sched[i]
            await asyncio.sleep(max(t - now, 0.0))
        else:
            t = state["t0"]  # a burst arrives all at once; making its tasks runs none
        task = loop.create_task(acall(pool[i % n_pool], prios[i % n_prios]))
        sub.append(t)
        futs.append(task)
        task.add_done_callback(mark)
    await _wait_until(futs, drained_by)
    end = pc()
    unsent = _unsent(state["t0"], sched, len(futs), total)
    result = _collect(futs, sub, marks.times(futs), prios, state, end,
                      _horizon(state["t0"], dur, end), unsent)
    # After _collect (a cancelled task is done): what it found unfinished.
    await _cancel([f for f in futs if not f.done()])
    return result


async def _wait_until(tasks: list[Any], until: float) -> None:
    """Wait for ``tasks`` until the ``until`` (perf_counter) deadline."""
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=max(until - time.perf_counter(), 0.0))


async def _cancel(tasks: list[Any]) -> None:
    """Cancel ``tasks`` and let them unwind (the run has ended)."""
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks)

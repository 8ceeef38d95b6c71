"""The batching controller: how many rows to aim for, and how long to wait for them.

Per-batch Python work: ``plan()`` runs once before each batch is popped and
``observe_*`` once after it; nothing here runs per request.

The policy (docs/architecture.md, "The controller"):

* While a batch is in flight (popped, and its delivery not begun) the next one keeps
  filling, within ``batch_timeout`` of its oldest request's arrival: the model is busy, so
  dispatching early would only queue a small batch behind it, but a call that overruns
  (``OVERRUN_FACTOR`` times its fitted time, or hangs) never holds queued requests past
  the ceiling while a worker is free to start another.
  The controller owns this policy: it counts batches in flight (``batch_started`` /
  ``batch_ended``) and tells the queue, whose pop applies the plan.
* Once nothing is in flight, the batch goes as soon as arrivals pause for ``idle_gap``,
  a sixteenth of the fitted fixed cost per batch (``a / 16``): a straggler left for a
  batch of its own costs a whole fixed cost, while waiting for it costs at most 6% of
  one. Unless the batch fills on pace: at the rate its rows came, it would be full
  within one fixed cost (``fill_time = a``). Then a pause is a hiccup in a wave of
  arrivals (clients coming back after a delivery, delayed by the GIL), and going would
  leave the rest of the wave a call of its own; at a slower rate the stragglers cost
  less than waiting for them. A wave as large as the last batch (as many requests and
  rows, back within one fixed cost of its end) goes at once: nothing more of it is
  coming.
  Neither applies to requests carried across the last call (they came while it ran, as
  an open load's do; the call ends when its results begin to reach its callers,
  ``batch_answered``): they go at once, unless that call's delivery brings its clients
  back in a wave (rows after its end at more than 8 times the rate the carried ones
  came); then they wait for the wave, up to ``batch_timeout`` after the end, so a few
  closed-loop clients split across one call merge again instead of alternating. The
  queue tells the two apart (``RequestQueue.pop_batch``); the plan is the same.
  Nor to a model whose idle gap would be under ``SHORTEST_IDLE_GAP`` (a fixed cost
  under 0.8 ms): so short a timed wait lasts the OS's timer slack, many times the gap.
  At low load an idle worker therefore takes what is queued almost at once (for a
  model with a 5 ms fixed cost, 0.3 ms; for a model of microseconds, nothing); under
  load, batches fill.
* ``batch_timeout`` bounds every wait (measured from the oldest request's arrival,
  whether or not a batch is in flight; for requests carried across a call, which may be
  older, from that call's end); it is a ceiling, never a default delay.
* The target size grows toward the throughput-optimal size of the fitted latency model
  ``t(rows) = a + b*rows + c*rows**2``: ``rows / t(rows)`` peaks at ``sqrt(a / c)``
  (at ``max_batch_size`` when cost grows at most linearly, or when a call at the
  optimum is shorter than the GIL's switch interval: ``LatencyModel.optimal_rows``).
  Every term is fitted at zero or above, and a curvature counts only if it is
  significant (``LatencyModel._fit``).
* Classic inputs stay: a backed-up queue grows the target, failures of a batch
  (each request of it then succeeding on a smaller call) halve it
  (``reduce_batch_on_failure``), memory pressure caps it.
* How many batches are in progress at once (``CallSlots``, at most ``max_workers``) is
  found by trying (``ConcurrencyTuner``): one until three quarters of the batches of two
  windows in a row leave a full batch waiting (the load outruns one call at a time; one
  such window is a burst of a Poisson load near capacity), then two (one
  running, the next filling), and above two the controller tries one more and keeps it
  only if rows per second rose by 10%, and one fewer after a step up that did not pay;
  each try is measured side by side with the number before it, and a try that fails
  waits longer each time before the next. Below that backlog one
  call at a time is what a model whose calls serialize (a lock, the GIL) does best: the
  next call takes everything that arrived during the last one, where a second call
  would be sealed early and wait at the lock. At saturation a model behind one lock (a
  GPU) stays at two, so the next batch is ready when the lock frees; one whose calls
  contend for the GIL goes back to one, where two carry fewer rows (calls that only
  take turns at equal rows may rest at any number up to the last step up); a model that
  runs in parallel (I/O, GIL-free native code) climbs toward
  ``max_workers``. FIXED runs ``max_workers`` at once and tunes nothing.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from .config import BatchProcessingStrategy, BatchProcessorConfig, as_int

logger = logging.getLogger(__name__)

# Memory pressure levels, as the health monitor reports them, and the share of the
# throughput-optimal size each allows.
MEMORY_OK, MEMORY_WARNING, MEMORY_CRITICAL = "ok", "warning", "critical"
_MEMORY_SHARE = {MEMORY_OK: 1.0, MEMORY_WARNING: 0.5, MEMORY_CRITICAL: 0.0}


# The share of the fixed cost per batch a filling batch waits for the next arrival.
IDLE_GAP_SHARE = 1.0 / 16
# The shortest idle gap worth waiting for, s: a timed wait lasts at least the thread's
# timer slack (50 us by default on Linux) plus a wake-up, so a shorter gap would cost
# many times itself (a model of microseconds, whose gap is a fraction of one).
SHORTEST_IDLE_GAP = 50e-6
# A call in flight overruns once it has run this many times the model's usual time for its
# rows (a hang, an outlier). Only then may requests queued past batch_timeout start a
# call of their own beside it: a call of normal length, however long, is waited for.
OVERRUN_FACTOR = 2.0
_INF = float("inf")
# A fitted curvature counts only if it explains this many times more of the batch times
# than its share of the noise would: an F-test at one degree of freedom, at about the 5%
# level. Refitted every 16 batches, a curvature noise let through is soon dropped again.
CURVATURE_F = 4.0


class Plan(NamedTuple):
    """What the next pop asks of the queue (see ``RequestQueue.pop_batch``)."""

    target_rows: int
    max_wait: float
    idle_gap: float | None
    fill_time: float = 0.0


class LatencyModel:
    """Batch time as a function of rows, ``a + b*r + c*r**2``, fitted online.

    Exponentially weighted least squares over the sufficient statistics, so old
    measurements fade (half-life of ``halflife`` batches) and a change in the model's
    cost is followed. Refitted every ``refit_every`` observations. No term is below
    zero, and a curvature counts only if it explains the times significantly better
    than a line (``_fit``).
    """

    # Measurements that are each fitted at once; later ones are held to OVERRUN_FACTOR
    # times the prediction.
    TRUSTED_AFTER = 8

    def __init__(self, halflife: float = 200.0, refit_every: int = 16) -> None:
        self._decay = 0.5 ** (1.0 / halflife)
        self._refit_every = refit_every
        # Weighted (fading) sums of r**k for k = 0..4, of t * r**k for k = 0..2; of t**2
        # (the residual) and of the squared weights (how many observations they make).
        self._sr = [0.0] * 5
        self._st = [0.0] * 3
        self._sq = [0.0] * 2
        self._since_fit = 0
        self.observations = 0
        self.a = 0.0
        self.b = 0.0
        self.c = 0.0
        self.mean_time = 0.0
        self.mean_rows = 0.0

    def observe(self, rows: int, seconds: float) -> bool:
        """Add one batch's measurement; True when the coefficients were refitted.
        ``seconds`` that is not a finite time, >= 0 (NaN from a broken clock), is left
        out: one would poison the sums for good.

        Once fitted, a measurement counts as at most ``OVERRUN_FACTOR`` times the
        prediction: one call that hung for seconds would otherwise inflate the fixed
        cost, and with it every wait sized from it, for hundreds of batches. A lasting
        change of cost is still followed, the cap rising with the fit. Before that
        (the first ``TRUSTED_AFTER``), a measurement under 1/``OVERRUN_FACTOR`` of the
        prediction starts the fit over: the first calls of many models are slow once
        (a warm-up), and would set the usual time, and when a call overruns, for
        hundreds of batches."""
        if not 0.0 <= seconds < _INF:
            return False  # NaN, infinite or negative: no time a call took
        # Runs once per batch: unrolled (the loop over k cost twice as much).
        d = self._decay
        sr, st = self._sr, self._st
        r = float(rows)
        r2 = r * r
        if self.observations:
            predicted = self.a + self.b * r + self.c * r2
            if self.observations >= self.TRUSTED_AFTER:
                if 0.0 < OVERRUN_FACTOR * predicted < seconds:
                    seconds = OVERRUN_FACTOR * predicted
            elif OVERRUN_FACTOR * seconds < predicted:
                # A cold start: the calls before this one were slow once (CUDA or JIT
                # initialisation, a first-call compile), not the model's cost. Start
                # over.
                self._sr = sr = [0.0] * 5
                self._st = st = [0.0] * 3
                self._sq = [0.0] * 2
                self.observations = 0
        sr[0] = sr[0] * d + 1.0
        sr[1] = sr[1] * d + r
        sr[2] = sr[2] * d + r2
        sr[3] = sr[3] * d + r2 * r
        sr[4] = sr[4] * d + r2 * r2
        st[0] = st[0] * d + seconds
        st[1] = st[1] * d + seconds * r
        st[2] = st[2] * d + seconds * r2
        sq = self._sq
        sq[0] = sq[0] * d + seconds * seconds
        sq[1] = sq[1] * d * d + 1.0
        self.observations += 1
        self._since_fit += 1
        if self._since_fit >= self._refit_every or self.observations <= self.TRUSTED_AFTER:
            self._fit()
            return True
        return False

    def _fit(self) -> None:
        self._since_fit = 0
        sr, st = self._sr, self._st
        n = sr[0]
        self.mean_rows = sr[1] / n
        self.mean_time = st[0] / n
        var_r = sr[2] / n - self.mean_rows**2
        if var_r <= 1e-9 * max(1.0, self.mean_rows**2):
            # Every batch had the same size: the fixed and per-row costs cannot be told
            # apart, so assume the worst case for waiting decisions (all of it is fixed).
            self.a, self.b, self.c = self.mean_time, 0.0, 0.0
            return
        fit, gain, line, line_gain = _bounded_fit(sr, st)
        if fit[2] > 0.0 and not self._curvature_is_significant(gain - line_gain, gain):
            fit = line
        self.a, self.b, self.c = fit

    def _curvature_is_significant(self, extra_gain: float, gain: float) -> bool:
        """An F-test of the fitted curvature against the best line: does it explain more
        of the times than the noise it leaves would by chance? A curvature fitted from
        noise caps batches at its optimum, all of that size from then on, and what they
        measure could never show it wrong. ``extra_gain``: the squared error the curvature
        removes; ``gain``: the fit's (its squared error is ``sum(w * t**2) - gain``)."""
        n = self._sr[0]
        n_eff = n * n / self._sq[1]  # observations the fading weights amount to
        residual = max(self._sq[0] - gain, 0.0)
        return n_eff > 3.0 and extra_gain * (n_eff - 3.0) > CURVATURE_F * residual

    def optimal_rows(self, upper: int) -> int:
        """The batch size that maximises rows per second, capped at ``upper``.

        A convex fit's optimum, ``sqrt(a/c)``, counts only if a call at it lasts at
        least the interpreter's switch interval (``sys.getswitchinterval()``, 5 ms by
        default); for shorter calls this returns ``upper``. A thread that wants the GIL
        waits up to one switch interval for it, so a call shorter than that is timed
        with the waits of a busy process in it, and bigger batches come when the
        process is busiest (a backlog): a curvature of the process, not the model,
        which would hold a backed-up queue to a few rows a call. (Read when the
        controller replans: after a refit, every 16 batches, or a change of target.)"""
        if self.c <= 0.0 or self.a <= 0.0:
            # No fixed cost fitted beside a curvature: big batches' times, noisier in
            # absolute terms, hide a real one more often than not (a cost with none would
            # run best one row a call, and one with a fixed cost would lose half its
            # throughput there).
            return upper
        if self.c * upper * upper < 0.2 * (self.a + self.b * upper):
            return upper  # the curvature is too small to matter up to the cap
        optimum = max(1.0, math.sqrt(self.a / self.c))
        if self.predict(optimum) < sys.getswitchinterval():
            return upper
        return int(min(upper, optimum))

    def predict(self, rows: float) -> float:
        return self.a + self.b * rows + self.c * rows * rows


# The faces of a, b, c >= 0 that _bounded_fit solves after the fixed cost alone, by the
# terms each leaves free (the others held at zero): those without the curvature first,
# fewer terms first.
_FACES = ((1,), (0, 1), (2,), (0, 2), (1, 2))
# How much more a fit must explain to replace one with fewer terms: more than rounding.
_BETTER = 1.0 + 1e-9


def _bounded_fit(sr: list[float], st: list[float]
                 ) -> tuple[tuple[float, float, float], float, tuple[float, float, float], float]:
    """Least squares of ``a + b*r + c*r**2`` with ``a, b, c >= 0`` over the weighted
    sums of ``LatencyModel._fit`` (at least two sizes among them).

    No term of a cost is below zero: where the unconstrained fit puts one there (noise,
    a concave cost, or a cost of exactly ``a + c*r**2`` or ``c*r**2``, which fits a hair
    below zero), the minimum under the bounds lies on a face of them, so each face is
    solved with its other terms held at zero and the best fit is taken (an active-set
    search, as for non-negative least squares). Of fits as good as each other (two sizes
    fit a line and a curve alike) the one with fewer terms, and without a curvature,
    is kept: a face must gain more than rounding to replace one before it.
    Returns the best fit and its gain (``theta . st``: at a face's own least squares
    the squared error is the weighted sum of ``t**2`` less that, so the best face
    gains the most), and the best without a curvature and its gain.
    """
    s0, s1, s2, s3, s4 = sr
    t0, t1, t2 = st
    # The fixed cost alone (the weighted mean) always fits.
    best = line = (t0 / s0, 0.0, 0.0)
    best_gain = line_gain = t0 * t0 / s0
    for free in _FACES:
        theta = [0.0, 0.0, 0.0]
        if len(free) == 1:
            i = free[0]
            theta[i] = st[i] / sr[2 * i]
        else:
            i, j = free
            m_ii, m_ij, m_jj = sr[2 * i], sr[i + j], sr[2 * j]
            d = m_ii * m_jj - m_ij * m_ij
            if d <= 1e-12 * m_ii * m_jj:
                continue
            theta[i] = (st[i] * m_jj - m_ij * st[j]) / d
            theta[j] = (m_ii * st[j] - m_ij * st[i]) / d
        gain = theta[0] * t0 + theta[1] * t1 + theta[2] * t2
        if min(theta) >= 0.0 and gain > best_gain * _BETTER:
            best, best_gain = (theta[0], theta[1], theta[2]), gain
            if free[-1] != 2:
                line, line_gain = best, best_gain
    full = _solve3([[s0, s1, s2], [s1, s2, s3], [s2, s3, s4]], st)
    if full is not None and min(full) >= 0.0:
        gain = full[0] * t0 + full[1] * t1 + full[2] * t2
        if gain > best_gain * _BETTER:
            best, best_gain = full, gain
    return best, best_gain, line, line_gain


def _solve3(m: list[list[float]], v: list[float]) -> tuple[float, float, float] | None:
    """Solve a 3x3 linear system by Cramer's rule; None if it is (near) singular."""
    def det(x: list[list[float]]) -> float:
        return (x[0][0] * (x[1][1] * x[2][2] - x[1][2] * x[2][1])
                - x[0][1] * (x[1][0] * x[2][2] - x[1][2] * x[2][0])
                + x[0][2] * (x[1][0] * x[2][1] - x[1][1] * x[2][0]))

    d = det(m)
    scale = abs(m[0][0] * m[1][1] * m[2][2]) or 1.0
    if abs(d) <= 1e-12 * scale:
        return None
    out = []
    for col in range(3):
        mc = [row[:] for row in m]
        for i in range(3):
            mc[i][col] = v[i]
        out.append(det(mc) / d)
    return out[0], out[1], out[2]


class LateWatch(Protocol):
    """Where the thread watching for requests past ``batch_timeout`` waits between its
    looks (``CallSlots.watch_with``): the queue's ``await_late`` (engine/workers.py)."""

    def wakes(self) -> int:
        """How many times ``wake`` was called; read before ``wait``."""

    def wait(self, first_look: float, timeout: float, since: int) -> None:
        """Wait ``first_look`` seconds, then until a request is late, at most
        ``timeout`` in all; at once if ``wake`` was called since ``since``."""

    def wake(self) -> None:
        """End the ``wait`` in progress (or the next, if it read ``wakes`` before)."""


class CallSlots:
    """A counting gate: how many batches may be popped and run at once.

    Unlike a semaphore its limit can change while threads wait on it.
    """

    def __init__(self, limit: int) -> None:
        # Taken directly (a C-level context manager) on the per-batch paths; the
        # Condition over it only for the rare wait.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._limit = limit
        self._busy = 0
        self._watched = False  # a thread waits in acquire() with the watch
        # The watcher dozes through an idle spell (see acquire's ``idle``); read
        # unlocked by wake_dozer on every batch.
        self.dozing = False
        # Where the watcher waits between looks, the GIL released (``watch_with``), and
        # whether it waits there now; how many threads wait on the condition, and how
        # many of them a notify woke that have not yet returned (a freed slot goes to
        # one of the others, else to the watcher).
        self._watch: LateWatch | None = None
        self._watch_waiting = False
        self._cond_waiters = 0
        self._cond_woken = 0

    @property
    def limit(self) -> int:
        return self._limit

    def try_acquire(self) -> bool:
        """Take a slot if one is free, without waiting."""
        with self._lock:
            return self._take_locked()

    def _take_locked(self) -> bool:
        if self._busy < self._limit:
            self._busy += 1
            return True
        return False

    def acquire(self, timeout: float, watch_timeout: float | None = None,
                idle: Callable[[], bool] | None = None) -> bool:
        """Take a slot if one is free, else wait once for one: False if none was taken
        (the wait timed out, or another thread took the slot it was woken for).

        With ``watch_timeout``, one waiting thread at a time waits only that long: the
        watch (``WorkerPool`` looks for requests overdue past ``batch_timeout``). With a
        ``LateWatch`` (``watch_with``) it waits there instead: at least that long, then
        on until a request is late, at most ``timeout``. The others wait ``timeout``,
        without waking every watch period for nothing; a watcher that takes a slot
        wakes one of them to take the watch over.
        With ``idle`` (asked under this lock: True if no batch is running and none can
        begin unseen), the watcher dozes instead: it waits ``timeout`` too, unless
        ``wake_dozer`` (a batch began) or a freed slot wakes it first.
        """
        with self._lock:
            if self._take_locked():
                return True
            watching = watch_timeout is not None and not self._watched
            if watch_timeout is None or not watching:
                self._wait_locked(timeout)
            else:
                self._watched = True
                # Set before asking: a batch that begins after the answer sees it.
                self.dozing = idle is not None
                try:
                    if idle is not None and idle():
                        self._wait_locked(timeout)
                    else:
                        self.dozing = False
                        if self._watch is None:
                            self._wait_locked(watch_timeout)
                        else:
                            self._watch_locked(self._watch, watch_timeout, timeout)
                finally:
                    self._watched = False
                    self.dozing = False
            if not self._take_locked():
                return False
            if watching:
                self._notify_locked()
            return True

    def watch_with(self, watch: LateWatch) -> None:
        """Have the watcher wait in ``watch`` between its looks instead of on this
        gate's condition: there it wakes for a request that waited too long or a freed
        slot only, and without the GIL: a thread that took it every look would hold up
        the worker and the callers it hands results to, for nothing in nearly every
        look (the requests were popped in time)."""
        self._watch = watch

    def _wait_locked(self, timeout: float) -> None:
        self._cond_waiters += 1
        notified = False
        try:
            notified = self._cond.wait(timeout)
        finally:
            self._cond_waiters -= 1
            # A notify a wait timing out took is not seen here (the wait says it timed
            # out): the count errs by one until the waiters are gone, toward waking the
            # watcher too, never toward a freed slot that wakes nobody.
            self._cond_woken = max(0, min(self._cond_woken - notified, self._cond_waiters))

    def _watch_locked(self, watch: LateWatch, first_look: float, timeout: float) -> None:
        """Wait in the watch, this gate's lock let go meanwhile: a slot freed once
        ``wakes`` is read (under the lock) ends the wait (``_wake_one_locked``)."""
        since = watch.wakes()
        self._watch_waiting = True
        self._lock.release()
        try:
            watch.wait(first_look, timeout, since)
        finally:
            self._lock.acquire()
            self._watch_waiting = False

    def _notify_locked(self) -> None:
        self._cond_woken = min(self._cond_woken + 1, self._cond_waiters)
        self._cond.notify()

    def _notify_all_locked(self) -> None:
        self._cond_woken = self._cond_waiters
        self._cond.notify_all()

    def _wake_one_locked(self) -> None:
        """Wake one thread waiting for a slot: one on the condition, else the watcher
        waiting in the watch."""
        watch = self._watch
        if (watch is not None and self._watch_waiting
                and self._cond_waiters <= self._cond_woken):
            watch.wake()
        else:
            self._notify_locked()

    def _wake_all_locked(self) -> None:
        self._notify_all_locked()
        if self._watch is not None and self._watch_waiting:
            self._watch.wake()

    def wake_dozer(self) -> None:
        """A batch began: a dozing watcher must watch it (it may overrun), so it is woken
        (with every waiter: it is not told apart from them, and this is once an idle
        spell). Called for every batch: without a doze, one unlocked read."""
        if self.dozing:
            with self._lock:
                if self.dozing:
                    self.dozing = False
                    self._notify_all_locked()

    def took_over(self) -> None:
        """The watcher took over the slot of a call that overruns (or a delivery that
        stalls): requests waited past ``batch_timeout`` behind it while this worker was
        free. The count is unchanged; one of the threads still waiting is woken to take
        the watch over."""
        with self._lock:
            self._notify_locked()

    def release(self, wake: bool = True) -> None:
        """Free a slot. ``wake=False`` when the releasing thread comes back for one at
        once (a worker after its batch, while the queue is open): it runs on and takes
        the slot again before a woken thread could, so the wake-up (and GIL hand-off)
        would be paid on every batch for nothing."""
        with self._lock:
            self._busy -= 1
            if wake:
                self._wake_one_locked()

    def wake_all(self) -> None:
        """Wake every thread waiting for a slot (the queue closed)."""
        with self._lock:
            self._wake_all_locked()

    def set_limit(self, limit: int) -> None:
        with self._cond:
            self._limit = limit
            self._wake_all_locked()


# What a trial of another call limit tries: two calls at once after one, one call more
# or one fewer while busy, or one call after a quiet spell.
_TWO, _MORE, _FEWER, _ONE = "two", "more", "fewer", "one"


class _Trial:
    """Another call limit tried side by side with the one before it: measurement windows
    alternate between them (before, tried, before, tried, ...) until each limit has
    ``windows`` of them, and the verdict compares their rows per second, each limit's
    windows pooled: the limit tried is kept if it carries ``needed`` times the rows per
    second of the one before or more. One window against the next swings widely on a
    busy machine (another process, a GC pass, the thread consuming the results);
    alternating spreads such a spell over both limits instead of deciding on it. A
    verdict clear after the first window at the limit tried (a ratio ``clear`` times
    beyond ``needed``, either way) is taken then."""

    __slots__ = ("_clear", "_counts", "_rows", "_seconds", "_windows", "before", "kind",
                 "needed", "tried")

    def __init__(self, kind: str, before: int, tried: int, needed: float, rows: int,
                 seconds: float, windows: int, clear: float) -> None:
        self.kind = kind
        self.before = before
        self.tried = tried
        self.needed = needed
        self._windows = windows
        self._clear = clear
        # [before, tried]: the window that began the trial is the first at ``before``.
        self._rows = [rows, 0]
        self._seconds = [seconds, 0.0]
        self._counts = [1, 0]

    def record(self, rows: int, seconds: float) -> int | None:
        """Count the window just run (the limits alternate, so it was at ``tried`` when
        ``before`` has more windows); returns the limit for the next window, or None
        when the trial is over (its last window was at ``tried``)."""
        arm = int(self._counts[0] > self._counts[1])
        self._rows[arm] += rows
        self._seconds[arm] += seconds
        self._counts[arm] += 1
        if min(self._counts) >= self._windows:
            return None
        if self._counts[1] == 1 and arm:
            ratio = self.ratio()
            if ratio >= self.needed * self._clear or ratio * self._clear < self.needed:
                return None
        return self.before if arm else self.tried

    def ratio(self) -> float:
        """Rows per second at ``tried`` over rows per second at ``before``."""
        before = self._rows[0] / self._seconds[0]
        tried = self._rows[1] / self._seconds[1]
        if before > 0:
            return tried / before
        return float("inf") if tried > 0 else 1.0  # batches of no rows: no difference

    def kept(self) -> bool:
        return self.ratio() >= self.needed


class ConcurrencyTuner:
    """Sizes the number of concurrent calls from what the last batches saw.

    - Idle (no request left waiting when batches finish): one call at a time. A second
      worker parked in the queue would only take turns with the first one, which costs
      a thread wake-up per request at low load (benchmarks/bench_round_trip.py).
    - Outrun: at least OUTRUN_SHARE of the batches of OUTRUN_WINDOWS windows in a row
      left a full batch (``target`` rows) waiting when they finished, so the load
      outruns one call at a time (one such window comes now and then from a Poisson
      load near capacity: a burst, which one call at a time absorbs). Then two at once
      (one running, the next filling), kept only if two carried about as many rows per
      second as one (TWO_LOSS: calls that serialize on the GIL lose by running two;
      then back to one for a cooldown).
      A full batch left now and then, or after half the calls (a Poisson load just
      below capacity), is not enough: there one call at a time takes all that arrived
      during the last call as soon as it ends, while a second call would seal the next
      batch early (at ``batch_timeout``) and, on a model whose calls serialize (a lock,
      the GIL), only queue it behind the first, a whole call later and with fewer rows.
    - Backlogged (BACKLOG_SHARE of a window's batches) at two or more: hill-climb on
      measured rows per second, trying one more call and keeping it if rows per
      second rose by GAIN. After a step up that did not pay (or at ``max_limit``), the
      next try is one call fewer, kept if it carries as many rows per second (one
      against two: if two carried under TWO_LOSS of one), and on down while steps
      down are kept: a limit kept on a lucky window is not kept for good.
    - Each such try is a trial (``_Trial``): windows alternate between the limit tried
      and the one before it, TRIAL_WINDOWS each, and the verdict pools each limit's
      windows, so that one slow window on a shared machine does not decide it; a try
      whose first window is CLEAR times beyond what it needs, either way (a step that
      doubles the rows per second), is decided on that window.
    - A try that did not pay (a step up or down, or two that carried less than one;
      also a step down to one that was kept) is not made again for a cooldown of
      COOLDOWN windows, doubled after each try in a row that failed, up to
      MOST_COOLDOWN: under an open load below capacity more calls never carry more
      (the load is what it is), and every try seals batches early.
    - QUIET_WINDOWS windows in a row not backlogged: back to one, kept only if the
      windows at one carry at least QUIET_LOSS of the rows per second before. No
      request waits either when every one is in flight (a closed loop that the calls in
      use serve in parallel): then one call carries far less, the limit comes back,
      and the next try at one waits twice as many quiet windows. A window whose batches
      were mostly full (FULL_SHARE reached a target above the smallest one) is not
      quiet: a load that fills every batch is no light one, and the try would cost a
      window at one call.
    """

    WINDOW_BATCHES = 16      # batches per measurement window ...
    WINDOW_SECONDS = 0.05    # ... and at least this long, so timer noise averages out
    GAIN = 1.10              # a probe must beat the baseline by 10% to be kept
    COOLDOWN = 8             # windows to wait after a failed try before the next ...
    MOST_COOLDOWN = 8 * COOLDOWN  # ... doubled after each failed try in a row, up to this
    QUIET_WINDOWS = 8        # windows without waiting requests before going back to one
    BACKLOG_SHARE = 0.5      # share of a window's batches leaving a full batch: backlogged
    OUTRUN_SHARE = 0.75      # ... and the share that shows one call at a time outrun
    OUTRUN_WINDOWS = 2       # ... in this many windows in a row (one is a Poisson burst)
    FULL_SHARE = 0.75        # share of a window's batches at their target: not quiet
    TWO_LOSS = 0.98          # two calls carrying under this share of one's rows: back to one
    QUIET_LOSS = 0.90        # one call carrying under this share of the rows before: undo
    MOST_QUIET_WINDOWS = 8 * QUIET_WINDOWS  # the longest wait between tries at one
    TRIAL_WINDOWS = 2        # windows at each limit before a try's verdict (_Trial) ...
    CLEAR = 1.3              # ... unless the first window at the limit tried is this far
                             # beyond the ratio needed, either way

    def __init__(self, slots: CallSlots, max_limit: int) -> None:
        self.slots = slots
        self._busy_floor = min(2, max_limit)
        self._max = max_limit
        self._start = time.monotonic()
        self._rows = 0
        self._batches = 0
        self._backlogged = 0  # batches of this window that left a full batch waiting
        self._full = 0  # batches of this window that reached their target
        self._outrun = 0  # windows in a row that outran one call at a time
        self._quiet = 0
        self._trial: _Trial | None = None
        self._quiet_needed = self.QUIET_WINDOWS
        self._cooldown = 0
        self._next_cooldown = self.COOLDOWN
        self._fewer_next = False  # the next try of a busy spell is a step down
        # The model's calls take turns (the GIL) rather than overlap: so taken until a
        # trial of two calls against one (a try at two, or a step down to one) finds two
        # carrying as many rows, and from then on as the last such trial found. Taken
        # wrongly for a model whose calls overlap, it costs the time of each delivery
        # not hidden behind the next call until its first try at two (the load outruns
        # one call); taken wrongly the other way, a model holding the GIL pays a thread
        # wake-up and a delivery contending with the next call for the GIL on every
        # batch of a backlog.
        self.serialized = True

    def observe(self, rows: int, backlog: bool, full: bool = False) -> tuple[int, int] | None:
        """Count a finished batch (``full``: it reached its target; ``backlog``: it left
        a full batch waiting); returns (old, new) limit when it changed."""
        self._rows += rows
        self._batches += 1
        self._backlogged += backlog
        self._full += full
        now = time.monotonic()
        elapsed = now - self._start
        if self._batches < self.WINDOW_BATCHES or elapsed < self.WINDOW_SECONDS:
            return None
        window_rows = self._rows
        backlogged = self._backlogged >= self.BACKLOG_SHARE * self._batches
        outrun = self._backlogged >= self.OUTRUN_SHARE * self._batches
        filled = self._full >= self.FULL_SHARE * self._batches
        self._start, self._rows, self._batches, self._backlogged, self._full = now, 0, 0, 0, 0
        self._outrun = self._outrun + 1 if outrun else 0
        self._quiet = 0 if backlogged or filled else self._quiet + 1
        limit = self.slots.limit
        trial = self._trial
        if trial is not None:
            next_limit = trial.record(window_rows, elapsed)
            if next_limit is not None:  # the trial goes on at the other limit
                self.slots.set_limit(next_limit)
                return limit, next_limit
            self._trial = None
            undone = self._judge(trial)
            if undone is not None or self._cooldown:
                return undone  # a cooldown counts the windows after the verdict's
            limit = self.slots.limit
        if self._outrun >= self.OUTRUN_WINDOWS and limit < self._busy_floor:
            if self._cooldown:
                self._cooldown -= 1
                return None
            return self._try(_TWO, self._busy_floor, window_rows, elapsed)
        if self._quiet >= self._quiet_needed and limit > 1:
            self._quiet = self._cooldown = 0
            return self._try(_ONE, 1, window_rows, elapsed)
        if self._cooldown:
            self._cooldown -= 1
            return None
        if backlogged and limit >= self._busy_floor:
            if limit > 1 and (self._fewer_next or limit >= self._max):
                return self._try(_FEWER, limit - 1, window_rows, elapsed)
            if limit < self._max:
                return self._try(_MORE, limit + 1, window_rows, elapsed)
        return None

    def _try(self, kind: str, tried: int, rows: int, seconds: float) -> tuple[int, int]:
        """Begin a trial of ``tried`` calls, this window (``rows`` in ``seconds``) the
        first at the limit before it."""
        before = self.slots.limit
        self._trial = _Trial(kind, before, tried, self._needed(kind, tried), rows, seconds,
                             self.TRIAL_WINDOWS, self.CLEAR)
        self.slots.set_limit(tried)
        return before, tried

    def _judge(self, trial: _Trial) -> tuple[int, int] | None:
        """Apply a finished trial (the limit is its ``tried`` one): (old, new) when it
        goes back to the limit before, None when the tried one is kept."""
        kind = trial.kind
        kept = trial.kept()
        if kind is _ONE:
            if kept:
                self._quiet_needed = self.QUIET_WINDOWS
                return None
            # Quiet because every request was in flight, served by the calls dropped.
            self._quiet_needed = min(2 * self._quiet_needed, self.MOST_QUIET_WINDOWS)
            self._quiet = 0
            return self._undo(trial)
        # Two calls that carry fewer rows than one only take turns (the GIL) and contend
        # while doing so.
        to_one = kind is _FEWER and trial.tried == 1
        if kind is _TWO:
            self.serialized = not kept
        elif to_one:
            self.serialized = kept
        # After a step up that did not pay, the next try is a step down (the calls in
        # use may not pay either), and so on down while steps down are kept.
        self._fewer_next = (kind is _MORE and not kept) or (kind is _FEWER and kept)
        if not kept:
            self._cool_down()
            return self._undo(trial)
        if to_one:
            self._cool_down()  # as after a try at two that failed
            return None
        self._next_cooldown = self.COOLDOWN
        if trial.tried >= self._max:
            # No step up is left, and the step down that comes next would compare the
            # same two limits again at once.
            self._cooldown = self.COOLDOWN
        return None

    def _needed(self, kind: str, tried: int) -> float:
        """The ratio of rows per second (tried / before) that keeps the limit tried."""
        if kind is _ONE:
            return self.QUIET_LOSS
        if kind is _TWO:
            return self.TWO_LOSS
        if kind is _MORE:
            return self.GAIN
        # _FEWER: kept if the fewer calls carry as much. Between that and GAIN the calls
        # in use stay: a step down that may lose up to what a step up must gain would,
        # step after step, settle far below the best. One against two: the line that
        # tells them apart, TWO_LOSS, either way.
        return 1.0 / self.TWO_LOSS if tried == 1 else 1.0

    def _undo(self, trial: _Trial) -> tuple[int, int]:
        self.slots.set_limit(trial.before)
        return trial.tried, trial.before

    def _cool_down(self) -> None:
        self._cooldown = self._next_cooldown
        self._next_cooldown = min(2 * self._next_cooldown, self.MOST_COOLDOWN)


class Controller:
    """Decides each batch's target rows and wait; thread-safe.

    What ``plan()`` returns changes only when the target, the fitted model or the memory
    level does, so it is rebuilt then (``_replan``, under the lock) and ``plan()``, which
    runs before every batch, is one attribute read unless the queue is backed up.
    """

    def __init__(self, config: BatchProcessorConfig, queue: Any = None) -> None:
        self._config = config
        if queue is not None:
            # The queue counts batches in flight for its fill wait (the policy is ours,
            # applied by its pop).
            self.batch_started = queue.begin_batch  # type: ignore[method-assign]
            self.batch_answered = queue.answer_batch  # type: ignore[method-assign]
            self.batch_ended = queue.end_batch  # type: ignore[method-assign]
        self._queue = queue
        self._lock = threading.Lock()
        self._current = config.initial_batch_size
        self._memory = MEMORY_OK
        self.model = LatencyModel()
        strategy = config.processing_strategy
        if not config.enable_adaptive_batching:
            strategy = BatchProcessingStrategy.FIXED
        self.strategy = strategy
        # ADAPTIVE's plans keep a pop filling while a batch is in flight (the queue's
        # fill wait); FIXED's and GREEDY's wait only their own delay.
        self.fills_while_in_flight = strategy is BatchProcessingStrategy.ADAPTIVE
        # FIXED is the hands-off strategy: all max_workers run, nothing is tuned.
        tuned = strategy is not BatchProcessingStrategy.FIXED
        self.slots = CallSlots(1 if tuned else config.max_workers)
        self._tuner = ConcurrencyTuner(self.slots, config.max_workers) if tuned else None
        self._debug = config.debug_mode
        self._ceiling: int
        self._plan: Plan
        self._replan()  # sets both

    @property
    def current_batch_size(self) -> int:
        return self._current

    @property
    def calls_serialize(self) -> bool:
        """Whether the model's calls take turns rather than overlap: until a trial of
        two calls at once against one (a try at two, or a step down to one) has run,
        yes; then as the last one found (``ConcurrencyTuner.serialized``)."""
        return self._tuner is not None and self._tuner.serialized

    @property
    def memory_level(self) -> str:
        return self._memory

    def set_batch_size(self, rows: int) -> int:
        """Manual override (``update_batch_size``), clamped into [min, max]; pops planned
        before it (waiting for requests, or for a batch to fill) plan again."""
        number = as_int(rows)  # any integer the config takes (numpy's too), not a bool
        if number is None:
            raise TypeError(f"batch size must be an int, got {rows!r}")
        cfg = self._config
        with self._lock:
            self._current = min(max(number, cfg.min_batch_size), cfg.max_batch_size)
            self._replan()
            current = self._current
        self._retarget()
        return current

    def _replan(self) -> None:
        """Recompute the size ceiling and the plan from the target, the model and the
        memory level; called (under the lock) whenever one of them changes."""
        cfg = self._config
        optimal = self.model.optimal_rows(cfg.max_batch_size)
        self._ceiling = max(cfg.min_batch_size, int(optimal * _MEMORY_SHARE[self._memory]))
        strategy = self.strategy
        if strategy is BatchProcessingStrategy.ADAPTIVE:
            fixed_cost = max(self.model.a, 0.0)
            gap = fixed_cost * IDLE_GAP_SHARE
            # A model too fast to wait for: no idle gap, no pace (the fill while a batch
            # is in flight and the ceiling stay).
            self._plan = (Plan(self._current, cfg.batch_timeout, 0.0, 0.0)
                          if gap < SHORTEST_IDLE_GAP else
                          Plan(self._current, cfg.batch_timeout, gap, fixed_cost))
        else:  # FIXED waits up to batch_timeout to fill; GREEDY never waits
            wait = cfg.batch_timeout if strategy is BatchProcessingStrategy.FIXED else 0.0
            self._plan = Plan(self._current, wait, None)

    def plan(self, queued_rows: int) -> Plan:
        plan = self._plan  # one attribute read; the lock only when the target may grow
        if queued_rows >= 2 * plan.target_rows and self._tuner is not None:
            plan = self._grow(queued_rows)
        return plan

    def _grow(self, queued_rows: int) -> Plan:
        with self._lock:
            target = self._current
            if queued_rows >= 2 * target:
                # A backed-up queue: bigger batches drain it at a lower cost per row.
                grown = min(self._ceiling, 2 * target)
                if grown > target:
                    self._log("queue backed up (%d rows queued): target %d -> %d",
                              queued_rows, target, grown)
                    self._current = grown
                    self._replan()
            return self._plan

    def observe_batch(self, rows: int, seconds: float, target: int,
                      queued_rows: int = 0) -> None:
        """A batch of ``rows`` succeeded in ``seconds``; ``target`` is what it aimed for and
        ``queued_rows`` what was left waiting in the queue when it finished."""
        with self._lock:
            refitted = self.model.observe(rows, seconds)
            if self._tuner is None:
                return  # FIXED
            # A batch at the smallest target (max_batch_size 1, a critical memory
            # level) is full whatever the load: it tells nothing.
            full = rows >= target > self._config.min_batch_size
            changed = self._tuner.observe(rows, backlog=queued_rows >= target, full=full)
            if changed is not None:
                self._log("concurrent batches %d -> %d", *changed)
            if refitted:
                self._replan()
            ceiling = self._ceiling
            current = self._current
            if rows >= target and current < ceiling:
                # Full batches mean the load can fill bigger ones: grow by a quarter.
                new = min(ceiling, current + max(1, current // 4))
            elif current > ceiling:
                new = ceiling
            else:
                return
            self._log("batch of %d rows in %.3f ms: target %d -> %d",
                      rows, seconds * 1e3, current, new)
            self._current = new
            self._replan()

    def overrun_after(self, rows: int) -> float:
        """Seconds into a call of ``rows`` rows after which it overruns: ``OVERRUN_FACTOR``
        times the fitted time for its size (before any fit: 0, any call overruns)."""
        model = self.model
        return 0.0 if model.observations == 0 else OVERRUN_FACTOR * model.predict(rows)

    def batch_started(self) -> None:
        """A popped batch is in flight: the next pop keeps filling (within the ceiling).
        (With a queue, the queue's own method: one call per batch, no Python frame.)"""

    def batch_answered(self) -> None:
        """A batch's results (or its failure) are about to reach its callers: what
        arrives from now on is their wave, not requests carried across the call."""

    def batch_ended(self) -> None:
        """A batch's calls are over (the delivery of all its requests begins, or it is
        abandoned): once none is in flight, pops that are filling switch to the idle
        rule (go once arrivals pause)."""

    def observe_failure(self) -> None:
        cfg = self._config
        if not cfg.reduce_batch_on_failure or self.strategy is BatchProcessingStrategy.FIXED:
            return
        with self._lock:
            new = max(cfg.min_batch_size, self._current // 2)
            if new == self._current:
                return
            self._log("batch failed: target %d -> %d", self._current, new)
            self._current = new
            self._replan()
        self._retarget()

    def set_memory_level(self, level: str) -> None:
        if level not in _MEMORY_SHARE:
            raise ValueError(f"unknown memory level {level!r}")
        with self._lock:
            if level == self._memory:
                return
            self._memory = level
            self._replan()
            if self.strategy is BatchProcessingStrategy.FIXED:
                return
            if self._current <= self._ceiling:
                return
            self._log("memory %s: target %d -> %d", level, self._current, self._ceiling)
            self._current = self._ceiling
            self._replan()
        self._retarget()

    def _retarget(self) -> None:
        """The target was set or lowered: pops planned before (a worker waiting for
        requests, or for a batch to fill) plan again, so the next batch has the new one."""
        if self._queue is not None:
            self._queue.retarget()

    def _log(self, msg: str, *args: object) -> None:
        if self._debug:
            logger.debug(msg, *args)

"""A bench run's length is bounded, however overloaded the system.

The overload is made deterministic: a model that blocks on an event until the test
releases it, so nothing completes during the run. A run of ``DURATION`` seconds then
ends within its drain (:func:`drain_window`, past the duration) plus stopping the
target; what it offered is reported unfinished, its latency at least its wait, and the
processor is stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
from hanging import CallsThatDoNotEnd
from waiting import wait_for

from batchproc import BatchProcessor, BatchProcessorConfig
from batchproc.bench import interrupts, report, runner
from batchproc.bench.loads import (
    DRAIN_MAX_S,
    DRAIN_MIN_S,
    Bounds,
    Load,
    arrival_times,
    drain_window,
    run_load,
)
from batchproc.bench.runner import run_limit, run_target
from batchproc.bench.targets import Batchproc, BatchprocAsync, NoBatching
from batchproc.log_limits import plural

DURATION = 0.2
# The run's drain and the target's stop, with room for a loaded machine; the model stays
# blocked for far longer (BLOCKED_S), so a run that waited for it could not pass.
BOUND_S = DURATION + drain_window(DURATION) + 4.0
BLOCKED_S = 30.0


class Blocked:
    """A model that blocks every call until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.release.wait(BLOCKED_S)
        return batch


class Recording:
    """A progress display that keeps what it is told."""

    def __init__(self) -> None:
        self.done: list[int] = []
        self.summary = ""  # the last
        self.summaries: list[str] = []

    def start(self, label: str, total: int | None, duration: float | None) -> None:
        pass

    def update(self, done: int) -> None:
        self.done.append(done)

    def finish(self, summary: str) -> None:
        self.summary = summary
        self.summaries.append(summary)


@pytest.fixture
def blocked():
    model = Blocked()
    before = set(threading.enumerate())
    yield model
    model.release.set()
    for thread in set(threading.enumerate()) - before:
        if thread.name.startswith(("batchproc", "bench")):
            thread.join(10)
            assert not thread.is_alive(), f"{thread.name} left running"


def test_the_drain_is_a_multiple_of_the_run_within_bounds():
    assert drain_window(0.01) == DRAIN_MIN_S
    assert drain_window(2.0) == 2.0
    assert drain_window(1e6) == DRAIN_MAX_S


@pytest.mark.parametrize("target", [Batchproc(max_batch=4), BatchprocAsync(max_batch=4)],
                         ids=["threads", "asyncio"])
def test_an_overloaded_open_loop_ends_within_its_drain(blocked, target):
    progress = Recording()
    started = time.monotonic()
    run = run_target(target, blocked, "blocked", Load("rate", rate=200.0, features=4),
                     Bounds(duration=DURATION), progress)
    took = time.monotonic() - started
    assert took < BOUND_S
    assert blocked.entered.is_set()
    assert run.failed is None and run.stopped_by == "duration"
    # Nothing completed: every request it offered is unfinished, none an error (the
    # target was stopped only after the run was counted).
    assert run.completed == 0 and run.errors == 0
    assert run.unfinished == run.submitted == run.scheduled > 0
    # Each waited at least the drain: latencies are not flattered by leaving them out.
    assert run.p50_ms >= drain_window(DURATION) * 1000
    assert run.elapsed_s >= DURATION + drain_window(DURATION)
    assert "unfinished" in progress.summaries[0]
    # The processor was stopped with the run: nothing is left to serve.
    assert target._p.shutdown_event.is_set()


def test_an_overloaded_closed_loop_ends_within_its_drain(blocked):
    started = time.monotonic()
    run = run_target(Batchproc(max_batch=4), blocked, "blocked",
                     Load("closed", clients=3, features=4), Bounds(duration=DURATION))
    assert time.monotonic() - started < BOUND_S
    assert run.completed == 0 and run.errors == 0
    assert run.unfinished == run.submitted == 3
    assert run.p50_ms >= drain_window(DURATION) * 1000
    assert run.stopped_by == "duration"


def test_an_inline_model_that_blocks_the_generator_counts_every_arrival_late(blocked):
    # No batching runs the model in the generator's own submit: blocked there, it never
    # offers the rest of its arrivals, which are late all the same.
    started = time.monotonic()
    res = run_load(_started(NoBatching(), blocked), Load("rate", rate=200.0, features=4),
                   Bounds(duration=DURATION))
    assert time.monotonic() - started < BOUND_S
    assert res.submitted == 0 and res.completed == 0
    assert res.unfinished == res.scheduled > 1
    assert len(res.latencies) == res.unfinished
    assert res.latencies.min() >= drain_window(DURATION)


def test_a_burst_that_blocks_its_generator_counts_the_whole_burst_late(blocked):
    res = run_load(_started(NoBatching(), blocked), Load("burst", burst=25, features=4),
                   Bounds(duration=DURATION))
    assert res.unfinished == 25 and res.completed == 0
    assert res.stopped_by == "duration"


def test_a_burst_has_its_whole_duration_to_be_served(blocked):
    # A burst is offered at once; its drain counts from the duration, not from its last
    # submission: served 1 s in (after a drain counted from the submission, 0.5 s, it
    # would all be late), it completes within its 2 s.
    release = threading.Timer(1.0, blocked.release.set)
    release.start()
    try:
        run = run_target(Batchproc(max_batch=4), blocked, "blocked",
                         Load("burst", burst=20, features=4), Bounds(duration=2.0))
    finally:
        release.cancel()
    assert run.unfinished == 0 and run.completed == 20
    assert run.stopped_by == "requests"


@pytest.mark.parametrize("target", [Batchproc(max_batch=4), BatchprocAsync(max_batch=4)],
                         ids=["threads", "asyncio"])
def test_a_burst_cut_by_its_drain_says_the_time_bound_stopped_it(blocked, target):
    # Every request of the burst was submitted (the request bound was never reached):
    # the end of the drain stopped the run.
    run = run_target(target, blocked, "blocked", Load("burst", burst=20, features=4),
                     Bounds(duration=DURATION))
    assert run.submitted == run.unfinished == 20 and run.completed == 0
    assert run.stopped_by == "duration"
    assert report.row_cells(run)[-1] == "0 + 20 late *"


@pytest.mark.parametrize("target", [Batchproc(max_batch=4), BatchprocAsync(max_batch=4)],
                         ids=["threads", "asyncio"])
def test_a_runs_end_leaves_its_unfinished_requests_to_the_report(blocked, target, caplog):
    # The run counts what it left unfinished itself: the processor's warning that its stop
    # failed them would repeat it (with another count) in the middle of the progress.
    with caplog.at_level(logging.INFO, logger="batchproc.processor"):
        run = run_target(target, blocked, "blocked", Load("burst", burst=20, features=4),
                         Bounds(duration=DURATION))
    assert run.unfinished == 20
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # Only that stop: a processor stopped by anyone else still says it.
    p = BatchProcessor(BatchProcessorConfig())
    p.enqueue_predict(np.ones((1, 4), np.float32))  # never started: failed by stop
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="batchproc.processor"):
        p.stop()
    assert [r.getMessage() for r in caplog.records] == [
        "batchproc stopped: 1 request failed with ProcessorStoppedError"]


def test_unsent_and_queued_requests_wait_until_the_same_horizon():
    # The same overload (a model of 20 ms per call, arrivals every 50 us): no batching's
    # generator runs the model itself and gives up at the end of the duration with most
    # arrivals unsent; batchproc takes them all and leaves them queued. Both systems'
    # requests left count to the end of the drain, so their latencies compare.
    load = Load("rate", rate=DENSE_RATE, features=4)
    drained = DURATION + drain_window(DURATION)
    blocked = Blocked()
    systems = {"no batching": _started(NoBatching(), Slow(0.02)),
               "batchproc": _started(Batchproc(max_batch=1, workers=1), blocked)}
    try:
        results = {name: run_load(t, load, Bounds(duration=DURATION))
                   for name, t in systems.items()}
    finally:
        blocked.release.set()
        systems["batchproc"].stop()
    for name, res in results.items():
        left = res.latencies[res.completed:]
        assert res.unfinished > 0 and left.size == res.unfinished, name
        assert res.stopped_by == "duration", name
        # The last arrival is within the duration: it waited at least the drain.
        assert left.min() >= drain_window(DURATION), name
        assert left.max() <= drained + 4.0, name  # generous: a loaded machine
    first_nb = results["no batching"].latencies[results["no batching"].completed:].max()
    first_bp = results["batchproc"].latencies[results["batchproc"].completed:].max()
    # The earliest arrival left waited from near the start to the horizon, in both.
    assert first_nb >= drained - 0.05 and first_bp >= drained - 0.05


@pytest.mark.parametrize("target", [Batchproc(max_batch=4), BatchprocAsync(max_batch=4)],
                         ids=["threads", "asyncio"])
def test_a_run_that_keeps_up_leaves_nothing_unfinished(target):
    run = run_target(target, lambda b: b, "identity",
                     Load("rate", rate=200.0, features=4), Bounds(duration=DURATION))
    assert run.unfinished == 0 and run.completed == run.submitted == run.scheduled
    assert run.elapsed_s < DURATION + drain_window(DURATION)
    # It ended with its last request, not at its time bound (the window only set how
    # many arrivals there were): no "*" and no note saying the time bound stopped it.
    assert run.stopped_by == "requests"
    assert not report.row_cells(run)[-1].endswith("*")
    assert not any("time bound" in note for note in report.run_notes([run]))


class Slow:
    """A model that takes ``seconds`` per call (at least: an event that is never set)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._never = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self._never.wait(self.seconds)
        return batch


class InlineAsync:
    """An async target that runs its model inline, holding up the event loop."""

    is_async = True

    def __init__(self, model) -> None:
        self._model = model

    async def acall(self, item: np.ndarray, priority: int):
        return self._model(item)


# Dense enough that a generator running a model of SLOW_S per call cannot keep up.
DENSE_RATE = 20000.0


@pytest.mark.parametrize(
    ("make_target", "seconds"),
    [(NoBatching, 0.02), (NoBatching, DURATION * 1.5), (InlineAsync, DURATION * 1.5)],
    ids=["threads-many-calls", "threads-one-call", "asyncio"],
)
def test_arrivals_a_slow_generator_never_submitted_are_late(make_target, seconds):
    # The model is slow, not blocked: the generator falls behind its schedule, gives up at
    # the end of the duration, and the arrivals it never submitted are late all the same.
    model = Slow(seconds)
    target = make_target(model) if make_target is InlineAsync else _started(make_target(), model)
    load = Load("rate", rate=DENSE_RATE, features=4)
    res = run_load(target, load, Bounds(duration=DURATION))
    assert res.errors == 0 and res.stopped_by == "duration"
    assert 0 < res.submitted < res.scheduled
    assert res.scheduled == res.completed + res.unfinished
    assert len(res.latencies) == res.scheduled
    unsent = res.scheduled - res.submitted
    assert res.unfinished >= unsent
    # Each waited from its scheduled arrival to the end of the drain, the horizon of
    # every request a run leaves, however early its generator gave up.
    arrivals = arrival_times(load, Bounds(duration=DURATION))[res.submitted:]
    drained = DURATION + drain_window(DURATION)
    assert np.all(res.latencies[-unsent:] >= drained - arrivals - 1e-9)
    # The completed ones waited for the model.
    assert res.latencies[:res.completed].min() >= seconds


def test_a_burst_a_slow_generator_did_not_submit_is_late():
    res = run_load(_started(NoBatching(), Slow(0.02)), Load("burst", burst=1000, features=4),
                   Bounds(duration=DURATION))
    assert res.errors == 0 and res.stopped_by == "duration"
    assert 0 < res.submitted < 1000
    assert res.completed + res.unfinished == 1000
    # All arrived at the start of the burst: each unsent one waited the whole duration
    # and its drain.
    assert res.latencies[res.completed:].min() >= DURATION + drain_window(DURATION) - 1e-9


def test_the_table_and_its_notes_say_what_was_late(blocked):
    run = run_target(Batchproc(max_batch=4), blocked, "blocked",
                     Load("rate", rate=200.0, features=4), Bounds(duration=DURATION))
    assert report.fmt_completed(run) == f"0 + {run.unfinished:,} late"
    assert report.row_cells(run)[-1] == f"0 + {run.unfinished:,} late *"
    assert any(f"{plural(run.unfinished, 'request')} (late) unfinished" in note
               for note in report.run_notes([run]))
    assert run.to_dict()["unfinished"] == run.unfinished


def _started(target, model):
    target.start(model)
    return target


def test_a_max_queue_size_given_to_the_bench_takes_its_queue_levels_along():
    # The bench sets the health levels to its queue's size (a burst fills it on
    # purpose); a smaller max_queue_size from --config takes them along, not refused.
    target = Batchproc(max_batch=4, queue_size=20_000, fields={"max_queue_size": 100})
    config = target.config()
    assert (config.max_queue_size, config.queue_warning_threshold,
            config.queue_critical_threshold) == (100, 100, 100)
    given = Batchproc(max_batch=4, fields={"max_queue_size": 100,
                                           "queue_warning_threshold": 10})
    assert given.config().queue_warning_threshold == 10


class Refusing:
    """A sync target that refuses every ``every``-th submit, as a full queue that does
    not wait would; the others complete at once."""

    name = "refusing"
    is_async = False

    def __init__(self, every: int) -> None:
        self.every = every
        self.submits = 0

    def start(self, model) -> None:
        self.model = model

    def submit(self, item, priority):
        self.submits += 1
        if self.submits % self.every == 0:
            raise RuntimeError("queue full")
        f: Future = Future()
        f.set_result(self.model(item))
        return f

    def stop(self) -> None:
        pass

    def stats(self) -> dict:
        return {}


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("load", [Load("burst", burst=30, features=4),
                                  Load("rate", rate=300.0, features=4)],
                         ids=["burst", "rate"])
def test_every_arrival_is_accounted_when_the_target_refuses_some(load, every):
    target = Refusing(every)
    run = run_target(target, lambda b: b, "identity", load, Bounds(duration=DURATION))
    arrivals = 30 if load.kind == "burst" else run.scheduled
    assert arrivals and target.submits == arrivals  # the generator went on after each
    assert run.refused == arrivals // every
    assert run.completed == run.submitted == arrivals - run.refused
    assert run.errors == run.unfinished == 0
    assert run.first_refusal == "RuntimeError: queue full" and run.first_error is None
    assert run.to_dict()["refused"] == run.refused
    assert report.fmt_completed(run) == (
        f"{run.completed:,} + {run.refused:,} refused")
    assert any(f"{plural(run.refused, 'request')} refused at submit" in note
               and "RuntimeError: queue full" in note for note in report.run_notes([run]))


def test_refused_requests_fail_tunes_goal():
    from batchproc.bench.tune import Goal

    record = {"errors": 0, "unfinished": 0, "refused": 1, "completed": 99,
              "throughput": 100.0, "offered": 100.0, "p99_ms": 1.0}
    assert not Goal(rate=100.0).meets(record)
    assert Goal(rate=100.0).meets({**record, "refused": 0})


class HoldsOne:
    """A target that completes each request at once, except that submitting request
    ``hold`` (counted from 0) returns only once ``hold_s`` have passed since the first
    submit (so past a run of that duration: the run starts before its first submit)."""

    name = "holds-one"

    def __init__(self, hold: int, hold_s: float, is_async: bool = False) -> None:
        self.hold = hold
        self.hold_s = hold_s
        self.is_async = is_async
        self.submits = 0
        self._first = 0.0
        self._never = threading.Event()

    def _arrive(self) -> None:
        if self.submits == 0:
            self._first = time.perf_counter()
        if self.submits == self.hold:
            # A wait on an event never set, until the time has surely passed.
            while (left := self._first + self.hold_s - time.perf_counter()) > 0:
                self._never.wait(left)
        self.submits += 1

    def submit(self, item, priority):
        self._arrive()
        f: Future = Future()
        f.set_result(item)
        return f

    async def acall(self, item, priority):
        # The event loop is held up, as a generator blocked in a submit is.
        self._arrive()
        return item


@pytest.mark.parametrize("is_async", [False, True], ids=["threads", "asyncio"])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_arrival_within_the_duration_is_submitted_however_late(seed, is_async):
    load = Load("rate", rate=2000.0, features=4, seed=seed)
    bounds = Bounds(requests=100_000, duration=DURATION)
    sched = arrival_times(load, bounds)
    scheduled = len(sched)
    assert scheduled == 2000.0 * DURATION and sched[-1] < DURATION
    # The one before the last arrival is held in its submit past the duration.
    target = HoldsOne(scheduled - 2, DURATION, is_async=is_async)
    res = run_load(target, load, bounds)
    assert res.scheduled == scheduled == target.submits
    assert res.submitted == res.completed == scheduled
    assert res.unfinished == res.errors == 0
    assert len(res.latencies) == scheduled
    # Both were late: their latency counts from their schedule, past the duration.
    assert np.all(res.latencies[-2:] >= DURATION - sched[-2:] - 1e-9)


@pytest.mark.parametrize("is_async", [False, True], ids=["threads", "asyncio"])
def test_a_burst_submits_every_request_however_late(is_async):
    target = HoldsOne(10, DURATION, is_async=is_async)
    res = run_load(target, Load("burst", burst=50, features=4), Bounds(duration=DURATION))
    assert target.submits == res.submitted == res.completed == 50
    assert res.unfinished == res.errors == 0
    assert res.stopped_by == "requests"
    # All arrived at the start: the held one and those after it waited the duration.
    assert res.latencies[10:].min() >= DURATION - 1e-9


class CompletesWhenLookedAt(Future):
    """A future that completes right after the run, having waited on it until its drain
    ended, first finds it not done: the target finishing it at that very moment."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = False

    def exception(self, timeout=None):
        try:
            return super().exception(timeout)
        finally:
            self.waited = True

    def done(self) -> bool:
        was = super().done()
        if not was and self.waited:
            self.set_result(None)
        return was


class CompletingAtTheHorizon:
    """A sync target whose requests complete only as the run's end looks at them."""

    name = "completing-at-the-horizon"
    is_async = False

    def __init__(self) -> None:
        self.futures: list[CompletesWhenLookedAt] = []

    def submit(self, item, priority):
        self.futures.append(CompletesWhenLookedAt())
        return self.futures[-1]


@pytest.mark.parametrize("load", [Load("burst", burst=1, features=4),
                                  Load("rate", rate=50.0, features=4)],
                         ids=["burst", "rate"])
def test_a_request_completing_at_the_horizon_is_counted_once(load):
    target = CompletingAtTheHorizon()
    res = run_load(target, load, Bounds(duration=DURATION))
    offered = 1 if load.kind == "burst" else res.scheduled
    assert offered and res.submitted == len(target.futures) == offered
    # The one waited on (the newest) completed as the run's end looked at it.
    waited = [f for f in target.futures if f.waited]
    assert waited == [target.futures[-1]] and waited[0].done()
    assert res.completed + res.unfinished == offered == len(res.latencies)
    assert res.unfinished >= 1 and res.stopped_by == "duration"


class StopsLate:
    """No batching whose ``stop`` lets go of the model calls its closed-loop clients are
    blocked in (``blocked.release``): they return after the run has stopped."""

    name = "stops-late"
    is_async = False

    def __init__(self, blocked: Blocked, release_on_stop: bool) -> None:
        self.inner = NoBatching()
        self.blocked = blocked
        self.release_on_stop = release_on_stop

    def start(self, model) -> None:
        self.inner.start(model)

    def call(self, item, priority):
        return self.inner.call(item, priority)

    def stop(self) -> None:
        if self.release_on_stop:
            self.blocked.release.set()

    def stats(self) -> dict:
        return {}


class Lingering(Blocked):
    """A blocked model whose calls, once released, return only when ``done`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.returned = 0
        self.done = threading.Event()

    def __call__(self, batch):
        super().__call__(batch)
        self.done.wait(BLOCKED_S)
        self.returned += 1
        return batch


def test_a_run_waits_for_the_model_calls_it_left_running(blocked):
    # Three clients blocked in the model when the run ends; its stop releases them. The
    # run returns once their calls have: none runs on into the next run.
    run = run_target(StopsLate(blocked, release_on_stop=True), blocked, "blocked",
                     Load("closed", clients=3, features=4), Bounds(duration=DURATION),
                     settle_s=BLOCKED_S)
    assert run.unfinished == 3 and run.left_running == 0
    assert run.batches == 3  # ... and they were counted as they returned


def _let_lingering_calls_end(model: Lingering) -> None:
    model.done.set()
    for run in list(runner._left_behind):
        assert run.model.wait_idle(10) == 0
    assert runner.calls_left_behind() == 0


def _lingering_run(model: Lingering, settle_s: float, progress=None):
    """A run whose two closed-loop clients are still in the model when it ends."""
    return run_target(StopsLate(model, release_on_stop=True), model, "lingering",
                      Load("closed", clients=2, features=4), Bounds(duration=DURATION),
                      progress, settle_s=settle_s)


@pytest.mark.parametrize(("most_s", "why"), [(runner.LEFT_RUNNING_WAIT_S,
                                              "none ended for 0.05 s"),
                                             (0.0, "0 s from its stop")])
def test_a_run_after_calls_that_do_not_end_says_it_started_beside_them(monkeypatch, most_s,
                                                                        why):
    # Hung calls are not waited for once none ends for the settle of the run that left
    # them, nor past the most a run's calls are waited for: the next run starts beside
    # them, says so, and is compared with no other.
    monkeypatch.setattr(runner, "LEFT_RUNNING_WAIT_S", most_s)
    model = Lingering()
    progress = Recording()
    try:
        run = _lingering_run(model, settle_s=0.05)
        assert run.left_running == 2 and model.returned == 0
        assert ("! stops-late (lingering, 2 clients): 2 model calls still running at the end "
                "of the run; a run after it waits for them first, while they keep ending"
                in report.run_notes([run]))
        limit = run_limit(lambda b: b, "m", Load("closed", clients=1, features=4),
                          Bounds(requests=5), 4, progress)
        assert progress.summaries[0] == (f"2 calls still running ({why}); runs from now "
                                         "on start beside them")
        again = Recording()
        beside = run_target(NoBatching(), lambda b: b, "m",
                            Load("closed", clients=1, features=4), Bounds(requests=5), again)
        assert limit.started_beside == beside.started_beside == 2
        assert len(again.summaries) == 1  # its own line: given up on, they are not waited for
        assert report.ratio(beside, limit) is None
        assert report.not_compared(beside, limit) == (
            "the no batching run started while 2 model calls an earlier run left running "
            "were still running; the limit run started while 2 model calls an earlier run "
            "left running were still running")
    finally:
        _let_lingering_calls_end(model)
    assert model.returned == 2
    after = run_target(NoBatching(), lambda b: b, "m", Load("closed", clients=1, features=4),
                       Bounds(requests=5))
    assert after.started_beside == 0


class EndsLeftCalls(Recording):
    """A progress display that lets the lingering calls return once a run waits for
    them on a line of their own."""

    def __init__(self, model: Lingering) -> None:
        super().__init__()
        self.model = model
        self.labels: list[str] = []

    def start(self, label: str, total: int | None, duration: float | None) -> None:
        self.labels.append(label)
        if "left running" in label:
            self.model.done.set()


def test_the_next_run_waits_for_the_calls_a_run_left_running_on_a_line_of_their_own():
    model = Lingering()
    try:
        run = _lingering_run(model, settle_s=2.0)  # the stall: no call ended in 2 s
        assert run.left_running == 2 and model.returned == 0 and run.batches == 2
        progress = EndsLeftCalls(model)
        after = run_target(NoBatching(), lambda b: b, "m",
                           Load("closed", clients=1, features=4), Bounds(requests=5),
                           progress)
    finally:
        _let_lingering_calls_end(model)
    assert model.returned == 2 and after.started_beside == 0
    assert progress.labels == ["lingering · 2 clients · stops-late · 2 calls left running",
                               "m · 1 client · no batching"]
    assert progress.summaries[0] == "ended"


class InterruptsLeftCalls(Recording):
    """Ctrl-C while a run waits for the calls an earlier run left running."""

    def start(self, label: str, total: int | None, duration: float | None) -> None:
        self.waiting = "left running" in label

    def update(self, done: int) -> None:
        if self.waiting:
            raise KeyboardInterrupt


def test_ctrl_c_while_the_next_run_waits_for_left_calls_keeps_the_runs_that_finished():
    model = Lingering()
    progress = InterruptsLeftCalls()
    runs = []
    try:
        with interrupts.keep_finished() as stop:
            runs.append(_lingering_run(model, settle_s=5.0))
            runs.append(run_target(NoBatching(), lambda b: b, "m",
                                   Load("closed", clients=1, features=4), Bounds(requests=5),
                                   progress))
    finally:
        _let_lingering_calls_end(model)
    assert stop.interrupted and [r.system for r in runs] == ["stops-late"]
    assert progress.summaries == ["interrupted"]


def test_counting_model_waits_for_its_calls_in_progress():
    from batchproc.bench.runner import CountingModel

    model = Lingering()
    model.release.set()
    counted = CountingModel(model)
    caller = threading.Thread(target=counted, args=(np.zeros((1, 4)),))
    caller.start()
    try:
        model.entered.wait(10)
        assert counted.running == 1
        assert counted.wait_idle(0.01) == 1  # still in the model
    finally:
        model.done.set()
    assert counted.wait_idle(10) == 0 and model.returned == 1
    caller.join(10)


def _ctrl_c(done: int) -> None:
    """A tick that raises what Ctrl-C raises, where it lands: in the thread watching the
    run, at its first look."""
    raise KeyboardInterrupt


@pytest.mark.parametrize(("target", "load"), [
    (NoBatching(), Load("closed", clients=3, features=4)),
    (NoBatching(), Load("rate", rate=200.0, features=4)),
    (BatchprocAsync(max_batch=4), Load("closed", clients=3, features=4)),
], ids=["closed", "open", "asyncio"])
def test_ctrl_c_while_a_run_is_watched_ends_its_load(blocked, target, load):
    # No batching's clients and generator are in the model's call; the asyncio clients
    # await theirs. Interrupted, the load submits nothing more: its threads end once
    # their call in progress returns, though the run had 30 s to go and the target is
    # still running.
    before = set(threading.enumerate())
    _started(target, blocked)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_load(target, load, Bounds(duration=BLOCKED_S), _ctrl_c)
        assert blocked.entered.is_set()
        blocked.release.set()
        wait_for(lambda: not [t for t in threading.enumerate()
                              if t not in before and t.name.startswith("bench")],
                 "the load's threads to end")
    finally:
        target.stop()


# -- what each request's future says about it --------------------------------------------


class SharedFuture:
    """A cache: every request gets the same future, done before the first submit."""

    name = "shared-future"
    is_async = False

    def __init__(self) -> None:
        self.future: Future = Future()
        self.future.set_result(None)

    def submit(self, item, priority):
        return self.future


def test_requests_sharing_a_future_each_keep_their_own_completion_time():
    # Its done-callback runs at each add_done_callback, once per request, in their order:
    # each request is charged its own, not the last one's.
    res = run_load(SharedFuture(), Load("burst", burst=50, features=4), Bounds(duration=5.0))
    assert res.completed == 50 and res.unfinished == res.errors == 0
    lat = res.latencies
    assert np.all(np.diff(lat) >= 0.0) and lat[-1] > lat[0]


class RefusesSome:
    """Refuses the arrivals whose index is in ``refuse``; completes the rest at once,
    recording the priority each was submitted with."""

    name = "refuses-some"
    is_async = False

    def __init__(self, refuse: set[int]) -> None:
        self.refuse = refuse
        self.calls = 0
        self.priorities: list[int] = []

    def submit(self, item, priority):
        i = self.calls
        self.calls += 1
        if i in self.refuse:
            raise RuntimeError("full")
        self.priorities.append(priority)
        f: Future = Future()
        f.set_result(None)
        return f


@pytest.mark.parametrize("refuse", [{0}, {1, 2}, {5}, {0, 7}])
def test_priorities_stay_with_their_requests_past_a_refusal(refuse):
    target = RefusesSome(refuse)
    res = run_load(target, Load("burst", burst=8, priorities=True, features=4),
                   Bounds(duration=5.0))
    assert res.refused == len(refuse) and res.completed == 8 - len(refuse)
    assert res.priorities.tolist() == target.priorities


class CancelsSome:
    """Returns a cancelled future for every other request, a done one for the rest."""

    name = "cancels-some"
    is_async = False

    def __init__(self) -> None:
        self.calls = 0

    def submit(self, item, priority):
        f: Future = Future()
        if self.calls % 2:
            f.cancel()
        else:
            f.set_result(None)
        self.calls += 1
        return f


def test_a_cancelled_request_failed_it_did_not_complete():
    res = run_load(CancelsSome(), Load("burst", burst=6, features=4), Bounds(duration=5.0))
    assert res.completed == 3 and res.errors == 3 and res.unfinished == 0
    assert res.first_error is not None and res.first_error.startswith("CancelledError")


def test_a_wait_for_left_calls_cut_by_its_deadline_gives_none_of_them_up(monkeypatch) -> None:
    # A caller with no time for a run after the wait (tune's budget) ends it early: the
    # calls are not given up on, so the wait before a later run is for them again.
    left = runner._LeftBehind(CallsThatDoNotEnd(), "earlier", time.perf_counter(),
                              stall_s=60.0)
    monkeypatch.setattr(runner, "_left_behind", [left])
    progress = Recording()
    assert runner.let_calls_end(progress, time.perf_counter() + 0.2) == 2
    assert progress.summaries == [
        "2 calls still running when the time given for the wait ran out"]
    assert not left.given_up
    progress = Recording()
    assert runner.let_calls_end(progress, time.perf_counter() + 0.1) == 2
    assert progress.summaries == [
        "2 calls still running when the time given for the wait ran out"]

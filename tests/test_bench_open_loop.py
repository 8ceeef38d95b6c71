"""What an open loop offers and what it achieves, as bench, sweep and tune report them.

The offered load is the schedule's arrivals over the window they arrive in: the rate
asked, to rounding (the schedule holds ``round(rate * duration)`` arrivals). The
achieved throughput is the completed arrivals over that window, stretched only by a
backlog (completions trailing their arrivals by more at the end than at the start).

The figures are checked on synthetic timings (no clock, no threads): a run's
arrivals and completions go straight to the function that counts them.
"""

from __future__ import annotations

import io
from concurrent.futures import Future

import numpy as np
import pytest

from batchproc.bench import BenchError, report
from batchproc.bench.inputs import FeatureRows
from batchproc.bench.loads import (
    MAX_ARRIVALS,
    Bounds,
    Load,
    _collect,
    arrival_times,
    open_span,
    run_load,
    schedule_of,
)
from batchproc.bench.runner import RunResult
from batchproc.bench.sweep import SATURATED, run_sweep, table_rows

T0 = 1000.0  # a run's start, on the clock of the synthetic timings


def _measured(load: Load, bounds: Bounds, finish, *, drained_by: float,
              limit: int | None = None):
    """The result of an open loop of ``load`` whose request ``i`` arriving at ``a``
    (seconds from the start) completes at ``finish(i, a, previous completion)``, or never
    (None); ``drained_by``: when the run stopped waiting, seconds from the start;
    ``limit``: a bounded system, refusing an arrival that finds this many accepted
    requests not yet complete."""
    plan = schedule_of(load, bounds)
    futs, sub, done, finishes = [], [], [], []
    previous, refused = 0.0, 0
    for i, a in enumerate(arrival_times(load, bounds)):
        if limit is not None and sum(1 for d in finishes if d is None or d > a) >= limit:
            refused += 1
            continue
        f: Future = Future()
        d = finish(i, a, previous)
        finishes.append(d)
        if d is not None and d <= drained_by:
            f.set_result(None)
            previous = d
        futs.append(f)
        sub.append(T0 + a)
        done.append(T0 + d if f.done() else None)
    state = {"t0": T0, "first_refusal": None, "refused": refused,
             "scheduled": plan.n, "window": plan.window}
    end = T0 + drained_by
    return _collect(futs, sub, done, [2], state, end, end, np.empty(0))


def test_the_schedule_holds_the_rate_times_the_duration() -> None:
    for rate, duration, n in ((20.0, 1.0, 20), (1000.0, 0.3, 300), (5.0, 1.0, 5),
                              (1125.27, 1.0, 1125), (0.4, 1.0, 1)):
        load = Load("rate", rate=rate, features=4)
        times = arrival_times(load, Bounds(duration=duration))
        assert len(times) == n, (rate, duration)
        assert np.all(np.diff(times) >= 0) and 0 <= times[0] and times[-1] < duration
        plan = schedule_of(load, Bounds(duration=duration))
        assert plan.window == duration and plan.rate == pytest.approx(n / duration)


def test_a_request_bound_shortens_the_window_not_the_rate() -> None:
    # 1,000 requests at 5,000 req/s: the schedule's 1,000 arrivals come within 0.2 s.
    load = Load("rate", rate=5000.0, features=4)
    bounds = Bounds(requests=1000, duration=5.0)
    plan = schedule_of(load, bounds)
    assert (plan.n, plan.window) == (1000, 0.2)
    assert plan.rate == pytest.approx(5000.0)
    assert arrival_times(load, bounds)[-1] < 0.2


def test_runs_at_one_load_share_arrivals_and_reruns_get_fresh_ones() -> None:
    bounds = Bounds(duration=1.0)
    first = arrival_times(Load("rate", rate=200.0, seed=3), bounds)
    assert np.array_equal(first, arrival_times(Load("rate", rate=200.0, seed=3), bounds))
    reruns = [arrival_times(Load("rate", rate=200.0, seed=3, draw=k), bounds)
              for k in (1, 2)]
    assert len({len(first), *map(len, reruns)}) == 1  # the same load ...
    assert not np.array_equal(first, reruns[0])  # ... on other arrivals
    assert not np.array_equal(reruns[0], reruns[1])
    other_seed = arrival_times(Load("rate", rate=200.0, seed=4), bounds)
    assert not np.array_equal(first, other_seed)


def _lock_of(seconds: float):
    """Completions of a model taking ``seconds`` per call behind one lock, any batch
    size, called back to back: a request is served by the first call that starts after
    it arrives."""
    def finish(i: int, a: float, previous: float) -> float:
        return float(np.ceil(a / seconds) * seconds) + seconds
    return finish


def test_a_slow_model_that_keeps_up_achieves_the_load_offered() -> None:
    # 200 ms a call, any batch: ~5 calls carry 100 req/s, each request 200-400 ms late.
    load = Load("rate", rate=100.0, features=4)
    res = _measured(load, Bounds(duration=1.0), _lock_of(0.2), drained_by=2.0)
    assert res.completed == res.scheduled == 100 and res.unfinished == 0
    assert res.offered_rate == 100.0
    assert res.throughput == 100.0  # not 100 / 1.2 s: its last request's latency
    assert res.latencies.max() > 0.2


def test_a_model_that_falls_behind_achieves_what_it_serves() -> None:
    # A model serving 60 req/s under 100 req/s offered: its completions trail further
    # and further behind; it catches up during the drain, all the same it carried 60.
    load = Load("rate", rate=100.0, features=4)

    def sixty(i: int, a: float, previous: float) -> float:
        return max(a, previous) + 1 / 60

    res = _measured(load, Bounds(duration=1.0), sixty, drained_by=2.0)
    assert res.completed == 100 and res.unfinished == 0  # caught up within the drain
    assert res.throughput == pytest.approx(60.0, rel=0.1)
    assert res.throughput < SATURATED * res.offered_rate
    # Left behind by the drain: fewer completed, served at the same rate.
    res = _measured(load, Bounds(duration=1.0), sixty, drained_by=1.2)
    assert 0 < res.completed < 100
    assert res.throughput == pytest.approx(60.0, rel=0.1)


@pytest.mark.parametrize("rate,duration", [(1000.0, 1.0), (30000.0, 1.0), (1e6, 0.002)],
                         ids=["5x its capacity", "150x", "all at once"])
def test_a_model_far_behind_achieves_what_it_serves_not_more(rate, duration) -> None:
    # One request at a time, 5 ms each (no batching behind a lock): 200 req/s at most,
    # whatever is offered. Only the first arrivals complete before the drain ends, so
    # the longest lag among them is the backlog's, not the time a request takes.
    load = Load("rate", rate=rate, features=4)

    def one_at_a_time(i: int, a: float, previous: float) -> float:
        return max(a, previous) + 0.005

    res = _measured(load, Bounds(duration=duration), one_at_a_time,
                    drained_by=duration + 1.0)
    assert res.unfinished > 0
    assert res.throughput == pytest.approx(200.0, rel=0.02)


def _jittered(stuck=()):
    """Keeps up: each request served on its own in 5-400 ms (inputs of varied size)."""
    def finish(i: int, a: float, previous: float) -> float | None:
        return None if i in stuck else a + 0.005 + 0.395 * ((i * 37) % 100) / 99
    return finish


def test_a_run_that_keeps_up_reads_the_same_with_a_request_stuck() -> None:
    load = Load("rate", rate=100.0, features=4)
    res = _measured(load, Bounds(duration=1.0), _jittered(), drained_by=2.0)
    assert res.unfinished == 0 and res.throughput == pytest.approx(100.0, rel=0.05)
    res = _measured(load, Bounds(duration=1.0), _jittered(stuck={50}), drained_by=2.0)
    assert res.unfinished == 1 and res.throughput == pytest.approx(99.0, rel=0.05)


def test_an_overload_whose_queue_refuses_reads_what_it_served() -> None:
    # One at a time, 5 ms each (200 req/s), at most 180 accepted and not yet done, 3,000
    # req/s offered: every accepted request completes, served at 200 req/s.
    load = Load("rate", rate=3000.0, features=4)

    def one_at_a_time(i: int, a: float, previous: float) -> float:
        return max(a, previous) + 0.005

    res = _measured(load, Bounds(duration=1.0), one_at_a_time, drained_by=2.0, limit=180)
    assert res.refused > 0 and res.unfinished == 0
    assert res.throughput == pytest.approx(200.0, rel=0.1)


def test_an_overload_that_sheds_late_requests_reads_what_it_served() -> None:
    # One at a time, 5 ms each (200 req/s); a request not started within 0.5 s of its
    # arrival fails at once (a deadline: an error, not unfinished). 1,000 req/s offered.
    load = Load("rate", rate=1000.0, features=4)
    plan = schedule_of(load, Bounds(duration=1.0))
    futs, sub, done = [], [], []
    free = 0.0
    for a in arrival_times(load, Bounds(duration=1.0)):
        f: Future = Future()
        start = max(a, free)
        if start > a + 0.5:
            f.set_exception(TimeoutError("deadline"))
            done.append(None)
        else:
            free = start + 0.005
            f.set_result(None)
            done.append(T0 + free)
        futs.append(f)
        sub.append(T0 + a)
    state = {"t0": T0, "first_refusal": None, "refused": 0,
             "scheduled": plan.n, "window": plan.window}
    res = _collect(futs, sub, done, [2], state, T0 + 2.0, T0 + 2.0, np.empty(0))
    assert res.unfinished == 0 and res.errors > 0
    assert res.throughput == pytest.approx(200.0, rel=0.1)


def test_a_low_load_achieves_what_it_is_offered_not_more() -> None:
    # 5 req/s for 1 s: 5 arrivals, each served in a millisecond.
    load = Load("rate", rate=5.0, features=4)
    res = _measured(load, Bounds(duration=1.0), lambda i, a, p: a + 0.001, drained_by=1.5)
    assert res.scheduled == res.completed == 5
    assert res.offered_rate == res.throughput == 5.0


def test_a_short_schedule_achieves_its_own_rate() -> None:
    # Fewer arrivals than rate x duration (the request bound): they came within 0.2 s.
    load = Load("rate", rate=5000.0, features=4)
    bounds = Bounds(requests=1000, duration=5.0)
    res = _measured(load, bounds, lambda i, a, p: a + 0.001, drained_by=5.5)
    assert res.scheduled == res.completed == 1000 and res.window == 0.2
    assert res.offered_rate == pytest.approx(5000.0)
    assert res.throughput == pytest.approx(5000.0)


def test_a_few_requests_stuck_count_as_not_completed_only() -> None:
    # 24 of 1,000 never complete (stuck in a retry): the others came and went on time.
    load = Load("rate", rate=2000.0, features=4)
    stuck = set(range(100, 1000, 40))
    res = _measured(load, Bounds(duration=0.5), lambda i, a, p: None if i in stuck
                    else a + 0.001, drained_by=1.0)
    assert res.unfinished == len(stuck) == 23 and res.completed == 977
    assert res.throughput == pytest.approx(977 / 0.5)


def test_the_span_of_an_open_loop() -> None:
    arrived = np.array([0.0, 0.1, 0.5, 0.9])
    assert open_span(1.0, arrived, arrived + 0.3) == 1.0  # a steady lag: the window
    lags = np.array([0.3, 0.3, 0.3, 0.8])  # the last 0.5 s behind the others
    assert open_span(1.0, arrived, arrived + lags) == pytest.approx(1.4)
    assert open_span(1.0, arrived[:0], arrived[:0]) == 1.0


def test_one_slow_request_at_the_end_of_an_open_loop_is_a_tail_not_a_backlog() -> None:
    # 100 arrivals over 1 s, each answered 5 ms later, but the last 10x slower: the
    # run kept up (its last arrivals' median lag is its early ones'), and reads its
    # window, not one stretched to that request's completion.
    arrived = np.linspace(0.0, 0.99, 100)
    lags = np.full(100, 0.005)
    lags[-1] = 0.05
    assert open_span(1.0, arrived, arrived + lags) == 1.0
    lags[3] = 0.05  # an early outlier too: still the window
    assert open_span(1.0, arrived, arrived + lags) == 1.0
    # Its neighbours: the whole last tenth 10x slower is a backlog; refused requests
    # mean the run fell behind whatever the lags. Both served to the last completion,
    # less the shortest early lag.
    lags = np.full(100, 0.005)
    lags[90:] = 0.05
    assert open_span(1.0, arrived, arrived + lags) == pytest.approx(0.99 + 0.05 - 0.005)
    lags = np.full(100, 0.005)
    lags[-1] = 0.05
    assert open_span(1.0, arrived, arrived + lags, refused=True) == pytest.approx(1.035)


class Instant:
    """A sync target that completes each request as it is submitted."""

    name = "instant"
    is_async = False

    def start(self, model) -> None:
        self.model = model

    def submit(self, item, priority):
        f: Future = Future()
        f.set_result(self.model(item))
        return f

    def stop(self) -> None:
        pass

    def stats(self) -> dict:
        return {}


class FakeTime:
    """The load generator's clock, moved only by its sleeps: it keeps its schedule to
    the microsecond, and a request completed at once completes at its arrival."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


@pytest.mark.parametrize(("rate", "bounds"), [
    (5.0, Bounds(duration=0.2)),  # one arrival: 0.2 s x 5 req/s
    (25.0, Bounds(duration=0.2)),
    (2000.0, Bounds(requests=50, duration=5.0)),  # 50 arrivals within 25 ms
])
def test_a_run_that_keeps_up_reads_its_offered_load(monkeypatch, rate, bounds) -> None:
    from batchproc.bench import loads

    monkeypatch.setattr(loads, "time", FakeTime())
    target = Instant()
    target.start(lambda b: b)
    res = run_load(target, Load("rate", rate=rate, features=4), bounds)
    assert res.completed == res.scheduled == schedule_of(Load("rate", rate=rate),
                                                          bounds).n
    assert res.throughput == pytest.approx(res.offered_rate)
    assert res.offered_rate == pytest.approx(max(1, round(rate * bounds.duration))
                                             / bounds.duration if bounds.requests is None
                                             else rate)


def test_a_sweep_shows_the_load_offered_and_achieved_at_a_low_load(monkeypatch) -> None:
    from batchproc.bench import loads

    monkeypatch.setattr(loads, "time", FakeTime())
    # 0.05 and 0.1 of 100 req/s for 0.2 s: 1 and 2 arrivals, all served at once.
    result = run_sweep([Instant()], lambda b: b, "identity", FeatureRows(4),
                       fractions=[0.05, 0.1], capacity=100.0, duration=0.2)
    rows = table_rows(result)
    assert [r[1:3] for r in rows] == [["5 (0.05x)", "5"], ["10 (0.1x)", "10"]]
    assert not any(p.saturated for p in result.points["instant"])
    run = result.points["instant"][0].run
    assert run.scheduled == 1 and run.window_s == 0.2 and run.arrival_rate == 5.0
    assert "offered: 1 arrival over 0.2 s = 5 req/s" in report.offered_note(run)
    assert report.stretched_span(run) is None
    assert not any("stretched" in note for note in report.run_notes([run]))


def test_arrivals_within_one_requests_time_cannot_show_a_rate() -> None:
    # 5 arrivals within 0.5 us, served together 0.6 ms later: the run read 10,000,000
    # req/s, and was compared as such ("36.7x the limit"). Its throughput is left as
    # open_span reads it (reading it otherwise would halve a slow model's rate on one
    # side of a threshold), but the run says it is too short to show one, and is not
    # compared.
    load = Load("rate", rate=1e7, features=4)
    res = _measured(load, Bounds(requests=5, duration=1.0), lambda i, a, p: 0.0006,
                    drained_by=1.5)
    assert res.scheduled == res.completed == 5 and res.offered_rate == pytest.approx(1e7)
    assert res.too_short
    # Its neighbours: a window as long as the quickest request, or a run that kept up
    # over many requests' times, shows its rate.
    for rate, bounds, latency in ((1e4, Bounds(requests=6, duration=1.0), 0.0005),
                                  (1000.0, Bounds(duration=1.0), 0.001)):
        res = _measured(Load("rate", rate=rate, features=4), bounds,
                        lambda i, a, p, d=latency: a + d, drained_by=1.5)
        assert not res.too_short, (rate, bounds)
        assert res.throughput == pytest.approx(res.offered_rate)


def _short_run(system: str, throughput: float, too_short: bool) -> RunResult:
    return RunResult(
        system=system, model="identity", load="1e+07 req/s", throughput=throughput,
        p50_ms=0.6, p95_ms=0.6, p99_ms=0.6, mean_ms=0.6, mean_batch=5.0, batches=1,
        submitted=5, completed=5, errors=0, elapsed_s=0.0006, stopped_by="requests",
        scheduled=5, window_s=5e-7, arrival_rate=1e7, too_short=too_short)


def _rate_run(system: str, throughput: float, offered: float | None,
              span: float = 2.0) -> RunResult:
    """A run of 2 s: an open loop when ``offered`` (its arrivals' window 2 s, its
    completions over ``span`` s: longer when it fell behind), else one at its own pace."""
    completed = round(throughput * span)
    return RunResult(
        system=system, model="fixed", load="3,000 req/s", throughput=throughput,
        p50_ms=6.0, p95_ms=9.0, p99_ms=10.0, mean_ms=6.0, mean_batch=20.0, batches=100,
        submitted=completed, completed=completed, errors=0, elapsed_s=span,
        stopped_by="duration", scheduled=None if offered is None else round(offered * 2),
        window_s=None if offered is None else 2.0, arrival_rate=offered)


def test_an_open_loop_that_kept_up_is_not_compared_with_a_run_at_its_own_pace() -> None:
    # Its throughput is the load's: against the limit the ratio would be 3,000 / 12,000,
    # the load's share of the capacity, read as batchproc's.
    limit = _rate_run("limit", 12_000.0, None)
    kept_up = _rate_run("batchproc", 3_000.0, 3_000.0)
    assert report.not_compared(kept_up, limit) == (
        "the batchproc run carried the 3,000 req/s offered (its throughput is the load's), "
        "the limit run went at its own pace")
    assert report.ratio(kept_up, limit) is None
    assert report.not_compared(limit, kept_up) == report.not_compared(kept_up, limit)
    # One that fell behind (its completions past its arrivals' window) went at its own
    # pace, however close to the load: 11,600 of 13,000 req/s offered is 0.97x the limit.
    behind = _rate_run("batchproc", 11_600.0, 13_000.0, span=2.2)
    assert report.stretched_span(behind) is not None
    assert report.not_compared(behind, limit) is None
    assert report.ratio(behind, limit) == pytest.approx(11_600 / 12_000)
    # Two open loops at one load: compared where one fell behind (ratio_bound's test).
    assert report.not_compared(kept_up, _rate_run("no batching", 400.0, 3_000.0, 15.0)) is None


def test_two_open_loops_that_kept_up_are_not_compared() -> None:
    # Each throughput is the load's: the ratio would be 1 whatever their paces.
    kept_up = _rate_run("batchproc", 3_000.0, 3_000.0)
    other = _rate_run("no batching", 3_000.0, 3_000.0)
    why = "both runs carried the 3,000 req/s offered (their throughput is the load's)"
    assert report.not_compared(kept_up, other) == why
    assert report.not_compared(other, kept_up) == why
    assert report.ratio(kept_up, other) is None and report.ratio_bound(kept_up, other) is None


def test_an_open_loop_that_kept_up_against_one_that_fell_behind_is_a_bound() -> None:
    # batchproc carried all 3,000 req/s offered, no batching fell behind at 400: 7.5x is
    # what batchproc had to carry, not its own pace, so its pace is 7.5x or more.
    kept_up = _rate_run("batchproc", 3_000.0, 3_000.0)
    behind = _rate_run("no batching", 400.0, 3_000.0, span=15.0)
    assert report.ratio(kept_up, behind) == pytest.approx(7.5)
    assert report.ratio_bound(kept_up, behind) == "at least"
    assert report.ratio_bound(behind, kept_up) == "at most"
    # Both behind: each at its own pace, the ratio is theirs. Not compared: no bound.
    slower = _rate_run("batchproc", 2_000.0, 3_000.0, span=3.0)
    assert report.ratio_bound(slower, behind) is None
    limit = _rate_run("limit", 12_000.0, None)
    assert report.ratio_bound(kept_up, limit) is None
    assert report.ratio_bound(behind, limit) is None  # compared: both at their own pace
    runs = [kept_up, behind, limit]
    bounds = report.bench_ratio_bounds(runs)
    assert bounds == {"vs_no_batching": "at least"}
    out = io.StringIO()
    report.print_bench_table("t", runs, report.bench_ratios(runs), out, use_rich=False,
                             not_compared=report.bench_not_compared(runs), ratio_bounds=bounds)
    assert ("batchproc vs no batching: at least 7.50x throughput (the batchproc run "
            "carried the 3,000 req/s offered: its own pace is that or more)") in out.getvalue()
    # The other way round: batchproc fell behind, no batching kept up.
    runs = [slower, _rate_run("no batching", 3_000.0, 3_000.0)]
    bounds = report.bench_ratio_bounds(runs)
    assert bounds == {"vs_no_batching": "at most"}
    out = io.StringIO()
    report.print_bench_table("t", runs, report.bench_ratios(runs), out, use_rich=False,
                             ratio_bounds=bounds)
    assert ("batchproc vs no batching: at most 0.67x throughput (the no batching run "
            "carried the 3,000 req/s offered: its own pace is that or more)") in out.getvalue()


def test_a_run_too_short_to_show_a_rate_says_so_and_is_not_compared() -> None:
    short = _short_run("batchproc", 1e7, True)
    limit = _short_run("limit", 46_942, False)
    assert report.not_compared(short, limit) == (
        "the batchproc run's arrivals all came within one request's time: too short a "
        "run to show a rate")
    assert report.not_compared(_short_run("batchproc", 1e7, False), limit) is None
    assert report.not_compared(short, _short_run("no batching", 1e7, True)) == (
        "the batchproc and the no batching runs' arrivals all came within one request's "
        "time: too short a run to show a rate")
    assert not any("stretched" in note for note in report.run_notes([short]))
    assert ("! batchproc (identity, 1e+07 req/s): its arrivals all came within its "
            "quickest request's time: too short a run to show a rate (its req/s tells "
            "nothing of what it sustains); not compared") in report.run_notes([short])


def test_a_run_counted_over_more_than_its_window_says_so() -> None:
    run = _short_run("batchproc", 5 / 0.0006, False)
    assert report.stretched_span(run) == pytest.approx(0.0006)
    note, = (n for n in report.run_notes([run]) if "stretched" in n)
    assert note.startswith("* batchproc (identity, 1e+07 req/s): req/s counts its "
                           "completed arrivals over 0.0006 s")


def test_a_schedule_past_the_most_arrivals_a_run_offers_is_refused() -> None:
    with pytest.raises(BenchError, match=f"at most {MAX_ARRIVALS:,}"):
        schedule_of(Load("rate", rate=2e7), Bounds(duration=1.0))
    with pytest.raises(BenchError, match=f"at most {MAX_ARRIVALS:,}"):
        schedule_of(Load("rate", rate=1e12), Bounds(duration=1e9))
    with pytest.raises(BenchError, match="--burst"):
        schedule_of(Load("burst", burst=MAX_ARRIVALS + 1), Bounds(duration=1.0))
    # A request bound below the cap holds, whatever the rate.
    assert schedule_of(Load("rate", rate=1e12), Bounds(requests=100, duration=1.0)).n == 100
    with pytest.raises(BenchError, match="--seed must be >= 0"):
        Load("rate", rate=10.0, seed=-1)

"""The controller: strategies, the fitted latency model, and the classic inputs."""

import math
import threading
import time

import numpy as np
import pytest
from waiting import wait_for as _wait_for

from batchproc import BatchProcessorConfig
from batchproc.controller import (
    MEMORY_CRITICAL,
    MEMORY_OK,
    MEMORY_WARNING,
    ConcurrencyTuner,
    Controller,
    LatencyModel,
)


def controller(**kwargs):
    return Controller(BatchProcessorConfig(**kwargs))


def test_latency_model_recovers_a_linear_cost():
    model = LatencyModel()
    for i in range(200):
        rows = 1 + (i * 7) % 64
        model.observe(rows, 0.005 + 0.0001 * rows)
    assert model.a == pytest.approx(0.005, rel=1e-3)
    assert model.b == pytest.approx(0.0001, rel=1e-3)
    assert model.optimal_rows(128) == 128  # linear cost: bigger is always better


def test_one_hung_call_does_not_inflate_the_fitted_cost():
    # A 2 ms model whose one call hung for 3 s: the fit stays near 2 ms (the idle gap and
    # the pace are sized from it), where the plain average over its half-life would
    # have put the fixed cost near 12 ms.
    model = LatencyModel()
    for _ in range(300):
        model.observe(4, 0.002)
    model.observe(4, 3.0)
    for _ in range(16):
        model.observe(4, 0.002)
    assert model.predict(4) < 0.0021


@pytest.mark.parametrize("slow_calls", [1, 3, 7])
def test_slow_first_calls_of_a_warm_up_are_forgotten(slow_calls):
    # The first calls take 1 s (CUDA initialisation, a JIT), then 2 ms: the usual time
    # is 2 ms at once, not an average that takes hundreds of batches to fade (a call
    # overruns at twice the usual time: a hang would hold requests for seconds).
    model = LatencyModel()
    for _ in range(slow_calls):
        model.observe(4, 1.0)
    model.observe(4, 0.002)
    assert model.predict(4) == pytest.approx(0.002)
    for _ in range(20):
        model.observe(4, 0.002)
    assert model.predict(4) == pytest.approx(0.002)


def test_a_call_slower_than_the_first_ones_is_no_warm_up():
    # Only a faster call marks the earlier ones as a warm-up: a slower one is fitted.
    model = LatencyModel()
    model.observe(4, 0.002)
    model.observe(4, 0.010)
    assert model.predict(4) == pytest.approx(0.006, rel=0.01)  # both, faded a little
    model.observe(4, 0.0045)  # within OVERRUN_FACTOR of the prediction: fitted too
    assert model.observations == 3


def test_a_lasting_change_of_cost_is_still_followed():
    model = LatencyModel()
    for _ in range(300):
        model.observe(4, 0.002)
    for _ in range(1000):
        model.observe(4, 0.010)  # five times slower, for five half-lives
    assert 0.0095 < model.predict(4) < 0.0101


def test_a_call_overruns_after_twice_its_fitted_time():
    c = controller()
    assert c.overrun_after(4) == 0.0  # nothing fitted: any call overruns
    for _ in range(40):
        c.model.observe(4, 0.002)
    assert c.overrun_after(4) == pytest.approx(0.004)


def test_latency_model_finds_the_throughput_optimum_of_a_convex_cost():
    model = LatencyModel()
    a, b, c = 0.004, 0.00002, 0.000001
    for i in range(300):
        rows = 1 + (i * 13) % 200
        model.observe(rows, a + b * rows + c * rows * rows)
    assert model.optimal_rows(1000) == int(math.sqrt(a / c))  # 63
    assert model.predict(100) == pytest.approx(a + b * 100 + c * 10000, rel=1e-3)


@pytest.mark.parametrize("switch_interval", [0.005, 0.0001])
def test_the_curvature_of_calls_shorter_than_a_gil_switch_interval_is_no_optimum(
        switch_interval, monkeypatch):
    # A model of microseconds (a = 30 us): the busier the process, the longer its calls
    # wait for the GIL, and the bigger its batches (a backlog), which a fit reads as a
    # curvature (here an optimum of 7 rows, 116 us a call). A ceiling at 7 would drain a
    # backed-up queue 7 rows a call; calls this short are no measure of it, so the
    # ceiling is the cap. With calls as long as the switch interval, the optimum holds.
    import sys

    monkeypatch.setattr(sys, "getswitchinterval", lambda: switch_interval)
    model = LatencyModel()
    a, b, c = 30e-6, 8e-6, 0.6e-6
    for i in range(300):
        rows = 1 + (i * 5) % 16
        model.observe(rows, a + b * rows + c * rows * rows)
    assert int(math.sqrt(model.a / model.c)) == 7
    assert model.optimal_rows(64) == (64 if switch_interval == 0.005 else 7)


def test_a_convex_model_whose_calls_at_the_optimum_last_a_switch_interval_keeps_it():
    # The boundary: 2.4 ms + 1.2 us * rows**2 peaks at 44 rows, where a call takes 4.8 ms
    # (under the default 5 ms switch interval: the cap); 2.6 ms + 1.3 us * rows**2 peaks
    # at 44 rows too, at 5.2 ms a call (the optimum).
    for a, c, expected in ((0.0024, 1.2e-6, 1000), (0.0026, 1.3e-6, 44)):
        model = LatencyModel()
        for i in range(300):
            rows = 1 + (i * 13) % 200
            model.observe(rows, a + c * rows * rows)
        assert model.optimal_rows(1000) == expected, (a, c)


@pytest.mark.parametrize("per_row", [0.0, -2e-7, 1e-9])
def test_a_convex_cost_with_no_per_row_part_keeps_its_optimum(per_row):
    # 20 ms + 19.5 us * rows**2 peaks at 32 rows. With no per-row cost (or one too small
    # to see, or noise below zero) the three-term fit can put the per-row cost below
    # zero, which no cost has: the fit holds it at zero and keeps the curvature. (A fall
    # back to a line underestimates big batches, whose times are then capped at twice
    # the line's, and the fit drifts: a 1% error in the fixed cost.)
    a, c = 0.02, 0.02 / 1024
    model = LatencyModel()
    for i in range(300):
        rows = 1 + (i * 13) % 200
        model.observe(rows, a + per_row * rows + c * rows * rows)
    assert model.b == pytest.approx(max(per_row, 0.0), abs=1e-8)  # 1e-9: too small to see
    assert model.a == pytest.approx(a, rel=1e-3)
    assert model.c == pytest.approx(c, rel=1e-3)
    assert model.optimal_rows(1000) in (31, 32)


@pytest.mark.parametrize(("a", "b", "c"), [
    (0.0, 0.0, 1e-5),      # no fixed nor per-row cost: both fitted a hair off zero
    (0.0, 1e-4, 1e-6),     # no fixed cost
    (0.002, 0.0, 1e-5),    # no per-row cost
    (0.005, 1e-4, 0.0),    # a line
    (0.005, 0.0, 0.0),     # a constant
])
def test_every_fitted_term_of_a_cost_is_its_own(a, b, c):
    # A term that is zero comes out zero (or a hair above), never below, and the others
    # exact: a term fitted below zero threw the curvature away for a line (t = 1e-5 *
    # rows**2 predicted 1.7 s at 512 rows for 2.6).
    model = LatencyModel()
    for i in range(600):
        rows = 1 + (i * 37) % 512
        model.observe(rows, a + b * rows + c * rows * rows)
    assert min(model.a, model.b, model.c) >= 0.0
    assert (model.a, model.b, model.c) == pytest.approx((a, b, c), rel=1e-6, abs=1e-12)
    assert model.predict(512) == pytest.approx(a + b * 512 + c * 512 * 512, rel=1e-6)


@pytest.mark.parametrize("sizes", [(1, 64), (8, 32), (16, 1024), (2, 3), (4, 64)])
@pytest.mark.parametrize(("a", "b"), [(0.02, 0.001), (0.0, 0.001), (0.001, 2e-5),
                                      (0.05, 0.01)])
def test_two_sizes_of_a_linear_cost_fit_a_line_not_a_curve(sizes, a, b):
    # Two sizes fit a line and a curve through them alike; rounding chose between them,
    # and a curve's optimum held a linear model's batches small for good.
    model = LatencyModel()
    for i in range(60):
        rows = sizes[i % 2]
        model.observe(rows, a + b * rows)
    assert model.c == 0.0
    assert (model.a, model.b) == pytest.approx((a, b), rel=1e-6, abs=1e-12)
    assert model.optimal_rows(4096) == 4096


def test_a_curvature_fitted_with_no_fixed_cost_keeps_the_cap():
    # Its optimum would be one row a call. Big batches' times, noisier in absolute terms,
    # fit a real fixed cost at zero more often than a cost has none: 5 ms + 5 ms * rows
    # (+ a little curvature), fitted so under a backlog, lost half its throughput at one
    # row a call.
    model = LatencyModel()
    for i in range(300):
        rows = 1 + (i * 13) % 64
        model.observe(rows, 0.005 * rows + 0.0005 * rows * rows)
    model.a = 0.0  # as a fit with the fixed cost held at zero leaves it
    assert model.optimal_rows(1024) == 1024


def test_a_noisy_constant_cost_is_fitted_by_its_mean():
    # The least squares of a constant is the (weighted) mean: a line whose slope came out
    # below zero, held at zero, kept its intercept (2% high here).
    import random

    rng = random.Random(3)
    model, times = LatencyModel(), []
    for i in range(168):  # refitted at the last one (every 16 after the first 8)
        rows = 1 + (i * 37) % 64
        times.append(0.01 * (1.0 + 0.2 * rng.gauss(0.0, 1.0)))
        model.observe(rows, times[-1])
    if model.b == 0.0 and model.c == 0.0:
        decay = 0.5 ** (1 / 200)
        weights = [decay ** (len(times) - 1 - k) for k in range(len(times))]
        mean = sum(w * t for w, t in zip(weights, times)) / sum(weights)
        assert model.a == pytest.approx(mean, rel=1e-9)
    else:  # this seed's noise fitted a slope or a curve: no constant to compare with
        pytest.fail(f"seed 3 no longer fits a constant: {model.a, model.b, model.c}")


def test_a_concave_cost_is_fitted_as_a_line():
    # Cost per row falling with size (a GPU filling up): no optimum below the cap, and
    # the curvature is no term held at zero while the fixed cost takes its place.
    model = LatencyModel()
    for i in range(600):
        rows = 1 + (i * 37) % 512
        model.observe(rows, 0.005 + 1e-3 * rows - 1e-6 * rows * rows)
    assert model.c == 0.0 and model.b > 0.0
    assert model.optimal_rows(1000) == 1000


def _backed_up(cost, batches, seed=0, noise=0.0):
    """The target after ``batches`` batches of a queue that never drains, each call's
    time ``cost(rows)`` off by a normal factor of ``noise``."""
    import random

    rng = random.Random(seed)
    c = controller(max_batch_size=1024, batch_timeout=0.1)
    for _ in range(batches):
        rows = c.plan(10**6).target_rows
        seconds = cost(rows) * (1.0 + noise * rng.gauss(0.0, 1.0))
        c.observe_batch(rows, max(seconds, 1e-6), rows, queued_rows=10**6)
    return c.current_batch_size


def test_a_backed_up_queue_on_a_convex_model_settles_at_its_optimum():
    # 20 ms + 19.5 us * rows**2 peaks at 32 rows. The target doubles toward
    # max_batch_size; the fit sees the curvature on the way and brings it back. (A term
    # fitted a hair below zero fell back to a line, and its capped times drifted the
    # fit: 23 rows.)
    assert _backed_up(lambda rows: 0.02 + 0.02 / 1024 * rows * rows, 3000) == 32


@pytest.mark.parametrize("noise", [0.02, 0.05, 0.2])
@pytest.mark.parametrize(("a", "b"), [(0.0, 1e-4), (0.02, 1e-3), (0.005, 1e-4)])
def test_a_backed_up_queue_on_a_noisy_linear_model_keeps_the_cap(a, b, noise):
    # A linear cost: bigger batches are never worse. A curvature fitted from its noise
    # would cap batches at its optimum, all of that size from then on, which could never
    # show it wrong; the F-test keeps it out, or drops it at the next refits.
    sizes = [_backed_up(lambda rows: a + b * rows, 1000, seed, noise) for seed in range(12)]
    assert min(sizes) >= 512, sizes


@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), -0.001])
def test_a_time_that_is_no_duration_is_left_out_of_the_fit(seconds):
    model = LatencyModel()
    assert model.observe(4, seconds) is False  # the first: nothing fitted from it
    assert model.observations == 0
    for i in range(40):
        model.observe(1 + i % 8, 0.002 + 0.0001 * (1 + i % 8))
    before = (model.a, model.b, model.c, model.observations)
    assert model.observe(4, seconds) is False
    assert (model.a, model.b, model.c, model.observations) == before
    assert model.predict(4) == pytest.approx(0.0024)


def test_latency_model_with_one_size_treats_the_cost_as_fixed():
    model = LatencyModel()
    for _ in range(20):
        model.observe(32, 0.002)
    assert model.a == pytest.approx(0.002) and model.b == 0.0


def test_fixed_strategy_waits_batch_timeout_for_its_size():
    c = controller(processing_strategy="fixed", batch_timeout=0.07, initial_batch_size=16)
    plan = c.plan(queued_rows=1000)
    # None: arrivals pausing never end the wait (and no pace to keep, 0.0).
    assert plan == (16, 0.07, None, 0.0)
    c.observe_failure()
    for _ in range(50):
        c.observe_batch(16, 0.01, 16)
    assert c.current_batch_size == 16  # only update_batch_size changes it


def test_disabling_adaptive_batching_behaves_as_fixed():
    c = controller(enable_adaptive_batching=False, processing_strategy="greedy")
    assert c.plan(0).max_wait == c._config.batch_timeout


def test_greedy_never_waits():
    c = controller(processing_strategy="greedy")
    for _ in range(20):
        c.observe_batch(32, 0.01, 32)
    assert c.plan(5).max_wait == 0.0


def test_adaptive_does_not_wait_before_it_has_measured_anything():
    # idle_gap 0: once nothing is in flight, the batch goes at once (no pace either).
    assert controller(batch_timeout=0.2).plan(1)[1:] == (0.2, 0.0, 0.0)


def test_adaptive_waits_while_arrivals_come_within_a_sixteenth_of_the_fixed_cost():
    c = controller(batch_timeout=0.05, initial_batch_size=64, max_batch_size=64)
    for i in range(100):
        rows = 1 + i % 64
        c.observe_batch(rows, 0.010 + 0.00001 * rows, 64)
    plan = c.plan(1)
    assert plan.max_wait == 0.05  # batch_timeout is the ceiling
    assert plan.idle_gap == pytest.approx(0.010 / 16, rel=0.01)
    # A wave filling the batch within one fixed cost keeps filling through a pause.
    assert plan.fill_time == pytest.approx(0.010, rel=0.01)


class _Queue:
    """The queue as the controller sees it: batches in flight and the oldest's age (s)."""

    def __init__(self):
        self.age = 0.0

    def begin_batch(self):
        pass

    def answer_batch(self):
        pass

    def end_batch(self):
        pass

    def oldest_age(self):
        return self.age


def test_the_plan_keeps_its_idle_gap_and_pace_whatever_the_queued_requests_waited():
    # Requests that waited through a call (an open load) or not: the plan is the same,
    # and the queue's fill wait tells carried requests from a wave by when they came
    # (test_native_queue.py, "carried").
    q = _Queue()
    c = Controller(BatchProcessorConfig(batch_timeout=0.05, initial_batch_size=64,
                                        max_batch_size=64), q)
    for i in range(100):
        rows = 1 + i % 64
        c.observe_batch(rows, 0.010 + 0.00001 * rows, 64)
    for age in (0.004, 0.011, 1.0):
        q.age = age
        plan = c.plan(30)
        assert plan[:2] == (64, 0.05)  # the ceiling stays
        assert plan.idle_gap == pytest.approx(0.010 / 16, rel=0.01)
        assert plan.fill_time == pytest.approx(0.010, rel=0.01)


def test_a_model_too_fast_to_wait_for_gets_no_idle_gap():
    # A fixed cost of 0.4 ms: a sixteenth is 25 us, under the timer slack a timed wait
    # lasts at least, so the batch goes at once (no pace either).
    from batchproc.controller import SHORTEST_IDLE_GAP

    c = controller(batch_timeout=0.05, initial_batch_size=64, max_batch_size=64)
    for i in range(100):
        rows = 1 + i % 64
        c.observe_batch(rows, 0.0004 + 0.000001 * rows, 64)
    assert 0.0004 / 16 < SHORTEST_IDLE_GAP
    assert c.plan(1)[1:] == (0.05, 0.0, 0.0)
    for i in range(1500):  # the cost grows to 2 ms: a gap of 125 us is worth waiting
        rows = 1 + i % 64
        c.observe_batch(rows, 0.002 + 0.000001 * rows, 64)
    assert c.plan(1).idle_gap == pytest.approx(0.002 / 16, rel=0.05)


def test_fixed_and_greedy_plans_ignore_the_age_of_queued_requests():
    from batchproc import BatchProcessingStrategy

    q = _Queue()
    q.age = 1.0
    for strategy, wait in ((BatchProcessingStrategy.FIXED, 0.05),
                           (BatchProcessingStrategy.GREEDY, 0.0)):
        c = Controller(BatchProcessorConfig(batch_timeout=0.05, initial_batch_size=16,
                                            processing_strategy=strategy), q)
        for _ in range(20):
            c.observe_batch(16, 0.01, 16)
        assert c.plan(10)[1:] == (wait, None, 0.0)


def test_full_batches_grow_the_target_toward_the_optimum():
    c = controller(initial_batch_size=8, max_batch_size=128)
    for _ in range(40):
        target = c.current_batch_size
        c.observe_batch(target, 0.001 + 0.00001 * target, target)
    assert c.current_batch_size == 128


def test_a_backed_up_queue_grows_the_target():
    c = controller(initial_batch_size=8, max_batch_size=128)
    assert c.plan(queued_rows=100).target_rows == 16


def test_failures_halve_the_target_unless_disabled():
    c = controller(initial_batch_size=32)
    c.observe_failure()
    assert c.current_batch_size == 16
    c = controller(initial_batch_size=32, reduce_batch_on_failure=False)
    c.observe_failure()
    assert c.current_batch_size == 32


def test_memory_pressure_caps_the_target():
    c = controller(initial_batch_size=64, max_batch_size=128, min_batch_size=2)
    c.set_memory_level(MEMORY_WARNING)
    assert c.current_batch_size == 64  # half of the optimum (128)
    for _ in range(20):
        c.observe_batch(64, 0.001, 64)
    assert c.current_batch_size == 64  # no growth past the cap
    c.set_memory_level(MEMORY_CRITICAL)
    assert c.current_batch_size == 2
    c.set_memory_level(MEMORY_OK)
    c.observe_batch(2, 0.001, 2)
    assert c.current_batch_size > 2
    with pytest.raises(ValueError):
        c.set_memory_level("purple")


@pytest.mark.parametrize("strategy", ["adaptive", "greedy", "fixed"])
def test_every_change_of_target_model_or_memory_reaches_the_next_plan(strategy):
    """plan() hands out a plan rebuilt on each change: none may be missed."""
    c = controller(processing_strategy=strategy, initial_batch_size=32, max_batch_size=64,
                   min_batch_size=2, batch_timeout=0.05)

    def target():
        return c.plan(0).target_rows

    assert target() == 32 == c.current_batch_size
    c.set_batch_size(8)
    assert target() == 8
    c.observe_failure()
    assert target() == (8 if strategy == "fixed" else 4) == c.current_batch_size
    c.set_memory_level(MEMORY_CRITICAL)
    assert target() == (8 if strategy == "fixed" else 2) == c.current_batch_size
    c.set_memory_level(MEMORY_OK)
    for _ in range(12):  # full batches of a 4 ms fixed cost: refits and growth
        c.observe_batch(target(), 0.004, target())
    assert target() == c.current_batch_size
    assert target() == 8 if strategy == "fixed" else target() > 2  # grew back
    plan = c.plan(0)
    if strategy == "adaptive":
        assert plan.idle_gap == pytest.approx(0.004 / 16)  # the refitted fixed cost
    else:
        assert plan.idle_gap is None
    assert plan.max_wait == (0.0 if strategy == "greedy" else 0.05)


def test_update_batch_size_is_clamped(make_processor):
    p = make_processor(min_batch_size=4, max_batch_size=64)
    p.update_batch_size(1000)
    assert p.current_batch_size == 64 and p._current_batch_size == 64
    p.update_batch_size(1)
    assert p.current_batch_size == 4
    p.update_batch_size(np.int64(16))  # any integer the config takes
    assert p.current_batch_size == 16 and type(p.current_batch_size) is int
    for bad in ("big", 16.0, True, np.bool_(True)):
        with pytest.raises(TypeError, match="batch size must be an int"):
            p.update_batch_size(bad)


@pytest.mark.parametrize("worker", ["idle", "filling a batch"])
def test_update_batch_size_applies_to_the_batch_a_waiting_worker_is_about_to_take(
        make_processor, worker):
    # The worker planned its pop for 64 rows before the call: waiting for requests, or
    # with 3 queued waiting up to batch_timeout (far longer than the test) for 61 more.
    sizes = []

    def model(batch):
        sizes.append(len(batch))
        return batch

    p = make_processor(model, processing_strategy="fixed", initial_batch_size=64,
                       max_batch_size=64, batch_timeout=60.0, max_workers=1)
    waiters = p._queue._waiters
    if worker == "idle":
        _wait_for(lambda: waiters()[0] == 1, "the worker waiting for requests")
        p.update_batch_size(8)
        p.pause()
        futures = [p.enqueue_predict(np.ones((1, 2))) for _ in range(16)]
        p.resume()
        expected = [8, 8]
    else:
        futures = [p.enqueue_predict(np.ones((1, 2))) for _ in range(3)]
        _wait_for(lambda: waiters()[1] == 1, "the worker filling a batch")
        p.update_batch_size(3)
        expected = [3]
    for future in futures:
        future.result(timeout=10)  # not batch_timeout's 60 s
    assert sizes == expected


def test_critical_memory_shrinks_the_batch_an_idle_worker_is_about_to_take(make_processor):
    sizes = []

    def model(batch):
        sizes.append(len(batch))
        return batch

    # The health check off: set to critical here, the level stays.
    p = make_processor(model, initial_batch_size=64, max_batch_size=64, min_batch_size=4,
                       max_workers=1, enable_health_monitoring=False)
    _wait_for(lambda: p._queue._waiters()[0] == 1, "the worker waiting for requests")
    p._controller.set_memory_level("critical")  # as the health check does
    p.pause()
    futures = [p.enqueue_predict(np.ones((1, 2))) for _ in range(16)]
    p.resume()
    for future in futures:
        future.result(timeout=10)
    assert sizes == [4, 4, 4, 4]


def test_under_load_batches_grow_with_a_fixed_cost_model(make_processor):
    lock = threading.Lock()

    def gpu_like(batch):
        with lock:  # one device: calls are serialised, each costs the same
            threading.Event().wait(0.004)
        return batch

    p = make_processor(gpu_like, max_batch_size=64, max_workers=2)
    clients = 24
    barrier = threading.Barrier(clients)

    def client(cid):
        barrier.wait()
        for j in range(15):
            x = np.array([[cid, j]])
            assert np.array_equal(p.enqueue_predict(x).result(timeout=30), x)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stats = p.get_stats()
    assert stats["total_processed"] == clients * 15
    # 24 clients against one serial device: batching must carry several per call.
    assert stats["avg_batch_size"] >= 4


class _Clock:
    """Stands in for time.monotonic in the controller: each window lasts 0.1 s."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _tuner_on_a_fake_clock(monkeypatch, max_limit, limit=1):
    """A ConcurrencyTuner starting at ``limit`` call slots, its time the returned
    ``_Clock``: (tuner, slots, clock)."""
    from batchproc import controller as controller_module
    from batchproc.controller import CallSlots

    clock = _Clock()
    monkeypatch.setattr(controller_module.time, "monotonic", clock)
    slots = CallSlots(limit)
    return ConcurrencyTuner(slots, max_limit=max_limit), slots, clock


def _window(tuner, clock, backlog, rows_per_batch=64):
    """One measurement window of WINDOW_BATCHES batches; returns the last change."""
    change = None
    clock.now += 0.1
    for _ in range(tuner.WINDOW_BATCHES):
        change = tuner.observe(rows_per_batch, backlog) or change
    return change


def _finish_trial(tuner, clock, began, backlog, tried_rows=64, before_rows=64,
                  clear=False):
    """Run the trial that the change ``began`` (before, tried) started to its verdict:
    windows alternate between the limit tried (``tried_rows`` a batch) and the one
    before (``before_rows``), TRIAL_WINDOWS at each (the window that began it was the
    first at ``before``); ``clear``: the first window at the limit tried decides (its
    rows per second CLEAR times beyond what the trial needs, either way). Returns the
    verdict's change: None when the tried limit stays."""
    before, tried = began
    for _ in range(0 if clear else tuner.TRIAL_WINDOWS - 1):
        assert _window(tuner, clock, backlog, tried_rows) == (tried, before)
        assert _window(tuner, clock, backlog, before_rows) == (before, tried)
    return _window(tuner, clock, backlog, tried_rows)


def _outrun(tuner, clock, rows_per_batch=64):
    """OUTRUN_WINDOWS windows in a row that leave a full batch waiting after every batch:
    no change before the last; returns the last one's."""
    for _ in range(tuner.OUTRUN_WINDOWS - 1):
        assert _window(tuner, clock, backlog=True, rows_per_batch=rows_per_batch) is None
    return _window(tuner, clock, backlog=True, rows_per_batch=rows_per_batch)


def test_concurrent_calls_one_when_idle_two_at_once_under_backlog_then_back(monkeypatch):
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=4)
    assert _window(tuner, clock, backlog=False) is None and slots.limit == 1
    # Requests left waiting window after window: two at once, no probe needed.
    assert _outrun(tuner, clock) == (1, 2) and slots.limit == 2
    # Two carried as much as one: kept. Still waiting: a probe to three, kept only if
    # rows per second rise 10%.
    assert _finish_trial(tuner, clock, (1, 2), backlog=True) == (2, 3)
    assert _finish_trial(tuner, clock, (2, 3), backlog=True) == (3, 2)  # no gain
    assert slots.limit == 2
    # Quiet for QUIET_WINDOWS windows: back to one call at a time.
    changes = [_window(tuner, clock, backlog=False) for _ in range(tuner.QUIET_WINDOWS)]
    assert changes[-1] == (2, 1) and not any(changes[:-1])
    assert slots.limit == 1


def test_a_full_batch_left_now_and_then_keeps_one_call_at_a_time(monkeypatch):
    # A Poisson load below capacity leaves a full batch waiting after some calls, just
    # below capacity after half of them: one call at a time still takes it all when the
    # call ends. Only when three quarters of a window's batches leave one (the load
    # outruns one call) does a second call start.
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=4)
    n = tuner.WINDOW_BATCHES
    short_of_outrun = -(-n * 3 // 4) - 1  # 11 of 16
    assert tuner.OUTRUN_SHARE == 0.75
    for left in (1, n // 2, short_of_outrun):
        for _ in range(3 * tuner.QUIET_WINDOWS):
            clock.now += 0.1
            for i in range(n):
                assert tuner.observe(64, backlog=i < left) is None
        assert slots.limit == 1
    changes = []
    for _ in range(tuner.OUTRUN_WINDOWS):
        clock.now += 0.1
        changes += [tuner.observe(64, backlog=i < short_of_outrun + 1) for i in range(n)]
    assert changes[-1] == (1, 2) and not any(changes[:-1])
    assert slots.limit == 2


def test_one_window_that_outruns_one_call_is_a_burst(monkeypatch):
    # A Poisson load near capacity leaves a full batch after most calls of a window now
    # and then; a second call then would seal batches early and queue them at a model
    # that runs one call at a time. Only windows in a row that outrun one call start it.
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=4)
    assert tuner.OUTRUN_WINDOWS == 2
    for _ in range(3 * tuner.QUIET_WINDOWS):
        assert _window(tuner, clock, backlog=True) is None
        assert _window(tuner, clock, backlog=False) is None
    assert slots.limit == 1
    assert _outrun(tuner, clock) == (1, 2)


def test_a_try_that_does_not_pay_waits_longer_each_time(monkeypatch):
    # An open load below capacity: more calls never carry more rows, and each try
    # seals batches early. Each failed try of two doubles the wait before the next, up
    # to MOST_COOLDOWN; a try that pays resets it.
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=2)

    def fail_two_then_count_the_wait():
        assert _finish_trial(tuner, clock, (1, 2), backlog=True, tried_rows=56) == (2, 1)
        wait = 0
        while (change := _window(tuner, clock, backlog=True)) is None:
            wait += 1
        assert change == (1, 2)
        return wait

    assert _outrun(tuner, clock) == (1, 2)
    assert [fail_two_then_count_the_wait() for _ in range(6)] == [8, 16, 32, 64, 64, 64]
    assert tuner.MOST_COOLDOWN == 64
    # Two carries as much as one: kept. A quiet spell takes it back to one, and the
    # next failed try waits COOLDOWN windows again.
    assert _finish_trial(tuner, clock, (1, 2), backlog=True) is None
    changes = [_window(tuner, clock, backlog=False) for _ in range(tuner.QUIET_WINDOWS)]
    assert changes[-1] == (2, 1)
    assert _finish_trial(tuner, clock, (2, 1), backlog=False) is None
    assert slots.limit == 1
    assert _outrun(tuner, clock) == (1, 2)
    assert fail_two_then_count_the_wait() == tuner.COOLDOWN == 8


def test_two_calls_go_back_to_one_once_the_backlog_is_occasional(monkeypatch):
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=2)  # no probes above two
    assert _outrun(tuner, clock) == (1, 2)
    assert _finish_trial(tuner, clock, (1, 2), backlog=True) is None
    n = tuner.WINDOW_BATCHES
    changes = []
    for _ in range(tuner.QUIET_WINDOWS):
        clock.now += 0.1
        changes += [tuner.observe(64, backlog=i == 0) for i in range(n)]
    assert [c for c in changes if c] == [(2, 1)] and changes[-1] == (2, 1)
    assert slots.limit == 1


def test_two_calls_that_carry_fewer_rows_than_one_go_back_to_one(monkeypatch):
    # A model holding the GIL: two calls only take turns, and carry less than one did.
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=4)
    # Taken to take turns until a trial finds otherwise (deliveries keep the call slot).
    assert tuner.serialized
    assert _outrun(tuner, clock) == (1, 2) and tuner.serialized
    assert _finish_trial(tuner, clock, (1, 2), backlog=True, tried_rows=56) == (2, 1)
    assert tuner.serialized  # deliveries then keep the call slot (engine/delivery.py)
    # Backlogged still, but two is not tried again before COOLDOWN windows at one.
    changes = [_window(tuner, clock, backlog=True) for _ in range(tuner.COOLDOWN)]
    assert not any(changes) and slots.limit == 1 and tuner.serialized
    assert _window(tuner, clock, backlog=True) == (1, 2)
    # This time two carries more (a model behind one lock: the next batch is ready
    # when the lock frees): it stays, and three is tried.
    assert _finish_trial(tuner, clock, (1, 2), backlog=True, tried_rows=70) == (2, 3)
    assert not tuner.serialized


def test_a_step_up_that_did_not_pay_is_followed_by_a_step_down(monkeypatch):
    # A model holding the GIL: two calls carry fewer rows than one, but a trial of two
    # passed on a lucky spell. Three does not pay either; the next try, after the
    # cooldown, is two against one, which carries more: one it is, and the calls are
    # known to take turns.
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=4)
    assert _outrun(tuner, clock) == (1, 2)
    assert _finish_trial(tuner, clock, (1, 2), backlog=True) == (2, 3)  # lucky: kept
    assert _finish_trial(tuner, clock, (2, 3), backlog=True) == (3, 2)  # no gain
    changes = [_window(tuner, clock, backlog=True) for _ in range(tuner.COOLDOWN)]
    assert not any(changes) and slots.limit == 2
    assert _window(tuner, clock, backlog=True) == (2, 1)
    assert _finish_trial(tuner, clock, (2, 1), backlog=True, tried_rows=64,
                         before_rows=56) is None
    assert slots.limit == 1 and tuner.serialized
    # Two is not tried again before a cooldown, however backlogged the windows at one:
    # twice COOLDOWN, as after the second try in a row that found more calls not paying.
    changes = [_window(tuner, clock, backlog=True) for _ in range(2 * tuner.COOLDOWN)]
    assert not any(changes)
    assert _window(tuner, clock, backlog=True) == (1, 2)


def test_a_step_down_that_carries_less_goes_back_and_the_next_try_is_up(monkeypatch):
    # Calls that overlap (the GIL let go): three carry what two do (a lock in the
    # model), and one carries far less than two. Tries alternate up and down, each
    # failed one doubling the wait before the next.
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=4)
    assert _outrun(tuner, clock, rows_per_batch=32) == (1, 2)
    # Two carry twice what one does: kept on its first window (CLEAR).
    assert _finish_trial(tuner, clock, (1, 2), backlog=True, before_rows=32,
                         clear=True) == (2, 3)
    waits, tries = [], []
    for _ in range(4):
        change = tries[-1] if tries else None
        if change == (2, 3):
            assert _finish_trial(tuner, clock, change, backlog=True) == (3, 2)
        elif change == (2, 1):
            assert _finish_trial(tuner, clock, change, backlog=True, tried_rows=32,
                                 clear=True) == (1, 2)
        else:
            assert _finish_trial(tuner, clock, (2, 3), backlog=True) == (3, 2)
        wait = 0
        while (change := _window(tuner, clock, backlog=True)) is None:
            wait += 1
        waits.append(wait)
        tries.append(change)
    assert tries == [(2, 1), (2, 3), (2, 1), (2, 3)]
    assert waits == [8, 16, 32, 64]
    assert _finish_trial(tuner, clock, (2, 3), backlog=True) == (3, 2)
    assert slots.limit == 2 and not tuner.serialized


def test_steps_down_go_on_while_they_are_kept(monkeypatch):
    # All four calls running (a lucky climb), on a model whose calls take turns: at
    # max_limit the try is a step down, and each step down kept is followed by the next.
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=4, limit=4)
    tuner.serialized = False  # as the climb's trials found
    assert _window(tuner, clock, backlog=True) == (4, 3)
    # As many rows at three: kept, and the verdict's window begins the next step down.
    assert _finish_trial(tuner, clock, (4, 3), backlog=True) == (3, 2)
    assert _finish_trial(tuner, clock, (3, 2), backlog=True) == (2, 1)
    assert _finish_trial(tuner, clock, (2, 1), backlog=True, before_rows=60) is None
    assert slots.limit == 1 and tuner.serialized


@pytest.mark.parametrize(("rows_at_two", "decided_at_once", "kept"), [
    (84, True, True),    # 84 / 64 = 1.31: beyond 0.98 * 1.3, kept on its first window
    (81, False, True),   # 1.27: not clear; kept after the whole trial
    (48, True, False),   # 0.75: under 0.98 / 1.3, dropped on its first window
    (49, False, False),  # 0.77: not clear; dropped after the whole trial
])
def test_a_clear_first_window_decides_a_trial(monkeypatch, rows_at_two, decided_at_once,
                                              kept):
    assert (ConcurrencyTuner.TWO_LOSS, ConcurrencyTuner.CLEAR) == (0.98, 1.3)
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=2)
    assert _outrun(tuner, clock) == (1, 2)
    verdict = None if kept else (2, 1)
    assert _finish_trial(tuner, clock, (1, 2), backlog=True, tried_rows=rows_at_two,
                         clear=decided_at_once) == verdict
    assert slots.limit == (2 if kept else 1) and tuner.serialized is not kept


def test_batches_of_no_rows_tell_no_number_of_calls_from_another(monkeypatch):
    # Items of shape (0, n) make batches of no rows: no rows per second to compare.
    # The number of calls in use stays (two, kept as carrying as much as one).
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=2)
    assert _outrun(tuner, clock, rows_per_batch=0) == (1, 2)
    assert _finish_trial(tuner, clock, (1, 2), backlog=True, tried_rows=0,
                         before_rows=0) is None
    changes = [_window(tuner, clock, backlog=True, rows_per_batch=0)
               for _ in range(tuner.COOLDOWN)]
    assert not any(changes) and slots.limit == 2
    assert _window(tuner, clock, backlog=True, rows_per_batch=0) == (2, 1)
    assert _finish_trial(tuner, clock, (2, 1), backlog=True, tried_rows=0,
                         before_rows=0) == (1, 2)
    assert slots.limit == 2 and not tuner.serialized


def test_a_step_down_that_carries_less_is_not_kept_step_after_step(monkeypatch):
    # Each call fewer carrying a little less (92%, 92%, 94% of the number above it):
    # none is kept, however small its loss, or the losses would add up step after step
    # (to 80% of four calls at one). Four it stays.
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=4, limit=4)
    rows_at = {4: 100, 3: 92, 2: 85, 1: 80}
    changes = []
    for _ in range(40 * tuner.MOST_COOLDOWN):
        change = _window(tuner, clock, backlog=True, rows_per_batch=rows_at[slots.limit])
        if change is not None:
            changes.append(change)
    assert slots.limit == 4
    assert set(changes) == {(4, 3), (3, 4)}


@pytest.mark.parametrize("slow", ["the window before", "a window at two"])
def test_one_slow_window_does_not_decide_a_trial(monkeypatch, slow):
    # On a shared machine one window now and then runs slow for reasons of its own
    # (another process, a GC pass). Compared window against window, it would decide the
    # try: a slow window before it keeps two calls that carry fewer rows (a model
    # holding the GIL: 54 rows a batch at two against 64 at one), a slow window at two
    # drops two calls that carry more (80 against 64). The trial alternates the limits
    # and pools each one's windows.
    assert ConcurrencyTuner.TRIAL_WINDOWS == 2
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=2)
    if slow == "the window before":
        assert _outrun(tuner, clock, rows_per_batch=50) == (1, 2)
        at_two, expected = (54, 54), (2, 1)  # 54 / 50 would keep two; 54 / 57 does not
    else:
        assert _outrun(tuner, clock) == (1, 2)
        at_two, expected = (60, 80), None  # 60 / 64 would drop two; 70 / 64 does not
    assert _window(tuner, clock, backlog=True, rows_per_batch=at_two[0]) == (2, 1)
    assert _window(tuner, clock, backlog=True, rows_per_batch=64) == (1, 2)
    assert _window(tuner, clock, backlog=True, rows_per_batch=at_two[1]) == expected
    assert slots.limit == (1 if expected else 2)
    assert tuner.serialized is (expected is not None)


def test_quiet_because_all_in_flight_keeps_the_calls(monkeypatch):
    # Every request in flight at three calls (a closed loop the calls serve in
    # parallel): nothing waits, so the windows are quiet; one call then carries far less,
    # and the three come back, with twice the quiet windows before the next try.
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=4, limit=3)
    changes = [_window(tuner, clock, backlog=False) for _ in range(tuner.QUIET_WINDOWS)]
    assert changes[-1] == (3, 1) and not any(changes[:-1])
    assert _finish_trial(tuner, clock, (3, 1), backlog=False, tried_rows=22,
                         clear=True) == (1, 3)
    assert slots.limit == 3
    changes = [_window(tuner, clock, backlog=False)
               for _ in range(2 * tuner.QUIET_WINDOWS)]
    assert changes[-1] == (3, 1) and not any(changes[:-1])
    # A truly quiet load: one call carries as much, and one it stays.
    assert _finish_trial(tuner, clock, (3, 1), backlog=False, tried_rows=63) is None
    assert slots.limit == 1
    changes = [_window(tuner, clock, backlog=False) for _ in range(tuner.QUIET_WINDOWS)]
    assert not any(changes) and slots.limit == 1


def test_windows_of_full_batches_are_not_quiet(monkeypatch):
    # A closed loop that two calls serve in parallel (a model behind one lock, the next
    # batch filled while the first runs): nothing waits when a batch ends, but the
    # batches reach their target. Trying one call there costs a window at far fewer rows
    # per second; the calls stay. Once most batches fall short, the quiet count starts.
    tuner, slots, clock = _tuner_on_a_fake_clock(monkeypatch, max_limit=2)
    assert _outrun(tuner, clock) == (1, 2)
    assert _finish_trial(tuner, clock, (1, 2), backlog=True) is None  # as much as one
    n = tuner.WINDOW_BATCHES
    mostly_full = -(-n * 3 // 4)  # 12 of 16
    assert tuner.FULL_SHARE == 0.75
    for _ in range(4 * tuner.MOST_QUIET_WINDOWS):
        clock.now += 0.1
        for i in range(n):
            assert tuner.observe(64, backlog=False, full=i < mostly_full) is None
    assert slots.limit == 2
    changes = []
    for _ in range(tuner.QUIET_WINDOWS):
        clock.now += 0.1
        changes += [tuner.observe(64, backlog=False, full=i < mostly_full - 1)
                    for i in range(n)]
    assert changes[-1] == (2, 1) and not any(changes[:-1])
    assert slots.limit == 1


def _controller_on_a_fake_clock(monkeypatch, **config):
    from batchproc import controller as controller_module

    clock = _Clock()
    monkeypatch.setattr(controller_module.time, "monotonic", clock)
    return controller(**config), clock


def _controller_windows(c, clock, n, rows, target, queued):
    for _ in range(n):
        clock.now += 0.1
        for _ in range(c._tuner.WINDOW_BATCHES):
            c.observe_batch(rows, 0.0005, target, queued)


@pytest.mark.parametrize("case", ["max_batch_size 1", "memory critical"])
def test_batches_at_the_smallest_target_are_full_whatever_the_load(monkeypatch, case):
    # A batch of one row when one is the most (or all a critical memory level allows)
    # says nothing of the load: a trickle after a burst goes back to one call.
    if case == "max_batch_size 1":
        c, clock = _controller_on_a_fake_clock(monkeypatch, max_batch_size=1, max_workers=4)
    else:
        c, clock = _controller_on_a_fake_clock(monkeypatch, max_batch_size=64,
                                               initial_batch_size=8, max_workers=4)
    target = c.current_batch_size
    _controller_windows(c, clock, 2, rows=target, target=target, queued=5 * target)
    assert c.slots.limit == 2  # a burst outran one call
    _controller_windows(c, clock, 2 * c._tuner.TRIAL_WINDOWS - 1, rows=target,
                        target=target, queued=5 * target)
    assert c.slots.limit >= 2  # two carried as much as one
    if case == "memory critical":
        c.set_memory_level(MEMORY_CRITICAL)
        target = c.current_batch_size
        assert target == 1
    _controller_windows(c, clock, 9 * c._tuner.QUIET_WINDOWS, rows=target, target=target,
                        queued=0)
    assert c.slots.limit == 1


def test_the_controller_tells_the_tuner_which_batches_reached_their_target(monkeypatch):
    from batchproc.controller import ConcurrencyTuner

    seen = []
    monkeypatch.setattr(ConcurrencyTuner, "observe",
                        lambda self, rows, backlog, full=False: seen.append((rows, full)))
    c = controller(max_batch_size=64, initial_batch_size=32)  # ADAPTIVE, the default
    c.observe_batch(31, 0.005, target=32)
    c.observe_batch(32, 0.005, target=32)
    c.observe_batch(40, 0.005, target=32)
    assert seen == [(31, False), (32, True), (40, True)]


def test_adaptive_and_greedy_start_with_one_call_fixed_with_all():
    from batchproc import BatchProcessingStrategy

    assert controller(max_workers=4).slots.limit == 1
    assert controller(max_workers=4,
                      processing_strategy=BatchProcessingStrategy.GREEDY).slots.limit == 1
    assert controller(max_workers=4,
                      processing_strategy=BatchProcessingStrategy.FIXED).slots.limit == 4


@pytest.mark.parametrize("fails", [False, True])
def test_the_queue_is_told_a_batch_is_answered_before_its_callers_are(make_processor,
                                                                      fails):
    # Callers answered early in a delivery come back before it ends: the queue must
    # already count their requests as the delivery's wave (RequestQueue.answer_batch),
    # not as requests carried across the call. Results and failures alike.
    def model(batch):
        if fails:
            raise ValueError("model failed")
        return batch

    p = make_processor(max_retries=0)
    controller = p._controller
    events = []
    answer = controller.batch_answered

    def answered():
        events.append("answered")
        answer()

    controller.batch_answered = answered
    p.start(model)
    future = p.enqueue_predict(np.zeros((1, 2)))
    future.add_done_callback(lambda f: events.append("caller answered"))
    if fails:
        with pytest.raises(ValueError):
            future.result(timeout=30)
    else:
        future.result(timeout=30)
    p.stop()
    assert events == ["answered", "caller answered"]


def _waiting_for_slot(slots, timeout, watch):
    """Start a thread in ``slots.acquire(timeout, watch)``; returns (thread, result list)."""
    got = []
    thread = threading.Thread(target=lambda: got.append(slots.acquire(timeout, watch)),
                              daemon=True)
    thread.start()
    return thread, got


def _until(predicate, what):
    import time

    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        threading.Event().wait(0.001)


def _a_watch_ended_beside_a_sleeper():
    """All slots taken; one waiting thread's watch period ended without a slot while
    another waits on, asleep: (slots, the sleeper, what its acquire returned)."""
    from batchproc.controller import CallSlots

    slots = CallSlots(1)
    assert slots.acquire(0.0)
    # A long watch, ended by hand once the sleeper waits (the oldest waiter is woken
    # first): a sleeper started late on a busy machine would find the watch over.
    watcher, watcher_got = _waiting_for_slot(slots, 30.0, 30.0)
    _until(lambda: slots._watched, "a watcher")
    sleeper, sleeper_got = _waiting_for_slot(slots, 30.0, 0.05)
    _until(lambda: len(slots._cond._waiters) == 2, "two waiters")
    with slots._lock:
        slots._cond.notify()
    watcher.join(10)
    assert watcher_got == [False]  # its watch period ended, no slot
    assert sleeper.is_alive() and not sleeper_got  # still waiting out its 30 s
    return slots, sleeper, sleeper_got


def test_one_thread_waiting_for_a_call_slot_watches_the_others_sleep():
    # Workers without a call slot look for requests overdue past batch_timeout every
    # watch period; one of them is enough, the others waking as often would cost a
    # thread wake-up each, every period, for nothing.
    slots, sleeper, sleeper_got = _a_watch_ended_beside_a_sleeper()
    # The next watcher is whoever comes back first; a slot freed wakes one waiter, and
    # a watcher that takes it hands the watch to one still asleep.
    # A watch long enough for this thread to free the slot within it, however late.
    watcher, watcher_got = _waiting_for_slot(slots, 30.0, 1.0)
    _until(lambda: slots._watched and len(slots._cond._waiters) == 2, "a new watcher")
    slots.release(wake=False)  # freed without waking anyone: the watcher finds it
    watcher.join(10)
    assert watcher_got == [True]
    sleeper.join(10)
    assert sleeper_got == [False]  # woken to take the watch over, well before 30 s
    slots.release()


def test_a_watcher_that_takes_over_a_stalled_slot_hands_the_watch_over():
    slots, sleeper, sleeper_got = _a_watch_ended_beside_a_sleeper()
    busy = slots._busy
    slots.took_over()  # what the watcher does for requests past batch_timeout
    sleeper.join(10)
    assert sleeper_got == [False]  # woken to take the watch over, well before 30 s
    assert slots._busy == busy  # the slot changed hands; none was added


def _dozing_for_slot(slots, idle):
    """Start a thread in ``slots.acquire(30.0, 0.01, idle)``: (thread, result list)."""
    got = []
    thread = threading.Thread(target=lambda: got.append(slots.acquire(30.0, 0.01, idle)),
                              daemon=True)
    thread.start()
    return thread, got


def test_an_idle_watcher_dozes_until_a_batch_begins():
    # With nothing going on the watcher waits the long timeout, not a watch period (an
    # idle processor woke it 200 times a second); the next batch to begin wakes it.
    from batchproc.controller import CallSlots

    slots = CallSlots(1)
    assert slots.acquire(0.0)
    dozer, got = _dozing_for_slot(slots, lambda: True)
    _until(lambda: slots.dozing and len(slots._cond._waiters) == 1, "a dozing watcher")
    dozer.join(0.1)  # ten watch periods
    assert dozer.is_alive() and not got
    slots.wake_dozer()
    dozer.join(10)
    assert got == [False] and not slots.dozing


def test_a_watcher_not_idle_keeps_its_watch_period():
    from batchproc.controller import CallSlots

    slots = CallSlots(1)
    assert slots.acquire(0.0)
    asked = []
    watcher, got = _dozing_for_slot(slots, lambda: asked.append(1) or False)
    watcher.join(10)
    assert got == [False] and asked == [1] and not slots.dozing


def test_a_batch_that_begins_while_the_watcher_asks_whether_it_is_idle_wakes_it():
    # The batch begins after the board was found empty and before the watcher waits:
    # its wake_dozer blocks on the lock until the wait begins, then wakes it.
    from batchproc.controller import CallSlots

    slots = CallSlots(1)
    assert slots.acquire(0.0)
    began = threading.Thread(target=slots.wake_dozer, daemon=True)

    def idle():
        began.start()
        began.join(0.2)  # it returns at once only if it saw no doze
        return True

    dozer, got = _dozing_for_slot(slots, idle)
    dozer.join(10)  # well before the 30 s doze
    assert got == [False]
    began.join(10)
    assert not began.is_alive()


def test_a_slot_freed_ends_a_doze_with_the_slot():
    from batchproc.controller import CallSlots

    slots = CallSlots(1)
    assert slots.acquire(0.0)
    dozer, got = _dozing_for_slot(slots, lambda: True)
    _until(lambda: slots.dozing and len(slots._cond._waiters) == 1, "a dozing watcher")
    slots.release()
    dozer.join(10)
    assert got == [True] and not slots.dozing


def test_a_thread_woken_for_a_slot_another_took_returns_to_look_again():
    from batchproc.controller import CallSlots

    slots = CallSlots(1)
    assert slots.acquire(0.0)
    waiter, got = _waiting_for_slot(slots, 30.0, None)
    _until(lambda: len(slots._cond._waiters) == 1, "a waiter")
    slots.release(wake=True)
    assert slots.acquire(0.0)  # the releasing thread takes it back first
    waiter.join(10)
    assert got == [False]


def _watched_slots(batch_timeout=30.0):
    """CallSlots(1), its slot taken, whose watcher waits in a queue's await_late."""
    from batchproc._native.request_queue import RequestQueue
    from batchproc.controller import CallSlots
    from batchproc.engine.workers import _LateRequests

    slots, queue = CallSlots(1), RequestQueue(8)
    slots.watch_with(_LateRequests(queue, batch_timeout))
    assert slots.acquire(0.0)
    return slots, queue


def _acquiring(slots, *args):
    got = []
    thread = threading.Thread(target=lambda: got.append(slots.acquire(*args)), daemon=True)
    thread.start()
    return thread, got


def test_the_watcher_waits_in_the_queue_and_a_freed_slot_wakes_it():
    slots, _queue = _watched_slots()
    watcher, got = _acquiring(slots, 30.0, 30.0)
    _until(lambda: slots._watch_waiting, "the watcher in the queue's wait")
    assert not slots._cond._waiters  # not on the condition
    slots.release()
    watcher.join(10)
    assert got == [True] and not slots._watch_waiting


@pytest.mark.parametrize("wake", ["set_limit", "wake_all"])
def test_a_new_limit_or_a_wake_of_all_wakes_the_watcher_in_the_queue(wake):
    slots, _queue = _watched_slots()
    watcher, got = _acquiring(slots, 30.0, 30.0)
    _until(lambda: slots._watch_waiting, "the watcher in the queue's wait")
    if wake == "set_limit":
        slots.set_limit(2)
    else:
        slots.wake_all()
    watcher.join(10)
    assert got == [wake == "set_limit"]


def test_a_freed_slot_goes_to_a_thread_on_the_condition_before_the_watcher():
    slots, queue = _watched_slots()
    watcher, watched = _acquiring(slots, 30.0, 30.0)
    _until(lambda: slots._watch_waiting, "the watcher in the queue's wait")
    waiter, waited = _acquiring(slots, 30.0)
    _until(lambda: len(slots._cond._waiters) == 1, "a thread on the condition")
    wakes = queue.watch_wakes
    slots.release()
    waiter.join(10)
    assert waited == [True] and queue.watch_wakes == wakes and watcher.is_alive()
    slots.wake_all()
    watcher.join(10)
    assert watched == [False]


def test_a_slot_freed_before_the_watcher_waits_in_the_queue_is_not_missed():
    # The slot is freed (and the watch woken) after the watcher read the wake count and
    # before its wait begins: the wait returns at once instead of after 30 s.
    from batchproc._native.request_queue import RequestQueue
    from batchproc.controller import CallSlots
    from batchproc.engine.workers import _LateRequests

    slots = CallSlots(1)
    assert slots.acquire(0.0)
    real = _LateRequests(RequestQueue(8), 30.0)
    releaser = threading.Thread(target=slots.release, daemon=True)

    class Ordered:
        def wakes(self):
            releaser.start()  # blocks on the slots' lock, held now
            return real.wakes()

        def wait(self, first_look, timeout, since):
            releaser.join(10)  # the release and its wake are done
            assert not releaser.is_alive()
            real.wait(first_look, timeout, since)

        def wake(self):
            real.wake()

    slots.watch_with(Ordered())
    watcher, got = _acquiring(slots, 30.0, 30.0)
    watcher.join(10)
    assert got == [True]


def test_the_watcher_in_the_queue_comes_back_for_a_late_request_not_before():
    slots, queue = _watched_slots(batch_timeout=0.05)
    began = time.monotonic()
    watcher, got = _acquiring(slots, 30.0, 0.01)
    queue.push("a")
    watcher.join(10)
    assert got == [False] and time.monotonic() - began >= 0.05
    assert queue.oldest_age() >= 0.05


def test_two_slots_freed_before_a_woken_waiter_returns_wake_the_watcher_too():
    # The second freed slot comes while the thread on the condition woken for the first
    # has not yet returned (it needs the lock): it goes to the watcher, not to a notify
    # that finds nobody left on the condition.
    from batchproc._native.request_queue import RequestQueue
    from batchproc.controller import CallSlots
    from batchproc.engine.workers import _LateRequests

    slots = CallSlots(2)
    slots.watch_with(_LateRequests(RequestQueue(8), 30.0))
    assert slots.acquire(0.0) and slots.acquire(0.0)
    watcher, watched = _acquiring(slots, 30.0, 30.0)
    _until(lambda: slots._watch_waiting, "the watcher in the queue's wait")
    waiter, waited = _acquiring(slots, 30.0)
    _until(lambda: len(slots._cond._waiters) == 1, "a thread on the condition")
    with slots._lock:  # both freed at once, as two releases back to back
        slots._busy -= 2
        slots._wake_one_locked()
        slots._wake_one_locked()
    waiter.join(10)
    watcher.join(10)
    assert waited == [True] and watched == [True]

"""Failure scheduling (issue 11): healthy requests never wait for a failing one's
backoff, retries are parked in the queue, one retry schedule for a batch failing as a
whole, the target shrinks once per failed batch, ``retry_on``, error messages that name
the batch the model saw, and ``batch_timeout`` as a ceiling while other calls run long.

Orderings come from pause/resume and events; the bounds are counts of model calls, or
generous multiples of a call's own time, never a sleep and hope.
"""

import asyncio
import threading
import time
import types

import numpy as np
import pytest
from hanging import hangs_on_666
from waiting import wait_for

from batchproc import (
    BatchOutputError,
    BatchProcessingStrategy,
    BatchTimeoutError,
    ProcessorStoppedError,
    QueueTimeoutError,
)


class Poison(Exception):
    pass


def item(v):
    return np.array([[v]], dtype=np.float64)


class CountingModel:
    """Doubles its batch, raising ``Poison`` for batches holding a row equal to -1; counts
    calls, and for the requests it watches the number of calls made when each future
    completed (read at the start of each call, and by ``settle``: a worker completes a
    part's futures before its next call)."""

    def __init__(self, bad=(-1.0,), exc=Poison):
        self.calls = []
        self.bad = set(bad)
        self.exc = exc
        self.lock = threading.Lock()
        self.watched = []  # (future, the list its count goes to)

    def __call__(self, batch):
        with self.lock:
            self._note_done()
            self.calls.append(batch[:, 0].tolist())
        if self.bad.intersection(batch[:, 0].tolist()):
            raise self.exc("poisoned row")
        return batch * 2

    def done_at(self, future, record):
        with self.lock:
            self.watched.append((future, record))

    def settle(self):
        """Count the watched futures completed since the last call."""
        with self.lock:
            self._note_done()

    def _note_done(self):
        pending = []
        for future, record in self.watched:
            if future.done():
                record.append(len(self.calls))
            else:
                pending.append((future, record))
        self.watched = pending


def enqueue_paused(p, values, before_resume=lambda futures: None):
    p.pause()  # so that they share one batch
    futures = [p.enqueue_predict(item(v)) for v in values]
    before_resume(futures)
    p.resume()
    return futures


def run_with_bad_inputs(make_processor, size, bad_positions):
    """One batch of ``size`` requests, those at ``bad_positions`` poisoned, retries
    parked for 30 s: (processor, model, values, futures, calls made when each good one
    was done)."""
    model = CountingModel()
    p = make_processor(model, max_workers=1, max_batch_size=size, initial_batch_size=size,
                       retry_delay=30.0)
    values = [float(v) for v in range(size)]
    for i in bad_positions:
        values[i] = -1.0
    good_done = []

    def watch(futures):
        for v, f in zip(values, futures):
            if v != -1.0:
                model.done_at(f, good_done)

    futures = enqueue_paused(p, values, watch)
    for v, f in zip(values, futures):
        if v != -1.0:
            assert f.result(timeout=20)[0, 0] == 2 * v
    model.settle()
    assert len(good_done) == size - len(bad_positions)
    # A caller is woken before its worker ends the search (parking the bad ones for
    # their retry): wait for it, well within the backoff.
    wait_for(lambda: p.get_stats()["queue_size"] == len(bad_positions),
             "the bad requests parked")
    assert model.calls[0] == values  # one batch first
    return p, model, values, futures, good_done


@pytest.mark.parametrize("bad_positions", [
    [0], [3], [4], [7],                  # one bad input, wherever it is
    [0, 7], [3, 4], [1, 2, 5],           # several at once
])
def test_healthy_requests_never_wait_for_a_backoff(make_processor, bad_positions):
    # The healthy requests are done after at most two calls per bisection level and
    # bad input (one per level, plus one, when a single input is bad: see below), long
    # before the first retry: no backoff is waited on the worker.
    p, _model, values, futures, good_done = run_with_bad_inputs(make_processor, 8,
                                                                bad_positions)
    levels = 3  # log2(8)
    # At most two calls per level for each bad input (both halves of a failing batch).
    assert max(good_done) <= 1 + 2 * levels * len(bad_positions)
    if len(bad_positions) == 1:
        assert max(good_done) <= 1 + levels + 1
    # The bad ones are parked for 30 s: nothing above waited for them.
    assert not any(f.done() for v, f in zip(values, futures) if v == -1.0)
    assert p.get_stats()["queue_size"] == len(bad_positions)  # parked in the queue
    p.stop(timeout=0.1)  # stop does not wait out a backoff past its timeout
    for v, f in zip(values, futures):
        if v == -1.0:
            with pytest.raises(ProcessorStoppedError):
                f.result(timeout=0)


@pytest.mark.parametrize("size", [2, 8, 64])
def test_one_bad_input_costs_one_call_per_level_wherever_it_is(make_processor, size):
    # One failing request among n: the others have their results within log2(n) + 1
    # calls after the failing batch (one call per bisection level, and at most one to
    # deliver the requests set aside).
    levels = size.bit_length() - 1
    positions = sorted({0, 1, size // 2 - 1, size // 2, size - 2, size - 1})
    for bad in positions:
        p, model, values, futures, good_done = run_with_bad_inputs(make_processor, size,
                                                                   [bad])
        assert max(good_done) <= 1 + levels + 1, (bad, model.calls)
        # The bad one has run alone exactly once before it is parked (only a request that
        # fails on its own gets an error): as the search's last call, or after every
        # other request has its result.
        assert model.calls.count([-1.0]) == 1
        assert len(model.calls) <= max(good_done) + 1
        # Every request is in at most one successful call, so nothing ran twice.
        delivered = [v for call in model.calls if -1.0 not in call for v in call]
        assert sorted(delivered) == sorted(v for v in values if v != -1.0)
        assert not futures[bad].done()  # parked for its retry
        p.stop(timeout=0.1)


@pytest.mark.parametrize("hung_at", [0, 2, 5])
def test_a_call_of_a_search_past_item_timeout_times_out_only_the_hanging_request(
        make_processor, hung_at):
    # A search runs parts of a failed batch; a part holding the request that hangs runs
    # past item_timeout. The batch's requests are queued again, each alone: the poisoned
    # one gets its own error, the hanging one times out alone, the others have results.
    release = threading.Event()
    hang_on = float(hung_at)

    def model(batch):
        values = batch[:, 0].tolist()
        if -1.0 in values:
            raise Poison("poisoned row")
        if hang_on in values and len(values) < 8:  # a part of the batch, not all of it
            release.wait()
        return batch * 2

    p = make_processor(model, max_workers=1, max_batch_size=8, initial_batch_size=8,
                       max_retries=0, item_timeout=0.2)
    try:
        values = [float(v) for v in range(8)]
        values[6] = -1.0
        futures = enqueue_paused(p, values)
        outcome = {}
        for v, f in zip(values, futures):
            error = f.exception(timeout=20)
            outcome[v] = type(error).__name__ if error else f.result()[0, 0]
    finally:
        release.set()
    assert outcome.pop(hang_on) == "BatchTimeoutError"
    assert outcome.pop(-1.0) == "Poison"
    assert outcome == {v: 2 * v for v in outcome}
    assert p.get_stats()["total_timed_out"] == 1


def test_a_blocking_callback_of_a_timed_out_search_holds_no_time_limit(make_processor):
    # A search delivers part of its batch, then a call of it hangs past item_timeout:
    # the delivered part's deferred done-callbacks ran on the thread that enforces
    # item_timeout, and one that blocked there stopped every later time limit (a call
    # of 3 s with item_timeout=0.3 ran out and returned its result). They run on the
    # processor's callbacks thread, which stop() ends (the fixture finds none left).
    release, blocking, entered = threading.Event(), threading.Event(), threading.Event()
    ran_on = []

    def model(batch):
        values = batch[:, 0].tolist()
        if 9.0 in values and len(values) > 1:
            raise Poison("the batch fails")  # the search runs [0.0] first, then [9.0]
        if 9.0 in values or 8.0 in values:
            release.wait()  # hangs past item_timeout
        return batch * 2

    def callback(future):
        ran_on.append(threading.current_thread().name)
        entered.set()
        blocking.wait(30)

    p = make_processor(model, max_workers=2, max_retries=0, item_timeout=0.3)
    try:
        p.pause()
        first = p.enqueue_predict(np.array([[0.0]]))
        first.add_done_callback(callback)
        hung = p.enqueue_predict(np.array([[9.0]]))
        p.resume()
        assert isinstance(hung.exception(timeout=20), BatchTimeoutError)
        assert entered.wait(20)
        # The callback still blocks: a later call past item_timeout times out as ever.
        later = p.enqueue_predict(np.array([[8.0]]))
        assert isinstance(later.exception(timeout=20), BatchTimeoutError)
        assert first.result(timeout=1)[0, 0] == 0.0
        assert ran_on == ["batchproc-callbacks"]
    finally:
        blocking.set()
        release.set()


class HangingModel:
    """Doubles its batch; a call holding one of the ``hang`` values, or more than
    ``above`` rows, blocks until ``release`` is set (the test sets it at its end). Counts
    calls and those that hung: each hung call leaves one thread stuck."""

    def __init__(self, hang=(), above=None):
        self.hang = set(hang)
        self.above = above
        self.release = threading.Event()
        self.calls = []
        self.hung = []
        self.lock = threading.Lock()

    def __call__(self, batch):
        values = batch[:, 0].tolist()
        hangs = bool(self.hang.intersection(values)) or (
            self.above is not None and len(values) > self.above)
        with self.lock:
            self.calls.append(values)
            if hangs:
                self.hung.append(values)
        if hangs:
            self.release.wait()
        return batch * 2


def run_with_hangs(make_processor, model, size, **config):
    """One batch of ``size`` requests (values 0..size-1) through ``model`` with
    item_timeout=0.1: (processor, {value: its result's value, or its error's type name},
    the target sizes halved)."""
    p = make_processor(model, max_workers=1, max_batch_size=size, initial_batch_size=size,
                       item_timeout=0.1, **config)
    halvings = record_halvings(p)
    try:
        futures = enqueue_paused(p, [float(v) for v in range(size)])
        outcome = {}
        for v, f in enumerate(futures):
            error = f.exception(timeout=20)
            outcome[float(v)] = type(error).__name__ if error else f.result()[0, 0]
        wait_until_hung_calls_settle(p)
    finally:
        model.release.set()
    settled(p)
    assert model.calls[0] == [float(v) for v in range(size)]  # one batch first
    return p, outcome, halvings


def test_requests_queued_again_after_a_hung_call_run_quietly_when_waited_on(
        make_processor, caplog):
    # A call of several requests hangs past item_timeout: each is queued again alone and
    # popped as a request already running. Handed to concurrent.futures.wait (which
    # gives a future a lock), popping it again logged "Future in unexpected state" as
    # CRITICAL, once per request.
    import concurrent.futures

    model, release, _ = hangs_on_666()
    p = make_processor(model, max_workers=1, max_batch_size=4, initial_batch_size=4,
                       item_timeout=0.2)
    try:
        futures = enqueue_paused(p, [666.0, 1.0, 2.0])
        done, _ = concurrent.futures.wait(futures, timeout=20)
        assert len(done) == 3
    finally:
        release.set()
    assert type(futures[0].exception(timeout=0)).__name__ == "BatchTimeoutError"
    assert [f.result(timeout=0)[0, 0] for f in futures[1:]] == [1.0, 2.0]
    assert not [r for r in caplog.records if "unexpected state" in r.getMessage()]


@pytest.mark.parametrize("size", [2, 8, 16])
def test_a_request_held_with_one_that_hangs_gets_its_result(make_processor, size):
    # The call of the whole batch runs past item_timeout. Only the hanging request times
    # out, wherever it is; the others are queued again alone and have their results. The
    # search costs one more stuck call (the hanging request alone), within log2(n) + 2;
    # retries left do not run it again (a time-out is not retried).
    for hang in sorted({0, size // 2, size - 1}):
        model = HangingModel(hang=[float(hang)])
        p, outcome, halvings = run_with_hangs(make_processor, model, size,
                                              max_retries=3, retry_delay=0.0)
        assert outcome.pop(float(hang)) == "BatchTimeoutError", (hang, model.calls)
        assert outcome == {v: 2 * v for v in outcome}
        assert model.hung == [[float(v) for v in range(size)], [float(hang)]]
        assert len(model.hung) <= size.bit_length() + 2
        assert len(model.calls) == 1 + size  # every request once more, alone
        stats = p.get_stats()
        assert stats["total_timed_out"] == stats["total_errors"] == 1
        assert stats["total_processed"] == size - 1
        # The hang is the request's own: the target stays.
        assert halvings == [] and p.current_batch_size == size


def test_a_retry_due_before_a_request_is_sent_runs_before_it(make_processor):
    # "flaky" fails and is parked for retry_delay; the one worker is then busy with
    # "slow", so nothing looks at the queue when the retry comes due. A request sent
    # after that goes behind the retry (it went ahead: the push did not queue the
    # retry first).
    slow_started, release = threading.Event(), threading.Event()
    failed, ran = [], []

    def model(batch):
        v = batch[0, 0]
        if v == 1 and not failed:
            failed.append(v)
            raise Poison("once")
        if v == 2:
            slow_started.set()
            release.wait(30)
        ran.append(v)
        return batch

    p = make_processor(model, max_workers=1, max_batch_size=1, initial_batch_size=1,
                       retry_delay=0.05, max_retries=1)
    try:
        futures = enqueue_paused(p, [1.0, 2.0])
        assert slow_started.wait(10)
        # The retry was parked before "slow" began: due by now + retry_delay.
        due_by = time.monotonic() + 0.05
        while time.monotonic() <= due_by:
            threading.Event().wait(due_by - time.monotonic() + 0.001)
        futures.append(p.enqueue_predict(item(3.0)))
    finally:
        release.set()
    for f in futures:
        f.result(timeout=20)
    assert ran == [2.0, 1.0, 3.0]


def test_requests_of_an_abandoned_call_run_again_in_the_order_they_were_sent(
        make_processor):
    # The call of all eight hangs past item_timeout: they are queued again together (due
    # at one time) and each runs alone, in their order (not the timer heap's, which put
    # the last first for requests due at one moment).
    release = threading.Event()
    alone = []

    def model(batch):
        if len(batch) > 1:
            release.wait(30)
        else:
            alone.append(batch[0, 0])
        return batch

    p = make_processor(model, max_batch_size=8, initial_batch_size=8, item_timeout=0.3)
    try:
        futures = enqueue_paused(p, [float(v) for v in range(8)])
        for v, f in enumerate(futures):
            assert f.result(timeout=20)[0, 0] == v
    finally:
        release.set()
    assert alone == [float(v) for v in range(8)]


def test_two_hanging_requests_time_out_and_no_other(make_processor):
    model = HangingModel(hang=[1.0, 6.0])
    p, outcome, halvings = run_with_hangs(make_processor, model, 8, max_retries=0)
    assert outcome.pop(1.0) == outcome.pop(6.0) == "BatchTimeoutError"
    assert outcome == {v: 2 * v for v in outcome}
    assert len(model.hung) == 3  # the batch, then each hanging request alone
    assert p.get_stats()["total_timed_out"] == 2
    assert halvings == [] and p.current_batch_size == 8


@pytest.mark.parametrize("above", [1, 3])
def test_a_model_that_hangs_on_large_batches_fails_no_request(make_processor, above):
    # A hang that depends on the batch (any batch above `above` rows) is no request's
    # own: every request has its result, run alone, after the one stuck call; the hang
    # is the batch's, so the target halves, once.
    model = HangingModel(above=above)
    p, outcome, halvings = run_with_hangs(make_processor, model, 8, max_retries=0)
    assert outcome == {float(v): 2.0 * v for v in range(8)}
    assert len(model.hung) == 1
    assert p.get_stats()["total_timed_out"] == 0
    assert halvings == [8] and p.current_batch_size == 4


def test_a_deadline_that_passes_while_queued_again_fails_with_its_own_error(
        make_processor):
    # Queued again after the call of its batch timed out, the healthy request waits (the
    # processor is paused) past its max_queue_time: it expires with QueueTimeoutError,
    # not the hanging request's BatchTimeoutError; that one still times out alone.
    model = HangingModel(hang=[0.0])
    p, entered = two_row_processor_signalling_calls(make_processor, model)
    try:
        p.pause()
        hanging = p.enqueue_predict(item(0))
        timed = p.enqueue_predict(item(1), max_queue_time=2.0)
        p.resume()
        assert entered.wait(20)
        p.pause()  # nothing is popped: the requests queued again wait
        assert isinstance(timed.exception(timeout=20), QueueTimeoutError)
        assert not hanging.done()
        p.resume()
        assert isinstance(hanging.exception(timeout=20), BatchTimeoutError)
    finally:
        model.release.set()
    assert model.hung == [[0.0, 1.0], [0.0]]
    stats = p.get_stats()
    assert stats["total_timed_out"] == 1 and stats["total_expired"] == 1


def test_a_hang_of_the_batch_leaves_the_target_once_a_request_expired(make_processor):
    # Any call of two rows hangs. One request runs out of its max_queue_time while queued
    # again: whether it would hang alone is unknown, so the target stays.
    model = HangingModel(above=1)
    p, entered = two_row_processor_signalling_calls(make_processor, model)
    halvings = record_halvings(p)
    try:
        p.pause()
        served = p.enqueue_predict(item(0))
        timed = p.enqueue_predict(item(1), max_queue_time=2.0)
        p.resume()
        assert entered.wait(20)
        p.pause()
        assert isinstance(timed.exception(timeout=20), QueueTimeoutError)
        p.resume()
        assert served.result(timeout=20)[0, 0] == 0.0
        wait_until_hung_calls_settle(p)
    finally:
        model.release.set()
    settled(p)
    assert model.hung == [[0.0, 1.0]]
    assert halvings == [] and p.current_batch_size == 2


def test_an_abandoned_search_leaves_the_target(make_processor):
    # The search's first call hangs past item_timeout and is abandoned; when it returns at
    # last, its worker must not take the unfinished search for a failure of the batch.
    release = threading.Event()

    def model(batch):
        values = batch[:, 0].tolist()
        if -1.0 in values:
            raise Poison("poisoned row")
        if 0.0 in values and len(values) < 8:
            release.wait()
        return batch * 2

    p = make_processor(model, max_workers=1, max_batch_size=8, initial_batch_size=8,
                       max_retries=0, item_timeout=0.3)
    values = [float(v) for v in range(8)]
    values[6] = -1.0
    futures = enqueue_paused(p, values)
    for f in futures:
        f.exception(timeout=20)
    release.set()  # the abandoned call returns; its worker ends its part of the search
    settled(p)
    assert p.current_batch_size == 8


def test_stop_never_waits_for_a_call_abandoned_past_item_timeout(make_processor):
    # stop() begins while a call hangs; the time limit abandons it during stop's wait:
    # nothing is left to finish, so stop returns then, not at its own timeout.
    release = threading.Event()
    started = threading.Event()

    def model(batch):
        started.set()
        release.wait()
        return batch

    p = make_processor(model, max_workers=1, item_timeout=0.3)
    try:
        future = p.enqueue_predict(item(1))
        assert started.wait(20)
        began = time.monotonic()
        p.stop(timeout=20)
        assert time.monotonic() - began < 10  # the abandonment (~0.3 s), not 20 s
        assert type(future.exception(timeout=0)).__name__ == "BatchTimeoutError"
    finally:
        release.set()


def test_backoff_holds_no_worker_and_holds_up_no_other_request(make_processor):
    # One worker only: were the backoff on a worker, the unrelated request would wait.
    model = CountingModel()
    p = make_processor(model, max_workers=1, retry_delay=30.0, batch_timeout=0.1)
    bad = p.enqueue_predict(item(-1))
    while len(model.calls) < 1:
        time.sleep(0.001)
    # The bad request is parked now (or about to be); an unrelated one goes through.
    good = p.enqueue_predict(item(5))
    assert good.result(timeout=20)[0, 0] == 10
    assert not bad.done()
    # Nothing is held for the backoff (30 s): the good request's batch ends too (its
    # caller may be woken before its worker's last step).
    wait_for(lambda: p.get_stats()["active_batches"] == 0, "no batch active", timeout=10)
    assert not bad.done()
    p.stop(timeout=0.1)


def test_a_failure_of_every_request_ends_within_one_retry_schedule(make_processor):
    # A model that always returns one row too few, on 4 requests: every caller gets its
    # error within one schedule (0.15 + 0.3 + 0.6 s) plus the calls, not one per request.
    calls = []

    def short(batch):
        calls.append(len(batch))
        return batch[:-1]

    delay = 0.15
    # An output error is retried only when retry_on names it (docs/failures.md).
    p = make_processor(short, max_workers=1, max_batch_size=4, initial_batch_size=4,
                       max_retries=3, retry_delay=delay, retry_on=BatchOutputError)
    started = time.monotonic()
    futures = enqueue_paused(p, [1.0, 2.0, 3.0, 4.0])
    for f in futures:
        with pytest.raises(BatchOutputError) as info:
            f.result(timeout=30)
        # The message names the batch the model saw first (4 rows, 3 results) and the
        # request's own last call.
        assert "3 results for a batch of 4" in str(info.value)
        assert "0 results for a batch of 1" in str(info.value)
    elapsed = time.monotonic() - started
    schedule = delay * (2**3 - 1)
    assert elapsed < schedule + 1.5  # generous for the 17 calls on a loaded machine
    # Once the batch's output could not be cut, its requests run alone (a smaller call's
    # output could pass the length check by chance and be cut wrongly): one call each,
    # then each request's 3 retries, alone.
    assert calls[:5] == [4, 1, 1, 1, 1]
    assert sorted(calls[5:]) == [1] * 12
    assert p.get_stats()["total_errors"] == 4


def test_retries_of_a_failing_batch_run_together_not_one_after_another(make_processor):
    stamps = {}
    lock = threading.Lock()

    def model(batch):
        with lock:
            for v in batch[:, 0].tolist():
                stamps.setdefault(v, []).append(time.monotonic())
        raise Poison("always")

    p = make_processor(model, max_workers=1, max_batch_size=4, initial_batch_size=4,
                       max_retries=2, retry_delay=0.2)
    futures = enqueue_paused(p, [1.0, 2.0, 3.0, 4.0])
    for f in futures:
        with pytest.raises(Poison):
            f.result(timeout=30)
    last = [stamps[v][-1] for v in (1.0, 2.0, 3.0, 4.0)]
    # The last retries of all four are within one backoff of each other: each request's
    # schedule runs at the same time as the others'.
    assert max(last) - min(last) < 0.2 + 0.5


def two_row_processor_signalling_calls(make_processor, model):
    """One worker, batches of two, item_timeout 0.2 s: (processor, an event set as each
    call of ``model`` begins)."""
    entered = threading.Event()
    inner = model.__call__
    p = make_processor(lambda batch: (entered.set(), inner(batch))[1], max_workers=1,
                       max_batch_size=2, initial_batch_size=2, item_timeout=0.2)
    return p, entered


def wait_until_hung_calls_settle(p):
    """The time limit settles a stuck call of several requests (halving the target or
    not) once its requests have all ended; wait for the supervisor's tick to do it."""
    limits = p._dispatcher._limits
    deadline = time.monotonic() + 20
    while limits._hung:
        assert time.monotonic() < deadline, "stuck calls never settled"
        time.sleep(0.001)


def settled(p):
    """Stop ``p`` and wait for its threads: what a worker does after the last result has
    reached its caller (the bookkeeping of a failed batch's search) is done. A caller is
    woken as soon as its result is set, and may run before its worker goes on."""
    p.stop(timeout=20)
    for thread in p._threads():
        thread.join(20)


def record_halvings(p):
    """The target size at each time the controller is told a batch failed.

    The size ceiling is pinned to ``max_batch_size``: otherwise the latency model fitted
    on the timings of a search's small calls may lower the target first, by a ceiling
    that depends on how fast the machine ran them."""
    halvings = []
    controller = p._controller
    controller.model.optimal_rows = lambda upper: upper
    observe = controller.observe_failure

    def counted():
        halvings.append(p.current_batch_size)
        observe()

    p._controller.observe_failure = counted
    return halvings


def test_the_target_size_shrinks_once_per_failed_batch(make_processor):
    model = CountingModel()
    p = make_processor(model, max_workers=1, max_batch_size=64, initial_batch_size=64,
                       retry_delay=0.0, max_retries=2)
    halvings = record_halvings(p)
    values = [float(v) for v in range(64)]
    values[37] = -1.0
    futures = enqueue_paused(p, values)
    for v, f in zip(values, futures):
        if v != -1.0:
            f.result(timeout=20)
    with pytest.raises(Poison):
        futures[37].result(timeout=20)
    # A poisoned request fails alone: its own failure, not the batch's, so the target
    # stays (not halved for the failed batch, for each failing call of the search, nor
    # for the poisoned request's own retries).
    settled(p)
    assert halvings == []
    assert p.current_batch_size == 64


@pytest.mark.parametrize("largest", [1, 2, 3, 5, 8, 40])
def test_a_failure_that_depends_on_the_batch_fails_no_request(make_processor, largest):
    # A model that fails on any batch above `largest` rows (out of memory, say): no
    # request fails alone, so with no retries every one still gets its result (a request
    # is failed only after it failed alone), and the failure is the batch's: the target
    # halves, once for the batch, not per failing call of its search.
    def model(batch):
        if len(batch) > largest:
            raise RuntimeError("out of memory")
        return batch * 2

    p = make_processor(model, max_workers=1, max_batch_size=64, initial_batch_size=64,
                       max_retries=0)
    halvings = record_halvings(p)
    futures = enqueue_paused(p, [float(v) for v in range(64)])
    assert [f.result(timeout=20)[0, 0] for f in futures] == [2.0 * v for v in range(64)]
    settled(p)
    assert p.get_stats()["total_errors"] == 0
    assert halvings == [64]
    assert p.current_batch_size == 32


def test_retry_on_limits_which_failures_are_retried(make_processor):
    calls = []

    def model(batch):
        calls.append(batch[0, 0])
        if batch[0, 0] == 1:
            raise ValueError("bad input: not retried")
        raise ConnectionError("transient: retried")

    p = make_processor(model, max_workers=1, max_batch_size=1, initial_batch_size=1,
                       retry_on=(ConnectionError,), max_retries=2, retry_delay=0.0)
    with pytest.raises(ValueError):
        p.enqueue_predict(item(1)).result(timeout=20)
    assert calls == [1.0]
    with pytest.raises(ConnectionError):
        p.enqueue_predict(item(2)).result(timeout=20)
    assert calls == [1.0, 2.0, 2.0, 2.0]


class Unsliceable:
    """A length, but no rows to cut: splitting it raises TypeError."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        raise TypeError("Unsliceable cannot be indexed")


# Outputs that break the output rule, for a batch of ``n`` rows ``batch``.
BAD_OUTPUTS = {
    "None": lambda batch: None,
    "a set": lambda batch: {1.0},
    "a str": lambda batch: "text",
    "a row too few": lambda batch: batch[:-1] * 2,
    "a row too many": lambda batch: np.concatenate([batch, batch[:1]]) * 2,
    "a number": lambda batch: 42,
    "a dict of a row short": lambda batch: {"y": batch[:-1]},
}


@pytest.mark.parametrize("bad_output", BAD_OUTPUTS.values(), ids=BAD_OUTPUTS)
def test_an_output_that_breaks_the_rule_fails_its_request_without_a_retry(
        make_processor, bad_output):
    # Its retries would each wait 30 s: the bad request failing far sooner, after one call
    # on its own, shows that none is scheduled; the healthy ones still get their results.
    calls = []

    def model(batch):
        calls.append(batch[:, 0].tolist())
        return bad_output(batch) if -1.0 in batch[:, 0] else batch * 2

    p = make_processor(model, max_workers=1, max_batch_size=4, initial_batch_size=4,
                       max_retries=3, retry_delay=30.0)
    futures = enqueue_paused(p, [1.0, -1.0, 2.0, 3.0])
    assert isinstance(futures[1].exception(timeout=10), BatchOutputError)
    for v, f in zip([1.0, 2.0, 3.0], [futures[0], *futures[2:]]):
        assert f.result(timeout=10)[0, 0] == 2 * v
    assert calls.count([-1.0]) == 1
    assert p.get_stats()["total_errors"] == 1


def test_an_output_that_cannot_be_cut_fails_its_request_without_a_retry(make_processor):
    # Cutting the output raises (a length but no indexing): still the model's contract
    # broken, a BatchOutputError that names the output and what cutting it raised.
    calls = []

    def model(batch):
        calls.append(list(batch))
        return Unsliceable(len(batch)) if "poison" in batch else [s.upper() for s in batch]

    p = make_processor(model, max_workers=1, max_batch_size=4, max_retries=3,
                       retry_delay=30.0)
    p.pause()
    futures = [p.enqueue_predict(s) for s in ["a", "poison", "b"]]
    p.resume()
    error = futures[1].exception(timeout=10)
    assert isinstance(error, BatchOutputError)
    assert "returned Unsliceable" in str(error)
    assert "TypeError: Unsliceable cannot be indexed" in str(error)
    assert [futures[0].result(timeout=10), futures[2].result(timeout=10)] == ["A", "B"]
    assert calls.count(["poison"]) == 1


def test_a_chunk_output_that_breaks_the_rule_fails_its_request_without_a_retry(
        make_processor):
    # A request larger than a batch runs in chunks: the first chunk's bad output ends it.
    calls = []

    def model(batch):
        calls.append(len(batch))
        return batch[:-1]

    p = make_processor(model, max_workers=1, max_batch_size=2, max_retries=3,
                       retry_delay=30.0)
    big = np.ones((5, 1))
    assert isinstance(p.enqueue_predict(big).exception(timeout=10), BatchOutputError)
    assert calls == [2]


class NamedOutputError(BatchOutputError):
    pass


@pytest.mark.parametrize(("retry_on", "raised", "retried"), [
    ((Exception,), BatchOutputError, False),
    ((ValueError,), BatchOutputError, False),
    ((NamedOutputError,), BatchOutputError, False),
    ((BatchOutputError,), BatchOutputError, True),
    ((ConnectionError, BatchOutputError), BatchOutputError, True),
    ((NamedOutputError,), NamedOutputError, True),
    ((Exception,), NamedOutputError, False),
])
def test_an_output_error_is_retried_only_when_retry_on_names_it(make_processor, retry_on,
                                                                raised, retried):
    calls = []

    def model(batch):
        calls.append(len(batch))
        raise raised("process_func returned 0 results for a batch of 1")

    p = make_processor(model, max_workers=1, max_retries=2, retry_delay=0.0,
                       retry_on=retry_on)
    assert isinstance(p.enqueue_predict(item(1)).exception(timeout=20), raised)
    assert len(calls) == (3 if retried else 1)


def test_a_wrong_output_is_retried_when_retry_on_names_batch_output_error(make_processor):
    calls = []

    def model(batch):
        calls.append(len(batch))
        return None

    p = make_processor(model, max_workers=1, max_retries=2, retry_delay=0.0,
                       retry_on=BatchOutputError)
    assert isinstance(p.enqueue_predict(item(1)).exception(timeout=20), BatchOutputError)
    assert calls == [1, 1, 1]


def test_retry_on_accepts_one_class_and_rejects_others(make_processor):
    from batchproc import BatchProcessorConfig

    assert BatchProcessorConfig(retry_on=KeyError).retry_on == (KeyError,)
    assert BatchProcessorConfig(retry_on=()).retry_on == ()
    with pytest.raises(ValueError, match="retry_on"):
        BatchProcessorConfig(retry_on=("KeyError",))


def test_retry_on_nothing_fails_single_requests_at_once(make_processor):
    model = CountingModel()
    p = make_processor(model, max_workers=1, retry_on=())
    with pytest.raises(Poison):
        p.enqueue_predict(item(-1)).result(timeout=20)
    assert len(model.calls) == 1


@pytest.mark.parametrize("usual_calls", [0, 5])  # before any fit; after fast calls
@pytest.mark.parametrize("call_seconds", [10.0, None])  # long, and never ending
def test_a_long_call_holds_no_request_past_batch_timeout(make_processor, call_seconds,
                                                         usual_calls):
    # max_workers=4: a call overrunning (no usual time known yet, or past twice the
    # usual time of fast calls) or hung does not keep the next request waiting for it;
    # another worker starts its call once batch_timeout has passed.
    release = threading.Event()
    entered = threading.Event()

    def model(batch):
        if batch[0, 0] == 666:
            entered.set()
            release.wait(call_seconds if call_seconds is not None else 30)
        return batch * 2

    p = make_processor(model, max_workers=4, batch_timeout=0.05, max_batch_size=1,
                       initial_batch_size=1, item_timeout=60)
    try:
        for v in range(usual_calls):
            p.enqueue_predict(item(v)).result(timeout=20)
        slow = p.enqueue_predict(item(666))
        assert entered.wait(10)
        fast = p.enqueue_predict(item(1))
        assert fast.result(timeout=20)[0, 0] == 2
        # Answered while the slow call still runs (it ends only once released, or after
        # 10 s): not queued behind it. (A long call that ended by itself soon after
        # batch_timeout would have let the request through without any takeover.)
        assert not slow.done()
    finally:
        release.set()
    assert slow.result(timeout=20)[0, 0] == 1332


def _watch_started(p):
    """When the worker without a call slot began to watch for requests past
    batch_timeout: the first at the processor's start, with the queue empty."""
    slots = p._controller.slots
    deadline = time.monotonic() + 10
    while not slots._watched:
        assert time.monotonic() < deadline, "no worker watches"
        threading.Event().wait(0.001)
    return time.monotonic()


@pytest.mark.parametrize("held_by", ["call", "delivery"])
def test_a_request_held_up_waits_batch_timeout_not_a_watch_period_more(make_processor,
                                                                        held_by):
    # The one call slot is held by a call that hangs, or by a delivery whose
    # done-callback blocks. A request comes a quarter of batch_timeout after the watcher
    # began to watch: it is taken by the other worker when it has waited batch_timeout,
    # not at the watcher's next look after that (with a look every half batch_timeout,
    # 5 s: the look at 4 s finds it 3 s old).
    release, holding = threading.Event(), threading.Event()
    started = {}

    def model(batch):
        if batch[0, 0] == 2:
            started[2] = time.monotonic()
        elif held_by == "call":
            holding.set()
            release.wait(30)
        return batch

    def blocking_callback(future):
        holding.set()
        release.wait(30)

    p = make_processor(model, max_workers=2, batch_timeout=4.0, item_timeout=60)
    try:
        watching_since = _watch_started(p)
        held = p.enqueue_predict(item(1))
        if held_by == "delivery":
            held.add_done_callback(blocking_callback)
        assert holding.wait(10)
        time.sleep(max(0.0, watching_since + 1.0 - time.monotonic()))
        sent = time.monotonic()
        late = p.enqueue_predict(item(2))
        assert late.result(timeout=20)[0, 0] == 2
        waited = started[2] - sent
        assert 3.95 < waited < 4.6, waited  # batch_timeout, and a thread's wake-up
    finally:
        release.set()
    assert held.result(timeout=20)[0, 0] == 1


def _dozing(p):
    """Wait until the watcher dozes (an idle spell: nothing queued, pushed or running)."""
    slots = p._controller.slots
    deadline = time.monotonic() + 10
    while not slots.dozing:
        assert time.monotonic() < deadline, "the watcher never dozes"
        threading.Event().wait(0.001)


def test_an_idle_processor_stops_waking_its_watcher_every_watch_period(make_processor,
                                                                        monkeypatch):
    # batch_timeout=5 ms, 4 workers: the watcher looked every 5 ms while idle (200
    # thread wake-ups a second, for ever). Idle, it dozes until a batch begins.
    from batchproc.engine import workers

    looks = []
    look = workers.WorkerPool._until_overdue
    monkeypatch.setattr(workers.WorkerPool, "_until_overdue",
                        lambda self: looks.append(1) or look(self))
    p = make_processor(lambda b: b, max_workers=4, batch_timeout=0.005)
    for v in range(20):
        assert p.enqueue_predict(item(v)).result(timeout=20)[0, 0] == v
    _dozing(p)
    before = len(looks)
    time.sleep(0.5)  # a hundred watch periods
    assert len(looks) - before <= 10  # each worker waiting for a slot: ~1 a second
    assert p.enqueue_predict(item(7)).result(timeout=20)[0, 0] == 7


def test_a_call_that_hangs_after_an_idle_spell_holds_up_no_request_past_batch_timeout(
        make_processor, monkeypatch):
    # The watcher dozes (a doze as long as the test's own timeouts here); the call that
    # ends the idle spell hangs. The batch that began wakes the watcher, which takes the
    # next request over once it has waited batch_timeout.
    from batchproc.engine import workers

    monkeypatch.setattr(workers, "POP_POLL", 60.0)
    model, release, hanging = hangs_on_666(wait=60)
    p = make_processor(model, max_workers=2, batch_timeout=0.05, item_timeout=120)
    try:
        for v in range(5):  # the usual time: fast
            p.enqueue_predict(item(v)).result(timeout=20)
        _dozing(p)
        hung = p.enqueue_predict(item(666))
        assert hanging.wait(10)
        assert p.enqueue_predict(item(1)).result(timeout=20)[0, 0] == 1
        assert not hung.done()
    finally:
        release.set()
    assert hung.result(timeout=20)[0, 0] == 666


def test_nothing_is_kept_of_a_worker_abandoned_in_a_call_once_the_call_returns(
        make_processor):
    # Each worker abandoned at item_timeout stayed in the pool's list (and its thread
    # object) for as long as the processor ran: memory grew with every hung call.
    from batchproc import BatchTimeoutError

    model, release, hanging = hangs_on_666()
    p = make_processor(model, max_workers=1, item_timeout=0.1, max_retries=0)
    pool = p._dispatcher._pool
    for _ in range(3):
        hanging.clear()
        with pytest.raises(BatchTimeoutError):
            p.enqueue_predict(item(666)).result(timeout=20)
        assert hanging.is_set()
    assert len(pool._workers) >= 4  # the stuck ones still run, beside their replacement
    release.set()
    wait_for(lambda: len(pool._workers) == 1, "the abandoned workers gone")
    assert pool.alive_workers() == (1, 1)
    assert p.enqueue_predict(item(1)).result(timeout=20)[0, 0] == 1


@pytest.mark.parametrize("strategy", ["adaptive", "greedy"])
def test_a_hung_call_holds_up_only_the_first_request_behind_it(make_processor, strategy):
    # One call at a time, and that call hangs. The first request behind it waits
    # batch_timeout; the worker that takes it takes the hung call's slot, so the
    # requests after it go as usual instead of each waiting batch_timeout again.
    model, release, hanging = hangs_on_666()
    p = make_processor(model, max_workers=3, batch_timeout=2.0, item_timeout=60,
                       processing_strategy=strategy)
    try:
        for v in range(5):  # the usual time: fast
            p.enqueue_predict(item(v)).result(timeout=20)
        hung = p.enqueue_predict(item(666))
        assert hanging.wait(10)
        assert p.enqueue_predict(item(1)).result(timeout=20)[0, 0] == 1  # ~batch_timeout
        waits = []
        for v in range(2, 7):
            sent = time.monotonic()
            assert p.enqueue_predict(item(v)).result(timeout=20)[0, 0] == v
            waits.append(time.monotonic() - sent)
        assert max(waits) < 1.0, waits  # generous; each waited 2 s before
        assert not hung.done()
    finally:
        release.set()
    assert hung.result(timeout=20)[0, 0] == 666
    # The hung call's end frees no slot it no longer holds: one call at a time again.
    assert p._controller.slots._busy <= p._controller.slots.limit


def test_a_request_behind_a_blocked_delivery_waits_batch_timeout_from_its_push(
        make_processor):
    # A request came during a call of usual length, not yet batch_timeout old when the
    # call ended (the slot was kept for the delivery), and the delivery then blocks (a
    # done-callback): it is taken by another worker once it has waited batch_timeout,
    # not batch_timeout after the delivery began.
    release, blocking, calling = threading.Event(), threading.Event(), threading.Event()
    started = {}

    def model(batch):
        if batch[0, 0] == 2:
            started[2] = time.monotonic()
        else:
            if batch[0, 0] == 1:
                calling.set()
            time.sleep(2.0)
        return batch

    def blocking_callback(future):
        blocking.set()
        release.wait(30)

    p = make_processor(model, max_workers=2, batch_timeout=1.6, item_timeout=60)
    try:
        for _ in range(2):  # the usual time: 2 s a call
            p.enqueue_predict(item(0)).result(timeout=20)
        held = p.enqueue_predict(item(1))
        held.add_done_callback(blocking_callback)
        assert calling.wait(10)
        time.sleep(0.6)  # into the call: 1.4 s old when it ends
        sent = time.monotonic()
        late = p.enqueue_predict(item(2))
        assert late.result(timeout=20)[0, 0] == 2
        assert blocking.is_set()
        waited = started[2] - sent
        # batch_timeout after the delivery began would be 3 s.
        assert 1.56 < waited < 2.4, waited
    finally:
        release.set()
    assert held.result(timeout=20)[0, 0] == 1


def test_the_watch_does_not_spin_with_no_batch_timeout(make_processor, monkeypatch):
    # batch_timeout=0: a request is late at once. While the one call slot is held and
    # the queue is empty, the watcher still sleeps (5 ms at least) between looks, and
    # those looks are the queue's own (the GIL released): none in Python.
    from batchproc.engine.workers import WorkerPool

    looks = []
    until_overdue = WorkerPool._until_overdue
    monkeypatch.setattr(WorkerPool, "_until_overdue",
                        lambda self: looks.append(1) or until_overdue(self))
    release, holding = threading.Event(), threading.Event()

    def model(batch):
        holding.set()
        release.wait(30)
        return batch

    p = make_processor(model, max_workers=2, batch_timeout=0.0)
    try:
        held = p.enqueue_predict(item(1))
        assert holding.wait(10)
        looks.clear()
        native_before = p._queue._watch_looks_count()
        began = time.monotonic()
        time.sleep(0.3)
        # One in 5 ms at most, however long this thread slept; spinning: 10**5.
        most = (time.monotonic() - began) / 0.005 + 10
        native = p._queue._watch_looks_count() - native_before
        assert 0 < native < most, (native, most)
        # Once per IDLE_AFTER (whether to doze), not every look.
        assert len(looks) <= (time.monotonic() - began) / 0.1 + 2, looks
    finally:
        release.set()
    assert held.result(timeout=20)[0, 0] == 1


def test_calls_that_release_the_gil_run_side_by_side(make_processor):
    # Three requests for a model that waits 0.5 s without the GIL (a remote endpoint),
    # max_workers=4: they all finish within two calls' time, not one after another.
    inside = []
    peak = []
    lock = threading.Lock()

    def remote(batch):
        with lock:
            inside.append(1)
            peak.append(len(inside))
        time.sleep(0.5)
        with lock:
            inside.pop()
        return batch

    p = make_processor(remote, max_workers=4, batch_timeout=0.05, max_batch_size=1,
                       initial_batch_size=1)
    futures = [p.enqueue_predict(item(i)) for i in range(3)]
    for f in futures:
        f.result(timeout=20)
    assert max(peak) >= 2  # calls overlapped


def test_a_call_of_usual_length_is_waited_for_not_joined_by_a_second(make_processor):
    # A model behind one lock whose calls take their usual time: requests queued past
    # batch_timeout behind a call wait for it and go together, instead of a free worker
    # starting a second call that waits at the lock (which split one batch of a few
    # closed-loop clients into two alternating halves, each waiting a whole call).
    lock = threading.Lock()
    calls, overlapped = [], []
    entered = threading.Event()

    def model(batch):
        if not lock.acquire(blocking=False):
            overlapped.append(batch[:, 0].tolist())
            lock.acquire()
        try:
            calls.append(batch[:, 0].tolist())
            if batch[0, 0] == 100:
                entered.set()
            time.sleep(0.5 if batch[0, 0] == 100 else 0.4)
            return batch
        finally:
            lock.release()

    p = make_processor(model, max_workers=4, batch_timeout=0.005, max_batch_size=64,
                       initial_batch_size=64)
    for v in range(3):  # the model's usual time: 0.4 s a call
        p.enqueue_predict(item(v)).result(timeout=20)
    first = p.enqueue_predict(item(100))
    assert entered.wait(10)
    behind = [p.enqueue_predict(item(v)) for v in (101, 102)]
    assert [f.result(timeout=20)[0, 0] for f in (first, *behind)] == [100, 101, 102]
    assert overlapped == []  # no call started while another ran
    assert calls[-2:] == [[100.0], [101.0, 102.0]]


@pytest.fixture
def wide_wave_window(monkeypatch):
    """The wave rule's window made wide: an idle gap of four fixed costs (not a
    sixteenth) and a wave that need not come faster than the carried rows did, so it
    lasts ``batch_timeout`` after a call's end and a test's client thread, however late
    the machine runs it, comes back within it."""
    from batchproc import controller
    from batchproc._native import request_queue

    monkeypatch.setattr(controller, "IDLE_GAP_SHARE", 4.0)
    previous = request_queue._set_wave_pace(0.001)
    yield
    request_queue._set_wave_pace(previous)


def test_requests_carried_across_a_call_wait_for_the_client_it_answers(
        make_processor, wide_wave_window):
    # Client A is alone in a call of a model behind one lock when B, C and D arrive: they
    # are carried across it. When A comes back from its delivery, the carried three wait
    # for it (its wave), so the next call holds all four, instead of the two halves
    # alternating at the lock, each waiting a whole call for the other. The call
    # outlasts batch_timeout, so its delivery wakes another worker to pop them: that
    # worker judges them by the same rule (it took them at once while the delivered
    # batch still counted as running). A comes back only once a worker waits for it.
    lock = threading.Lock()
    entries = []
    calls = []

    def model(batch):
        with lock:
            entries.append(len(batch))
            time.sleep(0.3)
            calls.append(sorted(batch[:, 0].tolist()))
            return batch

    p = make_processor(model, max_workers=4, batch_timeout=0.2, max_batch_size=64)
    for rows in (1, 4):  # the model's usual time: 0.3 s a call, whatever its rows
        p.enqueue_predict(np.zeros((rows, 4), np.float32)).result(timeout=20)
    for episode in range(3):
        a, b, c, d = (10 * episode + k for k in range(4))
        n = len(entries)
        first = p.enqueue_predict(item(a))
        wait_for(lambda n=n: len(entries) > n, "A's call")
        carried = [p.enqueue_predict(item(v)) for v in (b, c, d)]
        assert first.result(timeout=20)[0, 0] == a
        wait_for(lambda n=n: p._queue._waiters()[1] >= 1 or len(entries) > n + 1,
                 "a worker deciding on the carried requests")
        assert len(entries) == n + 1, "the carried requests went without A"
        again = p.enqueue_predict(item(a))
        assert [f.result(timeout=20)[0, 0] for f in (*carried, again)] == [b, c, d, a]
        assert calls[n:] == [[a], [a, b, c, d]]

def test_a_done_callback_that_blocks_holds_up_no_other_request(make_processor):
    # A batch keeps its call slot while it is delivered; a delivery that runs past
    # batch_timeout (a caller's done-callback blocking the worker) lets a free worker
    # take the requests waiting behind it.
    release, in_callback = threading.Event(), threading.Event()

    def blocking_callback(future):
        in_callback.set()
        release.wait(20)

    p = make_processor(lambda batch: batch, max_workers=2, batch_timeout=0.01)
    try:
        p.pause()
        held = p.enqueue_predict(item(1))
        held.add_done_callback(blocking_callback)
        p.resume()
        assert in_callback.wait(10)
        assert p.enqueue_predict(item(2)).result(timeout=10)[0, 0] == 2
    finally:
        release.set()
    assert held.result(timeout=10)[0, 0] == 1


def test_requests_still_arriving_at_the_end_of_a_call_start_the_next_during_its_delivery(
        make_processor, monkeypatch):
    # A request came in the second half of the call and is past batch_timeout when it
    # ends: the next pop would go at once, so the next call starts while the results
    # are handed out (here, while a done-callback blocks the delivery), not once the
    # delivery ends. (The extra call for requests behind a long delivery is switched
    # off: it would serve the request too, only later.)
    from batchproc.engine.workers import WorkerPool

    monkeypatch.setattr(WorkerPool, "_until_overdue", lambda self: 1.0)
    release_call, in_call = threading.Event(), threading.Event()
    second_done, delivered = threading.Event(), threading.Event()
    waited = []

    def model(batch):
        if batch[0, 0] == 1:
            in_call.set()
            assert release_call.wait(20)
        return batch

    def delivering(future):
        waited.append(second_done.wait(10))
        delivered.set()

    p = make_processor(model, max_workers=2, batch_timeout=0.05)
    p._controller._tuner.serialized = False  # a trial saw two calls at once carry more
    first = p.enqueue_predict(item(1))
    first.add_done_callback(delivering)
    assert in_call.wait(10)
    threading.Event().wait(0.2)  # a call of 0.3 s at least, the request 0.2 s in:
    second = p.enqueue_predict(item(2))  # past batch_timeout when the call ends
    second.add_done_callback(lambda f: second_done.set())
    threading.Event().wait(0.1)
    release_call.set()
    assert second.result(timeout=20)[0, 0] == 2
    assert first.result(timeout=20)[0, 0] == 1
    assert delivered.wait(20)  # the callback runs after the result is set
    assert waited == [True]  # served while the first batch's delivery was still going


class FirstCallHeld:
    """The identity model, whose call on ``item(1)`` waits for ``release``; records the
    thread of each call, and sets ``second_called`` at any other call."""

    def __init__(self):
        self.release, self.in_call = threading.Event(), threading.Event()
        self.second_called = threading.Event()
        self.callers = []

    def __call__(self, batch):
        self.callers.append(threading.current_thread())
        if batch[0, 0] == 1:
            self.in_call.set()
            assert self.release.wait(20)
        else:
            self.second_called.set()
        return batch


def test_adaptive_keeps_the_call_slot_through_a_delivery_if_no_pop_could_go(
        make_processor):
    # One call at a time; a request came at the end of the call, neither a full batch
    # nor past batch_timeout. ADAPTIVE keeps a pop filling while a batch is in flight,
    # so another worker handed the call slot now would only wait in the queue for the
    # delivery's end (two thread wake-ups a batch, for nothing): the worker that called
    # keeps the slot and calls again once it has delivered.
    model, during = FirstCallHeld(), []
    # batch_timeout outlasts the look below: no extra call for a request held past it
    # starts meanwhile.
    p = make_processor(model, max_workers=2, max_batch_size=8, batch_timeout=1.0)
    first = p.enqueue_predict(item(1))
    # Bounds the look for what must not happen.
    first.add_done_callback(lambda f: during.append(model.second_called.wait(0.3)))
    assert model.in_call.wait(10)
    # A call of 50 ms at least, the request in its last moments: still arriving at its
    # end (an open load's), which had the slot handed over before.
    threading.Event().wait(0.05)
    second = p.enqueue_predict(item(2))
    model.release.set()
    assert first.result(timeout=20)[0, 0] == 1
    assert second.result(timeout=20)[0, 0] == 2
    assert p._controller.slots.limit == 1
    assert during == [False]  # no call during the delivery ...
    assert model.callers[0] is model.callers[1]  # ... and the next by the one that delivered


@pytest.mark.parametrize("serialized", [False, True, None])
def test_a_full_batch_waiting_starts_the_next_call_during_a_delivery_unless_calls_take_turns(
        make_processor, serialized):
    # A full batch waits when the call ends: the next call starts on another worker while
    # the results are handed out, once two calls at once were seen to carry as many rows
    # as one. Not where they carried fewer (a model holding the GIL,
    # ConcurrencyTuner.serialized), nor before any such trial (None: a processor just
    # started): a call started then would contend with the delivery for the GIL, and
    # each batch would move to another thread. The worker that delivered makes the next
    # call.
    model, during, delivered = FirstCallHeld(), [], threading.Event()
    takes_turns = serialized is not False

    def delivering(future):
        # Bounds the look for what must not happen.
        during.append(model.second_called.wait(0.3 if takes_turns else 10))
        delivered.set()

    p = make_processor(model, max_workers=2, max_batch_size=1, batch_timeout=1.0)
    if serialized is not None:
        p._controller._tuner.serialized = serialized
    first = p.enqueue_predict(item(1))
    first.add_done_callback(delivering)
    assert model.in_call.wait(10)
    second = p.enqueue_predict(item(2))  # a full batch (max_batch_size=1) waiting
    model.release.set()
    assert first.result(timeout=20)[0, 0] == 1
    assert second.result(timeout=20)[0, 0] == 2
    assert delivered.wait(20)  # the callback runs after the result is set
    assert p._controller.slots.limit == 1
    assert during == [not takes_turns]
    assert (model.callers[0] is model.callers[1]) == takes_turns


def test_a_worker_whose_call_returned_hands_the_gil_to_a_waiting_call_before_it_splits(
        make_processor, monkeypatch):
    # Two calls of a model behind one lock: the second waits inside process_func for
    # the first. Once the first returns, its worker steps off the GIL for the second
    # before it cuts the output and delivers (which it would otherwise do holding the
    # GIL, the model idle). The second call waits for that step, so a worker that did
    # not take it is seen (the wait runs out); the second's own worker has no call to
    # step off for.
    from batchproc.engine import execution
    from batchproc.formats.base import BatchFormat

    steps, handed = [], threading.Event()

    def hand_over(seconds):
        steps.append(("hand over", threading.current_thread()))
        handed.set()
        time.sleep(seconds)

    split = BatchFormat.split

    def recorded_split(self, out, requests, built):
        steps.append(("split", threading.current_thread()))
        return split(self, out, requests, built)

    monkeypatch.setattr(execution, "time", types.SimpleNamespace(sleep=hand_over))
    monkeypatch.setattr(BatchFormat, "split", recorded_split)
    model_lock, callers = threading.Lock(), {}
    first_in, second_in, release_first = (threading.Event(), threading.Event(),
                                          threading.Event())

    def model(batch):
        v = batch[0, 0]
        callers[v] = threading.current_thread()
        if v == 2:
            second_in.set()
        with model_lock:
            if v == 1:
                first_in.set()
                assert release_first.wait(20)
            else:
                handed.wait(5)
        return batch

    p = make_processor(model, max_workers=2, max_batch_size=1, initial_batch_size=1,
                       processing_strategy=BatchProcessingStrategy.FIXED, batch_timeout=0.0)
    first = p.enqueue_predict(item(1))
    assert first_in.wait(10)
    second = p.enqueue_predict(item(2))
    assert second_in.wait(10)  # in its call, waiting for the model's lock
    release_first.set()
    assert first.result(timeout=20)[0, 0] == 1
    assert second.result(timeout=20)[0, 0] == 2
    assert [step for step, thread in steps if thread is callers[1]] == ["hand over", "split"]
    assert [step for step, thread in steps if thread is callers[2]] == ["split"]


@pytest.mark.parametrize(("queued", "keeps_gil"), [(2, True), (3, True), (1, False), (0, False)])
def test_a_delivery_wakes_its_callers_keeping_the_gil_while_a_full_batch_waits(
        make_processor, monkeypatch, queued, keeps_gil):
    # A full batch queued when a call ends: the model waits for this worker's next call,
    # so the callers it answers are woken with the GIL held (else the worker would take
    # it back only after each of them had run). Anything less is not kept waiting for.
    from batchproc.engine import delivery

    woken = []
    finish_all = delivery.finish_all

    def recorded(requests, parts, deferred=None, keep_gil=False):
        woken.append((sorted(float(part[0, 0]) for part in parts), keep_gil))
        return finish_all(requests, parts, deferred, keep_gil)

    monkeypatch.setattr(delivery, "finish_all", recorded)
    model = FirstCallHeld()
    p = make_processor(model, max_workers=1, max_batch_size=2, initial_batch_size=2,
                       processing_strategy=BatchProcessingStrategy.FIXED,
                       batch_timeout=0.01)
    first = p.enqueue_predict(item(1))
    assert model.in_call.wait(10)
    later = [p.enqueue_predict(item(v)) for v in range(10, 10 + queued)]
    model.release.set()
    assert first.result(timeout=20)[0, 0] == 1
    assert [f.result(timeout=20)[0, 0] for f in later] == list(range(10, 10 + queued))
    assert woken[0] == ([1.0], keeps_gil)


def test_a_model_that_fails_only_on_batches_is_logged(make_processor, caplog):
    # Its callers get their results (each request succeeds alone), so only a warning
    # says the model's batched output is broken: once, then at most once a minute, and
    # what that left out is counted at stop.
    import logging

    def broken_when_batched(batch):
        return {"a": batch, "b": batch[:1]}  # "b" has one row whatever the batch

    p = make_processor(broken_when_batched, max_workers=1, batch_timeout=0.05)
    with caplog.at_level(logging.WARNING, logger="batchproc"):
        for _ in range(2):
            p.pause()
            futures = [p.enqueue_predict(item(v)) for v in range(4)]
            p.resume()
            assert [f.result(timeout=20)["a"][0, 0] for f in futures] == [0, 1, 2, 3]
        settled(p)  # the last search's warning, if any, is logged after its results
    warnings = [r.getMessage() for r in caplog.records if "fails on batches" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "BatchOutputError" in warnings[0]
    assert warnings[1].startswith("1 more batch failed in the last ")
    # Counted too: without logging set up (a library's loggers print nothing by
    # themselves), the warning alone is never seen.
    stats = p.get_stats()
    assert stats["total_batch_only_failures"] == 2
    assert (stats["total_errors"], stats["total_processed"]) == (0, 8)


def test_a_request_that_fails_alone_is_no_batch_only_failure(make_processor):
    def poisoned(batch):
        if (batch[:, 0] == 2).any():
            raise ValueError("bad row")
        return batch

    p = make_processor(poisoned, max_workers=1, batch_timeout=0.05, max_retries=0)
    p.pause()
    futures = [p.enqueue_predict(item(v)) for v in range(4)]
    p.resume()
    with pytest.raises(ValueError, match="bad row"):
        futures[2].result(timeout=20)
    assert [futures[v].result(timeout=20)[0, 0] for v in (0, 1, 3)] == [0, 1, 3]
    stats = p.get_stats()
    assert (stats["total_batch_only_failures"], stats["total_errors"]) == (0, 1)


class _Interrupt(BaseException):
    """Like KeyboardInterrupt: not an Exception, so it fails its call's requests at once."""


@pytest.mark.parametrize("where", ["the batch's call", "a call of its search"])
def test_requests_an_interrupting_error_failed_make_no_batch_only_failure(make_processor,
                                                                          where):
    # A batch-only failure is a batch whose search answered every request on smaller
    # calls. An interrupting error fails the requests of its call unsearched: whether it
    # ended the batch's own call or one of its search's, those requests were not
    # answered, so the batch is no such failure: not counted, not warned of, and the
    # target not halved for it.
    def model(batch):
        rows = batch[:, 0].tolist()
        if where == "the batch's call" or rows == [0.0, 1.0]:
            raise _Interrupt("stop the world")
        if len(rows) > 2:
            raise ValueError("fails on batches of more than two")
        return batch

    p = make_processor(model, max_workers=1, max_batch_size=8, processing_strategy="greedy",
                       max_retries=0)
    p.pause()
    futures = [p.enqueue_predict(item(v)) for v in range(4)]
    target = p.current_batch_size
    p.resume()
    interrupted = futures if where == "the batch's call" else futures[:2]
    for f in interrupted:
        with pytest.raises(_Interrupt):
            f.result(timeout=20)
    answered = futures[len(interrupted):]
    assert [f.result(timeout=20)[0, 0] for f in answered] == list(range(len(interrupted), 4))
    settled(p)
    stats = p.get_stats()
    assert stats["total_batch_only_failures"] == 0
    assert stats["total_errors"] == len(interrupted)
    assert p.current_batch_size == target


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt()])
def test_a_done_callback_raising_a_base_exception_touches_no_other_request(
        make_processor, raised):
    # The worker completing a batch runs every request's callbacks and goes on: one
    # callback's SystemExit or KeyboardInterrupt is logged, never another request's
    # outcome (it failed the rest of its batch with it, counted twice).
    def raising(future):
        raise raised

    p = make_processor(lambda batch: batch, max_workers=1, batch_timeout=0.05)
    p.pause()
    futures = [p.enqueue_predict(item(v)) for v in range(4)]
    futures[1].add_done_callback(raising)
    p.resume()
    assert [f.result(timeout=20)[0, 0] for f in futures] == [0, 1, 2, 3]
    stats = p.get_stats()
    assert stats["total_errors"] == 0


@pytest.mark.parametrize("bad_positions", [[0], [3], [7], [0, 7], [2, 3], [1, 4, 6]])
@pytest.mark.parametrize("retried", [True, False], ids=["retried", "failed at once"])
def test_the_done_callbacks_of_a_failed_batch_run_once_its_search_is_over(
        make_processor, bad_positions, retried):
    # A failed batch's search completes it one part at a time, each part a call: a
    # part's done-callbacks (of results and of errors alike) wait for the search to end,
    # so none holds up the next part's call, and each sees every request of the batch
    # done (or parked for its retry).
    model = CountingModel()
    p = make_processor(model, max_workers=1, max_batch_size=8, initial_batch_size=8,
                       retry_delay=30.0, **({} if retried else {"retry_on": ()}))
    values = [float(v) for v in range(8)]
    for i in bad_positions:
        values[i] = -1.0
    seen = []  # per callback: (calls made, how many of the batch were done)

    def watch(futures):
        for f in futures:
            f.add_done_callback(
                lambda f: seen.append((len(model.calls), sum(g.done() for g in futures))))

    futures = enqueue_paused(p, values, watch)
    settled(p)  # stop fails the parked ones, calling their callbacks too
    searched = len(model.calls)
    done_in_search = 8 - (len(bad_positions) if retried else 0)
    assert seen[:done_in_search] == [(searched, done_in_search)] * done_in_search
    assert len(seen) == 8
    assert all(f.done() for f in futures)


def test_a_done_callback_may_wait_for_a_later_part_of_its_failed_batch(make_processor):
    # The search delivers [0, 1], then [2], then runs the bad one alone: a callback of 0
    # waiting for 2's result ran on the worker before 2's call, and waited for ever.
    model = CountingModel()
    p = make_processor(model, max_workers=1, max_batch_size=4, initial_batch_size=4,
                       retry_delay=30.0)
    got = []
    futures = enqueue_paused(
        p, [0.0, 1.0, 2.0, -1.0],
        lambda fs: fs[0].add_done_callback(lambda f: got.append(fs[2].result(timeout=10))))
    assert futures[0].result(timeout=20)[0, 0] == 0
    wait_for(lambda: got, "the callback ran")
    assert got[0][0, 0] == 4
    assert model.calls[1:] == [[0.0, 1.0], [2.0], [-1.0]]  # the search as described


@pytest.mark.parametrize("ends", ["past item_timeout", "by stop"])
def test_a_hung_call_of_a_search_holds_no_done_callback_of_the_parts_before_it(
        make_processor, ends):
    # The search delivered [0, 1], then its call on 666 hangs: the callbacks of 0 and 1
    # run when the call is abandoned (its time limit, or stop giving up on it), not when
    # (if ever) it returns.
    model, release, hanging = hangs_on_666()

    def poisoned(batch):
        if (batch == -1).any():
            raise Poison("poisoned row")
        return model(batch)

    timeouts = {"item_timeout": 0.2} if ends == "past item_timeout" else {}
    p = make_processor(poisoned, max_workers=1, max_batch_size=4, initial_batch_size=4,
                       retry_delay=30.0, **timeouts)
    called = threading.Event()
    try:
        futures = enqueue_paused(p, [0.0, 1.0, 666.0, -1.0],
                                 lambda fs: fs[0].add_done_callback(lambda f: called.set()))
        assert futures[1].result(timeout=20)[0, 0] == 1
        assert hanging.wait(20)
        if ends == "by stop":
            p.stop(timeout=0.2)
        assert called.wait(20)
        assert not release.is_set()  # the call still hangs
    finally:
        release.set()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync model", "async model"])
def test_a_model_raising_asyncio_cancelled_error_fails_only_the_request_that_causes_it(
        make_processor, asynchronous):
    # asyncio's CancelledError is a BaseException, but a model's own (a client library
    # that leaks its cancellation) is a failure like any other: the batch is searched,
    # the others get their results, and it is retried when retry_on names it. Only
    # KeyboardInterrupt-like exceptions fail a whole call at once.
    calls = []

    def model(batch):
        calls.append(batch[:, 0].tolist())
        if (batch == -1).any():
            raise asyncio.CancelledError("the model's own")
        return batch * 2

    async def async_model(batch):
        return model(batch)

    p = make_processor(async_model if asynchronous else model, max_workers=1,
                       max_batch_size=8, processing_strategy="greedy", retry_delay=0.0,
                       max_retries=1, retry_on=(asyncio.CancelledError,))
    p.pause()
    futures = [p.enqueue_predict(item(v)) for v in (1, 2, -1, 3)]
    p.resume()
    assert [f.result(timeout=10)[0, 0] for f in (futures[0], futures[1], futures[3])] == [
        2, 4, 6]
    with pytest.raises(RuntimeError, match="process_func raised") as info:
        futures[2].result(timeout=10)
    assert isinstance(info.value.__cause__, asyncio.CancelledError)
    assert calls[0] == [1, 2, -1, 3] and calls.count([-1.0]) == 2  # alone, then retried


@pytest.mark.parametrize("end", ["expires", "is stopped"])
def test_a_request_queued_again_after_its_call_hung_says_it_ran_when_it_ends(
        make_processor, end):
    # Its call ran past item_timeout and was abandoned; it was queued again alone (the
    # processor is paused meanwhile, so it waits there). Expired or stopped then, it
    # must not read as never processed: it was in that call, whose end is its cause.
    release, hanging = threading.Event(), threading.Event()

    def model(batch):
        if (batch == 666).any():
            p.pause()  # before the call is abandoned: what it queues again waits
            hanging.set()
            release.wait(20)
        return batch

    p = make_processor(model, max_workers=1, max_batch_size=8,
                       processing_strategy="greedy", item_timeout=0.1)
    p.pause()
    hung = p.enqueue_predict(item(666))
    other = p.enqueue_predict(item(1), max_queue_time=1.0 if end == "expires" else None)
    p.resume()
    try:
        assert hanging.wait(10)
        wait_for(lambda: p.get_stats()["queue_size"] == 2, "both queued again alone")
        if end == "expires":
            error = other.exception(timeout=10)
            assert isinstance(error, QueueTimeoutError)
            assert "to run again alone: it was in a call that ended without its result" in (
                str(error))
        else:
            p.stop(timeout=0)
            error = other.exception(timeout=10)
            assert isinstance(error, ProcessorStoppedError)
            assert "waiting to run again alone" in str(error)
        assert isinstance(error.__cause__, BatchTimeoutError)
    finally:
        release.set()
        p.resume()
    if end == "expires":  # no max_queue_time of its own: it runs again once resumed
        assert hung.result(timeout=10)[0, 0] == 666
    else:
        assert isinstance(hung.exception(timeout=10), ProcessorStoppedError)


class FailsOncePerRow:
    """Doubles its batch; raises ``Poison`` the first time it sees a batch holding one of
    the rows in ``flaky`` (row k holds k). Records the first row of every call."""

    def __init__(self, flaky):
        self.flaky = set(flaky)
        self.calls = []

    def __call__(self, batch):
        self.calls.append(int(batch[0, 0]))
        hit = self.flaky & set(batch[:, 0].astype(int).tolist())
        if hit:
            self.flaky -= hit
            raise Poison(f"rows {sorted(hit)}")
        return batch * 2


def test_a_cut_item_is_retried_from_its_failing_chunk(make_processor):
    # 40 rows at max batch 4: ten chunks. Chunks 3 and 7 fail once each: each failure is
    # a retry from that chunk; the chunks that had succeeded do not run again.
    model = FailsOncePerRow({13, 29})
    p = make_processor(model, max_workers=1, max_batch_size=4, max_retries=2,
                       retry_delay=0.0)
    big = np.arange(40, dtype=np.float64).reshape(40, 1)
    out = p.enqueue_predict(big).result(timeout=20)
    assert (out == big * 2).all()
    assert model.calls == [0, 4, 8, 12, 12, 16, 20, 24, 28, 28, 32, 36]
    stats = p.get_stats()
    assert stats["total_processed"] == 1 and stats["total_errors"] == 0


def test_each_failing_chunk_of_a_cut_item_counts_against_its_retries(make_processor):
    # Three chunks fail once each, and max_retries=2: the third failure fails the item,
    # after one run of each chunk before it.
    model = FailsOncePerRow({1, 5, 9})
    p = make_processor(model, max_workers=1, max_batch_size=4, max_retries=2,
                       retry_delay=0.0)
    big = np.arange(16, dtype=np.float64).reshape(16, 1)
    error = p.enqueue_predict(big).exception(timeout=20)
    assert isinstance(error, Poison) and "rows [9]" in str(error)
    assert model.calls == [0, 0, 4, 4, 8]


def test_a_cut_map_item_is_retried_from_its_failing_chunk(make_processor):
    # map puts an item larger than a batch in a chunk of its own: the same retry.
    model = FailsOncePerRow({9})
    p = make_processor(model, max_workers=1, max_batch_size=4, max_retries=1,
                       retry_delay=0.0)
    items = [np.arange(12, dtype=np.float64).reshape(12, 1), np.full((1, 1), 100.0)]
    out = list(p.map(items))
    assert (out[0] == items[0] * 2).all() and out[1][0, 0] == 200.0
    assert sorted(model.calls) == [0, 4, 8, 8, 100]  # chunks 0 and 1 ran once

"""stop(): what it settles, from which thread it may be called, and how long it takes.

The invariant: when ``stop(timeout)`` returns, every future accepted before it is settled
(a result, the model's error, or ``ProcessorStoppedError``), except the requests a delivery
in progress is completing, and no worker calls the model or parks a retry after it.
"""

import dis
import logging
import sys
import threading
import time
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hanging import hangs_on_666
from waiting import wait_for

from batchproc import BatchProcessingStrategy, ProcessorStoppedError

POISON = -1.0


def one(v):
    return np.array([[v]], dtype=np.float64)


class PoisonModel:
    """Raises ValueError when any row of the batch is POISON; records every call."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, batch):
        with self.lock:
            self.calls.append(sorted(batch[:, 0].tolist()))
        if (batch == POISON).any():
            raise ValueError("poison row")
        return batch


def fixed_batches(make_processor, model, size, **config):
    """One worker, batches of exactly ``size`` requests, popped once resumed."""
    p = make_processor(model, max_workers=1, initial_batch_size=size,
                       processing_strategy=BatchProcessingStrategy.FIXED,
                       batch_timeout=5.0, **config)
    return p


def wait_until_parked(p):
    deadline = time.monotonic() + 10
    while p._queue.parked == 0:  # parked for its retry (a state, polled)
        assert time.monotonic() < deadline
        time.sleep(0.001)


def join_threads(p):
    for thread in p._threads():
        thread.join(10)
    assert not any(t.is_alive() for t in p._threads())


def test_stop_takes_a_searched_batch_whose_delivery_outlasts_its_grace(make_processor,
                                                                       caplog, monkeypatch):
    # The failure search delivers the good half, and that delivery goes on past stop's
    # grace (held here inside it). stop() must fail the rest of the batch itself: its
    # worker may not go on searching (and park the poison request in the drained
    # queue). The delivery's futures are the worker's: it completes them, and runs their
    # done-callbacks once it is over (the search's callbacks wait for its end, and stop
    # has ended it).
    from batchproc.engine import delivery

    in_delivery, release = threading.Event(), threading.Event()
    finish_all = delivery.finish_all

    def held_finish_all(requests, parts, deferred=None, keep_gil=False):
        if len(requests) == 2:  # the search's first part, [1, 2]
            in_delivery.set()
            release.wait(10)
        return finish_all(requests, parts, deferred, keep_gil)

    monkeypatch.setattr(delivery, "finish_all", held_finish_all)
    model = PoisonModel()
    p = fixed_batches(make_processor, model, 4, max_retries=2, retry_delay=0.01)
    p.pause()
    futures = [p.enqueue_predict(one(v)) for v in (1.0, 2.0, 3.0, POISON)]
    called = []
    futures[0].add_done_callback(lambda f: called.append(f.result().tolist()))
    p.resume()
    assert in_delivery.wait(10)
    p.stop(timeout=0.05)
    # [1, 2] is being delivered; 3 and the poison are stop's.
    for future in futures[2:]:
        with pytest.raises(ProcessorStoppedError, match="before this request finished"):
            future.result(timeout=0)
    calls = len(model.calls)
    assert not called
    release.set()
    join_threads(p)
    assert futures[0].result(timeout=0).tolist() == [[1.0]]
    assert futures[1].result(timeout=0).tolist() == [[2.0]]
    assert called == [[[1.0]]]
    assert len(model.calls) == calls  # nothing ran after stop gave up
    assert p._queue.parked == 0 and len(p._queue) == 0
    assert not [r for r in caplog.records if "completed twice" in r.getMessage()]


def test_stop_takes_a_searched_batch_during_its_next_call(make_processor):
    # The search's next call blocks: the batch is CALLING when stop gives up on it. The
    # call's late outcome is discarded and nothing is parked afterwards.
    model = PoisonModel()
    entered, release = threading.Event(), threading.Event()

    def blocking(batch):
        if len(model.calls) == 2:  # the batch failed, then its first half ran: block
            entered.set()
            release.wait(10)
        return model(batch)

    p = fixed_batches(make_processor, blocking, 4, max_retries=2, retry_delay=0.01)
    p.pause()
    futures = [p.enqueue_predict(one(v)) for v in (1.0, 2.0, 3.0, POISON)]
    p.resume()
    assert entered.wait(10)
    p.stop(timeout=0.05)
    assert [f.result(timeout=0).tolist() for f in futures[:2]] == [[[1.0]], [[2.0]]]
    for future in futures[2:]:
        with pytest.raises(ProcessorStoppedError):
            future.result(timeout=0)
    release.set()
    join_threads(p)
    assert len(model.calls) == 3
    assert p._queue.parked == 0


def test_a_retry_waiting_at_stop_fails_saying_it_ran_and_why(make_processor):
    model = PoisonModel()
    entered, release = threading.Event(), threading.Event()

    def model_blocking_on_two(batch):
        if (batch == 2.0).any():
            entered.set()
            release.wait(10)
        return model(batch)

    p = fixed_batches(make_processor, model_blocking_on_two, 1, max_retries=3,
                      retry_delay=30.0)
    failing = p.enqueue_predict(one(POISON))
    wait_until_parked(p)  # its retry is 30 s away
    running = p.enqueue_predict(one(2.0))
    assert entered.wait(10)
    never_run = p.enqueue_predict(one(1.0))  # queued behind the only worker's call
    p.stop(timeout=0.05)
    with pytest.raises(ProcessorStoppedError,
                       match=r"waiting to be retried \(after 1 failed call\)") as caught:
        failing.result(timeout=0)
    assert isinstance(caught.value.__cause__, ValueError)
    with pytest.raises(ProcessorStoppedError, match="before this request was dispatched"):
        never_run.result(timeout=0)
    with pytest.raises(ProcessorStoppedError, match="before this request finished"):
        running.result(timeout=0)
    release.set()
    join_threads(p)
    assert p.get_stats()["total_errors"] == 3


@pytest.mark.parametrize("workers", [1, 3])
def test_stop_does_not_wait_for_a_retry_due_after_its_timeout(make_processor, workers):
    # The retry could never run before stop's deadline: waiting out the timeout for it
    # would only delay the shutdown.
    model = PoisonModel()
    p = make_processor(model, max_workers=workers, max_retries=3, retry_delay=30.0)
    failing = p.enqueue_predict(one(POISON))
    wait_until_parked(p)
    started = time.monotonic()
    p.stop(timeout=20.0)
    assert time.monotonic() - started < 10.0  # not the 20 s timeout (nor the 30 s retry)
    with pytest.raises(ProcessorStoppedError,
                       match=r"waiting to be retried \(after 1 failed call\)") as caught:
        failing.result(timeout=0)
    assert isinstance(caught.value.__cause__, ValueError)
    join_threads(p)
    assert len(model.calls) == 1


def test_stop_runs_a_retry_due_before_its_timeout(make_processor):
    calls = []

    def flaky(batch):  # fails once, then works
        calls.append(len(batch))
        if len(calls) == 1:
            raise ConnectionError("once")
        return batch

    p = make_processor(flaky, max_workers=1, max_retries=3, retry_delay=0.2)
    future = p.enqueue_predict(one(7.0))
    wait_until_parked(p)
    p.stop(timeout=30.0)
    assert future.result(timeout=0)[0, 0] == 7.0  # retried while stop waited for it
    assert len(calls) == 2
    join_threads(p)


def test_a_second_stop_returns_once_the_first_has_settled_everything(make_processor):
    release, entered = threading.Event(), threading.Event()

    def hung(batch):
        entered.set()
        release.wait(10)
        return batch

    p = make_processor(hung, max_workers=1, max_batch_size=1)
    future = p.enqueue_predict(one(1.0))
    assert entered.wait(10)
    first = threading.Thread(target=p.stop, kwargs={"timeout": 0.5})
    first.start()
    assert p.shutdown_event.wait(10)  # the first stop() is waiting for the hung call
    p.stop(timeout=10)
    with pytest.raises(ProcessorStoppedError):
        future.result(timeout=0)
    assert p.health()["state"] == "stopped"
    release.set()
    first.join(10)
    join_threads(p)


def test_stop_from_a_done_callback_that_stop_itself_runs(make_processor):
    # stop() fails a queued request on its own thread; that request's callback stops
    # again: it must return at once, not wait for the stop() it runs in.
    p = make_processor()  # never started: the request waits in the queue for stop()
    future = p.enqueue_predict(one(1.0))
    seen = {}

    def stop_again(_future):
        started = time.monotonic()
        p.stop(timeout=5)
        seen["took"] = time.monotonic() - started

    future.add_done_callback(stop_again)
    started = time.monotonic()
    p.stop(timeout=5)
    assert time.monotonic() - started < 4.0
    assert seen["took"] < 1.0
    with pytest.raises(ProcessorStoppedError):
        future.result(timeout=0)


# ----------------------------------------------------------------- stop on its own threads


def test_stop_from_a_done_callback_on_a_worker(make_processor, caplog):
    p = fixed_batches(make_processor, lambda b: b, 2)
    p.pause()
    first, second = p.enqueue_predict(one(1.0)), p.enqueue_predict(one(2.0))
    queued = [p.enqueue_predict(one(3.0)), p.enqueue_predict(one(4.0))]
    outcome = {}

    def stop_here(_future):
        started = time.monotonic()
        try:
            p.stop(timeout=5)
            outcome["returned_after"] = time.monotonic() - started
        except BaseException as exc:
            outcome["raised"] = exc

    first.add_done_callback(stop_here)
    p.resume()
    join_threads(p)  # the worker, whose callback called stop, exits too
    assert "raised" not in outcome
    assert outcome["returned_after"] < 4.0  # never waits for its own thread
    assert first.result(timeout=0).tolist() == [[1.0]]
    assert second.result(timeout=0).tolist() == [[2.0]]  # its delivery went on
    for future in queued:
        with pytest.raises(ProcessorStoppedError):
            future.result(timeout=0)
    assert p.health()["state"] == "stopped"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_stop_from_a_done_callback_of_a_searched_batch_comes_after_its_search(
        make_processor, caplog):
    # The callback is on a request of the failure search's first part: it runs once the
    # search is over (the poison request parked for its retry), and the stop it calls
    # fails what is parked; the worker runs nothing more.
    model = PoisonModel()
    p = fixed_batches(make_processor, model, 4, max_retries=2, retry_delay=0.01)
    p.pause()
    futures = [p.enqueue_predict(one(v)) for v in (1.0, 2.0, 3.0, POISON)]
    outcome = {}

    def stop_here(_future):
        p.stop(timeout=5)
        outcome["calls"] = len(model.calls)

    futures[0].add_done_callback(stop_here)
    p.resume()
    join_threads(p)
    assert model.calls == [[POISON, 1.0, 2.0, 3.0], [1.0, 2.0], [3.0], [POISON]]  # sorted
    assert outcome["calls"] == 4
    assert [f.result(timeout=0).tolist() for f in futures[:3]] == [[[1.0]], [[2.0]], [[3.0]]]
    with pytest.raises(ProcessorStoppedError):
        futures[3].result(timeout=0)
    assert p._queue.parked == 0 and len(p._queue) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_stop_from_a_done_callback_on_the_callbacks_thread(make_processor, caplog):
    # An expired request is failed on the supervisor thread, its callbacks run on the
    # processor's callbacks thread, which stop() does not wait for.
    p = make_processor(lambda b: b)
    p.pause()
    queued = p.enqueue_predict(one(2.0))
    outcome = {}

    def stop_here(_future):
        outcome["thread"] = threading.current_thread().name
        try:
            p.stop(timeout=5)
            outcome["returned"] = True
        except BaseException as exc:
            outcome["raised"] = exc

    expiring = p.enqueue_predict(one(1.0), max_queue_time=0.5)
    expiring.add_done_callback(stop_here)
    wait_for(lambda: len(outcome) == 2, "the callback's stop() to return")
    join_threads(p)
    assert outcome == {"thread": "batchproc-callbacks", "returned": True}
    assert queued.result(timeout=0).tolist() == [[2.0]]  # stop drains, as always
    assert p.health()["state"] == "stopped"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_stop_from_an_async_model_on_the_event_loop(make_processor, caplog):
    outcome = {}

    async def model(batch):
        try:
            p.stop(timeout=0.05)
            outcome["returned"] = True
        except BaseException as exc:
            outcome["raised"] = exc
        return batch

    p = make_processor(model, max_workers=1)
    future = p.enqueue_predict(one(1.0))
    with pytest.raises(ProcessorStoppedError):
        future.result(timeout=10)
    join_threads(p)
    assert outcome == {"returned": True}
    assert p.health()["state"] == "stopped"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and "stopped:" not in r.getMessage()]


# ----------------------------------------------------------------- how long stop takes


@pytest.mark.parametrize("attempt", range(3))  # its failure was intermittent
def test_stop_returns_in_time_while_threads_keep_enqueuing(make_processor, attempt):
    # Callers that go on enqueuing after their refusals must neither starve stop()
    # nor get anything but refusals; every request accepted is settled. Poison requests
    # wait for their retries (1 s) in the queue, where the workers' pops wait for them.
    model = PoisonModel()
    p = make_processor(model, max_workers=4, max_batch_size=32)  # retry_delay 1 s
    accepted, refused = [], []
    lock = threading.Lock()
    loaded = threading.Barrier(17)
    done = threading.Event()

    def enqueue(k):
        n = 0
        while not done.is_set():
            n += 1
            try:
                future = p.enqueue_predict(one(POISON if n % 50 == k else 1.0))
            except ProcessorStoppedError:
                with lock:
                    refused.append(k)
                continue
            with lock:
                accepted.append(future)
            if n == 300:
                loaded.wait(10)

    threads = [threading.Thread(target=enqueue, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    try:
        loaded.wait(10)  # every thread has queued 300 requests and goes on
        started = time.monotonic()
        p.stop(timeout=0.3)
        took = time.monotonic() - started
    finally:
        done.set()
        for t in threads:
            t.join(10)
    assert took < 0.3 + 1.0  # its timeout, and the reliability suites' margin past it
    assert refused
    join_threads(p)
    with lock:
        assert not [f for f in accepted if not f.done()]


# ----------------------------------------------------------------- the timeout argument

BAD_TIMEOUTS = [
    ("1", TypeError), (b"1", TypeError), ([1], TypeError), (True, TypeError),
    (False, TypeError), (np.True_, TypeError), (float("nan"), ValueError),
    (np.float32("nan"), ValueError), (-1, ValueError), (np.int64(-1), ValueError),
    (-0.5, ValueError),
]


@pytest.mark.parametrize("timeout, error", BAD_TIMEOUTS)
def test_stop_refuses_a_bad_timeout_naming_it_and_keeps_running(make_processor, timeout,
                                                                 error):
    p = make_processor(lambda b: b)
    with pytest.raises(error, match="timeout"):
        p.stop(timeout)
    assert p.running
    assert p.enqueue_predict(one(1)).result(timeout=10)[0, 0] == 1


@pytest.mark.parametrize("timeout, error", BAD_TIMEOUTS)
def test_stop_before_start_refuses_a_bad_timeout(make_processor, timeout, error):
    p = make_processor()
    with pytest.raises(error, match="timeout"):
        p.stop(timeout)
    assert not p.shutdown_event.is_set()


@pytest.mark.parametrize("timeout", [
    None, 0, 0.0, 2, 2.5, float("inf"), np.int64(2), np.float32(2.5), Fraction(5, 2),
    Decimal("2.5"), 10**400])
def test_stop_takes_none_or_seconds(make_processor, timeout):
    # Any number enqueue_predict's timeout takes (numpy scalars, fractions, decimals, an
    # int too large for a float).
    p = make_processor(lambda b: b)
    p.enqueue_predict(one(1), timeout=timeout).result(timeout=10)
    future = p.enqueue_predict(one(3))
    p.stop(timeout)
    assert not p.running and future.done()


@pytest.mark.parametrize("timeout", [True, False])
def test_enqueue_predict_refuses_a_bool_timeout(make_processor, timeout):
    p = make_processor(lambda b: b)
    with pytest.raises(TypeError, match="timeout"):
        p.enqueue_predict(one(1), timeout)
    assert p.get_stats()["total_accepted"] == 0


@pytest.mark.parametrize("timeout, error", BAD_TIMEOUTS)
def test_a_batched_function_stop_refuses_a_bad_timeout(timeout, error):
    import batchproc

    @batchproc.batch(max_batch_size=4)
    def double(batch):
        return batch * 2

    with pytest.raises(error, match="timeout"):
        double.stop(timeout)  # before the first call too
    assert double(one(2))[0, 0] == 4
    with pytest.raises(error, match="timeout"):
        double.stop(timeout)
    assert double(one(3))[0, 0] == 6  # still running
    double.stop()


@pytest.mark.parametrize("timeout, error", BAD_TIMEOUTS)
def test_a_batched_method_stop_refuses_a_bad_timeout(timeout, error):
    import batchproc

    class Model:
        @batchproc.batch(max_batch_size=4)
        def double(self, batch):
            return batch * 2

    model = Model()
    assert model.double(one(2))[0, 0] == 4
    with pytest.raises(error, match="timeout"):
        Model.double.stop(timeout)
    assert model.double(one(3))[0, 0] == 6  # not stopped
    Model.double.stop()


_NOP = dis.opmap["NOP"]


class Interrupter:
    """A trace function raising KeyboardInterrupt into this thread at the chosen
    instructions (counted from 1) of the code of ``modules`` (stop's, and the wait in
    ``shielded``), as a signal handler's exception lands: between any two instructions.

    Except at a ``NOP``: CPython runs signal handlers only where its eval loop checks for
    pending work (function entry, calls, backward jumps), never at a ``NOP``, and a
    ``try:`` line's ``NOP`` lies outside the range its handler covers."""

    def __init__(self, at=(), modules=("processor", "shielded")):
        import importlib
        self.files = {importlib.import_module(f"batchproc.{m}").__file__ for m in modules}
        self.at = set(at)
        self.count = 0
        self.landed = []  # (function, line, offset) of each interrupt raised

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename not in self.files:
            return None
        frame.f_trace_lines = False
        frame.f_trace_opcodes = True
        return self.instruction

    def instruction(self, frame, event, arg):
        if event == "opcode" and frame.f_code.co_code[frame.f_lasti] != _NOP:
            self.count += 1
            if self.count in self.at:
                self.landed.append((frame.f_code.co_name, frame.f_lineno, frame.f_lasti))
                raise KeyboardInterrupt(f"at instruction {self.count}")
        return self.instruction


def interrupt_points(count, gaps, first=1):
    """Each schedule of interrupts: one at every instruction from ``first`` to ``count``,
    each followed by one more after each of ``gaps`` further instructions."""
    for start in range(first, count + 1):
        at = [start]
        for gap in gaps:
            at.append(at[-1] + gap)
        yield at


# stop() waits out its whole timeout for the hung call of ``stop_interrupted``, once
# per interrupt schedule: a short one, waited for in two of the caller's slices (the
# interrupts also land on the loop between them).
INTERRUPTED_STOP_TIMEOUT = 0.02
INTERRUPTED_STOP_SLICE = 0.015


@pytest.fixture
def short_slices(monkeypatch):
    from batchproc import shielded
    monkeypatch.setattr(shielded, "SIGNAL_POLL", INTERRUPTED_STOP_SLICE)


def stop_interrupted(make_processor, interrupter, stop=None):
    """Stop a processor holding a hung call and a queued request, with ``stop(p)``
    (``p.stop(INTERRUPTED_STOP_TIMEOUT)`` by default), ``interrupter`` tracing; what it
    raised (None if nothing), its futures, and the model's release."""
    release = threading.Event()
    entered = threading.Event()

    def hangs(batch):
        entered.set()
        release.wait()
        return batch

    p = make_processor(hangs, max_workers=1, batch_timeout=0.001)
    futures = [p.enqueue_predict(one(1.0))]
    assert entered.wait(10)
    futures.append(p.enqueue_predict(one(2.0)))
    raised = None
    previous = sys.gettrace()
    sys.settrace(interrupter)
    try:
        if stop is None:
            p.stop(timeout=INTERRUPTED_STOP_TIMEOUT)
        else:
            stop(p)
    except KeyboardInterrupt as exc:
        raised = exc
    finally:
        sys.settrace(previous)
    return p, raised, futures, release


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="interrupts land on the main thread")
@pytest.mark.slow
@pytest.mark.parametrize("gaps", [(), (1,), (1, 3)], ids=["once", "twice", "thrice"])
def test_interrupts_at_every_instruction_of_stop_still_complete_every_future(
        make_processor, short_slices, gaps):
    # Whatever instructions of stop the interrupts land on, stop either had not begun
    # (as if interrupted before the call: the processor runs on) or it completes every
    # future, stops its threads and raises KeyboardInterrupt once.
    dry = Interrupter()
    p, raised, futures, release = stop_interrupted(make_processor, dry)
    release.set()
    assert raised is None and all(f.done() for f in futures)
    for at in interrupt_points(dry.count, gaps):
        interrupter = Interrupter(at)
        p, raised, futures, release = stop_interrupted(make_processor, interrupter)
        try:
            # The wait's slices make the count vary a little from run to run.
            assert isinstance(raised, KeyboardInterrupt) or interrupter.count < at[0], at
            if p.health()["state"] == "running":
                assert not any(f.done() for f in futures), at
                continue
            assert p.health()["state"] == "stopped", (at, interrupter.landed)
            for f in futures:
                with pytest.raises(ProcessorStoppedError):
                    f.result(timeout=0)
            p._supervisor.join(10)  # told to stop; stop waits for it only while in time
            assert not p._supervisor.is_alive(), at
            assert not [t for t in threading.enumerate()
                        if t.name == "batchproc-stop" and t.is_alive()], at
        finally:
            release.set()
            p.stop(timeout=5)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="interrupts land on the main thread")
@pytest.mark.slow
@pytest.mark.parametrize("gaps", [(), (1,)], ids=["once", "twice"])
def test_interrupts_at_every_instruction_of_the_exit_hook_still_stop_everything(
        make_processor, monkeypatch, short_slices, gaps):
    # The exit hook, unlike stop(), must stop what is registered even when interrupted
    # before its stops begin. An interrupt before its ``try`` (a signal's only chance
    # there is the call's entry) escapes as if before the call, one after everything
    # stopped is raised (the interpreter prints it as ignored); the hook logs the others.
    import inspect
    import weakref

    from batchproc import exiting

    def stop_all(p):
        monkeypatch.setattr(exiting, "_registered", weakref.WeakKeyDictionary({p: None}))
        monkeypatch.setattr(exiting, "EXIT_TIMEOUT", INTERRUPTED_STOP_TIMEOUT)
        # Not exiting for real: the next processor of this test process may start.
        monkeypatch.setattr(exiting, "_has_run", False)
        try:
            exiting.stop_all()
        finally:
            exiting._has_run = False

    source, first_line = inspect.getsourcelines(exiting.stop_all)
    try_line = first_line + next(i for i, text in enumerate(source) if "try:" in text)
    modules = ("exiting", "shielded", "processor")
    dry = Interrupter(modules=modules)
    p, raised, futures, release = stop_interrupted(make_processor, dry, stop_all)
    release.set()
    assert raised is None and all(f.done() for f in futures)
    for at in interrupt_points(dry.count, gaps, first=2):
        interrupter = Interrupter(at, modules)
        p, raised, futures, release = stop_interrupted(make_processor, interrupter, stop_all)
        try:
            function, line, _ = interrupter.landed[0] if interrupter.landed else ("", 0, 0)
            if function == "stop_all" and line <= try_line:
                assert raised is not None and p.health()["state"] == "running"
                continue  # before anything of the hook ran, as if before the call
            assert p.health()["state"] == "stopped", interrupter.landed
            for f in futures:
                with pytest.raises(ProcessorStoppedError):
                    f.result(timeout=0)
        finally:
            release.set()
            p.stop(timeout=5)


def test_stop_drains_behind_a_hung_call_with_its_free_workers(make_processor):
    # A call hangs; requests queued behind it wait for batch_timeout to fill while the
    # queue is open. Once stop closes it nothing waits to fill: a free worker takes the
    # hung call's slot at once and serves them within the stop's time.
    model, release, hanging = hangs_on_666()
    p = make_processor(model, max_workers=4, batch_timeout=5.0, max_batch_size=4,
                       item_timeout=60)
    try:
        for v in range(3):  # the usual time: fast
            p.enqueue_predict(one(v)).result(timeout=20)
        hung = p.enqueue_predict(one(666))
        assert hanging.wait(10)
        queued = [p.enqueue_predict(one(v)) for v in range(10)]
        p.stop(timeout=2.0)  # far below batch_timeout
        assert [f.result(timeout=0)[0, 0] for f in queued] == list(range(10))
        assert isinstance(hung.exception(timeout=0), ProcessorStoppedError)
    finally:
        release.set()


def test_stop_waits_for_the_replacement_of_a_worker_abandoned_in_a_hang(make_processor):
    # max_workers=1: the one worker hangs; item_timeout abandons it during stop's wait,
    # and its replacement serves the requests queued behind it (stop waits for it).
    from batchproc import BatchTimeoutError

    model, release, hanging = hangs_on_666()
    p = make_processor(model, max_workers=1, item_timeout=0.5)
    try:
        hung = p.enqueue_predict(one(666))
        assert hanging.wait(10)
        queued = [p.enqueue_predict(one(v)) for v in range(5)]
        p.stop(timeout=20)
        assert [f.result(timeout=0)[0, 0] for f in queued] == list(range(5))
        assert isinstance(hung.exception(timeout=0), BatchTimeoutError)
    finally:
        release.set()


def test_stop_as_the_time_limit_abandons_the_only_worker_still_drains_the_queue(
        make_processor):
    # The time limit's log line about abandoning the worker comes between marking it
    # abandoned and the rest of its work. A stop made right there, and waited for, must
    # find a worker to drain the queue: the replacement is started before the mark.
    from batchproc import BatchTimeoutError

    model, release, hanging = hangs_on_666()
    p = make_processor(model, max_workers=1, item_timeout=0.5)
    stopper = threading.Thread(target=p.stop, kwargs={"timeout": 20})

    class StopOnAbandon(logging.Handler):
        def emit(self, record):
            if "past item_timeout" in record.getMessage() and stopper.ident is None:
                stopper.start()
                stopper.join(30)

    handler = StopOnAbandon()
    limits_log = logging.getLogger("batchproc.engine.limits")
    limits_log.addHandler(handler)
    try:
        hung = p.enqueue_predict(one(666))
        assert hanging.wait(10)
        queued = [p.enqueue_predict(one(v)) for v in range(5)]
        assert isinstance(hung.exception(timeout=20), BatchTimeoutError)
        stopper.join(30)
        assert not stopper.is_alive()
        assert [f.result(timeout=0)[0, 0] for f in queued] == list(range(5))
    finally:
        limits_log.removeHandler(handler)
        release.set()

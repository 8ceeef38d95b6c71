"""RequestFuture: a lighter concurrent.futures.Future that must behave exactly like one.

The standard Future is the reference: random operation sequences are applied to both and
every answer compared. Blocking, waking and the stdlib helpers (wait, as_completed,
asyncio.wrap_future) are tested with the orderings made to happen, not slept for.
"""

import asyncio
import concurrent.futures as cf
import copy
import gc
import importlib.machinery
import inspect
import logging
import pickle
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from waiting import collection_runs, wait_for

from batchproc._native import future_state
from batchproc._native import waiting as native_waiting
from batchproc._native.future_state import Request, enqueued_of, items_of, longest, total_rows
from batchproc.futures import (
    RequestFuture,
    finish_all,
    get_result_spin,
    set_result_spin,
    start_all,
)

OPS = ("cancel", "set_running_or_notify_cancel", "set_result", "set_exception",
       "add_done_callback", "done", "running", "cancelled", "result", "exception", "repr")


def _apply(future, op, calls):
    """Run one operation; return what it answered (value or exception type)."""
    try:
        if op == "set_result":
            return ("ok", future.set_result(42))
        if op == "set_exception":
            return ("ok", future.set_exception(KeyError("boom")))
        if op == "add_done_callback":
            return ("ok", future.add_done_callback(lambda f: calls.append(f.done())))
        if op in ("result", "exception"):
            out = getattr(future, op)(timeout=0)
            return ("ok", type(out).__name__ if isinstance(out, BaseException) else out)
        if op == "repr":
            # Same text once the class name and address are taken out.
            return ("ok", repr(future).split(" state=")[1])
        return ("ok", getattr(future, op)())
    except BaseException as exc:  # compared by type: both must raise the same thing
        return ("raised", type(exc).__name__)


@given(st.lists(st.sampled_from(OPS), max_size=12), st.booleans())
def test_every_operation_sequence_answers_like_the_standard_future(ops, locked):
    ours, ref = RequestFuture(), cf.Future()
    if locked:
        # As after concurrent.futures.wait(): from then on every transition locks.
        assert ours._condition is ours._condition
    ours_calls, ref_calls = [], []
    logging.disable(logging.CRITICAL)  # the unexpected-state log line, on both sides
    try:
        for op in ops:
            assert _apply(ours, op, ours_calls) == _apply(ref, op, ref_calls), op
            assert ours._state == ref._state
            assert ours_calls == ref_calls
    finally:
        logging.disable(logging.NOTSET)


def test_is_a_concurrent_futures_future():
    assert isinstance(RequestFuture(), cf.Future)


def test_every_future_method_that_could_wait_or_notify_is_overridden():
    # wait()/as_completed() use _condition only as a lock; a Future method this class
    # inherits must not call wait/notify on it. A new one in a later Python fails here.
    inherited_ok = {"_Future__get_result", "__class_getitem__"}
    for name, value in vars(cf.Future).items():
        if not callable(value) and not isinstance(value, (classmethod, staticmethod)):
            continue
        if name in vars(RequestFuture):
            continue
        assert name in inherited_ok, f"Future.{name} is inherited unchecked"
        if inspect.isfunction(value):
            assert "_condition" not in inspect.getsource(value), name


def test_tracks_far_fewer_objects_for_the_garbage_collector():
    def tracked(factory):
        gc.collect()
        before = len(gc.get_objects())
        keep = [factory() for _ in range(100)]
        count = len(gc.get_objects()) - before
        del keep
        return count / 100

    assert tracked(RequestFuture) < 1.5  # the future itself; the standard one: 11


def test_one_callback_adds_no_container_for_the_garbage_collector():
    # A caller holding many futures, each with a done-callback (a burst, a progress
    # counter), pays a full collection for every object a future keeps: the first
    # callback is kept on its own, not in a list.
    f = RequestFuture()
    f.add_done_callback(print)
    assert not [r for r in gc.get_referents(f) if isinstance(r, list)]


@pytest.mark.parametrize("locked", [False, True])
@pytest.mark.parametrize("outcome", ["result", "cancel"])
def test_callbacks_run_once_each_in_the_order_added(locked, outcome):
    f = RequestFuture()
    if locked:
        assert f._condition is f._condition  # every transition takes the lock from now
    calls = []
    for k in range(3):
        f.add_done_callback(lambda _f, k=k: calls.append(k))
    if outcome == "result":
        f.set_result(1)
    else:
        assert f.cancel()
    f.add_done_callback(lambda _f: calls.append("late"))  # done: called at once
    assert calls == [0, 1, 2, "late"]


def test_the_compiled_transitions_are_the_ones_used():
    from batchproc._native import future_state

    assert future_state.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    future = RequestFuture()
    assert future_state.start(future) == 1 and future.running()
    assert future_state.finish(future, 5, False) == 0 and future.result(timeout=0) == 5
    locked = RequestFuture()
    locked._condition.acquire()
    try:
        assert future_state.start(locked) == future_state.NEED_LOCK
    finally:
        locked._condition.release()


@pytest.mark.parametrize("outcome", ["result", "exception", "cancel"])
def test_wait_registering_while_another_thread_completes_never_misses_it(outcome):
    # concurrent.futures.wait() reads the state and registers its waiter under
    # _condition; a completion racing it must either be seen or notify the waiter.
    for _ in range(300):
        future = RequestFuture()
        barrier = threading.Barrier(2)

        def complete(future=future, barrier=barrier):
            barrier.wait()
            if outcome == "result":
                future.set_result(1)
            elif outcome == "exception":
                future.set_exception(KeyError("k"))
            elif future.cancel():
                future.set_running_or_notify_cancel()

        thread = threading.Thread(target=complete)
        thread.start()
        barrier.wait()
        done, _ = cf.wait([future], timeout=10)
        thread.join(10)
        assert done == {future}


def _blocked_in_wait(future):
    """Wait until a thread is registered as blocked on ``future`` (a state, polled)."""
    for _ in range(10_000):
        if future._sleepers:
            return
        threading.Event().wait(0.001)
    raise AssertionError("no thread blocked on the future")


@pytest.mark.parametrize("outcome", ["result", "exception", "cancel"])
def test_a_blocked_result_call_is_woken_by_completion(outcome):
    future = RequestFuture()
    got = []

    def waiter():
        try:
            got.append(("value", future.result()))
        except BaseException as exc:
            got.append(("error", type(exc).__name__))

    thread = threading.Thread(target=waiter)
    thread.start()
    _blocked_in_wait(future)
    assert not got
    if outcome == "result":
        future.set_result(7)
    elif outcome == "exception":
        future.set_exception(ValueError("no"))
    else:
        assert future.cancel()
    thread.join(5)
    assert not thread.is_alive()
    expected = {"result": ("value", 7), "exception": ("error", "ValueError"),
                "cancel": ("error", "CancelledError")}[outcome]
    assert got == [expected]
    assert future._sleepers is None


# --------------------------------------------------------------------- whole batches
# A worker starts and completes a batch's futures with one compiled call each
# (start_all, finish_all). Each must answer exactly as the per-future methods called in
# turn, whatever state the futures are in, with or without a lock, and for futures of
# another kind (here the standard one), which go through their own methods.

PREP = ("cancel", "set_running_or_notify_cancel", "set_result", "add_done_callback", "lock")


def _prepared(kind, prep, calls):
    future = cf.Future() if kind == "stdlib" else RequestFuture()
    for op in prep:
        if op == "lock":
            assert future._condition is not None  # as after concurrent.futures.wait()
        elif op == "add_done_callback":
            future.add_done_callback(lambda f: calls.append(f._state))
        elif op == "set_result":
            future.set_result("early")
        else:
            getattr(future, op)()
    return future


def _twin_batches(specs):
    """The same batch of futures twice: (requests, callback log) each."""
    batches = []
    for _ in range(2):
        calls = []
        logging.disable(logging.CRITICAL)
        try:
            requests = []
            for i, (kind, prep) in enumerate(specs):
                try:
                    requests.append(Request(_prepared(kind, prep, calls), i, None, 1, 0, 0, 0.0))
                except (RuntimeError, cf.InvalidStateError):
                    pass  # the preparation itself was invalid: leave this one out
        finally:
            logging.disable(logging.NOTSET)
        batches.append((requests, calls))
    return batches


BATCH_SPECS = st.lists(st.tuples(st.sampled_from(["ours", "stdlib"]),
                                 st.lists(st.sampled_from(PREP), max_size=3)), max_size=6)


def _outcome(call):
    logging.disable(logging.CRITICAL)
    try:
        return ("ok", call())
    except BaseException as exc:
        return ("raised", type(exc).__name__)
    finally:
        logging.disable(logging.NOTSET)


@given(BATCH_SPECS)
def test_start_all_answers_like_starting_each_future_and_loses_none(specs):
    (batch, batch_calls), (single, single_calls) = _twin_batches(specs)

    def one_by_one():
        live = []
        for request in single:
            try:
                started = request.future.set_running_or_notify_cancel()
            except RuntimeError:  # started or completed by its caller: kept if running
                started = not request.future.done()
            if started:
                live.append(request)
        return live

    got = _outcome(lambda: [r.item for r in start_all(batch)])
    expected = _outcome(lambda: [r.item for r in one_by_one()])
    assert got == expected
    assert got[0] == "ok"  # never raises: one misused future cannot sink its batch
    assert [r.future._state for r in batch] == [r.future._state for r in single]
    assert batch_calls == single_calls


@given(BATCH_SPECS)
def test_finish_all_answers_like_completing_each_future(specs):
    (batch, batch_calls), (single, single_calls) = _twin_batches(specs)
    results = [f"result {r.item}" for r in batch]

    def one_by_one():
        already_done = 0
        for request, result in zip(single, results):
            try:
                request.future.set_result(result)
            except cf.InvalidStateError:
                already_done += 1
        return already_done

    assert _outcome(lambda: finish_all(batch, results)) == _outcome(one_by_one)
    assert [r.future._state for r in batch] == [r.future._state for r in single]
    assert [r.future._result for r in batch] == [r.future._result for r in single]
    assert batch_calls == single_calls


def test_finish_all_wakes_blocked_callers_and_checks_lengths():
    futures = [RequestFuture() for _ in range(3)]
    got = {}
    threads = [threading.Thread(target=lambda i=i: got.setdefault(i, futures[i].result(10)),
                                daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    for future in futures:
        _blocked_in_wait(future)
    requests = [Request(f, None, None, 1, 0, 0, 0.0) for f in futures]
    with pytest.raises(ValueError, match="3 requests but 2 results"):
        finish_all(requests, ["a", "b"])
    assert not any(f.done() for f in futures)
    assert finish_all(requests, ["a", "b", "c"]) == 0
    for thread in threads:
        thread.join(5)
    assert got == {0: "a", 1: "b", 2: "c"}


def test_many_waiters_are_all_woken():
    future = RequestFuture()
    results = []
    threads = [threading.Thread(target=lambda: results.append(future.result()))
               for _ in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: future._sleepers is not None and len(future._sleepers) == 8,
             "all 8 waiters parked")
    future.set_result("x")
    for t in threads:
        t.join(5)
    assert results == ["x"] * 8


def test_a_timed_out_wait_raises_and_leaves_nothing_registered():
    future = RequestFuture()
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.01)
    with pytest.raises(cf.TimeoutError):
        future.exception(timeout=0.01)
    assert not future._sleepers
    future.set_result(1)
    assert future.result(timeout=0) == 1


def test_callback_errors_are_logged_not_raised(caplog):
    future = RequestFuture()
    seen = []

    def bad(f):
        raise RuntimeError("callback bug")

    future.add_done_callback(bad)
    future.add_done_callback(lambda f: seen.append(f.result()))
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        future.set_result(5)
    assert seen == [5]
    assert "exception calling callback" in caplog.text
    # Added after completion: called at once, errors still only logged.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        future.add_done_callback(bad)
    assert "exception calling callback" in caplog.text


def test_cancel_racing_the_worker_is_decided_exactly_once():
    for _ in range(500):
        future = RequestFuture()
        calls = []
        future.add_done_callback(calls.append)
        barrier = threading.Barrier(2)
        outcome = {}

        def user(future=future, barrier=barrier, outcome=outcome):
            barrier.wait()
            outcome["cancel"] = future.cancel()

        thread = threading.Thread(target=user)
        thread.start()
        barrier.wait()
        outcome["run"] = future.set_running_or_notify_cancel()
        thread.join(5)
        assert outcome["cancel"] != outcome["run"]
        if outcome["run"]:
            future.set_result(1)
        assert calls == [future]


def test_concurrent_futures_wait_and_as_completed():
    a, b, c = RequestFuture(), RequestFuture(), RequestFuture()
    b.set_result("early")
    done, not_done = cf.wait([a, b, c], timeout=0, return_when=cf.FIRST_COMPLETED)
    assert done == {b} and not_done == {a, c}

    order = []

    def finish():
        # Completes a then c once as_completed is waiting on them (it registered).
        for _ in range(10_000):
            if a._waiter_list and c._waiter_list:
                break
            threading.Event().wait(0.001)
        c.set_exception(KeyError("c"))
        a.set_result("late")

    thread = threading.Thread(target=finish)
    thread.start()
    for f in cf.as_completed([a, b, c], timeout=5):
        order.append(f)
    thread.join(5)
    assert order[0] is b and set(order) == {a, b, c}
    assert not a._waiter_list and not c._waiter_list  # as_completed cleaned up

    d = RequestFuture()
    d.cancel()
    d.set_running_or_notify_cancel()
    done, _ = cf.wait([d], timeout=5)
    assert done == {d}


def test_asyncio_wrap_future_sees_results_and_cancellation():
    async def main():
        loop = asyncio.get_running_loop()
        ok = RequestFuture()
        loop.call_soon(lambda: threading.Thread(target=ok.set_result, args=(3,)).start())
        assert await asyncio.wrap_future(ok) == 3

        cancelled = RequestFuture()
        wrapped = asyncio.wrap_future(cancelled)
        wrapped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await wrapped
        await asyncio.sleep(0)  # the loop passes the cancellation on in a callback
        return cancelled.cancelled()

    assert asyncio.run(main())


def test_results_are_kept_by_reference():
    future = RequestFuture()
    value = np.arange(3)
    future.set_result(value)
    assert future.result() is value
    assert "returned ndarray" in repr(future)


# -- through the processor ---------------------------------------------------------------


def test_a_cancelled_queued_request_is_reported_to_concurrent_futures_wait(make_processor):
    processor = make_processor(lambda batch: batch)
    processor.pause()
    future = processor.enqueue_predict(np.ones((1, 2)))
    assert future.cancel()
    # Without the notification wait() would only see CANCELLED, never "done", and time
    # out: no worker will ever pop this request to notify it.
    done, not_done = cf.wait([future], timeout=5)
    assert done == {future} and not not_done
    processor.resume()
    assert processor.get_stats()["total_cancelled"] == 1


def test_processor_futures_are_request_futures(make_processor):
    processor = make_processor(lambda batch: batch)
    future = processor.enqueue_predict(np.ones((1, 2)))
    assert isinstance(future, RequestFuture)
    assert future.result(timeout=5).tolist() == [[1.0, 1.0]]


def test_request_records_are_read_by_name_and_by_the_batch_helpers():
    futures = [RequestFuture() for _ in range(3)]
    requests = [Request(f, f"item {i}", "fmt", i + 1, 10 * i, 3 - i, 0.5 * i)
                for i, f in enumerate(futures)]
    r = requests[1]
    assert (r.future, r.item, r.format, r.rows, r.nbytes, r.length, r.enqueued_at) == (
        futures[1], "item 1", "fmt", 2, 10, 2, 0.5)
    assert items_of(requests) == ["item 0", "item 1", "item 2"]
    assert enqueued_of(requests) == [0.0, 0.5, 1.0]
    assert total_rows(requests) == 6 and longest(requests) == 3
    assert total_rows([]) == 0 and longest([]) == 0
    piece = r.replace_item("part", 1, 4)
    assert (piece.future, piece.item, piece.format, piece.rows, piece.nbytes, piece.length,
            piece.enqueued_at) == (futures[1], "part", "fmt", 1, 4, 2, 0.5)
    with pytest.raises(AttributeError):
        r.rows = 5  # immutable
    for helper in (items_of, enqueued_of, total_rows, longest, start_all):
        with pytest.raises(TypeError):
            helper([(futures[0], "a tuple is not a request")])


@pytest.mark.parametrize("timeout", [threading.TIMEOUT_MAX * 2, 1e308, float("inf")])
@pytest.mark.parametrize("method", ["result", "exception"])
def test_a_wait_longer_than_a_thread_can_make_waits_until_done(method, timeout):
    # The standard Future raises OverflowError: a wait that long is one without a limit.
    future = RequestFuture()
    waiting = threading.Event()
    got = []

    def wait():
        waiting.set()
        try:
            got.append(getattr(future, method)(timeout=timeout))
        except BaseException as exc:  # reported by the assertion below
            got.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    waiting.wait()
    future.set_result(42)
    thread.join(timeout=10)
    assert got == [42 if method == "result" else None]


# A collection may start at any allocation and run Python code, so other threads; the
# transitions make what they store before they read the state (future_state's module).

def test_a_future_completed_while_a_waiter_registers_does_not_leave_it_blocked():
    from batchproc._native.waiting import Sleeper

    future, sleeper = RequestFuture(), Sleeper()
    add = future_state.add_sleeper
    with collection_runs(lambda: future.set_result(5)) as collection:
        registered = add(future, sleeper)
    assert collection.ran
    # Not registered (already done), or registered and released: never left to block.
    assert registered == 0 or sleeper.released
    assert future.result(timeout=0) == 5


def test_a_future_completed_while_a_callback_registers_still_calls_it():
    future, calls = RequestFuture(), []
    future.add_done_callback(lambda f: calls.append("first"))
    second = lambda f: calls.append("second")  # noqa: E731 - made before the collection
    add = future_state.add_callback
    with collection_runs(lambda: future.set_result(5)) as collection:
        added = add(future, second)
    assert collection.ran
    if added == 0:  # already done: the caller calls it now (add_done_callback)
        second(future)
    assert sorted(calls) == ["first", "second"]



def _crowded_future(known=()):
    """A future whose class has used up its instances' shared attribute keys (CPython
    keeps at most 30 per class), ``known`` among them: an attribute not among them, first
    stored on it, makes the instance's own dict, an allocation, so possibly a
    collection."""

    class Crowded(RequestFuture):
        pass

    filler = Crowded()
    for name in known:
        setattr(filler, name, None)
    for k in range(40):
        setattr(filler, f"extra_{k}", k)
    return Crowded()


@pytest.mark.parametrize("callbacks_before", [0, 1])
def test_a_callback_registering_on_a_future_with_a_dict_of_its_own_is_called(
        callbacks_before):
    # Storing the callback must not be where a collection starts: one that ran the
    # completing thread there left the callback stored but never called.
    # With one callback before, the first is stored without making the dict; the list
    # of the others is then the first attribute that would.
    future, calls = _crowded_future(("_first_callback",) * callbacks_before), []
    for _ in range(callbacks_before):
        future.add_done_callback(lambda f: calls.append("before"))
    callback = lambda f: calls.append("added")  # noqa: E731 - made before the collection
    with collection_runs(lambda: future.set_result(5)) as collection:
        added = future_state.add_callback(future, callback)
    if not collection.ran:
        future.set_result(5)
    if added == 0:  # already done: the caller calls it now (add_done_callback)
        callback(future)
    assert sorted(calls) == ["added"] + ["before"] * callbacks_before


def _parked_callers(futures):
    """A thread blocked in result() on each future, parked (not spinning): (threads, got)."""
    got = {}
    threads = [threading.Thread(target=lambda i=i: got.setdefault(i, futures[i].result(10)),
                                daemon=True) for i in range(len(futures))]
    for thread in threads:
        thread.start()
    for future in futures:
        _blocked_in_wait(future)
        wait_for(lambda f=future: f._sleepers and f._sleepers[0].parked, "a parked caller")
    return threads, got


def test_finish_all_wakes_the_parked_callers_of_a_batch_together():
    """Their wake-ups go in one release_all, the GIL let go once (a caller woken while
    the worker held the GIL would block on it and be woken again)."""
    spin = get_result_spin()
    set_result_spin(0.0)
    try:
        futures = [RequestFuture() for _ in range(3)]
        threads, got = _parked_callers(futures)
        lets_go = native_waiting.let_go_counts()[0]
        requests = [Request(f, None, None, 1, 0, 0, 0.0) for f in futures]
        assert finish_all(requests, ["a", "b", "c"]) == 0
        assert native_waiting.let_go_counts()[0] == lets_go + 1
        for thread in threads:
            thread.join(5)
        assert got == {0: "a", 1: "b", 2: "c"}
    finally:
        set_result_spin(spin)


@pytest.mark.parametrize(("waited", "watched"), [(0, 0), (0, 1), (1, 0)])
def test_a_caller_is_woken_before_the_callbacks_of_its_batch_run(waited, watched):
    """As ``Future.set_result`` does: a callback never holds up a waiting caller of its
    batch, even one that waits for that caller, whichever future each is on."""
    futures = [RequestFuture(), RequestFuture()]
    returned, seen = threading.Event(), []

    def caller():
        futures[waited].result(10)
        returned.set()

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    _blocked_in_wait(futures[waited])
    futures[watched].add_done_callback(lambda f: seen.append(returned.wait(5)))
    requests = [Request(f, None, None, 1, 0, 0, 0.0) for f in futures]
    assert finish_all(requests, ["a", "b"]) == 0
    thread.join(5)
    assert seen == [True]


@pytest.mark.parametrize("locked", [False, True])
def test_a_callback_sees_every_future_of_its_batch_done(locked):
    futures = [RequestFuture() for _ in range(3)]
    if locked:  # handed to wait(): their transitions take their locks
        assert cf.wait(futures[1:], timeout=0).done == set()
    seen = []
    futures[0].add_done_callback(
        lambda f: seen.append([g.result(timeout=0) for g in futures]))
    requests = [Request(f, None, None, 1, 0, 0, 0.0) for f in futures]
    assert finish_all(requests, ["a", "b", "c"]) == 0
    assert seen == [["a", "b", "c"]]


def test_finish_all_that_fails_partway_still_wakes_the_callers_it_completed():
    future, got = RequestFuture(), []
    thread = threading.Thread(target=lambda: got.append(future.result(10)), daemon=True)
    thread.start()
    _blocked_in_wait(future)
    with pytest.raises(TypeError):
        finish_all([Request(future, None, None, 1, 0, 0, 0.0), "no request"], ["a", "b"])
    thread.join(5)
    assert got == ["a"]


@pytest.mark.parametrize("duplicate", [copy.copy, copy.deepcopy, pickle.dumps],
                         ids=["copy", "deepcopy", "pickle"])
def test_a_queued_requests_future_refuses_to_be_copied_and_stays_its_requests(
        make_processor, duplicate):
    # A copy carried the original's way out of the queue: cancelling the copy withdrew
    # the request, and the original future stayed pending forever.
    processor = make_processor(lambda batch: batch)
    processor.pause()
    future = processor.enqueue_predict(np.ones((1, 2)))
    with pytest.raises(TypeError, match="cannot be copied or pickled: it stands for one"):
        duplicate(future)
    processor.resume()
    assert future.result(timeout=5).tolist() == [[1.0, 1.0]]
    assert processor.get_stats()["total_cancelled"] == 0

"""An ``async def`` process_func: it runs on the processor's own event loop, and results,
failures, time limits and stop behave as for a sync model (docs/asyncio.md)."""

import asyncio
import functools
import threading
import time

import numpy as np
import pytest

from batchproc import (
    BatchOutputError,
    BatchProcessingStrategy,
    BatchTimeoutError,
    ProcessorStoppedError,
)
from batchproc.async_model import LOOP_THREAD_NAME, is_async_callable

HANG = 10.0  # seconds: a guard against a hung processor, never a speed assertion


def loop_threads():
    return [t for t in threading.enumerate() if t.name == LOOP_THREAD_NAME and t.is_alive()]


# ----------------------------------------------------------------- which callables


async def async_double(batch):
    await asyncio.sleep(0)
    return batch * 2


def sync_double(batch):
    return batch * 2


class AsyncCallable:
    def __init__(self, factor=2):
        self.factor = factor

    async def __call__(self, batch, factor=None):
        await asyncio.sleep(0)
        return batch * (factor or self.factor)

    async def method(self, batch):
        return batch * self.factor


class SyncCallable:
    def __call__(self, batch):
        return batch * 2


@pytest.mark.parametrize("func, expected", [
    (async_double, True),
    (AsyncCallable(), True),
    (AsyncCallable().method, True),
    (functools.partial(async_double), True),
    (functools.partial(AsyncCallable(), factor=3), True),
    (functools.partial(functools.partial(async_double)), True),
    (sync_double, False),
    (lambda batch: batch, False),
    (SyncCallable(), False),
    (functools.partial(sync_double), False),
    (AsyncCallable, False),  # calling the class builds an instance, not a coroutine
    (len, False),
])
def test_which_callables_are_async(func, expected):
    assert is_async_callable(func) is expected


@pytest.mark.parametrize("model, factor", [
    (async_double, 2),
    (AsyncCallable(), 2),
    (functools.partial(AsyncCallable(), factor=3), 3),
    (AsyncCallable(5).method, 5),
])
def test_an_async_model_gives_each_caller_its_rows(make_processor, model, factor):
    p = make_processor(model, max_batch_size=16)
    p.pause()  # so that the requests share batches
    futures = [p.enqueue_predict(np.full((2, 3), i, np.float64)) for i in range(20)]
    p.resume()
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(future.result(timeout=HANG),
                                      np.full((2, 3), i * factor, np.float64))
    stats = p.get_stats()
    assert stats["total_processed"] == 20 and stats["total_errors"] == 0


def test_calls_run_on_one_loop_in_one_thread_the_processor_owns(make_processor):
    seen = []

    async def model(batch):
        seen.append((threading.current_thread().name, asyncio.get_running_loop()))
        return batch

    before = loop_threads()
    p = make_processor(max_workers=3)
    assert loop_threads() == before  # no loop before start
    p.start(model)
    assert len(loop_threads()) == len(before) + 1
    for i in range(5):
        assert p.enqueue_predict([i]).result(timeout=HANG) == [i]
    assert {name for name, _ in seen} == {LOOP_THREAD_NAME}
    assert len({id(loop) for _, loop in seen}) == 1
    p.stop()
    assert loop_threads() == before  # stopped and joined by stop()
    assert seen[0][1].is_closed()


def test_a_sync_model_starts_no_loop(make_processor):
    before = loop_threads()
    p = make_processor(sync_double)
    assert p.enqueue_predict(np.array([1])).result(timeout=HANG).tolist() == [2]
    assert loop_threads() == before


# ----------------------------------------------------------------- concurrency


def test_workers_have_calls_in_flight_on_the_loop_at_once(make_processor):
    """max_workers calls await at the same time: the third call arriving is what releases
    all three, so a loop running one call at a time never finishes any of them."""
    workers = 3
    state = {"in_flight": 0, "most": 0, "release": None}

    async def model(batch):
        if state["release"] is None:
            state["release"] = asyncio.Event()  # created on the processor's loop
        state["in_flight"] += 1
        state["most"] = max(state["most"], state["in_flight"])
        if state["in_flight"] == workers:
            state["release"].set()
        await state["release"].wait()  # stands in for a request to a remote model
        state["in_flight"] -= 1
        return batch

    p = make_processor(max_workers=workers, max_batch_size=1,
                       processing_strategy=BatchProcessingStrategy.FIXED)
    p.pause()
    futures = [p.enqueue_predict([i]) for i in range(workers)]
    p.start(model)
    p.resume()
    assert [f.result(timeout=HANG) for f in futures] == [[i] for i in range(workers)]
    assert state["most"] == workers


def test_an_async_model_also_serves_enqueue_predict_async(make_processor):
    p = make_processor(async_double)

    async def main():
        results = await asyncio.gather(
            *(p.enqueue_predict_async(np.array([[float(i)]])) for i in range(50)))
        return [float(r[0, 0]) for r in results]

    assert asyncio.run(main()) == [2.0 * i for i in range(50)]


# ----------------------------------------------------------------- failures


def test_a_failing_request_is_bisected_out_and_retried_as_for_a_sync_model(make_processor):
    calls = []

    async def model(batch):
        calls.append(list(batch))
        await asyncio.sleep(0)
        if "poison" in batch:
            raise ValueError("cannot process 'poison'")
        return [text.upper() for text in batch]

    p = make_processor(max_retries=2, retry_delay=0.0, max_workers=1, max_batch_size=8,
                       processing_strategy=BatchProcessingStrategy.GREEDY)
    p.pause()
    futures = {t: p.enqueue_predict(t) for t in ["a", "b", "poison", "c"]}
    p.start(model)
    p.resume()
    assert futures["a"].result(timeout=HANG) == "A"
    assert futures["b"].result(timeout=HANG) == "B"
    assert futures["c"].result(timeout=HANG) == "C"
    error = futures["poison"].exception(timeout=HANG)
    assert isinstance(error, ValueError) and "poison" in str(error)  # unwrapped
    assert calls[0] == ["a", "b", "poison", "c"]
    assert calls.count(["poison"]) == 1 + 2  # the first try alone, then max_retries
    assert p.get_stats()["total_errors"] == 1


def test_a_wrong_length_output_fails_the_batch_as_for_a_sync_model(make_processor):
    async def model(batch):
        return batch[:-1]

    p = make_processor(model, max_retries=0)
    error = p.enqueue_predict(np.ones((3, 2))).exception(timeout=HANG)
    assert isinstance(error, BatchOutputError)


def test_an_exception_raised_before_the_first_await_fails_only_its_batch(make_processor):
    p = make_processor(functools.partial(AsyncCallable(), unexpected=1), max_retries=0)
    assert isinstance(p.enqueue_predict([1]).exception(timeout=HANG), TypeError)


class Interrupt(BaseException):
    pass


def test_a_base_exception_fails_its_batch_without_retry_and_the_loop_serves_on(
        make_processor):
    calls = []

    async def model(batch):
        calls.append(list(batch))
        if "stop" in batch:
            raise Interrupt()
        return batch

    p = make_processor(model, max_retries=3, retry_delay=0.0)
    assert isinstance(p.enqueue_predict("stop").exception(timeout=HANG), Interrupt)
    assert calls == [["stop"]]  # not retried, as for a sync model
    assert p.enqueue_predict("next").result(timeout=HANG) == "next"


def _stop_the_loop():
    asyncio.get_running_loop().stop()


def _exit_on_the_loop():
    def leave():
        raise SystemExit(3)  # asyncio lets SystemExit out of run_forever
    asyncio.get_running_loop().call_soon(leave)


@pytest.mark.parametrize("end_the_loop", [_stop_the_loop, _exit_on_the_loop])
def test_a_model_that_ends_the_processors_loop_does_not_end_its_service(
        make_processor, caplog, end_the_loop):
    async def model(batch):
        if "end" in batch:
            end_the_loop()
        return batch

    # A call the ended loop would never begin waits until item_timeout: far past HANG.
    p = make_processor(model, item_timeout=60.0)
    threads = loop_threads()
    for _ in range(2):
        assert p.enqueue_predict("end").result(timeout=HANG) == "end"
        assert p.enqueue_predict("next").result(timeout=HANG) == "next"
    assert loop_threads() == threads  # the same loop, on the same thread
    ended = [r for r in caplog.records if "event loop of an async process_func" in r.message]
    assert len(ended) == 1 and ended[0].message.endswith("; it runs on")  # logged once
    assert p.health()["status"] == "healthy"
    p.stop(timeout=HANG)
    assert loop_threads() == []  # stop() still ends it


# ----------------------------------------------------------------- time limits and stop


def test_a_call_past_item_timeout_fails_and_its_coroutine_is_cancelled(make_processor):
    cancelled = threading.Event()

    async def model(batch):
        if "hang" in batch:
            try:
                await asyncio.Event().wait()  # never set: a call that never returns
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return batch

    p = make_processor(model, item_timeout=0.2, max_batch_size=1, max_workers=2)
    stuck = p.enqueue_predict("hang")
    assert isinstance(stuck.exception(timeout=HANG), BatchTimeoutError)
    assert cancelled.wait(HANG)
    assert p.enqueue_predict("next").result(timeout=HANG) == "next"  # still serving
    # The cancelled call's worker is replaced, and it ends instead of running on.
    deadline = time.monotonic() + HANG
    while not (p.health()["checks"]["workers"]["status"] == "ok"
               and p.health()["checks"]["stuck_batches"]["value"] == 0):
        assert time.monotonic() < deadline, "the cancelled call never returned"
        time.sleep(0.005)


def test_stop_lets_calls_in_flight_finish_within_its_timeout(make_processor):
    async def model(batch):
        await asyncio.sleep(0)
        return batch

    p = make_processor(max_workers=2, max_batch_size=2)
    p.pause()
    futures = [p.enqueue_predict([i]) for i in range(10)]
    p.start(model)
    p.stop(timeout=HANG)  # resumes and drains
    assert [f.result(timeout=0) for f in futures] == [[i] for i in range(10)]


@pytest.mark.parametrize("timeout", [1e308, float("inf"), 10**400])
def test_stop_with_a_timeout_longer_than_a_thread_can_wait(make_processor, timeout):
    # The wait for the loop's thread must not overflow (and leave the processor running).
    async def model(batch):
        await asyncio.sleep(0)
        return batch

    p = make_processor(model)
    assert p.enqueue_predict([1]).result(timeout=HANG) == [1]
    p.stop(timeout=timeout)
    assert not p.running and not any(t.is_alive() for t in p._threads())


def test_stop_that_gives_up_fails_the_call_and_cancels_its_coroutine(make_processor):
    entered = threading.Event()
    cancelled = threading.Event()

    async def model(batch):
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return batch

    before = loop_threads()
    p = make_processor(model)
    future = p.enqueue_predict([1])
    assert entered.wait(HANG)
    started = time.monotonic()
    p.stop(timeout=0.1)
    assert time.monotonic() - started < 0.1 + 1.0  # the contract's bound, with a margin
    assert isinstance(future.exception(timeout=0), ProcessorStoppedError)
    assert cancelled.wait(HANG)
    for thread in p._threads():
        thread.join(HANG)
    assert loop_threads() == before


def test_stop_cancels_tasks_the_model_left_on_the_loop(make_processor):
    cancelled = threading.Event()

    async def background():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    tasks = []

    async def model(batch):
        tasks.append(asyncio.get_running_loop().create_task(background()))
        return batch

    p = make_processor(model)
    assert p.enqueue_predict([1]).result(timeout=HANG) == [1]
    p.stop(timeout=HANG)
    assert cancelled.is_set()


def test_requests_after_stop_are_refused_as_for_a_sync_model(make_processor):
    p = make_processor(async_double)
    p.stop()
    with pytest.raises(ProcessorStoppedError):
        p.enqueue_predict([1])


def test_stop_called_by_the_model_gives_up_at_once_on_the_calls_it_holds(make_processor):
    # stop() on the model's own loop holds that loop: no call in flight can end while it
    # waits, so it gives up at once instead of waiting out its timeout.
    other_running = threading.Event()
    returned = threading.Event()
    took = []

    async def model(batch):
        if batch == ["stop"]:
            await asyncio.to_thread(other_running.wait, HANG)
            started = time.monotonic()
            p.stop(timeout=HANG)
            took.append(time.monotonic() - started)
            returned.set()
            return batch
        other_running.set()
        await asyncio.sleep(HANG)  # held by the stop: never resumed before it returns
        return batch

    # FIXED: two calls at once from the start.
    p = make_processor(model, max_workers=2, max_batch_size=1, batch_timeout=0.0,
                       processing_strategy=BatchProcessingStrategy.FIXED)
    stopping = p.enqueue_predict("stop")
    other = p.enqueue_predict("other")
    for future in (stopping, other):
        with pytest.raises(ProcessorStoppedError):
            future.result(timeout=HANG)
    assert returned.wait(HANG)
    assert took[0] < HANG / 2

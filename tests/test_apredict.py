"""apredict: from a coroutine, wait for room in a full queue instead of being refused."""

import asyncio
import concurrent.futures
import threading
import time
from decimal import Decimal

import numpy as np
import pytest
from waiting import collected_holding
from waiting import wait_for as _wait_for

from batchproc import BatchPriority, ProcessorStoppedError, QueueFullError, QueueTimeoutError
from batchproc.aio import LoopChannel
from batchproc.backpressure import RoomWaiters


async def _until(predicate, what, timeout=10.0):
    """Let the loop run until ``predicate()`` holds (each pass yields to the loop)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


@pytest.mark.slow
def test_a_burst_of_50000_from_one_loop_completes(make_processor):
    processor = make_processor(lambda batch: batch * 2, max_queue_size=1000,
                               max_batch_size=128)
    n = 50_000

    async def main():
        refused = 0
        # The refusing path: everything past the queue's capacity is refused at once.
        processor.pause()
        accepted = []
        for i in range(2000):
            try:
                accepted.append(processor.enqueue_predict_async(np.array([[float(i)]])))
            except QueueFullError:
                refused += 1
        processor.resume()
        await asyncio.gather(*accepted)
        # The waiting path: all of them complete. Paused until the queue is full and the
        # rest wait in line for room (running, the workers could keep the queue from
        # filling, and the line would never form).
        processor.pause()
        gathered = asyncio.gather(
            *(processor.apredict(np.array([[float(i)]])) for i in range(n)))
        await _until(lambda: processor._room is not None and len(processor._room) == n - 1000,
                     "the rest in line for room")
        processor.resume()
        results = await gathered
        return refused, len(accepted), results

    refused, accepted, results = asyncio.run(main())
    assert (accepted, refused) == (1000, 1000)
    assert len(results) == n
    assert all(r[0, 0] == 2.0 * i for i, r in enumerate(results))
    stats = processor.get_stats()
    assert stats["total_processed"] == 1000 + n
    assert len(processor._room) == 0


def test_waiting_for_room_does_not_block_the_loop(make_processor):
    processor = make_processor(lambda batch: batch + 1, max_queue_size=2)
    processor.pause()

    # A wait for room that blocked the loop would be ended by this (not hang the test):
    # the checks below, made while it should still be paused, then fail.
    watchdog = threading.Timer(10, processor.resume)

    async def main():
        tasks = [asyncio.ensure_future(processor.apredict(np.array([[float(i)]])))
                 for i in range(5)]
        # This coroutine runs (the loop is free) while three of them wait for room.
        while len(processor._room_waiters()) < 3:
            assert not watchdog.finished.is_set(), "the loop was blocked"
            await asyncio.sleep(0)
        assert not watchdog.finished.is_set(), "the loop was blocked"
        assert len(processor._queue) == 2
        assert not any(t.done() for t in tasks)
        processor.resume()
        results = await asyncio.gather(*tasks)
        return [r.tolist() for r in results]

    watchdog.start()
    try:
        results = asyncio.run(main())
    finally:
        watchdog.cancel()
    assert results == [[[float(i + 1)]] for i in range(5)]


def test_timeout_bounds_the_wait_for_room(make_processor):
    processor = make_processor(lambda batch: batch, max_queue_size=1)
    processor.pause()

    async def main():
        first = asyncio.ensure_future(processor.apredict(np.array([[1.0]])))
        await _until(lambda: len(processor._queue) == 1, "the first request queued")
        with pytest.raises(QueueFullError, match=r"^queue full \(1 request\) for 0\.050 s$"):
            await processor.apredict(np.array([[2.0]]), timeout=0.05, max_queue_time=10)
        with pytest.raises(QueueFullError):  # 0: refuse at once, like the async path
            await processor.apredict(np.array([[3.0]]), timeout=0)
        assert len(processor._room_waiters()) == 0
        processor.resume()
        return await first

    assert asyncio.run(main()).tolist() == [[1.0]]
    assert processor.get_stats()["total_processed"] == 1


def test_cancelling_a_queued_request_withdraws_it_and_passes_its_room_on(
        make_processor, recorder):
    model = recorder()
    processor = make_processor(model, max_queue_size=1)
    processor.pause()

    async def main():
        queued = asyncio.ensure_future(processor.apredict(np.array([[1.0]])))
        await _until(lambda: len(processor._queue) == 1, "the first request queued")
        waiting = asyncio.ensure_future(processor.apredict(np.array([[2.0]])))
        await _until(lambda: len(processor._room_waiters()) == 1, "a waiter")
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        # Its place in the queue went to the waiter at once, while still paused.
        await _until(lambda: len(processor._room_waiters()) == 0, "the waiter woken")
        await _until(lambda: len(processor._queue) == 1, "the waiter queued")
        processor.resume()
        return await waiting

    assert asyncio.run(main()).tolist() == [[2.0]]
    assert [b.tolist() for b in model.batches] == [[[2.0]]]
    assert processor.get_stats()["total_cancelled"] == 1


def test_cancelling_a_task_waiting_for_room_leaves_the_line(make_processor, recorder):
    model = recorder()
    processor = make_processor(model, max_queue_size=1)
    processor.pause()

    async def main():
        first = asyncio.ensure_future(processor.apredict(np.array([[1.0]])))
        await _until(lambda: len(processor._queue) == 1, "the first request queued")
        doomed = asyncio.ensure_future(processor.apredict(np.array([[2.0]])))
        await _until(lambda: len(processor._room_waiters()) == 1, "a waiter")
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert len(processor._room_waiters()) == 0
        processor.resume()
        return await first

    assert asyncio.run(main()).tolist() == [[1.0]]
    assert [b.tolist() for b in model.batches] == [[[1.0]]]
    # Never accepted: it counts as refused, once (every request ends in one outcome).
    stats = processor.get_stats()
    assert (stats["total_accepted"], stats["total_rejected"], stats["total_cancelled"]) == (
        1, 1, 0)


@pytest.mark.parametrize("method", ["apredict", "amap"])
def test_max_queue_time_bounds_the_wait_for_room(make_processor, method):
    # It counts from the call, and a wait for room is time in the queue to the caller:
    # without a timeout, the wait still ends when it runs out.
    processor = make_processor(lambda batch: batch, max_queue_size=1)
    processor.pause()

    async def main():
        first = asyncio.ensure_future(processor.apredict(np.array([[1.0]])))
        await _until(lambda: len(processor._queue) == 1, "the first request queued")
        began = time.monotonic()
        if method == "apredict":
            call = processor.apredict(np.array([[2.0]]), max_queue_time=0.05)
        else:
            async def call_amap():
                return [y async for y in processor.amap([np.array([[2.0]])],
                                                        max_queue_time=0.05)]
            call = call_amap()
        with pytest.raises(QueueFullError, match=(
                r"^queue full \(1 request\) for 0\.0\d\d s: the request's max_queue_time "
                "ended its wait for room$")):
            await asyncio.wait_for(call, 10)  # bounded: before, it waited for ever
        waited = time.monotonic() - began
        assert len(processor._room_waiters()) == 0 and len(processor._queue) == 1
        processor.resume()
        return await first, waited

    result, waited = asyncio.run(main())
    assert result.tolist() == [[1.0]] and 0.04 <= waited < 5.0
    assert processor.get_stats()["total_rejected"] == 1


def test_cancelled_after_dispatch_the_result_is_dropped(make_processor):
    started, release = threading.Event(), threading.Event()

    def model(batch):
        started.set()
        release.wait(10)
        return batch

    processor = make_processor(model)

    async def main():
        task = asyncio.ensure_future(processor.apredict(np.array([[1.0]])))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        # The processor goes on serving; the dropped result hurt nobody.
        return await processor.apredict(np.array([[5.0]]))

    assert asyncio.run(main()).tolist() == [[5.0]]
    assert processor.get_stats()["total_processed"] == 2


def test_stop_refuses_the_coroutines_waiting_for_room(make_processor):
    processor = make_processor(lambda batch: batch, max_queue_size=1)
    processor.pause()

    async def main():
        queued = asyncio.ensure_future(processor.apredict(np.array([[1.0]])))
        await _until(lambda: len(processor._queue) == 1, "the first request queued")
        waiting = [asyncio.ensure_future(processor.apredict(np.array([[2.0]])))
                   for _ in range(3)]
        await _until(lambda: len(processor._room_waiters()) == 3, "three waiters")
        await asyncio.get_running_loop().run_in_executor(None, processor.stop)
        outcomes = await asyncio.gather(queued, *waiting, return_exceptions=True)
        with pytest.raises(ProcessorStoppedError):
            await processor.apredict(np.array([[3.0]]))
        return outcomes

    outcomes = asyncio.run(main())
    # stop() drains what was queued (it resumes a paused processor); waiters are refused.
    assert outcomes[0].tolist() == [[1.0]]
    assert all(isinstance(o, ProcessorStoppedError) for o in outcomes[1:])


def test_priority_is_kept(make_processor, recorder):
    model = recorder()
    processor = make_processor(model, enable_priority_queue=True, max_batch_size=1)
    processor.pause()

    async def main():
        low = asyncio.ensure_future(
            processor.apredict(np.array([[1.0]]), priority=BatchPriority.LOW))
        high = asyncio.ensure_future(
            processor.apredict(np.array([[2.0]]), priority=BatchPriority.HIGH))
        await _until(lambda: len(processor._queue) == 2, "both queued")
        processor.resume()
        await asyncio.gather(low, high)

    asyncio.run(main())
    assert [b.tolist() for b in model.batches] == [[[2.0]], [[1.0]]]


def test_room_handed_to_a_waiter_that_left_goes_to_the_next():
    async def main():
        loop = asyncio.get_running_loop()
        channel = LoopChannel(loop)
        room = RoomWaiters()
        a = room.wait(loop, channel, room.epoch, room.ticket())
        b = room.wait(loop, channel, room.epoch, room.ticket())
        assert len(room) == 2
        room.release(1)  # hands the room to a (posted to the loop, not yet run)
        assert len(room) == 1
        room.withdraw(a)  # a's task was cancelled meanwhile: b gets the room
        assert len(room) == 0
        await b.future
        # A wait registered after a release it did not see returns at once.
        assert room.wait(loop, channel, room.epoch - 1, room.ticket()) is None

    asyncio.run(main())


class _QueueRoom:
    """Stands in for the queue whose room a line reads (``RequestQueue.room``)."""

    room = 0


def test_room_a_release_counted_as_held_goes_on_once_its_waiter_has_pushed():
    """A release between a waiter's push and its settle counts that waiter as holding
    room it has taken; the settle hands out what that release could not."""
    async def main():
        loop = asyncio.get_running_loop()
        channel = LoopChannel(loop)
        queue = _QueueRoom()
        room = RoomWaiters(queue)
        a = room.wait(loop, channel, None, room.ticket())
        b = room.wait(loop, channel, None, room.ticket())
        queue.room = 1
        room.release(1)  # a is handed the room
        await a.future
        # a pushes (room 0), a worker pops (room 1) and releases before a settles.
        room.release(1)
        assert len(room) == 1  # b still waits: a counted as holding the room
        room.settle(a)
        assert len(room) == 0
        await b.future
        queue.room = 0  # b pushes
        room.settle(b)
        assert (room.ahead, len(room)) == (0, 0)

    asyncio.run(main())


class _CountingChannel(LoopChannel):
    """A channel that counts the looks at whether its loop runs."""

    def __init__(self, loop):
        super().__init__(loop)
        self.looks = 0

    def serving(self):
        self.looks += 1
        return super().serving()


def test_a_hand_out_looks_at_each_loop_not_at_each_claim():
    # A queue's worth of waiters handed room, and more waiting behind them (a burst of
    # apredict into a queue of 1,000): each settle looks once at the loop whether the
    # claims still hold, not once at each claim (which made a burst quadratic).
    claims, behind = 500, 100

    async def main():
        loop = asyncio.get_running_loop()
        channel = _CountingChannel(loop)
        queue = _QueueRoom()
        room = RoomWaiters(queue)
        waiters = [room.wait(loop, channel, None, room.ticket())
                   for _ in range(claims + behind)]
        queue.room = claims
        room.release(claims)
        assert (room._claimed, len(room)) == (claims, behind)
        channel.looks = 0
        for waiter in waiters[:claims]:
            queue.room -= 1  # it pushed
            room.settle(waiter)
        assert (room._claimed, len(room)) == (0, behind)
        assert channel.looks <= claims, channel.looks
        await asyncio.gather(*(w.future for w in waiters[:claims]))

    asyncio.run(main())


@pytest.mark.parametrize("from_config", [True, False])
def test_max_queue_time_expires_an_awaited_request_that_never_reaches_the_model(
        make_processor, from_config):
    seen = []

    def model(batch):
        seen.extend(batch[:, 0].tolist())
        return batch

    config = {"max_queue_time": 0.05} if from_config else {}
    processor = make_processor(model, **config)
    processor.pause()

    async def main():
        kwargs = {} if from_config else {"max_queue_time": 0.05}
        expiring = asyncio.ensure_future(processor.apredict(np.array([[1.0]]), **kwargs))
        with pytest.raises(QueueTimeoutError):
            await asyncio.wait_for(expiring, 10)
        processor.resume()
        # No limit for this one: it waits as long as it takes, then is processed.
        return await processor.apredict(np.array([[2.0]]), max_queue_time=None)

    assert asyncio.run(main())[0, 0] == 2.0
    assert seen == [2.0]
    assert processor.get_stats()["total_expired"] == 1


@pytest.mark.parametrize("timeout, error", [
    (float("nan"), ValueError), (-1, ValueError), ("1", TypeError), (True, TypeError)])
def test_a_bad_timeout_is_refused_before_anything_is_queued(make_processor, timeout, error):
    processor = make_processor(lambda batch: batch)
    processor.pause()

    async def main():
        with pytest.raises(error, match="timeout"):
            await processor.apredict(np.array([[1.0]]), timeout=timeout)

    asyncio.run(main())
    assert processor.get_stats()["queue_size"] == 0


@pytest.mark.parametrize(("timeout", "error"), [
    (float("nan"), ValueError), (np.float64("nan"), ValueError), (Decimal("NaN"), ValueError),
    (Decimal("sNaN"), ValueError), (-1, ValueError), (-0.5, ValueError),
    (np.float32(-1), ValueError), (-10**400, ValueError), ("1", TypeError), (b"1", TypeError),
    ([1], TypeError), (True, TypeError), (np.True_, TypeError)])
@pytest.mark.parametrize("stopped", [False, True])
def test_enqueue_predict_apredict_and_stop_refuse_a_bad_timeout_alike(make_processor,
                                                                      timeout, error,
                                                                      stopped):
    # The argument is checked first, whatever the processor's state: the same error for
    # the same value, from all three.
    processor = make_processor(lambda batch: batch)
    processor.pause()
    if stopped:
        processor.stop()
    x = np.array([[1.0]])
    with pytest.raises(error) as queued:
        processor.enqueue_predict(x, timeout=timeout)

    async def main():
        with pytest.raises(error) as awaited:
            await processor.apredict(x, timeout=timeout)
        return awaited

    awaited = asyncio.run(main())
    with pytest.raises(error) as stopping:
        processor.stop(timeout=timeout)
    errors = {str(e.value) for e in (queued, awaited, stopping)}
    assert len(errors) == 1, errors
    assert len(errors.pop()) < 100  # the value cut short, not 400 digits
    assert processor.get_stats()["queue_size"] == 0
    assert processor.running is not stopped


def test_a_retried_request_keeps_its_priority(make_processor):
    """A request retried after a failure is parked with the priority it was sent with, so
    its retry goes before older requests of a lower level."""
    failed_once = threading.Event()
    order = []

    def model(batch):
        values = batch[:, 0].tolist()
        if 9.0 in values and not failed_once.is_set():
            processor.pause()  # the older NORMAL requests stay queued meanwhile
            failed_once.set()
            raise RuntimeError("transient")
        order.extend(values)
        return batch

    processor = make_processor(model, enable_priority_queue=True, max_retries=1,
                               retry_delay=0.001, max_batch_size=1, max_workers=1)
    processor.pause()

    async def main():
        normal = [processor.enqueue_predict_async(np.array([[float(i)]])) for i in range(5)]
        critical = asyncio.ensure_future(
            processor.apredict(np.array([[9.0]]), priority=BatchPriority.CRITICAL))
        await _until(lambda: processor.get_stats()["queue_size"] == 6, "all queued")
        processor.resume()
        await _until(failed_once.is_set, "the first failure")
        # Parked for its retry (len counts parked requests): set in the model before it
        # raised, the event alone says nothing of the worker's failure path. The retry's
        # backoff (1 ms) then passes while paused: it is due.
        await _until(lambda: len(processor._queue) == 6, "the retry parked")
        parked_at = time.monotonic()
        await _until(lambda: time.monotonic() > parked_at + 0.05, "the backoff")
        processor.resume()
        await asyncio.gather(critical, *normal)

    asyncio.run(main())
    assert order == [9.0, 0.0, 1.0, 2.0, 3.0, 4.0]


def test_waiters_who_lose_their_room_wait_again_in_their_order(make_processor):
    seen = []

    def model(batch):
        seen.extend(int(v) for v in batch[:, 0])
        return batch

    processor = make_processor(model, max_queue_size=3, max_batch_size=3, max_workers=1)
    processor.pause()

    async def main():
        fillers = [processor.enqueue_predict(np.array([[100.0 + i]])) for i in range(3)]
        waiters = []
        for i in range(1, 6):  # W1..W5 wait for room, in this order
            waiters.append(asyncio.ensure_future(processor.apredict(np.array([[float(i)]]))))
            await _until(lambda i=i: len(processor._room or ()) == i, f"waiter {i} in line")
        room = processor._room
        epoch = room.epoch
        # Holding the loop: the worker pops the three fillers, which hands W1..W3 the
        # room; before they can run, three requests from this thread take it.
        processor.resume()
        _wait_for(lambda: room.epoch != epoch, "the fillers popped")
        # Their batch done before the pause: a batch popped as a pause begins is held
        # until resume().
        for future in fillers:
            future.result(10)
        processor.pause()
        takers = [processor.enqueue_predict(np.array([[200.0 + i]]), timeout=0)
                  for i in range(3)]
        await _until(lambda: len(room) == 5, "W1..W3 back in line")
        seen.clear()
        processor.resume()
        await asyncio.gather(*waiters)
        for future in takers:
            future.result(10)

    asyncio.run(main())
    assert [v for v in seen if v < 100] == [1, 2, 3, 4, 5]


def _seeing(seen, answer=lambda batch: batch):
    """A model that records the first column of every row it is called with, in order."""

    def model(batch):
        seen.extend(int(v) for v in batch[:, 0])
        return answer(batch)

    return model


def _item(value):
    return np.array([[float(value)]])


def test_a_newcomer_does_not_take_the_room_handed_to_the_waiters_before_it(make_processor):
    seen = []
    processor = make_processor(_seeing(seen), max_queue_size=3, max_batch_size=3,
                               max_workers=1)
    processor.pause()

    async def main():
        fillers = [processor.enqueue_predict_async(_item(100 + i)) for i in range(3)]
        waiters = []
        for i in range(1, 4):  # W1..W3 wait for room, in this order
            waiters.append(asyncio.ensure_future(processor.apredict(_item(i))))
            await _until(lambda i=i: len(processor._room or ()) == i, f"waiter {i} in line")
        room = processor._room
        # Holding the loop: the worker pops the fillers, which hands W1..W3 the room.
        processor.resume()
        _wait_for(lambda: len(room) == 0, "W1..W3 handed the room")
        processor.pause()
        # A newcomer arrives before W1..W3 have run to push: it goes behind them.
        newcomer = asyncio.ensure_future(processor.apredict(_item(4)))
        await _until(lambda: len(processor._queue) == 3 and len(room) == 1,
                     "three queued, one waiting")
        processor.resume()
        return await asyncio.gather(*waiters, newcomer, *fillers)

    results = asyncio.run(main())
    assert [r[0, 0] for r in results] == [1, 2, 3, 4, 100, 101, 102]
    assert [v for v in seen if v < 100] == [1, 2, 3, 4]


def test_under_sustained_overload_requests_reach_the_model_in_arrival_order(make_processor):
    """Callers keep arriving while the queue is full: after every batch, some arrive
    before the waiters it handed room to have run. Each is served after everyone who
    came before it, and gets its own result."""
    seen, calls, gate = [], [], threading.Semaphore(0)

    def model(batch):
        calls.append(len(batch))
        seen.extend(int(v) for v in batch[:, 0])
        gate.acquire()  # one batch at a time, when the test says
        return batch * 2

    processor = make_processor(model, max_queue_size=8, max_batch_size=4, max_workers=1)
    processor.pause()
    tasks = []

    def arrive(count):
        for _ in range(count):
            tasks.append(asyncio.ensure_future(processor.apredict(_item(len(tasks)))))

    async def settled():
        # Everyone who arrived is in the model, the queue or the line: no waiter handed
        # room is still on its way to push.
        await _until(lambda: len(seen) + len(processor._queue) + len(processor._room or ())
                     == len(tasks), "arrivals settled")

    async def main():
        arrive(12)  # a full queue and four waiting
        await settled()
        processor.resume()
        for _ in range(40):
            arrive(2)
            await settled()
            before = len(calls)
            gate.release()
            # Holding the loop: the worker pops the next batch, handing its room to the
            # oldest waiters, and calls the model with it; then three more arrive.
            _wait_for(lambda before=before: len(calls) > before, "the next batch")
            arrive(3)
            await settled()
        gate.release(10_000)
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert len(results) == 12 + 40 * 5
    assert [r[0, 0] for r in results] == [2.0 * i for i in range(len(results))]
    assert seen == list(range(len(results)))
    assert len(processor._room) == 0


@pytest.mark.parametrize("how", ["cancelled while handed room", "cancelled while waiting",
                                 "timed out while waiting"])
def test_a_newcomer_behind_waiters_who_leave_the_line_still_gets_in(make_processor, how):
    seen = []
    processor = make_processor(_seeing(seen), max_queue_size=1, max_workers=1)
    processor.pause()

    async def main():
        first = asyncio.ensure_future(processor.apredict(_item(0)))
        await _until(lambda: len(processor._queue) == 1, "the first request queued")
        timeout = 0.05 if how == "timed out while waiting" else None
        leaving = asyncio.ensure_future(processor.apredict(_item(9), timeout=timeout))
        await _until(lambda: len(processor._room or ()) == 1, "a waiter")
        room = processor._room
        n1 = asyncio.ensure_future(processor.apredict(_item(1)))
        await _until(lambda: len(room) == 2, "the first newcomer behind it")
        if how == "cancelled while handed room":
            # Holding the loop: the first request is popped, its room handed to the
            # waiter, which is cancelled before it runs; a second newcomer arrives.
            processor.resume()
            _wait_for(lambda: len(room) == 1, "the waiter handed the room")
            processor.pause()
            n2 = asyncio.ensure_future(processor.apredict(_item(2)))
            leaving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaving
        else:
            if how == "cancelled while waiting":
                leaving.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await leaving
            else:
                with pytest.raises(QueueFullError):
                    await leaving
            assert len(room) == 1
            processor.resume()
            _wait_for(lambda: len(room) == 0, "the first newcomer handed the room")
            processor.pause()
            n2 = asyncio.ensure_future(processor.apredict(_item(2)))
        await _until(lambda: len(processor._queue) == 1 and len(room) == 1,
                     "one queued, one waiting")
        processor.resume()
        return await asyncio.gather(first, n1, n2)

    results = asyncio.run(main())
    assert [r[0, 0] for r in results] == [0, 1, 2]
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("path", ["apredict cancelled", "future cancelled",
                                  "amap cancelled", "max_queue_time"])
def test_room_freed_in_the_queue_goes_to_the_waiter_not_to_a_newcomer(make_processor, path):
    """Each way a queued request leaves the queue other than a pop hands its room to the
    waiter, and a newcomer arriving before that waiter has run waits behind it."""
    seen = []
    processor = make_processor(_seeing(seen), max_queue_size=1, max_workers=1)
    processor.pause()

    async def main():
        if path == "apredict cancelled":
            occupant = asyncio.ensure_future(processor.apredict(_item(0)))
        elif path == "amap cancelled":
            results = processor.amap([_item(0)])
            occupant = asyncio.ensure_future(results.__anext__())
        elif path == "future cancelled":
            occupant = processor.enqueue_predict(_item(0))
        else:
            occupant = processor.enqueue_predict(_item(0), max_queue_time=0.05)
        await _until(lambda: len(processor._queue) == 1, "the occupant queued")
        waiter = asyncio.ensure_future(processor.apredict(_item(1)))
        await _until(lambda: len(processor._room or ()) == 1, "a waiter")
        room = processor._room
        # Holding the loop from here until the newcomer arrives: the waiter is handed
        # the room but cannot run to push.
        if path == "max_queue_time":
            _wait_for(occupant.done, "the occupant expired")
        else:
            occupant.cancel()
        assert len(processor._queue) == 0
        assert len(room) == 0  # the waiter was handed the room
        newcomer = asyncio.ensure_future(processor.apredict(_item(2)))
        await _until(lambda: len(processor._queue) == 1 and len(room) == 1,
                     "one queued, one waiting")
        processor.resume()
        return await asyncio.gather(waiter, newcomer)

    results = asyncio.run(main())
    assert [r[0, 0] for r in results] == [1, 2]
    assert seen == [1, 2]


def test_room_to_spare_goes_down_the_line_without_another_release(make_processor):
    """A pop frees more room than there are waiters; a newcomer arriving before they
    have run waits behind them, and takes the room left over at once (paused: nothing
    else will free room)."""
    seen = []
    processor = make_processor(_seeing(seen), max_queue_size=4, max_batch_size=4,
                               max_workers=1)
    processor.pause()

    async def main():
        fillers = [processor.enqueue_predict_async(_item(100 + i)) for i in range(4)]
        waiter = asyncio.ensure_future(processor.apredict(_item(1)))
        await _until(lambda: len(processor._room or ()) == 1, "a waiter")
        room = processor._room
        processor.resume()
        _wait_for(lambda: len(room) == 0, "the waiter handed room")
        processor.pause()
        newcomer = asyncio.ensure_future(processor.apredict(_item(2)))
        await _until(lambda: len(processor._queue) == 2, "both queued, still paused")
        processor.resume()
        return await asyncio.gather(waiter, newcomer, *fillers)

    results = asyncio.run(main())
    assert [r[0, 0] for r in results] == [1, 2, 100, 101, 102, 103]
    assert seen == [100, 101, 102, 103, 1, 2]


def test_stop_refuses_a_newcomer_waiting_behind_a_waiter_handed_room(make_processor):
    seen = []
    processor = make_processor(_seeing(seen), max_queue_size=1, max_workers=1)
    processor.pause()

    async def main():
        occupant = processor.enqueue_predict(_item(0))
        waiter = asyncio.ensure_future(processor.apredict(_item(1)))
        await _until(lambda: len(processor._room or ()) == 1, "a waiter")
        room = processor._room
        processor.resume()
        _wait_for(lambda: len(room) == 0, "the waiter handed the room")
        processor.pause()
        newcomer = asyncio.ensure_future(processor.apredict(_item(2)))
        await _until(lambda: len(processor._queue) == 1 and len(room) == 1,
                     "one queued, one waiting")
        await asyncio.get_running_loop().run_in_executor(None, processor.stop)
        outcomes = await asyncio.gather(waiter, newcomer, return_exceptions=True)
        return occupant.result(10), outcomes

    occupant, (queued, refused) = asyncio.run(main())
    # stop() drains what was queued; the newcomer, still in line, is refused.
    assert isinstance(refused, ProcessorStoppedError)
    assert (occupant[0, 0], queued[0, 0]) == (0, 1)
    assert seen == [0, 1]


def test_a_zero_timeout_does_not_jump_the_line(make_processor):
    processor = make_processor(lambda batch: batch, max_queue_size=1, max_workers=1)
    processor.pause()

    async def main():
        occupant = processor.enqueue_predict(_item(0))
        waiter = asyncio.ensure_future(processor.apredict(_item(1)))
        await _until(lambda: len(processor._room or ()) == 1, "a waiter")
        occupant.cancel()  # its room goes to the waiter, which has not run yet
        with pytest.raises(QueueFullError):
            await asyncio.wait_for(processor.apredict(_item(2), timeout=0), 10)
        processor.resume()
        return await waiter

    assert asyncio.run(main())[0, 0] == 1
    assert processor.get_stats()["total_rejected"] == 1


@pytest.mark.parametrize("closed", [True, False], ids=["loop closed", "loop stopped"])
def test_room_is_not_lost_to_a_waiter_whose_loop_is_gone(make_processor, closed):
    processor = make_processor(lambda batch: batch, max_queue_size=1, max_batch_size=1,
                               max_workers=1)
    processor.pause()
    filler = processor.enqueue_predict(np.array([[0.0]]))
    left = []  # the stopped loop, closed at the end
    # Its task is kept, as asyncio's docs advise: collected, it would leave the line.
    kept = []

    def a_loop_that_goes_away():
        loop = asyncio.new_event_loop()
        kept.append(loop.create_task(processor.apredict(np.array([[1.0]]))))

        async def until_in_line():
            await _until(lambda: len(processor._room or ()) == 1, "the first waiter")

        loop.run_until_complete(until_in_line())
        if closed:
            loop.close()
        else:
            left.append(loop)  # the thread ends with its loop stopped, never closed

    thread = threading.Thread(target=a_loop_that_goes_away)
    thread.start()
    thread.join()

    async def main():
        healthy = asyncio.ensure_future(processor.apredict(np.array([[7.0]]), timeout=10))
        await _until(lambda: len(processor._room) == 2, "the healthy waiter in line")
        processor.resume()
        filler.result(10)
        started = time.monotonic()
        result = await healthy
        return result, time.monotonic() - started

    try:
        result, waited = asyncio.run(main())
    finally:
        for loop in left:
            loop.close()
    assert result.tolist() == [[7.0]]
    assert waited < 5.0  # not its timeout: the room freed by the filler was its own


@pytest.mark.parametrize("closed", [True, False], ids=["loop closed", "loop stopped"])
@pytest.mark.parametrize("healthy_in_line", ["behind", "after", "after, not waiting"],
                         ids=["healthy waiting behind it", "healthy coming after",
                              "healthy coming after with timeout 0"])
def test_room_handed_to_a_waiter_whose_loop_then_stops_goes_on(make_processor, closed,
                                                               healthy_in_line):
    # The room reaches waiter A while its loop runs (busy in a callback); the loop stops
    # before A's wake runs, so A never takes it. A healthy waiter behind A, or one arriving
    # later, must still get it, while the only worker is held in a call (so no pop ends
    # to report room: only the supervisor's look at the claims can find it); with nobody
    # waiting, that look takes the claim back too, or every caller that cannot wait would
    # be refused behind it for good.
    in_call, gate = threading.Event(), threading.Event()

    def model(batch):
        if batch[0, 0] == 0.0:
            in_call.set()
            assert gate.wait(10)
        return batch

    processor = make_processor(model, max_queue_size=1, max_batch_size=1, max_workers=1)
    processor.pause()
    filler = processor.enqueue_predict(np.array([[0.0]]))
    loop_a = asyncio.new_event_loop()
    holding, let_go = threading.Event(), threading.Event()
    kept = []  # A's task, kept as asyncio's docs advise (collected, it would leave the line)

    def hold_then_stop():
        holding.set()
        let_go.wait(10)
        loop_a.stop()

    def run_a():
        kept.append(loop_a.create_task(processor.apredict(np.array([[1.0]]))))
        loop_a.run_forever()

    thread_a = threading.Thread(target=run_a)
    thread_a.start()
    _wait_for(lambda: len(processor._room or ()) == 1, "waiter A in line")
    loop_a.call_soon_threadsafe(hold_then_stop)
    assert holding.wait(10)

    async def main():
        healthy = None
        if healthy_in_line == "behind":
            healthy = asyncio.ensure_future(processor.apredict(np.array([[7.0]]), timeout=10))
            await _until(lambda: len(processor._room) == 2, "the healthy waiter behind A")
        processor.resume()
        await asyncio.to_thread(in_call.wait, 10)  # the filler's pop handed its room to A
        assert processor._room._claimed == 1
        let_go.set()
        await asyncio.to_thread(thread_a.join, 10)
        assert not loop_a.is_running()
        if closed:
            loop_a.close()
        if healthy_in_line == "after, not waiting":
            await _until(lambda: processor._room.ahead == 0, "A's claim taken back")
            healthy = asyncio.ensure_future(processor.apredict(np.array([[7.0]]), timeout=0))
        elif healthy is None:
            healthy = asyncio.ensure_future(processor.apredict(np.array([[7.0]]), timeout=10))
        await _until(lambda: len(processor._queue) == 1, "the healthy request queued", 5.0)
        gate.set()
        return await healthy

    try:
        result = asyncio.run(main())
    finally:
        let_go.set()
        gate.set()
        thread_a.join(10)
        loop_a.close()
    assert result.tolist() == [[7.0]]
    assert filler.result(10).tolist() == [[0.0]]
    assert processor.get_stats()["total_rejected"] == 0


def test_an_event_loop_is_not_kept_alive_by_the_processor(make_processor):
    import gc
    import weakref

    processor = make_processor(lambda batch: batch)
    loops = []

    async def one_call():
        loops.append(weakref.ref(asyncio.get_running_loop()))
        await processor.enqueue_predict_async(np.array([[1.0]]))
        await processor.apredict(np.array([[2.0]]))

    for _ in range(3):
        asyncio.run(one_call())

    def freed():
        gc.collect()
        return [ref() for ref in loops] == [None, None, None]

    # The worker that posted a loop its last result holds that loop until it is back
    # from posting, which may be after the loop has run and closed.
    _wait_for(freed, "the loops freed")
    assert len(processor._channels) == 0


def test_a_loop_closed_before_its_results_were_flushed_is_not_kept(make_processor):
    # The result reaches a loop that stopped (its flush scheduled, never run); the loop
    # is then closed. What waited for that flush held the loop, as the value of the
    # loop's own weak key in the processor's channels: the supervisor drops it.
    import gc
    import weakref

    processor = make_processor(lambda batch: batch)
    loop = asyncio.new_event_loop()

    async def submit():
        return processor.enqueue_predict_async(np.ones((4, 4)))  # never awaited

    future = loop.run_until_complete(submit())  # the loop stops; the result comes later
    _wait_for(lambda: processor.get_stats()["total_processed"] == 1, "the result posted")
    loop.close()
    ref = weakref.ref(loop)
    del loop, future

    def freed():
        gc.collect()
        return ref() is None

    _wait_for(freed, "the closed loop freed")
    assert len(processor._channels) == 0


@pytest.mark.parametrize("raised", [asyncio.CancelledError, StopIteration])
def test_a_model_raising_what_asyncio_reads_as_control_flow_fails_the_call_plainly(
        make_processor, raised):
    def model(batch):
        raise raised()

    # Retried as any exception is, without the default backoff's seconds.
    processor = make_processor(model, retry_delay=0.001)

    async def main():
        task = asyncio.ensure_future(processor.apredict(np.array([[1.0]])))
        with pytest.raises(RuntimeError, match="process_func raised") as info:
            await task
        assert not task.cancelled()  # the caller was not cancelled: the model failed
        return info.value

    error = asyncio.run(main())
    assert isinstance(error.__cause__, raised)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync model", "async model"])
@pytest.mark.parametrize("raised", [asyncio.CancelledError, concurrent.futures.CancelledError],
                         ids=["asyncio", "concurrent.futures"])
def test_a_model_raising_a_cancelled_error_fails_a_thread_caller_plainly(
        make_processor, raised, asynchronous):
    # Not only for awaiting callers: a thread's result() raising CancelledError reads as
    # its own future cancelled (``except CancelledError``), and through asyncio.to_thread
    # it cancels the task awaiting it, which nobody cancelled.
    def model(batch):
        raise raised()

    async def async_model(batch):
        raise raised()

    processor = make_processor(async_model if asynchronous else model, max_retries=0)
    future = processor.enqueue_predict(np.array([[1.0]]))
    with pytest.raises(RuntimeError, match="process_func raised") as info:
        future.result(timeout=10)
    assert isinstance(info.value.__cause__, raised) and not future.cancelled()

    async def handler():
        return await asyncio.to_thread(processor.enqueue_predict(np.array([[2.0]])).result, 10)

    async def main():
        task = asyncio.ensure_future(handler())
        with pytest.raises(RuntimeError, match="process_func raised"):
            await task
        assert not task.cancelled()

    asyncio.run(main())


@pytest.mark.parametrize("raised", [StopIteration, StopAsyncIteration])
def test_a_model_raising_an_iteration_end_never_ends_the_callers_iteration(
        make_processor, raised):
    # Raised as itself from result(), a model's StopIteration would end the iteration the
    # call is made in (the builtin map() below would stop after the first result,
    # silently): it comes as a RuntimeError, as awaiting callers get it.
    def model(batch):
        if (batch == -1).any():
            raise raised("the model's own")
        return batch

    processor = make_processor(model, max_retries=0)
    items = [np.array([[1.0]]), np.array([[-1.0]]), np.array([[2.0]])]
    with pytest.raises(RuntimeError, match="process_func raised") as info:
        list(map(lambda x: processor.enqueue_predict(x).result(timeout=10), items))
    assert isinstance(info.value.__cause__, raised)


@pytest.mark.parametrize("held", ["the line's", "the counts'"])
def test_a_waiter_of_a_closed_loop_collected_in_a_cycle_leaves_without_taking_a_lock(
        make_processor, held):
    # A task waiting for room whose loop is closed under it, and which nobody keeps: its
    # coroutine, in a cycle with its waiter's future, is closed by a garbage collection.
    # A collection starts at any allocation, on any thread, maybe one holding the lock of
    # the line the coroutine leaves, or the processor's counts' lock (it counts as
    # refused): it must not take either there.
    import gc

    processor = make_processor(lambda batch: batch, max_queue_size=1, max_batch_size=1,
                               max_workers=1,
                               enable_memory_optimization=False)  # no collection of its own
    processor.pause()
    filler = processor.enqueue_predict(np.array([[0.0]]))
    loop = asyncio.new_event_loop()
    task = loop.create_task(processor.apredict(np.array([[1.0]])))

    async def until_in_line():
        await _until(lambda: len(processor._room or ()) == 1, "the waiter")

    loop.run_until_complete(until_in_line())
    loop.close()  # the task still waits
    line = processor._room
    gc.disable()  # the collection below is the one that finds the coroutine
    try:
        del task
        processor.resume()  # the filler's room reaches the line: the waiter leaves it
        assert filler.result(10).tolist() == [[0.0]]
        _wait_for(lambda: not line._line, "the waiter out of the line")
        lock = line._lock if held == "the line's" else processor._counts_lock
        assert collected_holding(lock), "the collection deadlocked in the coroutine's close"
    finally:
        gc.enable()
    # The line goes on serving, its count of waiters right.
    _wait_for(lambda: line.ahead == 0, "the closed coroutine's place given up")
    _wait_for(lambda: processor.get_stats()["total_rejected"] == 1, "it counted as refused")
    result = asyncio.run(processor.apredict(np.array([[2.0]]), timeout=5))
    assert result.tolist() == [[2.0]]

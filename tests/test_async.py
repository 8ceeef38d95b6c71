"""enqueue_predict_async: results on the caller's event loop, a batch at a time."""

import asyncio
import threading

import numpy as np
import pytest
from waiting import wait_for as _wait_for

from batchproc import BatchProcessingStrategy, ProcessorStoppedError, QueueFullError


def test_many_coroutines_each_get_exactly_their_result(make_processor):
    processor = make_processor(lambda batch: batch * 2)

    async def client(i):
        out = []
        for k in range(20):
            value = float(i * 1000 + k)
            result = await processor.enqueue_predict_async(np.array([[value, -value]]))
            out.append(result.tolist() == [[2 * value, -2 * value]])
        return out

    async def main():
        return await asyncio.gather(*(client(i) for i in range(32)))

    results = asyncio.run(main())
    assert all(all(r) for r in results)
    assert processor.get_stats()["total_processed"] == 32 * 20


def test_a_failing_item_fails_only_its_own_awaiter(make_processor):
    def model(batch):
        if (batch < 0).any():
            raise ValueError("negative input")
        return batch

    processor = make_processor(model, max_retries=0)
    processor.pause()

    async def main():
        good = processor.enqueue_predict_async(np.array([[1.0]]))
        bad = processor.enqueue_predict_async(np.array([[-1.0]]))
        processor.resume()
        return await asyncio.gather(good, bad, return_exceptions=True)

    good, bad = asyncio.run(main())
    assert good.tolist() == [[1.0]]
    assert isinstance(bad, ValueError)


def test_results_of_a_batch_reach_the_loop_in_one_wake_up(make_processor):
    seen = []
    processor = make_processor(lambda batch: seen.append(len(batch)) or batch,
                               processing_strategy=BatchProcessingStrategy.FIXED,
                               initial_batch_size=10, batch_timeout=5.0)
    processor.pause()

    async def main():
        loop = asyncio.get_running_loop()
        wakes = []
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            wakes.append(callback)
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting
        futures = [processor.enqueue_predict_async(np.array([[float(i)]])) for i in range(10)]
        channel = processor._intake.last_channel
        processor.resume()
        # Hold the loop (so no flush can run) until the worker has posted all ten.
        _wait_for(lambda: len(channel._pending) == 10, "ten posted results")
        assert len(wakes) == 1
        results = await asyncio.gather(*futures)
        return [r.tolist() for r in results], len(wakes)

    results, wakes = asyncio.run(main())
    assert seen == [10]
    assert results == [[[float(i)]] for i in range(10)]
    assert wakes == 1


def test_a_request_cancelled_before_dispatch_is_never_processed(make_processor, recorder):
    model = recorder()
    processor = make_processor(model)
    processor.pause()

    async def main():
        doomed = asyncio.ensure_future(processor.enqueue_predict_async(np.array([[7.0]])))
        kept = processor.enqueue_predict_async(np.array([[8.0]]))
        await asyncio.sleep(0)
        doomed.cancel()
        processor.resume()
        result = await kept
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return result

    assert asyncio.run(main()).tolist() == [[8.0]]
    assert [b.tolist() for b in model.batches] == [[[8.0]]]
    assert processor.get_stats()["total_cancelled"] == 1


async def _awaiting(awaitable):
    """A task already waiting on ``awaitable`` (its first step has run)."""
    async def wait():
        return await awaitable

    task = asyncio.ensure_future(wait())
    await asyncio.sleep(0)
    return task


async def _via_enqueue_predict(processor, item):
    return processor.enqueue_predict(item)


async def _via_async_future(processor, item):
    return processor.enqueue_predict_async(item)


async def _via_task_on_async_future(processor, item):
    return await _awaiting(processor.enqueue_predict_async(item))


async def _via_apredict_task(processor, item):
    return await _awaiting(processor.apredict(item))


@pytest.mark.parametrize("submit", [_via_enqueue_predict, _via_async_future,
                                    _via_task_on_async_future, _via_apredict_task])
def test_cancelling_from_any_path_takes_the_request_out_of_the_queue_at_once(
        make_processor, recorder, submit):
    model = recorder()
    processor = make_processor(model)
    processor.pause()

    async def main():
        doomed = await submit(processor, np.array([[7.0]]))
        kept = processor.enqueue_predict_async(np.array([[8.0]]))
        assert processor.get_stats()["queue_size"] == 2
        assert doomed.cancel()
        # No await since: the queue and the count changed inside cancel().
        stats = processor.get_stats()
        assert (stats["queue_size"], stats["total_cancelled"]) == (1, 1)
        processor.resume()
        return await kept

    assert asyncio.run(main()).tolist() == [[8.0]]
    assert [b.tolist() for b in model.batches] == [[[8.0]]]
    stats = processor.get_stats()
    assert (stats["total_cancelled"], stats["total_processed"]) == (1, 1)


def test_cancelling_after_dispatch_drops_the_result_and_counts_no_cancellation(
        make_processor):
    started, release = threading.Event(), threading.Event()

    def model(batch):
        started.set()
        assert release.wait(10)
        return batch

    processor = make_processor(model)

    async def main():
        future = processor.enqueue_predict_async(np.array([[1.0]]))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        assert future.cancel()  # an asyncio future can always be cancelled
        release.set()
        await asyncio.get_running_loop().run_in_executor(
            None, _wait_for, lambda: processor.get_stats()["total_processed"] == 1,
            "the batch delivered")

    asyncio.run(main())
    assert processor.get_stats()["total_cancelled"] == 0


def test_stop_fails_queued_async_requests(make_processor):
    processor = make_processor()  # never started: the request stays queued

    async def main():
        future = processor.enqueue_predict_async(np.array([[1.0]]))
        await asyncio.get_running_loop().run_in_executor(None, processor.stop)
        with pytest.raises(ProcessorStoppedError):
            await future
        with pytest.raises(ProcessorStoppedError):
            processor.enqueue_predict_async(np.array([[1.0]]))

    asyncio.run(main())


def test_a_full_queue_refuses_at_once_instead_of_blocking_the_loop(make_processor):
    processor = make_processor(lambda batch: batch, max_queue_size=1)
    processor.pause()

    async def main():
        first = processor.enqueue_predict_async(np.array([[1.0]]))
        with pytest.raises(QueueFullError):
            processor.enqueue_predict_async(np.array([[2.0]]))
        processor.resume()
        return await first

    assert asyncio.run(main()).tolist() == [[1.0]]


def test_without_a_running_loop_it_says_so(make_processor):
    processor = make_processor(lambda batch: batch)
    with pytest.raises(RuntimeError, match="needs a running event loop: await it in a "
                       "coroutine; from a thread, call enqueue_predict"):
        processor.enqueue_predict_async(np.array([[1.0]]))
    assert processor.get_stats()["total_accepted"] == 0


def test_loops_in_several_threads_share_one_processor(make_processor):
    processor = make_processor(lambda batch: batch + 1)
    outcomes = {}

    def thread_main(tag):
        async def main():
            futures = [processor.enqueue_predict_async(np.array([[float(tag * 100 + k)]]))
                       for k in range(50)]
            return [r.item() for r in await asyncio.gather(*futures)]

        outcomes[tag] = asyncio.run(main())

    threads = [threading.Thread(target=thread_main, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert {t: outcomes[t] for t in range(4)} == {
        t: [float(t * 100 + k + 1) for k in range(50)] for t in range(4)}


def test_a_closed_loop_does_not_break_the_worker(make_processor):
    processor = make_processor(lambda batch: batch)
    processor.pause()
    loop = asyncio.new_event_loop()

    async def enqueue_only():
        return processor.enqueue_predict_async(np.array([[1.0]]))

    orphan = loop.run_until_complete(enqueue_only())
    loop.close()
    processor.resume()
    _wait_for(lambda: processor.get_stats()["total_processed"] == 1, "the orphan processed")
    assert not orphan.done()  # its loop is gone: nobody could ever await it
    # The worker that posted into the closed loop goes on serving.
    assert processor.enqueue_predict(np.array([[2.0]])).result(timeout=10).tolist() == [[2.0]]


def test_one_batch_mixing_loops_and_threads_hands_each_caller_its_own_result(
        make_processor):
    # Requests of two event loops (each in its own thread) and of a plain thread, queued
    # alternately so one batch holds runs of each: every caller gets its own row.
    seen = []
    processor = make_processor(lambda batch: seen.append(len(batch)) or batch * 10,
                               processing_strategy=BatchProcessingStrategy.FIXED,
                               initial_batch_size=12, batch_timeout=5.0)
    processor.pause()
    loops = [asyncio.new_event_loop() for _ in range(2)]
    runners = [threading.Thread(target=loop.run_forever) for loop in loops]
    for t in runners:
        t.start()
    try:
        async def enqueue(value):
            return processor.enqueue_predict_async(np.array([[value]]))

        futures = []
        for k in range(12):
            if k % 3 == 2:
                futures.append(processor.enqueue_predict(np.array([[float(k)]])))
            else:
                loop = loops[k % 3]
                queued = asyncio.run_coroutine_threadsafe(enqueue(float(k)), loop).result(10)
                futures.append(asyncio.run_coroutine_threadsafe(_await(queued), loop))
        processor.resume()
        results = [f.result(10).item() for f in futures]
    finally:
        for loop in loops:
            loop.call_soon_threadsafe(loop.stop)
        for t in runners:
            t.join(10)
        for loop in loops:
            loop.close()
    assert seen == [12]
    assert results == [10.0 * k for k in range(12)]


async def _await(future):
    return await future


class _RecordingChannel:
    def __init__(self):
        self.posts = []

    def post_many(self, items):
        self.posts.append(list(items))


def test_the_batch_loops_start_and_complete_async_requests_one_post_per_run():
    from batchproc._native.future_state import AsyncRequest, Request, finish_all, start_all
    from batchproc.futures import RequestFuture

    loop = asyncio.new_event_loop()
    try:
        first, second = _RecordingChannel(), _RecordingChannel()
        futures = [loop.create_future() for _ in range(5)]
        futures[1].cancel()  # its awaiter gave up before the batch started
        stand_ins = [AsyncRequest(futures[0], first), AsyncRequest(futures[1], first),
                     AsyncRequest(futures[2], first), AsyncRequest(futures[3], second),
                     AsyncRequest(futures[4], first)]
        plain = RequestFuture()
        requests = [Request(f, None, None, 1, 0, 0, 0.0) for f in [*stand_ins, plain]]

        live = start_all(requests)
        assert [r.future for r in live] == [*stand_ins[:1], *stand_ins[2:], plain]
        assert [s.done() for s in stand_ins] == [False, True, False, False, False]

        assert finish_all(live, ["a", "c", "d", "e", "p"]) == 0
        # Runs of one channel go in one post each; the loop completes them later.
        assert first.posts == [[(futures[0], True, "a"), (futures[2], True, "c")],
                               [(futures[4], True, "e")]]
        assert second.posts == [[(futures[3], True, "d")]]
        assert all(s.done() for s in stand_ins)
        assert plain.result(0) == "p"
        assert not any(f.done() for f in (futures[0], futures[2], futures[3], futures[4]))
    finally:
        loop.close()


def test_results_collected_for_a_loop_are_posted_even_if_a_later_future_raises():
    from batchproc._native.future_state import AsyncRequest, Request, finish_all

    class Broken:
        def set_result(self, value):
            raise RuntimeError("broken future-like")

    loop = asyncio.new_event_loop()
    try:
        channel = _RecordingChannel()
        future = loop.create_future()
        requests = [Request(AsyncRequest(future, channel), None, None, 1, 0, 0, 0.0),
                    Request(Broken(), None, None, 1, 0, 0, 0.0)]
        with pytest.raises(RuntimeError, match="broken"):
            finish_all(requests, ["kept", "lost"])
        assert channel.posts == [[(future, True, "kept")]]
    finally:
        loop.close()

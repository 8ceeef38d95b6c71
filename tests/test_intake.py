"""The native intake of enqueue_predict_async (_native.intake): its common case must
behave as the Python path does, and everything else must fall back to it."""

import asyncio
import os
import pickle
import sys
import threading

import numpy as np
import pytest
import reference_intake
from hypothesis import given, settings
from hypothesis import strategies as st
from waiting import wait_for as _wait_for

from batchproc import BatchPriority, ProcessorStoppedError, QueueFullError
from batchproc._native.intake import Intake, KnownArrays, _running_loop_is
from batchproc._native.request_queue import RequestQueue
from batchproc.aio import LoopChannel, QueuedFuture
from batchproc.futures import RequestFuture

ROW = np.zeros((1, 4), np.float32)


def _entry(item, key=1):
    return (key, "format", item.shape[0], item.nbytes, 0, 0, item.dtype)


# ------------------------------------------------------------------- KnownArrays


def test_known_arrays_find_an_entry_by_dtype_and_shape_only():
    arrays = KnownArrays(8)
    a = np.zeros((2, 3), np.float32)
    entry = _entry(a)
    arrays.add(a, entry)
    assert arrays.get(np.ones((2, 3), np.float32)[:, :]) is entry
    assert arrays.get(np.zeros((3, 2), np.float32)) is None   # same size, other shape
    assert arrays.get(np.zeros((2, 3, 1), np.float32)) is None  # a longer shape
    assert arrays.get(np.zeros((2,), np.float32)) is None      # a shorter one
    assert arrays.get(np.zeros((2, 3), np.float64)) is None
    assert arrays.get([[0.0] * 3] * 2) is None


def test_known_arrays_refuse_what_they_cannot_remember():
    arrays = KnownArrays(8)
    with pytest.raises(TypeError):
        arrays.add([[0.0]], _entry(ROW))
    with pytest.raises(TypeError):
        arrays.add(None, _entry(ROW))
    with pytest.raises(TypeError, match="matrix"):
        arrays.add(np.zeros((1, 4)).view(np.matrix), _entry(ROW))
    with pytest.raises(ValueError, match="7 fields, not 3"):
        arrays.add(ROW, (1, "fmt", 1))
    assert len(arrays) == 0 and arrays.get(ROW) is None


def test_known_arrays_take_exact_ndarrays_only():
    class Sub(np.ndarray):
        pass

    arrays = KnownArrays(8)
    a = np.zeros((1, 3))
    arrays.add(a, _entry(a))
    assert arrays.get(a.view(Sub)) is None
    assert arrays.get(np.ma.zeros((1, 3))) is None


def test_a_dtype_with_metadata_is_not_taken_for_the_plain_one_it_compares_equal_to():
    arrays = KnownArrays(8)
    a = np.zeros((1, 3), np.float32)
    arrays.add(a, _entry(a))
    tagged = np.dtype(np.float32, metadata={"unit": "m"})
    assert tagged == a.dtype and hash(tagged) == hash(a.dtype)
    assert arrays.get(np.zeros((1, 3), tagged)) is None
    # An equal copy of the dtype itself (an unpickled array's) is the same kind of item.
    copy = pickle.loads(pickle.dumps(a))
    assert arrays.get(copy) is not None


def test_known_arrays_forget_everything_at_their_limit_the_last_one_found_too():
    arrays = KnownArrays(2)
    a, b, c = (np.zeros((1, n), np.float32) for n in (1, 2, 3))
    arrays.add(a, _entry(a, 1))
    arrays.add(b, _entry(b, 2))
    assert arrays.get(a)[0] == 1  # now the last one found
    arrays.add(c, _entry(c, 3))   # over the limit: a and b are forgotten
    assert len(arrays) == 1
    assert arrays.get(a) is None and arrays.get(b) is None
    assert arrays.get(c)[0] == 3
    arrays.clear()
    assert arrays.get(c) is None


def test_a_shape_of_more_dimensions_than_the_cache_compares_is_found_by_key():
    arrays = KnownArrays(8)
    deep = np.zeros((1,) * 40, np.int8)
    arrays.add(deep, _entry(deep))
    assert arrays.get(np.ones((1,) * 40, np.int8)) is not None
    assert arrays.get(np.ones((1,) * 39, np.int8)) is None


# ------------------------------------------------------------------- Intake


# What the intake gives each future to leave the queue by (a processor's WeakMethod).
CANCEL_QUEUED = object()


@pytest.fixture
def intake_parts():
    """An Intake over a queue of 2 with ROW's kind known (key 7)."""
    q = RequestQueue(2)
    arrays = KnownArrays(8)
    arrays.add(ROW, (7, "fmt", 1, ROW.nbytes, 0, 0, ROW.dtype))
    return q, Intake(q, arrays, RequestFuture, QueuedFuture, CANCEL_QUEUED)


def _on_a_loop(intake, work):
    """Run ``work()`` on a fresh loop whose channel the intake uses."""
    async def main():
        intake.use_channel(LoopChannel(asyncio.get_running_loop()))
        return work()

    return asyncio.run(main())


def test_the_intake_queues_a_known_row_with_its_description(intake_parts):
    q, intake = intake_parts

    def work():
        future = intake.enqueue_async(ROW, BatchPriority.HIGH, 2.5)
        assert isinstance(future, QueuedFuture)
        assert future.get_loop() is asyncio.get_running_loop()
        return future

    future = _on_a_loop(intake, work)
    (request,) = q.pop_batch(10, timeout=0)
    assert request.future._future is future and request.item is ROW
    assert (request.key, request.format, request.rows, request.nbytes) == (7, "fmt", 1, 16)
    assert request.priority is BatchPriority.HIGH
    assert request.deadline == pytest.approx(request.enqueued_at + 2.5)
    assert future._bp_token >= 0
    assert future._bp_cancel_queued is CANCEL_QUEUED


def test_a_future_from_a_thread_gets_its_token_and_its_way_out_of_the_queue(intake_parts):
    q, intake = intake_parts
    future = intake.enqueue(ROW, 2, None)
    assert isinstance(future, RequestFuture)
    (request,) = q.pop_batch(10, timeout=0)
    assert request.future is future
    assert future._bp_token >= 0
    assert future._bp_cancel_queued is CANCEL_QUEUED


@pytest.mark.parametrize("max_queue_time", [1, float("inf"), float("nan"), 0.0, -1.0,
                                            np.float64(1.0)])
def test_a_queue_time_to_check_is_left_to_the_python_path(intake_parts, max_queue_time):
    q, intake = intake_parts
    assert _on_a_loop(intake, lambda: intake.enqueue_async(ROW, 2, max_queue_time)) is None
    assert len(q) == 0


@pytest.mark.parametrize("item", [np.zeros((2, 4), np.float32), [[0.0] * 4],
                                  np.zeros((1, 4), np.float64)])
def test_an_item_it_does_not_know_is_left_to_the_python_path(intake_parts, item):
    q, intake = intake_parts
    assert _on_a_loop(intake, lambda: intake.enqueue_async(item, 2, None)) is None
    assert len(q) == 0


def test_a_full_or_closed_queue_is_left_to_the_python_path(intake_parts):
    q, intake = intake_parts

    def work():
        assert intake.enqueue_async(ROW, 2, None) is not None
        assert intake.enqueue_async(ROW, 2, None) is not None
        assert intake.enqueue_async(ROW, 2, None) is None  # full (2)
        q.close()
        q.pop_batch(10, timeout=0)
        assert intake.enqueue_async(ROW, 2, None) is None  # closed

    _on_a_loop(intake, work)


def test_a_bad_priority_raises_as_on_the_python_path(intake_parts):
    q, intake = intake_parts
    with pytest.raises(TypeError, match="priority"):
        _on_a_loop(intake, lambda: intake.enqueue_async(ROW, "high", None))
    with pytest.raises(ValueError, match="priority"):
        _on_a_loop(intake, lambda: intake.enqueue_async(ROW, -1, None))
    assert len(q) == 0


def test_without_the_channels_loop_running_here_it_declines(intake_parts):
    q, intake = intake_parts
    assert intake.enqueue_async(ROW, 2, None) is None  # no channel yet
    started, done = threading.Event(), threading.Event()
    holder = {}

    def other_thread():
        async def main():
            holder["channel"] = LoopChannel(asyncio.get_running_loop())
            started.set()
            await asyncio.get_running_loop().run_in_executor(None, done.wait, 10)

        asyncio.run(main())

    t = threading.Thread(target=other_thread)
    t.start()
    try:
        assert started.wait(10)
        intake.use_channel(holder["channel"])  # its loop runs, in the other thread
        assert intake.enqueue_async(ROW, 2, None) is None  # no loop in this thread

        async def here():  # another loop runs in this thread
            return intake.enqueue_async(ROW, 2, None)

        assert asyncio.run(here()) is None
    finally:
        done.set()
        t.join(10)
    # The loop has ended (and is gone): a call from no loop declines too.
    assert intake.enqueue_async(ROW, 2, None) is None
    assert len(q) == 0


def test_a_nested_loop_gets_a_future_of_its_own(intake_parts):
    # A loop run inside a coroutine of another (as nest_asyncio allows), in one thread:
    # the outer loop, used last, is not the running one.
    q, intake = intake_parts

    async def inner():
        return intake.enqueue_async(ROW, 2, None)

    async def outer():
        intake.use_channel(LoopChannel(asyncio.get_running_loop()))
        inner_loop = asyncio.new_event_loop()
        running = asyncio._get_running_loop()
        asyncio._set_running_loop(None)
        try:
            return inner_loop.run_until_complete(inner())
        finally:
            asyncio._set_running_loop(running)
            inner_loop.close()

    assert asyncio.run(outer()) is None  # the Python path makes the inner loop's future
    assert len(q) == 0


# CPython 3.10 and 3.11 call getpid() in every get_running_loop(); the intake reads the
# running loop itself there (3.12+ has no system call in it, and is asked).
READS_THE_RUNNING_LOOP = sys.version_info < (3, 12) and hasattr(os, "fork")


def _read(loop):
    """What the intake's reading says of ``loop``: 1 running here, 0 not, -1 ask asyncio."""
    answer = _running_loop_is(loop)
    if not READS_THE_RUNNING_LOOP:
        assert answer == -1
        return None
    return answer


def test_the_running_loop_is_read_as_asyncio_reads_it():
    other = asyncio.new_event_loop()
    try:
        async def main():
            loop = asyncio.get_running_loop()
            running, stopped = _read(loop), _read(other)
            asyncio._set_running_loop(None)  # as a loop nested in this one does
            try:
                set_aside = _read(loop)
            finally:
                asyncio._set_running_loop(loop)
            return running, stopped, set_aside, loop

        running, stopped, set_aside, loop = asyncio.run(main())
        if READS_THE_RUNNING_LOOP:
            assert (running, stopped, set_aside) == (1, 0, 0)
        assert _read(loop) in (0, None)  # ended
        seen = {}
        thread = threading.Thread(target=lambda: seen.update(fresh=_running_loop_is(other)))
        thread.start()
        thread.join(10)
        assert seen["fresh"] in (0, -1)  # a thread that never ran a loop
    finally:
        other.close()


@pytest.mark.skipif(not READS_THE_RUNNING_LOOP, reason="asyncio is asked on 3.12+")
def test_a_child_forked_from_a_coroutine_is_not_running_its_parents_loop():
    from test_fork import in_child

    async def main():
        loop = asyncio.get_running_loop()
        # asyncio says no running loop in the child (its holder names the parent's
        # process); the intake's reading must agree, not serve the parent's loop.
        return _read(loop), in_child(lambda: [_read(loop), asyncio._get_running_loop()])

    assert asyncio.run(main()) == (1, [0, None])


# ------------------------------------------------------ through the processor


class _Watched:
    """The processor's intake, recording what each call answered."""

    def __init__(self, intake):
        self.intake = intake
        self.answers = []

    @property
    def last_channel(self):
        return self.intake.last_channel

    def use_channel(self, channel):
        self.intake.use_channel(channel)

    def enqueue(self, *args):
        answer = self.intake.enqueue(*args)
        self.answers.append(answer is not None)
        return answer

    def enqueue_async(self, *args):
        answer = self.intake.enqueue_async(*args)
        self.answers.append(answer is not None)
        return answer


def _watch(processor):
    watched = processor._intake = _Watched(processor._intake)
    return watched


def test_rows_through_the_native_path_reach_their_own_callers(make_processor):
    processor = make_processor(lambda batch: batch * 2, max_batch_size=8)
    watched = _watch(processor)

    async def main():
        futures = [processor.enqueue_predict_async(np.full((1, 3), float(i), np.float32))
                   for i in range(100)]
        return await asyncio.gather(*futures)

    results = asyncio.run(main())
    assert [r.tolist() for r in results] == [[[2.0 * i] * 3] for i in range(100)]
    assert watched.answers == [False] + [True] * 99  # the first one describes the kind


async def _warm(processor, item):
    """Run one request of ``item``'s kind from this loop, so that the next ones take the
    native path; then watch what it answers."""
    await processor.enqueue_predict_async(item)
    return _watch(processor)


def test_cancelling_a_native_path_future_takes_its_request_out_at_once(
        make_processor, recorder):
    model = recorder()
    processor = make_processor(model)

    async def main():
        watched = await _warm(processor, np.array([[0.0]]))
        processor.pause()
        doomed = processor.enqueue_predict_async(np.array([[7.0]]))
        kept = processor.enqueue_predict_async(np.array([[8.0]]))
        assert doomed.cancel()
        stats = processor.get_stats()
        assert (stats["queue_size"], stats["total_cancelled"]) == (1, 1)
        processor.resume()
        assert (await kept).tolist() == [[8.0]]
        assert watched.answers == [True, True]

    asyncio.run(main())
    assert [b.tolist() for b in model.batches] == [[[0.0]], [[8.0]]]


def test_a_full_queue_and_a_stop_refuse_native_path_requests_once_each(make_processor):
    processor = make_processor(lambda batch: batch, max_queue_size=1)

    async def main():
        watched = await _warm(processor, ROW)
        processor.pause()
        first = processor.enqueue_predict_async(ROW)
        with pytest.raises(QueueFullError):
            processor.enqueue_predict_async(ROW)
        assert processor.get_stats()["total_rejected"] == 1
        await asyncio.get_running_loop().run_in_executor(None, processor.stop)
        with pytest.raises(ProcessorStoppedError):
            processor.enqueue_predict_async(ROW)
        assert processor.get_stats()["total_rejected"] == 2
        assert watched.answers == [True, False, False]
        assert (await first).tolist() == ROW.tolist()  # stop ends the pause and drains

    asyncio.run(main())


def test_a_native_path_request_expires_after_its_max_queue_time(make_processor):
    from batchproc import QueueTimeoutError

    processor = make_processor(lambda batch: batch, max_queue_time=0.05)

    async def main():
        watched = await _warm(processor, ROW)
        processor.pause()
        future = processor.enqueue_predict_async(ROW)
        with pytest.raises(QueueTimeoutError):
            await asyncio.wait_for(future, 10)
        assert watched.answers == [True]

    asyncio.run(main())
    assert processor.get_stats()["total_expired"] == 1


def test_a_processor_used_from_a_second_loop_answers_on_that_loop(make_processor):
    processor = make_processor(lambda batch: batch + 1)
    asyncio.run(_warm(processor, ROW))  # its loop is gone now
    watched = _watch(processor)

    async def main():
        loop = asyncio.get_running_loop()
        futures = [processor.enqueue_predict_async(ROW) for _ in range(3)]
        assert all(f.get_loop() is loop for f in futures)
        return await asyncio.gather(*futures)

    assert [r.tolist() for r in asyncio.run(main())] == [[[1.0] * 4]] * 3
    assert watched.answers == [False, True, True]


def test_in_a_forked_child_the_native_path_is_not_taken(make_processor):
    from batchproc import ProcessorForkedError

    processor = make_processor(lambda batch: batch)

    async def main():
        watched = await _warm(processor, ROW)
        processor._forked = True  # what the fork hook sets in the child
        try:
            with pytest.raises(ProcessorForkedError):
                processor.enqueue_predict_async(ROW)
        finally:
            processor._forked = False
        assert watched.answers == []

    asyncio.run(main())



_DTYPES = [np.dtype(np.float32), np.dtype(np.int64), np.dtype(">f4"),
           np.dtype(np.float32, metadata={"unit": "m"})]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "get", "get", "clear"]),
                          st.integers(0, len(_DTYPES) - 1),
                          st.lists(st.integers(0, 3), min_size=0, max_size=3),
                          st.booleans()),
                max_size=60),
       st.integers(1, 5))
def test_known_arrays_answer_as_their_python_twin(ops, limit):
    native, twin = KnownArrays(limit), reference_intake.KnownArraysReference(limit)
    for step, (op, which, shape, copied) in enumerate(ops):
        dtype = _DTYPES[which]
        if copied:  # an equal dtype of another identity
            dtype = pickle.loads(pickle.dumps(dtype))
        item = np.zeros(shape, dtype)
        if op == "add":
            if dtype.metadata is not None:
                continue  # the describer remembers no dtype with metadata
            entry = (step, "fmt", 1, item.nbytes, 0, 0, item.dtype)
            native.add(item, entry)
            twin.add(item, entry)
        elif op == "get":
            assert native.get(item) == twin.get(item), (step, item.dtype, item.shape)
        else:
            native.clear()
            twin.clear()
        assert len(native) == len(twin)


def test_threads_rows_through_the_native_path_reach_their_own_callers(make_processor):
    processor = make_processor(lambda batch: batch * 3, max_batch_size=8)
    watched = _watch(processor)
    futures = [processor.enqueue_predict(np.full((1, 2), float(i))) for i in range(50)]
    assert [f.result(timeout=10).tolist() for f in futures] == [
        [[3.0 * i] * 2] for i in range(50)]
    assert watched.answers == [False] + [True] * 49
    # A timeout to honour is the Python path's: the native one is not asked.
    assert processor.enqueue_predict(np.zeros((1, 2)), timeout=1.0).result(10).shape == (1, 2)
    assert len(watched.answers) == 50


def test_cancelling_a_native_path_thread_future_takes_its_request_out_at_once(
        make_processor, recorder):
    model = recorder()
    processor = make_processor(model)
    processor.enqueue_predict(np.array([[0.0]])).result(timeout=10)
    watched = _watch(processor)
    processor.pause()
    doomed = processor.enqueue_predict(np.array([[7.0]]))
    kept = processor.enqueue_predict(np.array([[8.0]]))
    assert doomed.cancel()
    stats = processor.get_stats()
    assert (stats["queue_size"], stats["total_cancelled"]) == (1, 1)
    processor.resume()
    assert kept.result(timeout=10).tolist() == [[8.0]]
    assert watched.answers == [True, True]
    assert [b.tolist() for b in model.batches] == [[[0.0]], [[8.0]]]


def test_a_thread_waiting_for_room_on_the_native_path_is_refused_by_stop(make_processor):
    processor = make_processor(lambda batch: batch, max_queue_size=1)
    processor.enqueue_predict(ROW).result(timeout=10)
    watched = _watch(processor)
    processor.pause()
    first = processor.enqueue_predict(ROW)
    outcome = []

    def enqueue():
        try:
            processor.enqueue_predict(ROW)
        except ProcessorStoppedError as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=enqueue)
    waiter.start()
    _wait_for(lambda: processor._queue._waiters()[2] == 1, "the waiting push")
    processor.stop()
    waiter.join(10)
    assert len(outcome) == 1
    assert watched.answers == [True, False]
    assert processor.get_stats()["total_rejected"] == 1
    assert first.result(timeout=10).tolist() == ROW.tolist()  # stop drained it


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals reach the main thread")
@pytest.mark.parametrize("how", ["enqueue_predict", "with a timeout", "map"])
def test_a_wait_for_room_ended_by_ctrl_c_is_counted_as_refused(make_processor, how):
    # As an apredict caller that stops waiting: its request was never accepted, so it
    # has no other outcome, and every request submitted ends in exactly one.
    import signal

    processor = make_processor(lambda batch: batch, max_queue_size=1)
    processor.pause()
    first = processor.enqueue_predict(ROW)
    main = threading.main_thread().ident

    def ctrl_c():
        _wait_for(lambda: processor._queue._waiters()[2] == 1, "the waiting push")
        signal.pthread_kill(main, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    sender = threading.Thread(target=ctrl_c)
    try:
        sender.start()
        with pytest.raises(KeyboardInterrupt):
            if how == "map":
                list(processor.map([ROW]))
            else:
                processor.enqueue_predict(ROW, timeout=60.0 if how != "enqueue_predict"
                                          else None)
    finally:
        sender.join(10)
        signal.signal(signal.SIGINT, previous)
    stats = processor.get_stats()
    assert (stats["total_rejected"], stats["total_accepted"]) == (1, 1)
    processor.resume()
    assert first.result(timeout=10).tolist() == ROW.tolist()


def test_a_request_is_answered_on_its_own_loop_when_another_loop_switches_channels(
        make_processor):
    # Making the asyncio future runs Python code of its loop (get_debug), where another
    # thread may take the GIL and enqueue from its own loop, making its channel the
    # last one used: the request must still be answered through its own loop's channel.
    processor = make_processor(lambda batch: batch + 1)
    armed, b_may_enqueue, b_enqueued = threading.Event(), threading.Event(), threading.Event()
    answered = {}

    scheduled_from = set()  # the threads that scheduled work on loop A

    class LoopA(asyncio.SelectorEventLoop):
        def get_debug(self):
            if armed.is_set() and threading.current_thread().name == "loop-a":
                armed.clear()
                b_may_enqueue.set()
                assert b_enqueued.wait(10)
            return super().get_debug()

        def call_soon(self, *args, **kwargs):
            scheduled_from.add(threading.current_thread().name)
            return super().call_soon(*args, **kwargs)

    async def a_main():
        await processor.enqueue_predict_async(ROW)
        armed.set()
        answered["a"] = (await processor.enqueue_predict_async(ROW)).tolist()

    async def b_main():
        await asyncio.get_running_loop().run_in_executor(None, b_may_enqueue.wait, 10)
        future = processor.enqueue_predict_async(ROW)
        b_enqueued.set()
        answered["b"] = (await future).tolist()

    loop_a = LoopA()
    a = threading.Thread(target=lambda: loop_a.run_until_complete(a_main()), name="loop-a",
                         daemon=True)
    b = threading.Thread(target=lambda: asyncio.run(b_main()), daemon=True)
    b.start()
    a.start()
    b.join(20)
    a.join(5)
    if a.is_alive():  # its answer went elsewhere: wake its loop to see what it holds
        loop_a.call_soon_threadsafe(lambda: None)
        a.join(10)
    loop_a.close()
    assert answered == {"a": [[1.0] * 4], "b": [[1.0] * 4]}
    # A's result was handed to A's loop, which completed its future itself (a future
    # completed from another thread schedules its awaiter where nothing wakes for it).
    assert scheduled_from == {"loop-a"}

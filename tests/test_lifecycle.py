"""start / stop / pause / resume, intake before start and after stop, thread hygiene."""

import copy
import dataclasses
import pickle
import queue
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import pytest

from batchproc import (
    BatchProcessingStrategy,
    BatchProcessor,
    BatchProcessorConfig,
    ProcessorStoppedError,
    QueueFullError,
)


def one(v):
    return np.array([v], dtype=np.float64)


def test_start_again_with_the_same_function_is_a_no_op(make_processor):
    def triple(b):
        return b * 3

    p = make_processor(triple)
    threads = p._threads()
    p.start(triple)
    assert p._threads() == threads
    assert p.enqueue_predict(one(1)).result(timeout=10)[0] == 3
    assert p.running


def test_start_again_with_an_equal_bound_method_is_a_no_op(make_processor):
    class Model:
        def predict(self, b):
            return b + 10

    model = Model()
    p = make_processor(model.predict)
    p.start(model.predict)  # a new bound-method object, equal to the first
    assert p.enqueue_predict(one(1)).result(timeout=10)[0] == 11


def test_start_again_with_another_function_is_refused_naming_both(make_processor):
    def double(b):
        return b * 2

    def triple(b):
        return b * 3

    p = make_processor(double)
    with pytest.raises(RuntimeError, match=r"already running .*double.* with .*triple"):
        p.start(triple)
    # The first function keeps running, the processor untouched.
    assert p.running
    assert p.enqueue_predict(one(1)).result(timeout=10)[0] == 2


def test_start_again_with_another_instance_of_a_method_is_refused(make_processor):
    class Model:
        def __init__(self, k):
            self.k = k

        def predict(self, b):
            return b * self.k

    p = make_processor(Model(2).predict)
    with pytest.raises(RuntimeError, match="already running"):
        p.start(Model(5).predict)
    assert p.enqueue_predict(one(1)).result(timeout=10)[0] == 2


def test_start_while_running_with_a_function_whose_eq_raises_is_refused(make_processor):
    class Picky:
        def __call__(self, b):
            return b

        def __eq__(self, other):
            raise TypeError("no comparing")

        __hash__ = object.__hash__

    first = Picky()
    p = make_processor(first)
    p.start(first)  # the same object: no comparison needed
    with pytest.raises(RuntimeError, match="already running"):
        p.start(Picky())


@pytest.mark.parametrize("bad", [None, 42, "model", [lambda b: b]])
def test_start_rejects_what_is_not_callable(make_processor, bad):
    p = make_processor()
    with pytest.raises(TypeError, match=r"process_func must be a callable .* got "):
        p.start(bad)
    assert not p.running
    p.start(lambda b: b)  # the refusal left it startable
    assert p.running


def test_start_after_stop_is_refused(make_processor):
    def ident(b):
        return b

    p = make_processor(ident)
    p.stop()
    for func in (ident, lambda b: b):
        with pytest.raises(ProcessorStoppedError, match="cannot be started again"):
            p.start(func)
    assert not p.running


def test_work_enqueued_before_start_is_kept(make_processor):
    p = make_processor()
    futures = [p.enqueue_predict(one(i)) for i in range(5)]
    assert not any(f.done() for f in futures)
    p.start(lambda b: b + 1)
    assert [f.result(timeout=10)[0] for f in futures] == [1, 2, 3, 4, 5]


def test_stop_before_start_is_safe_and_fails_queued_work():
    p = BatchProcessor(BatchProcessorConfig())
    future = p.enqueue_predict(one(1))
    p.stop()
    with pytest.raises(ProcessorStoppedError):
        future.result(timeout=1)
    assert p.shutdown_event.is_set() and not p.running


def test_stop_is_idempotent_and_final(make_processor):
    p = make_processor(lambda b: b)
    p.stop()
    p.stop()
    assert p.shutdown_event.is_set() and not p.running
    with pytest.raises(ProcessorStoppedError):
        p.enqueue_predict(one(1))
    with pytest.raises(ProcessorStoppedError):
        p.start(lambda b: b)
    assert p.get_stats()["is_stopping"] is True


def test_stop_drains_queued_work_within_its_timeout(make_processor):
    gate = threading.Event()

    def model(batch):
        gate.wait(10)
        return batch

    p = make_processor(model, max_workers=1, max_batch_size=4)
    futures = [p.enqueue_predict(one(i)) for i in range(20)]
    stopper = threading.Thread(target=p.stop, kwargs={"timeout": 10})
    stopper.start()
    assert p.shutdown_event.wait(5)
    with pytest.raises(ProcessorStoppedError):
        p.enqueue_predict(one(99))  # intake is closed at once
    gate.set()
    stopper.join(10)
    assert [f.result(timeout=0)[0] for f in futures] == list(range(20))


def test_stop_with_a_hung_model_returns_within_timeout_and_fails_the_rest(make_processor):
    release = threading.Event()
    entered = threading.Event()

    def hung(batch):
        entered.set()
        release.wait(30)
        return batch

    p = make_processor(hung, max_workers=1, max_batch_size=1, processing_strategy="greedy")
    first = p.enqueue_predict(one(1))
    assert entered.wait(10)
    queued = [p.enqueue_predict(one(i)) for i in range(3)]
    started = time.monotonic()
    p.stop(timeout=1)
    took = time.monotonic() - started
    assert 0.9 <= took < 3.0
    for future in [first, *queued]:
        with pytest.raises(ProcessorStoppedError):
            future.result(timeout=0)
    release.set()  # the late result is discarded: the future stays failed
    for thread in p._threads():
        thread.join(10)
    with pytest.raises(ProcessorStoppedError):
        first.result(timeout=0)
    stats = p.get_stats()
    assert stats["total_errors"] == 4 and stats["total_processed"] == 0


def test_context_manager_stops(make_processor):
    with BatchProcessor(BatchProcessorConfig()) as p:
        p.start(lambda b: b)
        assert p.enqueue_predict(one(3)).result(timeout=10)[0] == 3
    assert not p.running and p.shutdown_event.is_set()
    assert not any(t.is_alive() for t in p._threads())


def test_start_stop_cycles_leave_no_threads_behind():
    before = {t for t in threading.enumerate() if t.name.startswith("batchproc")}
    for i in range(20):
        p = BatchProcessor(BatchProcessorConfig(max_workers=2, health_check_interval=0.01))
        p.start(lambda b: b)
        assert p.enqueue_predict(one(i)).result(timeout=10)[0] == i
        p.stop()
    after = {t for t in threading.enumerate()
             if t.name.startswith("batchproc") and t.is_alive()}
    assert after <= before


def test_pause_holds_batches_and_resume_releases_them(make_processor, recorder):
    model = recorder()
    p = make_processor(model)
    p.pause()
    assert p.get_stats()["is_paused"] is True
    futures = [p.enqueue_predict(one(i)) for i in range(5)]  # intake continues
    with pytest.raises(FutureTimeout):
        futures[0].result(timeout=0.3)
    assert model.batches == [] and p.get_stats()["queue_size"] == 5
    p.resume()
    assert [f.result(timeout=10)[0] for f in futures] == list(range(5))
    assert p.get_stats()["is_paused"] is False


def _until(predicate, what, limit=10.0):
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.001)


def test_a_paused_processor_stops_watching_for_overdue_requests_until_resumed(
        make_processor, monkeypatch):
    # Requests queued while paused go past batch_timeout, yet no pop may take them:
    # the worker watching for requests held up behind a call must not wake every watch
    # period for them (it did: 200 wake-ups a second at batch_timeout 5 ms), but doze
    # until resume() wakes it. The longest doze is stretched so that only that wake-up
    # can end it within the test.
    from batchproc.engine import workers

    monkeypatch.setattr(workers, "POP_POLL", 60.0)
    p = make_processor(lambda b: b, max_workers=2, batch_timeout=0.005)
    assert p.enqueue_predict(one(0)).result(timeout=10)[0] == 0
    slots = p._controller.slots
    p.pause()
    futures = [p.enqueue_predict(one(i)) for i in range(3)]
    _until(lambda: p._queue.oldest_age() > 0.005, "requests past batch_timeout")
    _until(lambda: slots.dozing, "the watcher dozing while paused")
    p.resume()
    assert not slots.dozing  # woken by resume() (it takes the flag down as it wakes it)
    assert [f.result(timeout=10)[0] for f in futures] == [0, 1, 2]


def test_a_resume_racing_a_pause_leaves_it_running_not_stalled(make_processor):
    # A resume() that ran between pause()'s two steps (the event cleared, then the
    # queue paused) left the queue paused while the processor said it ran: its workers
    # stopped popping, is_paused and health() said running, and nothing resumed it.
    p = make_processor(lambda b: b)
    queue_itself = p._queue
    in_pause, go_on = threading.Event(), threading.Event()

    class PauseWaits:
        """The processor's queue, whose pause() waits, midway through pause()."""

        def __getattr__(self, name):
            return getattr(queue_itself, name)

        def pause(self):
            in_pause.set()
            assert go_on.wait(10)
            queue_itself.pause()

    p._queue = PauseWaits()
    pausing = threading.Thread(target=p.pause)
    pausing.start()
    assert in_pause.wait(10)
    resuming = threading.Thread(target=p.resume)
    resuming.start()
    # Before the fix the resume ran through at once, here; now it waits for the pause.
    resuming.join(timeout=0.5)
    go_on.set()
    pausing.join(10)
    resuming.join(10)
    p._queue = queue_itself
    assert not p.is_paused and not queue_itself.paused
    assert p.health()["state"] == "running"
    assert p.enqueue_predict(one(7.0)).result(timeout=10).tolist() == [7.0]


def test_stop_while_paused_drains_as_usual(make_processor):
    p = make_processor(lambda b: b * 10)
    p.pause()
    futures = [p.enqueue_predict(one(i)) for i in range(4)]
    p.stop(timeout=10)
    assert [f.result(timeout=0)[0] for f in futures] == [0, 10, 20, 30]


def test_queue_full_raises_queue_full_error_after_timeout(make_processor):
    p = make_processor(lambda b: b, max_queue_size=2)
    p.pause()
    p.enqueue_predict(one(1))
    p.enqueue_predict(one(2))
    started = time.monotonic()
    with pytest.raises(QueueFullError) as info:
        p.enqueue_predict(one(3), timeout=0.2)
    assert isinstance(info.value, queue.Full)
    assert time.monotonic() - started >= 0.19
    assert p.get_stats()["queue_size"] == 2


def test_queue_full_with_no_timeout_waits_for_room(make_processor):
    p = make_processor(lambda b: b + 1, max_queue_size=1)
    p.pause()
    first = p.enqueue_predict(one(1))
    result = {}

    def producer():
        result["future"] = p.enqueue_predict(one(2))  # timeout=None: waits for room

    thread = threading.Thread(target=producer)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive()  # still waiting: the queue is full and paused
    p.resume()
    thread.join(10)
    assert first.result(timeout=10)[0] == 2
    assert result["future"].result(timeout=10)[0] == 3


def test_enqueue_fire_and_forget_counts_but_never_raises(make_processor, caplog):
    done = threading.Event()
    seen = []

    def model(batch):
        seen.extend(batch)
        done.set()
        raise RuntimeError("boom")

    p = make_processor(model, max_retries=0, retry_delay=0.0)
    assert p.enqueue("generic item") is None
    assert done.wait(10)
    p.stop(timeout=10)
    assert seen == ["generic item"]
    assert p.get_stats()["total_errors"] == 1
    p.enqueue("after stop")  # refused, logged and counted apart: not raised
    stats = p.get_stats()
    assert stats["total_rejected"] == 1 and stats["total_errors"] == 1
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_intake_is_closed_by_the_time_shutdown_event_is_set(make_processor):
    p = make_processor(lambda b: b)
    original_set = p.shutdown_event.set
    seen = {}

    def set_and_probe():
        # The moment stop() announces shutdown, a submission must already be refused.
        try:
            p.enqueue_predict(one(1))
            seen["refused"] = False
        except ProcessorStoppedError:
            seen["refused"] = True
        original_set()

    p.shutdown_event.set = set_and_probe
    p.stop()
    assert seen == {"refused": True}


def test_stop_waits_for_a_batch_being_delivered(make_processor):
    from batchproc import BatchProcessingStrategy

    processor = make_processor(lambda batch: batch, max_workers=1, initial_batch_size=2,
                               processing_strategy=BatchProcessingStrategy.FIXED,
                               batch_timeout=5.0)
    processor.pause()
    first = processor.enqueue_predict(np.array([[1.0]]))
    second = processor.enqueue_predict(np.array([[2.0]]))
    in_delivery = threading.Event()

    def hold(_future):
        # Keeps the worker inside the delivery of this batch until stop() has given up
        # on the work in progress (a state, polled).
        in_delivery.set()
        while not processor._dispatcher._abandon_all.is_set():
            time.sleep(0.001)

    first.add_done_callback(hold)
    processor.resume()
    assert in_delivery.wait(10)
    processor.stop(timeout=0.05)
    # The batch belonged to its worker, which was completing it: stop() let it finish.
    assert second.done()
    assert second.result().tolist() == [[2.0]]


# ----------------------------------------------------------------- start that fails part-way


class RefusedThread(RuntimeError):
    """What threading raises when the process may start no more threads."""


def refuse_thread_start(monkeypatch, nth):
    """Make the ``nth`` call of ``threading.Thread.start`` from now on fail, as the
    system refuses a thread; the others start as usual."""
    real_start = threading.Thread.start
    calls = []

    def start(thread):
        calls.append(thread.name)
        if len(calls) == nth:
            raise RefusedThread("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    return calls


def alive_processor_threads():
    return {t for t in threading.enumerate() if t.name.startswith("batchproc") and t.is_alive()}


@pytest.mark.parametrize("nth, started", [(1, 0), (2, 1), (4, 3)])
def test_a_refused_worker_thread_stops_the_start_naming_how_many_started(
        monkeypatch, nth, started):
    before = alive_processor_threads()
    model_calls = []
    p = BatchProcessor(BatchProcessorConfig(max_workers=4, batch_timeout=0.01))
    queued = p.enqueue_predict(one(1))  # queued before start: never reaches the model
    calls = refuse_thread_start(monkeypatch, nth)
    with pytest.raises(RuntimeError,
                       match=rf"could start only {started} of 4 worker threads") as raised:
        p.start(lambda b: model_calls.append(b) or b)
    monkeypatch.undo()
    assert isinstance(raised.value.__cause__, RefusedThread)
    assert len(calls) == nth  # it stopped at the refusal: no supervisor, no more workers
    # All or nothing: what started was stopped and joined; the processor is stopped.
    assert alive_processor_threads() <= before
    assert not p.running
    assert p.get_stats()["is_running"] is False and p.health()["state"] == "stopped"
    # Whether a started worker's pop took it or stop's drain did: never dispatched.
    with pytest.raises(ProcessorStoppedError, match="before this request was dispatched"):
        queued.result(timeout=1)
    assert model_calls == []
    with pytest.raises(ProcessorStoppedError):
        p.enqueue_predict(one(2))
    with pytest.raises(ProcessorStoppedError, match="cannot be started again"):
        p.start(lambda b: b)
    p.stop()  # still safe


def test_a_refused_supervisor_thread_stops_the_start_too(monkeypatch):
    before = alive_processor_threads()
    p = BatchProcessor(BatchProcessorConfig(max_workers=2, batch_timeout=0.01))
    refuse_thread_start(monkeypatch, 3)  # two workers, then the supervisor
    with pytest.raises(RuntimeError, match=r"supervisor thread \(all 2 workers started") as raised:
        p.start(lambda b: b)
    monkeypatch.undo()
    assert isinstance(raised.value.__cause__, RefusedThread)
    assert alive_processor_threads() <= before
    assert not p.running


def test_a_refused_event_loop_thread_stops_the_start_too(monkeypatch):
    async def model(batch):
        return batch

    before = alive_processor_threads()
    p = BatchProcessor(BatchProcessorConfig(max_workers=2))
    calls = refuse_thread_start(monkeypatch, 1)  # the async model's loop comes first
    with pytest.raises(RuntimeError, match="event loop thread") as raised:
        p.start(model)
    monkeypatch.undo()
    assert isinstance(raised.value.__cause__, RefusedThread)
    assert len(calls) == 1
    assert alive_processor_threads() <= before
    assert not p.running


def test_a_start_that_succeeds_starts_every_thread(monkeypatch, make_processor):
    calls = refuse_thread_start(monkeypatch, 10**9)
    p = make_processor(lambda b: b, max_workers=3)
    monkeypatch.undo()
    assert sorted(calls) == sorted(["batchproc-worker-1", "batchproc-worker-2",
                                    "batchproc-worker-3", "batchproc-supervisor"])
    assert p.running
    assert p.enqueue_predict(one(5)).result(timeout=10)[0] == 5


# ----------------------------------------------------------------- interpreter exit


def run_script(code, timeout=60):
    """What a fresh interpreter running ``code`` prints (it must exit 0), and how long
    it ran, in seconds."""
    began = time.monotonic()
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=timeout, check=True).stdout
    return out.splitlines(), time.monotonic() - began


EXIT_PRELUDE = """
    import threading
    import numpy as np
    from batchproc import BatchProcessor, BatchProcessorConfig, exiting

    def printing_model(batch):
        for row in batch:
            print("processed", int(row[0]), flush=True)
        return batch

    def one(v):
        return np.array([[float(v)]])
"""


# CPython 3.12+ starts no thread once the interpreter exits (atexit hooks included):
# the same here, on any version, from when the exit hook begins.
NO_THREADS_AT_EXIT = """
    from batchproc import shielded
    shielded.THREADS_AT_EXIT = False
    real_start = threading.Thread.start

    def start(self):
        if exiting.has_run():
            raise RuntimeError("can't create new thread at interpreter shutdown")
        return real_start(self)

    threading.Thread.start = start
"""

# How the tests of the exit hook's interrupts and waits run: as this interpreter does,
# and as one that starts no thread at exit does (CPython 3.12+).
AT_EXIT = pytest.mark.parametrize("threads_at_exit", ["", NO_THREADS_AT_EXIT],
                                  ids=["this-python", "no-threads-at-exit"])

# A processor whose model never returns (its call has begun once ``entered`` is set).
HANGING = """
    entered = threading.Event()

    def hangs(batch):
        entered.set()
        threading.Event().wait()  # for ever
        return batch

    p = BatchProcessor(BatchProcessorConfig(max_workers=1, batch_timeout=0.01))
    p.start(hangs)
"""


def test_a_processor_never_stopped_finishes_its_queued_work_at_exit():
    lines, _ = run_script(EXIT_PRELUDE + """
    p = BatchProcessor(BatchProcessorConfig(max_workers=1, batch_timeout=0.01))
    p.start(printing_model)
    p.pause()  # everything is still queued when the interpreter exits
    for i in range(3):
        p.enqueue(one(i))
    futures = [p.enqueue_predict(one(i)) for i in (3, 4)]
    print("exiting", flush=True)
    """)
    assert lines[0] == "exiting"
    assert sorted(lines[1:]) == [f"processed {i}" for i in range(5)]


def test_a_processor_stopped_before_exit_is_left_alone_at_exit():
    lines, _ = run_script(EXIT_PRELUDE + """
    p = BatchProcessor(BatchProcessorConfig(max_workers=1))
    p.start(printing_model)
    print("registered", p in exiting.registered(), flush=True)
    p.stop()
    print("registered", p in exiting.registered(), flush=True)
    never_started = BatchProcessor()
    print("registered", never_started in exiting.registered(), flush=True)
    p.stop = never_started.stop = lambda timeout=None: print("stopped again", flush=True)
    """)
    assert lines == ["registered True", "registered False", "registered False"]


def test_a_model_that_hangs_delays_exit_only_by_the_exit_timeout():
    lines, took = run_script(EXIT_PRELUDE + HANGING + """
    exiting.EXIT_TIMEOUT = 0.5
    future = p.enqueue_predict(one(1))
    future.add_done_callback(lambda f: print("failed", type(f.exception()).__name__,
                                             flush=True))
    entered.wait()
    print("exiting", flush=True)
    """)
    assert lines == ["exiting", "failed ProcessorStoppedError"]
    assert took < 30  # EXIT_TIMEOUT plus the interpreter's start; never the 30 s item_timeout


# Threads the interpreter waits for at exit (non-daemon), using a processor after the
# main thread has returned: a server loop, an executor's queued tasks (its own exit
# hook finishes them).
SERVING_AFTER_MAIN = """
    from concurrent.futures import ThreadPoolExecutor

    p = BatchProcessor(BatchProcessorConfig(max_workers=1, batch_timeout=0.01))
    p.start(lambda batch: batch)
    main_done = threading.Event()

    def server_loop():
        # The main thread ends once the interpreter's exit hooks run before the wait
        # for non-daemon threads: a hook there has stopped the processor by then.
        threading.main_thread().join()
        for v in (1, 2):
            print("served", int(p.enqueue_predict(one(v)).result()[0, 0]), flush=True)

    def task(v):
        # An executor's exit hook waits for its tasks before the main thread ends, so
        # these cannot join it: they start once it has returned, most of them after it.
        main_done.wait()
        return int(p.enqueue_predict(one(v)).result()[0, 0])

    {start}
    print("main returns", flush=True)
    threading.Timer(0.2, main_done.set).start()
"""


def test_threads_that_go_on_serving_after_the_main_thread_are_served():
    # The exit hook runs once the interpreter has waited for them: run where
    # concurrent.futures runs its own (before that wait), it stopped the processor
    # under a server thread as soon as the main thread returned.
    lines, _ = run_script(EXIT_PRELUDE + SERVING_AFTER_MAIN.format(
        start="threading.Thread(target=server_loop).start()"))
    assert lines == ["main returns", "served 1", "served 2"]
    lines, _ = run_script(EXIT_PRELUDE + SERVING_AFTER_MAIN.format(start="""
    pool = ThreadPoolExecutor(2)
    futures = [pool.submit(task, v) for v in range(20)]
    futures[-1].add_done_callback(lambda f: print("last", f.result(), flush=True))
    """))
    assert lines == ["main returns", "last 19"]


def test_a_thread_waiting_on_a_hung_call_at_exit_gets_its_item_timeout():
    # A non-daemon thread waits on a result as it would on anything: the interpreter
    # waits for it, and item_timeout ends the wait (the hook runs after).
    lines, took = run_script(EXIT_PRELUDE + """
    release = threading.Event()
    p = BatchProcessor(BatchProcessorConfig(max_workers=1, batch_timeout=0.01,
                                            item_timeout=1.0))
    p.start(lambda batch: release.wait() and batch)

    def handler():
        try:
            p.enqueue_predict(one(7)).result()
        except Exception as exc:
            print("handler got", type(exc).__name__, flush=True)

    threading.Thread(target=handler).start()
    print("main returns", flush=True)
    """)
    assert lines == ["main returns", "handler got BatchTimeoutError"]
    assert took < 30  # item_timeout (1 s) and the interpreter's start


def test_the_exit_hook_stops_within_one_timeout_for_all_processors():
    lines, _ = run_script(EXIT_PRELUDE + """
    import time
    from batchproc import ProcessorStoppedError

    exiting.EXIT_TIMEOUT = 0.5
    release = threading.Event()
    processors = []
    for name in "ab":
        p = BatchProcessor(BatchProcessorConfig(max_workers=1, batch_timeout=0.01))
        p.start(lambda batch: release.wait() and batch)
        processors.append(p)
        future = p.enqueue_predict(one(1))
        future.add_done_callback(lambda f, name=name: print(
            name, type(f.exception()).__name__, flush=True))
    calls = []
    real_stop = BatchProcessor.stop

    def stop(self, timeout=5.0):
        calls.append(timeout)
        real_stop(self, timeout)
        if len(calls) == 2:
            print("timeouts", all(t <= 0.5 for t in calls), flush=True)

    BatchProcessor.stop = stop
    """)
    assert lines == ["a ProcessorStoppedError", "b ProcessorStoppedError", "timeouts True"]


STUCK_AT_EXIT = EXIT_PRELUDE + """
    exiting.EXIT_TIMEOUT = 0.5
    release = threading.Event()
    entered = threading.Semaphore(0)

    def stuck(batch):
        entered.release()
        release.wait()
        return batch

    for _ in range(2):
        p = BatchProcessor(BatchProcessorConfig(max_workers=1, batch_timeout=0.01))
        p.start(stuck)
        p.enqueue_predict(one(1))
    for _ in range(2):
        entered.acquire()
    print("exiting", flush=True)
"""


def test_exits_with_processors_stuck_in_their_model_never_crash():
    # The exit hook gives up on the stuck calls and closes the queues: it wakes the
    # processors' other threads from their native waits just before the interpreter
    # finalizes, and the ones not out by then are ended inside the native module. Each
    # run is a fresh draw of that race; a crash shows as a negative exit status.
    children = [subprocess.Popen([sys.executable, "-X", "faulthandler", "-c",
                                  textwrap.dedent(STUCK_AT_EXIT)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(8)]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert (child.returncode, out) == (0, "exiting\n"), err


# SIGINT sent from a helper thread once the drain has begun (``_drain`` is entered), as
# many times as asked, back to back (the second lands while the first is being handled),
# to the process or to the sending thread: a signal the system hands to a thread other
# than the main one must reach the main thread's wait all the same.
INTERRUPT_THE_DRAIN = """
    import logging
    import os
    import signal
    logging.basicConfig()  # the library's warnings, on stderr
    signal.signal(signal.SIGINT, signal.default_int_handler)
    draining = threading.Event()
    real_drain = BatchProcessor._drain

    def drain(self, deadline, shield):
        draining.set()
        return real_drain(self, deadline, shield)

    BatchProcessor._drain = drain

    def interrupt(times, to):
        draining.wait()
        for _ in range(times):
            if to == "process":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    futures = [p.enqueue_predict(one(1))]
    entered.wait()
    futures.append(p.enqueue_predict(one(2)))
    for f in futures:
        f.add_done_callback(lambda f: print("failed", type(f.exception()).__name__,
                                            flush=True))
"""


@AT_EXIT
@pytest.mark.parametrize("times", [1, 2, 5])
@pytest.mark.parametrize("to", ["process", "thread"])
def test_ctrl_c_during_the_exit_drain_gives_up_at_once_and_completes_every_future(
        times, to, threads_at_exit):
    # A hung model and a queued request at exit, a drain of 30 s: both futures fail with
    # ProcessorStoppedError at once and the interpreter exits, with the status it had
    # (an atexit hook cannot change it), saying on stderr that it was interrupted.
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(
        EXIT_PRELUDE + threads_at_exit + HANGING + INTERRUPT_THE_DRAIN + f"""
    exiting.EXIT_TIMEOUT = 30.0
    threading.Thread(target=interrupt, args=({times}, {to!r}), daemon=True).start()
    print("exiting", flush=True)
    """)], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - began
    assert done.stdout.splitlines() == ["exiting"] + ["failed ProcessorStoppedError"] * 2
    assert done.returncode == 0, done.stderr
    assert "interrupted at interpreter exit (KeyboardInterrupt)" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert took < 20  # not the 30 s drain


@pytest.mark.parametrize("times", [1, 2, 5])
@pytest.mark.parametrize("to", ["process", "thread"])
def test_ctrl_c_during_stop_completes_every_future_then_raises_once(times, to):
    lines, took = run_script(EXIT_PRELUDE + HANGING + INTERRUPT_THE_DRAIN + f"""
    threading.Thread(target=interrupt, args=({times}, {to!r}), daemon=True).start()
    try:
        p.stop(timeout=30.0)
    except KeyboardInterrupt:
        print("raised", flush=True)
    print("state", p.health()["state"], flush=True)
    print("done", all(f.done() for f in futures), flush=True)
    print("supervisor alive", p._supervisor.is_alive(), flush=True)
    """)
    assert lines == ["failed ProcessorStoppedError"] * 2 + [
        "raised", "state stopped", "done True", "supervisor alive False"]
    assert took < 20  # not the 30 s drain


@pytest.mark.parametrize("changes,named", [
    ({"batch_timeout": "x"}, "batch_timeout"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_workers": -3}, "max_workers"),
    ({"max_workers": 5000}, "max_workers"),
    ({"min_batch_size": 64, "max_batch_size": 8}, "min_batch_size"),
    ({"processing_strategy": "sideways"}, "processing_strategy"),
])
def test_a_config_changed_into_a_bad_value_is_refused_at_construction(changes, named):
    # A dataclass checks only when made: the processor checks the object it is given.
    config = BatchProcessorConfig()
    for name, value in changes.items():
        setattr(config, name, value)
    with pytest.raises(ValueError, match=named):
        BatchProcessor(config)


def test_a_config_changed_into_a_good_value_is_taken_at_construction():
    config = BatchProcessorConfig()
    config.max_batch_size = 8
    config.processing_strategy = "FIXED"  # type: ignore[assignment]
    p = BatchProcessor(config)
    assert p.config.max_batch_size == 8
    assert p.config.initial_batch_size == 8  # clamped against the new bound
    assert p.config.gc_batch_threshold == 8  # derived again from it
    assert p.config.processing_strategy is BatchProcessingStrategy.FIXED


def test_the_processor_keeps_its_own_copy_of_the_config():
    config = BatchProcessorConfig(max_batch_size=16, batch_timeout=0.01)
    p = BatchProcessor(config)
    try:
        assert p.config == config and p.config is not config
        config.batch_timeout = "x"  # type: ignore[assignment]
        config.max_batch_size = 0
        config.max_workers = -3
        assert (p.config.batch_timeout, p.config.max_batch_size, p.config.max_workers) == (
            0.01, 16, 4)
        p.start(lambda b: b * 2)
        # The workers read the processor's copy: the broken object reaches none of them.
        assert p.enqueue_predict(one(1)).result(timeout=10)[0] == 2
    finally:
        p.stop(timeout=5.0)


@pytest.mark.parametrize("name,value", [
    ("max_batch_size", 4), ("batch_timeout", 0.5), ("max_workers", 1),
    ("processing_strategy", BatchProcessingStrategy.GREEDY), ("enable_monitoring", False),
    ("max_queue_time", 1.0)])
def test_the_processors_config_is_read_only_and_says_what_to_use_instead(name, value):
    p = BatchProcessor(BatchProcessorConfig(max_batch_size=16, batch_timeout=0.01))
    before = getattr(p.config, name)
    with pytest.raises(dataclasses.FrozenInstanceError) as info:
        setattr(p.config, name, value)
    assert isinstance(info.value, AttributeError)
    message = str(info.value)
    assert message.startswith(f"cannot set {name}: this config is a BatchProcessor's own, "
                              "fixed when the processor was made")
    assert "processor.update_batch_size(n)" in message
    assert f"dataclasses.replace(processor.config, {name}=...)" in message
    with pytest.raises(dataclasses.FrozenInstanceError, match=rf"^cannot delete {name}: "):
        delattr(p.config, name)
    assert getattr(p.config, name) == before


def test_the_processors_config_cannot_be_replaced_and_says_what_to_use_instead():
    p = BatchProcessor(BatchProcessorConfig(max_batch_size=16))
    own = p.config
    with pytest.raises(dataclasses.FrozenInstanceError,
                       match=r"^cannot replace a BatchProcessor's config") as info:
        p.config = BatchProcessorConfig(max_batch_size=4)
    assert "processor.update_batch_size(n)" in str(info.value)
    assert "dataclasses.replace(processor.config, ...)" in str(info.value)
    assert p.config is own and p.config.max_batch_size == 16


def test_update_batch_size_changes_the_target_under_a_read_only_config():
    p = BatchProcessor(BatchProcessorConfig(max_batch_size=16))
    p.update_batch_size(4)
    assert p.current_batch_size == 4
    assert p.config.initial_batch_size == 16  # the settings it was made with


def test_a_config_made_from_the_processors_is_an_ordinary_one():
    p = BatchProcessor(BatchProcessorConfig(max_batch_size=16, batch_timeout=0.01))
    variant = dataclasses.replace(p.config, max_batch_size=4)
    variant.max_workers = 1  # changeable, as any config the user builds
    assert (variant.max_batch_size, variant.max_workers) == (4, 1)
    assert variant == BatchProcessorConfig(max_batch_size=4, batch_timeout=0.01,
                                           max_workers=1)
    for copied in (copy.copy(p.config), copy.deepcopy(p.config),
                   pickle.loads(pickle.dumps(p.config))):
        assert copied == p.config
        copied.max_batch_size = 8
        assert copied.max_batch_size == 8 and p.config.max_batch_size == 16
    second = BatchProcessor(variant)
    try:
        second.start(lambda b: b * 2)
        assert second.config.max_batch_size == 4
        assert second.enqueue_predict(one(3)).result(timeout=10)[0] == 6
        with pytest.raises(dataclasses.FrozenInstanceError):
            second.config.max_batch_size = 8
    finally:
        second.stop(timeout=5.0)
    # Made from another processor's config as it is: a read-only copy of its own.
    third = BatchProcessor(p.config)
    assert third.config == p.config and third.config is not p.config
    with pytest.raises(dataclasses.FrozenInstanceError):
        third.config.max_batch_size = 8


def test_the_config_given_to_a_processor_stays_the_callers_to_change():
    config = BatchProcessorConfig(max_batch_size=16)
    p = BatchProcessor(config)
    config.max_batch_size = 4
    config.batch_timeout = 0.5
    assert (config.max_batch_size, config.batch_timeout) == (4, 0.5)
    assert p.config.max_batch_size == 16


# A processor whose hanging call holds a second request back, and a done-callback on
# that request that blocks until the script ends: whoever fails it runs the callback.
BLOCKING_CALLBACK = """
    import time
    from batchproc import shielded
    shielded.GRACE = 0.5
    exiting.EXIT_TIMEOUT = 0.5
    in_callback = threading.Event()

    def blocks(future):
        in_callback.set()
        threading.Event().wait()  # for ever

    first = p.enqueue_predict(one(1))
    assert entered.wait(10)
    held = p.enqueue_predict(one(2))
    held.add_done_callback(blocks)
"""


def test_a_done_callback_that_blocks_holds_stop_only_a_grace_past_its_timeout():
    lines, took = run_script(EXIT_PRELUDE + HANGING + BLOCKING_CALLBACK + """
    began = time.monotonic()
    p.stop(timeout=0.2)
    print("returned", time.monotonic() - began < 10, flush=True)
    print("in callback", in_callback.is_set(), flush=True)
    print("failed", type(held.exception(timeout=0)).__name__, flush=True)
    """)
    assert lines == ["returned True", "in callback True",
                     "failed ProcessorStoppedError"]
    assert took < 30


def test_a_done_callback_that_blocks_holds_ctrl_c_only_a_grace():
    lines, _ = run_script(EXIT_PRELUDE + HANGING + BLOCKING_CALLBACK + """
    import os
    import signal
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupt():
        in_callback.wait()
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    began = time.monotonic()
    try:
        p.stop()  # no timeout: only the Ctrl-C ends the wait
    except KeyboardInterrupt:
        print("raised", time.monotonic() - began < 10, flush=True)
    print("in callback", in_callback.is_set(), flush=True)
    """, timeout=30)
    assert lines == ["raised True", "in callback True"]


@AT_EXIT
def test_a_done_callback_that_blocks_holds_the_exit_only_a_grace_past_its_timeout(
        threads_at_exit):
    lines, took = run_script(EXIT_PRELUDE + threads_at_exit + HANGING + BLOCKING_CALLBACK + """
    print("exiting", flush=True)
    """, timeout=30)
    assert lines == ["exiting"]
    assert took < 20


@pytest.mark.parametrize("duplicate", [copy.copy, copy.deepcopy, pickle.dumps],
                         ids=["copy", "deepcopy", "pickle"])
def test_a_processor_refuses_to_be_copied_and_keeps_working(make_processor, duplicate):
    # A shallow copy shared the queue and workers: stopping the copy stopped the original.
    p = make_processor(lambda batch: batch)
    with pytest.raises(TypeError, match="cannot be copied or pickled: it owns a running"):
        duplicate(p)
    assert p.enqueue_predict(one(1.0)).result(timeout=5).tolist() == [1.0]

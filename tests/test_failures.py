"""Failure isolation: bisection, retries with backoff, item_timeout, cancellation,
BaseException from the model, exactly-once completion."""

import threading
import time

import numpy as np
import pytest

from batchproc import BatchTimeoutError
from batchproc.config import MAX_SECONDS
from batchproc.engine.execution import backoff


class Poison(Exception):
    pass


def item(v):
    return np.array([[v]], dtype=np.float64)


def poison_model(calls):
    def model(batch):
        calls.append(batch[:, 0].tolist())
        if (batch == -1).any():
            raise Poison("poisoned row")
        return batch * 2
    return model


def test_a_poison_request_fails_alone(make_processor):
    calls = []
    p = make_processor(poison_model(calls), max_retries=1, retry_delay=0.0,
                       max_batch_size=64, initial_batch_size=64)
    p.pause()
    values = list(range(16))
    values[11] = -1
    futures = [p.enqueue_predict(item(v)) for v in values]
    p.resume()
    for v, future in zip(values, futures):
        if v == -1:
            with pytest.raises(Poison, match="poisoned row"):
                future.result(timeout=10)  # the model's own exception, unwrapped
        else:
            assert future.result(timeout=10)[0, 0] == 2 * v
    assert calls[0] == [float(v) for v in values]  # one batch first, then bisection
    # Found in log2(16) calls; then it runs alone (for its own error), then its retry.
    assert calls[1:5] == [[float(v) for v in values[:8]],
                          [float(v) for v in values[8:12]],
                          [float(v) for v in values[12:16] + values[8:10]],
                          [float(values[10])]]
    assert calls[5:] == [[-1.0], [-1.0]]
    stats = p.get_stats()
    assert stats["total_errors"] == 1 and stats["total_processed"] == 15


def test_single_failures_are_retried_with_exponential_backoff(make_processor):
    stamps = []

    def flaky(batch):
        stamps.append(time.monotonic())
        if len(stamps) < 3:
            raise ConnectionError("transient")
        return batch + 1

    p = make_processor(flaky, max_retries=3, retry_delay=0.05, max_workers=1)
    assert p.enqueue_predict(item(1)).result(timeout=10)[0, 0] == 2
    assert len(stamps) == 3
    assert stamps[1] - stamps[0] >= 0.05 * 0.99
    assert stamps[2] - stamps[1] >= 0.10 * 0.99


def test_retries_are_bounded_by_max_retries(make_processor):
    calls = []

    def always(batch):
        calls.append(1)
        raise KeyError("permanent")

    p = make_processor(always, max_retries=2, retry_delay=0.0)
    with pytest.raises(KeyError, match="permanent"):
        p.enqueue_predict(item(1)).result(timeout=10)
    assert len(calls) == 3  # the first call and two retries


def test_backoff_doubles_up_to_the_longest_wait_and_never_overflows():
    assert [backoff(0.5, k) for k in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff(0.0, 5000) == 0.0  # 0 * 2**5000: no float holds 2**5000
    assert backoff(1.0, 40) == MAX_SECONDS  # past what a thread can wait: capped
    assert backoff(1.0, 10**6) == MAX_SECONDS
    assert backoff(MAX_SECONDS, 1) == MAX_SECONDS
    assert backoff(5e-324, 1100) == 2.0**26  # 2**-1074 doubled 1100 times


def test_more_than_a_thousand_retries_without_delay_end_in_the_models_error(make_processor):
    # Retry 1024's backoff, retry_delay * 2**1024 seconds, is more than a float holds: it
    # must be capped, so that the request ends in the model's own error.
    calls = []

    def always(batch):
        calls.append(1)
        raise KeyError("permanent")

    p = make_processor(always, max_retries=1100, retry_delay=0.0, max_workers=1)
    with pytest.raises(KeyError, match="permanent"):
        p.enqueue_predict(item(1)).result(timeout=60)
    assert len(calls) == 1101


def test_a_batch_past_item_timeout_fails_with_timeout_error_and_service_continues(
        make_processor):
    release = threading.Event()
    stuck = threading.Event()

    def model(batch):
        if batch[0, 0] == 666:
            stuck.set()
            release.wait(30)
        return batch * 2

    p = make_processor(model, item_timeout=0.3, max_workers=2, max_batch_size=1,
                       initial_batch_size=1)
    try:
        hung = p.enqueue_predict(item(666))
        assert stuck.wait(10)
        with pytest.raises(TimeoutError) as info:
            hung.result(timeout=10)
        assert isinstance(info.value, BatchTimeoutError)
        # Health reports the abandoned batch while its call is still stuck.
        report = p.health()
        assert report["checks"]["stuck_batches"]["value"] == 1
        assert report["status"] == "degraded"  # the other worker serves: still ready
        [stuck_batch] = report["checks"]["stuck_batches"]["batches"]
        stuck_worker = stuck_batch["worker"]
        # The processor keeps serving with its other (and replacement) workers.
        futures = [p.enqueue_predict(item(i)) for i in range(10)]
        assert [f.result(timeout=10)[0, 0] for f in futures] == [2 * i for i in range(10)]
        assert p.get_stats()["total_errors"] == 1
    finally:
        release.set()
    # Only the abandoned worker ends once its call returns; the others serve on.
    for thread in p._threads():
        if thread.name == stuck_worker:
            thread.join(10)
    with pytest.raises(BatchTimeoutError):
        hung.result(timeout=0)  # the late result was discarded
    assert p.health()["checks"]["stuck_batches"]["value"] == 0


def test_a_future_cancelled_before_dispatch_is_never_processed(make_processor, recorder):
    model = recorder()
    p = make_processor(model)
    p.pause()
    futures = [p.enqueue_predict(item(v)) for v in (1, 2, 3)]
    assert futures[1].cancel()
    assert p.get_stats()["queue_size"] == 2  # dropped from the queue at once
    p.resume()
    assert futures[0].result(timeout=10)[0, 0] == 1
    assert futures[2].result(timeout=10)[0, 0] == 3
    assert futures[1].cancelled()
    seen = sorted(v for batch in model.batches for v in batch[:, 0])
    assert seen == [1.0, 3.0]
    assert p.get_stats()["total_cancelled"] == 1


def test_futures_their_callers_started_or_completed_cost_no_other_request(make_processor,
                                                                         recorder, caplog):
    """The Future API lets a caller complete (or start) its own future while the request
    waits in the queue. That request's outcome is the caller's; the others in its batch
    must still be processed, and the worker must keep serving."""
    model = recorder()
    p = make_processor(model)
    p.pause()
    futures = [p.enqueue_predict(item(v)) for v in (1, 2, 3, 4)]
    futures[1].set_result("the caller's own")
    assert futures[2].set_running_or_notify_cancel()
    p.resume()
    for f, v in zip(futures, (1, 2, 3, 4)):
        if v != 2:
            assert f.result(timeout=10)[0, 0] == v
    assert futures[1].result(timeout=0) == "the caller's own"
    seen = sorted(v for batch in model.batches for v in batch[:, 0])
    assert seen == [1.0, 3.0, 4.0]
    assert p.enqueue_predict(item(5)).result(timeout=10)[0, 0] == 5  # still serving
    assert "crashed" not in caplog.text


def test_a_dispatched_future_cannot_be_cancelled(make_processor):
    entered, release = threading.Event(), threading.Event()

    def model(batch):
        entered.set()
        release.wait(10)
        return batch

    p = make_processor(model)
    future = p.enqueue_predict(item(1))
    assert entered.wait(10)
    assert not future.cancel()
    release.set()
    assert future.result(timeout=10)[0, 0] == 1


class Interrupt(BaseException):
    """Like KeyboardInterrupt: not an Exception."""


def test_base_exceptions_fail_the_batch_but_not_the_worker(make_processor):
    calls = []

    def model(batch):
        calls.append(1)
        if len(calls) == 1:
            raise Interrupt("stop the world")
        return batch

    p = make_processor(model, max_workers=1)
    with pytest.raises(Interrupt):
        p.enqueue_predict(item(1)).result(timeout=10)
    assert p.enqueue_predict(item(2)).result(timeout=10)[0, 0] == 2  # same worker serves on
    assert len(calls) == 2  # not retried


def test_a_blocking_callback_holds_no_other_request_of_a_failed_group(make_processor):
    # A call of several requests past item_timeout while stop() drains fails them all
    # at once: each error was set and its callbacks run one request after another, so a
    # callback that blocked held back the errors of the requests after it. As in a
    # delivery, every request of the group now has its outcome before any callback runs.
    entered, release, hang = threading.Event(), threading.Event(), threading.Event()

    def blocking(future):
        entered.set()
        release.wait(30)

    def model(batch):
        hang.wait(30)
        return batch

    p = make_processor(model, max_workers=1, max_retries=0, item_timeout=0.3)
    p.pause()
    futures = [p.enqueue_predict(item(v)) for v in range(4)]
    futures[1].add_done_callback(blocking)
    stopping = threading.Thread(target=p.stop, args=(10.0,))
    stopping.start()  # it drains: resumes, and the call of all four hangs
    try:
        assert entered.wait(20)
        assert [f.done() for f in futures] == [True] * 4
        assert all(isinstance(f.exception(timeout=0), BatchTimeoutError) for f in futures)
    finally:
        release.set()
        hang.set()
        stopping.join(20)


def test_every_accepted_future_completes_exactly_once(make_processor):
    completions = {}
    lock = threading.Lock()

    def count(future):
        with lock:
            completions[id(future)] = completions.get(id(future), 0) + 1

    def model(batch):
        if (batch % 7 == 0).any():
            raise ValueError("multiple of seven")
        return batch

    p = make_processor(model, max_retries=1, retry_delay=0.0, max_queue_size=5000)
    futures = []
    for i in range(1, 1001):
        f = p.enqueue_predict(item(i))
        f.add_done_callback(count)
        futures.append(f)
    for i, f in enumerate(futures, start=1):
        if i % 7 == 0:
            with pytest.raises(ValueError):
                f.result(timeout=30)
        else:
            assert f.result(timeout=30)[0, 0] == i
    p.stop(timeout=10)
    assert sorted(completions.values()) == [1] * 1000
    stats = p.get_stats()
    assert stats["total_processed"] + stats["total_errors"] == 1000

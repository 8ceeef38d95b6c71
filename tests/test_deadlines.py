"""Per-request deadlines (``max_queue_time``) and bounded starvation
(``max_priority_wait``), issue 11.

A request still queued when its ``max_queue_time`` runs out fails with
``QueueTimeoutError`` and never reaches the model: while queued behind a long call, while
the processor is paused, and while parked for a retry.
"""

import asyncio
import threading

import numpy as np
import pytest

from batchproc import BatchPriority, QueueTimeoutError
from batchproc.log_limits import seconds


def item(v):
    return np.array([[v]], dtype=np.float64)


def test_queue_timeout_error_is_a_timeout_error():
    assert issubclass(QueueTimeoutError, TimeoutError)


def test_a_request_expires_while_the_processor_is_paused(make_processor, recorder):
    model = recorder()
    p = make_processor(model)
    p.pause()
    short = p.enqueue_predict(item(1), max_queue_time=0.05)
    kept = p.enqueue_predict(item(2))   # no limit
    with pytest.raises(QueueTimeoutError, match="max_queue_time") as info:
        short.result(timeout=10)        # fails while still paused
    assert str(info.value).endswith("in the queue; it was never processed")
    assert info.value.__cause__ is None
    assert p.get_stats()["total_expired"] == 1
    assert p.get_stats()["queue_size"] == 1
    p.resume()
    assert kept.result(timeout=10)[0, 0] == 2
    assert [b[:, 0].tolist() for b in model.batches] == [[2.0]]  # never reached the model


def test_the_config_default_applies_and_the_keyword_overrides_it(make_processor, recorder):
    model = recorder()
    p = make_processor(model, max_queue_time=0.05)
    p.pause()
    default = p.enqueue_predict(item(1))
    unlimited = p.enqueue_predict(item(2), max_queue_time=None)
    p.enqueue(item(3))                  # fire and forget takes the default too
    with pytest.raises(QueueTimeoutError):
        default.result(timeout=10)
    while p.get_stats()["total_expired"] < 2:
        threading.Event().wait(0.01)
    p.resume()
    assert unlimited.result(timeout=10)[0, 0] == 2
    assert p.get_stats()["total_expired"] == 2
    assert p.get_stats()["total_errors"] == 0  # expiry is not a processing error


def test_a_request_expires_while_queued_behind_a_long_call(make_processor, recorder):
    release = threading.Event()
    entered = threading.Event()

    def model(batch):
        if batch[0, 0] == 666:
            entered.set()
            release.wait(30)
        return batch

    # One worker, so the second request can only wait behind the first call.
    p = make_processor(model, max_workers=1, max_batch_size=1, initial_batch_size=1)
    try:
        slow = p.enqueue_predict(item(666))
        assert entered.wait(10)
        behind = p.enqueue_predict(item(1), max_queue_time=0.05)
        with pytest.raises(QueueTimeoutError):
            behind.result(timeout=10)   # while the call is still running
        assert not slow.done()
    finally:
        release.set()
    assert slow.result(timeout=10)[0, 0] == 666


def test_a_request_expires_during_its_backoff(make_processor):
    calls = []

    def model(batch):
        calls.append(1)
        raise ConnectionError("down")

    p = make_processor(model, max_workers=1, retry_delay=30.0, max_retries=3)
    future = p.enqueue_predict(item(1), max_queue_time=0.2)
    with pytest.raises(QueueTimeoutError) as info:
        future.result(timeout=10)
    assert isinstance(info.value.__cause__, ConnectionError)  # why it was waiting
    message = str(info.value)
    assert "while parked to be retried: it was processed and failed 1 time on its own" in message
    assert message.endswith("its first failure: ConnectionError: down (the __cause__)")
    assert "never processed" not in message
    assert len(calls) == 1
    assert p.get_stats()["total_expired"] == 1 and p.get_stats()["queue_size"] == 0


def _request(enqueued_at, max_queue_time):
    from batchproc._native.future_state import Request
    return Request(None, None, None, 1, 8, 0, enqueued_at, max_queue_time=max_queue_time)


def test_the_expiry_message_of_a_request_never_processed():
    from batchproc.engine.delivery import expiry_error
    error = expiry_error(_request(100.0, 0.5), now=100.75)
    assert str(error) == ("request waited 0.750 s, past its max_queue_time of 0.500 s in "
                          "the queue; it was never processed")
    assert error.__cause__ is None


def test_the_expiry_message_states_a_limit_under_a_millisecond_as_given():
    # Not rounded to 0.000 s (nor the wait to as much as its limit).
    from batchproc.engine.delivery import expiry_error
    error = expiry_error(_request(100.0, 0.00012), now=100.0003)
    assert str(error) == ("request waited 0.0003 s, past its max_queue_time of 0.00012 s "
                          "in the queue; it was never processed")


@pytest.mark.parametrize("enqueued_at", [0.0, 0.37, 1234.5, 33485.422053089, 2.0**23 + 0.1,
                                         1.7e7, 3.2e9])
@pytest.mark.parametrize("limit", [1e-9, 3.5e-8, 1e-6, 0.00012, 0.001, 0.25, 2.0, 60.0,
                                   86400.0, 1e9])
def test_the_expiry_message_states_the_limit_given_whatever_the_clock_reads(enqueued_at,
                                                                             limit):
    # The deadline is the enqueue time plus the limit, a sum rounded to the clock's
    # magnitude: subtracted again, 1e-09 read 9.97e-10 after hours of uptime, and 0 once
    # the clock's unit in the last place passes twice the limit.
    from batchproc.engine.delivery import expiry_error
    request = _request(enqueued_at, limit)
    assert request.deadline == enqueued_at + limit and request.max_queue_time == limit
    message = str(expiry_error(request, now=request.deadline))
    assert f"past its max_queue_time of {seconds(limit)} in the queue" in message


def test_the_expiry_message_keeps_the_limit_through_a_retry_and_a_requeue():
    from batchproc.engine.delivery import expiry_error
    first = ValueError("bad row")
    for request in (_request(3.2e9, 1e-9).for_retry(first),
                    _request(3.2e9, 1e-9).requeued(first)):
        assert request.max_queue_time == 1e-9
        assert "past its max_queue_time of 1e-09 s" in str(expiry_error(request, 3.2e9))


@pytest.mark.parametrize("tries", [1, 2, 3])
def test_the_expiry_message_of_a_request_that_failed_counts_its_failures(tries):
    from batchproc.engine.delivery import expiry_error
    first = ValueError("bad row")
    request = _request(100.0, 2.0).for_retry(first)
    for _ in range(1, tries):
        request = request.for_retry(first)  # as the engine parks it: the first failure kept
    error = expiry_error(request, now=102.25)
    plural = "time" if tries == 1 else "times"
    assert str(error) == (
        f"request waited 2.250 s, past its max_queue_time of 2.000 s while parked to be "
        f"retried: it was processed and failed {tries} {plural} on its own; its first "
        "failure: ValueError: bad row (the __cause__)")
    assert error.__cause__ is first


@pytest.mark.parametrize("api, timeout, said", [
    ("enqueue_predict", None, "queue full (1 request) for 0.050 s: the request's "
                              "max_queue_time ended its wait for room"),
    ("enqueue_predict", 10.0, "queue full (1 request) for 0.050 s: the request's "
                              "max_queue_time ended its wait for room"),
    ("map", None, "queue full (1 request) for 0.050 s: the request's max_queue_time "
                  "ended its wait for room"),
])
def test_max_queue_time_ends_a_threads_wait_for_room(make_processor, api, timeout, said):
    # It counts from the call, and a wait for room is time in the queue to the caller:
    # with no timeout, a queue that stays full no longer holds the thread for ever; a
    # longer timeout does not either. The error says which limit ended the wait.
    from concurrent.futures import ThreadPoolExecutor

    from batchproc import QueueFullError

    p = make_processor(lambda batch: batch, max_queue_size=1, max_batch_size=1)
    p.pause()
    first = p.enqueue_predict(item(1.0))

    def call():
        if api == "enqueue_predict":
            return p.enqueue_predict(item(2.0), timeout=timeout, max_queue_time=0.05)
        return list(p.map([item(2.0)], max_queue_time=0.05))

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(call)
        try:
            with pytest.raises(QueueFullError) as refused:
                waiting.result(timeout=10)  # bounded: before, it waited for ever
        finally:
            p.resume()  # lets a wait that did not end go on, so the test ends
    assert str(refused.value) == said
    assert first.result(timeout=10).tolist() == [[1.0]]
    assert p.get_stats()["total_rejected"] == 1


def test_a_timeout_shorter_than_max_queue_time_is_the_limit_said(make_processor):
    from batchproc import QueueFullError

    p = make_processor(lambda batch: batch, max_queue_size=1, max_batch_size=1)
    p.pause()
    first = p.enqueue_predict(item(1.0))
    with pytest.raises(QueueFullError) as refused:
        p.enqueue_predict(item(2.0), timeout=0.05, max_queue_time=10)
    assert str(refused.value) == "queue full (1 request) for 0.050 s"
    p.resume()
    assert first.result(timeout=10).tolist() == [[1.0]]


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), -float("inf"), "1",
                                   True])
def test_bad_max_queue_time_is_refused(make_processor, value):
    p = make_processor(lambda b: b)
    with pytest.raises(ValueError, match="max_queue_time"):
        p.enqueue_predict(item(1), max_queue_time=value)
    with pytest.raises(ValueError, match="max_queue_time"):
        list(p.map([item(1)], max_queue_time=value))

    async def from_a_loop():
        with pytest.raises(ValueError, match="max_queue_time"):
            p.enqueue_predict_async(item(1), max_queue_time=value)
        with pytest.raises(ValueError, match="max_queue_time"):
            await p.apredict(item(1), max_queue_time=value)

    asyncio.run(from_a_loop())
    from batchproc import BatchProcessorConfig
    with pytest.raises(ValueError, match="max_queue_time"):
        BatchProcessorConfig(max_queue_time=value)


def test_a_cancelled_request_that_expires_counts_as_cancelled(make_processor):
    p = make_processor(lambda b: b)
    p.pause()
    future = p.enqueue_predict(item(1), max_queue_time=0.05)
    future.cancel()
    other = p.enqueue_predict(item(2), max_queue_time=0.05)
    with pytest.raises(QueueTimeoutError):
        other.result(timeout=10)
    assert p.get_stats()["total_expired"] == 1


def test_asyncio_requests_take_max_queue_time(make_processor):
    p = make_processor(lambda b: b)

    async def main():
        p.pause()
        future = p.enqueue_predict_async(item(1), max_queue_time=0.05)
        with pytest.raises(QueueTimeoutError):
            await asyncio.wait_for(future, 10)
        p.resume()
        return await asyncio.wait_for(p.enqueue_predict_async(item(2)), 10)

    assert asyncio.run(main())[0, 0] == 2


def test_a_stopped_processor_fails_expired_requests_as_expired(make_processor):
    p = make_processor(lambda b: b)
    p.pause()
    futures = [p.enqueue_predict(item(i), max_queue_time=0.05 if i else None)
               for i in range(2)]
    with pytest.raises(QueueTimeoutError):
        futures[1].result(timeout=10)
    p.stop(timeout=1.0)
    assert futures[0].result(timeout=1)[0, 0] == 0  # stop drains what is left


# ---------------------------------------------------------------- max_priority_wait


def test_an_aged_low_priority_request_goes_before_newer_urgent_ones(make_processor,
                                                                    recorder):
    model = recorder()
    p = make_processor(model, enable_priority_queue=True, max_priority_wait=0.05,
                       max_workers=1, max_batch_size=1, initial_batch_size=1)
    p.pause()
    low = p.enqueue_predict(item(1), priority=BatchPriority.LOW)
    threading.Event().wait(0.1)  # the LOW one has now waited past max_priority_wait
    high = [p.enqueue_predict(item(10 + i), priority=BatchPriority.CRITICAL)
            for i in range(3)]
    p.resume()
    for f in [low, *high]:
        f.result(timeout=10)
    order = [b[0, 0] for b in model.batches]
    assert order[0] == 1.0
    assert order[1:] == [10.0, 11.0, 12.0]


def test_without_max_priority_wait_priorities_are_strict(make_processor, recorder):
    model = recorder()
    p = make_processor(model, enable_priority_queue=True, max_workers=1,
                       max_batch_size=1, initial_batch_size=1)
    p.pause()
    low = p.enqueue_predict(item(1), priority=BatchPriority.LOW)
    threading.Event().wait(0.1)
    high = [p.enqueue_predict(item(10 + i), priority=BatchPriority.CRITICAL)
            for i in range(3)]
    p.resume()
    for f in [low, *high]:
        f.result(timeout=10)
    assert [b[0, 0] for b in model.batches] == [10.0, 11.0, 12.0, 1.0]


def test_max_priority_wait_is_validated():
    from batchproc import BatchProcessorConfig
    with pytest.raises(ValueError, match="max_priority_wait"):
        BatchProcessorConfig(max_priority_wait=-1)
    assert BatchProcessorConfig(enable_priority_queue=True,
                                max_priority_wait=0).max_priority_wait == 0

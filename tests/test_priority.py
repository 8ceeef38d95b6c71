"""Strict priority with FIFO inside a level; FIFO when priorities are off; grouping order."""

import numpy as np

from batchproc import BatchPriority


def serial(make_processor, model, **config):
    """One worker, one request per batch: the processing order is the queue's order."""
    return make_processor(model, max_workers=1, max_batch_size=1, initial_batch_size=1,
                          processing_strategy="greedy", **config)


def test_most_urgent_first_fifo_within_a_level(make_processor):
    order = []
    p = serial(make_processor, lambda b: order.extend(b) or b, enable_priority_queue=True)
    p.pause()
    plan = [("low-1", BatchPriority.LOW), ("normal-1", BatchPriority.NORMAL),
            ("crit-1", BatchPriority.CRITICAL), ("bg-1", BatchPriority.BACKGROUND),
            ("high-1", BatchPriority.HIGH), ("normal-2", BatchPriority.NORMAL),
            ("crit-2", BatchPriority.CRITICAL), ("low-2", BatchPriority.LOW)]
    futures = [p.enqueue_predict(name, priority=prio) for name, prio in plan]
    p.resume()
    for (name, _), future in zip(plan, futures):
        assert future.result(timeout=10) == name
    assert order == ["crit-1", "crit-2", "high-1", "normal-1", "normal-2", "low-1", "low-2",
                     "bg-1"]


def test_priority_is_ignored_without_the_priority_queue(make_processor):
    order = []
    p = serial(make_processor, lambda b: order.extend(b) or b)
    p.pause()
    names = [f"r{i}" for i in range(6)]
    prios = [BatchPriority.LOW, BatchPriority.CRITICAL, BatchPriority.NORMAL] * 2
    futures = [p.enqueue_predict(n, priority=pr) for n, pr in zip(names, prios)]
    p.resume()
    assert [f.result(timeout=10) for f in futures] == names
    assert order == names


def test_a_batch_is_filled_from_the_most_urgent_level_first(make_processor, recorder):
    model = recorder()
    p = make_processor(model, enable_priority_queue=True, max_workers=1, max_batch_size=3,
                       initial_batch_size=3, processing_strategy="greedy")
    p.pause()
    values = [(1, BatchPriority.LOW), (2, BatchPriority.HIGH), (3, BatchPriority.LOW),
              (4, BatchPriority.CRITICAL), (5, BatchPriority.HIGH), (6, BatchPriority.NORMAL)]
    futures = [p.enqueue_predict(np.array([v]), priority=pr) for v, pr in values]
    p.resume()
    for (v, _), f in zip(values, futures):
        assert f.result(timeout=10)[0] == v
    assert [b.tolist() for b in model.batches] == [[4, 2, 5], [6, 1, 3]]


def test_incompatible_requests_keep_their_place(make_processor, recorder):
    model = recorder()
    p = make_processor(model, enable_priority_queue=True, max_workers=1, max_batch_size=8,
                       initial_batch_size=8, processing_strategy="greedy")
    p.pause()
    f32 = lambda v: np.array([v], dtype=np.float32)  # noqa: E731
    i64 = lambda v: np.array([v], dtype=np.int64)  # noqa: E731
    plan = [(f32(1), BatchPriority.NORMAL), (i64(2), BatchPriority.HIGH),
            (f32(3), BatchPriority.HIGH), (i64(4), BatchPriority.LOW),
            (f32(5), BatchPriority.LOW)]
    futures = [p.enqueue_predict(x, priority=pr) for x, pr in plan]
    p.resume()
    for (x, _), f in zip(plan, futures):
        np.testing.assert_array_equal(f.result(timeout=10), x)
    # The head (HIGH int64 #2, oldest most urgent) starts the first batch and only its
    # kind joins, in priority order; the float32 requests follow in theirs.
    assert [b.tolist() for b in model.batches] == [[2, 4], [3, 1, 5]]
    assert [b.dtype for b in model.batches] == [np.int64, np.float32]


def test_a_more_urgent_arrival_does_not_restart_an_older_requests_wait(make_processor):
    # batch_timeout is counted from the oldest request, whatever its priority: a HIGH
    # request half a batch_timeout after a LOW one (the batch far from full) does not
    # push the LOW one's wait to the HIGH one's batch_timeout.
    import threading
    import time

    reached = {}

    def model(batch):
        for name in batch:
            reached[name] = time.monotonic()
        return batch

    p = make_processor(model, max_workers=1, max_batch_size=64, initial_batch_size=64,
                       processing_strategy="fixed", batch_timeout=1.0,
                       enable_priority_queue=True)
    sent = time.monotonic()
    low = p.enqueue_predict("low", priority=BatchPriority.LOW)
    threading.Event().wait(0.5)
    high_sent = time.monotonic()
    high = p.enqueue_predict("high", priority=BatchPriority.HIGH)
    assert low.result(timeout=10) == "low" and high.result(timeout=10) == "high"
    # Counted from the LOW one: 1 s after it; from the HIGH one, 1 s after that.
    assert sent + 0.98 < reached["low"] < high_sent + 1.0, (reached["low"] - sent)

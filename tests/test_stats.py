"""BatchStats on its own, the processor's get_stats(), and the metrics collector."""

import logging
import threading

import numpy as np
import pytest
from waiting import wait_for

import batchproc
from batchproc import BatchProcessor, BatchStats, QueueFullError
from batchproc.metrics import MetricsSink
from batchproc.stats import STAT_KEYS

DESIGN_KEYS = {"avg_processing_time", "avg_batch_size", "avg_queue_time", "p50_latency",
               "p95_latency", "p99_latency", "throughput", "error_rate",
               "current_batch_size", "system_load", "active_batches", "queue_size",
               "is_paused", "is_stopping", "total_processed", "total_errors"}


def test_batch_stats_on_its_own():
    stats = BatchStats(window_size=4)
    for i in range(1, 7):  # the window keeps the last 4 batches: 3, 4, 5, 6
        stats.update(processing_time=i / 100, batch_size=i * 10, queue_time=i / 1000,
                     latency=i / 10, queue_length=i)
    stats.record_error(2)
    s = stats.get_stats()
    assert set(STAT_KEYS) <= set(s)
    assert s["avg_processing_time"] == pytest.approx(0.045)
    assert s["avg_batch_size"] == pytest.approx(45.0)
    assert s["avg_queue_time"] == pytest.approx(0.0045)
    window = np.array([0.3, 0.4, 0.5, 0.6])
    for q in (50, 95, 99):
        assert s[f"p{q}_latency"] == pytest.approx(np.percentile(window, q))
    assert s["total_processed"] == 210 and s["total_errors"] == 2
    assert s["error_rate"] == pytest.approx(2 / 212)
    assert s["throughput"] > 0


def test_batch_stats_per_request_latencies_and_request_counts():
    stats = BatchStats(100)
    stats.update(0.01, 8, 0.001, requests=2, latencies=[0.1, 0.3])
    s = stats.get_stats()
    assert s["total_processed"] == 2
    assert s["p50_latency"] == pytest.approx(0.2)


def test_batch_stats_empty_and_bad_input():
    s = BatchStats(10).get_stats()
    assert s["p99_latency"] == 0.0 and s["throughput"] == 0.0 and s["error_rate"] == 0.0
    with pytest.raises(ValueError):
        BatchStats(0)
    with pytest.raises(ValueError):
        BatchStats(10).record_error(-1)


def test_batch_stats_is_thread_safe():
    stats = BatchStats(1000)
    barrier = threading.Barrier(8)

    def hammer():
        barrier.wait()
        for _ in range(500):
            stats.update(0.001, 2, 0.0, latency=0.01)
            stats.record_error()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = stats.get_stats()
    assert s["total_processed"] == 8 * 500 * 2 and s["total_errors"] == 8 * 500
    assert s["total_batches"] == 4000


def test_processor_stats_have_every_documented_key(make_processor):
    p = make_processor(lambda b: b)
    futures = [p.enqueue_predict(np.array([i])) for i in range(5)]
    for f in futures:
        f.result(timeout=10)
    s = p.get_stats()
    assert DESIGN_KEYS <= set(s)
    assert s["throughput"] > 0 and s["total_processed"] == 5
    assert 0 <= s["avg_processing_time"] < 10  # seconds, not milliseconds
    assert 0 < s["p50_latency"] <= s["p95_latency"] <= s["p99_latency"] < 10
    assert 0.0 <= s["system_load"] <= 1.0


def test_a_result_is_counted_before_it_is_delivered(make_processor):
    p = make_processor(lambda b: b)
    seen = []
    for i in range(20):
        future = p.enqueue_predict(np.array([i]))
        future.add_done_callback(lambda f: seen.append(p.get_stats()["total_processed"]))
        future.result(timeout=10)
        # The worker runs the callback once it has woken the caller.
        wait_for(lambda i=i: len(seen) == i + 1, "the callback ran")
    assert seen == list(range(1, 21))


def test_counts_add_up(make_processor):
    p = make_processor(lambda b: b if (b >= 0).all() else 1 / 0, max_retries=0,
                       retry_delay=0.0)
    p.pause()
    good = [p.enqueue_predict(np.array([i])) for i in range(10)]
    bad = [p.enqueue_predict(np.array([-1])) for _ in range(3)]
    cancelled = [p.enqueue_predict(np.array([i])) for i in range(4)]
    for f in cancelled:
        assert f.cancel()
    s = p.get_stats()
    pending = s["queue_size"]
    assert (s["total_processed"] + s["total_errors"] + s["total_cancelled"] + pending
            == s["total_accepted"] == 17)
    p.resume()
    for f in good:
        f.result(timeout=10)
    for f in bad:
        with pytest.raises(ZeroDivisionError):
            f.result(timeout=10)
    s = p.get_stats()
    assert (s["total_processed"], s["total_errors"], s["total_cancelled"]) == (10, 3, 4)
    assert s["error_rate"] == pytest.approx(3 / 13)


def test_a_snapshot_never_counts_more_ended_or_queued_than_accepted(make_processor,
                                                                    monkeypatch):
    # A request that arrives while get_stats reads its counts (here: during the read of
    # the map chunks handed back, just before the arrivals): read out of a request's
    # order (the arrivals before the queue), a dashboard's in-flight, accepted less
    # ended and queued, went below zero under load.
    p = make_processor(lambda b: b, max_queue_time=60.0)
    p.pause()
    p.enqueue_predict(np.array([0]))
    engine = type(p._dispatcher)
    real = engine.handed_back
    arrived = []

    def reading(self):
        if not arrived:
            arrived.append(p.enqueue_predict(np.array([1])))  # between two reads
        return real.fget(self)

    monkeypatch.setattr(engine, "handed_back", property(reading))
    s = p.get_stats()
    assert arrived
    ended = (s["total_processed"] + s["total_errors"] + s["total_expired"]
             + s["total_cancelled"])
    assert s["total_accepted"] >= ended + s["queue_size"], s
    monkeypatch.undo()
    s = p.get_stats()
    assert (s["total_accepted"], s["queue_size"]) == (2, 2)


def test_metrics_collector_gets_batches_and_errors(make_processor):
    batches, errors = [], []

    class Collector:
        def record_batch(self, size, rows, queue_time, processing_time, outcome):
            batches.append((size, rows, outcome))

        def record_error(self, error, count):
            errors.append((type(error), count))

    p = make_processor(lambda b: b if b[0] >= 0 else 1 / 0, metrics_collector=Collector(),
                       max_retries=0, retry_delay=0.0)
    p.pause()
    ok = p.enqueue_predict(np.array([1, 2]))
    p.resume()
    ok.result(timeout=10)
    with pytest.raises(ZeroDivisionError):
        p.enqueue_predict(np.array([-1])).result(timeout=10)
    assert batches[0] == (1, 2, "ok")
    assert (1, 1, "error") in batches
    assert errors == [(ZeroDivisionError, 1)]


def test_a_raising_collector_is_logged_and_never_breaks_processing(make_processor, caplog):
    class Broken:
        def record_batch(self, *args):
            raise RuntimeError("collector down")

    p = make_processor(lambda b: b, metrics_collector=Broken())
    with caplog.at_level(logging.ERROR, logger="batchproc"):
        for i in range(3):
            assert p.enqueue_predict(np.array([i])).result(timeout=10)[0] == i
    assert sum("record_batch raised" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("collector", [object(), "prometheus", MetricsSink],
                         ids=["object", "a name", "a class of none"])
def test_a_collector_with_none_of_the_methods_is_refused(collector):
    with pytest.raises(TypeError, match=r"metrics_collector must have one or more of "
                       r"record_batch, .* \(the MetricsCollector protocol\), got .*"
                       r"PrometheusMetrics\(name\)"):
        BatchProcessor(metrics_collector=collector)


class Batches:
    def __init__(self):
        self.rows = []

    def record_batch(self, size, rows, queue_time, processing_time, outcome):
        self.rows.append(rows)


def test_a_collector_class_given_for_an_instance_is_refused(make_processor):
    # Its methods, read off the class, are callable: it was taken, and every call of them
    # failed (logged once each), so nothing was ever recorded.
    collector = Batches
    name = collector.__qualname__
    said = (f"metrics_collector must be an instance, got the class {name}: make one "
            f"({name}(...))")
    with pytest.raises(TypeError) as refused:
        BatchProcessor(metrics_collector=collector)
    assert str(refused.value) == said
    with pytest.raises(TypeError) as refused:
        batchproc.batch(metrics_collector=collector)  # at decoration, not the first call
    assert str(refused.value) == said
    instance = Batches()
    q = make_processor(lambda b: b, metrics_collector=instance)
    q.enqueue_predict(np.array([1, 2])).result(timeout=10)
    assert instance.rows == [2]


def test_a_class_of_static_and_class_methods_is_a_collector(make_processor):
    # Its methods need no instance: it records, given as it is (and to the decorator).
    seen_rows, seen_requests = [], []

    class Recorder:
        @staticmethod
        def record_batch(size, rows, queue_time, processing_time, outcome):
            seen_rows.append(rows)

        @classmethod
        def record_requests(cls, latencies, queue_times, outcome):
            seen_requests.append(len(latencies))

    p = make_processor(lambda b: b, metrics_collector=Recorder)
    p.enqueue_predict(np.array([1, 2])).result(timeout=10)
    batched = batchproc.batch(metrics_collector=Recorder)(lambda items: items)
    try:
        assert batched("x") == "x"
    finally:
        batched.stop()
    assert seen_rows == [2, 1] and seen_requests == [1, 1]


def test_a_collector_with_some_of_the_methods_gets_those(make_processor):
    class Rejections:
        def __init__(self):
            self.rejected = 0

        def record_rejected(self, count):
            self.rejected += count

    collector = Rejections()
    p = make_processor(lambda b: b, metrics_collector=collector, max_queue_size=1)
    p.pause()
    p.enqueue_predict(np.array([1]))
    with pytest.raises(QueueFullError):
        p.enqueue_predict(np.array([2]), timeout=0)
    assert collector.rejected == 1


def test_a_collector_that_only_binds_to_the_processor_is_taken(make_processor):
    class ReadsStatsItself:
        def bind_processor(self, processor):
            self.processor = processor

    collector = ReadsStatsItself()
    p = make_processor(lambda b: b, metrics_collector=collector)
    assert collector.processor is p
    assert p.enqueue_predict(np.array([1])).result(timeout=10)[0] == 1

"""The collector protocol's per-request methods, and the Prometheus exporter built on them:
scrape a registry after a known load and check every number."""

import asyncio
import gc
import re
import threading

import numpy as np
import pytest
from extras import require

import batchproc
from batchproc import (
    BatchTimeoutError,
    ProcessorStoppedError,
    QueueFullError,
    QueueTimeoutError,
)

prometheus_client = require("prometheus_client", "prometheus")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from batchproc.observe.prometheus import PrometheusMetrics  # noqa: E402


class Protocol:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        self.rejected = 0
        self.cancelled = 0
        self.bound = None

    def bind_processor(self, processor):
        self.bound = processor

    def record_requests(self, latencies, queue_times, outcome):
        with self.lock:
            assert len(latencies) == len(queue_times)
            assert all(0.0 <= q <= lat for q, lat in zip(queue_times, latencies))
            self.requests.append((len(latencies), outcome))

    def record_rejected(self, count):
        self.rejected += count

    def record_cancelled(self, count):
        self.cancelled += count

    def count(self, outcome):
        return sum(n for n, o in self.requests if o == outcome)


def test_the_protocol_reports_each_request_once(make_processor):
    collector = Protocol()

    def model(batch):
        if (batch < 0).any():
            raise ValueError("negative")
        return batch

    processor = make_processor(model, metrics_collector=collector, max_queue_size=20,
                               max_retries=0, max_batch_size=8)
    assert collector.bound is processor
    processor.pause()
    good = [processor.enqueue_predict(np.array([[float(i)]])) for i in range(15)]
    bad = [processor.enqueue_predict(np.array([[-1.0]])) for _ in range(3)]
    doomed = [processor.enqueue_predict(np.array([[5.0]])) for _ in range(2)]
    with pytest.raises(QueueFullError):
        processor.enqueue_predict(np.array([[1.0]]), timeout=0)
    for f in doomed:
        assert f.cancel()
    processor.resume()
    for f in good:
        f.result(10)
    for f in bad:
        with pytest.raises(ValueError):
            f.result(10)
    assert collector.count("ok") == 15
    assert collector.count("error") == 3
    assert (collector.rejected, collector.cancelled) == (1, 2)


def _scrape(registry):
    """{(sample name, frozenset(labels)): value} from the text exposition, parsed back."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, out


def _value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def test_scraped_numbers_match_a_known_load(make_processor):
    registry = CollectorRegistry()
    release = threading.Event()
    started = threading.Event()

    def model(batch):
        if (batch < 0).any():
            raise ValueError("negative")
        if (batch == 1e6).any():
            started.set()
            release.wait(10)
        return batch

    processor = make_processor(
        model, metrics_collector=PrometheusMetrics("mlp", registry), max_queue_size=200,
        max_retries=0, max_batch_size=10)
    processor.pause()
    ok = [processor.enqueue_predict(np.array([[float(i)]])) for i in range(100)]
    processor.resume()
    for f in ok:
        f.result(10)
    processor.pause()
    failing = [processor.enqueue_predict(np.array([[-1.0]])) for _ in range(4)]
    cancelled = [processor.enqueue_predict(np.array([[2.0]])) for _ in range(3)]
    for f in cancelled:
        f.cancel()
    processor.resume()
    for f in failing:
        with pytest.raises(ValueError):
            f.result(10)

    # While one batch is stuck in the model with 5 requests queued behind it: the gauges.
    stuck = processor.enqueue_predict(np.array([[1e6]]))
    assert started.wait(10)
    processor.pause()
    queued = [processor.enqueue_predict(np.array([[3.0]])) for _ in range(5)]
    text, samples = _scrape(registry)
    assert _value(samples, "batchproc_queue_depth", processor="mlp") == 5
    assert _value(samples, "batchproc_batches_in_flight", processor="mlp") == 1
    release.set()
    stuck.result(10)
    processor.resume()
    for f in queued:
        f.result(10)

    # Refused at enqueue: a full queue.
    processor.pause()
    fill = [processor.enqueue_predict(np.array([[4.0]])) for _ in range(200)]
    for _ in range(7):
        with pytest.raises(QueueFullError):
            processor.enqueue_predict(np.array([[4.0]]), timeout=0)
    processor.resume()
    for f in fill:
        f.result(10)

    text, samples = _scrape(registry)
    completed = 100 + 1 + 5 + 200
    assert _value(samples, "batchproc_requests_total", processor="mlp",
                  outcome="completed") == completed
    assert _value(samples, "batchproc_requests_total", processor="mlp", outcome="failed") == 4
    assert _value(samples, "batchproc_requests_total", processor="mlp",
                  outcome="cancelled") == 3
    assert _value(samples, "batchproc_requests_total", processor="mlp",
                  outcome="rejected") == 7
    assert _value(samples, "batchproc_requests_total", processor="mlp", outcome="expired") == 0
    requests = completed + 4
    for name in ("batchproc_request_latency_seconds", "batchproc_queue_time_seconds"):
        assert _value(samples, f"{name}_count", processor="mlp") == requests
        assert _value(samples, f"{name}_bucket", processor="mlp", le="+Inf") == requests
        assert 0 < _value(samples, f"{name}_sum", processor="mlp") < requests * 10
        assert f"# TYPE {name} histogram" in text
    # Batches of at most 10 rows: every call falls in the le="16.0" bucket.
    calls = _value(samples, "batchproc_batch_size_rows_count", processor="mlp")
    assert calls == _value(samples, "batchproc_model_call_duration_seconds_count",
                           processor="mlp")
    assert _value(samples, "batchproc_batch_size_rows_bucket", processor="mlp",
                  le="16.0") == calls
    assert _value(samples, "batchproc_batch_size_rows_sum", processor="mlp") >= requests
    assert calls >= requests / 10
    # Buckets are cumulative and end at the count.
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in samples.items()
                     if k[0] == "batchproc_request_latency_seconds_bucket")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    # (the TYPE line names the counter with or without _total, by prometheus_client version)
    assert re.search(r"^# TYPE batchproc_requests(_total)? counter$", text, re.M)


class Both(Protocol):
    """The protocol's record, and a Prometheus registry fed by the same calls."""

    def __init__(self, prometheus):
        super().__init__()
        self.prometheus = prometheus

    def record_requests(self, latencies, queue_times, outcome):
        super().record_requests(latencies, queue_times, outcome)
        self.prometheus.record_requests(latencies, queue_times, outcome)

    def record_rejected(self, count):
        super().record_rejected(count)
        self.prometheus.record_rejected(count)

    def record_cancelled(self, count):
        super().record_cancelled(count)
        self.prometheus.record_cancelled(count)


def test_every_outcome_is_counted_once_and_alike_on_every_surface(make_processor):
    registry = CollectorRegistry()
    collector = Both(PrometheusMetrics("all", registry))
    release = threading.Event()

    def model(items):
        if "hang" in items:
            release.wait(10)
        if "bad" in items:
            raise ValueError("bad item")
        return items

    p = make_processor(model, metrics_collector=collector, max_batch_size=1,
                       max_queue_size=2, max_retries=0, item_timeout=1.0)
    # completed: 3; failed: 2 (the model raised); timed_out: 1 (item_timeout).
    assert [p.enqueue_predict("ok").result(10) for _ in range(3)] == ["ok"] * 3
    for _ in range(2):
        assert isinstance(p.enqueue_predict("bad").exception(10), ValueError)
    assert isinstance(p.enqueue_predict("hang").exception(10), BatchTimeoutError)
    release.set()
    # expired: 1 (max_queue_time ran out while paused; never dispatched).
    p.pause()
    assert isinstance(p.enqueue_predict("late", max_queue_time=0.01).exception(10),
                      QueueTimeoutError)
    # cancelled: 3, one per path, each while queued.
    assert p.enqueue_predict("c").cancel()

    async def cancel_and_refuse_from_a_loop():
        assert p.enqueue_predict_async("c").cancel()
        task = asyncio.ensure_future(p.apredict("c"))
        await asyncio.sleep(0)  # queued by its first step
        assert task.cancel()
        # rejected: 5, from every path (a full queue of 2; later a stopped processor).
        fill = [p.enqueue_predict("fill") for _ in range(2)]
        with pytest.raises(QueueFullError):
            p.enqueue_predict("x", timeout=0)
        p.enqueue("x", timeout=0)  # fire and forget: refused and counted, not raised
        with pytest.raises(QueueFullError):
            p.enqueue_predict_async("x")
        with pytest.raises(QueueFullError):
            await p.apredict("x", timeout=0)
        return fill

    fill = asyncio.run(cancel_and_refuse_from_a_loop())
    p.resume()
    assert [f.result(10) for f in fill] == ["fill"] * 2  # completed: 5 in all
    p.stop()
    with pytest.raises(ProcessorStoppedError):
        p.enqueue_predict("x")

    expected = dict(completed=5, failed=2, timed_out=1, expired=1, cancelled=3, rejected=5)
    stats = p.get_stats()
    assert dict(
        completed=stats["total_processed"],
        failed=stats["total_errors"] - stats["total_timed_out"],
        timed_out=stats["total_timed_out"], expired=stats["total_expired"],
        cancelled=stats["total_cancelled"], rejected=stats["total_rejected"]) == expected
    assert stats["total_accepted"] == 12 and stats["queue_size"] == 0
    _, samples = _scrape(registry)
    assert {outcome: _value(samples, "batchproc_requests_total", processor="all",
                            outcome=outcome) for outcome in expected} == expected
    assert dict(completed=collector.count("ok"), failed=collector.count("error"),
                timed_out=collector.count("timeout"), expired=collector.count("expired"),
                cancelled=collector.cancelled, rejected=collector.rejected) == expected


def test_apredict_and_async_paths_are_counted(make_processor):
    registry = CollectorRegistry()
    processor = make_processor(lambda batch: batch, max_queue_size=8,
                               metrics_collector=PrometheusMetrics("aio", registry))

    async def main():
        await asyncio.gather(*(processor.apredict(np.array([[1.0]])) for _ in range(100)))
        processor.pause()
        kept = [processor.enqueue_predict_async(np.array([[1.0]])) for _ in range(8)]
        with pytest.raises(QueueFullError):
            processor.enqueue_predict_async(np.array([[1.0]]))
        with pytest.raises(QueueFullError):
            await processor.apredict(np.array([[1.0]]), timeout=0.01)
        processor.resume()
        await asyncio.gather(*kept)

    asyncio.run(main())
    _, samples = _scrape(registry)
    assert _value(samples, "batchproc_requests_total", processor="aio",
                  outcome="completed") == 108
    assert _value(samples, "batchproc_requests_total", processor="aio", outcome="rejected") == 2


def test_names_label_processors_and_continue_across_restarts():
    registry = CollectorRegistry()
    f_metrics = PrometheusMetrics("f", registry)

    def ident(items):
        return items

    f = batchproc.batch(max_batch_size=4, metrics_collector=f_metrics)(ident)
    g_metrics = PrometheusMetrics("g", registry)
    with batchproc.BatchProcessor(metrics_collector=g_metrics) as g:
        g.start(lambda items: items)
        g.enqueue_predict(["x"]).result(10)
    try:
        assert f(1) == 1
        f.stop()
        # Decorated again (stop() is final): a fresh processor, the same series.
        f = batchproc.batch(max_batch_size=4, metrics_collector=f_metrics)(ident)
        assert f(2) == 2
    finally:
        f.stop()
    _, samples = _scrape(registry)
    assert _value(samples, "batchproc_requests_total", processor="f", outcome="completed") == 2
    assert _value(samples, "batchproc_requests_total", processor="g", outcome="completed") == 1


@pytest.mark.parametrize("bounds", [(0.1, 1.0, float("inf")), (float("inf"), 0.1, 1.0),
                                    (0.1, 1.0)])
def test_an_infinite_bucket_given_is_the_one_plus_inf_bucket(make_processor, bounds):
    registry = CollectorRegistry()
    p = make_processor(lambda items: items, PrometheusMetrics(
        "p", registry, latency_buckets=bounds, size_buckets=bounds, call_buckets=bounds))
    p.enqueue_predict(["x"]).result(10)
    p.stop(timeout=5.0)
    text = generate_latest(registry).decode()
    for family in ("batchproc_request_latency_seconds", "batchproc_batch_size_rows",
                   "batchproc_model_call_duration_seconds", "batchproc_queue_time_seconds"):
        les = re.findall(family + r'_bucket\{[^}]*le="([^"]+)"', text)
        assert les == ["0.1", "1.0", "+Inf"], (family, les)


@pytest.mark.parametrize("bounds,error,says", [
    ((0.1, 0.1, 1.0), ValueError, "not repeat a bound"),
    ((0.1, float("nan")), ValueError, "be numbers other than NaN and -inf"),
    ((float("-inf"), 1.0), ValueError, "be numbers other than NaN and -inf"),
    ((0.1, "soon"), TypeError, "be numbers, got"),
    ((0.1, None), TypeError, "be numbers, got"),
])
@pytest.mark.parametrize("which", ["latency_buckets", "size_buckets", "call_buckets"])
def test_bucket_bounds_that_make_no_buckets_are_refused(bounds, error, says, which):
    with pytest.raises(error, match=f"^{which} must {re.escape(says)}"):
        PrometheusMetrics("p", CollectorRegistry(), **{which: bounds})


def test_bucket_bounds_given_as_a_generator_are_all_used(make_processor):
    registry = CollectorRegistry()
    p = make_processor(lambda items: items, PrometheusMetrics(
        "p", registry, latency_buckets=(b for b in (0.1, 1.0))))
    p.enqueue_predict(["x"]).result(10)
    p.stop(timeout=5.0)
    text = generate_latest(registry).decode()
    les = re.findall(r'batchproc_request_latency_seconds_bucket\{[^}]*le="([^"]+)"', text)
    assert les == ["0.1", "1.0", "+Inf"]


def test_calls_refused_after_stop_count_alike_in_get_stats_and_the_metrics():
    # A stopped decorated function refuses every call itself (its processor is gone
    # from it); the processor that stop() stopped, kept by whoever reads its stats,
    # counts them in total_rejected as the metrics count them: the same things.
    registry = CollectorRegistry()

    @batchproc.batch(max_batch_size=4, metrics_collector=PrometheusMetrics("h", registry))
    def h(items):
        return items

    assert h(1) == 1
    processor = h.processor
    h.stop()
    for call in (lambda: h(2), lambda: h.submit(3), lambda: asyncio.run(h.acall(4)),
                 lambda: h.processor):  # a look at it is no request: not counted
        with pytest.raises(ProcessorStoppedError):
            call()
    _, samples = _scrape(registry)
    assert _value(samples, "batchproc_requests_total", processor="h", outcome="rejected") == 3
    assert processor.get_stats()["total_rejected"] == 3


def test_the_gauges_add_up_every_processor_under_one_name():
    # The instances of a decorated method share one collector, so one name: the gauges
    # are the sum of their queues, not the queue of whichever instance bound last.
    registry = CollectorRegistry()

    class Model:
        @batchproc.batch(max_batch_size=4, metrics_collector=PrometheusMetrics("m", registry))
        def predict(self, items):
            return items

    first, second = Model(), Model()
    try:
        first.predict.processor.pause()
        second.predict.processor.pause()
        futures = [first.predict.submit(i) for i in range(2)]
        futures += [second.predict.submit(i) for i in range(3)]
        _, samples = _scrape(registry)
        assert _value(samples, "batchproc_queue_depth", processor="m") == 5
        first.predict.processor.resume()
        second.predict.processor.resume()
        assert [f.result(10) for f in futures] == [0, 1, 0, 1, 2]
        _, samples = _scrape(registry)
        assert _value(samples, "batchproc_queue_depth", processor="m") == 0
        assert _value(samples, "batchproc_requests_total", processor="m",
                      outcome="completed") == 5
    finally:
        Model.predict.stop()
    del first, second, futures  # a future holds its instance until it is dropped
    # With no live processor left under the name, no gauge sample is served.
    gc.collect()
    _, samples = _scrape(registry)
    assert ("batchproc_queue_depth", frozenset({("processor", "m")})) not in samples


@pytest.mark.parametrize("kind", ["function", "method"])
def test_a_call_refused_after_a_decorated_stop_counts_as_rejected(kind):
    registry = CollectorRegistry()
    decorate = batchproc.batch(max_batch_size=4,
                               metrics_collector=PrometheusMetrics("s", registry))
    if kind == "function":
        call = decorate(lambda items: items)
        stop = call.stop
    else:
        class Model:
            @decorate
            def predict(self, items):
                return items

        model = Model()
        call = model.predict
        stop = Model.predict.stop
    assert call(1) == 1
    stop()
    for _ in range(2):
        with pytest.raises(ProcessorStoppedError):
            call(2)
    if kind == "method":
        later = Model()  # made after the stop: refused too
        with pytest.raises(ProcessorStoppedError):
            later.predict.submit(3)
    _, samples = _scrape(registry)
    assert _value(samples, "batchproc_requests_total", processor="s",
                  outcome="completed") == 1
    rejected = 3 if kind == "method" else 2
    assert _value(samples, "batchproc_requests_total", processor="s",
                  outcome="rejected") == rejected


def test_the_package_imports_prometheus_client_only_when_asked():
    import subprocess
    import sys

    code = ("import sys, batchproc\n"
            "assert 'prometheus_client' not in sys.modules\n"
            "assert 'ray' not in sys.modules and 'fastapi' not in sys.modules\n"
            "batchproc.PrometheusMetrics\n"
            "assert 'prometheus_client' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("name", [7, None, b"p", ""])
def test_a_name_that_is_no_label_value_is_refused_before_it_breaks_a_scrape(name):
    # Taken, it broke every later scrape of its registry, the application's own
    # metrics included.
    registry = CollectorRegistry()
    mine = prometheus_client.Counter("my_app_requests", "mine", registry=registry)
    mine.inc()
    with pytest.raises(TypeError, match=r"^name must be a non-empty str \(the processor "
                                        r"label\), got "):
        PrometheusMetrics(name, registry)
    assert "my_app_requests_total 1.0" in generate_latest(registry).decode()


def test_a_registry_that_is_not_one_is_refused_saying_so():
    with pytest.raises(TypeError, match=r"^registry must be a prometheus_client "
                                        r"CollectorRegistry or None .*, got str$"):
        PrometheusMetrics("p", "my_registry")


def test_a_registration_the_registry_refused_is_tried_again_not_kept():
    # The first registration failed (a name of the application's took one of ours); the
    # collector was kept all the same, and the next PrometheusMetrics recorded into it,
    # unregistered: nothing exported, nothing said.
    registry = CollectorRegistry()
    taken = prometheus_client.Histogram("batchproc_queue_depth", "the app's",
                                        registry=registry)
    for _ in range(2):
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            PrometheusMetrics("a", registry)
    registry.unregister(taken)
    metrics = PrometheusMetrics("a", registry)
    p = batchproc.BatchProcessor(metrics_collector=metrics)
    p.start(lambda items: items)
    try:
        p.enqueue_predict(["x"]).result(10)
    finally:
        p.stop(timeout=5.0)
    assert ('batchproc_requests_total{outcome="completed",processor="a"} 1.0'
            in generate_latest(registry).decode())


def test_batch_only_failures_are_counted_alike_in_stats_the_protocol_and_the_metrics(
        make_processor):
    # The model's output has one row too few for a batch of more than one request: each
    # batch fails, its requests succeed alone, and every caller is served. Only these
    # counts show that batching stopped working.
    registry = CollectorRegistry()
    prometheus = PrometheusMetrics("batches", registry)
    sizes = []

    class Collector:
        def record_batch_only_failure(self, size):
            sizes.append(size)
            prometheus.record_batch_only_failure(size)

    def loses_a_row_when_batched(batch):
        return batch[:1] if len(batch) > 1 else batch

    p = make_processor(loses_a_row_when_batched, metrics_collector=Collector(),
                       max_workers=1, batch_timeout=0.05)
    for n in (3, 1, 2):  # a lone request is no batch: it cannot fail as one
        p.pause()
        futures = [p.enqueue_predict(np.array([[float(v)]])) for v in range(n)]
        p.resume()
        assert [f.result(timeout=20)[0, 0] for f in futures] == list(range(n))
    p.stop()
    assert sizes == [3, 2]
    assert p.get_stats()["total_batch_only_failures"] == 2
    _, samples = _scrape(registry)
    assert _value(samples, "batchproc_batch_only_failures_total", processor="batches") == 2
    assert _value(samples, "batchproc_requests_total", processor="batches",
                  outcome="completed") == 0  # the collector passed on nothing else


def test_the_call_histograms_count_every_call_and_total_batches_the_delivered_ones(
        make_processor):
    # A failed batch is searched for its failing request: every call of the search is a
    # model call (histograms), only those that returned results are batches delivered.
    registry = CollectorRegistry()
    calls = []

    def model(batch):
        calls.append(3 in batch)
        if 3 in batch:
            raise ValueError("bad item")
        return [x * 2 for x in batch]

    p = make_processor(model, metrics_collector=PrometheusMetrics("search", registry),
                       max_batch_size=8, max_retries=0, max_workers=1)
    p.pause()
    futures = [p.enqueue_predict(v) for v in range(8)]
    p.resume()
    assert [f.exception(timeout=20) is None for f in futures] == [v != 3 for v in range(8)]
    p.stop()
    delivered = calls.count(False)
    assert len(calls) > delivered > 1  # a search: failed calls and delivered ones
    assert p.get_stats()["total_batches"] == delivered
    _, samples = _scrape(registry)
    for name in ("batchproc_batch_size_rows_count",
                 "batchproc_model_call_duration_seconds_count"):
        assert _value(samples, name, processor="search") == len(calls)

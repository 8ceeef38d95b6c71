"""Prometheus metrics for a processor (optional extra ``prometheus``: prometheus_client).

One line attaches it::

    processor = BatchProcessor(config, metrics_collector=PrometheusMetrics("embedder"))

(or ``@batchproc.batch(..., metrics_collector=PrometheusMetrics("embedder"))``), and the
registry (``prometheus_client.REGISTRY`` unless ``registry=`` says otherwise) serves:

=================================================  ==========  ============================
``batchproc_request_latency_seconds``              histogram   enqueue to result or error
``batchproc_queue_time_seconds``                   histogram   enqueue to dispatch
``batchproc_batch_size_rows``                      histogram   rows per model call
``batchproc_model_call_duration_seconds``          histogram   one ``process_func`` call
``batchproc_queue_depth``                          gauge       requests queued now
``batchproc_batches_in_flight``                    gauge       batches being processed now
``batchproc_requests_total{outcome}``              counter     requests by outcome (below)
``batchproc_batch_only_failures_total``            counter     batches that failed while
                                                               each of their requests then
                                                               succeeded on a smaller batch
=================================================  ==========  ============================

every series labelled ``processor`` with the name given. Times are in seconds, sizes in
rows, counts in requests (a request split into chunks counts once).

Each request submitted counts once in ``batchproc_requests_total``, under one
``outcome``, the same count as a key of ``BatchProcessor.get_stats()``:

=============  =================================================  =====================
``completed``  a result                                           ``total_processed``
``failed``     the model's exception, a bad output, ``stop()``    ``total_errors`` less
                                                                  ``total_timed_out``
``timed_out``  the call ran past ``item_timeout``                 ``total_timed_out``
               (``BatchTimeoutError``)
``expired``    ``max_queue_time`` ran out before the call         ``total_expired``
               (``QueueTimeoutError``)
``cancelled``  cancelled by its caller before dispatch            ``total_cancelled``
``rejected``   refused at enqueue, by any path: full queue or     ``total_rejected``
               stopped processor (never accepted)
=============  =================================================  =====================

Why not prometheus_client's ``Histogram``: a batch of 64 requests would make 128 calls
of ``observe``, each taking a lock. Here a batch's latencies are counted into buckets in
one pass under one lock, and a collector hands prometheus_client the totals when the
registry is scraped (its ``HistogramMetricFamily``), together with the two gauges, read
from the processor at that moment. The exposition is the same. (prometheus_client's
multiprocess mode is not supported: each process serves its own registry.)

A name is one set of series within a registry, shared by every processor recorded under
it: the instances of a decorated method (one processor each, one collector), or a
``PrometheusMetrics`` made again under an earlier one's name (a processor restarted, a
decorated function stopped and called again). Their counts go to the same counters and
histograms, and the gauges add up the queues and batches of the live ones.
"""

from __future__ import annotations

import math
import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..errors import ProcessorForkedError
from ..metrics import OUTCOME_ERROR, OUTCOME_EXPIRED, OUTCOME_OK, OUTCOME_TIMEOUT

#: Latency and queue-time buckets (seconds): 0.5 ms to 10 s.
LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Model-call buckets (seconds).
CALL_BUCKETS: tuple[float, ...] = LATENCY_BUCKETS
#: Batch-size buckets (rows): powers of two up to 4096.
SIZE_BUCKETS: tuple[float, ...] = tuple(float(2 ** k) for k in range(13))

OUTCOMES = ("completed", "failed", "timed_out", "expired", "cancelled", "rejected")
_BY_DELIVERY = {OUTCOME_OK: "completed", OUTCOME_ERROR: "failed",
                OUTCOME_TIMEOUT: "timed_out", OUTCOME_EXPIRED: "expired"}
_LABELS = ("processor",)


class _Buckets:
    """A histogram's state: per-bucket counts (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        # +Inf is always the last bucket; one given too is that one (as prometheus_client's
        # Histogram takes it), not a second series with le="inf".
        self.bounds = tuple(sorted(b for b in map(float, bounds) if b != math.inf))
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def add(self, values: Sequence[float]) -> None:  # caller holds the lock
        bounds, counts = self.bounds, self.counts
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # le: a value on a bound is in it
        self.total += sum(values)

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            out.append((repr(bound), float(running)))  # 0.005, 1.0, 4096.0
        out.append(("+Inf", float(running + self.counts[-1])))
        return out


def _checked_bounds(label: str, bounds: Iterable[float]) -> tuple[float, ...]:
    """``bounds`` as a tuple of floats (read once: a generator is used up by it).
    ``ValueError`` unless they are distinct numbers, NaN and -inf excluded (each is a
    series ``le="..."``: two alike would be one bucket twice, and ``le="nan"`` no bucket
    at all); ``TypeError`` for what is no numbers. ``+Inf`` may be given: it is the last
    bucket, always there."""
    try:
        values = tuple(float(b) for b in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"{label} must be numbers, got {bounds!r}") from None
    finite = [v for v in values if v != math.inf]
    if any(math.isnan(v) or v == -math.inf for v in finite):
        raise ValueError(f"{label} must be numbers other than NaN and -inf, got {bounds!r}")
    if len(set(finite)) != len(finite):
        raise ValueError(f"{label} must not repeat a bound, got {bounds!r}")
    return values


class _State:
    """Everything recorded under one processor name."""

    def __init__(self, latency: Sequence[float], size: Sequence[float],
                 call: Sequence[float]) -> None:
        self.lock = threading.Lock()
        self.latency = _Buckets(latency)
        self.queue_time = _Buckets(latency)
        self.size = _Buckets(size)
        self.call = _Buckets(call)
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.batch_only_failures = 0
        # Every live processor bound under this name (the instances of a decorated
        # method share it): the gauges add theirs up, as the counters do.
        self.processors: weakref.WeakSet[Any] = weakref.WeakSet()


class _RegistryCollector:
    """The one collector a registry holds for every batchproc processor in it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.states: dict[str, _State] = {}

    def state(self, name: str, latency: Sequence[float], size: Sequence[float],
              call: Sequence[float]) -> _State:
        with self.lock:
            state = self.states.get(name)
            if state is None:
                state = self.states[name] = _State(latency, size, call)
            return state

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            states = list(self.states.items())
        return self._families(states)

    def _families(self, states: list[tuple[str, _State]] | None = None) -> Iterator[Metric]:
        latency = HistogramMetricFamily(
            "batchproc_request_latency_seconds",
            "Time from enqueue to the request's result or error.", labels=_LABELS)
        queue_time = HistogramMetricFamily(
            "batchproc_queue_time_seconds",
            "Time from enqueue to dispatch in a batch.", labels=_LABELS)
        size = HistogramMetricFamily(
            "batchproc_batch_size_rows", "Rows per model call.", labels=_LABELS)
        call = HistogramMetricFamily(
            "batchproc_model_call_duration_seconds",
            "Duration of one call of the batch function.", labels=_LABELS)
        depth = GaugeMetricFamily(
            "batchproc_queue_depth", "Requests waiting in the queue.", labels=_LABELS)
        in_flight = GaugeMetricFamily(
            "batchproc_batches_in_flight", "Batches being processed.", labels=_LABELS)
        requests = CounterMetricFamily(
            "batchproc_requests", "Requests by outcome: completed, failed, timed_out "
            "(item_timeout), expired (max_queue_time), cancelled (before dispatch), "
            "rejected (at enqueue: queue full or stopped).",
            labels=(*_LABELS, "outcome"))
        batch_only_failures = CounterMetricFamily(
            "batchproc_batch_only_failures", "Batches that failed as a whole while each of "
            "their requests then succeeded on a smaller batch: process_func fails on "
            "batches (out of memory at that size, an output that cannot be split).",
            labels=_LABELS)
        for name, state in states or ():
            with state.lock:
                for family, buckets in ((latency, state.latency),
                                        (queue_time, state.queue_time),
                                        (size, state.size), (call, state.call)):
                    family.add_metric([name], buckets.cumulative(), buckets.total)
                counts = dict(state.requests)
                batch_only_failures.add_metric([name], float(state.batch_only_failures))
            for outcome, count in counts.items():
                requests.add_metric([name, outcome], float(count))
            gauges = _gauges(state)
            if gauges is not None:
                depth.add_metric([name], gauges[0])
                in_flight.add_metric([name], gauges[1])
        yield from (latency, queue_time, size, call, depth, in_flight, requests,
                    batch_only_failures)


def _gauges(state: _State) -> tuple[float, float] | None:
    """Queue depth and batches in flight summed over the name's live processors; None
    when it has none (a forked child's inherited copies do not count: their queues are
    the parent's)."""
    with state.lock:
        processors = list(state.processors)
    depth = in_flight = 0.0
    live = False
    for processor in processors:
        try:
            stats = processor.get_stats()
        except ProcessorForkedError:
            continue
        live = True
        depth += stats["queue_size"]
        in_flight += stats["active_batches"]
    return (depth, in_flight) if live else None


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _RegistryCollector] = (
    weakref.WeakKeyDictionary())
_collectors_lock = threading.Lock()


def _collector_for(registry: CollectorRegistry) -> _RegistryCollector:
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _RegistryCollector()
            registry.register(collector)  # may raise (a name taken): nothing kept then
            _collectors[registry] = collector
        return collector


class PrometheusMetrics:
    """A metrics collector (``metrics_collector=``) that feeds a Prometheus registry.

    ``name`` is the ``processor`` label. ``registry`` defaults to prometheus_client's
    global one (what ``start_http_server`` and ``make_asgi_app`` serve). Bucket bounds
    can be changed per name (the first ``PrometheusMetrics`` of a name sets them).
    """

    def __init__(self, name: str = "default", registry: CollectorRegistry | None = None, *,
                 latency_buckets: Iterable[float] = LATENCY_BUCKETS,
                 size_buckets: Iterable[float] = SIZE_BUCKETS,
                 call_buckets: Iterable[float] = CALL_BUCKETS) -> None:
        if not isinstance(name, str) or not name:
            # Checked here: a label value that is no string breaks every later scrape of
            # the registry, the application's own metrics included.
            raise TypeError(f"name must be a non-empty str (the processor label), got "
                            f"{name!r}")
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise TypeError("registry must be a prometheus_client CollectorRegistry or "
                            f"None (the global one), got {type(registry).__name__}")
        latency_buckets = _checked_bounds("latency_buckets", latency_buckets)
        size_buckets = _checked_bounds("size_buckets", size_buckets)
        call_buckets = _checked_bounds("call_buckets", call_buckets)
        self.name = name
        self.registry = REGISTRY if registry is None else registry
        self._state = _collector_for(self.registry).state(
            name, latency_buckets, size_buckets, call_buckets)

    # The collector protocol (batchproc.metrics), called on the processor's threads.

    def bind_processor(self, processor: Any) -> None:
        state = self._state
        with state.lock:
            state.processors.add(processor)

    def record_batch(self, size: int, rows: int, queue_time: float, processing_time: float,
                     outcome: str) -> None:
        state = self._state
        with state.lock:
            state.size.add((float(rows),))
            state.call.add((processing_time,))

    def record_requests(self, latencies: list[float], queue_times: list[float],
                        outcome: str) -> None:
        state = self._state
        key = _BY_DELIVERY.get(outcome, "failed")
        with state.lock:
            state.latency.add(latencies)
            state.queue_time.add(queue_times)
            state.requests[key] += len(latencies)

    def record_rejected(self, count: int) -> None:
        state = self._state
        with state.lock:
            state.requests["rejected"] += count

    def record_cancelled(self, count: int) -> None:
        state = self._state
        with state.lock:
            state.requests["cancelled"] += count

    def record_batch_only_failure(self, size: int) -> None:
        state = self._state
        with state.lock:
            state.batch_only_failures += 1

    def __repr__(self) -> str:
        return f"PrometheusMetrics({self.name!r})"

"""Where a burst's time goes: batchproc's own path, the load generator's, the collector's.

    python benchmarks/profile_burst.py                   # a burst of 50,000, 5 runs
    python benchmarks/profile_burst.py --burst 20000 --runs 9

One thread submits a burst of requests (one row of 64 float32; identity model, max batch
64, max delay 5 ms, batchproc's default ADAPTIVE) and waits for them all, as the peer
comparison's burst does. Each run is a fresh processor, after a short warm-up, with the
heap frozen (``gc.freeze``) as the comparison freezes it. Reported per request (median
over the runs, microseconds), each measured on its own:

* ``enqueue_predict``: the submitting thread's call (describe, future, native push), on a
  processor not started, so that no worker competes for the GIL;
* ``workers``: the worker's side alone: the burst queued on a paused processor, then
  served from ``resume()`` to the last result (pop, batch, model, delivery, futures);
* ``burst``: submit all, then ``result()`` each, first submit to last result; and of it,
  the time in CPython's cyclic garbage collector (``gc.callbacks``);
* ``load generator alone``: ``batchproc.bench``'s burst against a target whose futures
  are done at once (what the comparison's harness adds per request, for every system);
* ``burst through the load generator``: the same burst as the comparison runs it;
* the last two for the minimal batcher the comparison measures batchproc against
  (``batchproc.bench.minimal``).

The peer comparison's burst target is the ratio of the two systems' bursts through the
load generator, whose own cost is in both sides: the table ends with that ratio and
with the ratio of the bursts without it.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from batchproc import BatchProcessor, BatchProcessorConfig
from batchproc.bench.loads import Bounds, Load, run_load
from batchproc.bench.minimal import MinimalBatcher
from batchproc.futures import RequestFuture

ROW = np.ones((1, 64), np.float32)
WARMUP = 200


class _GCClock:
    """Seconds spent in the cyclic collector since ``reset()``."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start

    def reset(self) -> None:
        self.total = 0.0


def _processor(burst: int) -> BatchProcessor[Any, Any]:
    p: BatchProcessor[Any, Any] = BatchProcessor(BatchProcessorConfig(
        max_batch_size=64, batch_timeout=0.005, max_queue_size=burst))
    p.start(lambda batch: batch)
    for _ in range(WARMUP):
        p.enqueue_predict(ROW).result()
    return p


def enqueue_only(burst: int, clock: _GCClock) -> dict[str, float]:
    # Not started: a paused one's workers would wake at every push to find it paused.
    p: BatchProcessor[Any, Any] = BatchProcessor(BatchProcessorConfig(
        max_batch_size=64, batch_timeout=0.005, max_queue_size=burst))
    submit = p.enqueue_predict
    t0 = time.perf_counter()
    for _ in range(burst):
        submit(ROW)
    elapsed = time.perf_counter() - t0
    p.stop()
    return {"us": elapsed / burst * 1e6}


def workers_alone(burst: int, clock: _GCClock) -> dict[str, float]:
    p = _processor(burst)
    p.pause()
    futures = [p.enqueue_predict(ROW) for _ in range(burst)]
    clock.reset()
    t0 = time.perf_counter()
    p.resume()
    futures[-1].result()  # FIFO at one priority: the last one is served last
    elapsed = time.perf_counter() - t0
    in_gc = clock.total
    for f in futures:
        f.result()
    p.stop()
    return {"us": elapsed / burst * 1e6, "gc_us": in_gc / burst * 1e6}


def _timed_burst(submit: Callable[[Any], Any], burst: int,
                 clock: _GCClock) -> dict[str, float]:
    clock.reset()
    t0 = time.perf_counter()
    futures = [submit(ROW) for _ in range(burst)]
    for f in futures:
        f.result()
    elapsed = time.perf_counter() - t0
    return {"us": elapsed / burst * 1e6, "gc_us": clock.total / burst * 1e6}


def plain_burst(burst: int, clock: _GCClock) -> dict[str, float]:
    p = _processor(burst)
    figures = _timed_burst(p.enqueue_predict, burst, clock)
    p.stop()
    return figures


def _minimal() -> MinimalBatcher:
    b = MinimalBatcher(lambda batch: batch, max_batch=64, max_delay=0.005).start()
    for _ in range(WARMUP):
        b.submit(ROW).result()
    return b


def minimal_burst(burst: int, clock: _GCClock) -> dict[str, float]:
    b = _minimal()
    figures = _timed_burst(b.submit, burst, clock)
    b.stop()
    return figures


class _DoneAtOnce:
    """A target whose futures are done when returned: only the generator's work is left."""

    def submit(self, item: Any, priority: int) -> RequestFuture:
        f = RequestFuture()
        f.set_result(item)
        return f


class _Batchproc:
    def __init__(self, p: BatchProcessor[Any, Any]) -> None:
        self.submit = lambda item, priority: p.enqueue_predict(item, priority=priority)


def generator_alone(burst: int, clock: _GCClock) -> dict[str, float]:
    res = run_load(_DoneAtOnce(), Load("burst", burst=burst), Bounds(None, 60.0))
    return {"us": res.elapsed / burst * 1e6}


class _Minimal:
    def __init__(self, b: MinimalBatcher) -> None:
        self.submit = lambda item, priority: b.submit(item)


def _through_generator(target: Any, burst: int, clock: _GCClock) -> dict[str, float]:
    clock.reset()
    res = run_load(target, Load("burst", burst=burst), Bounds(None, 60.0))
    in_gc = clock.total
    if res.completed != burst:
        raise SystemExit(f"the burst did not complete: {res.completed} of {burst}")
    return {"us": res.elapsed / burst * 1e6, "gc_us": in_gc / burst * 1e6}


def generator_burst(burst: int, clock: _GCClock) -> dict[str, float]:
    p = _processor(burst)
    figures = _through_generator(_Batchproc(p), burst, clock)
    p.stop()
    return figures


def minimal_generator_burst(burst: int, clock: _GCClock) -> dict[str, float]:
    b = _minimal()
    figures = _through_generator(_Minimal(b), burst, clock)
    b.stop()
    return figures


MEASURES: list[tuple[str, Callable[[int, _GCClock], dict[str, float]]]] = [
    ("enqueue_predict alone", enqueue_only),
    ("workers alone", workers_alone),
    ("burst", plain_burst),
    ("load generator alone", generator_alone),
    ("burst through the load generator", generator_burst),
    ("minimal batcher: burst", minimal_burst),
    ("minimal batcher: burst through the generator", minimal_generator_burst),
]
# (system, reference): the minimal batcher's time per request over batchproc's
RATIOS = [("burst", "minimal batcher: burst"),
          ("burst through the load generator",
           "minimal batcher: burst through the generator")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--burst", type=int, default=50_000, help="requests per burst")
    ap.add_argument("--runs", type=int, default=5, help="runs of each measure (median)")
    args = ap.parse_args(argv)
    if args.burst < WARMUP or args.runs < 1:
        ap.error(f"--burst must be >= {WARMUP} and --runs >= 1")
    clock = _GCClock()
    gc.collect()
    gc.freeze()
    figures: dict[str, list[dict[str, float]]] = {name: [] for name, _ in MEASURES}
    for run in range(args.runs):  # the measures take turns: drift hits them alike
        for name, measure in MEASURES:
            figures[name].append(measure(args.burst, clock))
        print(f"run {run + 1}/{args.runs} done", flush=True)
    print(f"\nper request, microseconds (median of {args.runs} runs, burst of "
          f"{args.burst:,}):\n")
    width = max(len(name) for name, _ in MEASURES)
    print(f"| {'measure':<{width}} | {'time':>7} | {'in GC':>7} | {'req/s':>9} |")
    print(f"|{'-' * (width + 2)}|{'-' * 8}:|{'-' * 8}:|{'-' * 10}:|")
    medians = {}
    for name, _ in MEASURES:
        us = medians[name] = statistics.median(f["us"] for f in figures[name])
        gcs = [f["gc_us"] for f in figures[name] if "gc_us" in f]
        in_gc = f"{statistics.median(gcs):.2f}" if gcs else "-"
        print(f"| {name:<{width}} | {us:7.2f} | {in_gc:>7} | {1e6 / us:9,.0f} |")
    print()
    for system, reference in RATIOS:
        print(f"batchproc against the minimal batcher, {system}: "
              f"{medians[reference] / medians[system]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

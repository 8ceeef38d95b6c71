"""One run of compare_versions.py, in the interpreter of the version being measured.

    python benchmarks/version_run.py '{"model": "identity", "load": "burst", "burst": 50000,
                                       "cap": 3.0}'
    python benchmarks/version_run.py '{"model": "mlp", "load": "rate-9000", "burst": 0,
                                       "cap": 3.0, "seed": 1}'

Runs the batchproc installed for *this* interpreter (the script's own folder, not the
source tree, is first on sys.path) through ``batchproc.bench``: the same target, loads
and measurement in every version since the benchmark package was written, so two
versions differ only in the library under test. A short warm-up run of the same load
comes first (thread start-up, first-call costs); then one measured run. Loads: ``burst``,
a number of closed-loop clients, ``asyncio-N``: N closed-loop asyncio tasks on one event
loop (``enqueue_predict_async``), ``rate-N``: open-loop Poisson arrivals at N
requests/s from one thread (``seed`` picks the arrivals), ``map`` (``asyncio-map``):
``burst`` items, distinct rows, through ``BatchProcessor.map`` (``amap``), timed from the
call to the last result in hand (``map-gen``: the same items from a generator, an async
one for ``amap``), or ``map-rate-N``: a stream of items arriving at N
items/s (Poisson, for ``cap`` seconds) through ``map``, each item's latency from its
arrival to its result handed out (the ``map`` method is older than the benchmark package,
so these loads call it directly). Prints one JSON object on stdout: where
batchproc was imported from, versions, the figures, and the process's CPU seconds over
the measured run (all threads: the load generator's too, the same in every version).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

MAX_BATCH = 64
MAX_DELAY = 0.005
FEATURES = 64
WARMUP_S = 0.3


def run_map(model: Any, items: int, asynchronous: bool, rate: float | None = None,
            seed: int = 0, generator: bool = False) -> dict[str, Any]:
    """``items`` rows through ``map`` (or ``amap``) of a fresh processor, all at hand (a
    list, or with ``generator`` a generator, async for ``amap``) or (``rate``) arriving
    at that many items/s from a generator: figures in the fields of
    ``batchproc.bench``'s results (throughput: items/s; latency: from an item's arrival
    to its result in hand)."""
    import asyncio

    import numpy as np

    from batchproc import BatchProcessor, BatchProcessorConfig

    rng = np.random.default_rng(0)
    data = [rng.standard_normal((1, FEATURES), dtype=np.float32) for _ in range(items)]
    due = (np.cumsum(np.random.default_rng(seed).exponential(1 / rate, items)) if rate
           else np.zeros(items))
    arrived = [0.0] * items
    handed = [0.0] * items
    clock = time.perf_counter

    # A stream: each item once its arrival time (from the call, t0) has come.
    def source() -> Any:
        for k, x in enumerate(data):
            if (wait := t0 + due[k] - clock()) > 0:
                time.sleep(wait)
            arrived[k] = clock()
            yield x

    async def asource() -> Any:
        for k, x in enumerate(data):
            if (wait := t0 + due[k] - clock()) > 0:
                await asyncio.sleep(wait)
            arrived[k] = clock()
            yield x

    p: Any = BatchProcessor(BatchProcessorConfig(max_batch_size=MAX_BATCH,
                                                 batch_timeout=MAX_DELAY))
    p.start(model)
    try:
        t0 = clock()
        if not rate:
            arrived = [t0] * items  # all at hand: latency from the call
        if asynchronous:
            async def collect() -> None:
                k = 0
                # Items in memory as a list, as compare_map.py gives them; a stream from
                # an async generator (amap reads it in a task of its own).
                async for _ in p.amap(asource() if rate or generator else data):
                    handed[k] = clock()
                    k += 1
            asyncio.run(collect())
        else:
            for k, _ in enumerate(p.map(source() if rate or generator else data)):
                handed[k] = clock()
        elapsed = clock() - t0
        stats = p.get_stats()
    finally:
        p.stop()
    ms = 1e3 * (np.array(handed) - np.array(arrived))
    return {"system": "batchproc", "model": "", "load": "map", "throughput": items / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "mean_batch": stats["avg_batch_size"], "batches": stats["total_batches"],
            "submitted": items, "completed": items, "errors": 0, "unfinished": 0,
            "elapsed_s": elapsed, "stopped_by": "requests"}


def main(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    import batchproc
    from batchproc.bench.loads import Bounds, Load
    from batchproc.bench.models import make_model
    from batchproc.bench.runner import run_target
    from batchproc.bench.targets import Batchproc, BatchprocAsync

    key, burst, cap = spec["load"], int(spec["burst"]), float(spec["cap"])
    kind = Batchproc
    if key.startswith("asyncio-"):
        kind, key = BatchprocAsync, key[8:]
    if key == "burst":
        load = Load("burst", burst=burst, features=FEATURES)
        warm = Load("burst", burst=min(burst, 2_000), features=FEATURES)
        bounds = Bounds(None, 3 * cap)
    elif key.startswith("rate-"):
        load = warm = Load("rate", rate=float(key[5:]), features=FEATURES,
                           seed=int(spec.get("seed", 0)))
        bounds = Bounds(None, cap)
    elif not key.startswith("map"):
        load = warm = Load("closed", clients=int(key), features=FEATURES)
        bounds = Bounds(None, cap)
    name = spec["model"]
    if name.startswith("fixed-") and name.endswith("ms"):  # fixed-50ms: 50 ms per call
        model = make_model("fixed", features=FEATURES, model_ms=float(name[6:-2]))
    else:
        model = make_model(name, features=FEATURES)

    def target() -> Batchproc:
        return kind(MAX_BATCH, MAX_DELAY, queue_size=max(1000, burst))

    if key in ("map", "map-gen") or key.startswith("map-rate-"):
        rate = float(key[9:]) if key.startswith("map-rate-") else None
        items = burst if rate is None else max(1, round(rate * cap))
        run_map(model, min(items, 2_000), kind is BatchprocAsync)  # warm-up, all at hand
        cpu = time.process_time()
        result = run_map(model, items, kind is BatchprocAsync, rate, int(spec.get("seed", 0)),
                         generator=key == "map-gen")
        result["model"] = spec["model"]
    else:
        run_target(target(), model, spec["model"], warm, Bounds(None, WARMUP_S))
        cpu = time.process_time()
        result = run_target(target(), model, spec["model"], load, bounds).to_dict()
    cpu = time.process_time() - cpu
    return {
        "batchproc_path": os.path.dirname(os.path.abspath(batchproc.__file__)),
        "batchproc_version": batchproc.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "result": {**result, "process_cpu_s": cpu},
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))

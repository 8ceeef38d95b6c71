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
requests/s from one thread (``seed`` picks the arrivals), or ``map`` (``asyncio-map``):
``burst`` items, distinct rows, through ``BatchProcessor.map`` (``amap``), timed from the
call to the last result in hand (the ``map`` method is older than the benchmark package,
so this load calls it directly). Prints one JSON object on stdout: where
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


def run_map(model: Any, items: int, asynchronous: bool) -> dict[str, Any]:
    """``items`` rows through ``map`` (or ``amap``) of a fresh processor: figures in the
    fields of ``batchproc.bench``'s results (throughput: items/s; no per-item latency)."""
    import asyncio

    import numpy as np

    from batchproc import BatchProcessor, BatchProcessorConfig

    rng = np.random.default_rng(0)
    data = [rng.standard_normal((1, FEATURES), dtype=np.float32) for _ in range(items)]
    p: Any = BatchProcessor(BatchProcessorConfig(max_batch_size=MAX_BATCH,
                                                 batch_timeout=MAX_DELAY))
    p.start(model)
    try:
        t0 = time.perf_counter()
        if asynchronous:
            async def collect() -> list[Any]:
                return [y async for y in p.amap(data)]
            out = asyncio.run(collect())
        else:
            out = list(p.map(data))
        elapsed = time.perf_counter() - t0
        stats = p.get_stats()
    finally:
        p.stop()
    nan = float("nan")
    return {"system": "batchproc", "model": "", "load": "map", "throughput": len(out) / elapsed,
            "p50_ms": nan, "p95_ms": nan, "p99_ms": nan, "mean_ms": nan,
            "mean_batch": stats["avg_batch_size"], "batches": stats["total_batches"],
            "submitted": items, "completed": len(out), "errors": 0, "unfinished": 0,
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
    elif key != "map":
        load = warm = Load("closed", clients=int(key), features=FEATURES)
        bounds = Bounds(None, cap)
    name = spec["model"]
    if name.startswith("fixed-") and name.endswith("ms"):  # fixed-50ms: 50 ms per call
        model = make_model("fixed", features=FEATURES, model_ms=float(name[6:-2]))
    else:
        model = make_model(name, features=FEATURES)

    def target() -> Batchproc:
        return kind(MAX_BATCH, MAX_DELAY, queue_size=max(1000, burst))

    if key == "map":
        run_map(model, min(burst, 2_000), kind is BatchprocAsync)  # warm-up
        cpu = time.process_time()
        result = run_map(model, burst, kind is BatchprocAsync)
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

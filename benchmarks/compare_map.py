"""Bulk inference: ``BatchProcessor.map`` against the limit, no batching and a future per
item, side by side in one run.

    python benchmarks/compare_map.py              # 50,000 items, median of 3 (~30 s, 2 cores)
    python benchmarks/compare_map.py --quick      # 1 repetition of 10,000: a smoke run

Workload: N items of one row of 64 float32 each (``(1, 64)``, distinct rows, fixed seed),
through the ``mlp`` model of ``batchproc bench`` (64 -> 256 -> 256 -> 16, numpy), max batch
64, max delay 5 ms. Systems:

- map: ``list(processor.map(items))``, chunks of 64 rows;
- amap: the same from asyncio, ``[r async for r in processor.amap(items)]``;
- enqueue_predict, burst: a future per item, all submitted from one thread, then
  awaited (the ``batchproc bench --burst`` load, queue sized to hold them all);
- no batching: the model called on each item in turn, in one thread;
- lean pipeline: the least a two-thread map does, for scale: the iterating thread cuts
  the items into lists of 64 and hands each to one model thread through a C-coded queue,
  keeping as many in flight as ``map`` does; the model thread concatenates a list, calls
  the model and hands back its rows. No queue policy, no requests, no statistics;
- limit: the model called back to back on full batches of 64 rows, no queue.

Throughput is items per second from the first item submitted to the last result in
hand; a sample of map results is checked against the model on its own row. Systems
run in a rotated order in each repetition; figures are medians, and each ratio is the
median of the ratios within a repetition.

Writes benchmarks/results/map.md and map.json (every repetition's figures); with
``--quick``, map-quick.md and map-quick.json.
"""

# ruff: noqa: E402  (BLAS settings must precede the numpy import)

from __future__ import annotations

import os

# Single-threaded BLAS, set before numpy loads, as in compare_peers.py: on 2 shared cores
# a multi-threaded OpenBLAS called from worker threads measures oversubscription.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import asyncio
import gc
import itertools
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from batchproc import BatchProcessor, BatchProcessorConfig
from batchproc.bench import report
from batchproc.bench.loads import Bounds, Load
from batchproc.bench.models import MLP
from batchproc.bench.runner import LIMIT, run_limit, run_target
from batchproc.bench.targets import Batchproc, NoBatching

HERE = os.path.dirname(os.path.abspath(__file__))
FEATURES = 64
MAX_BATCH = 64
MAX_DELAY = 0.005
MAP, AMAP, FUTURES, NONE = "map", "amap", "enqueue_predict, burst", "no batching"
LEAN = "lean pipeline"
SYSTEMS = (MAP, AMAP, FUTURES, NONE, LEAN, LIMIT)
# Chunks in flight in the lean pipeline: map's default buffersize (2 * max_workers).
LEAN_DEPTH = 2 * BatchProcessorConfig().max_workers


def _processor(model: Callable[[np.ndarray], Any], n: int) -> BatchProcessor[Any, Any]:
    p: BatchProcessor[Any, Any] = BatchProcessor(BatchProcessorConfig(
        max_batch_size=MAX_BATCH, initial_batch_size=MAX_BATCH, batch_timeout=MAX_DELAY,
        max_queue_size=max(1000, n), queue_warning_threshold=max(1000, n),
        queue_critical_threshold=max(1000, n)))
    p.start(model)
    return p


def _check(results: list[Any], items: list[np.ndarray], model: MLP) -> int:
    """How many of a sample of results differ from the model on the item alone."""
    wrong = 0
    for k in range(0, len(items), max(1, len(items) // 200)):
        if not np.allclose(results[k], model(items[k]), rtol=1e-4, atol=1e-5):
            wrong += 1
    return wrong + abs(len(results) - len(items))


def run_map(items: list[np.ndarray], model: MLP, use_async: bool) -> dict[str, Any]:
    p = _processor(model, len(items))
    gc.collect()
    try:
        t0 = time.perf_counter()
        if use_async:
            async def collect() -> list[Any]:
                return [r async for r in p.amap(items)]
            results = asyncio.run(collect())
        else:
            results = list(p.map(items))
        elapsed = time.perf_counter() - t0
        stats = p.get_stats()
    finally:
        p.stop()
    return {"throughput": len(items) / elapsed, "elapsed_s": elapsed,
            "completed": len(results), "wrong": _check(results, items, model),
            "mean_batch": stats["avg_batch_size"], "batches": stats["total_batches"]}


def run_lean(items: list[np.ndarray], model: MLP) -> dict[str, Any]:
    """The lean pipeline (see the module): items/s and a check of its results."""
    inbox: queue.SimpleQueue[list[np.ndarray] | None] = queue.SimpleQueue()
    outbox: queue.SimpleQueue[list[np.ndarray]] = queue.SimpleQueue()

    def serve() -> None:
        while (chunk := inbox.get()) is not None:
            out = model(np.concatenate(chunk))
            outbox.put([out[i:i + 1] for i in range(len(chunk))])

    server = threading.Thread(target=serve, name="lean-pipeline", daemon=True)
    server.start()
    gc.collect()
    results: list[Any] = []
    t0 = time.perf_counter()
    chunks = (items[start:start + MAX_BATCH] for start in range(0, len(items), MAX_BATCH))
    in_flight = 0
    for chunk in itertools.islice(chunks, LEAN_DEPTH):
        inbox.put(chunk)
        in_flight += 1
    while in_flight:
        results.extend(outbox.get())
        in_flight -= 1
        following = next(chunks, None)
        if following is not None:
            inbox.put(following)
            in_flight += 1
    elapsed = time.perf_counter() - t0
    inbox.put(None)
    server.join()
    batches = -(-len(items) // MAX_BATCH)
    return {"throughput": len(items) / elapsed, "elapsed_s": elapsed,
            "completed": len(results), "wrong": _check(results, items, model),
            "mean_batch": len(items) / batches, "batches": batches}


def run_runner(system: str, n: int, model: MLP, cap: float) -> dict[str, Any]:
    load = Load("burst", burst=n, features=FEATURES)
    bounds = Bounds(None, cap)
    if system == LIMIT:
        r = run_limit(model, "mlp", load, bounds, MAX_BATCH)
    else:
        target = (NoBatching() if system == NONE
                  else Batchproc(MAX_BATCH, MAX_DELAY, queue_size=max(1000, n)))
        r = run_target(target, model, "mlp", load, bounds)
    return {"throughput": r.throughput, "elapsed_s": r.elapsed_s, "completed": r.completed,
            "wrong": 0, "mean_batch": r.mean_batch, "batches": r.batches,
            "errors": r.errors, "stopped_by": r.stopped_by}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compare_map.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1 repetition of 10,000 items: a smoke run, not for quoting")
    p.add_argument("--repeat", type=int, default=None, help="repetitions (default 3)")
    p.add_argument("--items", type=int, default=None, help="N (default 50000)")
    p.add_argument("--cap", type=float, default=60.0, help="time cap per run, s (default 60)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default=None,
                   help="output file stem (default: map; map-quick with --quick)")
    a = p.parse_args(argv)
    a.repeat = a.repeat or (1 if a.quick else 3)
    a.items = a.items or (10_000 if a.quick else 50_000)
    a.name = a.name or ("map-quick" if a.quick else "map")
    if a.repeat < 1 or a.items < 1 or a.cap <= 0:
        p.error("--repeat, --items and --cap must be positive")
    return a


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    items = list(rng.standard_normal((args.items, 1, FEATURES), dtype=np.float32))
    model = MLP(FEATURES)
    for batch in (items[0], np.concatenate(items[:MAX_BATCH])):
        for _ in range(200):  # warm up: the first calls of a model run slow
            model(batch)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
    t_start = time.perf_counter()
    for rep in range(args.repeat):
        order = SYSTEMS[rep % len(SYSTEMS):] + SYSTEMS[:rep % len(SYSTEMS)]
        for system in order:
            if system in (MAP, AMAP):
                r = run_map(items, model, system == AMAP)
            elif system == LEAN:
                r = run_lean(items, model)
            else:
                r = run_runner(system, args.items, model, args.cap)
            print(f"  {system}: {r['throughput']:,.0f} items/s", file=sys.stderr, flush=True)
            runs[system].append(r)
    results = []
    for system in SYSTEMS:
        median = {f: statistics.median(r[f] for r in runs[system])
                  for f in ("throughput", "elapsed_s", "mean_batch")}
        median["wrong"] = sum(r["wrong"] for r in runs[system])
        # Each ratio is taken within a repetition (the machine is shared: its speed
        # drifts between repetitions more than within one), then the median of those.
        for key, ref in (("vs_limit", LIMIT), ("vs_no_batching", NONE),
                         ("vs_enqueue_predict", FUTURES)):
            median[key] = statistics.median(
                a["throughput"] / b["throughput"] for a, b in zip(runs[system], runs[ref]))
        results.append({"system": system, "median": median, "runs": runs[system]})
    return {
        "date": report.now_iso(),
        "command": "python benchmarks/compare_map.py " + " ".join(sys.argv[1:]),
        "machine": report.machine_info(),
        "versions": report.versions(),
        "settings": {"items": args.items, "features": FEATURES, "model": "mlp",
                     "max_batch": MAX_BATCH, "max_delay_ms": MAX_DELAY * 1000,
                     "repeat": args.repeat, "quick": args.quick},
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }


def to_markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    rows = []
    for r in doc["results"]:
        m = r["median"]
        rates = [x["throughput"] for x in r["runs"]]
        rows.append([
            r["system"],
            f"{report.fmt_rate(m['throughput'])} "
            f"({report.fmt_rate(min(rates))}-{report.fmt_rate(max(rates))})",
            f"{m['mean_batch']:.1f}",
            report.fmt_ratio(m["vs_limit"]),
            report.fmt_ratio(m["vs_no_batching"]),
            report.fmt_ratio(m["vs_enqueue_predict"]),
            "-" if r["system"] not in (MAP, AMAP, LEAN) else f"{m['wrong']} wrong",
        ])
    lines = [
        *report.doc_header_lines(
            "Bulk inference: `map` vs the limit, no batching and a future per item", doc),
        f"- workload: {s['items']:,} items of shape (1, {s['features']}) float32 through the "
        f"`{s['model']}` model; max batch {s['max_batch']}, max delay "
        f"{s['max_delay_ms']:g} ms; median of {s['repeat']} repetition(s), systems in "
        "rotated order" + ("; **--quick smoke run: not for quoting**" if s["quick"] else ""),
        "",
        "Items/s from the first item submitted to the last result in hand (median, and "
        "range over the repetitions); the ratios are taken within each repetition, "
        "between runs made one after the other, and their median is shown (on a shared "
        "machine the speed drifts between repetitions); rows/call as the processor (or "
        "the runner's counting model) saw them; *checked*: a sample of 200 `map`/`amap` "
        "results per run compared with the model on the item alone (and of the lean "
        "pipeline's).",
        "",
        report.markdown_table(
            ["system", "items/s (range)", "rows/call", "÷ limit", "÷ no batching",
             "÷ enqueue_predict", "checked"], rows),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = run_all(args)
    report.write_results(args.out_dir, args.name, to_markdown(doc), doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What ``map`` gains by handing out its results a group of chunks at a time.

    python benchmarks/ablate_map_groups.py                 # ~20 s on 2 cores
    python benchmarks/ablate_map_groups.py --rounds 4      # a smoke run

While the oldest chunk is pending, ``map``'s iterating thread waits for the chunk half a
window after it, at most ``bulk.GROUP_WAIT_S`` (docs/bulk.md). The same processor runs
the same ``map`` grouped and chunk by chunk (``GROUP_WAIT_S = 0``: each wait takes the
oldest chunk alone), alternating within each round, so both see the same machine; the
figure is the median over rounds of the ratio within a round.

Models: the ``mlp`` of ``batchproc bench`` (numpy, 64 -> 256 -> 256 -> 16; it holds the
GIL between its matrix products, where the grouping pays), on 50,000 items of one row of
64 float32; and, on the same items in half the rounds, a model that sleeps 2 ms per call
(the GIL released throughout: chunks slower than the group wait, where grouping should
cost nothing). Max batch 64, max delay 5 ms, the default workers and buffersize.

Writes benchmarks/results/map-groups.md and map-groups.json.
"""

# ruff: noqa: E402  (BLAS settings must precede the numpy import)

from __future__ import annotations

import os

# Single-threaded BLAS, as in compare_map.py.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from batchproc import BatchProcessor, BatchProcessorConfig, bulk
from batchproc.bench import report
from batchproc.bench.models import MLP

HERE = os.path.dirname(os.path.abspath(__file__))
FEATURES = 64
MAX_BATCH = 64
MAX_DELAY = 0.005
SLEEP_S = 0.002
GROUPED, ONE_BY_ONE = "grouped", "chunk by chunk"


def _sleeping(batch: np.ndarray) -> np.ndarray:
    time.sleep(SLEEP_S)
    return batch[:, :16] * 2


def _rounds(model: Callable[[np.ndarray], Any], items: list[np.ndarray],
            rounds: int) -> dict[str, list[float]]:
    """Items/s of each variant in each round, run in turn on one processor."""
    p: BatchProcessor[Any, Any] = BatchProcessor(BatchProcessorConfig(
        max_batch_size=MAX_BATCH, initial_batch_size=MAX_BATCH, batch_timeout=MAX_DELAY,
        max_queue_size=len(items), queue_warning_threshold=len(items),
        queue_critical_threshold=len(items)))
    p.start(model)
    group_wait = bulk.GROUP_WAIT_S
    rates: dict[str, list[float]] = {GROUPED: [], ONE_BY_ONE: []}
    try:
        list(p.map(items[:max(1, len(items) // 10)]))  # warm up
        for k in range(rounds):
            order = (GROUPED, ONE_BY_ONE) if k % 2 == 0 else (ONE_BY_ONE, GROUPED)
            for variant in order:
                bulk.GROUP_WAIT_S = group_wait if variant == GROUPED else 0.0
                gc.collect()
                t0 = time.perf_counter()
                n = len(list(p.map(items)))
                rates[variant].append(n / (time.perf_counter() - t0))
            print(f"  round {k + 1}/{rounds}: grouped / chunk by chunk "
                  f"{rates[GROUPED][-1] / rates[ONE_BY_ONE][-1]:.2f}", file=sys.stderr,
                  flush=True)
    finally:
        bulk.GROUP_WAIT_S = group_wait
        p.stop()
    return rates


def _summary(rates: dict[str, list[float]]) -> dict[str, Any]:
    ratios = [a / b for a, b in zip(rates[GROUPED], rates[ONE_BY_ONE])]
    return {"grouped_items_per_s": statistics.median(rates[GROUPED]),
            "chunk_by_chunk_items_per_s": statistics.median(rates[ONE_BY_ONE]),
            "ratio": statistics.median(ratios),
            "grouped_faster": sum(r > 1.0 for r in ratios), "rounds": len(ratios),
            "ratios": ratios, "rates": rates}


def to_markdown(doc: dict[str, Any]) -> str:
    mach = doc["machine"]
    rows = [[name, report.fmt_rate(r["grouped_items_per_s"]),
             report.fmt_rate(r["chunk_by_chunk_items_per_s"]), f"{r['ratio']:.2f}x",
             f"{r['grouped_faster']} of {r['rounds']}",
             f"{min(r['ratios']):.2f}-{max(r['ratios']):.2f}"]
            for name, r in doc["results"].items()]
    return "\n".join([
        "# `map`: results handed out by groups of chunks, or chunk by chunk",
        "",
        f"- date: {doc['date']}",
        f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['platform']}",
        "- versions: " + ", ".join(f"{k} {v or 'not installed'}"
                                   for k, v in doc["versions"].items()),
        f"- command: `{doc['command'].strip()}` (wall time {doc['wall_s'] / 60:.1f} min)",
        f"- group wait: {doc['group_wait_s'] * 1e3:g} ms; max batch {MAX_BATCH}, max delay "
        f"{MAX_DELAY * 1e3:g} ms, default workers and buffersize",
        "",
        "Items/s (medians over rounds); each round runs both variants on the same "
        "processor, in alternating order, and the ratio is taken within the round.",
        "",
        report.markdown_table(["model", "grouped items/s", "chunk by chunk items/s",
                               "grouped ÷ chunk by chunk", "grouped faster",
                               "ratio range"], rows),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ablate_map_groups.py",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=16, help="rounds per model (default 16)")
    ap.add_argument("--items", type=int, default=50_000, help="items per map (default 50000)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default="map-groups")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.items < 10:
        ap.error("--rounds must be >= 1 and --items >= 10")
    rng = np.random.default_rng(0)
    items = list(rng.standard_normal((args.items, 1, FEATURES), dtype=np.float32))
    t0 = time.perf_counter()
    results = {
        "mlp": _summary(_rounds(MLP(FEATURES), items, args.rounds)),
        f"sleeps {SLEEP_S * 1e3:g} ms": _summary(
            _rounds(_sleeping, items, max(1, args.rounds // 2))),
    }
    doc = {"date": report.now_iso(),
           "command": "python benchmarks/ablate_map_groups.py " + " ".join(sys.argv[1:]),
           "machine": report.machine_info(), "versions": report.versions(),
           "group_wait_s": bulk.GROUP_WAIT_S, "wall_s": time.perf_counter() - t0,
           "results": results}
    report.write_results(args.out_dir, args.name, to_markdown(doc), doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A saturated processor's first seconds against its later ones: what its start costs.

    python benchmarks/saturation_warmup.py                  # fixed, 128 threads, 3 rounds
    python benchmarks/saturation_warmup.py --model mlp --rounds 5

compare_adaptive.py measures ADAPTIVE's saturation on a fresh processor: a closed loop of
128 client threads for 1.5 s, against the limit (the model called back to back on full
batches of 64 rows from one thread). A fresh processor starts at one call at a time, goes
to two once two windows of 16 batches in a row left a full batch waiting, then tries
three and, later, one again, each try measured side by side with the calls before it
(``controller.ConcurrencyTuner``). On the ``fixed`` model (5 ms calls behind one lock), 1.5 s
is about 300 batches, 19 windows: those first windows are a fair share of the run. Here,
per round: the limit, then one fresh processor under the same closed loop for
``--windows`` consecutive runs of ``--seconds`` each; the first is what compare_adaptive.py
measures, the later ones the same processor once started. Rounds repeat it all;
figures are medians over rounds.

The processor is ADAPTIVE with compare_adaptive.py's settings (max batch 64, max delay 5
ms, initial batch 32); each request one row of 64 float32. BLAS runs single-threaded, as
in the other scripts.
"""

# ruff: noqa: E402  (BLAS settings must precede the numpy import)

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from batchproc import BatchProcessor, BatchProcessorConfig
from batchproc.bench import report
from batchproc.bench.models import make_model

MAX_BATCH = 64
BATCH_TIMEOUT = 0.005
ROW = np.ones((1, 64), dtype=np.float32)
TITLE = "A saturated processor's first seconds against its later ones"


def limit(model: Callable[[np.ndarray], Any], seconds: float) -> float:
    """Rows per second of the model called back to back on full batches, one thread."""
    batch = np.ones((MAX_BATCH, 64), dtype=np.float32)
    done, began = 0, time.monotonic()
    while time.monotonic() - began < seconds:
        model(batch)
        done += MAX_BATCH
    return done / (time.monotonic() - began)


def closed_loop(processor: Any, clients: int, seconds: float) -> float:
    """Requests per second of ``clients`` threads each waiting on its own request."""
    until = time.monotonic() + seconds
    counts = [0] * clients
    enqueue = processor.enqueue_predict

    def client(k: int) -> None:
        n = 0
        while time.monotonic() < until:
            enqueue(ROW).result()
            n += 1
        counts[k] = n

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - began)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fixed", choices=("fixed", "mlp", "identity"))
    ap.add_argument("--clients", type=int, default=2 * MAX_BATCH)
    ap.add_argument("--seconds", type=float, default=1.5, help="seconds per run")
    ap.add_argument("--windows", type=int, default=3,
                    help="consecutive runs on one processor per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if min(args.clients, args.windows, args.rounds) < 1 or args.seconds <= 0:
        ap.error("--clients, --seconds, --windows and --rounds must be positive")
    model = make_model(args.model)
    limits: list[float] = []
    runs: list[list[float]] = []
    for r in range(args.rounds):
        limits.append(limit(model, args.seconds))
        processor: Any = BatchProcessor(BatchProcessorConfig(
            max_batch_size=MAX_BATCH, batch_timeout=BATCH_TIMEOUT, initial_batch_size=32,
            max_queue_size=max(1000, 4 * args.clients)))
        processor.start(model)
        try:
            runs.append([closed_loop(processor, args.clients, args.seconds)
                         for _ in range(args.windows)])
        finally:
            processor.stop()
        print(f"round {r + 1}/{args.rounds}: limit {limits[-1]:,.0f}, runs "
              + ", ".join(f"{x:,.0f}" for x in runs[-1]) + " req/s", file=sys.stderr)
    top = statistics.median(limits)
    given = sys.argv[1:] if argv is None else argv
    print(report.results_header(
        TITLE, " ".join(["python benchmarks/saturation_warmup.py", *given])))
    print(f"\n{args.model} model, {args.clients} client threads, one row of 64 float32 per "
          f"request; ADAPTIVE, max batch {MAX_BATCH}, max delay {BATCH_TIMEOUT * 1e3:g} ms; "
          f"medians of {args.rounds} round(s); limit {top:,.0f} req/s\n")
    print("| run on one processor | seconds from its start | req/s | / limit |")
    print("|---|---|---:|---:|")
    for k in range(args.windows):
        rate = statistics.median(run[k] for run in runs)
        span = f"{k * args.seconds:g}-{(k + 1) * args.seconds:g}"
        print(f"| {k + 1}{' (fresh)' if k == 0 else ''} | {span} | {rate:,.0f} | "
              f"{rate / top:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

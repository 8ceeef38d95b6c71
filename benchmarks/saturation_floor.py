"""How close a closed loop of client threads can come to the limit, whatever the batcher.

    python benchmarks/saturation_floor.py                   # mlp, 128 threads, 3 rounds of 2 s
    python benchmarks/saturation_floor.py --model fixed --rounds 5

compare_adaptive.py measures ADAPTIVE's saturation as a closed loop of 128 client threads
(the capacity of ``batchproc bench --sweep``) against the limit: the model called back to
back on full batches of 64 rows from one thread. Where a full batch costs about as much
as the thread wake-ups that a request needs (the numpy ``mlp`` model: a few microseconds
a row), that limit is out of reach of any batcher whose callers are threads each waiting
on its own answer. Side by side, in rounds in a rotated order (medians reported):

* the limit: the model called back to back on batches of 64 rows, one thread;
* the lean batcher: one server thread takes every request waiting (up to 64), calls the
  model once on their rows, hands each client its row and releases the client's lock.
  No queue policy, no futures, no statistics: the least a thread-driven batcher does;
* batchproc: ``enqueue_predict(row).result()``, the default configuration except
  ``max_batch_size=64`` and ``batch_timeout=5 ms``, as compare_adaptive.py runs it;
* batchproc with one worker (``max_workers=1``): one call at a time, as the lean batcher
  makes them, and as ADAPTIVE makes them on a model that holds the GIL or before its
  tuner has seen two calls at once pay. Between two calls its worker hands out a batch's
  results and takes the next: on ``fixed`` (a model that lets go of the GIL) the gap
  between its calls is what it loses to the limit.

Each request is one row of 64 float32. Per system: requests per second, the ratio to the
limit, and per request the process's CPU time in user space and in the kernel (thread
wake-ups show as kernel time), from profile_threads.py; then the same CPU time split
between the client threads, the batcher's own threads and threads Python did not start.

BLAS runs single-threaded, as in compare_adaptive.py and compare_peers.py (set
``OPENBLAS_NUM_THREADS`` to change it): a BLAS pool's second thread busy-waits for work
between calls, on the core that the batcher's threads would use, and the limit it speeds
up is not one a batcher on two cores can share.
"""

# ruff: noqa: E402  (BLAS settings must precede the numpy import)

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_threads import BATCHER, CLIENTS, NOT_PYTHONS, ROW, Started, profile

from batchproc.bench import report
from batchproc.bench.models import make_model

MAX_BATCH = 64
BATCH_TIMEOUT = 0.005


def limit(model: Callable[[np.ndarray], Any], seconds: float) -> float:
    """Requests per second of ``model`` called back to back on batches of 64 rows."""
    batch = np.ones((MAX_BATCH, ROW.shape[1]), np.float32)
    model(batch)
    calls, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        model(batch)
        calls += 1
    return calls * MAX_BATCH / elapsed


def lean(model: Callable[[np.ndarray], Any]) -> Callable[[], Started]:
    def start() -> Started:
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()  # C-coded: no Python lock
        served, batches = [0], [0]
        local = threading.local()

        def server() -> None:
            get, get_nowait = inbox.get, inbox.get_nowait
            while True:
                waiting = [get()]
                while len(waiting) < MAX_BATCH:
                    try:
                        waiting.append(get_nowait())
                    except queue.Empty:
                        break
                if waiting[-1] is None:  # stop() is the last put
                    waiting.pop()
                    if not waiting:
                        return
                    inbox.put(None)
                out = model(np.concatenate([row for row, _, _ in waiting]))
                for i, (_, lock, box) in enumerate(waiting):
                    box[0] = out[i:i + 1]
                    lock.release()
                served[0] += len(waiting)
                batches[0] += 1

        srv = threading.Thread(target=server, name="lean-batcher", daemon=True)
        srv.start()

        def call() -> Any:
            mine = getattr(local, "mine", None)
            if mine is None:
                lock = threading.Lock()
                lock.acquire()  # held: the next acquire waits for the server
                mine = local.mine = (lock, [None])
            lock, box = mine
            inbox.put((ROW, lock, box))
            lock.acquire()
            return box[0]

        def stop() -> None:
            inbox.put(None)
            srv.join()

        return call, lambda: served[0], lambda: batches[0], stop
    return start


def batchproc(model: Callable[[np.ndarray], Any], **config: Any) -> Callable[[], Started]:
    def start() -> Started:
        from batchproc import BatchProcessor, BatchProcessorConfig

        p: Any = BatchProcessor(BatchProcessorConfig(max_batch_size=MAX_BATCH,
                                                     batch_timeout=BATCH_TIMEOUT, **config))
        p.start(model)
        enqueue = p.enqueue_predict
        return (lambda: enqueue(ROW).result(),
                lambda: p.get_stats()["total_processed"],
                lambda: p.get_stats()["total_batches"], p.stop)
    return start


TITLE = "Saturation against the limit, beside a lean thread-driven batcher"


def _header(argv: list[str] | None) -> str:
    given = sys.argv[1:] if argv is None else argv
    return report.results_header(TITLE, " ".join(["python benchmarks/saturation_floor.py", *given]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mlp", choices=("mlp", "identity", "fixed"))
    ap.add_argument("--clients", type=int, default=2 * MAX_BATCH)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.rounds < 1:
        ap.error("--clients, --seconds and --rounds must be positive")
    model = make_model(args.model)
    systems: list[tuple[str, Callable[[], Started]]] = [
        ("lean batcher", lean(model)), ("batchproc", batchproc(model)),
        ("batchproc, one worker", batchproc(model, max_workers=1))]
    rates: dict[str, list[float]] = {"limit": []}
    cpu: dict[str, list[tuple[float, float]]] = {}
    split: dict[str, list[dict[str, float]]] = {}
    for r in range(args.rounds):
        rates["limit"].append(limit(model, args.seconds))
        turn = systems[r % len(systems):] + systems[:r % len(systems)]
        for name, start in turn:
            got = profile(name, start, args.clients, args.seconds)
            rates.setdefault(name, []).append(got["req_s"])
            cpu.setdefault(name, []).append((got["user_us"], got["sys_us"]))
            if got["threads"]:
                split.setdefault(name, []).append(got["threads"])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {v[-1]:,.0f}" for k, v in rates.items()) + " req/s", file=sys.stderr)
    top = statistics.median(rates["limit"])
    print(_header(argv))
    print(f"\n{args.model} model, {args.clients} client threads, one row of 64 float32 per "
          f"request; OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}; medians of "
          f"{args.rounds} round(s) of {args.seconds:g} s\n")
    print("| system | req/s | / limit | user us/req | kernel us/req |")
    print("|---|---:|---:|---:|---:|")
    print(f"| limit (batches of {MAX_BATCH}, one thread) | {top:,.0f} | 1.00x | | |")
    for name, _ in systems:
        rps = statistics.median(rates[name])
        user = statistics.median(u for u, _ in cpu[name])
        kernel = statistics.median(k for _, k in cpu[name])
        print(f"| {name} | {rps:,.0f} | {rps / top:.3f}x | {user:.1f} | {kernel:.1f} |")
    if split:
        groups = (CLIENTS, BATCHER, NOT_PYTHONS)
        print("\nCPU time per request by thread, us (user and kernel; medians; per thread "
              "from /proc)\n")
        print("| system | " + " | ".join(groups) + " |")
        print("|---|" + "---:|" * len(groups))
        for name, runs in split.items():
            cells = [f"{statistics.median(run[group] for run in runs):.1f}" for group in groups]
            print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

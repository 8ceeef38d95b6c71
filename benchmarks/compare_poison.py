"""Poison benchmark: does a 1% share of failing requests slow the healthy ones?

    python benchmarks/compare_poison.py                 # 3 repetitions of 5 s per load
    python benchmarks/compare_poison.py --seconds 2 --repeat 1   # a smoke run

Closed-loop client threads (``--clients``, default 32) each send one-row requests (64
float32), waiting for each good one's result (a poisoned one is sent and not waited
for, so the load of good requests stays the same), to a model that costs 2 ms per call
behind one lock (a GPU-like model) and raises for any batch holding a poisoned row.
With ``--bad 0.01``, 1% of the requests are poisoned; the same load runs with none,
interleaved, in one session, default config (``max_retries=3``,
``retry_delay=1.0``, ``max_batch_size=64``, ``batch_timeout=5 ms``).
Reported: throughput and p50/p99 latency of the *good* requests in both runs, and the
ratio. Before the failure-path rework the backoff of one poisoned request ran on the
worker and healthy requests of its batch waited for it (7 s for a batch of 8); here the
poisoned requests wait out their backoff parked in the queue.

Writes benchmarks/results/poison.md and poison.json. Run it with another build's
interpreter (``build/baseline-<rev>/venv/bin/python``, as compare_versions.py makes it)
to compare with that version; it uses only the public API.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import datetime, timezone

import numpy as np

from batchproc import BatchProcessor, BatchProcessorConfig

HERE = os.path.dirname(os.path.abspath(__file__))


class Poisoned(Exception):
    pass


def make_model(call_s: float, counts: dict[str, int]):
    """The model, counting its calls, the rows they held and the calls that raised."""
    lock = threading.Lock()
    weights = np.eye(64, dtype=np.float32)

    def model(batch):
        with lock:  # one device: calls run one at a time
            counts["calls"] += 1
            counts["rows"] += len(batch)
            time.sleep(call_s)
            if (batch[:, 0] < 0).any():
                counts["raised"] += 1
                raise Poisoned("poisoned row")
            return batch @ weights
    return model


def run_load(bad_share: float, clients: int, seconds: float, call_s: float) -> dict:
    config = BatchProcessorConfig(max_batch_size=64, batch_timeout=0.005,
                                  max_queue_size=10_000)
    good_lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = [0.0]

    def client(cid: int) -> None:
        rng = np.random.default_rng(cid)
        mine: list[float] = []
        poisoned_futures = []
        while time.monotonic() < stop_at[0]:
            x = np.ones((1, 64), dtype=np.float32)
            if rng.random() < bad_share:
                # Sent, not waited for: a client blocked for the poisoned request's retry
                # schedule would lower the load on the good ones and hide the effect.
                x[0, 0] = -1.0
                poisoned_futures.append(processor.enqueue_predict(x))
                continue
            t0 = time.monotonic()
            processor.enqueue_predict(x).result(timeout=60)
            mine.append(time.monotonic() - t0)
        bad = sum(isinstance(f.exception(timeout=60), Poisoned) for f in poisoned_futures)
        with lock:
            good_lat.extend(mine)
            errors[0] += bad

    processor: BatchProcessor = BatchProcessor(config)
    counts = {"calls": 0, "rows": 0, "raised": 0}
    processor.start(make_model(call_s, counts))
    try:
        start = time.monotonic()
        stop_at[0] = start + seconds
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
    finally:
        processor.stop(timeout=10)
    good_lat.sort()
    n = len(good_lat)
    return {
        "bad_share": bad_share,
        "good_requests": n,
        "failed_requests": errors[0],
        "good_per_s": n / seconds,  # the clients stop sending at the end of the window
        "p50_ms": good_lat[n // 2] * 1e3 if n else None,
        "p99_ms": good_lat[min(n - 1, int(n * 0.99))] * 1e3 if n else None,
        "elapsed_s": elapsed,
        "calls": counts["calls"],
        "rows_per_call": counts["rows"] / max(1, counts["calls"]),
        # Every call that raised held a poisoned row: what each poisoned request cost in
        # failed calls (its batch's failure, the search's failing calls, its retries).
        "raised_per_poisoned": counts["raised"] / errors[0] if errors[0] else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bad", type=float, default=0.01)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--call-ms", type=float, default=2.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    runs: list[dict] = []
    for rep in range(args.repeat):
        order = [0.0, args.bad] if rep % 2 == 0 else [args.bad, 0.0]
        for share in order:
            r = run_load(share, args.clients, args.seconds, args.call_ms / 1e3)
            r["repetition"] = rep
            runs.append(r)
            print(json.dumps(r), file=sys.stderr)

    def med(share: float, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["bad_share"] == share)

    rows = []
    for key, label in (("good_per_s", "good requests/s"), ("p50_ms", "p50 of good (ms)"),
                       ("p99_ms", "p99 of good (ms)")):
        clean, poisoned = med(0.0, key), med(args.bad, key)
        rows.append(f"| {label} | {clean:,.1f} | {poisoned:,.1f} | {poisoned / clean:.2f}x |")
    rows.append(f"| rows per call | {med(0.0, 'rows_per_call'):.1f} | "
                f"{med(args.bad, 'rows_per_call'):.1f} | |")
    rows.append(f"| calls that raised, per poisoned request | | "
                f"{med(args.bad, 'raised_per_poisoned'):.1f} | |")
    command = "python benchmarks/compare_poison.py " + " ".join(argv or sys.argv[1:])
    md = "\n".join([
        "# batchproc: healthy requests next to poisoned ones",
        "",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.platform()}",
        f"- command: `{command.strip()}`",
        f"- load: {args.clients} closed-loop clients, one row of 64 float32 each; model "
        f"{args.call_ms} ms per call behind one lock, raising for a batch holding a "
        f"poisoned row; {args.bad:.0%} of requests poisoned vs none; default retries "
        "(3, from 1 s); max batch 64, batch_timeout 5 ms; "
        f"{args.seconds} s per run, {args.repeat} repetition(s), interleaved; medians",
        "",
        f"| good requests | no poison | {args.bad:.0%} poisoned | ratio |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        "The poisoned requests themselves fail after their retry schedule (about 7 s), "
        "parked in the queue meanwhile (every one of them failed with the model's "
        "exception: `failed_requests` in poison.json). What the good requests pay is the "
        "search of the batches a poisoned request lands in (one call per bisection level, "
        "and one to deliver the requests set aside) and one call per retry, each alone in "
        "its batch: the calls that raised, per poisoned request, count them with its "
        "batch's own failure.",
        "",
    ])
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "poison.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out_dir, "poison.json"), "w") as f:
        # The output folder as given relative to here: the results name no machine's paths.
        args_out = {**vars(args), "out_dir": os.path.relpath(args.out_dir, HERE)}
        json.dump({"args": args_out, "runs": runs}, f, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

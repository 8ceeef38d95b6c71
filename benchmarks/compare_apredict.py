"""A burst of 50,000 requests from one asyncio loop into a queue of 1,000: the ways to wait.

- ``apredict``: waits for room on the loop (batchproc.backpressure: waiters woken a batch
  at a time through the loop's channel);
- ``executor``: the blocking ``enqueue_predict`` run in the loop's default thread pool
  (``loop.run_in_executor``), its future wrapped for the loop: the textbook way to call a
  blocking API from asyncio;
- ``apredict, room for all``: the same with a queue of 50,000: nothing waits, so the
  difference from the first is the cost of waiting for room;
- ``async in a task each, room for all``: ``enqueue_predict_async`` awaited in a
  coroutine of its own per request (what ``gather`` of coroutines costs: a task each),
  with a queue of 50,000;
- ``async, room for all``: ``enqueue_predict_async``'s futures gathered directly, a queue
  of 50,000 (the floor: no task per request, no backpressure);
- ``async, refusing``: ``enqueue_predict_async`` with the queue of 1,000: how many get
  through at all.

The model is the identity on one row of 64 float32 (batchproc's cost alone) and, with
``--model fixed``, a fixed 5 ms per call. Median of ``--runs`` runs, all in one process.

    python benchmarks/compare_apredict.py [--runs 3] [--out benchmarks/results/apredict.md]
    python benchmarks/compare_apredict.py --baseline REV [--runs 5]

With ``--baseline``, the two ``apredict`` ways on the identity model only, this checkout's
installed batchproc against a baseline commit's (built as compare_versions.py builds it),
each run in a fresh interpreter, the two versions alternating: the ratio of each pair
and their median.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np

from batchproc import BatchProcessor, BatchProcessorConfig, QueueFullError

N = 50_000
CAPACITY = 1_000


def _models():
    def identity(batch):
        return batch

    def fixed(batch):
        time.sleep(0.005)
        return batch

    return {"identity": identity, "fixed 5 ms": fixed}


def _processor(model, capacity):
    p = BatchProcessor(BatchProcessorConfig(max_queue_size=capacity, max_batch_size=64,
                                            batch_timeout=0.005))
    p.start(model)
    return p


async def _apredict(p, x):
    results = await asyncio.gather(*(p.apredict(x) for _ in range(N)))
    return len(results), 0


async def _executor(p, x):
    loop = asyncio.get_running_loop()

    async def one():
        future = await loop.run_in_executor(None, p.enqueue_predict, x)
        return await asyncio.wrap_future(future)

    results = await asyncio.gather(*(one() for _ in range(N)))
    return len(results), 0


async def _async_tasks(p, x):
    async def one():
        return await p.enqueue_predict_async(x)

    results = await asyncio.gather(*(one() for _ in range(N)))
    return len(results), 0


async def _async_all(p, x):
    results = await asyncio.gather(*(p.enqueue_predict_async(x) for _ in range(N)))
    return len(results), 0


async def _async_refusing(p, x):
    futures, refused = [], 0
    for _ in range(N):
        try:
            futures.append(p.enqueue_predict_async(x))
        except QueueFullError:
            refused += 1
    await asyncio.gather(*futures)
    return len(futures), refused


WAYS = {
    "apredict": (_apredict, CAPACITY),
    "apredict, room for all": (_apredict, N),
    "enqueue_predict_async in a task each, room for all": (_async_tasks, N),
    "executor (run_in_executor + wrap_future)": (_executor, CAPACITY),
    "enqueue_predict_async, room for all": (_async_all, N),
    "enqueue_predict_async, refusing": (_async_refusing, CAPACITY),
}


def run_once(way, model):
    coro, capacity = WAYS[way]
    p = _processor(model, capacity)
    x = np.ones((1, 64), dtype=np.float32)
    try:
        t0 = time.perf_counter()
        done, refused = asyncio.run(coro(p, x))
        return time.perf_counter() - t0, done, refused
    finally:
        p.stop()


# One run in a fresh interpreter of either version: requests/s of a way, on identity.
_ONE_RUN = ("import sys; sys.path.insert(0, sys.argv[2]); "
            "from compare_apredict import N, _models, run_once; "
            "seconds, _, _ = run_once(sys.argv[1], _models()['identity']); print(N / seconds)")


def against_baseline(rev: str, runs: int) -> None:
    from compare_versions import baseline_python

    baseline, commit = baseline_python(rev, rebuild=False)
    here = os.path.dirname(os.path.abspath(__file__))
    versions = {f"baseline {commit[:7]}": baseline, "current": sys.executable}
    print(f"Burst of {N:,} from one asyncio loop, identity model, {runs} alternated pairs "
          f"(`{shlex.join(['python', *sys.argv])}`)\n")
    print("| way | baseline req/s | current req/s | current / baseline | pairs |")
    print("|---|---:|---:|---:|---:|")
    for way in ("apredict", "apredict, room for all"):
        rates: dict[str, list[float]] = {name: [] for name in versions}
        for i in range(runs):
            for name in (list(versions) if i % 2 == 0 else list(versions)[::-1]):
                out = subprocess.run([versions[name], "-c", _ONE_RUN, way, here],
                                     capture_output=True, text=True, check=True)
                rates[name].append(float(out.stdout.split()[-1]))
        old, new = rates.values()
        ratios = [n / o for n, o in zip(new, old)]
        print(f"| {way} | {statistics.median(old):,.0f} | {statistics.median(new):,.0f} | "
              f"{statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="alternate with this commit's build (apredict ways, identity)")
    args = parser.parse_args()
    if args.baseline is not None:
        against_baseline(args.baseline, args.runs)
        return
    load_before = os.getloadavg()[0]
    lines = [f"Burst of {N:,} requests from one asyncio loop, queue of {CAPACITY:,} "
             f"(median of {args.runs} runs; {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d')}; load average {load_before:.1f} before, "
             "LOAD_AFTER after: a shared machine)", "",
             f"Command: `{shlex.join(['python', *sys.argv])}`", "",
             "| model | way | seconds | completed | refused | requests/s |",
             "|---|---|---:|---:|---:|---:|"]
    for model_name, model in _models().items():
        for way in WAYS:
            runs = [run_once(way, model) for _ in range(args.runs)]
            seconds = statistics.median(r[0] for r in runs)
            _, done, refused = runs[0]
            line = (f"| {model_name} | {way} | {seconds:.2f} | {done:,} | {refused:,} | "
                    f"{done / seconds:,.0f} |")
            print(line, flush=True)
            lines.append(line)
    lines[0] = lines[0].replace("LOAD_AFTER", f"{os.getloadavg()[0]:.1f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

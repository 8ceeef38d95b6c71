"""Where a request's time goes when 64 asyncio tasks await batchproc, and what is left of it
above the floor of a batcher that answers a loop from a thread.

    python benchmarks/profile_async.py              # 3 rounds of 1.5 s per closed loop
    python benchmarks/profile_async.py --rounds 5 --clients 64

Measured in one process, side by side (closed loops in rounds, medians):

* **closed loops** of ``--clients`` tasks on one event loop, identity model, one row of 64
  float32 per request: batchproc (``await enqueue_predict_async(row)``, max batch 64, max
  delay 5 ms) with the event loop thread's CPU time per request and the process's, and
  the no-work batcher answered from a thread (no_work_batchers.py: one future per request,
  one hand-over each way per loop pass), the floor for a batcher whose model runs off the
  loop. The loop and the worker share the GIL: batchproc's wall time per request is about
  the loop's CPU time plus the worker's time holding the GIL.
* **the intake**: one ``enqueue_predict_async`` call (processor paused, so no worker runs;
  a row of a kind described before, so the native intake, ``_native.intake``, takes it),
  and the objects it makes or calls on its way, each timed alone: the asyncio future
  (``QueuedFuture``), the queue's stand-in for it (``AsyncRequest``), the ``Request``
  record, the native queue's ``push``, the describer's memo of plain ndarrays
  (``KnownArrays.get``), ``asyncio.get_running_loop()`` (on CPython before 3.12 it asks
  the kernel for the process id on every call; the intake reads the running loop without
  it there, so there it is shown and not counted) and ``time.monotonic()``. Their sum is
  what any intake made of these objects pays; the rest is the call's own work (the
  method's Python lines, the deadline).
* **waking a batch's awaiters**: from completing ``--clients`` futures, each awaited by a
  task, to the last task resumed, per awaiter: woken in the flush's own pass
  (``awaiters.complete``, as the processor does) and by asyncio's handle per result.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import timeit
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from no_work_batchers import asyncio_thread

from batchproc import BatchProcessor, BatchProcessorConfig
from batchproc._native.future_state import AsyncRequest, Request
from batchproc._native.intake import KnownArrays
from batchproc._native.request_queue import RequestQueue
from batchproc.aio import LoopChannel, QueuedFuture
from batchproc.awaiters import complete
from batchproc.bench import report

ROW = np.ones((1, 64), np.float32)


def _config(**fields: Any) -> BatchProcessorConfig:
    return BatchProcessorConfig(max_batch_size=64, batch_timeout=0.005, **fields)


def closed_loop(clients: int, seconds: float) -> dict[str, float]:
    """batchproc under ``clients`` tasks: req/s, loop-thread and process CPU per request."""
    p: Any = BatchProcessor(_config())
    p.start(lambda batch: batch)

    async def run() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        enqueue = p.enqueue_predict_async
        done = 0

        async def client(until: float) -> None:
            nonlocal done
            while loop.time() < until:
                await enqueue(ROW)
                done += 1

        await asyncio.gather(*(client(loop.time() + 0.2) for _ in range(clients)))
        done = 0
        t0, loop_cpu, cpu = time.perf_counter(), time.thread_time(), time.process_time()
        await asyncio.gather(*(client(loop.time() + seconds) for _ in range(clients)))
        n = max(done, 1)
        return {"req_s": done / (time.perf_counter() - t0),
                "loop_us": (time.thread_time() - loop_cpu) / n * 1e6,
                "process_us": (time.process_time() - cpu) / n * 1e6}

    try:
        return asyncio.run(run())
    finally:
        p.stop()


def intake(number: int) -> dict[str, float]:
    """Microseconds per call of ``enqueue_predict_async`` and of each of its parts."""
    p: Any = BatchProcessor(_config(max_queue_size=10 * number + 10))
    p.start(lambda batch: batch)
    p.pause()  # nothing is popped: only the intake runs

    async def run() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        channel = LoopChannel(loop)
        queue = RequestQueue(capacity=10 * number + 10)
        fmt = object()
        arrays = KnownArrays(8)
        arrays.add(ROW, (1, fmt, 1, ROW.nbytes, 0, 0, ROW.dtype))
        row = ROW
        p.enqueue_predict_async(row)  # its kind described: the native path from now on
        parts = {
            "enqueue_predict_async (whole call)": lambda: p.enqueue_predict_async(row),
            "QueuedFuture(loop=loop)": lambda: QueuedFuture(loop=loop),
            "AsyncRequest(future, channel)": lambda: AsyncRequest(None, channel),
            "Request(...)": lambda: Request(None, row, fmt, 1, 256, 0, 1.0, 1, 0, 2,
                                            float("inf")),
            "RequestQueue.push": lambda: queue.push(row, 2, 1, 256, 1, 0, 0, None),
            "asyncio.get_running_loop()": asyncio.get_running_loop,
            "KnownArrays.get (the memo)": lambda: arrays.get(row),
            "time.monotonic()": time.monotonic,
        }
        out = {}
        for name, fn in parts.items():
            best = min(timeit.repeat(fn, number=number, repeat=5))
            out[name] = best / number * 1e6
        return out

    try:
        return asyncio.run(run())
    finally:
        p.resume()
        p.stop(timeout=1.0)


def waking(clients: int, rounds: int) -> dict[str, float]:
    """Microseconds per awaiter from completing a batch of ``clients`` futures, each awaited
    by a task, to the last task resumed (minimum of ``rounds``, the two ways alternating):
    woken in the flush's own pass (``awaiters.complete``, as the processor does) and by
    asyncio (``set_result`` alone: a ``call_soon`` handle per callback, run on later turns
    of the loop; ``complete`` without a loop does that)."""

    async def one_round(loop: asyncio.AbstractEventLoop, in_the_flush: bool) -> float:
        futures = [loop.create_future() for _ in range(clients)]
        resumed = 0
        all_back = loop.create_future()

        async def awaiter(future: asyncio.Future[Any]) -> None:
            nonlocal resumed
            await future
            resumed += 1
            if resumed == clients:
                all_back.set_result(None)

        tasks = [loop.create_task(awaiter(f)) for f in futures]
        await asyncio.sleep(0)  # each task now awaits its future
        outcomes = [(f, True, None) for f in futures]
        t0 = time.perf_counter()
        # From a callback of the loop, as the flush is (never from inside a task).
        loop.call_soon(complete, loop if in_the_flush else None, outcomes)
        await all_back
        elapsed = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        return elapsed / clients * 1e6

    async def run() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        flush: list[float] = []
        handles: list[float] = []
        for r in range(rounds):
            first, second = (flush, handles) if r % 2 else (handles, flush)
            first.append(await one_round(loop, first is flush))
            second.append(await one_round(loop, second is flush))
        return {"in the flush (awaiters.complete)": min(flush),
                "by asyncio (a handle each)": min(handles)}

    return asyncio.run(run())


TITLE = "asyncio clients: batchproc against the no-work floor, and the intake's parts"


def _header(argv: list[str] | None) -> str:
    given = sys.argv[1:] if argv is None else argv
    return report.results_header(TITLE, " ".join(["python benchmarks/profile_async.py", *given]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=20_000,
                    help="calls per timing of an intake part (default 20000)")
    ap.add_argument("--wake-rounds", type=int, default=400,
                    help="batches woken each way (default 400)")
    args = ap.parse_args(argv)
    if (args.clients < 1 or args.seconds <= 0 or args.rounds < 1 or args.calls < 1
            or args.wake_rounds < 1):
        ap.error("--clients, --seconds, --rounds, --calls and --wake-rounds must be positive")
    bp: list[dict[str, float]] = []
    floor: list[float] = []
    for r in range(args.rounds):
        if r % 2:
            floor.append(asyncio_thread(args.clients, args.seconds))
            bp.append(closed_loop(args.clients, args.seconds))
        else:
            bp.append(closed_loop(args.clients, args.seconds))
            floor.append(asyncio_thread(args.clients, args.seconds))
        print(f"round {r + 1}/{args.rounds}: batchproc {bp[-1]['req_s']:,.0f}, no-work "
              f"{floor[-1]:,.0f} req/s", file=sys.stderr)
    parts = intake(args.calls)
    woken = waking(args.clients, args.wake_rounds)

    def med(key: str) -> float:
        return statistics.median(x[key] for x in bp)

    rps, no_work = med("req_s"), statistics.median(floor)
    print(_header(argv))
    print(f"\n{args.clients} asyncio tasks, identity model, one row of 64 float32; medians of "
          f"{args.rounds} round(s) of {args.seconds:g} s\n")
    print("| closed loop | req/s | wall us/req | loop thread CPU us/req |"
          " process CPU us/req |")
    print("|---|---:|---:|---:|---:|")
    print(f"| batchproc | {rps:,.0f} | {1e6 / rps:.2f} | {med('loop_us'):.2f} |"
          f" {med('process_us'):.2f} |")
    print(f"| no-work batcher, answered from a thread | {no_work:,.0f} | {1e6 / no_work:.2f}"
          " | | |")
    print(f"\nbatchproc / no-work: {rps / no_work:.2f}x; batchproc's own work: "
          f"{1e6 / rps - 1e6 / no_work:.2f} us a request above the floor.\n")
    whole = parts.pop("enqueue_predict_async (whole call)")
    print("| intake, one call | us |")
    print("|---|---:|")
    print(f"| enqueue_predict_async (whole call) | {whole:.3f} |")
    # The intake reads the running loop itself on CPython 3.10 and 3.11 (asyncio's call
    # costs a getpid there): shown for comparison, not counted in the parts.
    not_paid = "asyncio.get_running_loop()" if sys.version_info < (3, 12) else None
    for name, us in parts.items():
        label = f"{name} (not paid: the intake reads the loop itself)" if name == not_paid else name
        print(f"| {label} | {us:.3f} |")
    total = sum(us for name, us in parts.items() if name != not_paid)
    print(f"| the parts together | {total:.3f} |")
    print(f"| the rest: the call's own work | {whole - total:.3f} |")
    flush, handles = woken.values()
    print(f"\n| waking the {args.clients} awaiters of a batch (min of {args.wake_rounds}) "
          "| us per awaiter |")
    print("|---|---:|")
    for name, us in woken.items():
        print(f"| {name} | {us:.3f} |")
    print(f"\nwoken in the flush / by asyncio: {flush / handles:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

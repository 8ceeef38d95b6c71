"""How long past ``batch_timeout`` a request waits behind a call that hangs, and how
many requests/s the other workers serve while it hangs.

    python benchmarks/behind_a_hang.py                      # 0.002, 0.01, 0.05, 0.2 s
    python benchmarks/behind_a_hang.py --timeouts 0.05 --trials 50

``batch_timeout`` is a ceiling on waiting while a worker is free: a request queued behind
a call that overruns is taken by another worker once it has waited that long. Here a
model (2 ms a call, the default configuration otherwise, 4 workers) hangs on one call;
a request is sent at a random moment during the hang, and the time from its send to
the start of the call that serves it is measured. Prints, per ``batch_timeout``, that
wait's overshoot past ``batch_timeout`` (median, 90th percentile and the most, in ms):
how late the worker watching for such requests finds them. The same for a request that
failed once just before the hang began and comes due for its retry during it (the
queue empty, parked for ``retry_delay``, the hang beginning at a random moment before
it is due): its wait counts from when it was due. Then, per strategy,
``--clients`` closed-loop clients for ``--seconds`` before the hang and as long again
during it (``batch_timeout=0.1``, batches of at most ``--clients`` rows): the
requests/s and median latency of each. The hung call's slot is taken over by the worker
that serves the first request behind it, so the others go as usual.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

import numpy as np

from batchproc import BatchProcessor, BatchProcessorConfig

HANG, PROBE = -1.0, -2.0


def overshoots(batch_timeout: float, trials: int, rng: random.Random,
               retried: bool = False) -> list[float]:
    """Seconds past ``batch_timeout`` each probe waited for its call to start: from its
    send, or (``retried``) from when its retry was due."""
    hanging, release = threading.Event(), threading.Event()
    probe_started: list[float] = []
    probe_failed: list[float] = []
    retry_delay = max(batch_timeout, 0.01)

    def model(batch: np.ndarray) -> np.ndarray:
        if batch[0, 0] == HANG:
            hanging.set()
            release.wait(60)
        elif batch[0, 0] == PROBE:
            if retried and len(probe_failed) == len(probe_started):
                probe_failed.append(time.monotonic())
                raise RuntimeError("the probe's first call fails")
            probe_started.append(time.monotonic())
        time.sleep(0.002)
        return batch

    processor = BatchProcessor(BatchProcessorConfig(
        max_workers=4, batch_timeout=batch_timeout, item_timeout=120,
        retry_delay=retry_delay))
    processor.start(model)
    row = np.zeros((1, 4), np.float32)
    out = []
    try:
        for _ in range(30):  # the usual call time: the hang overruns it
            processor.enqueue_predict(row).result()
        for _ in range(trials):
            hanging.clear()
            release.clear()
            if retried:
                failed = len(probe_failed)
                probe = processor.enqueue_predict(np.full((1, 4), PROBE, np.float32))
                while len(probe_failed) == failed:
                    time.sleep(0.0005)
                time.sleep(rng.uniform(0.0, retry_delay / 2))
            hung = processor.enqueue_predict(np.full((1, 4), HANG, np.float32))
            hanging.wait(10)
            if retried:
                probe.result()
                out.append(probe_started[-1] - probe_failed[-1] - retry_delay
                           - batch_timeout)
            else:
                # Past the hung call's overrun point (twice its usual time), at a random
                # moment against the watcher's looks.
                time.sleep(0.005 + rng.uniform(0.0, max(batch_timeout, 0.01)))
                sent = time.monotonic()
                processor.enqueue_predict(np.full((1, 4), PROBE, np.float32)).result()
                out.append(probe_started[-1] - sent - batch_timeout)
            release.set()
            hung.result()
    finally:
        release.set()
        processor.stop()
    return out


def during(strategy: str, clients: int, seconds: float) -> tuple[float, float, float, float]:
    """(req/s, median ms) of closed-loop clients before a hang, then during it."""
    hanging, release = threading.Event(), threading.Event()

    def model(batch: np.ndarray) -> np.ndarray:
        if batch[0, 0] == HANG:
            hanging.set()
            release.wait(120)
        time.sleep(0.002)
        return batch

    # A batch as large as the clients: FIXED, which waits for a full batch, fills.
    processor = BatchProcessor(BatchProcessorConfig(
        max_workers=4, batch_timeout=0.1, item_timeout=300, max_batch_size=clients,
        initial_batch_size=clients, processing_strategy=strategy))
    processor.start(model)
    row = np.zeros((1, 4), np.float32)

    def closed_loop() -> tuple[float, float]:
        took: list[float] = []
        end = time.monotonic() + seconds

        def client() -> None:
            while time.monotonic() < end:
                t = time.perf_counter()
                processor.enqueue_predict(row).result()
                took.append(time.perf_counter() - t)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len(took) / seconds, statistics.median(took) * 1e3

    try:
        for _ in range(30):
            processor.enqueue_predict(row).result()
        before = closed_loop()
        hung = processor.enqueue_predict(np.full((1, 4), HANG, np.float32))
        hanging.wait(10)
        while_hung = closed_loop()
        release.set()
        hung.result()
    finally:
        release.set()
        processor.stop()
    return before + while_hung


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeouts", default="0.002,0.01,0.05,0.2",
                        help="batch_timeout values, seconds, comma-separated")
    parser.add_argument("--trials", type=int, default=20, help="probes per batch_timeout")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4,
                        help="closed-loop clients while a call hangs (0: skip)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="seconds of clients before the hang, and during it")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    if not 0 <= args.clients <= 1024 or not 0.1 <= args.seconds <= 60.0:
        parser.error("--clients in [0, 1024], --seconds in [0.1, 60]")
    try:
        timeouts = [float(t) for t in args.timeouts.split(",")]
    except ValueError:
        parser.error(f"--timeouts: numbers of seconds, comma-separated; got {args.timeouts!r}")
    if not timeouts or any(not 0.0 <= t <= 10.0 for t in timeouts):
        parser.error("--timeouts: each in [0, 10] seconds")
    rng = random.Random(args.seed)
    print("batch_timeout ms | request | overshoot ms: median | p90 | most")
    for timeout in timeouts:
        for retried in (False, True):
            late = sorted(x * 1e3 for x in overshoots(timeout, args.trials, rng, retried))
            p90 = late[min(len(late) - 1, int(0.9 * len(late)))]
            print(f"{timeout * 1e3:g} | {'a retry' if retried else 'new'} | "
                  f"{statistics.median(late):.2f} | {p90:.2f} | {late[-1]:.2f}", flush=True)
    if args.clients:
        print(f"\n{args.clients} clients, batch_timeout 100 ms | before the hang: req/s, "
              "p50 ms | while one call hangs: req/s, p50 ms")
        for strategy in ("adaptive", "greedy", "fixed"):
            r = during(strategy, args.clients, args.seconds)
            print(f"{strategy} | {r[0]:,.0f}, {r[1]:.2f} | {r[2]:,.0f}, {r[3]:.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How long one hung model call slows the requests after it.

    python benchmarks/after_a_hang.py                 # a 2 ms model, one call of 3 s
    python benchmarks/after_a_hang.py --hang 1 --gap-ms 10

One client sends a request every ``--gap-ms`` to a model that holds a lock and sleeps
2 ms per call (the default configuration, 4 workers); one call in the middle hangs for
``--hang`` seconds. Prints the median latency (ms) before the hang and over the first,
second, and third and fourth seconds after it (scaled with ``--gap-ms``): ADAPTIVE fits
its waits to the model's cost per call, so a hang that went into the fit would show as
a slower median afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np

from batchproc import BatchProcessor, BatchProcessorConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hang", type=float, default=3.0, help="seconds of the hung call")
    parser.add_argument("--gap-ms", type=float, default=20.0,
                        help="pause between one request's result and the next request")
    parser.add_argument("--before", type=int, default=150,
                        help="requests before the hang (the fit settles)")
    args = parser.parse_args(argv)
    lock = threading.Lock()
    hang = threading.Event()

    def model(batch: np.ndarray) -> np.ndarray:
        with lock:
            if hang.is_set():
                hang.clear()
                time.sleep(args.hang)
            time.sleep(0.002)
        return batch

    processor = BatchProcessor(BatchProcessorConfig(max_workers=4))
    processor.start(model)
    row = np.ones((1, 4), np.float32)
    gap = args.gap_ms / 1e3
    per_second = max(1, int(1.0 / (gap + 0.003)))

    def median_ms(n: int) -> float:
        took = []
        for _ in range(n):
            t = time.perf_counter()
            processor.enqueue_predict(row).result()
            took.append((time.perf_counter() - t) * 1e3)
            time.sleep(gap)
        return statistics.median(took)

    try:
        before = median_ms(args.before)
        hang.set()
        processor.enqueue_predict(row).result()
        after = [median_ms(per_second), median_ms(per_second), median_ms(2 * per_second)]
    finally:
        processor.stop()
    print(f"median latency, ms: before the hang {before:.2f}; after it: 0-1 s {after[0]:.2f}, "
          f"1-2 s {after[1]:.2f}, 2-4 s {after[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How often an item larger than a batch gets through a model that fails now and then.

    python benchmarks/cut_item_retries.py            # a few seconds
    python benchmarks/cut_item_retries.py --fail 0.2 --retries 5

An item of ``--rows`` rows at ``max_batch_size = --max-batch`` runs in chunks that fit
(docs/priorities-and-limits.md). The model fails each call with probability ``--fail``
(seeded), as a flaky remote model or a transient device error would. A failing chunk
sends the item to be retried from that chunk (each failure counts against
``max_retries``); before, every retry ran all its chunks again, so an item of many
chunks rarely got through. Run it with an older build of batchproc for that figure.

Prints, per seed: items that succeeded, and model calls made (the least is items times
chunks per item).
"""

from __future__ import annotations

import argparse
import random
import sys
import threading

import numpy as np

from batchproc import BatchProcessor, BatchProcessorConfig


def run(seed: int, items: int, rows: int, max_batch: int, fail: float,
        retries: int) -> tuple[int, int]:
    """(items that succeeded, model calls) for one seed."""
    rng = random.Random(seed)
    lock = threading.Lock()
    calls = 0

    def flaky(batch: np.ndarray) -> np.ndarray:
        nonlocal calls
        with lock:
            calls += 1
            failing = rng.random() < fail
        if failing:
            raise ConnectionError("transient")
        return batch * 2

    p: BatchProcessor[np.ndarray, np.ndarray] = BatchProcessor(BatchProcessorConfig(
        max_batch_size=max_batch, max_workers=1, max_retries=retries, retry_delay=0.0,
        retry_on=(ConnectionError,)))
    p.start(flaky)
    succeeded = 0
    try:
        item = np.arange(rows, dtype=np.float64).reshape(rows, 1)
        for _ in range(items):
            try:
                succeeded += bool((p.enqueue_predict(item).result(timeout=60) == 2 * item).all())
            except ConnectionError:
                pass
    finally:
        p.stop()
    return succeeded, calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cut_item_retries.py",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--rows", type=int, default=80, help="rows per item (default 80)")
    ap.add_argument("--max-batch", type=int, default=4, help="max_batch_size (default 4)")
    ap.add_argument("--fail", type=float, default=0.1,
                    help="probability that a call fails (default 0.1)")
    ap.add_argument("--retries", type=int, default=3, help="max_retries (default 3)")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args(argv)
    if not (args.items >= 1 and args.rows >= 1 and args.max_batch >= 1
            and 0.0 <= args.fail < 1.0 and args.retries >= 0):
        ap.error("--items, --rows, --max-batch must be >= 1; --fail in [0, 1); --retries >= 0")
    chunks = -(-args.rows // args.max_batch)
    print(f"{args.items} items of {args.rows} rows ({chunks} chunks each) at max batch "
          f"{args.max_batch}; calls fail with p={args.fail:g}; max_retries={args.retries}\n")
    print("| seed | items that succeeded | model calls (least: "
          f"{args.items * chunks:,}) |\n|---:|---:|---:|")
    for seed in (int(s) for s in args.seeds.split(",")):
        ok, calls = run(seed, args.items, args.rows, args.max_batch, args.fail, args.retries)
        print(f"| {seed} | {ok} of {args.items} | {calls:,} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

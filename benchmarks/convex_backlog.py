"""Where ADAPTIVE's target settles on a model whose cost per row grows with the batch,
under a queue that never drains: a simulation of the controller alone (no threads).

    python benchmarks/convex_backlog.py                       # this build's controller
    git show REV:src/batchproc/controller.py > /tmp/controller_rev.py
    python benchmarks/convex_backlog.py --controller /tmp/controller_rev.py

The model costs ``20 ms + 19.5 us * rows**2`` a call: throughput peaks at 32 rows, and a
call of 1,024 rows (``max_batch_size``) takes 20 s, 16 times the cost per row. Each call
is off by a normal random factor (``--noise``: its standard deviation). A backed-up
queue doubles the target toward ``max_batch_size``; the latency model's fit must see the
curvature on the way and bring it back. Per noise level, over ``--seeds`` seeded runs of
``--batches`` batches: how many settled within 16-64 rows, and how many stayed at 1,024.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
from typing import Any

from batchproc import BatchProcessorConfig

FIXED_COST, CURVATURE, MAX_BATCH = 0.02, 0.02 / 1024, 1024


def load_controller(path: str | None) -> Any:
    if path is None:
        from batchproc.controller import Controller
        return Controller
    # Loaded as a module of the installed package, so that its relative imports resolve.
    spec = importlib.util.spec_from_file_location("batchproc._controller_under_test", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--controller {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Controller


def settled_size(controller_class: Any, seed: int, noise: float, batches: int) -> int:
    rng = random.Random(seed)
    controller = controller_class(BatchProcessorConfig(max_batch_size=MAX_BATCH,
                                                       batch_timeout=0.1))
    for _ in range(batches):
        rows = controller.plan(10**6).target_rows
        seconds = (FIXED_COST + CURVATURE * rows * rows) * (1.0 + noise * rng.gauss(0.0, 1.0))
        controller.observe_batch(rows, max(seconds, 1e-6), rows, queued_rows=10**6)
    return int(controller.current_batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--controller", help="a controller.py to load instead of this "
                        "build's (another revision's, from git show)")
    parser.add_argument("--noise", default="0,0.05,0.1,0.2",
                        help="standard deviations of the per-call factor, comma-separated")
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--batches", type=int, default=3000)
    args = parser.parse_args()
    try:
        noises = [float(x) for x in args.noise.split(",")]
    except ValueError:
        parser.error(f"--noise: not numbers: {args.noise!r}")
    if not all(0.0 <= x < 1.0 for x in noises):
        parser.error("--noise: each must be >= 0 and < 1")
    if args.seeds < 1 or args.batches < 1:
        parser.error("--seeds and --batches must be >= 1")
    controller_class = load_controller(args.controller)
    print(f"controller: {args.controller or 'this build'}; {args.seeds} seeds of "
          f"{args.batches} batches; optimum 32 rows, max_batch_size {MAX_BATCH}\n")
    print("| noise | settled at 16-64 rows | stayed at 1,024 | median size |")
    print("|---:|---:|---:|---:|")
    for noise in noises:
        sizes = sorted(settled_size(controller_class, seed, noise, args.batches)
                       for seed in range(args.seeds))
        near = sum(16 <= s <= 64 for s in sizes)
        stuck = sum(s == MAX_BATCH for s in sizes)
        print(f"| {noise:.0%} | {near}/{args.seeds} | {stuck}/{args.seeds} "
              f"| {sizes[len(sizes) // 2]} |")


if __name__ == "__main__":
    main()

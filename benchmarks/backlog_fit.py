"""Where ADAPTIVE's target settles under a queue that never drains, on costs that do and
do not curve: a simulation of the controller alone (no threads).

    python benchmarks/backlog_fit.py                        # this build's controller
    git show REV:src/batchproc/controller.py > controller_rev.py
    python benchmarks/backlog_fit.py --controller controller_rev.py

A backed-up queue doubles the target toward ``max_batch_size`` (1,024); the latency
model's fit must see a curvature on the way if there is one, and must not see one that
is not there. Each call is off by a normal random factor (``--noise``: its standard
deviation). Over ``--seeds`` seeded runs per cost and noise level:

* convex: ``20 ms + 19.5 us * rows**2`` peaks at 32 rows, and a call of 1,024 rows
  takes 20 s, 16 times the cost per row: how many runs settled within 16-64 rows after
  3,000 batches, and how many stayed at 1,024;
* linear (``0.1 ms * rows``; ``20 ms + 1 ms * rows``; ``5 ms + 0.1 ms * rows``): bigger
  batches are never worse: how many runs ended under 512 rows after 1,000 batches, held
  there by a curvature fitted from noise.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
from collections.abc import Callable
from typing import Any

from batchproc import BatchProcessorConfig

MAX_BATCH = 1024
CONVEX = ("20 ms + 19.5 us * rows**2", lambda rows: 0.02 + 0.02 / 1024 * rows * rows)
LINEAR = [("0.1 ms * rows", lambda rows: 1e-4 * rows),
          ("20 ms + 1 ms * rows", lambda rows: 0.02 + 1e-3 * rows),
          ("5 ms + 0.1 ms * rows", lambda rows: 0.005 + 1e-4 * rows)]


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


def settled_size(controller_class: Any, cost: Callable[[int], float], seed: int,
                 noise: float, batches: int) -> int:
    rng = random.Random(seed)
    controller = controller_class(BatchProcessorConfig(max_batch_size=MAX_BATCH,
                                                       batch_timeout=0.1))
    for _ in range(batches):
        rows = controller.plan(10**6).target_rows
        seconds = cost(rows) * (1.0 + noise * rng.gauss(0.0, 1.0))
        controller.observe_batch(rows, max(seconds, 1e-6), rows, queued_rows=10**6)
    return int(controller.current_batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--controller", help="a controller.py to load instead of this "
                        "build's (another revision's, from git show)")
    parser.add_argument("--noise", default="0,0.02,0.05,0.1,0.2",
                        help="standard deviations of the per-call factor, comma-separated")
    parser.add_argument("--seeds", type=int, default=100)
    args = parser.parse_args()
    try:
        noises = [float(x) for x in args.noise.split(",")]
    except ValueError:
        parser.error(f"--noise: not numbers: {args.noise!r}")
    if not all(0.0 <= x < 1.0 for x in noises):
        parser.error("--noise: each must be >= 0 and < 1")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    controller_class = load_controller(args.controller)
    seeds = range(args.seeds)
    print(f"controller: {args.controller or 'this build'}; {args.seeds} seeds per cost and "
          f"noise; max_batch_size {MAX_BATCH}\n")
    print(f"convex, {CONVEX[0]} (optimum 32 rows), 3,000 batches:\n")
    print("| noise | settled at 16-64 rows | stayed at 1,024 | median size |")
    print("|---:|---:|---:|---:|")
    for noise in noises:
        sizes = sorted(settled_size(controller_class, CONVEX[1], s, noise, 3000)
                       for s in seeds)
        print(f"| {noise:.0%} | {sum(16 <= x <= 64 for x in sizes)}/{args.seeds} "
              f"| {sum(x == MAX_BATCH for x in sizes)}/{args.seeds} "
              f"| {sizes[len(sizes) // 2]} |")
    print("\nlinear, 1,000 batches: runs that ended under 512 rows\n")
    print("| noise | " + " | ".join(name for name, _ in LINEAR) + " |")
    print("|---:|" + "---:|" * len(LINEAR))
    for noise in noises:
        cells = [sum(settled_size(controller_class, cost, s, noise, 1000) < 512
                     for s in seeds) for _, cost in LINEAR]
        print(f"| {noise:.0%} | " + " | ".join(f"{n}/{args.seeds}" for n in cells) + " |")


if __name__ == "__main__":
    main()

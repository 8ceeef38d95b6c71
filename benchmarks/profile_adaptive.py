"""Where ADAPTIVE's latency goes, next to a static configuration, at one open-loop load.

    python benchmarks/profile_adaptive.py --model mlp --rate 28000
    python benchmarks/profile_adaptive.py --model fixed --rate 11000 --static 64,0,1

One open-loop Poisson run per system (the loads of compare_adaptive.py), recording per
batch what the controller planned (target rows, idle gap, fill time, concurrent calls
allowed), the rows taken, the model call's time, and how late the load generator
submitted each request against its schedule (the generator needs the GIL too: a worker
that holds it delays arrivals, and the delay counts as latency), and the process's CPU
seconds per second of the run (all threads; near 1.0 a process whose work holds the GIL
has none to spare), and how often its threads went to sleep per batch (voluntary context
switches, each a wake-up to pay). Prints one summary line per system; ``--json`` writes the figures.
"""

# ruff: noqa: E402  (BLAS settings must precede the numpy import)

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import resource
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
from compare_adaptive import MAX_BATCH, TimedModel, _target

from batchproc.bench.loads import Bounds, Load, arrival_times
from batchproc.bench.models import make_model
from batchproc.bench.runner import run_target
from batchproc.bench.tune import Candidate


class Probe:
    """Wraps a started target: records each plan, each observed batch and each submit."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.plans: list[tuple[float, int, float, float, int]] = []
        self.batches: list[tuple[int, float]] = []
        self.submits: list[float] = []
        self.name = target.name
        self.is_async = False

    def start(self, model: Any) -> None:
        self.target.start(model)
        ctl = self.target._p._controller
        plan, observe = ctl.plan, ctl.observe_batch
        pc = time.perf_counter

        def traced_plan(queued_rows: int) -> Any:
            p = plan(queued_rows)
            self.plans.append((pc(), p.target_rows, p.idle_gap or 0.0, p.fill_time,
                               ctl.slots.limit))
            return p

        def traced_observe(rows: int, seconds: float, *args: Any) -> None:
            self.batches.append((rows, seconds))
            observe(rows, seconds, *args)

        ctl.plan = traced_plan
        ctl.observe_batch = traced_observe
        self.controller = ctl
        submit = self.target.submit
        rec = self.submits.append

        def traced_submit(item: Any, priority: int) -> Any:
            rec(pc())
            return submit(item, priority)

        self.submit = traced_submit

    def stop(self) -> None:
        self.target.stop()

    def stats(self) -> dict[str, Any]:
        return self.target.stats()


def profile(system: Candidate | None, model_name: str, rate: float, duration: float,
            seed: int) -> dict[str, Any]:
    model = TimedModel(make_model(model_name))
    probe = Probe(_target(system, rate))
    load = Load("rate", rate=rate, seed=seed)
    switches0 = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    cpu0, wall0 = time.process_time(), time.perf_counter()
    run = run_target(probe, model, model_name, load, Bounds(duration=duration))
    cpu_share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches0
    sub = np.asarray(probe.submits)
    sched = arrival_times(load, Bounds(duration=duration))
    lag = (sub - sub[0]) - (sched[: len(sub)] - sched[0]) if len(sub) else np.zeros(1)
    limits = Counter(p[4] for p in probe.plans)
    ctl = probe.controller.model
    rows = np.asarray([b[0] for b in probe.batches] or [0])
    return {
        "system": probe.name,
        "p50_ms": run.p50_ms, "p99_ms": run.p99_ms, "throughput": run.throughput,
        **model.figures(),
        "process_cpu_share": cpu_share,
        "batches_per_s": len(probe.batches) / max(run.elapsed_s, 1e-9),
        "sleeps_per_batch": switches / max(1, len(probe.batches)),
        "rows_p10_p50_p90": [float(x) for x in np.percentile(rows, [10, 50, 90])],
        "slot_limits": {str(k): v / max(1, len(probe.plans)) for k, v in limits.items()},
        "fit_us": [ctl.a * 1e6, ctl.b * 1e6, ctl.c * 1e6],
        "idle_gap_us": (probe.plans[-1][2] * 1e6) if probe.plans else None,
        "target_rows": probe.plans[-1][1] if probe.plans else None,
        "gen_lag_p50_p99_ms": [float(x) for x in np.percentile(lag, [50, 99]) * 1e3],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--rate", type=float, required=True, help="requests/s")
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--static", action="append", default=[],
                   help="size,delay_ms,workers of a FIXED configuration (repeatable)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    systems: list[Candidate | None] = [None]
    for s in args.static or [f"{MAX_BATCH},0,1"]:
        size, delay, workers = s.split(",")
        systems.append(Candidate("fixed", int(size), float(delay), int(workers)))
    out = []
    for rep in range(args.repeat):
        for system in systems:
            r = profile(system, args.model, args.rate, args.duration, rep)
            out.append(r)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                              for k, v in r.items()}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

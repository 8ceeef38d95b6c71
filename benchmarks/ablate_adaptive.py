"""ADAPTIVE taken apart, side by side at one open-loop load: which of its parts costs p99.

    python benchmarks/ablate_adaptive.py --model mlp --rate 22769
    python benchmarks/ablate_adaptive.py --model mlp --rate 22769 \\
        --systems adaptive,no-fit-ceiling,adaptive-workers:1,fixed:16,0,1
    python benchmarks/ablate_adaptive.py --model fixed --rate 10383 --rounds 8 \\
        --systems adaptive,keep-slot,fixed:64,0,1

Each round runs every system once for ``--duration`` seconds on one arrival seed (the
open-loop Poisson load of compare_adaptive.py), in a rotated order, after one uncounted
run of each of at most 0.5 s (the process's first runs are slower). Prints, per system,
the median p99 over the rounds, each round's p99, and in how many rounds it was worse
than the last system listed (the reference). Systems:

* ``adaptive``: the default ADAPTIVE of compare_adaptive.py;
* ``adaptive-workers:N``: the same with ``max_workers=N``;
* ``no-fit-ceiling``: ADAPTIVE whose size ceiling ignores the fitted optimum
  (``LatencyModel.optimal_rows`` returns ``max_batch_size``);
* ``no-watch``: ADAPTIVE with no worker watching for requests past ``batch_timeout``
  (no call slot is taken over);
* ``keep-slot``: ADAPTIVE whose batches keep their call slot through every delivery;
* ``hand-over``: ADAPTIVE whose batches hand their call slot over during a delivery
  (a full batch waiting) even once its calls were seen to take turns
  (``Controller.calls_serialize`` read as False);
* ``fixed:SIZE,DELAY_MS,WORKERS``: a static FIXED configuration.

The variants replace one method of the engine for the length of their run, in this
process only: a way to test where ADAPTIVE's latency goes before changing it.
"""

# ruff: noqa: E402  (BLAS settings must precede the numpy import)

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from typing import Any

from compare_adaptive import MAX_BATCH, MODELS, QUEUE_S, TimedModel, _target

from batchproc.bench.loads import Bounds, Load
from batchproc.bench.models import make_model
from batchproc.bench.runner import run_target
from batchproc.bench.targets import Batchproc
from batchproc.bench.tune import Candidate
from batchproc.config import BatchProcessorConfig
from batchproc.controller import Controller, LatencyModel
from batchproc.engine.delivery import Delivery
from batchproc.engine.workers import POP_POLL, WorkerPool

VARIANTS = ("adaptive", "no-fit-ceiling", "no-watch", "keep-slot", "hand-over")


@contextlib.contextmanager
def _patched(owner: type, name: str, replacement: Any) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _variant(system: str) -> contextlib.AbstractContextManager[None]:
    if system == "no-fit-ceiling":
        return _patched(LatencyModel, "optimal_rows", lambda self, upper: upper)
    if system == "no-watch":
        return _patched(WorkerPool, "_until_overdue", lambda self: POP_POLL)
    if system == "keep-slot":
        return _patched(Delivery, "_next_call_can_start", lambda self, *args: False)
    if system == "hand-over":
        return _patched(Controller, "calls_serialize", property(lambda self: False))
    return contextlib.nullcontext()


MOST_RATE = 1_000_000.0  # req/s: an open loop from one thread reaches far less
WARM_UP_S = 0.5


def parse_system(text: str) -> str:
    """Check one ``--systems`` entry; returns it in its canonical spelling (so that
    ``fixed:16,0,1`` and ``fixed:16,0.0,1`` are one system). The configuration it names
    must be one ``BatchProcessorConfig`` accepts."""
    if text in VARIANTS:
        return text
    kind, _, rest = text.partition(":")
    try:
        if kind == "adaptive-workers":
            workers = int(rest)
            BatchProcessorConfig(max_workers=workers)
            # The default's own worker count is the default.
            return ("adaptive" if workers == BatchProcessorConfig().max_workers
                    else f"{kind}:{workers}")
        if kind == "fixed" and rest.count(",") == 2:
            size, delay, workers = rest.split(",")
            candidate = Candidate("fixed", int(size), float(delay), int(workers))
            BatchProcessorConfig(**candidate.fields())
            return f"fixed:{int(size)},{float(delay)!r},{int(workers)}"
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"system {text!r}: {e}") from None
    raise argparse.ArgumentTypeError(
        f"unknown system {text!r}: one of {', '.join(VARIANTS)}, adaptive-workers:N, "
        "fixed:SIZE,DELAY_MS,WORKERS")


def _make_target(system: str, rate: float) -> Batchproc:
    kind, _, rest = system.partition(":")
    if kind == "fixed":
        size, delay, workers = rest.split(",")
        return _target(Candidate("fixed", int(size), float(delay), int(workers)), rate)
    target = _target(None, rate)
    target.name = system
    if kind == "adaptive-workers":
        target.settings["max_workers"] = int(rest)
    return target


def run(model_name: str, rate: float, systems: list[str], rounds: int,
        duration: float) -> tuple[dict[str, list[float]], list[str]]:
    """Each system's p99 (ms) per round, and what went wrong (a run with errors,
    requests left unfinished or refused, or none completed)."""
    model = TimedModel(make_model(model_name))
    p99: dict[str, list[float]] = {s: [] for s in systems}
    problems: list[str] = []
    for i in range(-1, rounds):  # round -1: the warm-up, not counted
        k = max(i, 0) % len(systems)  # rotated: each system in another place
        for system in systems[k:] + systems[:k]:
            model.reset()
            with _variant(system):
                result = run_target(_make_target(system, rate), model, model_name,
                                    Load("rate", rate=rate, seed=max(i, 0)),
                                    Bounds(duration=min(WARM_UP_S, duration) if i < 0
                                           else duration))
            if i < 0:
                continue
            p99[system].append(result.p99_ms)
            if (result.errors or result.unfinished or result.refused
                    or not result.completed):
                problems.append(
                    f"round {i + 1}, {system}: {result.completed} completed, "
                    f"{result.errors} failed, {result.unfinished} unfinished, "
                    f"{result.refused} refused"
                    + (f" ({result.first_error})" if result.first_error else ""))
        if i >= 0:
            print(f"round {i + 1}/{rounds}: " + ", ".join(
                f"{s} {p99[s][-1]:.2f}" for s in systems), file=sys.stderr, flush=True)
    return p99, problems


def table(p99: dict[str, list[float]]) -> str:
    systems = list(p99)
    reference = systems[-1]
    lines = [f"| system | median p99 ms | rounds worse than {reference} | p99 per round, ms |",
             "|---|---:|---:|---|"]
    for s in systems:
        worse = ("" if s == reference else
                 f"{sum(a > b for a, b in zip(p99[s], p99[reference]))} of {len(p99[s])}")
        lines.append(f"| {s} | {statistics.median(p99[s]):.3g} | {worse} | "
                     + ", ".join(f"{v:.2f}" for v in p99[s]) + " |")
    return "\n".join(lines)


def _number(kind: type, low: float, high: float) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not low <= value <= high:  # refuses NaN too
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g}, got {text!r}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp", choices=MODELS)
    p.add_argument("--rate", type=_number(float, 1.0, MOST_RATE), required=True,
                   help="offered requests/s")
    p.add_argument("--systems", default="adaptive,no-watch,keep-slot,fixed:16,0,1",
                   help="comma-separated; fixed:SIZE,DELAY_MS,WORKERS takes three fields")
    p.add_argument("--rounds", type=_number(int, 1, 1000), default=10)
    p.add_argument("--duration", type=_number(float, 0.1, 3600.0), default=2.0,
                   help="s per run")
    p.add_argument("--json", default="", help="write each round's p99 here")
    args = p.parse_args(argv)
    # "fixed:16,0,1" holds commas of its own: split on those that start a new system.
    entries: list[str] = []
    for part in args.systems.split(","):
        if entries and entries[-1].startswith("fixed:") and entries[-1].count(",") < 2:
            entries[-1] += "," + part
        else:
            entries.append(part)
    try:
        systems = [parse_system(e) for e in entries]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if len(set(systems)) != len(systems):
        p.error("a system is listed twice")
    if args.json:
        # Checked now, written after the runs (an existing file is kept until then).
        folder = os.path.dirname(os.path.abspath(args.json))
        if (os.path.isdir(args.json) or not os.access(folder, os.W_OK)
                or (os.path.exists(args.json) and not os.access(args.json, os.W_OK))):
            p.error(f"--json: cannot write {args.json!r}")
    print(f"{args.model} at {args.rate:,.0f} req/s, max batch {MAX_BATCH}, "
          f"{args.rounds} rounds of {args.duration} s (queue {QUEUE_S} s of arrivals)",
          file=sys.stderr)
    p99, problems = run(args.model, args.rate, systems, args.rounds, args.duration)
    print(table(p99))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"model": args.model, "rate": args.rate,
                       "duration_s": args.duration, "p99_ms": p99,
                       "problems": problems}, out, indent=1)
    for problem in problems:
        print(f"not a clean run: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

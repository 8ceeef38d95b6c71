"""``batchproc bench --sweep``: the latency-throughput curve of each system.

First the capacity: batchproc's achieved throughput under a closed loop of twice
``max_batch`` clients (at most :data:`CAPACITY_CLIENTS`) for one run's duration (or
``--capacity``, given). Then each system (batchproc, no batching, each ``--config``)
runs an open loop of Poisson arrivals at each offered load, a fraction of that capacity,
from the lowest up; every system gets the same arrivals at one load. A system that
achieves less than :data:`SATURATED` of the offered load twice in a row is saturated: its
higher loads are skipped (they would only queue longer) and listed as skipped.

Each point records offered load (its arrivals over their window: the fraction of the
capacity, to rounding), achieved throughput (completed arrivals over that window, see
:func:`.loads.open_span`), p50/p95/p99 latency (from each request's scheduled arrival,
so queueing counts) and rows per model call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..log_limits import plural
from . import report
from .inputs import RequestSource
from .interrupts import NOTE, keep_finished
from .loads import Bounds, Load, drain_window, fmt_load_rate
from .models import Model
from .runner import Progress, RunResult, run_target

DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
SATURATED = 0.8  # achieved below this share of the offered load: not keeping up
SATURATED_IN_A_ROW = 2
# The most closed-loop clients (threads) the capacity is measured with.
CAPACITY_CLIENTS = 512
COLUMNS = ("system", "offered req/s", "achieved req/s", "p50 ms", "p99 ms", "mean batch",
           "requests")


@dataclass
class SweepPoint:
    """One system at one offered load (requests/s, ``fraction`` of the capacity)."""

    fraction: float
    offered: float
    run: RunResult
    duration: float  # seconds of arrivals

    @property
    def arrival_rate(self) -> float:
        """The load offered: the run's arrivals over their window (``offered`` to
        rounding)."""
        return arrival_rate(self.run, self.duration, self.offered)

    @property
    def saturated(self) -> bool:
        return self.run.throughput < SATURATED * self.arrival_rate

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "offered": self.offered,
                "saturated": self.saturated, **self.run.to_dict()}


@dataclass
class SweepResult:
    capacity: float  # requests/s
    capacity_run: RunResult | None  # None when given with --capacity
    # By system, in the order of offered load; a system no run of which finished (the
    # sweep was interrupted first) has none.
    points: dict[str, list[SweepPoint]]
    skipped: dict[str, list[float]]  # by system: fractions not run once saturated
    interrupted: bool = False  # Ctrl-C ended the sweep: ``points`` holds what finished


def arrival_rate(run: RunResult, duration: float, offered: float) -> float:
    """The load a run was offered, in requests/s: its scheduled arrivals over the window
    they arrive in (``offered``, the rate asked, to rounding; ``offered`` itself for a
    run that has none: it failed). ``duration`` is unused (the run has its window)."""
    return offered if run.arrival_rate is None else run.arrival_rate


def capacity_clients(max_batch: int, least: int = 1) -> int:
    """The closed-loop clients the capacity is measured with: twice ``max_batch``, at
    least ``least``, at most :data:`CAPACITY_CLIENTS`."""
    return min(max(2 * max_batch, least), CAPACITY_CLIENTS)


def measure_capacity(
    target: Any,
    model: Model,
    model_name: str,
    source: RequestSource,
    *,
    clients: int,
    duration: float,
    seed: int = 0,
    progress: Progress | None = None,
    settle_s: float | None = None,
) -> RunResult:
    """``target``'s achieved throughput (requests/s) under ``clients`` closed-loop clients
    for ``duration`` seconds: the scale of the offered loads. ``settle_s``: how long the
    model calls still running after it are waited for (default: a run's drain)."""
    if settle_s is None:
        settle_s = drain_window(duration)
    load = Load("closed", clients=clients, source=source, seed=seed)
    return run_target(target, model, model_name, load, Bounds(duration=duration), progress,
                      label=f"capacity · {load.label} · {target.name}",
                      settle_s=settle_s)


def no_capacity(run: RunResult, duration: float) -> str:
    """Why a capacity run that completed no request measured nothing, on one line: the
    run failed, requests failed or the model raised (the first error), or neither: the
    model hung or is too slow for ``duration`` (seconds), with its requests left
    unfinished and its calls left running."""
    why = run.failed or run.first_error or (run.first_model_error if run.model_errors
                                            else None)
    if why is not None:
        return f"the model failed while measuring capacity: {why}"
    left = (f"; {plural(run.left_running, 'call')} of the model still running"
            if run.left_running else "")
    return (f"no request completed while measuring capacity ({run.unfinished:,} unfinished "
            f"after {duration:g} s and the drain{left}): the model hangs, or is too slow "
            "for --duration")


def queue_size_for(max_rate: float, duration: float) -> int:
    """A queue that holds every request an open loop offers in one run (at least the
    library's 1000, at most a million): a backlog shows as latency, not refusals."""
    return int(min(max(1000, max_rate * duration * 1.2 + 100), 1_000_000))


def run_sweep(
    systems: Sequence[Any],
    model: Model,
    model_name: str,
    source: RequestSource,
    *,
    fractions: Sequence[float],
    capacity: float,
    duration: float,
    seed: int = 0,
    capacity_run: RunResult | None = None,
    progress: Progress | None = None,
) -> SweepResult:
    """Run every system at ``fractions`` of ``capacity`` (requests/s), ``duration`` seconds
    each, Poisson arrivals; skip a system's higher loads once it is saturated. Ctrl-C
    ends the sweep: the result holds the points that finished, ``interrupted`` set
    (:mod:`.interrupts`)."""
    points: dict[str, list[SweepPoint]] = {}
    skipped: dict[str, list[float]] = {}
    total = len(systems) * len(fractions)
    k = 0
    with keep_finished() as stop:
        for target in systems:
            in_a_row = 0
            for i, f in enumerate(sorted(fractions)):
                k += 1
                if in_a_row >= SATURATED_IN_A_ROW:
                    skipped.setdefault(target.name, []).extend(sorted(fractions)[i:])
                    k += len(fractions) - i - 1
                    break
                # The arrivals the window holds, as a rate (schedule_of rounds to whole
                # arrivals): the run's name in the notes reads as the table's offered load.
                rate = max(1, round(capacity * f * duration)) / duration
                load = Load("rate", rate=rate, source=source, seed=seed)
                run = run_target(
                    target, model, model_name, load, Bounds(duration=duration), progress,
                    label=(f"[{k}/{total}] {target.name} · {f:g} x capacity = "
                           f"{rate:,.0f} req/s"),
                    settle_s=drain_window(duration),
                )
                point = SweepPoint(f, rate, run, duration)
                points.setdefault(target.name, []).append(point)
                in_a_row = in_a_row + 1 if point.saturated else 0
    return SweepResult(capacity, capacity_run, points, skipped, stop.interrupted)


def table_rows(result: SweepResult) -> list[list[str]]:
    rows = []
    for system, pts in result.points.items():
        for p in pts:
            r = p.run
            # As the run's name in the notes gives it (fmt_load_rate: 2.31 below 10).
            offered = f"{fmt_load_rate(p.arrival_rate)} ({p.fraction:g}x)"
            if r.failed:
                rows.append([system, offered, "failed", "-", "-", "-", "-"])
                continue
            rows.append([
                system,
                offered,
                report.fmt_throughput(r) + (" !" if p.saturated else ""),
                report.fmt_ms(r.p50_ms),
                report.fmt_ms(r.p99_ms),
                f"{r.mean_batch:.1f}",
                report.fmt_completed(r),
            ])
    return rows


def notes(result: SweepResult) -> list[str]:
    out = []
    if any(p.saturated for pts in result.points.values() for p in pts):
        out.append(f"! achieved under {SATURATED:.0%} of the offered load: saturated")
    for system, fr in result.skipped.items():
        out.append(f"{system}: saturated, not run at " + ", ".join(f"{f:g}x" for f in fr))
    runs = [p.run for pts in result.points.values() for p in pts]
    # The sweep's table marks no run ended by its time bound (its arrivals not all
    # answered): its note of late requests tells it.
    out += report.run_notes(runs, time_bound=False)
    if result.interrupted:
        out.append(NOTE)
    return out


def print_sweep(title: str, result: SweepResult, extra_notes: Sequence[str] = ()) -> None:
    """The sweep's table on stdout: one row per system and offered load."""
    how = ("measured" if result.capacity_run is not None else "given")
    head = f"{title}\ncapacity ({how}): {report.fmt_rate(result.capacity)} req/s"
    report.print_table(head, COLUMNS, table_rows(result), [*notes(result), *extra_notes])


def to_json(result: SweepResult) -> dict[str, Any]:
    """``capacity`` {req_s, measured, run}, ``points`` (one object per system and load:
    system, fraction, offered, saturated, throughput, p50_ms, p95_ms, p99_ms,
    mean_batch, completed, ...), ``skipped`` {system: [fraction, ...]} and
    ``interrupted`` (true when Ctrl-C ended the sweep: ``points`` holds what finished)."""
    return {
        "interrupted": result.interrupted,
        "capacity": {
            "req_s": result.capacity,
            "measured": result.capacity_run is not None,
            "run": result.capacity_run.to_dict() if result.capacity_run else None,
        },
        "points": [p.to_dict() for pts in result.points.values() for p in pts],
        "skipped": result.skipped,
    }


def write_sweep_plot(path: str, result: SweepResult, title: str, subtitle: str) -> None:
    """The curve: p50 and p99 against achieved throughput, one colour per system."""
    curves = {s: [p.run for p in pts] for s, pts in result.points.items()}
    report.write_plot(path, curves, title, subtitle)

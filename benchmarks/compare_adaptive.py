"""ADAPTIVE with no tuning against the best static configuration, at loads from 10% to
90% of the capacity, and its saturation throughput against the limit.

    python benchmarks/compare_adaptive.py                   # full run (~18 min, 2 cores)
    python benchmarks/compare_adaptive.py --quick           # 1 repetition, short runs
    python benchmarks/compare_adaptive.py --models mlp --loads 0.3,0.9

For each model (``fixed``: 5 ms per call behind one lock; ``mlp``: numpy, holds the GIL):

1. the limit (the model called back to back on full batches of 64 rows, one thread) and
   ADAPTIVE's saturation throughput (a closed loop of 128 clients, the capacity of
   ``batchproc bench --sweep``), interleaved, ``--repeat`` times; the median limit is
   the capacity the loads are fractions of;
2. at each load, open-loop Poisson arrivals from one thread (latency from each request's
   scheduled arrival): ADAPTIVE (the default configuration except ``max_batch_size=64``,
   ``batch_timeout=5 ms``) and the 18 static FIXED configurations of size 4/16/64 x
   ``batch_timeout`` 0/1/5 ms x 1/4 workers, in a rotated order in each repetition. A
   static configuration that falls behind (achieves under 80% of the load it was
   offered, the sweep's rule) is not run again at that load or above: its p99 only
   measures its queue.

3. at each load, a confirmation: ADAPTIVE and the best static configuration of step 2,
   side by side in ``--confirm`` interleaved pairs of ``--confirm-duration`` seconds on
   fresh arrival seeds. The best of 18 noisy medians is biased low (it is picked for its
   luck as much as for its merit); measured again beside ADAPTIVE it is not. On a model
   that holds the GIL the tail is set by when the thread submitting the load gets it,
   and one run's p99 moves by 2-3x between runs of one configuration: the confirmation
   runs longer, and more often, than the search.

Reported per load: ADAPTIVE's median p99, the best static median p99 and which, their
ratio (1.0 = as good as the best static configuration), and the confirmation's medians
and ratio; per run the calls, rows per call, mean concurrent calls and mean call time
(the model is wrapped to time each call).
Writes benchmarks/results/adaptive.md and adaptive.json.
"""

# ruff: noqa: E402  (BLAS settings must precede the numpy import)

from __future__ import annotations

import os

# Single-threaded BLAS, as in compare_peers.py: on 2 shared cores a multi-threaded BLAS
# called from worker threads measures oversubscription.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np

from batchproc.bench import report
from batchproc.bench.inputs import FeatureRows
from batchproc.bench.loads import Bounds, Load
from batchproc.bench.models import make_model
from batchproc.bench.runner import RunResult, run_limit, run_target
from batchproc.bench.sweep import SATURATED, arrival_rate, measure_capacity
from batchproc.bench.targets import Batchproc
from batchproc.bench.tune import QUEUE_S, Candidate, candidates

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_BATCH = 64
MAX_DELAY = 0.005
ADAPTIVE = "ADAPTIVE"
SIZES = (4, 16, 64)
DELAYS_MS = (0.0, 1.0, 5.0)
WORKERS = (1, 4)
MODELS = ("fixed", "mlp")
LOADS = (0.1, 0.3, 0.5, 0.7, 0.9)
CONFIRM_SEED = 1000  # the confirmation's arrival seeds start here, apart from the search's
MIN_REQUESTS = 2000  # per run: enough samples for a p99 (the run lasts longer if need be)
# The static configuration whose saturation throughput is measured beside ADAPTIVE's.
SAT_STATIC = Candidate("fixed", MAX_BATCH, 0.0, 1)


class TimedModel:
    """Wraps a model: times each call and counts how many run at once (a lock per call;
    the model is the same for every system, so the cost is too)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.rows = 0
        self.busy_s = 0.0  # sum of call times, s
        self._running = 0
        self._since = 0.0
        self._first = 0.0
        self._last = 0.0
        self._overlap_s = 0.0  # integral of (calls running) over time while any runs, s
        self._active_s = 0.0  # time with at least one call running, s
        self.max_running = 0

    def _tick(self, now: float) -> None:
        if self._running:
            self._overlap_s += self._running * (now - self._since)
            self._active_s += now - self._since
        self._since = now

    def __call__(self, batch: Any) -> Any:
        pc = time.perf_counter
        with self._lock:
            t0 = pc()
            self._tick(t0)
            self._running += 1
            self.max_running = max(self.max_running, self._running)
            if not self.calls:
                self._first = t0
        try:
            return self.model(batch)
        finally:
            with self._lock:
                t1 = pc()
                self._tick(t1)
                self._running -= 1
                self.calls += 1
                self.rows += len(batch)
                self.busy_s += t1 - t0
                self._last = t1

    def figures(self) -> dict[str, float]:
        """calls, rows per call, mean call time (ms), mean calls running while any runs,
        and the share of the run's time with a call running."""
        span = self._last - self._first
        return {
            "calls": self.calls,
            "rows_per_call": self.rows / self.calls if self.calls else 0.0,
            "call_ms": 1e3 * self.busy_s / self.calls if self.calls else 0.0,
            "concurrency": self._overlap_s / self._active_s if self._active_s else 0.0,
            "max_concurrency": self.max_running,
            "busy_share": self._active_s / span if span > 0 else 0.0,
        }


def static_configs() -> list[Candidate]:
    return sorted(candidates(SIZES, DELAYS_MS, WORKERS, ("fixed",)),
                  key=lambda c: (c.max_batch_size, c.delay_ms, c.max_workers))


def _target(c: Candidate | None, offered: float) -> Batchproc:
    queue_size = max(1000, int(offered * QUEUE_S))  # as batchproc tune: a bounded backlog
    if c is None:
        return Batchproc(max_batch=MAX_BATCH, max_delay=MAX_DELAY, strategy="adaptive",
                         queue_size=queue_size, name=ADAPTIVE,
                         fields={"initial_batch_size": 32})  # the library's default
    return Batchproc(queue_size=queue_size, fields=c.fields(), name=c.label)


def _run(system: Candidate | None, model: TimedModel, name: str, rate: float,
         duration: float, seed: int) -> dict[str, Any]:
    model.reset()
    load = Load("rate", rate=rate, seed=seed)
    run = run_target(_target(system, rate), model, name, load, Bounds(duration=duration))
    offered = arrival_rate(run, duration, rate)
    return {
        "system": ADAPTIVE if system is None else system.key,
        "label": ADAPTIVE if system is None else system.label,
        "offered": offered,
        "saturated": run.throughput < SATURATED * offered,
        **{k: getattr(run, k) for k in ("throughput", "p50_ms", "p99_ms", "completed",
                                        "errors", "unfinished")},
        **model.figures(),
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_model(name: str, loads: list[float], repeat: int, duration: float,
              sat_duration: float, seed: int, capacity: float | None,
              confirm: int = 0, confirm_duration: float = 0.0) -> dict[str, Any]:
    model = TimedModel(make_model(name))
    # 1. the limit and the saturation throughput of ADAPTIVE and of a static
    # configuration, interleaved; ADAPTIVE's is the capacity the loads are fractions of
    # (as in batchproc bench --sweep) unless given
    limits: list[RunResult] = []
    sats: list[dict[str, Any]] = []
    for rep in range(repeat):
        limits.append(run_limit(model.model, name, Load("closed"),
                                Bounds(duration=sat_duration), MAX_BATCH))
        sat: dict[str, Any] = {}
        for system in (None, SAT_STATIC):
            model.reset()
            run = measure_capacity(_target(system, 0.0), model, name, FeatureRows(64),
                                   clients=2 * MAX_BATCH, duration=sat_duration,
                                   seed=seed + rep)
            sat[ADAPTIVE if system is None else "static"] = {
                "throughput": run.throughput, "p99_ms": run.p99_ms, **model.figures()}
        sats.append(sat)
        print(f"{name}: limit {limits[-1].throughput:,.0f} req/s, saturated: ADAPTIVE "
              f"{sat[ADAPTIVE]['throughput']:,.0f}, {SAT_STATIC.label} "
              f"{sat['static']['throughput']:,.0f} req/s", file=sys.stderr)
    limit = _median([r.throughput for r in limits])
    saturation = _median([s[ADAPTIVE]["throughput"] for s in sats])
    saturation_static = _median([s["static"]["throughput"] for s in sats])
    if capacity is None:
        capacity = saturation
    # 2. the loads, lowest first; static configurations that fell behind drop out
    statics = static_configs()
    behind: set[str] = set()
    points = []
    for frac in loads:
        rate = capacity * frac
        dur = max(duration, min(2 * duration, MIN_REQUESTS / rate))
        runs: list[dict[str, Any]] = []
        systems: list[Candidate | None] = [None, *statics]
        for rep in range(repeat):
            k = (rep * 7) % len(systems)  # rotated: each system in another place
            for system in systems[k:] + systems[:k]:
                key = ADAPTIVE if system is None else system.key
                if key in behind:
                    continue
                r = _run(system, model, name, rate, dur, seed + rep)
                r["repetition"] = rep
                runs.append(r)
                if r["saturated"] and system is not None:
                    behind.add(key)
        points.append(_summarise(name, frac, rate, dur, runs))
        p = points[-1]
        print(f"{name} {frac:.0%} ({rate:,.0f} req/s): ADAPTIVE p99 "
              f"{p['adaptive']['p99_ms']:.2f} ms, best static {p['best']['label']} "
              f"{p['best']['p99_ms']:.2f} ms, ratio {p['ratio']:.2f}", file=sys.stderr)
        best = next((c for c in statics if c.key == p["best"]["key"]), None)
        if confirm and best is not None:
            p["confirmation"] = _confirm(best, model, name, rate,
                                         max(dur, confirm_duration), confirm, seed)
            c = p["confirmation"]
            print(f"  confirmed in {confirm} pairs: ADAPTIVE {c['adaptive_p99_ms']:.2f} ms, "
                  f"{best.label} {c['static_p99_ms']:.2f} ms, ratio {c['ratio']:.2f}",
                  file=sys.stderr)
    return {
        "model": name,
        "capacity": capacity,
        "limit": limit,
        "limit_runs": [r.to_dict() for r in limits],
        "saturation": saturation,
        "saturation_ratio": saturation / limit,
        "saturation_static": saturation_static,
        "saturation_static_ratio": saturation_static / limit,
        "saturation_runs": sats,
        "points": points,
    }


def _confirm(best: Candidate, model: TimedModel, name: str, rate: float, dur: float,
             pairs: int, seed: int) -> dict[str, Any]:
    """ADAPTIVE and ``best`` side by side: ``pairs`` pairs, each on its own arrival seed
    (not the search's), the order alternating."""
    runs: list[dict[str, Any]] = []
    for i in range(pairs):
        order: tuple[Candidate | None, ...] = (None, best) if i % 2 == 0 else (best, None)
        for system in order:
            r = _run(system, model, name, rate, dur, seed + CONFIRM_SEED + i)
            r["pair"] = i
            runs.append(r)
    ada = [r["p99_ms"] for r in runs if r["system"] == ADAPTIVE]
    static = [r["p99_ms"] for r in runs if r["system"] != ADAPTIVE]
    return {
        "static": best.label, "pairs": pairs, "duration_s": dur,
        "adaptive_p99_ms": _median(ada), "static_p99_ms": _median(static),
        "ratio": _median(ada) / _median(static),
        "pair_ratios": [a / b for a, b in zip(ada, static)],
        "runs": runs,
    }


def _summarise(model: str, frac: float, rate: float, dur: float,
               runs: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["system"], []).append(r)
    med = {}
    for key, rs in by.items():
        # A configuration that fell behind in any repetition is out of the running.
        med[key] = {
            "label": rs[0]["label"],
            "runs": len(rs),
            "saturated": any(r["saturated"] for r in rs),
            **{f: _median([r[f] for r in rs])
               for f in ("p99_ms", "p50_ms", "throughput", "rows_per_call", "calls",
                         "call_ms", "concurrency", "busy_share")},
        }
    ranked = sorted((k for k in med if k != ADAPTIVE and not med[k]["saturated"]),
                    key=lambda k: med[k]["p99_ms"])
    best = med[ranked[0]] if ranked else {"label": "-", "p99_ms": float("nan")}
    ada = med[ADAPTIVE]
    return {
        "model": model, "fraction": frac, "rate": rate, "duration_s": dur,
        "adaptive": ada, "best": {"key": ranked[0] if ranked else None, **best},
        "ratio": ada["p99_ms"] / best["p99_ms"],
        "medians": med, "runs": runs,
    }


def _fmt_point(p: dict[str, Any]) -> list[str]:
    a, b = p["adaptive"], p["best"]
    return [
        p["model"], f"{p['fraction']:.0%} ({report.fmt_rate(p['rate'])})",
        report.fmt_ms(a["p99_ms"]), report.fmt_ms(b["p99_ms"]), b["label"],
        report.fmt_ratio(p["ratio"]),
        f"{a['rows_per_call']:.1f} / {b.get('rows_per_call', float('nan')):.1f}",
        f"{a['concurrency']:.2f} / {b.get('concurrency', float('nan')):.2f}",
        f"{a['call_ms']:.2f} / {b.get('call_ms', float('nan')):.2f}",
    ]


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    m = report.machine_info()
    heads = ("model", "load (req/s)", "ADAPTIVE p99 ms", "best static p99 ms",
             "best static", "ratio", "rows/call A / S", "concurrent calls A / S",
             "call ms A / S")
    rows = [_fmt_point(p) for r in results for p in r["points"]]
    sat_rows = [[r["model"], report.fmt_rate(r["limit"]), report.fmt_rate(r["saturation"]),
                 report.fmt_ratio(r["saturation_ratio"]),
                 report.fmt_rate(r["saturation_static"]),
                 report.fmt_ratio(r["saturation_static_ratio"]),
                 f"{_median([s[ADAPTIVE]['rows_per_call'] for s in r['saturation_runs']]):.1f}",
                 f"{_median([s[ADAPTIVE]['concurrency'] for s in r['saturation_runs']]):.2f}"]
                for r in results]
    caps = ", ".join(f"{r['model']} {report.fmt_rate(r['capacity'])} req/s" for r in results)
    return "\n".join([
        "# ADAPTIVE with no tuning vs the best static configuration",
        "",
        f"- date: {report.now_iso()}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['platform']}",
        f"- command: `{command}`",
        f"- open-loop Poisson arrivals from one thread, one row of 64 float32 per request, "
        f"latency from each scheduled arrival; {args.repeat} repetition(s) of "
        f"{args.duration:g} s or more (at least {MIN_REQUESTS} requests) per "
        "configuration and load, in a rotated order; medians",
        "- ADAPTIVE: the default configuration except max_batch_size=64, "
        "batch_timeout=5 ms; static: FIXED, size 4/16/64 x batch_timeout 0/1/5 ms x "
        "1/4 workers (a configuration under 80% of its offered load drops out)",
        f"- capacity (the loads' 100%): {caps}",
        "- ratio: ADAPTIVE p99 / best static p99 (the goal: <= 1.10); A / S: ADAPTIVE / "
        "the best static; concurrent calls: mean calls running while any runs",
        "",
        report.markdown_table(heads, rows, text_columns=2),
        "",
        *_confirmation_table(results),
        "Saturation: the limit is the model called back to back on full batches of 64 "
        "rows from one thread; saturated: a closed loop of 128 clients (the capacity of "
        "`batchproc bench --sweep`), ADAPTIVE and the static "
        f"{SAT_STATIC.label} (goal: ADAPTIVE >= 0.95x the limit); rows per call and "
        "concurrent calls of ADAPTIVE's run.",
        "",
        report.markdown_table(("model", "limit req/s", "ADAPTIVE req/s", "/ limit",
                               "static req/s", "/ limit", "rows/call",
                               "concurrent calls"), sat_rows),
        "",
    ])


def _confirmation_table(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        for p in r["points"]:
            c = p.get("confirmation")
            if c is None:
                continue
            pr = c["pair_ratios"]
            rows.append([p["model"], f"{p['fraction']:.0%}", c["static"],
                         report.fmt_ms(c["adaptive_p99_ms"]), report.fmt_ms(c["static_p99_ms"]),
                         report.fmt_ratio(c["ratio"]),
                         f"{min(pr):.2f}-{max(pr):.2f}" if pr else "-"])
    if not rows:
        return []
    first = results[0]["points"][0].get("confirmation", {})
    return [
        "Confirmation: ADAPTIVE and the best static configuration above, side by side in "
        f"{first.get('pairs', 0)} interleaved pairs of {first.get('duration_s', 0):g} s or "
        "more on arrival seeds the search did not use; medians (the goal: ratio <= 1.10).",
        "",
        report.markdown_table(("model", "load", "static", "ADAPTIVE p99 ms",
                               "static p99 ms", "ratio", "pair ratios"), rows,
                              text_columns=3),
        "",
    ]


def before_after(results: list[dict[str, Any]], before: dict[str, Any], label: str) -> str:
    """A table of each load's ratio in ``before`` (an earlier results file) and now."""
    old = {(p["model"], p["fraction"]): p for r in before["results"] for p in r["points"]}
    rows = []
    for r in results:
        for p in r["points"]:
            b = old.get((p["model"], p["fraction"]))
            if b is None:
                continue
            rows.append([p["model"], f"{p['fraction']:.0%}",
                         report.fmt_ms(b["adaptive"]["p99_ms"]), report.fmt_ms(b["best"]["p99_ms"]),
                         report.fmt_ratio(b["ratio"]), report.fmt_ms(p["adaptive"]["p99_ms"]),
                         report.fmt_ms(p["best"]["p99_ms"]), report.fmt_ratio(p["ratio"])])
    sat = {r["model"]: r for r in before["results"]}
    for r in results:
        b = sat.get(r["model"])
        if b is not None:
            rows.append([r["model"], "saturated / limit", "", "",
                         report.fmt_ratio(b["saturation_ratio"]), "", "",
                         report.fmt_ratio(r["saturation_ratio"])])
    return "\n".join([
        f"## Before and after ({label})",
        "",
        report.markdown_table(("model", "load", "before: ADAPTIVE p99 ms", "best static",
                               "ratio", "after: ADAPTIVE p99 ms", "best static", "ratio"),
                              rows, text_columns=2),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    p.add_argument("--loads", default=",".join(f"{x:g}" for x in LOADS),
                   help="fractions of the capacity, comma-separated")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--duration", type=float, default=1.0, help="seconds per run (at least)")
    p.add_argument("--sat-duration", type=float, default=1.5,
                   help="seconds per limit and saturation run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--confirm", type=int, default=9,
                   help="pairs of ADAPTIVE and the best static run side by side per load "
                        "(0: none)")
    p.add_argument("--confirm-duration", type=float, default=2.0,
                   help="seconds per confirmation run; a shorter one than --duration "
                        "runs --duration")
    p.add_argument("--capacity", default="",
                   help="model=req/s,... : the loads' 100%% (default: measured, ADAPTIVE "
                        "saturated); give it to compare builds at the same loads")
    p.add_argument("--quick", action="store_true",
                   help="1 repetition of 0.5 s runs: a smoke run")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="",
                   help="results file name, without suffix (default: adaptive; "
                        "adaptive-quick with --quick)")
    p.add_argument("--before", default="",
                   help="an earlier results .json: adds a table of its ratios beside these")
    p.add_argument("--before-label", default="the earlier run",
                   help="what --before measured (a build, a commit)")
    p.add_argument("--notes", default="", help="a markdown file appended to the results")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.confirm < 0:
        p.error("--repeat must be at least 1, --confirm at least 0")
    for flag in ("duration", "sat_duration", "confirm_duration"):
        value = getattr(args, flag)
        if not 0.0 <= value <= 600.0 or (value == 0.0 and flag != "confirm_duration"):
            least = "[0" if flag == "confirm_duration" else "(0"
            p.error(f"--{flag.replace('_', '-')}: seconds in {least}, 600], got {value!r}")
    if args.quick:
        args.repeat, args.duration, args.sat_duration, args.confirm = 1, 0.5, 0.5, 1
        args.confirm_duration = 0.5
    # A smoke run never overwrites the quoted results.
    args.name = args.name or ("adaptive-quick" if args.quick else "adaptive")
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if not models or unknown:
        p.error(f"--models: comma-separated, each one of {', '.join(MODELS)}; "
                f"got {args.models!r}")
    try:
        loads = sorted(float(x) for x in args.loads.split(",") if x)
    except ValueError:
        p.error(f"--loads: fractions of the capacity, comma-separated; got {args.loads!r}")
    if not loads or any(not 0.0 < x <= 2.0 for x in loads):
        p.error(f"--loads: each in (0, 2] (fractions of the capacity); got {args.loads!r}")
    try:
        given = {k: float(v) for k, _, v in
                 (x.partition("=") for x in args.capacity.split(",") if x)}
    except ValueError:
        p.error(f"--capacity: model=req/s,...; got {args.capacity!r}")
    if any(k not in MODELS or not 0.0 < v < float("inf") for k, v in given.items()):
        p.error(f"--capacity: model=req/s with a known model and a positive rate; "
                f"got {args.capacity!r}")
    command = "python benchmarks/compare_adaptive.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    t0 = time.monotonic()
    results = [run_model(m, loads, args.repeat, args.duration, args.sat_duration, args.seed,
                         given.get(m), args.confirm, args.confirm_duration)
               for m in models]
    md = markdown(results, args, command.strip())
    if args.before:
        with open(args.before, encoding="utf-8") as f:
            md += "\n" + before_after(results, json.load(f), args.before_label)
    if args.notes:
        with open(args.notes, encoding="utf-8") as f:
            md += "\n" + f.read()
    args_out = {**vars(args), "out_dir": os.path.relpath(args.out_dir, HERE)}
    doc = {"args": args_out, "machine": report.machine_info(),
           "versions": report.versions(), "elapsed_s": time.monotonic() - t0,
           "results": results}
    report.write_results(args.out_dir, args.name, md, doc)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())

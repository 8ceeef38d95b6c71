"""Peer comparison: batchproc against `batched`, Ray Serve's `serve.batch`, the minimal
pure-Python batcher, no batching and the limit — side by side in one run.

    python benchmarks/compare_peers.py              # full run, median of 3 (~10-15 min, 2 cores)
    python benchmarks/compare_peers.py --quick      # one repetition, smaller loads (~1-2 min)
    python benchmarks/compare_peers.py --repeat 5 --models identity,fixed --loads 64,burst

Every request is one row of 64 float32 features; every batcher gets max batch 64 and
max delay 5 ms. Models: identity, mlp, fixed (5 ms per call behind one lock). Loads:
1 client and 64 clients (closed loop), and a burst of 50,000 requests from one thread.
Each run is bounded by a request count and a time cap, so configurations that would take
far too long (no batching on `fixed`) stop early; the table marks them. Systems run in a
rotated order in each repetition; figures are medians over the repetitions.

Writes benchmarks/results/peers.md (tables with date, machine and versions) and
benchmarks/results/peers.json (every repetition's raw figures). Peers that are not
installed are skipped with a message (pip install batched "ray[serve]", or the
`bench` extra). The load generators, models and measurement are batchproc.bench's,
the same code as `batchproc bench`.
"""
# ruff: noqa: E402  (BLAS settings must precede the numpy import)

from __future__ import annotations

import os

# Single-threaded BLAS, set before numpy loads: on 2 shared cores a multi-threaded
# OpenBLAS makes the mlp model 3x slower per batch, and 100x slower under contention,
# which would measure thread oversubscription instead of batching.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from batchproc.bench import BenchError, report
from batchproc.bench.inputs import FeatureRows
from batchproc.bench.loads import Bounds, Load
from batchproc.bench.models import check_model, make_model
from batchproc.bench.runner import LIMIT, RunResult, run_limit, run_target
from batchproc.bench.targets import Batchproc, BatchprocAsync, Minimal, NoBatching

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import no_work_batchers
from peers import PeerUnavailable, batched_peer, ray_peer

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_BATCH = 64
MAX_DELAY = 0.005
FEATURES = 64
ASYNC = "batchproc asyncio"
SYSTEMS = ("batchproc", ASYNC, batched_peer.NAME, ray_peer.NAME, "minimal batcher",
           "no batching", LIMIT)
MODELS = ("identity", "mlp", "fixed")
LOADS = ("1", "64", "burst")

# (model, load key, subject, reference, target, why). A reference is one system, or a
# tuple of systems whose best throughput counts; None means the target is the share of
# the burst's requests completed.
THREAD_PEERS = (batched_peer.NAME, "minimal batcher")
TARGETS: list[tuple[str, str, str, str | tuple[str, ...] | None, float, str]] = [
    ("identity", "1", "batchproc", "minimal batcher", 100.0, "no waiting at low load"),
    ("identity", "burst", "batchproc", "minimal batcher", 4.0, "per-request overhead"),
    ("identity", "64", "batchproc", THREAD_PEERS, 1.5, "per-request overhead, threads"),
    ("identity", "64", ASYNC, ray_peer.NAME, 3.0, "the same asyncio clients as Ray"),
    ("identity", "burst", ASYNC, None, 1.0, "an asyncio burst is served, not refused"),
    ("fixed", "64", "batchproc", LIMIT, 0.95, "full batches, model never idle"),
    ("fixed", "burst", "batchproc", LIMIT, 0.95, "full batches, model never idle"),
    ("mlp", "burst", "batchproc", "no batching", 1.5, "batching pays on a real model"),
]

log = logging.getLogger("compare_peers")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="compare_peers.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="1 repetition, burst of 5,000, 1 s caps: a smoke run, not for quoting")
    p.add_argument("--repeat", type=int, default=None,
                   help="repetitions per configuration; medians are reported (default 3)")
    p.add_argument("--models", default=",".join(MODELS), help="comma list (default: all)")
    p.add_argument("--loads", default=",".join(LOADS), help="comma list of 1, 64, burst")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma list (default: all): " + ", ".join(SYSTEMS))
    p.add_argument("--burst", type=int, default=None, help="burst size (default 50000)")
    p.add_argument("--cap", type=float, default=None,
                   help="time cap per run in seconds, burst runs get 3x (default 3, quick 1)")
    p.add_argument("--workers", type=int, default=None, help="batchproc max_workers")
    p.add_argument("--strategy", default="adaptive", help="batchproc processing_strategy")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default=None,
                   help="output file stem (default: peers; peers-quick with --quick)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    a = p.parse_args(argv)
    a.repeat = a.repeat or (1 if a.quick else 3)
    a.name = a.name or ("peers-quick" if a.quick else "peers")
    a.burst = a.burst or (5_000 if a.quick else 50_000)
    a.cap = a.cap or (1.0 if a.quick else 3.0)
    a.models = [m for m in a.models.split(",") if m]
    a.loads = [x for x in a.loads.split(",") if x]
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    for name, got, allowed in (("--models", a.models, MODELS), ("--loads", a.loads, LOADS),
                               ("--systems", a.systems, SYSTEMS)):
        bad = [x for x in got if x not in allowed]
        if bad:
            p.error(f"{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    if a.repeat < 1 or a.burst < 1 or a.cap <= 0:
        p.error("--repeat, --burst and --cap must be positive")
    return a


def load_and_bounds(key: str, args: argparse.Namespace) -> tuple[Load, Bounds]:
    # Closed loops are measured over a fixed window; a burst runs to its end unless it
    # takes longer than 3 caps (no batching on `fixed`), and then the table says so.
    if key == "1":
        return Load("closed", clients=1, features=FEATURES), Bounds(None, args.cap)
    if key == "64":
        return Load("closed", clients=64, features=FEATURES), Bounds(None, args.cap)
    return Load("burst", burst=args.burst, features=FEATURES), Bounds(None, 3 * args.cap)


def make_factories(args: argparse.Namespace) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """System name -> a function making a fresh target; and skipped system -> why."""
    factories: dict[str, Callable[[], Any]] = {}
    skipped: dict[str, str] = {}
    for name in args.systems:
        if name in ("batchproc", ASYNC):
            cls = Batchproc if name == "batchproc" else BatchprocAsync
            factories[name] = lambda cls=cls: cls(
                MAX_BATCH, MAX_DELAY, workers=args.workers, strategy=args.strategy,
                queue_size=max(1000, args.burst),
            )
        elif name == "minimal batcher":
            factories[name] = lambda: Minimal(MAX_BATCH, MAX_DELAY)
        elif name == "no batching":
            factories[name] = NoBatching
        elif name == LIMIT:
            factories[name] = lambda: LIMIT
        else:
            mod = batched_peer if name == batched_peer.NAME else ray_peer
            try:
                mod.make_target(MAX_BATCH, MAX_DELAY)
            except PeerUnavailable as exc:
                skipped[name] = str(exc)
                continue
            factories[name] = (lambda m=mod: m.make_target(MAX_BATCH, MAX_DELAY))
    return factories, skipped


def median_run(runs: list[RunResult]) -> dict[str, Any]:
    def med(attr: str) -> float:
        vals = [getattr(r, attr) for r in runs if r.completed]
        return statistics.median(vals) if vals else float("nan")

    return {
        "throughput": med("throughput"), "p50_ms": med("p50_ms"), "p95_ms": med("p95_ms"),
        "p99_ms": med("p99_ms"), "mean_batch": med("mean_batch"),
        "gc_share": statistics.median(r.gc_s / r.elapsed_s if r.elapsed_s else 0.0
                                      for r in runs),
        "completed": int(statistics.median(r.completed for r in runs)),
        "stopped_by": "duration" if any(r.stopped_by == "duration" for r in runs) else "requests",
        "elapsed_s": med("elapsed_s"),
        "errors": sum(r.errors for r in runs),
        "unfinished": sum(r.unfinished for r in runs),
        "first_error": next((r.first_error for r in runs if r.first_error), None),
        "repeats": len(runs),
    }


def cpython_floor(n: int = 200_000) -> dict[str, float]:
    """What CPython itself costs per request, in microseconds: the floor for any batcher
    that hands each caller a ``concurrent.futures.Future``, and a thread wake-up."""
    import threading
    from concurrent.futures import Future

    from batchproc.futures import RequestFuture

    pc = time.perf_counter

    def lifecycle(cls: type[Future[int]]) -> float:
        t = pc()
        for _ in range(n):
            f = cls()
            f.set_result(1)
            f.result()
        return (pc() - t) / n * 1e6

    future_us = lifecycle(Future)
    request_future_us = lifecycle(RequestFuture)

    rounds = 5_000
    ping, pong = threading.Event(), threading.Event()

    def echo() -> None:
        for _ in range(rounds):
            ping.wait()
            ping.clear()
            pong.set()

    th = threading.Thread(target=echo)
    th.start()
    t = pc()
    for _ in range(rounds):
        ping.set()
        pong.wait()
        pong.clear()
    wake_us = (pc() - t) / rounds / 2 * 1e6
    th.join()
    return {"future_create_complete_us": future_us,
            "request_future_create_complete_us": request_future_us,
            "thread_wakeup_us": wake_us}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    factories, skipped = make_factories(args)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    models = {}
    for m in args.models:
        models[m] = make_model(m, features=FEATURES)
        check_model(models[m], FeatureRows(FEATURES), m)
    progress = report.make_progress(args.quiet)
    results: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    t_start = time.perf_counter()
    try:
        for m, model in models.items():
            for key in args.loads:
                load, bounds = load_and_bounds(key, args)
                per_system: dict[str, list[RunResult]] = {s: [] for s in factories}
                names = list(factories)
                for rep in range(args.repeat):
                    order = names[rep % len(names):] + names[:rep % len(names)]
                    for s in order:
                        tag = f"{s} / {m} / {load.label}"
                        if tag in failures:
                            continue
                        try:
                            target = factories[s]()
                            if target == LIMIT:
                                r = run_limit(model, m, load, bounds, MAX_BATCH, progress)
                            else:
                                r = run_target(target, model, m, load, bounds, progress)
                        except Exception as exc:  # record, keep going with the others
                            failures[tag] = f"{type(exc).__name__}: {exc}"
                            log.warning("%s failed: %s", tag, failures[tag], exc_info=True)
                            continue
                        per_system[s].append(r)
                for s in names:
                    runs = per_system[s]
                    if not runs:
                        continue
                    results.append({
                        "model": m, "load_key": key, "load": load.label, "system": s,
                        "bounds": {"requests": bounds.requests, "duration_s": bounds.duration},
                        "median": median_run(runs),
                        "runs": [r.to_dict() for r in runs],
                    })
    finally:
        progress.close()
    return {
        "date": report.now_iso(),
        "command": "python benchmarks/compare_peers.py " + " ".join(sys.argv[1:]),
        "machine": report.machine_info(),
        "versions": report.versions(extra=("batched", "ray")),
        "settings": {
            "features": FEATURES, "max_batch": MAX_BATCH, "max_delay_ms": MAX_DELAY * 1000,
            "repeat": args.repeat, "burst": args.burst, "cap_s": args.cap,
            "batchproc_workers": args.workers, "batchproc_strategy": args.strategy,
            "quick": args.quick,
        },
        "skipped": skipped,
        "failures": failures,
        "wall_s": time.perf_counter() - t_start,
        "cpython_floor": cpython_floor(),
        "no_work_batchers": (no_work_batchers.measure(args.repeat)
                             if "identity" in args.models else None),
        "full_batch_threads": (
            {"fixed": statistics.median(no_work_batchers.threads_full_batches(models["fixed"])
                                        for _ in range(args.repeat))}
            if "fixed" in models and "64" in args.loads else None),
        "results": results,
        "targets": target_ratios(results, args.burst),
    }


def _find(results: list[dict[str, Any]], model: str, key: str, system: str) -> dict | None:
    for r in results:
        if r["model"] == model and r["load_key"] == key and r["system"] == system:
            return r["median"]
    return None


def target_ratios(results: list[dict[str, Any]], burst: int) -> list[dict[str, Any]]:
    out = []
    for model, key, subject, ref, goal, why in TARGETS:
        a = _find(results, model, key, subject)
        got = None
        if ref is None:
            label = "requests of the burst"
            if a:
                got = 0.0 if a["errors"] else a["completed"] / burst
        else:
            refs = (ref,) if isinstance(ref, str) else ref
            found = [(b["throughput"], name) for name in refs
                     if (b := _find(results, model, key, name)) and b["throughput"]]
            label = ref if isinstance(ref, str) else "best of " + ", ".join(ref)
            if a and found and a["completed"]:
                best, name = max(found)
                got = a["throughput"] / best
                if len(refs) > 1:
                    label = f"{label} ({name})"
        out.append({
            "model": model, "load": {"1": "1 client", "64": "64 clients"}.get(key, "burst"),
            "subject": subject,
            "reference": label, "target": goal, "measured": got,
            "met": None if got is None else got >= goal, "why": why,
        })
    return out


def _no_work_lines(nw: dict[str, float], results: list[dict[str, Any]]) -> list[str]:
    """no_work_batchers.py against the references of the 64-client targets: how far
    above its reference a batcher doing nothing gets."""
    out = ["Batchers that do no work, 64 clients (`benchmarks/no_work_batchers.py`, median "
           "of as many runs as repetitions, in this run):", ""]
    for label, rps, refs in (
        ("64 client threads", nw["threads_64_rps"], THREAD_PEERS),
        ("64 asyncio tasks", nw["asyncio_64_rps"], (ray_peer.NAME,)),
        ("64 asyncio tasks answered from a thread", nw.get("asyncio_thread_64_rps"),
         (ray_peer.NAME,)),
    ):
        if rps is None:  # a results file from before that batcher was measured
            continue
        found = [(b["throughput"], name) for name in refs
                 if (b := _find(results, "identity", "64", name)) and b["throughput"]]
        versus = ""
        if found:
            best, name = max(found)
            versus = f", {rps / best:.2f}x {name}"
        out.append(f"- {label}: {rps:,.0f} req/s{versus}")
    return [*out, ""]


def _full_batch_lines(fb: dict[str, float], results: list[dict[str, Any]]) -> list[str]:
    """no_work_batchers.threads_full_batches against the limit: how near the limit
    64 closed-loop client threads can bring the fixed model."""
    rps = fb["fixed"]
    lim = _find(results, "fixed", "64", LIMIT)
    versus = f", {rps / lim['throughput']:.2f}x the limit" if lim and lim["throughput"] else ""
    return [
        f"A server that knows its 64 client threads, waits for all of them before each call "
        f"and does no other work (`no_work_batchers.threads_full_batches`) reaches "
        f"{rps:,.0f} req/s on the fixed model{versus}: each call waits for the wave of "
        "clients the last one's answers woke, one at a time through the GIL. The *fixed, "
        "64 clients* target measures that wave, not batching; bursts and more clients than "
        "a batch hold do not wait for it.",
        "",
    ]


def to_markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        *report.doc_header_lines("batchproc vs peers", doc),
        f"- every request: one row of {s['features']} float32; max batch {s['max_batch']}, "
        f"max delay {s['max_delay_ms']:g} ms; batchproc strategy {s['batchproc_strategy']}"
        + (f", {s['batchproc_workers']} workers" if s["batchproc_workers"] else "")
        + f"; median of {s['repeat']} repetition(s); closed loops measured over "
        f"{s['cap_s']:g} s windows, a burst of {s['burst']:,} capped at {3 * s['cap_s']:g} s"
        + ("; **--quick smoke run: not for quoting**" if s["quick"] else ""),
        "",
    ]
    if doc["skipped"]:
        lines += [f"- skipped **{k}**: {why}" for k, why in doc["skipped"].items()] + [""]
    lines += ["## Targets (throughput ratios, same run)", ""]
    rows = []
    for t in doc["targets"]:
        got = t["measured"]
        verdict = "-" if t["met"] is None else ("met" if t["met"] else "**missed**")
        rows.append([f"{t['model']}, {t['load']}", t.get("subject", "batchproc"),
                     t["reference"], f"{t['target']:g}x", report.fmt_ratio(got), verdict])
    lines += [report.markdown_table(
        ["model, load", "system", "reference", "target", "measured", "verdict"], rows, 3), ""]
    fl = doc.get("cpython_floor")
    if fl:
        lines += [
            f"CPython floor on this machine: creating and completing one `Future` costs "
            f"{fl['future_create_complete_us']:.2f} µs (batchproc's lighter `RequestFuture`: "
            f"{fl.get('request_future_create_complete_us', float('nan')):.2f} µs); "
            f"one thread wake-up (Event ping-pong, "
            f"one way) {fl['thread_wakeup_us']:.1f} µs. A burst cannot beat "
            f"{1e6 / fl['future_create_complete_us']:,.0f} req/s from one submitting thread "
            "on Future handling alone; a closed-loop client pays at least two wake-ups per "
            "request.",
            "",
        ]
    nw = doc.get("no_work_batchers")
    if nw:
        lines += _no_work_lines(nw, doc["results"])
    fb = doc.get("full_batch_threads")
    if fb:
        lines += _full_batch_lines(fb, doc["results"])
    lines += ["## All runs (medians)", ""]
    headers = ["model", "load", "system", "req/s", "p50 ms", "p95 ms", "p99 ms", "mean batch",
               "requests", "vs limit", "in GC"]
    rows = []
    footnotes = []
    for r in doc["results"]:
        med = r["median"]
        lim = _find(doc["results"], r["model"], r["load_key"], LIMIT)
        vs = med["throughput"] / lim["throughput"] if lim and lim["throughput"] else None
        req = f"{med['completed']:,}"
        if med["stopped_by"] == "duration" and r["load_key"] == "burst":
            req += " *"
            footnotes.append(f"* {r['system']} / {r['model']} / {r['load']}: stopped by the "
                             f"{r['bounds']['duration_s']:g} s cap, "
                             f"{med['completed']:,} of {doc['settings']['burst']:,} done")
        if med["errors"] or med["unfinished"]:
            req += " !"
            first = f"; first error: {med['first_error']}" if med["first_error"] else ""
            footnotes.append(f"! {r['system']} / {r['model']} / {r['load']}: {med['errors']:,} "
                             f"errors, {med['unfinished']:,} unfinished over its "
                             f"{med['repeats']} repetition(s){first}")
        rows.append([r["model"], r["load"], r["system"], report.fmt_rate(med["throughput"]),
                     report.fmt_ms(med["p50_ms"]), report.fmt_ms(med["p95_ms"]),
                     report.fmt_ms(med["p99_ms"]), f"{med['mean_batch']:.1f}", req,
                     report.fmt_ratio(vs), f"{100 * med.get('gc_share', 0.0):.0f}%"])
    lines += [report.markdown_table(headers, rows, 3), ""]
    lines += footnotes
    if doc["failures"]:
        lines += [""] + [f"- failed: {k}: {why}" for k, why in doc["failures"].items()]
    lines += [
        "",
        "Notes: *in GC*: the share of the run's wall time the process spent in CPython's "
        "cyclic garbage collector (every thread stops for it), most of it full collections "
        "over the whole heap (which holds every peer's modules). "
        "Latency is submit-to-result for closed loops and from the start of the burst "
        "for bursts (all requests arrive at once). The limit is the model called back to back "
        "on full batches of 64 from one thread (latency = one call). No batching runs the model "
        "per request in the caller's thread. `ray serve.batch` runs standalone in one asyncio "
        "loop (no Ray cluster; one replica-only warning check disabled, see "
        "benchmarks/peers/ray_peer.py). `batched` is driven from threads through its sync API. "
        "`batchproc` is driven from threads (`enqueue_predict(x).result()`); `batchproc "
        "asyncio` is the same processor driven like Ray, from one asyncio loop "
        "(`await enqueue_predict_async(x)`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    os.makedirs(args.out_dir, exist_ok=True)
    try:
        doc = run_all(args)
    except BenchError as exc:
        print(f"compare_peers: error: {exc}", file=sys.stderr)
        return 2
    report.write_results(args.out_dir, args.name, to_markdown(doc), doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

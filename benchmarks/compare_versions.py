"""Version comparison: is the numpy one-row path of the installed batchproc slower than
a baseline commit? Both run side by side, interleaved, in one session.

    python benchmarks/compare_versions.py              # median of 5 (~3 min on 2 cores,
                                                       # plus ~1-2 min the first time to
                                                       # build the baseline)
    python benchmarks/compare_versions.py --quick      # 1 repetition, smaller loads (~20 s)
    python benchmarks/compare_versions.py --baseline HEAD~3 --repeat 9 --configs identity/1

"current" is the batchproc installed in the environment running this script; the
baseline is built once from ``git archive <rev>`` into build/baseline-<rev>/ (its own
venv, ``pip install "<src>[cli]"``) and reused. Every run is a fresh process of one of the
two interpreters executing benchmarks/version_run.py, which drives batchproc.bench's
``Batchproc`` target (unchanged since the baseline) with its loads: requests of one row
of 64 float32, max batch 64, max delay 5 ms, as in compare_peers.py. Configurations: the
identity model at 1 client (closed loop, 3 s) and a burst of 50,000 from one thread; the
fixed model (5 ms per call behind one lock) at 64 clients and in a burst; on request
(``--configs fixed-50ms/4``, or any ``fixed-<ms>ms/<clients>``: ``fixed-0.1ms/1``, a
model answering in about 100 us, where callers' spins may or may not pay) a fixed model
of that many ms at that many closed-loop clients, and open-loop Poisson
loads of any model (``--configs mlp/rate-9000``: 9,000 requests/s from one thread, the
same arrivals for both versions in a repetition), where latency and the process's CPU
per request tell versions apart, and closed loops of any model from threads
(``--configs mlp/64``) or from asyncio tasks on one event loop awaiting
``enqueue_predict_async`` (``--configs identity/asyncio-64``), and a burst's items
through ``map`` or ``amap`` (``--configs mlp/map``, ``mlp/asyncio-map``: throughput in
items/s, latency from the call to each result; ``mlp/asyncio-map-gen``: the same items
from an async generator), or a stream of items arriving at N
items/s (Poisson, for the window) through them (``mlp/map-rate-1000``: latency from each
item's arrival to its result). In each repetition the
two versions run one after the other, the order alternating; reported are the median per
version, the ratio current/baseline of the medians, and the range of the per-repetition
ratios (each pair measured back to back), so noise is visible.

Writes benchmarks/results/versions.md and versions.json (every run's figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import batchproc
from batchproc.bench import report

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNNER = os.path.join(HERE, "version_run.py")
# The last commit before the batch-format work (native Request records, a format per
# request chosen at enqueue, outputs split by formats/outputs.py): the release the
# one-row numpy path must not be slower than.
DEFAULT_BASELINE = "5516cfc"
CONFIGS = ("identity/1", "identity/burst", "fixed/64", "fixed/burst")
# Run only when named in --configs: a few closed-loop clients of a slow model behind one
# lock, where ADAPTIVE once split the clients into two groups served by alternate calls.
EXTRA_CONFIGS = ("fixed-50ms/4",)
MIN_PAIRS = 3  # fewer pairs than this get no verdict
LOAD_LABELS = {"1": "1 client", "4": "4 clients", "64": "64 clients", "burst": "burst",
               "map": "map", "map-gen": "map from a generator"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="compare_versions.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--baseline", default=DEFAULT_BASELINE, metavar="REV",
                   help=f"git revision to compare against (default {DEFAULT_BASELINE})")
    p.add_argument("--quick", action="store_true",
                   help="1 repetition, burst of 5,000, 1 s windows: a smoke run, not for quoting")
    p.add_argument("--repeat", type=int, default=None, help="repetitions (default 5)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma list of model/load (default: all of "
                   + ", ".join(CONFIGS) + "; also " + ", ".join(EXTRA_CONFIGS) + ")")
    p.add_argument("--burst", type=int, default=None, help="burst size (default 50000)")
    p.add_argument("--cap", type=float, default=None,
                   help="closed-loop window in seconds, a burst's cap is 3x (default 3)")
    p.add_argument("--rebuild", action="store_true", help="build the baseline again")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default=None,
                   help="output file stem (default: versions; versions-quick with --quick)")
    a = p.parse_args(argv)
    for name in ("repeat", "burst", "cap"):
        given = getattr(a, name)
        if given is not None and not (given > 0 and math.isfinite(given)):
            p.error(f"--{name} must be a positive number, got {given}")
    a.repeat = a.repeat or (1 if a.quick else 5)
    a.burst = a.burst or (5_000 if a.quick else 50_000)
    a.cap = a.cap or (1.0 if a.quick else 3.0)
    a.name = a.name or ("versions-quick" if a.quick else "versions")
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    if not a.configs:
        p.error("--configs: none given")
    bad = [c for c in a.configs
           if not (_open_loop(c) or _fixed_closed_loop(c) or _closed_loop(c))]
    if bad:
        known = ", ".join(CONFIGS + EXTRA_CONFIGS)
        p.error(f"--configs: unknown {', '.join(bad)} (choose from {known}, or MODEL/rate-N "
                f"for an open loop of N requests/s, {RATES[0]:g} <= N <= {RATES[1]:,.0f}, "
                "MODEL one of identity, mlp, fixed; or fixed-<ms>ms/<clients>, "
                f"0 < ms <= {FIXED_MS_MAX:g}, 1 <= clients <= {CLIENTS_MAX}; or "
                f"MODEL/<clients>, MODEL/burst, MODEL/map, MODEL/map-rate-N, or each as "
                f"asyncio-<clients>, asyncio-burst, asyncio-map, asyncio-map-rate-N (from "
                f"asyncio tasks), 1 <= clients <= {CLIENTS_MAX}, "
                f"{RATES[0]:g} <= N <= {MAP_RATE_MAX:,.0f})")
    return a


MODELS = ("identity", "mlp", "fixed")  # batchproc bench's, by name
RATES = (1.0, 1e6)  # the open loops' rates, requests/s: at least one request a second
_RATE = re.compile(r"rate-(\d+(\.\d*)?)")


def _open_loop(config: str) -> bool:
    """``MODEL/rate-N``: a model of batchproc bench and a rate within ``RATES``."""
    model, _, key = config.partition("/")
    match = _RATE.fullmatch(key)
    return (model in MODELS and match is not None
            and RATES[0] <= float(match.group(1)) <= RATES[1])


FIXED_MS_MAX, CLIENTS_MAX = 1000.0, 256
MAP_RATE_MAX = 1e5  # a stream's items/s through map: its source sleeps until each arrival
_FIXED = re.compile(r"fixed-(\d+(\.\d*)?)ms/(\d+)")


def _fixed_closed_loop(config: str) -> bool:
    """``fixed-<ms>ms/<clients>``: the fixed model at that cost, closed-loop clients."""
    match = _FIXED.fullmatch(config)
    return (match is not None and 0 < float(match.group(1)) <= FIXED_MS_MAX
            and 1 <= int(match.group(3)) <= CLIENTS_MAX)


_CLOSED = re.compile(r"(asyncio-)?(\d+|burst|map|map-gen|map-rate-(\d+(\.\d*)?))")


def _closed_loop(config: str) -> bool:
    """``MODEL/<clients>``, ``MODEL/burst``, ``MODEL/map``, ``MODEL/map-gen``,
    ``MODEL/map-rate-N``, or the
    same prefixed ``asyncio-``: closed-loop client threads, a burst from one thread, the
    burst's items through ``map``, a stream of N items/s through ``map``; or the same
    from asyncio tasks on one event loop (``amap``)."""
    model, _, key = config.partition("/")
    match = _CLOSED.fullmatch(key)
    return (model in MODELS and match is not None
            and (match.group(2) in ("burst", "map", "map-gen")
                 or (match.group(3) is not None
                     and RATES[0] <= float(match.group(3)) <= MAP_RATE_MAX)
                 or (match.group(2).isdigit() and 1 <= int(match.group(2)) <= CLIENTS_MAX)))


def load_label(key: str) -> str:
    if key.startswith("asyncio-"):
        return f"asyncio {load_label(key[8:])}"
    if key.startswith("map-rate-"):
        return f"map, {float(key[9:]):,.0f} items/s stream"
    if key.startswith("rate-"):
        return f"{float(key[5:]):,.0f} req/s open loop"
    return LOAD_LABELS.get(key) or f"{int(key)} clients"


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", ROOT, *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def portable(path: str) -> str:
    """A path as the results files show it: relative to the repository or the running
    environment, so that they name no machine's folders."""
    for root, name in ((ROOT, "."), (sys.prefix, "<env>")):
        if os.path.commonpath([path, root]) == root:
            return os.path.join(name, os.path.relpath(path, root))
    return path


def baseline_python(rev: str, rebuild: bool) -> tuple[str, str]:
    """The baseline's interpreter (built on first use) and its full commit."""
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        print(f"compare_versions.py: error: --baseline {rev!r} names no commit of this "
              "repository", file=sys.stderr)
        raise SystemExit(2) from None
    folder = os.path.join(ROOT, "build", f"baseline-{commit[:7]}")
    python = os.path.join(folder, "venv", "bin", "python")
    done = os.path.join(folder, "installed")
    if os.path.exists(done) and not rebuild:
        return python, commit
    print(f"building baseline {commit[:7]} in {folder} (once; ~2 min) ...", file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    src = os.path.join(folder, "src")
    os.makedirs(src)
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "venv", os.path.join(folder, "venv")], check=True)
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, f"{src}[cli]"], check=True)
    with open(done, "w", encoding="utf-8") as f:
        f.write(commit + "\n")
    return python, commit


def describe_current() -> dict[str, Any]:
    """Where the running environment's batchproc lives, and whether its Python files are
    this checkout's (so that the checkout's commit names it)."""
    path = os.path.dirname(os.path.abspath(batchproc.__file__))
    src = os.path.join(ROOT, "src", "batchproc")
    same = os.path.isdir(src)
    for dirpath, _, files in os.walk(src):
        for name in files:
            if not name.endswith((".py", ".pyi")):
                continue
            mine = os.path.join(dirpath, name)
            theirs = os.path.join(path, os.path.relpath(mine, src))
            if not os.path.exists(theirs):
                same = False
                continue
            with open(mine, "rb") as a, open(theirs, "rb") as b:
                same = same and a.read() == b.read()
    head = git("log", "-1", "--format=%H", "--", "src")  # the last commit that changed src
    dirty = bool(git("status", "--porcelain", "--", "src"))
    return {"path": portable(path), "version": batchproc.__version__, "checkout_commit": head,
            "checkout_src_dirty": dirty, "matches_checkout": same}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # each interpreter must import its own batchproc
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


def run_one(python: str, spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([python, RUNNER, json.dumps(spec)], capture_output=True, text=True,
                          env=child_env(), cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{python} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    base_python, commit = baseline_python(args.baseline, args.rebuild)
    current = describe_current()
    pythons = {"baseline": base_python, "current": sys.executable}
    expect = {"baseline": portable(os.path.dirname(os.path.dirname(base_python))),
              "current": current["path"]}
    print(f"baseline: {commit[:10]} ({args.baseline}), {base_python}\n"
          f"current:  batchproc {current['version']} in {batchproc.__file__}",
          file=sys.stderr)
    progress = report.PlainProgress()
    where: dict[str, dict[str, Any]] = {}
    results: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    t_start = time.perf_counter()
    for config in args.configs:
        model, key = config.split("/")
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
        for rep in range(args.repeat):
            spec = {"model": model, "load": key, "burst": args.burst, "cap": args.cap,
                    "seed": rep}
            order = ["baseline", "current"] if rep % 2 == 0 else ["current", "baseline"]
            for version in order:
                progress.start(f"{model} · {load_label(key)} · {version} "
                               f"(repetition {rep + 1}/{args.repeat})", None, None)
                try:
                    out = run_one(pythons[version], spec)
                except Exception as exc:  # record, keep going
                    failures[f"{config} {version} {rep + 1}"] = str(exc)
                    progress.finish(f"failed: {str(exc)[:200]}")
                    continue
                where[version] = {k: out[k] for k in
                                  ("batchproc_path", "batchproc_version", "python", "numpy")}
                where[version]["batchproc_path"] = portable(out["batchproc_path"])
                if not where[version]["batchproc_path"].startswith(expect[version]):
                    raise RuntimeError(f"the {version} run imported batchproc from "
                                       f"{out['batchproc_path']}, not {expect[version]}")
                r = out["result"]
                r["repetition"] = rep
                runs[version].append(r)
                progress.finish(f"{r['throughput']:,.0f} req/s, p50 {r['p50_ms']:.3f} ms")
        results.append({"config": config, "model": model, "load": load_label(key),
                        "summary": summarize(runs), "runs": runs})
    return {
        "date": report.now_iso(),
        "command": "python benchmarks/compare_versions.py " + " ".join(sys.argv[1:]),
        "machine": report.machine_info(),
        "baseline": {"rev": args.baseline, "commit": commit, **where.get("baseline", {})},
        "current": {**current, **where.get("current", {})},
        "settings": {"features": 64, "max_batch": 64, "max_delay_ms": 5.0,
                     "repeat": args.repeat, "burst": args.burst, "cap_s": args.cap,
                     "quick": args.quick},
        "failures": failures,
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(version: str, field: str) -> float:
        vals = [r[field] for r in runs[version] if r["completed"]]
        return statistics.median(vals) if vals else float("nan")

    out: dict[str, Any] = {}
    for v in ("baseline", "current"):
        out[v] = {f: med(v, f) for f in ("throughput", "p50_ms", "p99_ms", "mean_batch")}
        cpu = [1e6 * r["process_cpu_s"] / r["completed"] for r in runs[v]
               if r["completed"] and "process_cpu_s" in r]
        out[v]["cpu_us_per_request"] = statistics.median(cpu) if cpu else float("nan")
        out[v]["errors"] = sum(r["errors"] + r["unfinished"] for r in runs[v])
        out[v]["stopped_by_cap"] = sum(r["stopped_by"] == "duration" for r in runs[v])
    paired = {r["repetition"]: r for r in runs["baseline"]}
    for field in ("throughput", "p50_ms", "p99_ms"):
        per_rep = [c[field] / paired[c["repetition"]][field] for c in runs["current"]
                   if c["repetition"] in paired and paired[c["repetition"]][field]
                   and math.isfinite(c[field] / paired[c["repetition"]][field])]
        b, c = out["baseline"][field], out["current"][field]
        out[f"{field}_ratio"] = c / b if b else float("nan")
        out[f"{field}_ratios"] = per_rep
    return out


def verdict(ratios: list[float], higher_is_better: bool) -> str:
    """'slower' only when every back-to-back pair says so, and there are at least
    MIN_PAIRS of them (5 pairs all one way: 1 chance in 16 by noise); 'faster' likewise."""
    if len(ratios) < MIN_PAIRS:
        return "-"
    worse = [r < 1 if higher_is_better else r > 1 for r in ratios]
    if all(worse):
        return "**slower**"
    if not any(worse):
        return "faster"
    return "within noise"


def fmt_span(ratios: list[float]) -> str:
    return f"{min(ratios):.2f} to {max(ratios):.2f}" if ratios else "-"


def to_markdown(doc: dict[str, Any]) -> str:
    b, c, s, mach = doc["baseline"], doc["current"], doc["settings"], doc["machine"]
    checkout = (f"this checkout's src as of {c['checkout_commit'][:7]} (its last change)"
                + (" plus uncommitted changes" if c["checkout_src_dirty"] else "")
                if c["matches_checkout"] else "not this checkout's src (commit unknown)")
    lines = [
        "# batchproc: current vs baseline (numpy one-row path)",
        "",
        f"- date: {doc['date']}",
        f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['platform']}",
        f"- baseline: `{b['rev']}` = {b['commit'][:10]}, batchproc {b.get('batchproc_version')}"
        f" (python {b.get('python')}, numpy {b.get('numpy')}), built from `git archive`, "
        f"imported from `{b.get('batchproc_path')}`",
        f"- current: the running environment's batchproc {c['version']} (python "
        f"{c.get('python')}, numpy {c.get('numpy')}), imported from `{c['path']}`: {checkout}",
        f"- command: `{doc['command'].strip()}` (wall time {doc['wall_s'] / 60:.1f} min)",
        f"- every request: one row of {s['features']} float32; max batch {s['max_batch']}, "
        f"max delay {s['max_delay_ms']:g} ms, adaptive strategy; a fresh process per run, "
        f"after a {0.3:g} s warm-up of the same load; closed and open loops measured over "
        f"{s['cap_s']:g} s, a burst of {s['burst']:,}; {s['repeat']} repetition(s), the two "
        "versions back to back in alternating order"
        + ("; **--quick smoke run: not for quoting**" if s["quick"] else ""),
        "",
        "Ratios are current / baseline of the medians; the range is that of the "
        "per-repetition ratios (each pair measured back to back). The verdict says "
        f"*slower* or *faster* only when every pair agrees (and there are at least {MIN_PAIRS}).",
        "",
    ]
    speed, latency, notes = [], [], []
    for r in doc["results"]:
        sm = r["summary"]
        bs, cs = sm["baseline"], sm["current"]
        what = f"{r['model']}, {r['load']}"
        speed.append([
            what, report.fmt_rate(bs["throughput"]), report.fmt_rate(cs["throughput"]),
            report.fmt_ratio(sm["throughput_ratio"]), fmt_span(sm["throughput_ratios"]),
            verdict(sm["throughput_ratios"], True),
            f"{bs['mean_batch']:.1f} / {cs['mean_batch']:.1f}",
        ])
        latency.append([
            what, report.fmt_ms(bs["p50_ms"]), report.fmt_ms(cs["p50_ms"]),
            report.fmt_ratio(sm["p50_ms_ratio"]), fmt_span(sm["p50_ms_ratios"]),
            verdict(sm["p50_ms_ratios"], False),
            report.fmt_ms(bs["p99_ms"]), report.fmt_ms(cs["p99_ms"]),
            report.fmt_ratio(sm["p99_ms_ratio"]), fmt_span(sm["p99_ms_ratios"]),
            f"{bs['cpu_us_per_request']:.1f} / {cs['cpu_us_per_request']:.1f}",
        ])
        for v in ("baseline", "current"):
            if sm[v]["errors"]:
                notes.append(f"- {r['config']} {v}: {sm[v]['errors']} failed or unfinished")
            if sm[v]["stopped_by_cap"] and r["load"] == "burst":
                notes.append(f"- {r['config']} {v}: {sm[v]['stopped_by_cap']} burst run(s) "
                             "stopped by the time cap")
    lines += ["## Throughput (requests/s, medians)", "", report.markdown_table(
        ["model, load", "baseline", "current", "current / baseline", "range", "verdict",
         "mean batch (baseline / current)"], speed), ""]
    lines += ["## Latency (ms, medians)", "", report.markdown_table(
        ["model, load", "baseline p50", "current p50", "current / baseline", "range",
         "verdict", "baseline p99", "current p99", "current / baseline", "range",
         "process CPU us/request (baseline / current)"], latency), ""]
    lines += notes
    lines += [f"- failed: {k}: {why}" for k, why in doc["failures"].items()]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    doc = run_all(args)
    report.write_results(args.out_dir, args.name, to_markdown(doc), doc)
    if doc["failures"]:
        print(f"{len(doc['failures'])} run(s) failed: see the results' last lines",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

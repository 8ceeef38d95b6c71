"""Closed-loop clients with their ``result()`` spinning (the default) and sleeping at once.

    python benchmarks/compare_result_spin.py                       # ~2 min on 2 cores
    python benchmarks/compare_result_spin.py --pairs 3 --duration 1

A caller blocked in ``result()`` busy-waits up to ``RESULT_SPIN`` for its answer, then
until the worker lets go of the GIL (``batchproc._native.waiting``). That pays where the
answer comes within microseconds (one client, a model of no cost) and must cost nothing
where it does not: many client threads (one spins at a time), a model that takes
milliseconds (spins stop while they do not pay). Each configuration runs ``--pairs``
pairs of closed loops of ``--duration`` seconds, the two settings alternating first;
reported: the median requests/s of each and their ratio, and the spins of the spinning
runs (how many began, and the share that saw their answer).
Writes benchmarks/results/result-spin.md and .json (``--name``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np

from batchproc import BatchProcessor, BatchProcessorConfig
from batchproc._native import waiting
from batchproc.bench import report
from batchproc.bench.models import make_model
from batchproc.futures import RESULT_SPIN, set_result_spin

HERE = os.path.dirname(os.path.abspath(__file__))
ITEM = np.ones((1, 64), dtype=np.float32)
# (model, client threads): one client where spinning pays, 64 and a 5 ms model where it
# must not cost.
CONFIGS = (("identity", 1), ("identity", 64), ("fixed", 64))


def closed_loop(model: Any, clients: int, duration: float) -> float:
    """Requests/s of ``clients`` threads each sending its next request on its answer."""
    processor: BatchProcessor[Any, Any] = BatchProcessor(
        BatchProcessorConfig(max_batch_size=64, batch_timeout=0.005))
    processor.start(model)
    done = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(k: int) -> None:
        start.wait()
        n, submit, end = 0, processor.enqueue_predict, stop_at[0]
        while time.perf_counter() < end:
            submit(ITEM).result()
            n += 1
        done[k] = n

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + duration
    began = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    processor.stop()
    return sum(done) / elapsed


def run(configs: list[tuple[str, int]], pairs: int, duration: float) -> list[dict[str, Any]]:
    out = []
    for name, clients in configs:
        model = make_model(name)
        rates: dict[str, list[float]] = {"spin": [], "sleep": []}
        spun = caught = 0
        for i in range(pairs):
            for setting in (("spin", "sleep") if i % 2 == 0 else ("sleep", "spin")):
                set_result_spin(RESULT_SPIN if setting == "spin" else 0.0)
                waiting._reset_spin_score()
                before = waiting.spin_counts()
                rates[setting].append(closed_loop(model, clients, duration))
                after = waiting.spin_counts()
                if setting == "spin":
                    spun += after[1] - before[1]
                    caught += after[2] - before[2]
                print(f"{name}, {clients} clients, pair {i + 1}: {setting} "
                      f"{rates[setting][-1]:,.0f} req/s", file=sys.stderr)
        spin, sleep = statistics.median(rates["spin"]), statistics.median(rates["sleep"])
        out.append({"model": name, "clients": clients, "pairs": pairs,
                    "spin_rps": spin, "sleep_rps": sleep, "ratio": spin / sleep,
                    "runs": rates, "spins": spun,
                    "caught_share": caught / spun if spun else 0.0})
    set_result_spin(RESULT_SPIN)
    return out


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    m = report.machine_info()
    rows = [[r["model"], str(r["clients"]), report.fmt_rate(r["spin_rps"]),
             report.fmt_rate(r["sleep_rps"]), report.fmt_ratio(r["ratio"]),
             f"{r['spins']:,}", f"{r['caught_share']:.0%}"] for r in results]
    heads = ["model", "client threads", "spinning req/s", "sleeping req/s",
             "spinning / sleeping", "spins begun", "spins that saw the answer"]
    table = ["| " + " | ".join(heads) + " |", "|" + "---|" * 2 + "---:|" * 5]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    command = "python benchmarks/compare_result_spin.py " + shlex.join(sys.argv[1:])
    return "\n".join([
        "# Callers blocked in result(): spinning (the default) against sleeping at once",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['platform']}",
        f"- command: `{command.strip()}`",
        f"- closed loops of client threads, one row of 64 float32 per request, max batch "
        f"64, batch_timeout 5 ms; {args.pairs} interleaved pairs of {args.duration:g} s "
        f"per row, medians; spins counted over the spinning runs",
        "",
        *table, ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    p.add_argument("--configs", default=",".join(f"{m}/{c}" for m, c in CONFIGS),
                   help="model/clients,... (models of batchproc bench)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="result-spin")
    args = p.parse_args()
    configs = [(m, int(c)) for m, c in (x.split("/") for x in args.configs.split(","))]
    results = run(configs, args.pairs, args.duration)
    report.write_results(args.out_dir, args.name, markdown(results, args),
                         {"results": results, "machine": report.machine_info()})


if __name__ == "__main__":
    main()

"""What an idle processor costs: thread wake-ups and CPU per second with no requests.

    python benchmarks/idle_cost.py                  # 3 s per configuration
    python benchmarks/idle_cost.py --seconds 10 --json idle.json

A processor that serves nothing should cost nothing. Its workers wait for a request
or for a call slot; one of those waiting for a slot watches for requests held up past
``batch_timeout`` behind a call that overruns, and the queue looks for it every watch
period (``batch_timeout``, at least 5 ms), without the GIL. After an idle spell it
dozes until the next batch begins. Each configuration is measured idle for
``--seconds`` after 20 requests and a settling pause, with the doze (``batchproc``)
and, in the same run, without it (the watcher asked whether it is idle always answers
no: ``no doze``): the process's
voluntary context switches (each a thread going to sleep) and CPU seconds per second,
less the same measured with no processor.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from batchproc import BatchProcessor, BatchProcessorConfig
from batchproc.bench import BenchError
from batchproc.bench.outputs import check_writable, replace_file
from batchproc.engine import workers

SETTLE = 0.5  # s after the last request: longer than the idle spell before a doze


@contextmanager
def without_doze() -> Iterator[None]:
    idle = workers.WorkerPool._idle
    workers.WorkerPool._idle = lambda self: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        workers.WorkerPool._idle = idle  # type: ignore[method-assign]


def voluntary_switches() -> int:
    """Voluntary context switches of every thread of this process (Linux's
    ``/proc/self/task/*/status``: the process-wide count covers its main thread only)."""
    total = 0
    for status in Path("/proc/self/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def measure(seconds: float) -> tuple[float, float]:
    """(voluntary context switches/s, CPU s/s) of this process over ``seconds``."""
    switches, cpu = voluntary_switches(), time.process_time()
    time.sleep(seconds)
    return ((voluntary_switches() - switches) / seconds,
            (time.process_time() - cpu) / seconds)


def idle_cost(config: BatchProcessorConfig, seconds: float) -> tuple[float, float]:
    processor = BatchProcessor(config)
    processor.start(lambda batch: batch)
    try:
        row = np.ones((1, 64), np.float32)
        for _ in range(20):
            processor.enqueue_predict(row).result(timeout=30)
        time.sleep(SETTLE)
        return measure(seconds)
    finally:
        processor.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="idle time measured per configuration (default 3)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if not 0 < args.seconds <= 3600:
        parser.error("--seconds must be > 0 and at most 3600")
    if args.json:
        try:
            check_writable("--json", args.json)  # before the runs, not after
        except BenchError as exc:
            parser.error(str(exc))
    if not Path("/proc/self/task").is_dir():
        parser.error("counts thread wake-ups from /proc/self/task: Linux only")
    base_switches, base_cpu = measure(args.seconds)
    rows = []
    for batch_timeout in (0.005, 0.1):
        for max_workers in (1, 4):
            config = BatchProcessorConfig(batch_timeout=batch_timeout,
                                          max_workers=max_workers)
            with without_doze():
                before = idle_cost(config, args.seconds)
            after = idle_cost(config, args.seconds)
            rows.append({"batch_timeout": batch_timeout, "max_workers": max_workers,
                         "no_doze": {"wakeups_per_s": before[0] - base_switches,
                                     "cpu_per_s": before[1] - base_cpu},
                         "batchproc": {"wakeups_per_s": after[0] - base_switches,
                                       "cpu_per_s": after[1] - base_cpu}})
    print(f"idle for {args.seconds:g} s per run; this process with no processor: "
          f"{base_switches:.1f} wake-ups/s, {base_cpu * 1e3:.2f} ms CPU/s\n")
    print("| batch_timeout | workers | wake-ups/s: no doze | batchproc "
          "| CPU ms/s: no doze | batchproc |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch_timeout'] * 1e3:g} ms | {r['max_workers']} "
              f"| {r['no_doze']['wakeups_per_s']:.1f} | {r['batchproc']['wakeups_per_s']:.1f} "
              f"| {r['no_doze']['cpu_per_s'] * 1e3:.2f} "
              f"| {r['batchproc']['cpu_per_s'] * 1e3:.2f} |")
    if args.json:
        figures = {"seconds": args.seconds, "baseline_wakeups_per_s": base_switches,
                   "baseline_cpu_per_s": base_cpu, "runs": rows}

        def write(path: str) -> None:
            with open(path, "w") as f:
                json.dump(figures, f, indent=1)

        replace_file(args.json, write)


if __name__ == "__main__":
    main()

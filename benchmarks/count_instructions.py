"""Instructions per request, current against a baseline commit, counted by callgrind.

    python benchmarks/count_instructions.py                  # ~3 min; needs valgrind
    python benchmarks/count_instructions.py --baseline REV --requests 20000
    python benchmarks/count_instructions.py > benchmarks/results/instructions.md

Wall-clock timings on a shared machine move by tens of percent between runs
(compare_versions.py shows the spread); valgrind's instruction counts do not: the same
binary and inputs give the same count whatever else the machine does. Each workload runs
once with N requests and once with none, in a fresh interpreter of each version; the
difference over N is the cost of one request.

Workloads (one row of 64 float32 per request, like compare_versions.py):

* ``enqueue``: ``enqueue_predict`` on a processor that is not started: describe the item,
  make its future and request, push it. Single-threaded, so the count is exact.
* ``round trip``: one client, one request at a time, through one worker and the identity
  model: the whole per-request and per-batch path. Two threads take turns, so a few
  percent of scheduling noise remains; the lower of two runs is kept.

The baseline is built as compare_versions.py builds it (and shared with it).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time

from compare_versions import DEFAULT_BASELINE, baseline_python, child_env

WORKLOADS = {
    "enqueue": (
        "import sys, numpy as np\n"
        "from batchproc import BatchProcessor, BatchProcessorConfig\n"
        "n = int(sys.argv[1])\n"
        "p = BatchProcessor(BatchProcessorConfig(max_queue_size=n + 10))\n"
        "x = np.ones((1, 64), np.float32)\n"
        "p.enqueue_predict(x)\n"
        "for _ in range(n):\n"
        "    p.enqueue_predict(x)\n"
    ),
    "round trip": (
        "import sys, numpy as np\n"
        "from batchproc import BatchProcessor, BatchProcessorConfig\n"
        "n = int(sys.argv[1])\n"
        "p = BatchProcessor(BatchProcessorConfig(max_workers=1,"
        " enable_health_monitoring=False))\n"
        "p.start(lambda b: b)\n"
        "x = np.ones((1, 64), np.float32)\n"
        "p.enqueue_predict(x).result()\n"
        "for _ in range(n):\n"
        "    p.enqueue_predict(x).result()\n"
        "p.stop()\n"
    ),
}
RUNS = {"enqueue": 1, "round trip": 2}


def instructions(python: str, code: str, n: int) -> int:
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", python, "-c", code,
         str(n)], capture_output=True, text=True, env=child_env(), timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{python} exited {proc.returncode}: {proc.stderr[-2000:]}")
    match = re.search(r"Collected : (\d+)", proc.stderr) or re.search(
        r"refs:\s+([\d,]+)", proc.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output: {proc.stderr[-500:]}")
    return int(match.group(1).replace(",", ""))


def per_request(python: str, code: str, n: int, runs: int) -> float:
    empty = min(instructions(python, code, 0) for _ in range(runs))
    full = min(instructions(python, code, n) for _ in range(runs))
    return (full - empty) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--requests", type=int, default=20_000,
                        help="requests per run (the round trip runs a tenth of them)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    base, commit = baseline_python(args.baseline, rebuild=False)
    versions = {f"baseline {commit[:7]}": base, "current": sys.executable}
    print(f"# Instructions per request (callgrind), {time.strftime('%Y-%m-%d', time.gmtime())}\n")
    print(f"`python benchmarks/count_instructions.py --requests {args.requests}`: one row of "
          "64 float32 per request; current = this checkout's installed batchproc.\n")
    print("| workload | " + " | ".join(versions) + " | current / baseline |")
    print("|---|" + "---:|" * (len(versions) + 1))
    for name, code in WORKLOADS.items():
        n = args.requests if name == "enqueue" else max(1, args.requests // 10)
        counts = [per_request(py, code, n, RUNS[name]) for py in versions.values()]
        print(f"| {name} | " + " | ".join(f"{c:,.0f}" for c in counts)
              + f" | {counts[1] / counts[0]:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

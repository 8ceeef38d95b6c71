"""The comparison scripts in benchmarks/ still run against the installed package.

They are not part of the library, so nothing else calls them: an API change that breaks
one would go unnoticed until somebody reran it for a note. Each runs here at its
smallest size (far too small to quote) and must exit 0 and write its tables. What the
figures are is not checked; that the script still measures something is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# (script, arguments for its smallest run, the output stem it writes)
SMOKE_RUNS = [
    ("compare_peers.py", ["--quick", "--models", "identity", "--loads", "1,burst",
                          "--systems", "batchproc,batchproc asyncio,limit", "--cap", "0.2",
                          "--burst", "200", "--name", "smoke"], "smoke"),
    ("compare_map.py", ["--quick", "--items", "2000", "--repeat", "1", "--cap", "0.5",
                        "--name", "smoke"], "smoke"),
    ("compare_ragged.py", ["--quick", "--requests", "200", "--repeat", "1", "--cap", "0.3",
                           "--name", "smoke"], "smoke"),
    # Not --quick: it sets its own (longer) run times over --duration. A capacity the
    # static configurations keep up with at this load spares the drains of their
    # queues after each run.
    ("compare_adaptive.py", ["--models", "fixed", "--loads", "0.5", "--repeat", "1",
                             "--confirm", "1", "--confirm-duration", "0.1", "--duration", "0.1",
                             "--sat-duration", "0.1",
                             "--capacity", "fixed=1000", "--name", "smoke"], "smoke"),
    ("compare_poison.py", ["--seconds", "0.3", "--repeat", "1", "--clients", "4"], "poison"),
    ("ablate_map.py", ["--rounds", "1", "--items", "2000", "--name", "smoke"], "smoke"),
    ("tuner_trials.py", ["--rounds", "1", "--items", "2000", "--maps", "1", "--name",
                         "smoke"], "smoke"),
]
# What a script's table must hold beyond a table, where it reports more than one.
EXPECTED_IN_TABLE = {"compare_adaptive.py": "Confirmation: ADAPTIVE and the best static",
                     "compare_map.py": "| lean pipeline | ",
                     "ablate_map.py": "| sleeps 2 ms | slot handed over | ",
                     "tuner_trials.py": "| sleeps 2 ms | held at 4 | "}
# Scripts that print their table instead of writing files: (script, arguments, a line
# the table must hold).
PRINTING_RUNS = [
    ("profile_threads.py", ["--clients", "8", "--seconds", "0.2"], "| no-work batcher |"),
    ("no_work_batchers.py", [], "asyncio_thread_64_rps: "),
    ("profile_burst.py", ["--burst", "300", "--runs", "1"],
     "batchproc against the minimal batcher, burst through the load generator: "),
    ("saturation_floor.py", ["--clients", "8", "--seconds", "0.2", "--rounds", "1"],
     "| system | client threads | batcher threads | threads Python did not start |\n"
     "|---|---:|---:|---:|\n| lean batcher | "),
    ("saturation_warmup.py", ["--clients", "8", "--seconds", "0.2", "--windows", "2",
                              "--rounds", "1"],
     "| run on one processor | seconds from its start | req/s | / limit |\n|---|---|---:|"
     "---:|\n| 1 (fresh) | 0-0.2 | "),
    ("profile_async.py", ["--clients", "8", "--seconds", "0.2", "--rounds", "1",
                          "--calls", "200", "--wake-rounds", "4"],
     "| in the flush (awaiters.complete) | "),
    ("profile_adaptive.py", ["--model", "mlp", "--rate", "2000", "--duration", "0.2"],
     '"process_cpu_share": '),
    ("after_a_hang.py", ["--hang", "0.05", "--gap-ms", "1", "--before", "20"],
     "median latency, ms: before the hang "),
    ("idle_cost.py", ["--seconds", "0.2"], "| 5 ms | 4 |"),
    ("cut_item_retries.py", ["--items", "2", "--rows", "8", "--seeds", "0"], "| 0 | "),
    ("backlog_fit.py", ["--seeds", "1", "--noise", "0.05"], "| 0.1 ms * rows |"),
    ("behind_a_hang.py", ["--timeouts", "0.01", "--trials", "2", "--clients", "1",
                          "--seconds", "0.1"],
     "1 clients, batch_timeout 100 ms | before the hang: req/s, p50 ms | while one call "
     "hangs: req/s, p50 ms\nadaptive | "),
    ("ablate_adaptive.py", ["--rate", "2000", "--rounds", "1", "--duration", "0.2",
                            "--systems", "adaptive,no-fit-ceiling,no-watch,keep-slot,"
                            "hand-over,adaptive-workers:1,fixed:16,0,1"],
     "| keep-slot | "),
    # compare_versions.py's run, on its open-loop load (the script itself builds a
    # baseline from git: too slow for the suite).
    ("version_run.py", ['{"model": "mlp", "load": "rate-2000", "burst": 0, "cap": 0.2,'
                        ' "seed": 1}'], '"process_cpu_s": '),
    ("version_run.py", ['{"model": "fixed-0.1ms", "load": "1", "burst": 0, "cap": 0.2,'
                        ' "seed": 1}'], '"process_cpu_s": '),
    ("version_run.py", ['{"model": "identity", "load": "asyncio-8", "burst": 0,'
                        ' "cap": 0.2, "seed": 1}'], '"process_cpu_s": '),
    ("version_run.py", ['{"model": "mlp", "load": "map", "burst": 500, "cap": 0.2,'
                        ' "seed": 1}'], '"completed": 500'),
    ("version_run.py", ['{"model": "identity", "load": "asyncio-map", "burst": 500,'
                        ' "cap": 0.2, "seed": 1}'], '"completed": 500'),
    ("version_run.py", ['{"model": "mlp", "load": "asyncio-map-rate-2000", "burst": 0,'
                        ' "cap": 0.2, "seed": 1}'], '"completed": 400'),
    ("version_run.py", ['{"model": "identity", "load": "asyncio-map-gen", "burst": 300,'
                        ' "cap": 0.2, "seed": 1}'], '"completed": 300'),
]


def _script_module(name: str) -> Any:
    """The benchmark script ``name``.py, imported as a module (its parts tested alone)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmarks_folder_is_here() -> None:
    # The suite ships with benchmarks/ (CI copies it next to tests/): without it every
    # run below would fail on a missing file, not be skipped.
    assert (BENCHMARKS / "compare_peers.py").is_file(), BENCHMARKS


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "stem"), SMOKE_RUNS,
                         ids=[s for s, _, _ in SMOKE_RUNS])
def test_comparison_script_runs_at_its_smallest_size(
        script: str, args: list[str], stem: str, tmp_path: Path) -> None:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / f"{stem}.md").read_text()
    assert "|" in table  # a markdown table was written
    assert EXPECTED_IN_TABLE.get(script, "|") in table
    doc = json.loads((tmp_path / f"{stem}.json").read_text())
    assert doc  # and the raw figures


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "expected"), PRINTING_RUNS,
                         ids=[s for s, _, _ in PRINTING_RUNS])
def test_profiling_script_prints_its_table(script: str, args: list[str], expected: str,
                                           tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert expected in proc.stdout


@pytest.mark.parametrize(("args", "said"), [
    (["--configs", "mlp/rate-0.4"], "unknown mlp/rate-0.4"),  # under one request a second
    (["--configs", "mlp/rate-1e12"], "unknown mlp/rate-1e12"),
    (["--configs", "mlp/rate- 100"], "unknown mlp/rate- 100"),
    (["--configs", "nope/rate-100"], "unknown nope/rate-100"),
    (["--configs", "mlp/rate-inf"], "unknown mlp/rate-inf"),
    (["--configs", "fixed-0ms/1"], "unknown fixed-0ms/1"),
    (["--configs", "fixed-1ms/0"], "unknown fixed-1ms/0"),
    (["--configs", "fixed-1ms/257"], "unknown fixed-1ms/257"),
    (["--configs", "fixed-2000ms/1"], "unknown fixed-2000ms/1"),
    (["--configs", "fixed-1ms"], "unknown fixed-1ms"),
    (["--configs", "mlp/0"], "unknown mlp/0"),
    (["--configs", "mlp/257"], "unknown mlp/257"),
    (["--configs", "mlp/asyncio-0"], "unknown mlp/asyncio-0"),
    (["--configs", "mlp/asyncio"], "unknown mlp/asyncio"),
    (["--configs", "mlp/maps"], "unknown mlp/maps"),
    (["--configs", "mlp/map-rate-0.5"], "unknown mlp/map-rate-0.5"),
    (["--configs", "mlp/map-rate-200000"], "unknown mlp/map-rate-200000"),
    (["--configs", "nope/asyncio-8"], "unknown nope/asyncio-8"),
    (["--cap", "0"], "--cap must be a positive number, got 0.0"),
    (["--cap", "nan"], "--cap must be a positive number, got nan"),
    (["--repeat", "0"], "--repeat must be a positive number, got 0"),
    (["--configs", " , "], "--configs: none given"),
    (["--baseline", "no-such-commit"], "--baseline 'no-such-commit' names no commit"),
])
def test_compare_versions_refuses_what_it_cannot_run(args: list[str], said: str,
                                                      tmp_path: Path) -> None:
    # Refused on one line before the baseline is built (or any run starts).
    _refused("compare_versions.py", [*args, "--out-dir", str(tmp_path)], said, tmp_path)
    assert not list(tmp_path.iterdir())  # no results written


@pytest.mark.parametrize(("config", "label"), [
    ("fixed-0.1ms/1", "1 client"), ("fixed-2ms/16", "16 clients"),
    ("fixed-1000ms/256", "256 clients"), ("mlp/8", "8 clients"), ("mlp/burst", "burst"),
    ("identity/asyncio-64", "asyncio 64 clients"), ("fixed/asyncio-burst", "asyncio burst"),
    ("mlp/map", "map"), ("identity/asyncio-map", "asyncio map"),
    ("identity/asyncio-map-gen", "asyncio map from a generator"),
    ("mlp/map-rate-1000", "map, 1,000 items/s stream"),
    ("fixed/asyncio-map-rate-25", "asyncio map, 25 items/s stream"),
])
def test_compare_versions_takes_any_model_at_any_load_it_names(config: str, label: str) -> None:
    # Parsed only: a run would build the baseline from git.
    module = _script_module("compare_versions")
    assert module.parse_args(["--configs", config]).configs == [config]
    assert module.load_label(config.partition("/")[2]) == label


def test_compare_versions_gives_no_verdict_on_figures_a_load_has_not() -> None:
    # A map load has a throughput but no per-item latency (nan): its latency ratios are
    # none, not "faster" (a nan compares false with 1).
    module = _script_module("compare_versions")
    nan = float("nan")

    def run(rep: int, throughput: float) -> dict[str, object]:
        return {"repetition": rep, "throughput": throughput, "p50_ms": nan, "p99_ms": nan,
                "mean_batch": 64.0, "completed": 10, "errors": 0, "unfinished": 0,
                "stopped_by": "requests", "process_cpu_s": 0.1}

    summary = module.summarize({"baseline": [run(k, 100.0) for k in range(3)],
                                "current": [run(k, 110.0) for k in range(3)]})
    assert summary["throughput_ratios"] == pytest.approx([1.1] * 3)
    assert module.verdict(summary["throughput_ratios"], True) == "faster"
    assert summary["p50_ms_ratios"] == summary["p99_ms_ratios"] == []
    assert module.verdict(summary["p50_ms_ratios"], False) == "-"


def _refused(script: str, args: list[str], said: str, cwd: Path) -> str:
    """Run ``script`` with ``args``: it must exit 2 saying ``said``; its stdout."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert said in proc.stderr
    return proc.stdout


@pytest.mark.parametrize(("args", "said"), [
    (["--rate", "1000", "--systems", "adaptive,nope"], "unknown system 'nope'"),
    (["--rate", "1000", "--systems", "fixed:16,0"], "unknown system 'fixed:16,0'"),
    (["--rate", "1000", "--systems", "adaptive-workers:0"],
     "system 'adaptive-workers:0': max_workers must be"),
    (["--rate", "1000", "--systems", "adaptive-workers:100000"],
     "system 'adaptive-workers:100000': max_workers must be <= 1024"),
    (["--rate", "1000", "--systems", "fixed:16,inf,1"],
     "system 'fixed:16,inf,1': delay_ms must be a finite number"),
    (["--rate", "1000", "--systems", "adaptive,adaptive"], "a system is listed twice"),
    (["--rate", "1000", "--systems", "fixed:16,0,1,fixed:16,0.0,1"],
     "a system is listed twice"),
    (["--rate", "0"], "--rate: must be from 1 to 1e+06, got '0'"),
    (["--rate", "nan"], "--rate: must be from 1 to 1e+06, got 'nan'"),
    (["--rate", "inf"], "--rate: must be from 1 to 1e+06, got 'inf'"),
    (["--rate", "1000", "--rounds", "0"], "--rounds: must be from 1 to 1000, got '0'"),
    (["--rate", "1000", "--duration", "1e-9"], "--duration: must be from 0.1 to 3600"),
    (["--rate", "1000", "--systems", "adaptive,adaptive-workers:4"],  # the default's 4
     "a system is listed twice"),
    (["--rate", "1000", "--rounds", "1.5"], "--rounds: not an integer: '1.5'"),
    (["--rate", "1000", "--json", "no/such/folder/x.json"],
     "--json: cannot write 'no/such/folder/x.json'"),
    (["--rate", "1000", "--json", "."], "--json: cannot write '.'"),
])
def test_ablate_adaptive_refuses_what_it_cannot_run(args: list[str], said: str,
                                                     tmp_path: Path) -> None:
    _refused("ablate_adaptive.py", args, said, tmp_path)


@pytest.mark.parametrize(("args", "said"), [
    (["--seconds", "inf"], "--seconds must be > 0 and at most 3600"),
    (["--seconds", "nan"], "--seconds must be > 0 and at most 3600"),
    (["--seconds", "0"], "--seconds must be > 0 and at most 3600"),
    (["--json", "missing/idle.json"], "missing does not exist"),
])
def test_idle_cost_refuses_what_it_cannot_run(args: list[str], said: str,
                                              tmp_path: Path) -> None:
    # At once: nothing is measured first (3 s a configuration by default).
    assert "|" not in _refused("idle_cost.py", args, said, tmp_path)
    assert not list(tmp_path.iterdir())


def test_the_full_batch_server_calls_its_model_once_every_client_is_in() -> None:
    # The ceiling compare_peers.py prints for the fixed model at 64 client threads: each
    # call must hold every client, or it is no ceiling; and stopping mid-wave must not
    # leave a client blocked (the run would hang).
    module = _script_module("no_work_batchers")
    sizes: list[int] = []
    rps = module.threads_full_batches(lambda batch: sizes.append(len(batch)), clients=6,
                                      seconds=0.2)
    assert len(sizes) > 1 and set(sizes) == {6}, sizes
    assert rps > 0

"""`batchproc bench`: what a user types and what they get back.

Small and fast: runs of a few dozen requests. Flag errors must be one line on stderr
with a non-zero exit and never a traceback.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from extras import require

from batchproc import BatchProcessingStrategy, BatchProcessorConfig
from batchproc.__main__ import main
from batchproc.bench import BenchError, blas, cli, interrupts, models, report, targets
from batchproc.bench.cli import build_parser
from batchproc.bench.configs import parse_config
from batchproc.bench.inputs import NpzSource
from batchproc.bench.loads import Bounds, Load
from batchproc.bench.runner import LIMIT, NullProgress, RunResult, run_limit, run_target

TINY = ["--requests", "40", "--duration", "5", "--quiet"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_module_help_in_a_fresh_interpreter() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "batchproc", "bench", "--help"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    for flag in ("--model", "--clients", "--rate", "--burst", "--priorities", "--json", "--plot"):
        assert flag in r.stdout


def test_bad_flag_in_a_fresh_interpreter_is_one_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "batchproc", "bench", "--clients", "-3"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "--clients" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "bench" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--clients", "-1"], "--clients"),
        (["--clients", "0"], "--clients"),
        (["--burst", "-5"], "--burst"),
        (["--requests", "many"], "--requests"),
        (["--rate", "0"], "--rate"),
        (["--rate", "nan"], "--rate"),
        (["--duration", "-1"], "--duration"),
        (["--max-delay", "-2"], "--max-delay"),
        (["--max-batch", "0"], "--max-batch"),
        (["--model-ms", "-1"], "--model-ms"),
        (["--model-ms", "1e308"], "must be at most 3,600,000 (an hour), got 1e308"),
        (["--rate", "100", "--clients", "4"], "not allowed"),
        (["--burst", "10", "--rate", "5"], "not allowed"),
        (["--strategy", "fastest"], "--strategy"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--model", "resnet"], "resnet"),
        (["--model", "no_such_module_xyz:predict"], "no_such_module_xyz"),
        (["--model", "json:no_such_function"], "no_such_function"),
        (["--model", "os:sep"], "not callable"),
        (["--model", "json:"], "package.module:callable"),
        (["--json", "/nonexistent-dir/out.json"], "/nonexistent-dir"),
        (["--plot", "/nonexistent-dir/out.png"], "--plot"),
        (["--config", "max_batch_siz=3"],
         "'max_batch_siz' (did you mean 'max_batch_size'?)"),
        (["--config", "max-batch-size=3"],
         "'max-batch-size' (did you mean 'max_batch_size'?)"),
        (["--config", "Max-Batch-Size=3, batch_timeout=0.001"],
         "'Max-Batch-Size' (did you mean 'max_batch_size'?)"),
        (["--config", "max_batch_size=3,,"], "invalid syntax at ',' (give field=value"),
        (["--config", "batch_timeout=5ms"], "--config 'batch_timeout=5ms': invalid decimal "
         "literal at '5ms' (give field=value, ... separated by commas; each value a Python "
         "literal: a number, times in seconds as in batch_timeout=0.005; a quoted string; "
         "True, False or None)"),
        (["--config", "max_batch_size=8; batch_timeout=0.1"],
         "invalid syntax at '; batch_timeout=0.1' (give"),
        (["--config", "max_batch_size=8 batch_timeout=1"],
         "Perhaps you forgot a comma? at '8 batch_timeout=1' (give"),
        (["--config", ""], "--config '': empty; give field=value"),
        (["--config", " "], "--config ' ': empty"),
        (["--config", "min_batch_size=100"], "batchproc rejects this configuration "
         "(config 1: its fields over the flags')"),
        (["--model", "sys:maxsize"], "'maxsize' is an int, not callable"),
        (["--seed", "-1"], "--seed: must be >= 0, got -1"),
        (["--rate", "1e7", "--requests", "3000000", "--duration", "1"],
         "--requests 3,000,000 at --rate 10,000,000 is more than a run offers: at most "
         "2,000,000 arrivals"),
        (["--rate", "1e7", "--requests", "3000000", "--duration", "0.25"],
         "--rate 10,000,000 for --duration 0.25 makes 2,500,000 arrivals in one run; a run "
         "offers at most 2,000,000"),
        (["--burst", "3000000"], "--burst 3,000,000 is more than a run offers: at most "
         "2,000,000"),
        (["--clients", "4097"], "--clients must be from 1 to 4,096 (each client is a thread"),
        (["--clients", "100000", "--asyncio"], "--clients must be from 1 to 4,096"),
    ],
)
def test_bad_flags_give_one_line_and_nonzero_exit(
    capsys: pytest.CaptureFixture[str], argv: list[str], mentions: str
) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert mentions in lines[0]
    assert "Traceback" not in err


STRATEGY_SPELLINGS = [
    *(m.name for m in BatchProcessingStrategy),
    *(m.value for m in BatchProcessingStrategy),
    *(m.value.capitalize() for m in BatchProcessingStrategy),
    "fastest", "", "fixed_", "BatchProcessingStrategy",
]


def _library_reads(text: str) -> BatchProcessingStrategy | None:
    try:
        return BatchProcessorConfig(processing_strategy=text).processing_strategy
    except ValueError:
        return None


@pytest.mark.parametrize("text", STRATEGY_SPELLINGS)
def test_strategy_options_accept_what_the_library_accepts(capsys, text: str) -> None:
    """--strategy, tune's --strategies and --config's processing_strategy each take a
    spelling exactly when BatchProcessorConfig does, and mean the same member."""
    expected = _library_reads(text)
    parser = build_parser()
    readings = {}
    for argv, read in (
        (["bench", "--strategy", text], lambda a: a.strategy),
        (["tune", "--strategies", text], lambda a: a.strategies[0]),
    ):
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            readings[argv[1]] = None
            assert text == "" or "processing_strategy must be" in capsys.readouterr().err
        else:
            readings[argv[1]] = BatchProcessingStrategy(read(args))
    try:
        readings["--config"] = parse_config(f"processing_strategy={text!r}")[
            "processing_strategy"]
    except BenchError:
        readings["--config"] = None
    if text.isidentifier():  # unquoted, as in the BatchProcessorConfig(...) tune prints
        for key, form in (("--config name", text),
                          ("--config member", f"BatchProcessingStrategy.{text}")):
            try:
                readings[key] = parse_config(f"processing_strategy={form}")[
                    "processing_strategy"]
            except BenchError:
                readings[key] = None
    assert readings == dict.fromkeys(readings, expected)


def test_user_model_that_breaks_its_contract_is_one_line(
    tmp_path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad_model_mod.py").write_text(textwrap.dedent("""
        def one_row(batch):
            return batch[:1]
        def boom(batch):
            raise RuntimeError("no GPU here")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run_cli(capsys, "--model", "bad_model_mod:one_row", *TINY)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "BatchOutputError: process_func returned 1 results for a batch of 2" in err
    code, _, err = run_cli(capsys, "--model", "bad_model_mod:boom", *TINY)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no GPU here" in err


_modules = itertools.count()


def _fresh_module(tmp_path, monkeypatch, text: str) -> str:
    """A module of ``text`` under a name no test imported before (imports are cached
    for the process): its name."""
    name = f"model_mod_{next(_modules)}"
    (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


NASTY_MODULE = """
class Unprintable(Exception):
    def __str__(self):
        raise ValueError("str of exception fails")

calls = 0

def later(exc):
    def model(batch):
        global calls
        calls += 1
        if calls > 2:  # past the check's two calls: in the runs
            raise exc
        return batch
    return model

def multiline(batch):
    raise RuntimeError("line one\\nline two\\nline three")

def unprintable(batch):
    raise Unprintable()

def huge(batch):
    raise RuntimeError("x" * 100_000)

multiline_later = later(RuntimeError("later one\\nlater two"))
unprintable_later = later(Unprintable())
"""


@pytest.mark.parametrize("module, attr, says", [
    ("", "multiline", "RuntimeError: line one line two line three"),
    ("", "unprintable", "Unprintable: (its message could not be read: str() raised "
                        "ValueError)"),
    ("", "huge", "RuntimeError: xxx"),
    ("raise RuntimeError('at import\\nsecond line')\n", "f",
     "cannot import '{mod}': RuntimeError: at import second line"),
    ("class E(Exception):\n    def __str__(self):\n        raise ValueError('nope')\n"
     "raise E()\n", "f",
     "cannot import '{mod}': E: (its message could not be read: str() raised "
     "ValueError)"),
    ("import sys\nsys.exit(4)\n", "f", "cannot import '{mod}': SystemExit: 4"),
    ("import sys\nsys.exit('z' * 100_000)\n", "f", "cannot import '{mod}': SystemExit: zzz"),
    ("class R:\n    def __repr__(self):\n        raise ValueError('r')\n"
     "    __str__ = __repr__\nimport sys\nsys.exit(R())\n", "f",
     "cannot import '{mod}': SystemExit: (its message could not be read: str() raised "
     "ValueError)"),
    ("raise AttributeError('at import')\n", "f",
     "cannot import '{mod}': AttributeError: at import"),
    ("raise GeneratorExit('bye')\n", "f", "cannot import '{mod}': GeneratorExit: bye"),
    ("def __getattr__(name):\n    raise RuntimeError('getattr boom')\n", "dyn",
     "getting 'dyn' of '{mod}' raised: RuntimeError: getattr boom"),
    ("def __getattr__(name):\n    raise SystemExit(5)\n", "dyn",
     "getting 'dyn' of '{mod}' raised: SystemExit: 5"),
    ("def __getattr__(name):\n    raise GeneratorExit('ge')\n", "dyn",
     "getting 'dyn' of '{mod}' raised: GeneratorExit: ge"),
    ("def __getattr__(name):\n    raise AttributeError(name)\n", "dyn",
     "'{mod}' has no attribute 'dyn'"),
], ids=["multiline", "unprintable", "huge", "import multiline", "import unprintable",
        "import sys.exit", "import sys.exit long", "import sys.exit unprintable",
        "import AttributeError", "import GeneratorExit", "module __getattr__",
        "module __getattr__ sys.exit", "module __getattr__ GeneratorExit",
        "module __getattr__ AttributeError"])
def test_a_model_that_fails_before_the_runs_is_named_on_one_line(
        tmp_path, monkeypatch, capsys, module, attr, says) -> None:
    """Whatever the user's module raises, at import, on lookup or in the check, the
    command says so on one short line and exits 2: a message's lines are joined, a long
    one cut, one whose str() raises named as such."""
    mod = _fresh_module(tmp_path, monkeypatch, module or NASTY_MODULE)
    code, _, err = run_cli(capsys, "--model", f"{mod}:{attr}", *TINY)
    assert code == 2, err
    assert err.count("\n") == 1 and says.format(mod=mod) in err, err
    assert len(err) < 600, len(err)


@pytest.mark.parametrize("attr, says", [
    ("multiline_later", "RuntimeError: later one later two"),
    ("unprintable_later", "Unprintable: (its message could not be read: str() raised "
                          "ValueError)")])
def test_a_model_that_fails_in_the_runs_is_quoted_on_one_line(
        tmp_path, monkeypatch, capsys, attr, says) -> None:
    mod = _fresh_module(tmp_path, monkeypatch, NASTY_MODULE)
    code, out, err = run_cli(capsys, "--model", f"{mod}:{attr}", *TINY)
    assert code == 1
    quoted = [line for line in (out + err).splitlines() if "later two" in line
              or "could not be read" in line or "str of exception" in line]
    assert quoted and all(says in line for line in quoted), quoted


def test_tiny_run_prints_the_three_systems_and_writes_json(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bench.json"
    code, out, err = run_cli(
        capsys, "--model", "identity", "--clients", "2", *TINY, "--json", str(path)
    )
    assert code == 0, err
    for name in ("batchproc", "no batching", "limit", "req/s", "p99", "mean batch"):
        assert name in out
    assert "vs no batching" in out and "vs the limit" in out
    # The limit is defined once, in its note, not again on the ratio's line.
    assert out.count("called back to back") == 1, out
    doc = json.loads(path.read_text())
    assert {"date", "machine", "versions", "settings", "runs", "ratios"} <= doc.keys()
    assert {"cpu", "cores"} <= doc["machine"].keys()
    assert {"python", "numpy", "batchproc"} <= doc["versions"].keys()
    assert doc["settings"]["model"] == "identity"
    assert doc["settings"]["load"]["clients"] == 2
    assert [r["system"] for r in doc["runs"]] == ["batchproc", "no batching", "limit"]
    keys = {"throughput", "p50_ms", "p95_ms", "p99_ms", "mean_batch", "completed", "stopped_by"}
    for run in doc["runs"]:
        assert keys <= run.keys()
        assert run["throughput"] > 0 and run["errors"] == 0
    bp, nb = doc["runs"][0], doc["runs"][1]
    assert bp["completed"] == nb["completed"] == 40
    assert nb["mean_batch"] == 1.0
    # The limit is bounded by --requests too: one call of the 40 requests.
    assert doc["runs"][2]["completed"] == 40 and doc["runs"][2]["mean_batch"] == 40.0
    assert 1 <= bp["mean_batch"] <= 2  # two clients: never more than two rows at once
    assert set(doc["ratios"]) == {"vs_no_batching", "vs_limit"}
    assert doc["ratios_not_compared"] == {}  # no run had errors: both compared
    assert doc["ratio_bounds"] == {}  # closed loops: each at its own pace, no bound
    assert doc["interrupted"] is False


def test_burst_on_the_fixed_model_batches(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    path = tmp_path / "b.json"
    code, _, err = run_cli(
        capsys, "--model", "fixed", "--model-ms", "2", "--burst", "256", "--duration", "5",
        "--quiet", "--json", str(path),
    )
    assert code == 0, err
    runs = {r["system"]: r for r in json.loads(path.read_text())["runs"]}
    assert runs["batchproc"]["completed"] == 256
    # 256 requests queued at once behind a 2 ms model: batchproc fills batches.
    assert runs["batchproc"]["mean_batch"] > 8
    assert runs["no batching"]["mean_batch"] == 1.0


def test_rate_with_priorities_and_a_user_model(
    tmp_path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "good_model_mod.py").write_text("def double(batch):\n    return batch * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "r.json"
    code, out, err = run_cli(
        capsys, "--model", "good_model_mod:double", "--rate", "400", "--priorities",
        *TINY, "--json", str(path),
    )
    assert code == 0, err
    assert "latency by priority" in out
    doc = json.loads(path.read_text())
    assert doc["settings"]["load"] == {
        "kind": "rate", "clients": None, "rate": 400.0, "burst": None,
        "priorities": True, "seed": 0,
    }
    bp = doc["runs"][0]
    assert bp["completed"] == 40
    assert sum(v["count"] for v in bp["by_priority"].values()) == 40


def test_plot_needs_matplotlib_or_writes_a_png(tmp_path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "plot.png"
    code, _, err = run_cli(
        capsys, "--model", "identity", "--clients", "1", *TINY, "--plot", str(path)
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 2 and "pip install matplotlib" in err
        assert len(err.strip().splitlines()) == 1
    else:
        assert code == 0, err
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_asyncio_drives_batchproc_from_an_event_loop(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.json"
    code, out, err = run_cli(
        capsys, "--model", "identity", "--clients", "8", "--asyncio", *TINY,
        "--json", str(path),
    )
    assert code == 0, err
    assert "batchproc asyncio vs no batching" in out
    doc = json.loads(path.read_text())
    assert doc["settings"]["asyncio"] is True
    assert [r["system"] for r in doc["runs"]] == ["batchproc asyncio", "no batching", "limit"]
    assert doc["runs"][0]["completed"] == 40 and doc["runs"][0]["errors"] == 0
    assert doc["ratios"]["vs_no_batching"] is not None


@pytest.mark.parametrize(
    ("argv", "calls", "rows"),
    [
        # One row per request, max batch 64: 7 full calls and one of 52 rows.
        (["--requests", "500"], 8, 500),
        # Two rows per request: 32 requests a call; 15 full calls and one of 20 requests.
        (["--requests", "500", "--input", "float32:2x4"], 16, 1000),
        # Fewer requests than one full batch: a single call.
        (["--requests", "10"], 1, 10),
        # A burst bounded by a smaller --requests: every row stops at --requests.
        (["--burst", "300", "--requests", "100"], 2, 100),
    ],
)
def test_requests_bound_every_row_including_the_limit(
    tmp_path, capsys: pytest.CaptureFixture[str], argv: list[str], calls: int, rows: int
) -> None:
    path = tmp_path / "bench.json"
    code, _, err = run_cli(
        capsys, "--model", "identity", "--duration", "60", "--quiet", *argv,
        "--json", str(path),
    )
    assert code == 0, err
    runs = {r["system"]: r for r in json.loads(path.read_text())["runs"]}
    wanted = int(argv[argv.index("--requests") + 1])
    for name in ("batchproc", "no batching", "limit"):
        assert runs[name]["completed"] == wanted, name
        assert runs[name]["stopped_by"] == "requests", name
    limit = runs["limit"]
    assert limit["batches"] == calls
    assert limit["mean_batch"] == rows / calls


def test_the_gc_clock_counts_collections_while_entered_only() -> None:
    import gc

    from batchproc.bench.runner import GcClock

    with GcClock() as clock:
        gc.collect()
        gc.collect(0)
    assert clock.full == 1
    assert clock.seconds > 0.0
    seconds = clock.seconds
    gc.collect()  # after the block: not counted
    assert (clock.full, clock.seconds) == (1, seconds)
    assert clock._callback not in gc.callbacks


def test_a_run_freezes_the_heap_it_found_and_thaws_it_after() -> None:
    import gc

    from batchproc.bench.runner import _frozen_heap

    gc.unfreeze()  # what the interpreter may have frozen at start (CPython 3.12.1)
    with _frozen_heap():
        assert gc.get_freeze_count() > 0  # a collection in the run skips these
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), _frozen_heap():
        raise RuntimeError("a failing run")
    assert gc.get_freeze_count() == 0


def test_a_run_leaves_a_heap_frozen_before_it_as_it_found_it() -> None:
    import gc

    from batchproc.bench.runner import _frozen_heap

    gc.freeze()  # a pre-forking server's
    try:
        before = gc.get_freeze_count()
        with _frozen_heap():
            assert gc.get_freeze_count() == before
        assert gc.get_freeze_count() == before  # not thawed
    finally:
        gc.unfreeze()


# -- a plot's format is checked before anything runs ----------------------------------------


@pytest.mark.parametrize(
    ("name", "says"),
    [("plot.txt", "format 'txt' is not supported"), ("plot", "it has no extension"),
     ("plot.png.bak", "format 'bak' is not supported")],
)
@pytest.mark.parametrize("sweep", [False, True], ids=["bench", "sweep"])
def test_plot_in_a_format_matplotlib_cannot_write_fails_before_any_run(
    tmp_path, capsys: pytest.CaptureFixture[str], name: str, says: str, sweep: bool
) -> None:
    require("matplotlib", "test")
    path = tmp_path / name
    argv = ["--sweep", "--capacity", "100", "--loads", "0.5", "--duration", "0.2", "--quiet"] \
        if sweep else ["--clients", "1", *TINY]
    code, out, err = run_cli(capsys, "--model", "identity", *argv, "--plot", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert says in err and ".png" in err and ".svg" in err
    assert out == "" and not path.exists()  # no run, no table


@pytest.mark.parametrize("name", ["p.png", "p.PNG", "p.svg", "p.pdf"])
def test_plot_formats_matplotlib_writes_are_accepted(tmp_path, name: str) -> None:
    require("matplotlib", "test")
    report.check_plot_path("--plot", str(tmp_path / name))


def test_write_plot_refuses_an_unknown_format_before_drawing(tmp_path) -> None:
    require("matplotlib", "test")
    with pytest.raises(report.PlotUnavailable, match="'txt' is not supported"):
        report.write_plot(str(tmp_path / "x.txt"), {}, "title")
    assert not (tmp_path / "x.txt").exists()


# -- a run that fails is reported, the others are kept ---------------------------------------


SMALL_ONLY = """
def small_only(batch):
    if len(batch) > 8:
        raise RuntimeError("too big")
    return batch
"""


def test_a_failing_limit_run_is_reported_and_the_other_runs_kept(
    tmp_path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "small_model_mod.py").write_text(SMALL_ONLY)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "f.json"
    code, out, err = run_cli(
        capsys, "--model", "small_model_mod:small_only", "--clients", "2", *TINY,
        "--json", str(path),
    )
    assert code == 1
    # The error names the run and the batch it failed on, on stderr and under the table.
    assert "batchproc bench: error: the limit run failed: the model raised on a batch of " \
        "40 rows (40 requests): RuntimeError: too big" in err
    assert "limit: the run failed: the model raised on a batch of 40 rows" in out
    assert "batchproc vs no batching" in out
    doc = json.loads(path.read_text())
    runs = {r["system"]: r for r in doc["runs"]}
    assert list(runs) == ["batchproc", "no batching", "limit"]
    assert runs["batchproc"]["completed"] == runs["no batching"]["completed"] == 40
    assert runs["batchproc"]["failed"] is None and runs["no batching"]["failed"] is None
    assert runs["limit"]["failed"].endswith("RuntimeError: too big")
    assert runs["limit"]["throughput"] is None and runs["limit"]["completed"] == 0
    assert doc["ratios"]["vs_limit"] is None and doc["ratios"]["vs_no_batching"] > 0
    assert doc["ratios_not_compared"] == {"vs_limit": "the limit run failed"}
    assert "batchproc vs the limit:   not compared: the limit run failed" in out


def test_the_limit_fails_on_its_last_partial_batch_too() -> None:
    calls = []

    def fails_on_three(batch):
        calls.append(len(batch))
        if len(batch) == 3:
            raise ValueError("three")
        return batch

    load = Load("closed", clients=1, features=4)
    run = run_limit(fails_on_three, "m", load, Bounds(requests=11), max_batch=4)
    assert calls == [4, 4, 3]
    assert run.system == "limit" and run.completed == 0 and math.isnan(run.throughput)
    assert run.failed == "the model raised on a batch of 3 rows (3 requests): ValueError: three"
    assert report.row_cells(run) == ["limit", "failed", "-", "-", "-", "-", "-"]


class BrokenTarget:
    name = "broken"

    def start(self, model: object) -> None:
        raise OSError("no such device")


def test_a_system_that_raises_is_a_failed_run_not_an_exception() -> None:
    target = BrokenTarget()
    run = run_target(target, lambda b: b, "m", Load("closed", clients=1, features=4),
                     Bounds(requests=5))
    assert run.system == "broken" and run.failed == "OSError: no such device"
    assert run.completed == 0 and run.stopped_by == "failed"
    notes = report.run_notes([run])
    assert notes == ["! broken (m, 1 client): the run failed: OSError: no such device"]
    ok = run_limit(lambda b: b, "m", Load("closed", clients=1, features=4), Bounds(requests=5), 4)
    assert report.ratio(run, ok) is None and report.ratio(ok, run) is None


def test_a_run_stopped_by_its_time_bound_says_its_time_counts_the_requests_in_flight() -> None:
    # A closed loop stops sending at the bound, then waits for each client's last
    # request: the time in all is past the bound, and the note says why.
    run = dataclasses.replace(_clean_run("sys", 100.0), stopped_by="duration", elapsed_s=5.3)
    assert report.run_notes([run]) == [
        "* sys (m, 1 client): stopped by the time bound; it took 5.3 s, the requests in "
        "flight at the bound included"]


def _clean_run(system: str, throughput: float) -> RunResult:
    run = run_limit(lambda b: b, "m", Load("closed", clients=1, features=4), Bounds(requests=5), 4)
    return dataclasses.replace(run, system=system, throughput=throughput)


@pytest.mark.parametrize(
    ("errors", "model_errors", "why"),
    [
        ({"batchproc": 3, "no batching": 2}, {}, "errors in both runs"),
        ({}, {"batchproc": 7}, "errors in the batchproc run"),  # retried, none failed
        ({"no batching": 1}, {"no batching": 1}, "errors in the no batching run"),
    ],
)
def test_a_ratio_compares_only_runs_without_errors(errors, model_errors, why) -> None:
    runs = [_clean_run("batchproc", 50.0), _clean_run("no batching", 2000.0),
            _clean_run(LIMIT, 100.0)]
    runs = [dataclasses.replace(r, errors=errors.get(r.system, 0),
                                model_errors=model_errors.get(r.system, 0)) for r in runs]
    bp, nb = runs[:2]
    assert report.ratio(bp, nb) is None
    assert (report.not_compared(bp, nb) or "").startswith(why)
    ratios = report.bench_ratios(runs)
    reasons = report.bench_not_compared(runs)
    assert ratios["vs_no_batching"] is None and reasons["vs_no_batching"].startswith(why)
    # The limit had no errors: compared with batchproc unless batchproc had some.
    bp_erred = bool(errors.get("batchproc") or model_errors.get("batchproc"))
    assert (ratios["vs_limit"] is None) == bp_erred
    assert ("vs_limit" in reasons) == bp_erred
    out = io.StringIO()
    report.print_bench_table("t", runs, ratios, out, use_rich=False, not_compared=reasons)
    lines = out.getvalue().splitlines()
    assert f"batchproc vs no batching: not compared: {why}" in "\n".join(lines)
    assert not any("0.025x" in line for line in lines)  # 50 / 2000: never shown


@pytest.mark.parametrize("idle", ["batchproc", "no batching", LIMIT])
def test_a_run_that_completed_no_request_is_not_compared_and_says_so(idle) -> None:
    runs = [_clean_run("batchproc", 500.0), _clean_run("no batching", 250.0),
            _clean_run(LIMIT, 1000.0)]
    runs = [dataclasses.replace(r, completed=0, throughput=0.0) if r.system == idle else r
            for r in runs]
    ratios, reasons = report.bench_ratios(runs), report.bench_not_compared(runs)
    why = f"the {idle} run completed no request"
    expected = (["vs_no_batching", "vs_limit"] if idle == "batchproc"
                else ["vs_no_batching" if idle == "no batching" else "vs_limit"])
    assert reasons == dict.fromkeys(expected, why)
    assert [k for k, v in ratios.items() if v is None] == expected


def test_a_run_started_beside_calls_an_earlier_run_left_is_not_compared() -> None:
    runs = [_clean_run("batchproc", 500.0), _clean_run("no batching", 250.0),
            dataclasses.replace(_clean_run(LIMIT, 1000.0), started_beside=75)]
    ratios, reasons = report.bench_ratios(runs), report.bench_not_compared(runs)
    assert ratios == {"vs_no_batching": 2.0, "vs_limit": None}
    assert reasons == {"vs_limit": "the limit run started while 75 model calls an earlier "
                                   "run left running were still running"}
    assert ("! limit (m, 1 client): started while 75 model calls an earlier run left "
            "running were still running; its throughput is not compared"
            in report.run_notes(runs))


def test_runs_without_errors_are_compared_and_a_failed_run_says_so() -> None:
    runs = [_clean_run("batchproc", 500.0), _clean_run("no batching", 250.0),
            dataclasses.replace(_clean_run(LIMIT, 1000.0), failed="RuntimeError: x")]
    ratios, reasons = report.bench_ratios(runs), report.bench_not_compared(runs)
    assert ratios == {"vs_no_batching": 2.0, "vs_limit": None}
    assert reasons == {"vs_limit": "the limit run failed"}
    out = io.StringIO()
    report.print_bench_table("t", runs, ratios, out, use_rich=False, not_compared=reasons)
    text = out.getvalue()
    assert "batchproc vs no batching: 2.00x throughput\n" in text
    assert "batchproc vs the limit:   not compared: the limit run failed\n" in text
    # A run missing (Ctrl-C ended the command before it): said so, not a bare "-".
    assert report.bench_not_compared(runs[:2]) == {"vs_limit": "the limit run not measured"}
    assert report.bench_not_compared(runs[1:2]) == {
        "vs_no_batching": "the batchproc run not measured",
        "vs_limit": "the batchproc and the limit run not measured"}


FAILS_ON_ONE_ROW = """
import numpy as np
from batchproc.bench.inputs import FeatureRows

BAD = FeatureRows(64).requests(0)[10]  # the 11th request of bench's default pool

def fails_on_one_row(batch):
    if (batch == BAD).all(axis=1).any():
        raise ValueError("bad row")
    return batch
"""


def test_bench_does_not_compare_runs_in_which_the_model_failed(
    tmp_path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # batchproc retries the failing request after a backoff (its run stretched, the
    # request late or failed), no batching fails it at once, the limit run fails: no
    # ratio is a like-for-like figure, and none is printed or written as one.
    (tmp_path / "one_row_mod.py").write_text(FAILS_ON_ONE_ROW)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "e.json"
    code, out, err = run_cli(capsys, "--model", "one_row_mod:fails_on_one_row", "--clients",
                             "2", "--requests", "40", "--duration", "1", "--quiet",
                             "--json", str(path))
    assert code == 1, err
    assert "batchproc vs no batching: not compared: errors in both runs" in out, out
    assert "batchproc vs the limit:   not compared: the limit run failed" in out, out
    assert "x throughput" not in out
    assert "no batching: 1 request failed, first: ValueError: bad row" in out  # notes kept
    doc = json.loads(path.read_text())
    assert doc["ratios"] == {"vs_no_batching": None, "vs_limit": None}
    assert doc["ratios_not_compared"]["vs_no_batching"].startswith("errors in both runs")
    assert doc["ratios_not_compared"]["vs_limit"] == "the limit run failed"


def test_the_limits_latencies_are_said_to_be_one_calls() -> None:
    load = Load("closed", clients=1, features=4)
    limit = run_limit(lambda b: b, "m", load, Bounds(requests=5), 4)
    said = ("limit: the model called back to back on full batches, no queue: its latencies "
            "are one call's, not a request's wait")
    assert report.run_notes([limit]) == [said]
    assert report.run_notes([run_target(BrokenTarget(), lambda b: b, "m", load,
                                        Bounds(requests=5))]) != [said]


@pytest.mark.parametrize("rows, over", [(10, 10), (3, None), (4, None)])
def test_a_limit_of_requests_larger_than_a_batch_says_so(tmp_path, rows, over) -> None:
    # With no request fitting --max-batch rows, the limit's batches are whole requests:
    # its figures are not at the batch size batchproc runs; a note says so.
    path = tmp_path / "big.npz"
    np.savez(path, np.ones((rows, 4), np.float32))
    load = Load("closed", clients=1, source=NpzSource(str(path)))
    sizes: list[int] = []
    limit = run_limit(lambda b: sizes.append(len(b)) or b, "m", load, Bounds(requests=3), 4)
    assert limit.extra.get("rows_over_max_batch") == over
    assert max(sizes) == rows if over else max(sizes) <= 4
    notes = report.run_notes([limit])
    assert any(n.startswith("! limit: no request fits a batch of --max-batch rows, so its "
                            f"batches are whole requests, of up to {rows:,} rows")
               for n in notes) == bool(over), notes
    # ... and gives no ratio against it: the two ran at different batch sizes.
    batchproc = run_target(targets.Batchproc(max_batch=4), lambda b: b, "m", load,
                           Bounds(requests=3))
    why = report.not_compared(batchproc, limit)
    assert (why == f"the limit's batches were whole requests of up to {rows:,} rows, past "
            "--max-batch, where batchproc runs chunks of --max-batch rows") == bool(over), why
    assert (report.ratio(batchproc, limit) is None) == bool(over)


# -- BLAS threads for the built-in numpy model -------------------------------------------------


def _blas_threads() -> list[int]:
    import threadpoolctl

    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def test_the_mlp_model_runs_one_blas_thread_per_call_under_bench(
    monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    require("threadpoolctl", "test")
    before = _blas_threads()
    assert before, "numpy's BLAS is not visible to threadpoolctl"
    seen: list[list[int]] = []
    call = models.MLP.__call__

    def recording(self, batch):
        seen.append(_blas_threads())
        return call(self, batch)

    monkeypatch.setattr(models.MLP, "__call__", recording)
    code, _, err = run_cli(capsys, "--model", "mlp", "--clients", "2", *TINY)
    assert code == 0, err
    assert len(seen) > 3 and all(threads == [1] * len(before) for threads in seen), seen
    assert _blas_threads() == before  # given back after the command
    assert "threadpoolctl" not in err


def test_other_models_keep_their_blas_threads(monkeypatch) -> None:
    require("threadpoolctl", "test")
    before = _blas_threads()
    with blas.one_blas_thread("identity", "batchproc bench"):
        assert _blas_threads() == before
    with blas.one_blas_thread("mlp", "batchproc bench"):
        assert set(_blas_threads()) == {1}
    assert _blas_threads() == before


def test_without_threadpoolctl_bench_says_figures_may_vary_and_how_to_pin(
    monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    code, out, err = run_cli(capsys, "--model", "mlp", "--clients", "2", *TINY)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "threadpoolctl" in line]
    assert lines == [f"batchproc bench: {blas.MISSING_NOTE}"]
    assert "figures may vary" in lines[0] and "OPENBLAS_NUM_THREADS=1" in lines[0]
    assert "limit" in out
    code, _, err = run_cli(capsys, "--model", "identity", "--clients", "2", *TINY)
    assert code == 0 and "threadpoolctl" not in err  # only the numpy model needs it


def _unwritable(tmp_path, place: str, ext: str) -> tuple[str, str]:
    """(path, what the error says) of an output that cannot be written, whoever runs the
    tests (root writes through permission bits: /proc refuses even root)."""
    if place == "missing":
        return str(tmp_path / "missing" / f"out.{ext}"), "does not exist"
    if place == "file":
        (tmp_path / "a-file").write_text("")
        return str(tmp_path / "a-file" / f"out.{ext}"), "is not a directory"
    if place == "dir":
        (tmp_path / f"a-dir.{ext}").mkdir()
        return str(tmp_path / f"a-dir.{ext}"), "is a directory"
    if not os.path.isdir("/proc/self"):  # Linux
        pytest.skip("no /proc here")
    return f"/proc/out.{ext}", "is not writable"


def _counting_model(tmp_path, monkeypatch) -> list[int]:
    """A user model (``calls_mod:model``) that records each call."""
    (tmp_path / "calls_mod.py").write_text(
        "CALLS = []\n\ndef model(batch):\n    CALLS.append(len(batch))\n    return batch\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import calls_mod

    return calls_mod.CALLS


# The shortest run of each command that writes outputs.
SHORT_RUNS = {
    "bench": ["bench", "--clients", "1", *TINY],
    "sweep": ["bench", "--sweep", "--capacity", "100", "--loads", "0.5",
              "--duration", "0.2", "--quiet"],
    "tune": ["tune", "--rate", "100", "--duration", "0.2", "--budget", "5", "--quiet"],
}


@pytest.mark.parametrize("place", ["missing", "file", "dir", "proc"])
@pytest.mark.parametrize(("command", "flag"), [
    ("bench", "--json"), ("bench", "--plot"), ("sweep", "--json"), ("sweep", "--plot"),
    ("tune", "--json"),  # tune's resumable results file
])
def test_an_output_that_cannot_be_written_fails_before_any_run(
    tmp_path, monkeypatch, capsys: pytest.CaptureFixture[str], command: str, flag: str,
    place: str,
) -> None:
    calls = _counting_model(tmp_path, monkeypatch)
    argv = SHORT_RUNS[command]
    path, says = _unwritable(tmp_path, place, "json" if flag == "--json" else "png")
    code = main([*argv, "--model", "calls_mod:model", flag, path])
    out, err = capsys.readouterr()
    assert out == "" and calls == []  # no run, not even the model's check
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{flag} {path}: " in err and says in err, err


def _not_a_regular_file(tmp_path, what: str, ext: str) -> tuple[str, str]:
    """(path, what the error says) of an existing output that is not (or cannot become)
    a regular file."""
    if what == "fifo":
        fifo = tmp_path / f"no-reader.{ext}"
        os.mkfifo(fifo)
        return str(fifo), "is a FIFO, not a regular file"
    if what == "link to a device":
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full here")
        (tmp_path / f"full.{ext}").symlink_to("/dev/full")
        return str(tmp_path / f"full.{ext}"), "is a character device, not a regular file"
    if what == "device":
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full here")
        return "/dev/full", "is a character device, not a regular file"
    if not os.path.isfile("/proc/version"):
        pytest.skip("no /proc here")
    return "/proc/version", "cannot be rewritten: its directory takes no new file"


@pytest.mark.parametrize("what", ["fifo", "device", "link to a device", "proc file"])
@pytest.mark.parametrize(("command", "flag"), [
    ("bench", "--json"), ("bench", "--plot"), ("tune", "--json"),
])
def test_an_existing_output_that_is_no_regular_file_fails_before_any_run(
    tmp_path, monkeypatch, capsys: pytest.CaptureFixture[str], command: str, flag: str,
    what: str,
) -> None:
    if flag == "--plot":
        require("matplotlib", "test")
    calls = _counting_model(tmp_path, monkeypatch)
    path, says = _not_a_regular_file(tmp_path, what, "json" if flag == "--json" else "png")
    argv = {
        "bench": ["bench", "--clients", "1", *TINY],
        "tune": ["tune", "--rate", "100", "--duration", "0.2", "--budget", "5", "--quiet"],
    }[command]
    code = main([*argv, "--model", "calls_mod:model", flag, path])
    out, err = capsys.readouterr()
    assert out == "" and calls == []
    assert code == 2, err
    assert err.strip() == f"batchproc {command}: error: {flag} {path}: {says}", err


class _NeedsAProgram:
    """A canvas whose writer fails as matplotlib's PGF writer does without a TeX system."""

    def __init__(self, figure) -> None:
        self.figure = figure

    def print_needsprog(self, *args, **kwargs) -> None:
        raise RuntimeError("'xelatex' not found")


def test_a_plot_format_whose_writer_fails_here_is_refused_before_any_run(
        tmp_path, capsys, monkeypatch) -> None:
    # Known to matplotlib (its list of formats has it), not writable on this machine.
    require("matplotlib", "test")
    import sys
    import types

    from matplotlib import backend_bases

    backend = types.ModuleType("needsprog_backend")
    backend.FigureCanvas = _NeedsAProgram  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "needsprog_backend", backend)
    # What matplotlib's register_backend does, undone after the test.
    monkeypatch.setitem(backend_bases._default_backends, "needsprog", "needsprog_backend")
    monkeypatch.setitem(backend_bases._default_filetypes, "needsprog", "needs a program")
    path = tmp_path / "p.needsprog"
    code, out, err = run_cli(capsys, "--model", "identity", "--clients", "1", *TINY,
                             "--plot", str(path))
    assert code == 2 and out == "" and not path.exists()
    assert err == (f"batchproc bench: error: --plot {path}: matplotlib cannot write "
                   ".needsprog here (RuntimeError: 'xelatex' not found); .png, .svg and "
                   ".pdf need nothing beyond matplotlib\n")


def test_a_plot_whose_writer_fails_after_the_runs_loses_no_figures(
        tmp_path, capsys, monkeypatch) -> None:
    # Any failure of the writer, not only the file system's: the table and the JSON
    # are kept, the plot named on stderr.
    require("matplotlib", "test")

    def fails(fig, path) -> bytes:
        raise RuntimeError("'xelatex' not found")

    monkeypatch.setattr(report, "_rendered", fails)
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    code, out, err = run_cli(capsys, "--model", "identity", "--clients", "2", *TINY,
                             "--json", str(out_json), "--plot", str(out_png))
    assert code == 1
    assert err.strip().splitlines() == [
        f"batchproc bench: error: --plot {out_png}: could not be written "
        "(RuntimeError: 'xelatex' not found), left as it was"]
    assert "no batching" in out and not out_png.exists()
    assert [r["system"] for r in json.loads(out_json.read_text())["runs"]] == [
        "batchproc", "no batching", "limit"]


@pytest.fixture
def full_disk(monkeypatch) -> None:
    """Every output is written where a full disk would take it: the write fails with
    ENOSPC after the runs, as on a disk that filled up during them."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")

    def replace_file(path, write) -> None:
        write("/dev/full")

    monkeypatch.setattr(report, "replace_file", replace_file)


@pytest.mark.parametrize("sweep", [False, True], ids=["bench", "sweep"])
def test_outputs_that_fail_after_the_runs_lose_no_figures(
    tmp_path, capsys: pytest.CaptureFixture[str], full_disk, sweep: bool
) -> None:
    require("matplotlib", "test")
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    load = (["--sweep", "--capacity", "200", "--loads", "0.5", "--duration", "0.15",
             "--quiet"] if sweep else ["--clients", "2", *TINY])
    code, out, err = run_cli(capsys, "--model", "identity", *load, "--json", str(out_json),
                             "--plot", str(out_png))
    assert code == 1, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"batchproc bench: error: --plot {out_png}: could not be written "
        "(No space left on device), left as it was",
        f"batchproc bench: error: --json {out_json}: could not be written "
        "(No space left on device), left as it was; the JSON follows on stdout",
    ]
    table, _, doc = out.partition("\n{")
    assert "no batching" in table
    figures = json.loads("{" + doc)
    assert ("points" if sweep else "runs") in figures and "settings" in figures
    assert not out_json.exists() and not out_png.exists()


def test_tune_whose_results_file_fails_keeps_searching_and_says_so(
    tmp_path, capsys: pytest.CaptureFixture[str], full_disk
) -> None:
    path = tmp_path / "tune.json"
    code = main(["tune", "--model", "identity", "--rate", "100", "--duration", "0.15",
                 "--budget", "20", "--sizes", "4", "--delays-ms", "1", "--workers", "1",
                 "--strategies", "fixed", "--quiet", "--json", str(path)])
    out, err = capsys.readouterr()
    assert code == 1, err
    assert "Traceback" not in err
    assert err.strip() == (
        f"batchproc tune: error: --json {path}: could not be written (No space left on "
        "device); it holds 0 runs, from its last write that succeeded; the search's "
        "result is above")
    assert "2 of 2 configurations done" in out and "config = BatchProcessorConfig(" in out


def test_tune_resumes_from_a_writable_file_it_checked(tmp_path, capsys) -> None:
    # The check leaves an existing file as it was: a results file to resume is kept.
    path = tmp_path / "tune.json"
    path.write_text("{}")
    code = main(["tune", "--model", "identity", "--rate", "100", "--duration", "0.2",
                 "--budget", "5", "--quiet", "--json", str(path)])
    _, err = capsys.readouterr()
    assert code == 2 and "not a file written by batchproc tune" in err, err
    assert path.read_text() == "{}"


@pytest.mark.parametrize("with_json", [False, True], ids=["no-json", "json"])
def test_tune_out_of_budget_says_how_to_continue(tmp_path, capsys, with_json) -> None:
    # Only a results file lets a rerun continue: without --json, it says to give one.
    # The least budget (one run of 0.15 s): the search ends after the default's run.
    argv = ["tune", "--model", "identity", "--rate", "300", "--duration", "0.15",
            "--budget", "1.8", "--quiet"]
    if with_json:
        argv += ["--json", str(tmp_path / "tune.json")]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 1), err  # whether the default meets the goal is the machine's
    rerun = "budget spent: rerun with the same --json to continue"
    pass_json = "budget spent: pass --json FILE to keep the results and continue"
    assert (rerun in out) == with_json
    assert (pass_json in out) != with_json


# -- log records and the progress display -------------------------------------------------


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize(("tty", "taken_off"), [(False, "\n"), (True, "\r\x1b[2K")])
def test_a_log_record_during_a_run_takes_the_progress_line_off_and_back(
    monkeypatch, tty: bool, taken_off: str
) -> None:
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    cli._configure_logging(verbose=False)
    progress = report.PlainProgress(stream)
    monkeypatch.setattr(report, "make_progress", lambda quiet: progress)
    log = logging.getLogger("batchproc.test_progress")
    with cli._progress_display(quiet=False):
        log.warning("before any run")  # no line open: written as it is
        progress.start("run 1", None, None)
        log.warning("during run 1")
        progress.finish("done")
    log.warning("after")  # the display is gone
    out = stream.getvalue()
    record = "batchproc.test_progress: WARNING: {}\n"
    assert out == (record.format("before any run") + "  run 1 ..." + taken_off
                   + record.format("during run 1") + "  run 1 ... done (0.0 s)\n"
                   + record.format("after"))


def test_log_records_and_a_bench_progress_never_share_a_line(
    tmp_path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A model that fails after the bench's own check: each run logs its failures
    # (batchproc.bench.runner) while its progress line is open.
    (tmp_path / "flaky_mod.py").write_text(textwrap.dedent("""
        CALLS = [0]

        def model(batch):
            CALLS[0] += 1
            if CALLS[0] > 2:
                raise ValueError("flaky")
            return batch
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["bench", "--model", "flaky_mod:model", "--burst", "8", "--duration", "0.3"])
    _, err = capsys.readouterr()
    assert code == 1
    lines = err.splitlines()
    warnings = [line for line in lines
                if line.startswith("batchproc.") and ": WARNING: " in line]
    # No batching's run logs its failures; batchproc's requests are still waiting for
    # their retries when its run ends (counted unfinished, not logged).
    assert len(warnings) >= 1, err
    runs = [line for line in lines if line.startswith("  flaky_mod:model")]
    assert all(line.endswith(" ...") or line.endswith(" s)") for line in runs), err
    # ... and the limit's error line, and the model's errors in the other runs.
    assert len(warnings) + len(runs) + 2 == len(lines), err
    # Every run's: the limit's call that raised is a failed call of the model too.
    assert lines[-1].startswith("batchproc bench: error: the model failed in 3 runs ("), err
    assert lines[-1].endswith(", first in the batchproc run: ValueError: flaky"), err


@pytest.mark.parametrize(("command", "flag"), [
    ("bench", "--json"), ("bench", "--plot"), ("sweep", "--json"), ("tune", "--json"),
])
def test_an_empty_output_name_fails_before_any_run(
    tmp_path, monkeypatch, capsys: pytest.CaptureFixture[str], command: str, flag: str,
) -> None:
    calls = _counting_model(tmp_path, monkeypatch)
    argv = SHORT_RUNS[command]
    code = main([*argv, "--model", "calls_mod:model", flag, ""])
    out, err = capsys.readouterr()
    assert out == "" and calls == []
    assert code == 2, err
    assert err.strip() == f"batchproc {argv[0]}: error: {flag}: an empty file name", err


@pytest.mark.parametrize(("command", "first", "second", "how"), [
    ("bench", "--input", "--json", "same"),
    ("bench", "--input", "--plot", "link"),
    ("bench", "--json", "--plot", "same"),
    ("bench", "--json", "--plot", "hard link"),
    ("sweep", "--input", "--json", "same"),
    ("sweep", "--json", "--plot", "link"),
    ("tune", "--input", "--json", "same"),
    ("tune", "--input", "--json", "hard link"),
])
def test_two_files_of_a_command_that_are_one_file_fail_before_any_run(
        tmp_path, capsys, command: str, first: str, second: str, how: str) -> None:
    # Writing the output would replace the sample requests, or the other output.
    ext = {"--input": ".npz", "--json": ".json", "--plot": ".png"}
    # --json takes any name: --plot p.png --json p.png left JSON named .png.
    path = tmp_path / f"r{ext['--plot' if (first, second) == ('--json', '--plot') else first]}"
    np.savez(tmp_path / "r.npz", np.ones((1, 4), np.float32), np.ones((1, 4), np.float32))
    if first != "--input":
        path.write_text("kept")
    before = path.read_bytes()
    other = path if how == "same" else tmp_path / f"other{ext[second]}"
    if how == "link":
        other.symlink_to(path)
    elif how == "hard link":
        os.link(path, other)
    flags = {first: str(path), second: str(other)}
    flags.setdefault("--input", "float32:1x4")
    argv = [*SHORT_RUNS[command], "--model", "identity"]
    code = main([*argv, *(x for kv in flags.items() for x in kv)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", err
    names = str(path) if how == "same" else f"{path} and {other}"
    assert err.strip() == (f"batchproc {argv[0]}: error: {first} and {second} name the same "
                           f"file ({names}); give each its own"), err
    assert path.read_bytes() == before


def _one_curve() -> dict[str, list[RunResult]]:
    run = RunResult(
        system="batchproc", model="m", load="l", throughput=100.0, p50_ms=1.0, p95_ms=2.0,
        p99_ms=3.0, mean_ms=1.5, mean_batch=4.0, batches=10, submitted=40, completed=40,
        errors=0, elapsed_s=0.4, stopped_by="requests")
    return {"batchproc": [run]}


@pytest.mark.parametrize("name", ["p.svgz", "p.eps", "p.ps", "p.svg", "p.png"])
def test_a_plot_holds_no_temporary_file_name(tmp_path, name: str) -> None:
    require("matplotlib", "test")
    path = tmp_path / name
    report.write_plot(str(path), _one_curve(), "title")
    data = path.read_bytes()
    assert f".{name}.".encode() not in data  # the temporary file's prefix
    assert os.listdir(tmp_path) == [name]
    if name.endswith(".svgz"):
        import gzip

        assert b"<svg" in gzip.decompress(data)
        # The gzip header's optional file name (FNAME flag) names the destination.
        assert data[3] & 0x08 and data[10:10 + len(name) + 1] == name.encode() + b"\0"


# -- what a run's model did -------------------------------------------------------------

DIES_AFTER_CHECK = """
CALLS = [0]

def model(batch):
    CALLS[0] += 1
    if CALLS[0] > 2:  # past the bench's own check of the model
        raise RuntimeError("GPU fell off the bus")
    return batch
"""


def test_a_model_that_raises_is_reported_for_every_run(tmp_path, monkeypatch, capsys) -> None:
    # batchproc retries the failed calls: its requests end late, not failed, and only the
    # count of the model's errors says why.
    (tmp_path / "bench_dies_mod.py").write_text(DIES_AFTER_CHECK)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "r.json"
    code, out, err = run_cli(capsys, "--model", "bench_dies_mod:model", "--rate", "50",
                             "--duration", "0.2", "--quiet", "--json", str(path))
    assert code == 1
    runs = {r["system"]: r for r in json.loads(path.read_text())["runs"]}
    assert runs["batchproc"]["errors"] == 0 and runs["batchproc"]["unfinished"] > 0
    for name in ("batchproc", "no batching"):
        assert runs[name]["model_errors"] > 0, name
        assert runs[name]["first_model_error"] == "RuntimeError: GPU fell off the bus"
    # The limit's run ends at its first call that raises: one failed call, counted.
    assert runs["limit"]["model_errors"] == 1 and runs["limit"]["failed"]
    assert runs["limit"]["first_model_error"] == "RuntimeError: GPU fell off the bus"
    assert "batchproc: the model failed in " in out
    assert "limit: the model failed in 1 call, first: RuntimeError: GPU" in out
    assert "first: RuntimeError: GPU fell off the bus" in out
    lines = err.splitlines()
    assert lines[-1].startswith("batchproc bench: error: the model failed in 3 runs (")
    assert lines[-1].endswith("first in the batchproc run: RuntimeError: GPU fell off the bus")


INTERRUPTS_AFTER_CHECK = """
import asyncio

CALLS = [0]

def raise_it(kind):
    CALLS[0] += 1
    if CALLS[0] > 3:  # past the bench's own check of the model
        raise {"exit": SystemExit(4), "interrupt": KeyboardInterrupt(),
               "generator": GeneratorExit("closed")}[kind]

def exits(batch):
    raise_it("exit")
    return batch

def interrupts(batch):
    raise_it("interrupt")
    return batch

def closes(batch):
    raise_it("generator")
    return batch

async def exits_async(batch):
    await asyncio.sleep(0)
    raise_it("exit")
    return batch
"""


@pytest.mark.parametrize(("model", "said", "load"), [
    ("exits", "SystemExit: 4", ["--rate", "300"]),
    ("closes", "GeneratorExit: closed", ["--rate", "300"]),
    ("interrupts", "KeyboardInterrupt", ["--clients", "2"]),
    ("closes", "GeneratorExit: closed", ["--clients", "2"]),
    ("exits", "SystemExit: 4", ["--asyncio", "--rate", "300"]),
    ("interrupts", "KeyboardInterrupt", ["--asyncio", "--clients", "2"]),
    ("exits_async", "SystemExit: 4", ["--clients", "2"]),
])
def test_a_model_raising_what_is_no_exception_fails_its_requests_in_every_system(
        tmp_path, monkeypatch, capsys, model, said, load) -> None:
    # SystemExit, KeyboardInterrupt and GeneratorExit from the model (on the systems'
    # threads, never where Ctrl-C arrives) are its failures: counted in every run, each
    # request failed, no thread of the load left dead and no traceback.
    (tmp_path / "bench_interrupts_mod.py").write_text(INTERRUPTS_AFTER_CHECK)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bench_interrupts_mod", None)  # its count of calls starts again
    path = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "--model", f"bench_interrupts_mod:{model}", *load,
                           "--requests", "30", "--duration", "0.2", "--quiet",
                           "--json", str(path))
    assert code == 1, err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    assert "BatchOutputError" not in err, err
    runs = {r["system"]: r for r in json.loads(path.read_text())["runs"]}
    for name in ("batchproc asyncio" if "--asyncio" in load else "batchproc", "no batching"):
        run = runs[name]
        assert run["model_errors"] == run["batches"] > 0, (name, run)
        assert run["first_model_error"] == said, (name, run)
        assert run["errors"] == run["submitted"] > 0 and run["completed"] == 0, (name, run)
        assert run["unfinished"] == 0, (name, run)
        assert run["first_error"] == said, (name, run)
    assert runs["limit"]["failed"].endswith(said)


def test_a_bench_in_which_no_system_completed_a_request_exits_1(capsys) -> None:
    # No error anywhere, yet no figure either: a duration too short for any request.
    code, out, err = run_cli(capsys, "--model", "identity", "--duration", "1e-9", "--quiet")
    assert code == 1, err
    assert "completed no request" in out
    assert err.strip() == ("batchproc bench: error: 3 runs completed no request (batchproc, "
                           "no batching, limit; none was sent within their duration)"), err


@pytest.mark.parametrize(("idle", "said"), [
    ({"system": "batchproc", "unfinished": 7},
     "the batchproc run completed no request (7 unfinished when it ended)"),
    ({"system": "limit"},
     "the limit run completed no request (none was sent within its duration)"),
    # Runs whose failure has a line of its own get no other.
    ({"system": "batchproc", "errors": 3}, None),
    ({"system": "batchproc", "failed": "RuntimeError: x"}, None),
    ({"system": "batchproc", "unfinished": 2, "model_errors": 1}, None),
])
def test_the_runs_that_completed_no_request_are_named_on_stderr(
        capsys, idle: dict[str, object], said: str | None) -> None:
    runs = [dataclasses.replace(_clean_run("no batching", 10.0), completed=0, **idle),
            _clean_run("minimal batcher", 10.0)]
    cli._report_idle_runs("bench", runs)
    err = capsys.readouterr().err
    assert err == ("" if said is None else f"batchproc bench: error: {said}\n")


def test_counting_model_counts_what_raised_on_one_line() -> None:
    from batchproc.bench.runner import CountingModel

    def model(batch):
        if len(batch) > 1:
            raise ValueError("too\n  many   rows")
        return batch

    counted = CountingModel(model)
    counted(np.zeros((1, 2)))
    for _ in range(2):
        with pytest.raises(ValueError):
            counted(np.zeros((3, 2)))
    assert (counted.calls, counted.rows, counted.raised) == (3, 7, 2)
    assert counted.first_raised == "ValueError: too many rows"
    assert counted.running == 0


# -- --config systems --------------------------------------------------------------------


def test_config_systems_take_the_flags_as_their_defaults() -> None:
    from batchproc.bench.inputs import FeatureRows

    args = build_parser().parse_args([
        "bench", "--max-batch", "8", "--max-delay", "2", "--strategy", "fixed",
        "--workers", "1", "--config", "batch_timeout=0.01", "--config",
        "max_batch_size=4, processing_strategy=GREEDY"])
    _, first, second = cli._bench_targets(args, FeatureRows(4), 1000)
    config = first.config()
    assert (config.max_batch_size, config.initial_batch_size, config.max_workers) == (8, 8, 1)
    assert config.processing_strategy == BatchProcessingStrategy.FIXED
    assert config.batch_timeout == 0.01  # its own field over --max-delay
    config = second.config()
    assert (config.max_batch_size, config.initial_batch_size) == (4, 4)
    assert config.processing_strategy == BatchProcessingStrategy.GREEDY
    assert config.batch_timeout == 0.002 and config.max_workers == 1
    assert cli._config_notes(args, FeatureRows(4)) == [
        "config 1: batch_timeout=0.01; the rest from the flags",
        "config 2: max_batch_size=4, processing_strategy=GREEDY; the rest from the flags"]


@pytest.mark.parametrize("fields", ["max_batch_tokens=64", "pad_to_multiple_of=7",
                                    "max_batch_tokens=64, pad_value=-1"])
def test_a_config_of_padding_fields_runs_on_ragged_requests(tmp_path, capsys, fields) -> None:
    """The bench pads ragged requests (pad_value=0) for every batchproc system: a
    --config's fields are checked over that, not alone (where padding fields need a
    pad_value of their own)."""
    path = tmp_path / "c.json"
    code, _, err = run_cli(capsys, "--model", "identity", "--clients", "4", "--input",
                           "int64:1x8..32", "--config", fields, *TINY, "--json", str(path))
    assert code == 0, err
    runs = {r["system"]: r for r in json.loads(path.read_text())["runs"]}
    assert runs["config 1"]["completed"] == 40 and runs["config 1"]["errors"] == 0


@pytest.mark.parametrize("fields, why", [
    ("max_batch_tokens=64", "max_batch_tokens needs pad_value"),
    ("pad_to_multiple_of=7", "pad_to_multiple_of needs pad_value")])
def test_a_config_of_padding_fields_is_refused_on_requests_of_one_length(
        capsys, fields, why) -> None:
    code, _, err = run_cli(capsys, "--model", "identity", "--clients", "4", "--config",
                           fields, *TINY)
    assert code == 2
    assert err.count("\n") == 1 and why in err, err


def test_a_config_runs_with_the_flags_max_batch(tmp_path, capsys) -> None:
    path = tmp_path / "c.json"
    code, _, err = run_cli(capsys, "--model", "fixed", "--model-ms", "1", "--burst", "200",
                           "--max-batch", "8", "--strategy", "fixed", "--workers", "1",
                           "--config", "batch_timeout=0.01", "--duration", "5", "--quiet",
                           "--json", str(path))
    assert code == 0, err
    runs = {r["system"]: r for r in json.loads(path.read_text())["runs"]}
    assert runs["config 1"]["completed"] == 200
    assert runs["config 1"]["mean_batch"] <= 8  # the limit's batches are 8 rows too


# -- output -----------------------------------------------------------------------------


class _ClosedPipe(io.StringIO):
    """A standard output whose reader has gone (``| head -1``)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("stdout", ["pipe", "none"], ids=["reader gone", "closed (>&-)"])
@pytest.mark.parametrize("command", ["bench", "tune"])
def test_a_closed_stdout_loses_neither_the_json_nor_the_status(tmp_path, monkeypatch,
                                                               capsys, command, stdout) -> None:
    path = tmp_path / "out.json"
    argv = (["bench", "--model", "identity", "--clients", "2", *TINY] if command == "bench"
            else ["tune", "--model", "identity", "--duration", "0.15", "--quiet", "--rate",
                  "100", "--sizes", "4", "--delays-ms", "1", "--workers", "1",
                  "--strategies", "fixed", "--budget", "1.8"])
    # Closed before the command started, Python has no sys.stdout at all.
    monkeypatch.setattr(sys, "stdout", _ClosedPipe() if stdout == "pipe" else None)
    code = main([*argv, "--json", str(path)])
    err = capsys.readouterr().err
    assert code == 0 if command == "bench" else code in (0, 1), err
    assert "Traceback" not in err and "error" not in err, err
    assert json.loads(path.read_text())["runs"]


def test_a_plot_of_runs_that_all_failed_draws_no_legend_and_warns_nothing(tmp_path) -> None:
    require("matplotlib", "test")
    failed = run_target(BrokenTarget(), lambda b: b, "m",
                        Load("closed", clients=1, features=4), Bounds(requests=5))
    path = tmp_path / "p.png"
    report.write_plot(str(path), {"broken": [failed]}, "all failed")  # warnings are errors
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_poisson_load_is_labelled_with_a_rounded_rate() -> None:
    assert Load("rate", rate=1125.27).label == "1,125 req/s Poisson"
    assert Load("rate", rate=2.5).label == "2.5 req/s Poisson"
    assert Load("rate", rate=100.0).label == "100 req/s Poisson"


# -- Ctrl-C -------------------------------------------------------------------------------


class CtrlC(NullProgress):
    """Ctrl-C during run ``at`` of a command (from 1, in the order its progress display
    starts them), and that display, which keeps each run's label and how it ended.

    The model, ``--model ctrl_c_mod:model``, is the identity until run ``at`` starts;
    then its first call sends SIGINT to the main thread, as Ctrl-C does (it lands in
    whatever the main thread waits on), and every call blocks until :meth:`release`:
    the run is still in progress when the interrupt lands, and a model call is left
    running for the command to leave behind.
    """

    def __init__(self, at: int) -> None:
        self.at = at
        self.labels: list[str] = []
        self.ends: list[str] = []
        self.hold = threading.Event()
        self.released = threading.Event()
        self._sent = False
        self._lock = threading.Lock()

    def __call__(self, batch):
        if self.hold.is_set():
            with self._lock:
                first, self._sent = not self._sent, True
            if first:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            self.released.wait(60)
        return batch

    def start(self, label: str, total: int | None, duration: float | None) -> None:
        self.labels.append(label)
        if len(self.labels) == self.at:
            self.hold.set()

    def finish(self, summary: str) -> None:
        self.ends.append(summary)

    def release(self, before: set[threading.Thread]) -> None:
        """Let the model's calls return, and check that every thread the command started
        since ``before`` ends then (none was left running). A thread has ended once it
        is out of ``threading.enumerate()``: a join that Ctrl-C interrupted can leave
        ``is_alive()`` False for a thread that runs on (CPython 3.11)."""
        self.hold.clear()
        self.released.set()

        def running() -> list[str]:
            return sorted(t.name for t in threading.enumerate()
                          if t not in before and t.name.startswith(("batchproc", "bench")))

        deadline = time.monotonic() + 10
        while running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not running(), f"left running: {running()}"


@pytest.fixture
def ctrl_c(monkeypatch) -> Iterator[Callable[[int], CtrlC]]:
    """``ctrl_c(at)``: Ctrl-C during run ``at`` (see :class:`CtrlC`), with Python's own
    SIGINT handler installed for the test; the threads are checked at its end."""
    made: list[CtrlC] = []
    before = set(threading.enumerate())

    def at(run: int) -> CtrlC:
        made.append(CtrlC(run))
        module = types.ModuleType("ctrl_c_mod")
        module.model = made[-1]  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "ctrl_c_mod", module)
        monkeypatch.setattr(report, "make_progress", lambda quiet: made[-1])
        return made[-1]

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield at
    finally:
        signal.signal(signal.SIGINT, previous)
        for c in made:
            c.release(before)


CTRL_C_BENCH = ["--model", "ctrl_c_mod:model", "--clients", "2", "--requests", "40",
                "--duration", "60"]  # no run it interrupts would end by itself soon


@pytest.mark.parametrize(("at", "finished", "ratios"), [
    (2, ["batchproc"], ("vs no batching: not compared: the no batching run not measured",
                        "vs the limit:   not compared: the limit run not measured")),
    (3, ["batchproc", "no batching"],
     ("vs the limit:   not compared: the limit run not measured",)),
], ids=["no-batching", "limit"])
def test_ctrl_c_keeps_the_runs_that_finished(tmp_path, capsys, ctrl_c, at, finished,
                                             ratios) -> None:
    require("matplotlib", "test")
    c = ctrl_c(at)
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    code, out, err = run_cli(capsys, *CTRL_C_BENCH, "--json", str(out_json),
                             "--plot", str(out_png))
    assert code == 130, err
    assert err.splitlines()[-1] == "batchproc bench: interrupted", err
    assert "Traceback" not in err
    # The run in progress ended, its line saying so; no other run started.
    assert len(c.labels) == len(c.ends) == at
    assert c.ends[-1] == "interrupted" and "interrupted" not in c.ends[:-1]
    doc = json.loads(out_json.read_text())
    assert doc["interrupted"] is True
    assert [r["system"] for r in doc["runs"]] == finished
    assert all(r["completed"] == 40 and not r["failed"] for r in doc["runs"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "batchproc" in out and interrupts.NOTE in out
    for line in ratios:
        assert line in out, line
    # Each ratio not given says why.
    assert {k for k, v in doc["ratios"].items() if v is None} == set(doc["ratios_not_compared"])


def test_ctrl_c_keeps_the_sweep_points_that_finished(tmp_path, capsys, ctrl_c) -> None:
    require("matplotlib", "test")
    c = ctrl_c(3)  # no batching at the lower load, after batchproc's two
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    code, out, err = run_cli(capsys, "--sweep", "--model", "ctrl_c_mod:model",
                             "--capacity", "200", "--loads", "0.25,0.5", "--duration", "0.2",
                             "--json", str(out_json), "--plot", str(out_png))
    assert code == 130, err
    assert err.splitlines()[-1] == "batchproc bench: interrupted", err
    assert c.ends[-1] == "interrupted" and len(c.labels) == 3
    doc = json.loads(out_json.read_text())
    assert doc["interrupted"] is True
    assert [(p["system"], p["fraction"]) for p in doc["points"]] == [
        ("batchproc", 0.25), ("batchproc", 0.5)]
    assert all(p["completed"] > 0 for p in doc["points"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "capacity (given): 200 req/s" in out and interrupts.NOTE in out


@pytest.mark.parametrize("load", [["--clients", "2"], ["--rate", "50"],
                                  ["--clients", "2", "--asyncio"]],
                         ids=["closed", "open", "asyncio"])
def test_ctrl_c_in_the_first_run_writes_nothing_and_leaves_nothing_running(
        tmp_path, capsys, ctrl_c, load) -> None:
    c = ctrl_c(1)
    path = tmp_path / "out.json"
    code, out, err = run_cli(capsys, "--model", "ctrl_c_mod:model", *load, "--duration",
                             "60", "--json", str(path))
    assert code == 130, err
    assert out == "" and not path.exists()
    assert err.splitlines()[-1] == "batchproc bench: interrupted", err
    assert c.ends == ["interrupted"]
    # The fixture checks that the load's threads and the processor's end once the model
    # returns: none goes on with the run the interrupt ended.


def test_a_second_ctrl_c_while_the_run_stops_ends_the_command_at_once(
        tmp_path, capsys, ctrl_c, monkeypatch) -> None:
    c = ctrl_c(2)  # the --config system, after batchproc's run
    stop = targets.Batchproc.stop

    def stopped_by_a_second_ctrl_c(self) -> None:
        stop(self)  # gives up on the model's held call after its timeout
        if c.hold.is_set():
            raise KeyboardInterrupt  # as batchproc's stop() raises one that came during it

    monkeypatch.setattr(targets.Batchproc, "stop", stopped_by_a_second_ctrl_c)
    path = tmp_path / "out.json"
    began = time.monotonic()
    code, out, err = run_cli(capsys, *CTRL_C_BENCH, "--config", "max_batch_size=8",
                             "--json", str(path))
    # Not the 60 s the run's drain would have given the held model call: an interrupted
    # run waits for none.
    assert time.monotonic() - began < 30
    assert code == 130, err
    lines = err.splitlines()
    assert lines[-1] == "batchproc bench: interrupted" and lines.count(lines[-1]) == 1, err
    assert c.ends[-1] == "interrupted" and len(c.labels) == 2
    doc = json.loads(path.read_text())
    assert doc["interrupted"] is True and [r["system"] for r in doc["runs"]] == ["batchproc"]
    assert interrupts.NOTE in out


TUNE_SPACE = ["--rate", "100", "--duration", "0.15", "--sizes", "4", "--delays-ms", "1",
              "--workers", "1", "--strategies", "adaptive,fixed", "--quiet"]


@pytest.mark.parametrize("with_json", [True, False], ids=["json", "no-json"])
def test_ctrl_c_during_tune_keeps_the_finished_runs_and_says_how_to_continue(
        tmp_path, capsys, ctrl_c, with_json) -> None:
    c = ctrl_c(3)  # the third configuration, after the default's run and another's
    path = tmp_path / "tune.json"
    argv = ["tune", "--model", "ctrl_c_mod:model", *TUNE_SPACE]
    if with_json:
        argv += ["--json", str(path)]
    before = set(threading.enumerate())
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 130, err
    assert out == ""
    assert c.ends[-1] == "interrupted" and len(c.labels) == 3
    if not with_json:
        assert err.splitlines()[-1] == ("batchproc tune: interrupted; pass --json FILE to "
                                        "keep the results and continue in a later run"), err
        return
    assert err.splitlines()[-1] == ("batchproc tune: interrupted; rerun with the same "
                                    "--json to continue"), err
    doc = json.loads(path.read_text())
    assert doc["interrupted"] is True
    keys = [r["key"] for r in doc["runs"]]
    assert len(keys) == 2 and keys[0] == "default" and keys[1] != "default"
    c.release(before)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 1), err  # whether a configuration meets the goal is the machine's
    assert ", 2 reused from the results file; 3 of 3 configurations done" in out
    assert json.loads(path.read_text())["interrupted"] is False


def test_ctrl_c_while_tune_writes_its_results_file_loses_no_finished_run(
        tmp_path, capsys, monkeypatch) -> None:
    write_json = report.write_json
    writes = []

    def interrupted_at_the_second(path, doc) -> None:
        writes.append(len(doc["runs"]))
        if len(writes) == 2:  # after the second run: the file is left as it was
            raise KeyboardInterrupt
        write_json(path, doc)

    monkeypatch.setattr(report, "write_json", interrupted_at_the_second)
    path = tmp_path / "tune.json"
    code = main(["tune", "--model", "identity", *TUNE_SPACE, "--json", str(path)])
    _, err = capsys.readouterr()
    assert code == 130, err
    assert writes == [1, 2, 2]  # once more after the interrupt: every run that finished
    doc = json.loads(path.read_text())
    assert doc["interrupted"] is True and len(doc["runs"]) == 2

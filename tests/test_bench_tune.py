"""`batchproc tune`: the search, its results file (resumable), the budget, the verdict
against the default, and the configuration printed as Python.

The CLI runs use the identity model for 0.15 s per configuration; the SLO search's
ladder is checked with synthetic measurements, so nothing depends on speed.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from typing import Any

import numpy as np
import pytest
from hanging import CallsThatDoNotEnd

from batchproc import BatchProcessingStrategy, BatchProcessorConfig
from batchproc.__main__ import main
from batchproc.bench import BenchError
from batchproc.bench.configs import format_config
from batchproc.bench.inputs import FeatureRows, NpzSource
from batchproc.bench.loads import drain_window
from batchproc.bench.models import identity
from batchproc.bench.targets import STOP_TIMEOUT_S
from batchproc.bench.tune import (
    _SAVED_LATER_FIELDS,
    _SAVED_RERUN_FIELDS,
    _SAVED_RUN_FIELDS,
    CONFIRM_RUNS,
    CONFIRM_SHARE,
    DEFAULT,
    Candidate,
    Goal,
    ResultsFile,
    Tuner,
    TuneResult,
    candidates,
    ladder_fraction,
    least_budget,
    print_result,
    run_bound_s,
)

SPACE = ["--sizes", "4,8", "--delays-ms", "1", "--workers", "1",
         "--strategies", "adaptive,fixed"]
FAST = ["--model", "identity", "--duration", "0.15", "--quiet"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["tune", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def config_of(out: str) -> BatchProcessorConfig:
    """Exec the Python that tune prints last, as a user would paste it."""
    code = out[out.index("from batchproc import"):]
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    config = namespace["config"]
    assert isinstance(config, BatchProcessorConfig)
    return config


def test_tune_at_a_rate_then_resume_measures_nothing_new(tmp_path, capsys) -> None:
    path = tmp_path / "tune.json"
    argv = [*FAST, *SPACE, "--rate", "300", "--json", str(path)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    doc = json.loads(path.read_text())
    # The finalists (the 3 best, and the default if it is not one) are rerun twice each.
    reruns = [r for r in doc["runs"] if r.get("repeat")]
    assert len(reruns) in (6, 8)
    measured = 5 + len(reruns)
    for text in ("offered req/s", "achieved req/s", "p99 ms", "meets", "default (ADAPTIVE)",
                 "best: ", f"runs: {measured} measured now, 0 reused",
                 "5 of 5 configurations done", "(median of 3)"):
        assert text in out, text
    config = config_of(out)
    assert config.max_batch_size in (4, 8, 128)
    doc = json.loads(path.read_text())
    assert doc["kind"] == "batchproc tune results" and doc["version"] == 2
    assert doc["identity"]["model"] == "identity" and doc["identity"]["duration_s"] == 0.15
    assert doc["goal"] == {"rate": 300.0, "p99_ms": None}
    assert doc["capacity"] is None  # a target load needs no capacity
    keys = [r["key"] for r in doc["runs"]]
    assert keys[0] == "default" and len(set(keys)) == 5
    assert "default" in {r["key"] for r in reruns}
    for r in doc["runs"]:
        assert r["offered"] == 300.0 and r["completed"] > 0 and r["errors"] == 0
        assert {"throughput", "p50_ms", "p99_ms", "mean_batch", "label", "candidate"} <= set(r)
    assert doc["best"]["run"]["key"] == doc["best"]["key"]

    code, out2, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert f"runs: 0 measured now, {measured} reused" in out2
    assert json.loads(path.read_text())["runs"] == doc["runs"]
    assert out2[out2.index("from batchproc import"):] == out[out.index("from batchproc import"):]


def test_a_file_of_other_settings_is_refused(tmp_path, capsys) -> None:
    path = tmp_path / "tune.json"
    # The least budget (one run): a file of one run.
    run_cli(capsys, *FAST, *SPACE, "--rate", "300", "--budget", "1.8", "--json", str(path))
    assert len(json.loads(path.read_text())["runs"]) >= 1
    code, out, err = run_cli(capsys, "--model", "identity", "--duration", "0.3", "--quiet",
                             *SPACE, "--rate", "300", "--json", str(path))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "duration_s" in err
    other = tmp_path / "other.json"
    other.write_text('{"runs": []}')
    code, _, err = run_cli(capsys, *FAST, "--rate", "300", "--json", str(other))
    assert code == 2 and "not a file written by batchproc tune" in err


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, Any]]:
    """A results file of a search at a target load (the default and one FIXED candidate,
    some rerun as finalists): the command line that wrote it, and what it holds."""
    path = tmp_path_factory.mktemp("tune") / "tune.json"
    argv = [*FAST, "--sizes", "4", "--delays-ms", "1", "--workers", "1", "--strategies",
            "fixed", "--rate", "300", "--json", str(path)]
    assert main(["tune", *argv]) in (0, 1)
    doc = json.loads(path.read_text())
    assert {r["key"] for r in doc["runs"]} == {"default", "fixed/size=4/delay_ms=1/workers=1"}
    # Every run done: a resume of this file has nothing left to measure, however slowly
    # the machine ran it.
    assert doc["budget_spent"] is False
    return argv, doc


def _first_run(doc: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
    """A search run (not a rerun) of ``key`` in a results file, and its index."""
    return next((i, r) for i, r in enumerate(doc["runs"])
                if r["key"] == key and not r.get("repeat"))


FIXED_KEY = "fixed/size=4/delay_ms=1/workers=1"
FIGURES = ("arrival_rate", "throughput", "p50_ms", "p95_ms", "p99_ms", "mean_ms",
           "mean_batch", "elapsed_s")
COUNTS = ("completed", "errors", "unfinished", "refused", "model_errors")
NUMBER = "must be a finite number >= 0, or null"
WHOLE = "must be a whole number >= 0"
NAN, INF = float("nan"), float("inf")


def _damaged_runs() -> list[Any]:
    """(field, value, what the message says) for a search run: each field of the saved
    format with a wrong type, out of range, non-finite, or a bool for a number."""
    cases: list[Any] = []
    for name in FIGURES:
        cases += [(name, v, f"{name!r} = {v!r}: {NUMBER}")
                  for v in ("1", True, -1, -0.5, NAN, INF, -INF, [1])]
    for name in COUNTS:
        cases += [(name, v, f"{name!r} = {v!r}: {WHOLE}")
                  for v in ("3", True, False, 1.5, 2.0, -1, None, NAN)]
    cases += [("offered", v, f"'offered' = {v!r}: must be a finite number > 0")
              for v in (0, 0.0, -300.0, None, "300", True, NAN, INF)]
    for name in ("key", "label"):
        cases += [(name, v, f"{name!r} = {v!r}: must be a string") for v in (1, None, [])]
    for name in ("first_error", "failed", "first_model_error"):
        # What the search writes there is one line (the report prints it as one).
        cases += [(name, v, f"{name!r} = {v!r}: must be one line of text, or null")
                  for v in (1, True, ["x"], "two\nlines", "ends\n", "\r", "a\x1cb",
                            "a\u2028b")]
    cases += [("candidate", v, f"'candidate' = {v!r}: must be a record")
              for v in ("fixed", None, [1])]
    cases += [("repeat", v, f"'repeat' = {v!r}: must be a whole number >= 1")
              for v in (0, -1, "1", True, 1.5, None)]
    return cases


@pytest.mark.parametrize(("name", "value", "said"), _damaged_runs())
def test_a_saved_run_with_a_bad_field_is_refused_naming_it(tmp_path, saved, name, value,
                                                             said) -> None:
    doc = copy.deepcopy(saved[1])
    i, run = _first_run(doc, FIXED_KEY)
    run[name] = value
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BenchError) as refused:
        ResultsFile(str(path), doc["identity"])
    assert str(refused.value) == (f"--json {path}: damaged: run {i} has {said}; give "
                                  "another file to start afresh")


@pytest.mark.parametrize(("damage", "said"), [
    (lambda r: r.update(p50_ms=r["p99_ms"] * 2), "'p50_ms' = "),
    (lambda r: r.update(p95_ms=r["p99_ms"] + 1), "'p95_ms' = "),
    (lambda r: r.update(completed=10**9), "completed 1,000,000,000 requests, more than"),
    (lambda r: r.update(throughput=1e30), "has a throughput of 1e+30/s, above"),
    (lambda r: r.update(mean_batch=1500.0), "'mean_batch' = 1500.0, above its candidate's"),
])
def test_saved_figures_no_run_could_measure_together_are_refused(tmp_path, saved, damage,
                                                                  said) -> None:
    doc = copy.deepcopy(saved[1])
    i, run = _first_run(doc, FIXED_KEY)
    ResultsFile(str(_written(tmp_path, doc)), doc["identity"])  # as saved: taken
    damage(run)
    with pytest.raises(BenchError, match=f"damaged: run {i} ") as refused:
        ResultsFile(str(_written(tmp_path, doc)), doc["identity"])
    assert said in str(refused.value)


# A run of the saved file (0.15 s at 300 req/s: 45 arrivals) and what its figures may be,
# at and past the bounds of what a run measures. Slack of 1.5x (and one request) over
# each bound allows for rounding and timing only.
IMPOSSIBLE = [
    # More requests than arrived, whatever became of them.
    (dict(errors=10**6), "counts 1,000,045 requests completed, failed, unfinished or "
     "refused, more than the 300.0/s that arrived in its 0.15 s"),
    (dict(refused=100), "counts 145 requests completed, failed, unfinished or refused"),
    (dict(unfinished=50), "counts 95 requests completed, failed, unfinished or refused"),
    # Arrivals are the load asked, to rounding; no run offers more than MAX_ARRIVALS.
    (dict(arrival_rate=1000.0), "'arrival_rate' = 1000.0: its arrivals are the load asked"),
    (dict(arrival_rate=100.0), "'arrival_rate' = 100.0: its arrivals are the load asked"),
    (dict(offered=1e12), "'offered' = 1000000000000.0: a run of 0.15 s at that load would "
     "offer more than 2,000,000 arrivals"),
    # A run lasts no longer than its duration, drain and stop, nor does a latency.
    (dict(elapsed_s=1e6), "'elapsed_s' = 1000000.0, longer than a run of 0.15 s lasts"),
    (dict(p99_ms=1e9), "'p99_ms' = 1000000000.0, longer than the run lasts"),
    (dict(mean_ms=1e9), "'mean_ms' = 1000000000.0, longer than the run lasts"),
    # Latencies are never negative: at least half the requests took the median or more,
    # one in a hundred the p99 or more, and the mean holds their share.
    (dict(p50_ms=8.0, p95_ms=9.0, p99_ms=10.0, mean_ms=2.0), "'mean_ms' = 2.0, below 50% "
     "of 'p50_ms' = 8.0: 50% of its requests took that long or longer"),
    (dict(p50_ms=0.1, p95_ms=0.1, p99_ms=1000.0, mean_ms=5.0), "'mean_ms' = 5.0, below 1% "
     "of 'p99_ms' = 1000.0: 1% of its requests"),
    (dict(p50_ms=0.1, p95_ms=200.0, p99_ms=200.0, mean_ms=5.0), "'mean_ms' = 5.0, below 5% "
     "of 'p95_ms' = 200.0: 5% of its requests"),
    # No throughput without completed requests; a call holds at least one row.
    # (Each sets the figures its message quotes: the run's own vary with the machine.)
    (dict(completed=0, throughput=300.0), "has a throughput of 300.0/s, but completed no "
     "request"),
    (dict(completed=45, mean_batch=0.5), "'mean_batch' = 0.5, below one row per call, as it "
     "completed 45 requests"),
    (dict(mean_batch=0.0), "'mean_batch' = 0.0, below one row per call"),
    (dict(mean_batch=4.5), "'mean_batch' = 4.5, above its candidate's max_batch_size 4"),
]
POSSIBLE = [
    dict(errors=10, unfinished=5, refused=5), dict(arrival_rate=310.0),
    dict(arrival_rate=290.0), dict(p99_ms=1000.0, mean_ms=500.0), dict(mean_batch=1.0),
    # A mean at the least its percentiles allow, and within the slack below it.
    dict(p50_ms=8.0, p95_ms=9.0, p99_ms=10.0, mean_ms=4.0),
    dict(p50_ms=8.0, p95_ms=9.0, p99_ms=10.0, mean_ms=2.7),
    dict(p50_ms=0.1, p95_ms=0.1, p99_ms=1000.0, mean_ms=10.0),
    dict(mean_batch=4.0), dict(completed=0, throughput=0.0, mean_batch=0.0),
    dict(completed=0, throughput=0.0, mean_batch=None),
]


@pytest.mark.parametrize(("damage", "said"), IMPOSSIBLE)
def test_saved_figures_past_what_a_run_measures_are_refused(tmp_path, saved, damage,
                                                            said) -> None:
    doc = copy.deepcopy(saved[1])
    i, run = _first_run(doc, FIXED_KEY)
    run.update(damage)
    path = _written(tmp_path, doc)
    with pytest.raises(BenchError) as refused:
        ResultsFile(str(path), doc["identity"])
    assert str(refused.value).startswith(f"--json {path}: damaged: run {i} ")
    assert said in str(refused.value)
    assert str(refused.value).endswith("; give another file to start afresh")


@pytest.mark.parametrize("values", POSSIBLE)
def test_saved_figures_within_what_a_run_measures_are_taken(tmp_path, saved, values) -> None:
    doc = copy.deepcopy(saved[1])
    _, run = _first_run(doc, FIXED_KEY)
    run.update(values)
    assert ResultsFile(str(_written(tmp_path, doc)), doc["identity"]).get(FIXED_KEY, 300.0)


@pytest.mark.parametrize(("mean_batch", "taken"), [
    (float(BatchProcessorConfig().max_batch_size), True),
    (BatchProcessorConfig().max_batch_size + 0.5, False), (1e9, False),
])
def test_the_default_s_mean_batch_is_bounded_by_the_library_s_max_batch_size(
        tmp_path, saved, mean_batch, taken) -> None:
    doc = copy.deepcopy(saved[1])
    i, run = _first_run(doc, "default")
    run["mean_batch"] = mean_batch
    path = _written(tmp_path, doc)
    if taken:
        assert ResultsFile(str(path), doc["identity"]).runs
        return
    with pytest.raises(BenchError, match=re.escape(
            f"damaged: run {i} has 'mean_batch' = {mean_batch!r}, above its candidate's "
            f"max_batch_size {BatchProcessorConfig().max_batch_size}; give another")):
        ResultsFile(str(path), doc["identity"])


@pytest.mark.parametrize(("repeat", "taken"), [(1, True), (CONFIRM_RUNS - 1, True),
                                               (CONFIRM_RUNS, False), (10**6, False)])
def test_a_saved_rerun_the_search_does_not_make_is_refused(tmp_path, saved, repeat,
                                                           taken) -> None:
    doc = copy.deepcopy(saved[1])
    i, run = next((i, r) for i, r in enumerate(doc["runs"]) if r.get("repeat"))
    # The only rerun of its configuration in the file: its number is free.
    doc["runs"] = [r for j, r in enumerate(doc["runs"])
                   if j == i or not (r.get("repeat") and r["key"] == run["key"])]
    i = doc["runs"].index(run)
    run["repeat"] = repeat
    path = _written(tmp_path, doc)
    if taken:
        assert ResultsFile(str(path), doc["identity"]).get(run["key"], run["offered"], repeat)
        return
    with pytest.raises(BenchError, match=re.escape(
            f"damaged: run {i} has 'repeat' = {repeat}: a finalist is rerun at most "
            f"{CONFIRM_RUNS - 1} times; give another")):
        ResultsFile(str(path), doc["identity"])


# The largest capacity whose lowest ladder load (0.05x) still offers a run of 0.15 s at
# most MAX_ARRIVALS arrivals: 2,000,000 / 0.15 / 0.05; and the least a capacity run of
# 0.15 s measures (one request completed, to rounding).
MOST_CAPACITY = 2_000_000 / 0.15 / 0.05


@pytest.mark.parametrize(("capacity", "taken"), [
    (MOST_CAPACITY, True), (MOST_CAPACITY * 1.01, False), (1e300, False),
    (1234.5, True), (10.0, True), (1.0, False), (0.001, False),
])
def test_a_saved_capacity_no_capacity_run_measures_is_refused(tmp_path, saved, capacity,
                                                              taken) -> None:
    doc = copy.deepcopy(saved[1])
    doc["capacity"] = capacity
    path = _written(tmp_path, doc)
    if taken:
        assert ResultsFile(str(path), doc["identity"]).capacity == capacity
        return
    with pytest.raises(BenchError) as refused:
        ResultsFile(str(path), doc["identity"])
    assert str(refused.value) == (
        f"--json {path}: damaged: the file has 'capacity' = {capacity!r}: no capacity run "
        "of 0.15 s measures it; give another file to start afresh")


@pytest.mark.parametrize(("name", "value", "said"), [
    ("interrupted", "yes", "must be true or false"),
    ("interrupted", 1, "must be true or false"),
    ("interrupted", None, "must be true or false"),
    ("budget_spent", "no", "must be true or false"),
    ("budget_spent", 0, "must be true or false"),
    ("date", 5, "must be a string"),
    ("machine", "x", "must be a record"),
    ("versions", [1], "must be a record"),
    ("best", "x", "must be a record, or null"),
    ("default", 3, "must be a record, or null"),
    ("goal", None, "must be a record of 'rate' and 'p99_ms'"),
    ("goal", {"rate": 300.0}, "must be a record of 'rate' and 'p99_ms'"),
    ("goal", {"rate": None, "p99_ms": None}, "must give 'rate', 'p99_ms' or both"),
    ("goal", {"rate": -1, "p99_ms": None}, "its 'rate' must be a finite number > 0, or null"),
    ("goal", {"rate": 300.0, "p99_ms": "5"}, "its 'p99_ms' must be a finite number > 0"),
])
def test_a_saved_summary_field_of_the_wrong_type_is_refused(tmp_path, saved, name, value,
                                                            said) -> None:
    doc = copy.deepcopy(saved[1])
    doc[name] = value
    path = _written(tmp_path, doc)
    with pytest.raises(BenchError) as refused:
        ResultsFile(str(path), doc["identity"])
    # (A record is shown with its keys sorted.)
    assert str(refused.value).startswith(f"--json {path}: damaged: the file has {name!r} = ")
    assert f": {said}" in str(refused.value)


@pytest.mark.parametrize(("name", "value"), [
    ("interrupted", True), ("interrupted", False), ("budget_spent", True),
    ("best", None), ("default", None), ("goal", {"rate": None, "p99_ms": 5}),
    ("goal", {"rate": 300, "p99_ms": 5.0}),
])
def test_a_saved_summary_field_of_its_type_is_taken(tmp_path, saved, name, value) -> None:
    doc = copy.deepcopy(saved[1])
    doc[name] = value
    assert ResultsFile(str(_written(tmp_path, doc)), doc["identity"]).runs


def test_the_command_refuses_an_impossible_capacity_on_one_line(tmp_path, capsys,
                                                                saved) -> None:
    argv, doc = saved[0], copy.deepcopy(saved[1])
    doc["capacity"] = 1e300
    path = _written(tmp_path, doc)
    argv = [a for a in argv[:-1] if a not in ("--rate", "300")]
    code, out, err = run_cli(capsys, *argv, str(path), "--p99-ms", "5", "--budget", "12")
    assert code == 2 and out == "", out
    assert err == (f"batchproc tune: error: --json {path}: damaged: the file has 'capacity' "
                   "= 1e+300: no capacity run of 0.15 s measures it; give another file to "
                   "start afresh\n")


def _written(tmp_path: Any, doc: dict[str, Any]) -> Any:
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("name", [*FIGURES, *COUNTS, "key", "label", "candidate", "offered",
                                  "first_error", "failed", "first_model_error"])
def test_a_saved_run_lacking_a_field_is_refused_naming_it(tmp_path, saved, name) -> None:
    doc = copy.deepcopy(saved[1])
    i, run = _first_run(doc, FIXED_KEY)
    del run[name]
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BenchError, match=f"damaged: run {i} lacks {name!r}; give another"):
        ResultsFile(str(path), doc["identity"])


def test_the_saved_format_is_what_the_search_writes(saved) -> None:
    # Every field of every run the search wrote is checked on reading, and no more.
    for run in saved[1]["runs"]:
        assert set(_SAVED_LATER_FIELDS) <= set(run)
        assert (set(run) - set(_SAVED_RERUN_FIELDS) - set(_SAVED_LATER_FIELDS)
                == set(_SAVED_RUN_FIELDS))


def test_a_file_saved_before_started_beside_was_recorded_is_read(tmp_path, saved) -> None:
    doc = copy.deepcopy(saved[1])
    for run in doc["runs"]:
        del run["started_beside"]
    assert ResultsFile(str(_written(tmp_path, doc)), doc["identity"]).runs


@pytest.mark.parametrize("value", [-1, "2", 1.5, None])
def test_a_saved_started_beside_that_is_not_a_count_is_refused(tmp_path, saved, value) -> None:
    doc = copy.deepcopy(saved[1])
    i, run = _first_run(doc, FIXED_KEY)
    run["started_beside"] = value
    with pytest.raises(BenchError, match=f"damaged: run {i} has 'started_beside'"):
        ResultsFile(str(_written(tmp_path, doc)), doc["identity"])


# (field of the candidate, value, what the message says): the rules of a configuration.
BAD_CANDIDATES = [
    ("delay_ms", "1", "delay_ms must be a real number"),
    ("delay_ms", True, "delay_ms must be a real number"),
    ("delay_ms", -1.0, "delay_ms must be >= 0.0, got -1.0"),
    ("delay_ms", NAN, "delay_ms must be a finite number, got nan"),
    ("delay_ms", INF, "delay_ms must be a finite number, got inf"),
    ("delay_ms", None, "max_batch_size=4, max_workers=1 without delay_ms: a candidate sets "
     "all of max_batch_size, delay_ms, max_workers, or none of them (the default)"),
    ("max_batch_size", "8", "max_batch_size must be an integer"),
    ("max_batch_size", -8, "max_batch_size must be >= 1, got -8"),
    ("max_batch_size", 0, "max_batch_size must be >= 1, got 0"),
    ("max_batch_size", 4.5, "max_batch_size must be an integer"),
    ("max_batch_size", 4.0, "max_batch_size must be an integer"),
    ("max_batch_size", True, "max_batch_size must be an integer"),
    ("max_batch_size", None, "delay_ms=1.0, max_workers=1 without max_batch_size"),
    ("max_workers", "1", "max_workers must be an integer"),
    ("max_workers", 0, "max_workers must be >= 1, got 0"),
    ("max_workers", False, "max_workers must be an integer"),
    ("max_workers", 10**6, "max_workers must be <= "),
    ("strategy", "nope", "strategy must be one of 'fixed', 'adaptive', 'greedy', got 'nope'"),
    ("strategy", "FIXED", "strategy must be one of 'fixed', 'adaptive', 'greedy', got 'FIXED'"),
    ("strategy", None, "strategy must be one of"),
    ("strategy", 1, "strategy must be one of"),
]


@pytest.mark.parametrize(("name", "value", "said"), BAD_CANDIDATES)
def test_a_saved_candidate_that_is_no_configuration_is_refused(tmp_path, saved, name,
                                                                 value, said) -> None:
    doc = copy.deepcopy(saved[1])
    i, run = _first_run(doc, FIXED_KEY)
    run["candidate"][name] = value
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BenchError) as refused:
        ResultsFile(str(path), doc["identity"])
    assert f"damaged: run {i} has a 'candidate' that is no configuration: {said}" in str(
        refused.value)
    # The same rules as a candidate built by the search.
    with pytest.raises(ValueError, match=re.escape(said)):
        Candidate(**run["candidate"])


@pytest.mark.parametrize(("damage", "said"), [
    (lambda c: c.pop("strategy"), "a 'candidate' that lacks 'strategy'"),
    (lambda c: c.pop("max_workers"), "a 'candidate' that lacks 'max_workers'"),
    (lambda c: c.update(colour="red"), "a 'candidate' with 'colour', a field this version "
     "does not know"),
    (lambda c: c.update(max_batch_size=8), "'key' = 'fixed/size=4/delay_ms=1/workers=1': "
     "its candidate's is 'fixed/size=8/delay_ms=1/workers=1'"),
    (lambda c: c.update(strategy="greedy"), "'key' = 'fixed/size=4/delay_ms=1/workers=1': "
     "its candidate's is 'greedy/size=4/delay_ms=1/workers=1'"),
])
def test_a_saved_candidate_not_of_its_run_is_refused(tmp_path, saved, damage, said) -> None:
    doc = copy.deepcopy(saved[1])
    i, run = _first_run(doc, FIXED_KEY)
    damage(run["candidate"])
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BenchError, match=re.escape(f"damaged: run {i} has {said}")):
        ResultsFile(str(path), doc["identity"])


@pytest.mark.parametrize("label", ["FIXED 8 rows, 1 ms, 1 worker", "", "default"])
def test_a_saved_label_not_of_its_candidate_is_refused(tmp_path, saved, label) -> None:
    # The label is what the tables show for the run: an edited one would put another
    # configuration's name on its figures.
    doc = copy.deepcopy(saved[1])
    i, run = _first_run(doc, FIXED_KEY)
    own = run["label"]
    run["label"] = label
    said = f"'label' = {label!r}: its candidate's is {own!r}"
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BenchError, match=re.escape(f"damaged: run {i} has {said}")):
        ResultsFile(str(path), doc["identity"])


@pytest.mark.parametrize(("name", "value", "said"), [
    ("strategy", "fixed", "the default (no max_batch_size, delay_ms, max_workers) is "
     "'adaptive', got strategy 'fixed'"),
    ("max_batch_size", "x", "max_batch_size='x' without delay_ms, max_workers: a "
     "candidate sets all"),
])
def test_the_default_candidate_is_adaptive_with_nothing_set(tmp_path, saved, name, value,
                                                            said) -> None:
    doc = copy.deepcopy(saved[1])
    i, run = _first_run(doc, "default")
    run["candidate"][name] = value
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BenchError, match=re.escape(
            f"run {i} has a 'candidate' that is no configuration: {said}")):
        ResultsFile(str(path), doc["identity"])


def _set(name: str, value: Any) -> Any:
    return lambda doc: doc.update({name: value})


@pytest.mark.parametrize(("damage", "said"), [
    (lambda doc: doc.clear(), "not a file written by batchproc tune (it has no 'kind')"),
    (_set("kind", "bench"), "not a file written by batchproc tune (its 'kind' is 'bench', "
     "not 'batchproc tune results')"),
    (lambda doc: doc.pop("version"), "damaged: the file lacks 'version'"),
    (_set("version", 1), "written by another version of batchproc tune (its 'version' is "
     "1; this one reads 2)"),
    (_set("version", "2"), "(its 'version' is '2'; this one reads 2)"),
    (_set("version", True), "(its 'version' is True; this one reads 2)"),
    (_set("version", 2.0), "(its 'version' is 2.0; this one reads 2)"),
    (lambda doc: doc.pop("identity"), "damaged: the file lacks 'identity'"),
    (_set("identity", [1]), "damaged: the file has 'identity' = [1]: must be a record"),
    (_set("identity", "x"), "damaged: the file has 'identity' = 'x': must be a record"),
    (_set("identity", None), "damaged: the file has 'identity' = None: must be a record"),
    (lambda doc: doc["identity"].pop("seed"), "damaged: 'identity' lacks 'seed'"),
    (lambda doc: doc["identity"].update(seed=1), "holds runs of other settings (seed)"),
    (lambda doc: doc["identity"].update(seed="0"), "holds runs of other settings (seed)"),
    # Equal in Python (False == 0 == 0.0), not what the search wrote.
    (lambda doc: doc["identity"].update(seed=False), "holds runs of other settings (seed)"),
    (lambda doc: doc["identity"].update(seed=0.0), "holds runs of other settings (seed)"),
    (lambda doc: doc["identity"].update(colour=1), "holds runs of other settings (colour)"),
    (lambda doc: doc.pop("capacity"), "damaged: the file lacks 'capacity'"),
    *[(_set("capacity", v), f"damaged: the file has 'capacity' = {v!r}: must be a finite "
       "number > 0, or null") for v in (0, -1.0, NAN, INF, "5", True, [5])],
    (lambda doc: doc.pop("runs"), "damaged: the file lacks 'runs'"),
    (_set("runs", "many"), "damaged: the file has 'runs' = 'many': must be a list"),
    (_set("runs", {}), "damaged: the file has 'runs' = {}: must be a list"),
    (_set("runs", [1]), "damaged: run 0 is not a record: 1"),
    (lambda doc: doc["runs"].append([]), "is not a record: []"),
    (_set("capacity", 10**400), "damaged: the file has 'capacity' = "),
    (lambda doc: doc["runs"].append(copy.deepcopy(doc["runs"][1])),
     "is run 1 again (the same configuration, load and repeat)"),
])
def test_a_damaged_results_file_is_refused_naming_the_field(tmp_path, saved, damage,
                                                             said) -> None:
    doc = copy.deepcopy(saved[1])
    damage(doc)
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BenchError) as refused:
        ResultsFile(str(path), saved[1]["identity"])
    assert str(refused.value).startswith(f"--json {path}: ") and said in str(refused.value)


@pytest.mark.parametrize("name", [*FIGURES, "offered"])
def test_a_saved_figure_past_a_float_s_range_is_refused(tmp_path, saved, name) -> None:
    # JSON's integers are unbounded; 10**400 is no figure (float() overflows on it).
    doc = copy.deepcopy(saved[1])
    i, run = _first_run(doc, FIXED_KEY)
    run[name] = 10**400
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BenchError, match=f"damaged: run {i} has {name!r} = 1000"):
        ResultsFile(str(path), doc["identity"])


def test_a_results_file_nested_too_deep_to_read_is_refused(tmp_path, saved) -> None:
    path = tmp_path / "tune.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(BenchError, match=f"--json {re.escape(str(path))}: cannot read it "
                       "to resume"):
        ResultsFile(str(path), saved[1]["identity"])


def test_a_results_file_that_is_not_a_record_is_refused(tmp_path, saved) -> None:
    path = tmp_path / "tune.json"
    path.write_text("[1, 2]")
    with pytest.raises(BenchError, match=re.escape(
            "not a file written by batchproc tune (it holds [1, 2], not a record)")):
        ResultsFile(str(path), saved[1]["identity"])


@pytest.mark.parametrize(("damage", "said"), [
    (lambda doc: doc.update(identity=[1]), "the file has 'identity' = [1]"),
    (lambda doc: doc["runs"][0].update(p99_ms=-1), "run 0 has 'p99_ms' = -1"),
    (lambda doc: doc["runs"][0]["candidate"].update(strategy="nope"), "strategy must be"),
    (lambda doc: _first_run(doc, FIXED_KEY)[1]["candidate"].update(delay_ms="1"),
     "delay_ms must be"),
])
def test_the_command_refuses_a_damaged_file_on_one_line_before_any_run(
        tmp_path, capsys, saved, damage, said) -> None:
    argv, doc = saved[0], copy.deepcopy(saved[1])
    damage(doc)
    path = tmp_path / "tune.json"
    text = json.dumps(doc, allow_nan=True)
    path.write_text(text)
    code, out, err = run_cli(capsys, *argv[:-1], str(path))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"batchproc tune: error: --json {path}: ") and said in err
    assert path.read_text() == text  # nothing ran: the file was not written again


def test_a_saved_file_with_its_neighbouring_good_values_resumes(tmp_path, capsys,
                                                                saved) -> None:
    argv, doc = saved[0], copy.deepcopy(saved[1])
    _, run = _first_run(doc, FIXED_KEY)
    # What a run may hold: figures of 0 or null (a run that failed outright completes
    # nothing and has none), whole numbers as ints, an offered load as an int, notes.
    run.update(offered=300, p50_ms=0, errors=0, first_error="x", failed=None)
    _, default = _first_run(doc, "default")
    default.update(completed=0, throughput=None, mean_batch=None, elapsed_s=None,
                   failed="RuntimeError: no", p99_ms=None, p50_ms=None, p95_ms=None,
                   mean_ms=None, arrival_rate=None)
    doc["capacity"] = 1234.5
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(doc))
    results = ResultsFile(str(path), doc["identity"])
    assert results.capacity == 1234.5 and results.saved_runs == len(doc["runs"])
    assert results.get(FIXED_KEY, 300.0) is not None
    code, out, err = run_cli(capsys, *argv[:-1], str(path))
    assert code in (0, 1), err
    assert f"runs: 0 measured now, {len(doc['runs'])} reused" in out


def test_a_completed_run_has_its_figures(tmp_path, saved) -> None:
    for name in ("throughput", "mean_batch", "arrival_rate", "p50_ms", "p95_ms", "p99_ms",
                 "mean_ms", "elapsed_s"):
        doc = copy.deepcopy(saved[1])
        i, run = _first_run(doc, FIXED_KEY)
        run[name] = None
        path = tmp_path / "tune.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(BenchError, match=re.escape(
                f"run {i} has {name!r} = None: must be a number, as it completed "
                f"{run['completed']} requests")):
            ResultsFile(str(path), doc["identity"])


# A run of 0.15 s is counted as 1.15 s (with its drain and stop), and a third of the
# budget is kept for confirming finalists: 1.8 s is the least with room for one run.
TOO_SMALL = ("is too small for one run: a run is counted as 1.15 s (--duration, its drain "
             "and stop) and up to a third of the budget is kept for rerunning the finalists; give "
             "--budget 1.8 or more (about 8.7 s measures each of the 5 configurations once)")


@pytest.mark.parametrize("budget", ["0.001", "1", "1.7"])
def test_a_budget_too_small_for_one_run_is_refused_before_any_run(tmp_path, capsys,
                                                                  budget) -> None:
    path = tmp_path / "tune.json"
    code, out, err = run_cli(capsys, *FAST, *SPACE, "--rate", "300", "--budget", budget,
                             "--json", str(path))
    assert code == 2 and out == ""
    assert err == f"batchproc tune: error: --budget {budget} s {TOO_SMALL}\n"
    assert not path.exists()  # nothing ran, nothing was written


NO_MODULE = ("batchproc tune: error: --model 'no_such_module_xyz:predict': cannot import "
             "'no_such_module_xyz': ModuleNotFoundError: No module named 'no_such_module_xyz'\n")
TOO_LARGE = ("batchproc tune: error: --sizes 100000: a full batch of 100,000 rows of 391 KiB "
             "would take 37.3 GiB, over the limit of 4 GiB: lower --sizes or the size of a "
             "request\n")


@pytest.mark.parametrize("budget", ["1", "3", "30"])
@pytest.mark.parametrize("goal", [["--rate", "300"], ["--p99-ms", "5"]])
@pytest.mark.parametrize(("argv", "said"), [
    (["--model", "no_such_module_xyz:predict", *SPACE], NO_MODULE),
    (["--model", "identity", "--sizes", "100000", "--input", "float32:1x100000"], TOO_LARGE),
])
def test_the_model_and_inputs_are_refused_before_the_budget(capsys, argv, said, goal,
                                                            budget) -> None:
    # What is wrong with them is what to fix first, whatever the budget: a larger one
    # would only be refused for them next.
    started = time.monotonic()
    code, out, err = run_cli(capsys, *argv, *goal, "--duration", "0.15", "--quiet",
                             "--budget", budget)
    assert code == 2 and out == ""
    assert err == said
    assert time.monotonic() - started < 5  # nothing ran


def test_a_budget_too_small_for_a_good_model_is_refused_once_it_is_checked(capsys) -> None:
    code, out, err = run_cli(capsys, *FAST, *SPACE, "--p99-ms", "5", "--budget", "3")
    assert code == 2 and out == ""
    assert err.startswith("batchproc tune: error: --budget 3 s is too small for one run "
                          "(an SLO alone measures the capacity first)")


def test_the_least_budget_measures_one_run_then_a_rerun_continues(tmp_path, capsys) -> None:
    path = tmp_path / "tune.json"
    code, out, err = run_cli(capsys, *FAST, *SPACE, "--rate", "300", "--budget", "1.8",
                             "--json", str(path))
    assert code in (0, 1), err  # whether the default meets the goal is the machine's
    assert "0 reused" in out and "0 of 5 configurations done" not in out
    assert "1 of 5 configurations done (budget spent: rerun with the same --json to " in out
    assert "could be measured" not in out
    doc = json.loads(path.read_text())
    assert doc["budget_spent"] is True
    assert {r["key"] for r in doc["runs"]} == {"default"}
    code, out, err = run_cli(capsys, *FAST, *SPACE, "--rate", "300", "--json", str(path))
    assert code == 0, err
    assert "5 of 5 configurations done" in out and "budget spent" not in out


def test_a_results_file_with_the_first_run_is_shown_whatever_the_budget(tmp_path,
                                                                        capsys) -> None:
    path = tmp_path / "tune.json"
    assert run_cli(capsys, *FAST, *SPACE, "--rate", "300", "--budget", "1.8", "--json",
                   str(path))[0] in (0, 1)
    code, out, err = run_cli(capsys, *FAST, *SPACE, "--rate", "300", "--budget", "0.001",
                             "--json", str(path))
    assert code in (0, 1) and err == ""
    assert "runs: 0 measured now" in out and "reused" in out and "budget spent" in out


def test_least_budget_has_room_for_the_first_run_and_counts_a_capacity_run() -> None:
    assert least_budget(Goal(rate=300.0), 0.15) == (1.8, 1.8)
    assert least_budget(Goal(p99_ms=50.0), 0.15) == (3.5, 3.5)  # the capacity run first
    assert least_budget(Goal(p99_ms=50.0), 0.15, capacity_known=True) == (1.8, 1.8)
    assert least_budget(Goal(rate=300.0), 0.15, configurations=5)[1] == 8.7
    # Past three times the finalists' reruns, the time kept is theirs, not a third: 136
    # runs of 2.5 s and 8 reruns take 360 s, not 340 / (2/3).
    assert least_budget(Goal(rate=300.0), 1.0, configurations=136)[1] == 361.0
    # A run of 0.75 s is counted as 2 s: exactly 3 s would leave the search no time to
    # start its run; whole seconds from 10 s.
    assert least_budget(Goal(rate=300.0), 0.75)[0] == 3.1
    assert least_budget(Goal(rate=300.0), 10.0)[0] == 31.0
    for duration in (0.15, 0.75, 1.0, 10.0):
        least = least_budget(Goal(rate=300.0), duration)[0]
        assert least * (1 - CONFIRM_SHARE) > run_bound_s(duration)


def test_ragged_requests_print_a_config_with_padding(capsys) -> None:
    code, out, err = run_cli(capsys, *FAST, "--sizes", "4", "--delays-ms", "1", "--workers",
                             "1", "--strategies", "greedy", "--rate", "200",
                             "--input", "int64:1x2..6")
    assert code == 0, err
    assert config_of(out).pad_value == 0


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        ([], "give a target load (--rate R), an SLO (--p99-ms MS), or both"),
        (["--rate", "0"], "--rate"),
        (["--p99-ms", "-1"], "--p99-ms"),
        (["--rate", "10", "--sizes", "8,x"], "--sizes"),
        (["--rate", "10", "--strategies", "fastest"], "one of 'fixed', 'adaptive', 'greedy'"),
        (["--rate", "10", "--workers", "1,100000"], "the search space holds what is no "
         "configuration: max_workers must be <= "),
        (["--rate", "10", "--budget", "0"], "--budget"),
        (["--rate", "10", "--input", "float32:1x"], "--input"),
        (["--rate", "10", "--json", "/nonexistent-dir/t.json"], "/nonexistent-dir"),
    ],
)
def test_bad_tune_flags_are_one_line(capsys, argv: list[str], mentions: str) -> None:
    code, out, err = run_cli(capsys, *FAST, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and mentions in err, err


def test_candidates_cover_the_grid_once_greedy_without_delays() -> None:
    space = candidates([8, 16], [1.0, 5.0], [1, 2], ["adaptive", "fixed", "greedy"], seed=3)
    assert len(space) == 2 * 2 * 2 * 2 + 2 * 2
    assert len({c.key for c in space}) == len(space)
    assert space == candidates([8, 16], [1.0, 5.0], [1, 2],
                               ["adaptive", "fixed", "greedy"], seed=3)
    fields = Candidate("fixed", 16, 2.0, 2).fields()
    assert fields == {"max_batch_size": 16, "initial_batch_size": 16, "batch_timeout": 0.002,
                      "max_workers": 2, "processing_strategy": BatchProcessingStrategy.FIXED}
    assert DEFAULT.fields() == {} and DEFAULT.key == "default"


class FakeTuner(Tuner):
    """Synthetic runs: a candidate keeps p99 under 10 ms up to the load it can carry."""

    def __init__(self, carries: dict[str, float], capacity: float = 1000.0,
                 runs: int | None = None) -> None:
        results = ResultsFile(None, {})
        results.capacity = capacity
        space = [c for c in candidates([8, 16, 32], [1.0], [1], ["fixed"]) if c.key in carries]
        super().__init__(identity, "identity", FeatureRows(4), Goal(p99_ms=10.0), space,
                         duration=1.0, budget=1e9, results=results)
        self.carries = carries
        self.calls: list[tuple[str, float]] = []
        self.reruns: list[tuple[str, float]] = []
        self.runs_left = runs  # None: no budget; else the runs the budget has room for

    def measure(self, c: Candidate, offered: float, repeat: int = 0
                ) -> dict[str, Any] | None:
        if self.runs_left is not None:
            if self.runs_left == 0:
                return None
            self.runs_left -= 1
        (self.reruns if repeat else self.calls).append((c.key, offered))
        ok = offered <= self.carries[c.key]
        record = {"key": c.key, "label": c.label, "candidate": vars(c), "offered": offered,
                  "throughput": offered, "p50_ms": 1.0, "p99_ms": 5.0 if ok else 50.0,
                  "mean_batch": 1.0, "completed": 10, "errors": 0, "unfinished": 0,
                  "repeat": repeat}
        self.records.append(record)
        return record


def test_the_slo_search_climbs_the_ladder_and_prunes() -> None:
    small, mid, big = (c.key for c in candidates([8, 16, 32], [1.0], [1], ["fixed"]))
    tuner = FakeTuner({"default": 450.0, small: 100.0, mid: 1000.0, big: 450.0})
    result = tuner.run()
    assert result.best is not None and result.best["offered"] == 1000.0
    assert result.best["key"] == mid
    assert result.default is not None and result.default["offered"] == 400.0
    by_key: dict[str, list[float]] = {}
    for key, offered in tuner.calls:
        by_key.setdefault(key, []).append(offered)
    # The default climbs from the bottom; the others start where the best so far is, so
    # one that cannot carry that load costs one run.
    assert by_key["default"] == pytest.approx([1000.0 * ladder_fraction(s) for s in range(6)])
    assert len(by_key[small]) == 1 and by_key[small][0] in (400.0, 1000.0)
    assert len(by_key[big]) <= 2
    assert by_key[mid][-1] == pytest.approx(1000.0 * ladder_fraction(11))  # first miss


def _cut_after(carries: dict[str, float], key: str, offered: float) -> FakeTuner:
    """A search whose budget ends right after ``key``'s run at ``offered``."""
    full = FakeTuner(carries)
    full.run()
    runs = full.calls.index((key, pytest.approx(offered))) + 1
    tuner = FakeTuner(carries, runs=runs)
    tuner.result = tuner.run()  # type: ignore[attr-defined]
    assert tuner.calls == full.calls[:runs]
    return tuner


def _printed(result: Any, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """The output of ``print_result`` and its table's first row (found by its label)."""
    print_result("tune", result)
    out = capsys.readouterr().out
    labels = [r["label"] for r in result.records]
    top = next(line for line in out.splitlines() if any(lbl in line for lbl in labels))
    return out, top


def test_a_climb_cut_short_that_beats_the_best_is_the_best(capsys) -> None:
    small, mid, big = (c.key for c in candidates([8, 16, 32], [1.0], [1], ["fixed"]))
    carries = {"default": 450.0, small: 100.0, mid: 1000.0, big: 450.0}
    tuner = _cut_after(carries, mid, 600.0)  # past the default's 400, still climbing
    result = tuner.result  # type: ignore[attr-defined]
    assert result.budget_spent and result.cut_short == mid
    # It met the SLO at 600 req/s, more than any finished one: the best, whatever more
    # it would have carried.
    assert result.best["key"] == mid and result.best["offered"] == pytest.approx(600.0)
    out, top = _printed(result, capsys)
    label = result.best["label"]
    assert f"{label} (cut short)" in top
    assert f"best: {label} (cut short): " in out
    assert "(cut short): the budget ended its climb" in out
    # The default and the first finished; the cut one is counted apart.
    assert "2 of 4 configurations done (and 1 cut short) (budget spent" in out
    assert config_of(out).max_batch_size == Candidate(**result.best["candidate"]).max_batch_size


def test_a_climb_cut_short_below_the_best_is_marked_and_ranked_below(capsys) -> None:
    small, mid, big = (c.key for c in candidates([8, 16, 32], [1.0], [1], ["fixed"]))
    carries = {"default": 450.0, small: 100.0, mid: 1000.0, big: 450.0}
    tuner = _cut_after(carries, mid, 400.0)  # its first run: the default's load, no more
    result = tuner.result  # type: ignore[attr-defined]
    assert result.cut_short == mid and result.best["key"] == "default"
    out, top = _printed(result, capsys)
    assert "default (ADAPTIVE)" in top and "(cut short)" not in top
    cut = next(line for line in out.splitlines() if "(cut short)" in line)
    assert Candidate(**result.records[-1]["candidate"]).label in cut
    assert "best: default (ADAPTIVE): " in out
    assert "the default is the best configuration tried" in out


def test_a_budget_that_ends_before_any_configuration_says_only_the_default_ran(capsys) -> None:
    small, mid, big = (c.key for c in candidates([8, 16, 32], [1.0], [1], ["fixed"]))
    carries = {"default": 450.0, small: 1000.0, mid: 1000.0, big: 450.0}
    full = FakeTuner(carries)
    full.run()
    default_runs = sum(1 for key, _ in full.calls if key == "default")
    result = FakeTuner(carries, runs=default_runs).run()  # none left for the search
    assert result.budget_spent and result.best["key"] == "default"
    out, _ = _printed(result, capsys)
    assert "best: default (ADAPTIVE): " in out
    assert ("only the default was measured: the budget ended before the search's first "
            "run (pass --json FILE to keep the results and continue in a later run)" in out)
    assert "the default is the best configuration tried" not in out
    # One run more: the first configuration was measured (cut short), tying the default.
    result = FakeTuner(carries, runs=default_runs + 1).run()
    assert result.cut_short == small and result.best["key"] == "default"
    out, _ = _printed(result, capsys)
    assert "the default is the best configuration tried" in out
    assert "only the default was measured" not in out


def test_the_default_config_is_printed_with_the_imports_it_uses(capsys) -> None:
    result = FakeTuner({"default": 450.0}).run()
    assert result.best is not None and result.best["key"] == "default"
    out, _ = _printed(result, capsys)
    code = out[out.index("from batchproc import"):]
    assert code == "from batchproc import BatchProcessorConfig\n\nconfig = BatchProcessorConfig()\n"
    assert config_of(out) == BatchProcessorConfig()
    assert format_config({"pad_value": 0}).splitlines()[0] == (
        "from batchproc import BatchProcessorConfig")
    assert format_config({"processing_strategy": "greedy"}).splitlines()[0] == (
        "from batchproc import BatchProcessingStrategy, BatchProcessorConfig")


def test_goal_needs_the_load_carried_and_the_slo() -> None:
    run = {"offered": 100.0, "throughput": 95.0, "p99_ms": 8.0, "errors": 0,
           "unfinished": 0, "completed": 95}
    assert Goal(rate=100.0).meets(run)
    assert Goal(rate=100.0, p99_ms=10.0).meets(run)
    assert not Goal(rate=100.0, p99_ms=5.0).meets(run)
    assert not Goal(rate=100.0).meets({**run, "throughput": 80.0})
    assert not Goal(rate=100.0).meets({**run, "errors": 1})
    # It shared the machine with calls an earlier run left running: not a fair reading.
    assert not Goal(rate=100.0).meets({**run, "started_beside": 3})
    with pytest.raises(BenchError):
        Goal()


def test_an_slo_search_too_small_for_the_capacity_run_and_one_more_is_refused(
        capsys) -> None:
    code, out, err = run_cli(capsys, *FAST, *SPACE, "--p99-ms", "50", "--budget", "3.4")
    assert code == 2 and out == ""
    assert err == (
        "batchproc tune: error: --budget 3.4 s is too small for one run (an SLO alone "
        "measures the capacity first): a run is counted as 1.15 s (--duration, its drain "
        "and stop) and up to a third of the budget is kept for rerunning the finalists; give "
        "--budget 3.5 or more (about 11 s measures each of the 5 configurations once)\n")


def test_a_search_that_could_measure_nothing_says_what_budget_would(capsys) -> None:
    # A capacity run that took longer than its bound leaves the search no room: the
    # verdict is not that nothing meets the goal, but what budget measures something.
    now = [0.0]
    tuner = Tuner(identity, "identity", FeatureRows(4), Goal(p99_ms=50.0),
                  candidates([4, 8], [1.0], [1], ["adaptive", "fixed"]), duration=0.15,
                  budget=3.5, results=ResultsFile(None, {}), clock=lambda: now[0])

    def slow_capacity() -> None:
        now[0] += 2.0
        tuner.capacity = 1000.0

    tuner._measure_capacity = slow_capacity  # type: ignore[method-assign]
    result = tuner.run()
    assert result.records == [] and result.budget_spent
    print_result("tune", result)
    out = capsys.readouterr().out
    assert "no configuration tried meets the goal" not in out
    assert out.strip().endswith(
        "no configuration could be measured within the budget (--budget 3.5 s): one run "
        "is counted as 1.15 s (--duration, its drain and stop); give --budget 3.5 or more "
        "to measure one configuration (about 11 s to measure each of the 5 once)")


def test_a_search_that_measured_and_found_nothing_says_so(capsys) -> None:
    # Runs were measured (the budget had room), none met the goal: the other verdict.
    code, out, err = run_cli(capsys, *FAST, "--sizes", "4", "--delays-ms", "1",
                             "--workers", "1", "--strategies", "fixed", "--rate", "300",
                             "--p99-ms", "0.000001")
    assert code == 1, err
    assert "runs: 2 measured now" in out
    assert out.strip().endswith("no configuration tried meets the goal "
                                "(carry 300 req/s offered (Poisson), p99 <= 1e-06 ms)")
    assert "could be measured" not in out


def test_reused_runs_are_not_nothing_measured(tmp_path, capsys) -> None:
    path = tmp_path / "tune.json"
    argv = [*FAST, "--sizes", "4", "--delays-ms", "1", "--workers", "1", "--strategies",
            "fixed", "--rate", "300", "--p99-ms", "0.000001", "--json", str(path)]
    assert run_cli(capsys, *argv)[0] == 1
    code, out, _ = run_cli(capsys, *argv, "--budget", "0.001")
    assert code == 1
    assert "runs: 0 measured now, 2 reused" in out
    assert "no configuration tried meets the goal" in out and "could be measured" not in out


class NoisyTuner(Tuner):
    """Synthetic runs at a target load: each configuration's p99 per run, in order."""

    def __init__(self, p99s: dict[str, list[float]], budget: float = 1e9) -> None:
        space = [c for c in candidates([8, 16, 32], [1.0], [1], ["fixed"]) if c.key in p99s]
        super().__init__(identity, "identity", FeatureRows(4), Goal(rate=100.0, p99_ms=20.0),
                         space, duration=1.0, budget=budget, results=ResultsFile(None, {}))
        self.p99s = p99s
        self.reruns: list[tuple[str, int]] = []

    def measure(self, c: Candidate, offered: float, repeat: int = 0
                ) -> dict[str, Any] | None:
        if repeat:
            self.reruns.append((c.key, repeat))
        record = {"key": c.key, "label": c.label, "candidate": vars(c), "offered": offered,
                  "throughput": offered, "p50_ms": 1.0, "p99_ms": self.p99s[c.key][repeat],
                  "mean_batch": 1.0, "completed": 10, "errors": 0, "unfinished": 0,
                  "repeat": repeat}
        self.records.append(record)
        return record


def test_finalists_are_rerun_and_the_verdict_is_on_medians(capsys) -> None:
    small, mid, big = (c.key for c in candidates([8, 16, 32], [1.0], [1], ["fixed"]))
    # `small` was lucky once (2 ms), then 18 and 19 ms; `mid` holds 10-11 ms; `big` misses
    # the SLO; the default meets it at 15 ms.
    p99s = {"default": [15.0, 15.0, 16.0], small: [2.0, 18.0, 19.0],
            mid: [11.0, 10.0, 10.5], big: [30.0, 9.0, 9.0]}
    result = NoisyTuner(p99s).run()
    assert result.best is not None and result.best["key"] == mid
    assert result.best["p99_ms"] == 10.5 and result.best["runs"] == 3
    assert result.confirmed[small]["p99_ms"] == 18.0
    assert result.default is not None and result.default["p99_ms"] == 15.0
    # Finalists: those meeting the goal (big's single run missed), the default among them.
    assert set(result.confirmed) == {"default", small, mid}
    out, top = _printed(result, capsys)
    assert mid.split("/")[0].upper() in top.upper() and "(median of 3)" in top
    assert "3 finalists (the best that met the goal, at most 3, and the default)" in out
    assert "default (ADAPTIVE): p50 1.00 ms, p99 15.0 ms" in out


def test_a_finalist_whose_median_misses_the_slo_is_not_the_best() -> None:
    small, mid, _ = (c.key for c in candidates([8, 16, 32], [1.0], [1], ["fixed"]))
    p99s = {"default": [25.0, 25.0, 25.0], small: [2.0, 38.0, 40.0], mid: [12.0, 11.0, 13.0]}
    result = NoisyTuner(p99s).run()
    assert result.best is not None and result.best["key"] == mid


def test_worst_case_runs_and_their_confirmation_stay_within_the_budget(monkeypatch) -> None:
    # Every run takes its bound (duration, a full drain, the stop): the search, then its
    # confirming reruns, still end within the budget.
    from batchproc.bench import tune
    from batchproc.bench.runner import RunResult

    now = [0.0]

    def run_target(target, model, name, load, bounds, progress, label=None):
        now[0] += bounds.duration + drain_window(bounds.duration) + STOP_TIMEOUT_S
        return RunResult(system=target.name, model=name, load=load.label, throughput=load.rate,
                         p50_ms=1.0, p95_ms=2.0, p99_ms=3.0, mean_ms=1.0, mean_batch=1.0,
                         batches=1, submitted=10, completed=10, errors=0, elapsed_s=1.0,
                         stopped_by="duration")

    monkeypatch.setattr(tune, "run_target", run_target)
    space = candidates([8, 16, 32, 64], [1.0, 2.0], [1, 2], ["fixed"])
    for budget in (3.0, 4.0, 9.0, 30.0, 60.0):
        now[0] = 0.0
        tuner = Tuner(identity, "identity", FeatureRows(4), Goal(rate=100.0), space,
                      duration=1.0, budget=budget, results=ResultsFile(None, {}),
                      clock=lambda: now[0])
        result = tuner.run()
        assert now[0] <= budget, budget
        if budget >= 30.0:  # room for the search and its finalists' reruns
            assert result.confirmed and result.best is not None
            assert result.best["runs"] == 3


def test_a_search_keeps_time_for_the_finalists_it_found_not_for_those_it_might_have(
        monkeypatch) -> None:
    # Only the default meets the goal: the search keeps time for its reruns and those of
    # one more finalist (its next run may meet the goal), not for three more.
    from batchproc.bench import tune
    from batchproc.bench.runner import RunResult

    now = [0.0]
    bound = run_bound_s(1.0)  # every run takes its bound: 2.5 s
    search_runs = []

    def run_target(target, model, name, load, bounds, progress, label=None):
        if "rerun" not in (label or ""):
            search_runs.append(target.name)
        now[0] += bound
        p99 = 30.0 if "FIXED" in target.name else 3.0
        return RunResult(system=target.name, model=name, load=load.label, throughput=load.rate,
                         p50_ms=1.0, p95_ms=2.0, p99_ms=p99, mean_ms=1.0, mean_batch=1.0,
                         batches=1, submitted=10, completed=10, errors=0, elapsed_s=1.0,
                         stopped_by="duration")

    monkeypatch.setattr(tune, "run_target", run_target)
    space = candidates([4, 8, 16, 32, 64], [0.0, 1.0, 2.0, 5.0, 10.0], [1, 2], ["fixed"])
    tuner = Tuner(identity, "identity", FeatureRows(4), Goal(rate=100.0, p99_ms=10.0),
                  space, duration=1.0, budget=60.0, results=ResultsFile(None, {}),
                  clock=lambda: now[0])
    result = tuner.run()
    kept = 2 * (CONFIRM_RUNS - 1) * bound  # the default's reruns and one more finalist's
    # A run starts while it and the time kept fit: at 0, 2.5, ... 47.5 s (47.5 + 2.5 + 10
    # = 60), 20 runs; then the default's two reruns, to 55 s. Time kept for four
    # finalists (20 s, a third of the budget) would have stopped the search at 16.
    assert kept == 10.0
    assert len(search_runs) == 20 and now[0] == 55.0
    assert set(result.confirmed) == {"default"} and result.confirmed["default"]["runs"] == 3
    assert result.budget_spent


def test_a_resumed_search_reads_the_saved_reruns_of_finalists_after_one_it_cannot_rerun(
        monkeypatch, capsys) -> None:
    # The first search confirmed the default and `small`; the resumed one also measures
    # `mid`, now the best, with no room left to rerun it: the reruns of the two others are
    # in the results file and count.
    from batchproc.bench import tune
    from batchproc.bench.runner import RunResult

    small, mid = (c for c in candidates([8, 16], [1.0], [1], ["fixed"]))
    p99s = {small.label: 4.0, mid.label: 3.0}
    now = [0.0]

    def run_target(target, model, name, load, bounds, progress, label=None):
        now[0] += run_bound_s(bounds.duration)
        return RunResult(system=target.name, model=name, load=load.label, throughput=load.rate,
                         p50_ms=1.0, p95_ms=2.0, p99_ms=p99s.get(target.name, 5.0),
                         mean_ms=1.0, mean_batch=1.0, batches=1, submitted=10,
                         completed=10, errors=0, elapsed_s=1.0, stopped_by="duration")

    monkeypatch.setattr(tune, "run_target", run_target)
    results = ResultsFile(None, {})
    goal = Goal(rate=100.0, p99_ms=10.0)
    first = Tuner(identity, "identity", FeatureRows(4), goal, [small], duration=1.0,
                  budget=1e9, results=results, clock=lambda: now[0]).run()
    assert {k: r["runs"] for k, r in first.confirmed.items()} == {"default": 3, small.key: 3}
    now[0] = 0.0
    # Room for `mid`'s run (2.5 s, with a third of the budget kept), none for a rerun.
    resumed = Tuner(identity, "identity", FeatureRows(4), goal, [small, mid], duration=1.0,
                    budget=4.0, results=results, clock=lambda: now[0]).run()
    assert now[0] == 2.5  # mid's run, nothing else measured
    assert {k: r.get("runs", 1) for k, r in resumed.confirmed.items()} == {
        mid.key: 1, small.key: 3, "default": 3}
    assert resumed.best is not None and resumed.best["key"] == mid.key
    out, _ = _printed(resumed, capsys)
    assert "until the budget ended the reruns: 7 of 9 runs" in out


def test_a_run_whose_wait_for_left_calls_leaves_no_room_is_not_started(monkeypatch) -> None:
    # The default's run leaves calls running that the next run would wait for first (up
    # to a minute while they keep ending): the search waits only while the budget leaves
    # room for the run after it, then stops, within its budget.
    from batchproc.bench import runner, tune
    from batchproc.bench.runner import RunResult

    left = CallsThatDoNotEnd(running=3)
    started: list[str] = []

    def run_target(target, model, name, load, bounds, progress, label=None):
        started.append(target.name)
        if len(started) == 1:
            monkeypatch.setattr(runner, "_left_behind", [runner._LeftBehind(
                left, "the default's run", time.perf_counter(), stall_s=60.0)])
        return RunResult(system=target.name, model=name, load=load.label, throughput=load.rate,
                         p50_ms=1.0, p95_ms=2.0, p99_ms=3.0, mean_ms=1.0, mean_batch=1.0,
                         batches=1, submitted=10, completed=10, errors=0, elapsed_s=1.0,
                         stopped_by="duration")

    monkeypatch.setattr(tune, "run_target", run_target)
    budget = 3.0  # runs counted at 1.15 s, a third kept: room to wait about 0.85 s
    began = time.monotonic()
    result = Tuner(identity, "identity", FeatureRows(4), Goal(rate=100.0),
                   candidates([8, 16], [1.0], [1], ["fixed"]), duration=0.15, budget=budget,
                   results=ResultsFile(None, {})).run()
    took = time.monotonic() - began
    assert started == [DEFAULT.label]  # no run started beside the calls, or after them
    assert result.budget_spent
    assert 0.5 < took < budget  # it waited for them, and not past the budget
    assert runner.calls_left_behind() == 3  # not given up on: a later run waits for them


FINALIST_NOTES = [
    # Room for the default's run only: no rerun; the verdict is on single runs.
    (3.8, "1 finalist (the default) not rerun: the budget had no room left for a rerun; "
          "the verdict is on single runs (pass --json FILE to keep the results and "
          "continue in a later run)"),
    # The search, then one rerun of the two finalists' four.
    (7.5, "2 finalists (the best that met the goal, at most 3, and the default) rerun at "
          "their deciding load until the budget ended the reruns: 3 of 6 runs; they are "
          "ranked first, on the medians of their runs (pass --json FILE to keep the "
          "results and continue in a later run)"),
    (60.0, "2 finalists (the best that met the goal, at most 3, and the default) rerun at "
           "their deciding load, 3 runs each; they are ranked first, on their medians"),
]


@pytest.mark.parametrize(("budget", "only_default", "note"), [
    *[(budget, False, note) for budget, note in FINALIST_NOTES],
    # Only the default met the goal: one finalist, in the singular.
    (60.0, True, "1 finalist (the default) rerun at its deciding load, 3 runs; the "
                 "verdict is on its medians"),
])
def test_the_output_says_how_far_confirming_the_finalists_went(monkeypatch, capsys,
                                                               budget, only_default,
                                                               note) -> None:
    from batchproc.bench import tune
    from batchproc.bench.runner import RunResult

    now = [0.0]

    def run_target(target, model, name, load, bounds, progress, label=None):
        now[0] += run_bound_s(bounds.duration)  # every run takes its bound: 2.5 s
        p99 = 30.0 if only_default and "FIXED" in target.name else 3.0
        return RunResult(system=target.name, model=name, load=load.label, throughput=load.rate,
                         p50_ms=1.0, p95_ms=2.0, p99_ms=p99, mean_ms=1.0, mean_batch=1.0,
                         batches=1, submitted=10, completed=10, errors=0, elapsed_s=1.0,
                         stopped_by="duration")

    monkeypatch.setattr(tune, "run_target", run_target)
    tuner = Tuner(identity, "identity", FeatureRows(4), Goal(rate=100.0, p99_ms=10.0),
                  candidates([8], [1.0], [1], ["fixed"]), duration=1.0, budget=budget,
                  results=ResultsFile(None, {}), clock=lambda: now[0])
    result = tuner.run()
    assert now[0] <= budget and result.best is not None
    print_result("tune", result)
    out = capsys.readouterr().out
    assert note in out.splitlines()


def test_a_run_that_failed_outright_is_printed_without_figures(capsys) -> None:
    # What the results file holds for it (and a resume reads back): no figures, null.
    failed = {"key": DEFAULT.key, "label": DEFAULT.label, "candidate": vars(DEFAULT),
              "offered": 300.0, "arrival_rate": None, "throughput": None, "p50_ms": None,
              "p95_ms": None, "p99_ms": None, "mean_ms": None, "mean_batch": None,
              "completed": 0, "errors": 0, "unfinished": 0, "refused": 0,
              "first_error": None, "elapsed_s": None, "failed": "RuntimeError: no"}
    c = Candidate("fixed", 8, 1.0, 1)
    best = {**failed, "key": c.key, "label": c.label, "candidate": vars(c),
            "throughput": 300.0, "p50_ms": 1.0, "p99_ms": 2.0, "mean_batch": 2.5,
            "completed": 45, "failed": None}
    goal = Goal(rate=300.0)
    assert goal.meets(best) and not goal.meets(failed)
    out, _ = _printed(TuneResult(goal, best, failed, [failed, best], 2, 0, 2, 2, False,
                                 None), capsys)
    row = next(line for line in out.splitlines() if "default (ADAPTIVE)  " in line)
    assert [cell.strip() for cell in row.split("│")[2:-1]] == ["300", "-", "-", "-", "-",
                                                              "no"]
    assert ("default (ADAPTIVE): p50 - ms, p99 - ms at - req/s achieved of 300 offered, "
            "- rows per call (misses the goal)") in out
    assert "2.5 rows per call" in out


def _fake_runs(monkeypatch, make=None) -> list[Any]:
    """``tune.run_target`` replaced by an instant run (``make(target, load)`` gives its
    RunResult, by default one that keeps up); the loads it was given, in order."""
    from batchproc.bench import tune
    from batchproc.bench.runner import RunResult

    loads: list[Any] = []

    def keeps_up(target, load):
        return RunResult(system=target.name, model="identity", load=load.label,
                         throughput=load.rate, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0,
                         mean_ms=1.0, mean_batch=1.0, batches=10, submitted=10,
                         completed=10, errors=0, elapsed_s=1.0, stopped_by="duration",
                         scheduled=round(load.rate), window_s=1.0,
                         arrival_rate=float(round(load.rate)))

    def run_target(target, model, name, load, bounds, progress, label=None, **kw):
        loads.append(load)
        return (make or keeps_up)(target, load)

    monkeypatch.setattr(tune, "run_target", run_target)
    return loads


def test_candidates_share_arrivals_and_reruns_get_fresh_ones(monkeypatch) -> None:
    loads = _fake_runs(monkeypatch)
    result = Tuner(identity, "identity", FeatureRows(4), Goal(rate=100.0),
                   candidates([8, 16], [1.0], [1], ["fixed"]), duration=1.0, budget=1e9,
                   results=ResultsFile(None, {}), seed=7).run()
    assert result.confirmed and all(r["runs"] == 3 for r in result.confirmed.values())
    assert {load.seed for load in loads} == {7}
    searched = [load for load, r in zip(loads, result.records) if not r.get("repeat")]
    reruns = [(r["repeat"], load.draw) for load, r in zip(loads, result.records)
              if r.get("repeat")]
    # Every candidate at the target load on the same arrivals; the reruns on others,
    # the same for each finalist.
    assert len(searched) == 3 and {load.draw for load in searched} == {0}
    assert sorted(set(reruns)) == [(1, 1), (2, 2)]


def test_the_table_shows_the_load_offered_and_judges_the_goal_on_it(capsys) -> None:
    goal = Goal(rate=20.0)
    c = Candidate("fixed", 8, 1.0, 1)
    # Offered 14 arrivals a second for the 20 asked: 13 achieved is below 90% of 20, not
    # of 14; the table says what the run was offered.
    run = {"key": c.key, "label": c.label, "candidate": vars(c), "offered": 20.0,
           "arrival_rate": 14.0, "throughput": 13.0, "p50_ms": 1.0, "p95_ms": 2.0,
           "p99_ms": 2.0, "mean_ms": 1.0, "mean_batch": 1.0, "completed": 13, "errors": 0,
           "unfinished": 0, "refused": 0, "first_error": None, "elapsed_s": 1.0,
           "failed": None, "model_errors": 0, "first_model_error": None}
    assert goal.meets(run)
    assert not goal.meets({**run, "throughput": 12.0})
    out, _ = _printed(TuneResult(goal, run, None, [run], 1, 0, 1, 1, False, None), capsys)
    row = next(line for line in out.splitlines() if c.label in line and "│" in line)
    assert [cell.strip() for cell in row.split("│")[2:4]] == ["14", "13"]
    assert "at 13 req/s achieved of 14 offered" in out


def test_a_run_in_which_the_model_raised_does_not_meet_the_goal() -> None:
    run = {"offered": 100.0, "arrival_rate": 100.0, "throughput": 100.0, "p99_ms": 8.0,
           "errors": 0, "unfinished": 0, "refused": 0, "completed": 100, "model_errors": 0}
    assert Goal(rate=100.0).meets(run)
    # Its calls were retried and every request completed: the model raised all the same.
    assert not Goal(rate=100.0).meets({**run, "model_errors": 3})


def test_tune_says_why_nothing_met_the_goal_when_every_run_failed(monkeypatch,
                                                                  capsys) -> None:
    from batchproc.bench.runner import failed_run

    _fake_runs(monkeypatch, lambda target, load: failed_run(
        target.name, "identity", load, "OSError: no such device"))
    code, out, err = run_cli(capsys, *FAST, *SPACE, "--rate", "300")
    assert code == 1
    assert "no configuration tried meets the goal" in out
    assert err.splitlines() == ["batchproc tune: error: 5 runs failed, the default "
                                "(ADAPTIVE) run first: OSError: no such device"]


FAILS_AFTER_CHECK = """
CALLS = [0]

def model(batch):
    CALLS[0] += 1
    if CALLS[0] > 2:  # past the bench's own check of the model
        raise RuntimeError("GPU fell off\\nthe bus")
    return batch
"""


def test_tune_reports_the_model_raising_in_its_runs(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "tune_dies_mod.py").write_text(FAILS_AFTER_CHECK)
    monkeypatch.syspath_prepend(str(tmp_path))
    # The least budget: the default's run alone. Its requests wait in batchproc's
    # retries past the run's end (late): only the count of the model's errors shows why.
    code, out, err = run_cli(capsys, "--model", "tune_dies_mod:model", "--duration", "0.15",
                             "--quiet", *SPACE, "--rate", "100", "--budget", "1.8")
    assert code == 1, err
    assert "no configuration tried meets the goal" in out
    line, = err.splitlines()
    assert line.startswith("batchproc tune: error: the default (ADAPTIVE) run: the model "
                           "failed in ")
    assert line.endswith(", first: RuntimeError: GPU fell off the bus")


def test_the_results_file_names_the_padding_the_printed_config_sets(tmp_path, capsys) -> None:
    path = tmp_path / "tune.json"
    code, out, err = run_cli(capsys, *FAST, "--sizes", "4", "--delays-ms", "1", "--workers",
                             "1", "--strategies", "greedy", "--rate", "200",
                             "--input", "int64:1x2..6", "--json", str(path))
    assert code == 0, err
    best = json.loads(path.read_text())["best"]
    # Whichever is best (the default's own fields are none), as its printed config.
    assert best["config"].split(", ")[-1] == "pad_value=0"
    assert config_of(out).pad_value == 0


def test_an_existing_empty_results_file_is_a_new_one(tmp_path, capsys) -> None:
    path = tmp_path / "tune.json"
    path.write_text("")  # as mktemp leaves it
    code, out, err = run_cli(capsys, *FAST, "--sizes", "4", "--delays-ms", "1", "--workers",
                             "1", "--strategies", "fixed", "--rate", "100", "--budget", "1.8",
                             "--json", str(path))
    assert code in (0, 1), err  # whether the default meets the goal is the machine's
    assert "cannot read it" not in err and "0 reused" in out
    assert json.loads(path.read_text())["runs"]


def test_the_ladder_ends_where_a_run_would_offer_too_many_arrivals() -> None:
    from batchproc.bench.loads import MAX_ARRIVALS

    # Every candidate meets the SLO at any load: the ladder climbs until its next step
    # would offer a run more than MAX_ARRIVALS arrivals.
    tuner = FakeTuner({"default": math.inf}, capacity=MAX_ARRIVALS / 2)
    result = tuner.run()
    offered = [o for _, o in tuner.calls]
    assert max(offered) * tuner.duration <= MAX_ARRIVALS
    assert offered == [MAX_ARRIVALS / 2 * ladder_fraction(s) for s in range(len(offered))]
    assert MAX_ARRIVALS / 2 * ladder_fraction(len(offered)) > MAX_ARRIVALS  # the next
    assert result.best is not None


@pytest.mark.parametrize(("argv", "said"), [
    (["--rate", "2e7"], "--rate 2e+07 for --duration 0.15 makes 3,000,000 arrivals in one "
     "run; a run offers at most 2,000,000: lower the rate or the duration"),
    (["--rate", "1e12"], "arrivals in one run; a run offers at most 2,000,000"),
    (["--rate", "100", "--seed", "-1"], "--seed: must be >= 0, got -1"),
])
def test_a_load_no_run_can_offer_is_refused_before_anything_runs(capsys, argv, said) -> None:
    started = time.monotonic()
    code, out, err = run_cli(capsys, *FAST, *SPACE, *argv, "--budget", "8")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and said in err, err
    assert time.monotonic() - started < 5  # the budget is not spent: nothing ran


def test_a_results_file_of_an_npz_since_rewritten_is_refused(tmp_path, capsys) -> None:
    # The same path and count of requests, other dtypes and shapes (or values): the runs
    # saved were measured on other requests.
    from batchproc.bench import cli, tune

    npz, path = tmp_path / "req.npz", tmp_path / "tune.json"
    argv = [*FAST, "--rate", "300", "--input", str(npz), "--json", str(path)]
    args = cli.build_parser().parse_args(["tune", *argv])
    np.savez(npz, *[np.ones((1, 4), np.float32)] * 8)
    tune.ResultsFile(str(path), cli.tune_identity(args, NpzSource(str(npz)))).save({})
    tune.ResultsFile(str(path), cli.tune_identity(args, NpzSource(str(npz))))  # the same
    for requests in ([np.ones((1, 8, 100), np.int64)] * 8, [np.zeros((1, 4), np.float32)] * 8):
        np.savez(npz, *requests)
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == "", err
        assert err.strip() == (f"batchproc tune: error: --json {path}: holds runs of other "
                               "settings (input); give another file to start afresh"), err

"""`batchproc bench --sweep`: offered loads at fractions of the capacity, one curve per
system, a table, JSON and the plot; and `--config`, which adds a system to a bench.

Short runs of the identity model (0.15 s per load); nothing here depends on speed.
"""

from __future__ import annotations

import json

import pytest
from extras import skip_without

from batchproc import BatchProcessingStrategy, BatchProcessorConfig
from batchproc.__main__ import main
from batchproc.bench import BenchError, report
from batchproc.bench.configs import format_config, parse_config
from batchproc.bench.inputs import FeatureRows
from batchproc.bench.loads import fmt_load_rate
from batchproc.bench.models import FixedCost
from batchproc.bench.sweep import SATURATED_IN_A_ROW, notes, run_sweep, table_rows, to_json
from batchproc.bench.targets import NoBatching

FAST = ["--model", "identity", "--duration", "0.15", "--quiet"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_sweep_json_table_and_systems(tmp_path, capsys) -> None:
    path = tmp_path / "sweep.json"
    code, out, err = run_cli(
        capsys, "--sweep", *FAST, "--capacity", "2000", "--loads", "0.5,0.1",
        "--config", "max_batch_size=8, processing_strategy=FIXED, batch_timeout=0.001",
        "--json", str(path),
    )
    assert code == 0, err
    for text in ("capacity (given): 2,000 req/s", "offered req/s", "achieved req/s",
                 "p99 ms", "batchproc", "no batching", "config 1",
                 "config 1: max_batch_size=8, processing_strategy=FIXED"):
        assert text in out, text
    doc = json.loads(path.read_text())
    assert {"date", "machine", "versions", "settings", "capacity", "points", "skipped"} <= set(doc)
    assert doc["capacity"] == {"req_s": 2000.0, "measured": False, "run": None}
    assert doc["interrupted"] is False
    assert doc["settings"]["fractions"] == [0.1, 0.5]
    assert doc["settings"]["configs"] == [
        "max_batch_size=8, processing_strategy=FIXED, batch_timeout=0.001"]
    points = doc["points"]
    assert [(p["system"], p["fraction"]) for p in points] == [
        (s, f) for s in ("batchproc", "config 1", "no batching") for f in (0.1, 0.5)]
    for p in points:
        assert p["offered"] == pytest.approx(2000 * p["fraction"])
        assert {"throughput", "p50_ms", "p95_ms", "p99_ms", "mean_batch", "completed",
                "saturated"} <= set(p)
        assert p["errors"] == 0 and p["completed"] > 0
        assert 0 < p["p50_ms"] <= p["p99_ms"]
    assert all(p["mean_batch"] == 1.0 for p in points if p["system"] == "no batching")


def test_sweep_measures_the_capacity_first(tmp_path, capsys) -> None:
    path = tmp_path / "sweep.json"
    code, out, err = run_cli(capsys, "--sweep", *FAST, "--max-batch", "4", "--loads", "0.05",
                             "--json", str(path))
    assert code == 0, err
    doc = json.loads(path.read_text())
    cap = doc["capacity"]
    assert cap["measured"] is True and cap["req_s"] > 0
    assert cap["run"]["load"] == "8 clients"  # twice --max-batch
    assert cap["run"]["throughput"] == cap["req_s"]
    # That share of it, to whole arrivals over the run's window.
    duration = float(FAST[FAST.index("--duration") + 1])
    point = doc["points"][0]
    assert point["offered"] == pytest.approx(round(0.05 * cap["req_s"] * duration) / duration)
    # The run's name (in the notes) gives the load the table gives: the arrivals offered.
    assert point["arrival_rate"] == pytest.approx(point["offered"])
    assert point["load"] == f"{fmt_load_rate(point['offered'])} req/s Poisson"
    assert "capacity (measured)" in out


def test_sweep_plot_is_a_png(tmp_path, capsys) -> None:
    skip_without("test")
    path = tmp_path / "curve.png"
    code, _, err = run_cli(capsys, "--sweep", *FAST, "--capacity", "1000",
                           "--loads", "0.1,0.3", "--plot", str(path))
    assert code == 0, err
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_saturated_system_skips_its_higher_loads() -> None:
    # No batching on a 20 ms model carries 50 requests/s: 500 and 1000 offered saturate it.
    result = run_sweep([NoBatching()], FixedCost(0.02), "fixed", FeatureRows(4),
                       fractions=[0.5, 1.0, 2.0, 4.0], capacity=1000.0, duration=0.2)
    pts = result.points["no batching"]
    assert [p.fraction for p in pts] == [0.5, 1.0][:SATURATED_IN_A_ROW]
    assert all(p.saturated for p in pts)
    assert result.skipped == {"no batching": [2.0, 4.0]}


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--sweep", "--clients", "4"], "--clients does not apply"),
        (["--sweep", "--rate", "100"], "--rate does not apply"),
        (["--sweep", "--priorities"], "--priorities does not go with --sweep"),
        (["--loads", "0.5"], "--loads goes with --sweep"),
        (["--capacity", "100"], "--capacity goes with --sweep"),
        (["--sweep", "--loads", "0.5,,1"], "comma-separated"),
        (["--sweep", "--loads", "0.5,-1"], "--loads"),
        (["--sweep", "--capacity", "0"], "--capacity"),
        (["--config", "max_batch_size=0"], "batchproc rejects it"),
        (["--config", "no_such_field=1"], "no_such_field"),
        (["--sweep", "--capacity", "1e12"], "--capacity 1e+12 at the highest of --loads (1) "
         "makes 150,000,000,000 arrivals in one run; a run offers at most 2,000,000"),
        (["--sweep", "--seed", "-1"], "--seed: must be >= 0"),
    ],
)
def test_bad_sweep_flags_are_one_line(capsys, argv: list[str], mentions: str) -> None:
    code, out, err = run_cli(capsys, *argv, *FAST)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and mentions in err, err


def test_a_sweep_too_long_for_a_run_to_offer_is_refused(capsys) -> None:
    code, out, err = run_cli(capsys, "--sweep", "--model", "identity", "--quiet",
                             "--capacity", "10", "--duration", "1e9")
    assert code == 2 and out == ""
    assert err == ("batchproc bench: error: --capacity 10 at the highest of --loads (1) "
                   "makes 10,000,000,000 arrivals in one run; a run offers at most "
                   "2,000,000: lower the rate or the duration\n")


def test_config_accepts_tunes_output_as_pasted() -> None:
    fields = {"max_batch_size": 32, "batch_timeout": 0.002,
              "processing_strategy": BatchProcessingStrategy.FIXED, "pad_value": 0}
    text = format_config(fields)
    assert text.startswith("from batchproc import ") and "\nconfig = Batch" in text
    assert parse_config(text) == fields  # the whole of it, its import line too
    assert parse_config(text[text.index("config = "):]) == fields
    assert parse_config("cfg=BatchProcessorConfig(max_batch_size=32)") == {
        "max_batch_size": 32}
    assert parse_config("config = BatchProcessorConfig()") == {}


def test_the_capacity_is_measured_with_a_bounded_number_of_clients(monkeypatch,
                                                                  capsys) -> None:
    from batchproc.bench import sweep

    seen = []

    def measure_capacity(target, model, name, source, *, clients, **kw):
        seen.append(clients)
        raise BenchError("measured")

    monkeypatch.setattr(sweep, "measure_capacity", measure_capacity)
    code, _, err = run_cli(capsys, "--sweep", *FAST, "--max-batch", "100000")
    assert code == 2 and "measured" in err
    assert seen == [sweep.CAPACITY_CLIENTS]
    assert sweep.capacity_clients(4) == 8 and sweep.capacity_clients(4, least=16) == 16


def test_config_accepts_what_tune_prints_and_its_arguments() -> None:
    fields = {"max_batch_size": 32, "batch_timeout": 0.002, "max_workers": 2,
              "processing_strategy": BatchProcessingStrategy.FIXED}
    text = format_config(fields)
    call = text[text.index("BatchProcessorConfig("):]
    assert parse_config(call) == fields
    assert parse_config("max_batch_size=32, batch_timeout=0.002, max_workers=2, "
                        "processing_strategy='fixed'") == fields
    assert parse_config("processing_strategy=GREEDY") == {
        "processing_strategy": BatchProcessingStrategy.GREEDY}
    namespace: dict[str, object] = {}
    exec(text, namespace)
    config = namespace["config"]
    assert isinstance(config, BatchProcessorConfig)
    assert config.max_batch_size == 32 and config.max_workers == 2


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("max_batch_size=", "invalid syntax at the end (give field=value"),
        ("32", "keyword arguments only"),
        ("max_batch_size=int('3')", "not a literal"),
        ("processing_strategy=FASTEST", "one of 'fixed', 'adaptive', 'greedy'"),
        ("**{'a': 1}", "** is not accepted"),
        ("min_batch_size=10, max_batch_size=5", "batchproc rejects it"),
        ("max_batch_size=8, max_batch_size=16", "max_batch_size is given twice"),
        ("processing_strategy='fixed', processing_strategy='greedy'",
         "processing_strategy is given twice"),
        ("BatchProcessorConfig(batch_timeout=0.01, batch_timeout=0.01)",
         "batch_timeout is given twice"),
    ],
)
def test_bad_configs(text: str, mentions: str) -> None:
    with pytest.raises(BenchError, match="--config") as info:
        parse_config(text)
    assert mentions in str(info.value)


def test_bench_runs_each_config_as_one_more_system(tmp_path, capsys) -> None:
    path = tmp_path / "b.json"
    code, _, err = run_cli(capsys, "--model", "identity", "--clients", "2", "--requests",
                             "20", "--quiet", "--config", "max_batch_size=2",
                             "--json", str(path))
    assert code == 0, err
    doc = json.loads(path.read_text())
    assert [r["system"] for r in doc["runs"]] == ["batchproc", "config 1", "no batching",
                                                  "limit"]
    assert doc["runs"][1]["completed"] == 20 and doc["runs"][1]["mean_batch"] <= 2


class _BrokenTarget:
    name = "broken"

    def start(self, model: object) -> None:
        raise OSError("no such device")


def test_a_system_that_fails_in_a_sweep_is_reported_and_the_others_kept() -> None:
    result = run_sweep([_BrokenTarget(), NoBatching()], FixedCost(0.0), "fixed",
                       FeatureRows(4), fractions=[0.5], capacity=200.0, duration=0.2)
    broken, = result.points["broken"]
    assert broken.run.failed == "OSError: no such device" and not broken.saturated
    kept, = result.points["no batching"]
    assert kept.run.failed is None and kept.run.completed > 0
    rows = table_rows(result)
    assert rows[0] == ["broken", "100 (0.5x)", "failed", "-", "-", "-", "-"]
    assert rows[1][0] == "no batching" and rows[1][2] != "failed"
    assert "! broken (fixed, 100 req/s Poisson): the run failed: OSError: no such device" \
        in notes(result)
    points = to_json(result)["points"]
    assert [p["failed"] for p in points] == ["OSError: no such device", None]


def test_a_sweep_notes_a_run_that_fell_behind_but_not_each_time_bound() -> None:
    # A sweep's table marks no run "*", so none gets the time bound's note; one whose
    # req/s counts over its completions, past its arrivals' window, says so as bench does.
    from batchproc.bench.runner import RunResult
    from batchproc.bench.sweep import SweepPoint, SweepResult

    def run(throughput: float, span: float) -> RunResult:
        completed = round(throughput * span)
        return RunResult(
            system="batchproc", model="fixed", load="3,000 req/s Poisson",
            throughput=throughput, p50_ms=6.0, p95_ms=9.0, p99_ms=10.0, mean_ms=6.0,
            mean_batch=20.0, batches=100, submitted=completed, completed=completed,
            errors=0, elapsed_s=span, stopped_by="duration", scheduled=6_000,
            window_s=2.0, arrival_rate=3_000.0)

    kept_up, behind = run(3_000.0, 2.0), run(2_500.0, 2.4)
    result = SweepResult(capacity=3_000.0, capacity_run=None, skipped={}, points={
        "batchproc": [SweepPoint(1.0, 3_000.0, kept_up, 2.0),
                      SweepPoint(1.0, 3_000.0, behind, 2.0)]})
    said = notes(result)
    assert not any("time bound" in n for n in said), said
    assert said == [
        "* batchproc (fixed, 3,000 req/s Poisson): req/s counts its completed arrivals over "
        "2.4 s, its window stretched to its completions (its last requests waited longer "
        "than its first: it fell behind)"]
    # The note's "*" marks the req/s it speaks of, in the sweep's table and in bench's.
    rows = table_rows(result)
    assert [row[2].split(" !")[0] for row in rows] == ["3,000", "2,500 *"]
    assert [report.row_cells(r)[1] for r in (kept_up, behind)] == ["3,000", "2,500 *"]


def test_a_sweep_names_a_load_under_10_req_s_as_its_table_gives_it() -> None:
    # 3 arrivals over 1.3 s: 2.31 req/s, in the table as in the run's name in the notes.
    from batchproc.bench.runner import RunResult
    from batchproc.bench.sweep import SweepPoint, SweepResult

    run = RunResult(
        system="batchproc", model="fixed", load="2.31 req/s Poisson", throughput=2.2,
        p50_ms=6.0, p95_ms=9.0, p99_ms=10.0, mean_ms=6.0, mean_batch=1.0, batches=3,
        submitted=3, completed=3, errors=0, elapsed_s=1.3, stopped_by="requests",
        scheduled=3, window_s=1.3, arrival_rate=3 / 1.3)
    result = SweepResult(capacity=10.0, capacity_run=None, skipped={}, points={
        "batchproc": [SweepPoint(0.23, 3 / 1.3, run, 1.3)]})
    assert table_rows(result)[0][1] == "2.31 (0.23x)"


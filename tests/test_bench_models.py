"""`batchproc bench`'s models: loading the user's, the check before any run, and the limit
(the model called back to back on full batches).

Models that hang block on an event the test releases at teardown, never on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import sys
import threading
import time
import types
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from batchproc.__main__ import main
from batchproc.bench import BenchError, models
from batchproc.bench.inputs import FeatureRows, NpzSource, parse_inputs
from batchproc.bench.loads import Bounds, Load
from batchproc.bench.models import check_model, load_user_model
from batchproc.bench.runner import run_limit, run_target
from batchproc.bench.targets import Batchproc, NoBatching
from batchproc.log_limits import plural

TINY = ["--requests", "40", "--duration", "5", "--quiet"]


@pytest.fixture
def user_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """An importable module ``bench_user_mod`` for ``--model bench_user_mod:NAME``."""
    module = types.ModuleType("bench_user_mod")
    monkeypatch.setitem(sys.modules, "bench_user_mod", module)
    return module


@pytest.mark.parametrize(("value", "said"), [(3, "an int"), ([1], "a list"), ("x", "a str")])
def test_an_attribute_that_is_not_callable_is_named_with_its_article(
    user_module: types.ModuleType, value: object, said: str
) -> None:
    user_module.thing = value  # type: ignore[attr-defined]
    with pytest.raises(BenchError) as info:
        load_user_model("bench_user_mod:thing")
    assert str(info.value) == f"--model 'bench_user_mod:thing': 'thing' is {said}, not callable"


def test_the_limit_sends_every_request_the_loads_send() -> None:
    seen: list[bytes] = []

    def records(batch: np.ndarray) -> np.ndarray:
        seen.extend(row.tobytes() for row in batch)
        return batch

    load = Load("closed", clients=1, features=4)
    run = run_limit(records, "m", load, Bounds(requests=600), max_batch=64)
    assert run.completed == 600 and run.batches == 10 and run.failed is None
    assert set(seen) == {r.tobytes() for r in load.requests()}


def test_the_limits_batches_leave_out_a_request_larger_than_a_batch(tmp_path) -> None:
    path = tmp_path / "big.npz"
    np.savez(path, *[np.ones((1, 4), np.float32)] * 3, np.ones((500, 4), np.float32))
    load = Load("closed", clients=1, source=NpzSource(str(path)))
    run = run_limit(lambda b: b, "m", load, Bounds(requests=200), max_batch=64)
    assert run.completed == 200 and run.batches == 4 and run.mean_batch == 50.0


# -- the built-in models' inputs ------------------------------------------------------------


def _width_of(specs: list[str] | None = None, **kwargs: Any) -> int:
    if specs is not None:
        kwargs["source"] = parse_inputs(specs, None)
    model = models.make_model("mlp", **kwargs)
    assert isinstance(model, models.MLP)
    return model.features


def test_the_mlp_is_built_for_the_width_of_its_requests(tmp_path) -> None:
    assert _width_of(["float32:1x32"]) == 32
    assert _width_of(["float32:1..4x7"]) == 7  # rows per request may vary, not their width
    assert _width_of(["float32:3x5"]) == 5
    npz = tmp_path / "rows.npz"
    np.savez(npz, *[np.ones((n, 12), np.float32) for n in (1, 3)])
    assert _width_of([str(npz)]) == 12
    assert _width_of(source=FeatureRows(20)) == 20
    assert _width_of(features=9) == 9  # no source: the width given
    # Each runs on its requests' batches.
    for specs in (["float32:1x32"], ["float32:1..4x7"], [str(npz)]):
        source = parse_inputs(specs, None)
        check_model(models.make_model("mlp", source=source), source, max_batch=16)


@pytest.mark.parametrize(
    ("specs", "sends"),
    [
        (["int64:1x64"], "not int64 requests: int64:1x64/request"),
        (["float64:1x64"], "not float64 requests"),
        (["x=float32:1x64"], "not named inputs (x): x=float32:1x64/request"),
        (["a=float32:1x8", "b=float32:1x8"], "not named inputs (a, b)"),
        (["float32:1x8..16"], "not rows whose lengths differ"),
        (["float32:1x3x4"], "not requests of 3 dimensions"),
        (["float32:4"], "not requests of 1 dimension:"),
    ],
)
def test_the_mlp_refuses_requests_it_cannot_take(specs: list[str], sends: str) -> None:
    with pytest.raises(BenchError) as info:
        models.make_model("mlp", source=parse_inputs(specs, None))
    message = str(info.value)
    assert message.startswith("--model mlp takes float32 rows of one width "
                              "(--input float32:1xN, or --features N), "), message
    assert sends in message and "\n" not in message


def test_the_mlp_refuses_an_npz_it_cannot_take(tmp_path) -> None:
    cases = {
        "named": ({"input_ids": np.ones((4, 8), np.float32)}, "not named inputs (input_ids)"),
        "ragged": ({"arr_0": np.ones((1, 8), np.float32), "arr_1": np.ones((1, 9), np.float32)},
                   "not rows whose lengths differ"),
        # Refused as --input float32:1x0 is, before any model sees it.
        "empty-rows": ({"arr_0": np.ones((1, 0), np.float32)},
                       "has shape (1, 0): a request needs a length of at least 1 (axis 1)"),
        "ints": ({"arr_0": np.ones((1, 8), np.int32)}, "not int32 requests"),
    }
    for name, (arrays, sends) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(BenchError, match=re.escape(sends)):
            models.make_model("mlp", source=parse_inputs([str(path)], None))


@pytest.mark.parametrize("name", ["identity", "fixed"])
def test_the_other_built_in_models_take_any_request(name: str) -> None:
    for specs in (["int64:1x8..16"], ["x=float32:1x3x4"], ["float32:4"]):
        source = parse_inputs(specs, None)
        check_model(models.make_model(name, model_ms=0.0, source=source), source)


@pytest.mark.parametrize("command", [["bench"], ["bench", "--sweep"], ["tune", "--rate", "50"]])
@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--input", "int64:1x32"], "not int64 requests"),
        (["--input", "ids=float32:1x32"], "not named inputs (ids)"),
        (["--input", "float32:1x8..16"], "not rows whose lengths differ"),
        # --features with --input is refused whatever the two say.
        (["--input", "float32:1x32", "--features", "16"], "--features and --input"),
    ],
)
def test_every_command_refuses_mlp_requests_before_running(
    capsys: pytest.CaptureFixture[str], command: list[str], argv: list[str], mentions: str
) -> None:
    code = main([*command, "--model", "mlp", *argv, "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1 and mentions in err, err
    assert "matmul" not in err


def test_bench_runs_the_mlp_on_the_width_input_gives(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "b.json"
    code = main(["bench", "--model", "mlp", "--input", "float32:1x32", "--clients", "2",
                 *TINY, "--json", str(path)])
    err = capsys.readouterr().err
    assert code == 0, err
    runs = {r["system"]: r for r in json.loads(path.read_text())["runs"]}
    assert all(r["completed"] == 40 and r["errors"] == 0 for r in runs.values()), runs


# -- outputs: batchproc's own rule, before any run and in the limit ---------------------------


def wrong_rows(batch: np.ndarray) -> np.ndarray:
    return batch[:1] if len(batch) > 2 else batch  # right on the check's two small batches


def dict_of_mismatched_rows(batch: np.ndarray) -> dict[str, np.ndarray]:
    return {"a": batch, "b": batch[:1]}


def tuple_of_numbers(batch: np.ndarray) -> tuple[float, ...]:
    return tuple(float(x) for x in batch.sum(axis=1))


@pytest.mark.parametrize(
    ("model", "said"),
    [
        (wrong_rows, "returned an output batchproc refuses for a batch of 8 rows (float32 "
         "(8, 4)): BatchOutputError: process_func returned 1 results for a batch of 8"),
        (dict_of_mismatched_rows, "for a batch of 2 rows (float32 (2, 4)): BatchOutputError: "
         "process_func returned 1 results in output['b'] for a batch of 2"),
        (tuple_of_numbers, "for a batch of 1 row (float32 (1, 4)): BatchOutputError: "
         "output[0] is float: every leaf of a tuple or dict output must be an array"),
    ],
)
def test_the_check_refuses_an_output_batchproc_refuses(model, said: str) -> None:
    with pytest.raises(BenchError) as info:
        check_model(model, FeatureRows(4), name="--model m:f", max_batch=8)
    assert str(info.value).startswith("--model m:f ") and said in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "model",
    [
        lambda b: [float(r.sum()) for r in b],  # one result per row
        lambda b: {"a": b, "b": b[:, :1]},
        lambda b: (b, b.sum(axis=1)),
    ],
)
def test_the_check_takes_what_batchproc_takes(model) -> None:
    check_model(model, FeatureRows(4), max_batch=8)


def test_the_check_leaves_a_model_raising_on_the_full_batch_to_the_runs() -> None:
    def small_only(batch: np.ndarray) -> np.ndarray:
        if len(batch) > 2:
            raise RuntimeError("too big")
        return batch

    check_model(small_only, FeatureRows(4), max_batch=8)

    def fails_on_two(batch: np.ndarray) -> np.ndarray:
        if len(batch) == 2:
            raise RuntimeError("two")
        return batch

    with pytest.raises(BenchError, match=r"failed on a batch of 2 rows \(float32 \(2, 4\)\): "
                       "RuntimeError: two"):
        check_model(fails_on_two, FeatureRows(4), max_batch=8)


def test_bench_refuses_a_model_with_wrong_rows_before_any_run(
    user_module: types.ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    user_module.wrong_rows = wrong_rows  # type: ignore[attr-defined]
    code = main(["bench", "--model", "bench_user_mod:wrong_rows", "--max-batch", "8", *TINY])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == ("batchproc bench: error: --model bench_user_mod:wrong_rows returned an "
                   "output batchproc refuses for a batch of 8 rows (float32 (8, 64)): "
                   "BatchOutputError: process_func returned 1 results for a batch of 8\n")


def test_the_limit_refuses_an_output_batchproc_refuses() -> None:
    def wrong_on_three(batch: np.ndarray) -> np.ndarray:
        return batch[:1] if len(batch) == 3 else batch

    load = Load("closed", clients=1, features=4)
    run = run_limit(wrong_on_three, "m", load, Bounds(requests=11), max_batch=4)
    assert run.completed == 0 and run.stopped_by == "failed"
    assert run.failed == ("batchproc refuses the model's output on a batch of 3 rows "
                          "(3 requests): BatchOutputError: process_func returned 1 results "
                          "for a batch of 3")


# -- calls that never return: bounded, said, left running -------------------------------------


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """What a hanging model waits for: set at teardown, so no thread outlives the test."""
    event = threading.Event()
    yield event
    event.set()


def test_the_limit_gives_up_on_a_call_that_does_not_return(release: threading.Event) -> None:
    calls = []

    def hangs_on_third(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 3:
            release.wait()
        return batch

    load = Load("closed", clients=1, features=4)
    started = time.perf_counter()
    run = run_limit(hangs_on_third, "m", load, Bounds(duration=0.2), max_batch=4)
    # The duration, then the drain the other systems get (0.5 s at least), not for ever.
    assert time.perf_counter() - started < 5
    assert run.stopped_by == "failed" and run.completed == 0
    assert run.failed == ("the model did not return within 0.7 s (the run's duration and "
                          "drain) on a batch of 4 rows (4 requests); the call was left running")
    assert calls == [4, 4, 4]


def test_a_limit_call_that_returns_late_starts_no_other(release: threading.Event) -> None:
    calls = []
    returned = threading.Event()

    def hangs_on_second(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 2:
            release.wait()
            returned.set()
        return batch

    run = run_limit(hangs_on_second, "m", Load("closed", clients=1, features=4),
                    Bounds(duration=0.01), max_batch=4)
    assert run.failed is not None and "did not return within 0.51 s" in run.failed
    release.set()
    assert returned.wait(10)
    limit_threads = [t for t in threading.enumerate() if t.name == "batchproc-bench-limit"]
    for thread in limit_threads:
        thread.join(10)
    assert calls == [4, 4]


def test_the_check_gives_up_on_a_call_that_does_not_return(release: threading.Event) -> None:
    def hangs(batch: np.ndarray) -> np.ndarray:
        release.wait()
        return batch

    with pytest.raises(BenchError) as info:
        check_model(hangs, FeatureRows(4), name="--model m:hangs", timeout=0.2)
    assert str(info.value) == (
        "--model m:hangs did not return within 0.2 s on a batch of 1 row (float32 (1, 4)) "
        "(the check before any run); the call was left running")


def test_the_check_says_it_waits_for_a_slow_call(
    release: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "CHECK_SLOW_S", 0.05)

    class ReleaseOnWarning(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            self.message = record.getMessage()
            release.set()

    handler = ReleaseOnWarning()
    logging.getLogger("batchproc.bench.models").addHandler(handler)
    try:
        check_model(lambda b: release.wait() and b, FeatureRows(4), name="--model m:f",
                    timeout=60)
    finally:
        logging.getLogger("batchproc.bench.models").removeHandler(handler)
    assert handler.message == ("--model m:f has not returned in 0.05 s on a batch of 1 row "
                               "(float32 (1, 4)) (the check before any run); it has 60 s")


def test_a_model_exiting_in_the_check_is_reported() -> None:
    def exits(batch: np.ndarray) -> np.ndarray:
        sys.exit(3)

    with pytest.raises(BenchError) as info:
        check_model(exits, FeatureRows(4), name="--model m:exits")
    assert str(info.value) == ("--model m:exits called sys.exit(3) on a batch of 1 row "
                               "(float32 (1, 4))")
    with pytest.raises(BenchError, match=r"failed on a batch of 1 row \(float32 \(1, 4\)\): "
                       r"KeyboardInterrupt$"):
        check_model(raises_keyboard_interrupt, FeatureRows(4))


def raises_keyboard_interrupt(batch: np.ndarray) -> np.ndarray:
    raise KeyboardInterrupt


def test_a_model_exiting_in_the_limit_fails_the_run() -> None:
    def exits_on_big(batch: np.ndarray) -> np.ndarray:
        if len(batch) > 2:
            sys.exit(3)
        return batch

    run = run_limit(exits_on_big, "m", Load("closed", clients=1, features=4),
                    Bounds(requests=8), max_batch=4)
    assert run.failed == "the model raised on a batch of 4 rows (4 requests): SystemExit: 3"


def test_outputs_batchproc_refuses_count_as_the_model_s_failures() -> None:
    # One row short on batches of more than 2 rows: the check before the runs passes,
    # and batchproc's search completes every request a row at a time. The run must
    # still say that the model failed. (FIXED waits up to its second for 4 rows: the
    # burst's first batch is full.)
    def drops_a_row(batch: np.ndarray) -> np.ndarray:
        return batch[:-1] if len(batch) > 2 else batch

    with caplog_off():
        run = run_target(Batchproc(max_batch=4, max_delay=1.0, strategy="fixed",
                                   fields={"retry_delay": 0.0}),
                         drops_a_row, "m", Load("burst", burst=16, features=4),
                         Bounds(requests=16, duration=30.0))
    assert run.completed == 16 and run.errors == 0
    assert run.model_errors > 0
    assert run.first_model_error is not None
    assert run.first_model_error.startswith(f"batchproc refused the output of "
                                            f"{run.model_errors} call(s)")


@contextlib.contextmanager
def caplog_off() -> Iterator[None]:
    """batchproc's warnings about the failed batches, kept off the test's output."""
    logger = logging.getLogger("batchproc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_reports_a_model_hanging_in_the_check_and_exits_2(
    user_module: types.ModuleType, release: threading.Event,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(models, "CHECK_TIMEOUT_S", 0.2)
    user_module.hangs = lambda batch: release.wait()  # type: ignore[attr-defined]
    code, out, err = cli(capsys, "--model", "bench_user_mod:hangs", *TINY)
    assert code == 2 and out == ""
    assert err == ("batchproc bench: error: --model bench_user_mod:hangs did not return "
                   "within 0.2 s on a batch of 1 row (float32 (1, 64)) (the check before "
                   "any run); the call was left running\n")


def test_bench_reports_a_model_exiting_in_the_check_and_exits_2(
    user_module: types.ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    user_module.exits = lambda batch: sys.exit(3)  # type: ignore[attr-defined]
    code, out, err = cli(capsys, "--model", "bench_user_mod:exits", *TINY)
    assert code == 2 and out == ""
    assert err == ("batchproc bench: error: --model bench_user_mod:exits called sys.exit(3) "
                   "on a batch of 1 row (float32 (1, 64))\n")


def test_bench_goes_on_past_a_limit_call_that_does_not_return(
    user_module: types.ModuleType, release: threading.Event, tmp_path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    big_calls = []

    def hangs_on_big(batch: np.ndarray) -> np.ndarray:
        # Two clients: batchproc's batches have at most 2 rows. The check's full batch
        # returns; the limit's first call does not.
        if len(batch) > 2:
            big_calls.append(len(batch))
            if len(big_calls) > 1:
                release.wait()
        return batch

    user_module.hangs_on_big = hangs_on_big  # type: ignore[attr-defined]
    path = tmp_path / "b.json"
    code, out, err = cli(capsys, "--model", "bench_user_mod:hangs_on_big", "--clients", "2",
                         "--max-batch", "8", "--requests", "40", "--duration", "0.2",
                         "--quiet", "--json", str(path))
    assert code == 1
    failure = ("the model did not return within 0.7 s (the run's duration and drain) on a "
               "batch of 8 rows (8 requests); the call was left running")
    last_line = err.strip().splitlines()[-1]
    assert last_line == f"batchproc bench: error: the limit run failed: {failure}"
    assert "batchproc vs no batching" in out
    runs = {r["system"]: r for r in json.loads(path.read_text())["runs"]}
    assert runs["limit"]["failed"] == failure
    assert runs["batchproc"]["completed"] == runs["no batching"]["completed"] == 40


def _hang_after_the_check(user_module: types.ModuleType, release: threading.Event) -> None:
    """``bench_user_mod:hangs_after_check``: answers the check before the runs (its
    first three calls), then hangs until ``release``."""
    calls = []

    def hangs_after_check(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) > 3:
            release.wait()
        return batch

    user_module.hangs_after_check = hangs_after_check  # type: ignore[attr-defined]


def test_a_sweep_whose_runs_complete_nothing_exits_1_and_says_which(
    user_module: types.ModuleType, release: threading.Event, tmp_path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    _hang_after_the_check(user_module, release)
    path = tmp_path / "s.json"
    code, _, err = cli(capsys, "--sweep", "--model", "bench_user_mod:hangs_after_check",
                       "--capacity", "20", "--loads", "1", "--duration", "0.2",
                       "--quiet", "--json", str(path))
    assert code == 1, err
    runs = json.loads(path.read_text())["points"]
    assert [(r["system"], r["completed"]) for r in runs] == [("batchproc", 0),
                                                             ("no batching", 0)]
    unfinished = sum(r["unfinished"] for r in runs)
    assert err.strip().splitlines()[-1] == (
        "batchproc bench: error: 2 runs completed no request (batchproc, no batching; "
        f"{plural(unfinished, 'request')} unfinished when they ended)"), err


@pytest.mark.parametrize("argv", [
    ["tune", "--p99-ms", "10", "--budget", "30", "--duration", "0.15"],
    ["bench", "--sweep", "--duration", "0.15"],
])
def test_a_model_hanging_while_capacity_is_measured_is_said_to_hang(
    user_module: types.ModuleType, release: threading.Event,
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    _hang_after_the_check(user_module, release)
    code = main([*argv, "--model", "bench_user_mod:hangs_after_check", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", err
    assert re.fullmatch(
        rf"batchproc {argv[0]}: error: no request completed while measuring capacity "
        r"\([0-9,]+ unfinished after 0\.15 s and the drain; [0-9,]+ calls? of the model "
        r"still running\): the model hangs, or is too slow for --duration", err.strip()), err


# -- async def models: awaited everywhere, as batchproc awaits them ---------------------------


async def amodel(batch: np.ndarray) -> np.ndarray:
    await asyncio.sleep(0)
    return batch


class AsyncCallable:
    def __init__(self) -> None:
        self.threads: set[str] = set()

    async def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        await asyncio.sleep(0)
        return batch * 2


@pytest.fixture
def no_unawaited_coroutines() -> Iterator[None]:
    """Fails the test on a "coroutine ... was never awaited" warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    never = [w for w in caught if "never awaited" in str(w.message)]
    assert not never, never


@pytest.mark.usefixtures("no_unawaited_coroutines")
def test_the_check_awaits_an_async_model() -> None:
    check_model(amodel, FeatureRows(4), max_batch=8)

    async def wrong_rows_async(batch: np.ndarray) -> np.ndarray:
        return wrong_rows(batch)

    with pytest.raises(BenchError, match="process_func returned 1 results for a batch of 8"):
        check_model(wrong_rows_async, FeatureRows(4), max_batch=8)

    async def raises(batch: np.ndarray) -> np.ndarray:
        await asyncio.sleep(0)
        raise RuntimeError("remote down")

    with pytest.raises(BenchError, match=r"failed on a batch of 1 row .*RuntimeError: remote down"):
        check_model(raises, FeatureRows(4))


@pytest.mark.usefixtures("no_unawaited_coroutines")
def test_the_check_cancels_an_async_call_that_does_not_return() -> None:
    cancelled = threading.Event()

    async def waits_for_ever(batch: np.ndarray) -> np.ndarray:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return batch

    with pytest.raises(BenchError, match=r"did not return within 0\.1 s on a batch of 1 row"):
        check_model(waits_for_ever, FeatureRows(4), timeout=0.1)
    assert cancelled.wait(10)


@pytest.mark.usefixtures("no_unawaited_coroutines")
def test_the_limit_awaits_an_async_model_back_to_back() -> None:
    model = AsyncCallable()
    run = run_limit(model, "m", Load("closed", clients=1, features=4), Bounds(requests=100),
                    max_batch=8)
    assert run.failed is None and run.completed == 100 and run.batches == 13
    assert model.threads == {"batchproc-bench-limit"}  # one thread, its own loop


@pytest.mark.usefixtures("no_unawaited_coroutines")
def test_the_limit_cancels_an_async_call_that_does_not_return() -> None:
    cancelled = threading.Event()
    calls = []

    async def hangs_on_second(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 2:
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()
        return batch

    run = run_limit(hangs_on_second, "m", Load("closed", clients=1, features=4),
                    Bounds(duration=0.01), max_batch=4)
    assert run.failed is not None and "did not return within 0.51 s" in run.failed
    assert cancelled.wait(10)
    assert calls == [4, 4]


@pytest.mark.usefixtures("no_unawaited_coroutines")
@pytest.mark.parametrize("target", [Batchproc(max_batch=8), NoBatching()],
                         ids=lambda t: t.name)
def test_every_system_awaits_an_async_model(target) -> None:
    model = AsyncCallable()
    run = run_target(target, model, "m", Load("closed", clients=4, features=4),
                     Bounds(requests=100, duration=30))
    assert run.failed is None and run.errors == 0 and run.completed == 100
    # batchproc sees a coroutine function (the counting wrapper stays one) and runs it on
    # its own loop; no batching awaits it on one of its own.
    assert model.threads == {"batchproc-loop"}


def test_bench_runs_an_async_model(
    user_module: types.ModuleType, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    user_module.amodel = amodel  # type: ignore[attr-defined]
    path = tmp_path / "b.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        code, _, err = cli(capsys, "--model", "bench_user_mod:amodel", "--clients", "4",
                           *TINY, "--json", str(path))
        gc.collect()
    assert code == 0, err
    assert "never awaited" not in err
    runs = {r["system"]: r for r in json.loads(path.read_text())["runs"]}
    assert [runs[s]["completed"] for s in ("batchproc", "no batching", "limit")] == [40] * 3


def _returns_a_coroutine(batch: np.ndarray) -> Any:
    return amodel(batch)


def _yields(batch: np.ndarray) -> Any:
    yield batch


async def _yields_async(batch: np.ndarray) -> Any:
    yield batch


@pytest.mark.usefixtures("no_unawaited_coroutines")
@pytest.mark.parametrize(("model", "returned", "hint"), [
    (_returns_a_coroutine, "coroutine",
     "a plain function returning a coroutine: make it async def"),
    # asyncio counts a generator as a coroutine: the hint must not say async def.
    (_yields, "generator", "a generator function: return the batch's outputs, do not "
     "yield them"),
    (_yields_async, "async_generator", "a generator function: return the batch's outputs, "
     "do not yield them"),
], ids=["coroutine", "generator", "async generator"])
def test_a_model_returning_a_coroutine_or_a_generator_is_told_what_to_write(
        model, returned, hint) -> None:
    with pytest.raises(BenchError) as info:
        check_model(model, FeatureRows(4))
    assert str(info.value).endswith(
        f"BatchOutputError: process_func returned {returned}, which the output rule cannot "
        "split: return an array or tensor with the batch's 1 row on axis 0, a tuple or "
        "dict of them (several outputs), or a list with one result per row "
        f"({hint})")


def test_the_async_counting_wrapper_counts_a_raising_call_and_its_end():
    import asyncio

    from batchproc.bench.runner import AsyncCountingModel

    async def model(batch):
        await asyncio.sleep(0)
        if batch.shape[0] > 1:
            raise ValueError("too many rows")
        return batch

    counted = AsyncCountingModel(model)
    assert asyncio.run(counted(np.ones((1, 2), np.float32))).shape == (1, 2)
    with pytest.raises(ValueError):
        asyncio.run(counted(np.ones((2, 2), np.float32)))
    assert (counted.calls, counted.rows, counted.raised, counted.running) == (2, 3, 1, 0)
    assert "too many rows" in counted.first_raised

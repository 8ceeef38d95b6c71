"""`batchproc bench`'s models: loading the user's, the check before any run, and the limit
(the model called back to back on full batches).

Models that hang block on an event the test releases at teardown, never on a sleep.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from batchproc.__main__ import main
from batchproc.bench import BenchError
from batchproc.bench.inputs import FeatureRows, NpzSource
from batchproc.bench.loads import Bounds, Load
from batchproc.bench.models import check_model, load_user_model
from batchproc.bench.runner import run_limit

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

"""`batchproc bench`'s models: loading the user's, the check before any run, and the limit
(the model called back to back on full batches).

Models that hang block on an event the test releases at teardown, never on a sleep.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from batchproc.bench import BenchError
from batchproc.bench.inputs import NpzSource
from batchproc.bench.loads import Bounds, Load
from batchproc.bench.models import load_user_model
from batchproc.bench.runner import run_limit


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

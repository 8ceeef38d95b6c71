"""`batchproc bench`'s models: loading the user's, the check before any run, and the limit
(the model called back to back on full batches).

Models that hang block on an event the test releases at teardown, never on a sleep.
"""

from __future__ import annotations

import sys
import types

import pytest

from batchproc.bench import BenchError
from batchproc.bench.models import load_user_model


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

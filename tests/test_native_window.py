"""RollingWindow: native module and its deque + numpy.percentile twin run through the
same tests, compared with numpy.percentile over the last `capacity` samples."""

from __future__ import annotations

import importlib.machinery
import math
import threading
from collections import deque
from typing import Any

import numpy as np
import pytest
import reference_window
from hypothesis import given, settings
from hypothesis import strategies as st

from batchproc._native import rolling_window as native_module

IMPLEMENTATIONS = {
    "native": native_module.RollingWindow,
    "twin": reference_window.RollingWindow,
}

QS = [0.0, 0.5, 1.0, 5.0, 10.0, 25.0, 33.3, 50.0, 66.7, 75.0, 90.0, 95.0, 99.0, 99.9, 100.0]


@pytest.fixture(scope="module", params=sorted(IMPLEMENTATIONS))
def window_cls(request: pytest.FixtureRequest) -> Any:
    return IMPLEMENTATIONS[request.param]


def test_native_module_is_compiled() -> None:
    assert native_module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert native_module.RollingWindow.__module__ == "batchproc._native.rolling_window"


def close(a: float, b: float, scale: float) -> bool:
    """Within 1e-9 relative (absolute 1e-12 of the window's magnitude near zero)."""
    if math.isnan(b):
        return math.isnan(a)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12 * scale)


def check_against_model(w: Any, model: deque[float]) -> None:
    ref = np.array(model, dtype=np.float64)
    assert len(w) == len(model)
    np.testing.assert_array_equal(w.values(), ref)
    assert w.values().dtype == np.float64
    if not model:
        assert math.isnan(w.mean()) and math.isnan(w.min()) and math.isnan(w.max())
        assert math.isnan(w.percentile(50))
        assert all(math.isnan(x) for x in w.percentiles(QS))
        return
    scale = max(1.0, float(np.abs(ref).max()))
    assert w.min() == ref.min()
    assert w.max() == ref.max()
    assert close(w.mean(), float(ref.mean()), scale)
    got = w.percentiles(QS)
    for q, value in zip(QS, got):
        expected = float(np.percentile(ref, q))
        assert close(value, expected, scale), (q, value, expected)
        assert close(w.percentile(q), expected, scale), q


# --------------------------------------------------------- differential (Hypothesis)

values = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, 2.5, 1e-300, 7.0]),   # ties and duplicates
    st.integers(-5, 5).map(float),
    st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), values),
        st.tuples(st.just("extend"), st.lists(values, max_size=25)),
        st.tuples(st.just("clear"), st.none()),
        st.tuples(st.just("check"), st.none()),
        st.tuples(st.just("percentile"), st.floats(0.0, 100.0)),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(capacity=st.integers(1, 12), ops=operations)
def test_random_operations_match_numpy(window_cls: Any, capacity: int,
                                       ops: list[tuple[str, Any]]) -> None:
    w = window_cls(capacity)
    model: deque[float] = deque(maxlen=capacity)
    total = 0
    for op, arg in ops:
        if op == "add":
            w.add(arg)
            model.append(arg)
            total += 1
        elif op == "extend":
            w.extend(arg)
            model.extend(arg)
            total += len(arg)
        elif op == "clear":
            w.clear()
            model.clear()
        elif op == "percentile":
            expected = float(np.percentile(np.array(model), arg)) if model else math.nan
            scale = max([1.0, *map(abs, model)])
            assert close(w.percentile(arg), expected, scale)
        else:
            check_against_model(w, model)
        assert w.total_count == total
    check_against_model(w, model)


@settings(max_examples=50)
@given(capacity=st.integers(1, 300),
       data=st.lists(st.integers(-3, 3).map(float), min_size=1, max_size=1000))
def test_many_ties(window_cls: Any, capacity: int, data: list[float]) -> None:
    w = window_cls(capacity)
    for x in data:
        w.add(x)
    check_against_model(w, deque(data, maxlen=capacity))


# ---------------------------------------------------------------- targeted cases


# The native window of up to 4096 samples indexes them for order statistics only when
# asked (without the GIL from 256 of them); a larger one as they come: both, with ties.
@pytest.mark.parametrize("capacity", [1000, 4096, 5000, 9000])
def test_queries_between_runs_of_samples_of_every_length(window_cls: Any,
                                                          capacity: int) -> None:
    rng = np.random.default_rng(capacity)
    w = window_cls(capacity)
    model: deque[float] = deque(maxlen=capacity)
    # Runs shorter, as long as and longer than the window and the indexing bound, each
    # followed by a query, so the samples indexed before it are partly or all evicted.
    for run in (1, capacity - 1, 1, 4095, 4096, 4097, 2 * capacity + 3, 17, capacity):
        # Half ties among seven values, half distinct.
        data = np.where(rng.random(run) < 0.5, rng.integers(-3, 4, size=run),
                        rng.normal(0.0, 2.0, size=run))
        if run % 2:
            w.extend(data)
        else:
            for x in data.tolist():
                w.add(x)
        model.extend(data.tolist())
        check_against_model(w, model)



def test_capacity_one(window_cls: Any) -> None:
    w = window_cls(1)
    for x in (3.0, -2.0, 5.5):
        w.add(x)
        assert len(w) == 1
        assert w.min() == w.max() == w.mean() == w.percentile(0) == w.percentile(100) == x
    np.testing.assert_array_equal(w.values(), [5.5])
    assert w.total_count == 3
    assert w.capacity == 1


def test_long_run_against_numpy(window_cls: Any) -> None:
    rng = np.random.default_rng(7)
    w = window_cls(1000)
    model: deque[float] = deque(maxlen=1000)
    data = rng.lognormal(0.0, 2.0, size=12_000) * rng.choice([-1, 1], size=12_000)
    for i, x in enumerate(data.tolist()):
        w.add(x)
        model.append(x)
        if i % 997 == 0:
            check_against_model(w, model)
    check_against_model(w, model)


def test_extend_longer_than_capacity(window_cls: Any) -> None:
    w = window_cls(5)
    w.add(100.0)
    w.extend(np.arange(12, dtype=np.int32))
    np.testing.assert_array_equal(w.values(), [7, 8, 9, 10, 11])
    assert w.total_count == 13
    w.extend(range(20, 10_020))                 # large batch (the native no-GIL path)
    np.testing.assert_array_equal(w.values(), np.arange(10_015, 10_020))
    assert w.total_count == 13 + 10_000
    w.extend(x / 2 for x in range(3))           # any iterable
    np.testing.assert_array_equal(w.values(), [10_018, 10_019, 0.0, 0.5, 1.0])


def test_clear_keeps_total_count(window_cls: Any) -> None:
    w = window_cls(4)
    w.extend([1.0, 2.0, 3.0])
    w.clear()
    assert len(w) == 0 and w.total_count == 3
    assert math.isnan(w.mean())
    w.extend([9.0, 8.0, 7.0, 6.0, 5.0])
    np.testing.assert_array_equal(w.values(), [8.0, 7.0, 6.0, 5.0])
    assert w.mean() == 6.5 and w.total_count == 8


def test_mean_does_not_drift(window_cls: Any) -> None:
    """A huge sample passing through must not swallow the small ones around it."""
    w = window_cls(3)
    w.extend([1e16, 1.0, 1.0])
    w.extend([1.0])                      # 1e16 evicted
    assert w.mean() == 1.0
    rng = np.random.default_rng(3)
    w = window_cls(100)
    data = rng.normal(0, 1, 200_000) * 10.0 ** rng.integers(-6, 9, 200_000)
    w.extend(data)
    w.extend(np.full(100, 0.1))
    assert math.isclose(w.mean(), 0.1, rel_tol=1e-12)


@pytest.mark.parametrize("huge", [1e300, -1e300, 1e150, 1e20, 2.0 ** 60])
def test_mean_after_huge_samples_left_the_window(window_cls: Any, huge: float) -> None:
    # A running sum that took in a sample far larger than the window's and then let it
    # go loses the small ones (it read 0.0 for 1e300, 1e150, 1, 1, 1 in a window of 3).
    # One at a time: an extend longer than the window only takes in its last samples.
    w = window_cls(3)
    for x in (huge, huge / 3, 1.0, 1.0, 1.0):
        w.add(x)
    assert w.mean() == 1.0
    for x in (huge, 2.0, 2.0, 2.0):
        w.add(x)
    assert w.mean() == 2.0
    for x in (-huge, 0.5, 0.25):
        w.add(x)
    assert w.mean() == pytest.approx((-huge + 0.75) / 3, rel=1e-12)


@pytest.mark.parametrize("samples, mean", [
    ([1e308, 1e308], 1e308),
    ([1.5e308, 1.5e308, -1e308], 1.5e308 / 3 * 2 - 1e308 / 3),
    ([-1.7e308, -1.7e308, 1.0], (-1.7e308 / 3) * 2 + 1 / 3),
])
def test_mean_of_samples_whose_sum_overflows(window_cls: Any, samples: list[float],
                                             mean: float) -> None:
    # Their sum is no double, their mean is: it read NaN (the compensation overflowed).
    w = window_cls(len(samples))
    w.extend(samples)
    assert w.mean() == pytest.approx(mean, rel=1e-12)
    w.add(2.0)  # the first sample leaves: the sum is a double again
    assert w.mean() == pytest.approx(sum([*samples[1:], 2.0]) / len(samples), rel=1e-12)


def test_accepts_ints_numpy_scalars_and_bools(window_cls: Any) -> None:
    w = window_cls(10)
    w.add(3)
    w.add(np.float32(0.5))
    w.add(np.int64(-2))
    w.add(True)
    w.extend(np.array([1, 2], dtype=np.uint8))
    np.testing.assert_array_equal(w.values(), [3.0, 0.5, -2.0, 1.0, 1.0, 2.0])


def test_values_is_a_copy(window_cls: Any) -> None:
    w = window_cls(3)
    w.extend([1.0, 2.0])
    v = w.values()
    v[:] = 0
    w.add(3.0)
    np.testing.assert_array_equal(w.values(), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(v, [0.0, 0.0])


def test_percentiles_single_snapshot(window_cls: Any) -> None:
    w = window_cls(100)
    w.extend(range(100))
    assert w.percentiles([]) == []
    assert w.percentiles((0, 50, 100)) == [0.0, 49.5, 99.0]
    assert isinstance(w.percentiles([50])[0], float)


# -------------------------------------------------------------------- concurrency


def test_concurrent_adders_exact(window_cls: Any) -> None:
    threads_n, per_thread = 8, 3000
    w = window_cls(threads_n * per_thread)
    barrier = threading.Barrier(threads_n + 1)
    errors: list[BaseException] = []

    def adder(t: int) -> None:
        barrier.wait()
        try:
            for i in range(per_thread):
                if i % 3 == 2:
                    w.extend([t * 100_000 + i])
                else:
                    w.add(t * 100_000 + i)
                if i % 100 == 0:
                    w.percentiles([50, 99])
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        barrier.wait()
        try:
            for _ in range(500):
                p = w.percentiles([0, 50, 100])
                assert all(math.isnan(x) for x in p) or p[0] <= p[1] <= p[2]
                len(w)
                w.mean()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=adder, args=(t,)) for t in range(threads_n)]
    threads.append(threading.Thread(target=reader))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    expected = [t * 100_000 + i for t in range(threads_n) for i in range(per_thread)]
    assert w.total_count == len(expected) == len(w)
    got = w.values()
    assert sorted(got.tolist()) == expected
    assert got.sum() == sum(expected)
    for t in range(threads_n):                 # each thread's own order is kept
        mine = got[(got >= t * 100_000) & (got < (t + 1) * 100_000)]
        assert np.all(np.diff(mine) > 0)
    assert w.mean() == sum(expected) / len(expected)


def test_concurrent_batches_with_eviction(window_cls: Any) -> None:
    """Large extends (native: GIL released under the window's lock) from several
    threads with readers; afterwards everything is consistent."""
    threads_n, batches, size = 4, 10, 5000
    w = window_cls(7000)
    barrier = threading.Barrier(threads_n + 1)
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        barrier.wait()
        try:
            for b in range(batches):
                w.extend(np.full(size, float(t * 1000 + b)))
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        barrier.wait()
        try:
            for _ in range(200):
                w.percentile(99)
                w.values()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    threads.append(threading.Thread(target=reader))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert w.total_count == threads_n * batches * size
    assert len(w) == 7000
    got = w.values()
    # Extends are atomic: the window is the tail of one batch then one whole batch.
    assert len(set(got[2000:].tolist())) == 1
    assert len(set(got[:2000].tolist())) == 1
    check_against_model(w, deque(got.tolist()))


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("capacity", [0, -1, 2**26 + 1, 2**80])
def test_capacity_out_of_range(window_cls: Any, capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity"):
        window_cls(capacity)


@pytest.mark.parametrize("capacity", [2.5, 10.0, "10", None, True])
def test_capacity_not_an_int(window_cls: Any, capacity: Any) -> None:
    with pytest.raises(TypeError, match="capacity"):
        window_cls(capacity)


def test_largest_capacity(window_cls: Any) -> None:
    w = window_cls(2**26)
    assert w.capacity == 2**26
    w.extend([1.0, 2.0])
    assert w.percentile(50) == 1.5


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float64("nan")])
def test_add_non_finite(window_cls: Any, bad: float) -> None:
    w = window_cls(3)
    w.add(1.0)
    with pytest.raises(ValueError, match="finite"):
        w.add(bad)
    with pytest.raises(ValueError, match="finite"):
        w.extend([2.0, bad, 3.0])
    with pytest.raises(ValueError, match="finite"):
        w.extend(np.array([2.0, bad]))
    np.testing.assert_array_equal(w.values(), [1.0])    # all or nothing
    assert w.total_count == 1


@pytest.mark.parametrize("bad", ["1.0", b"1", None, [1.0], 1j])
def test_add_not_a_number(window_cls: Any, bad: Any) -> None:
    w = window_cls(3)
    with pytest.raises(TypeError):
        w.add(bad)
    with pytest.raises(TypeError):
        w.extend([1.0, bad])
    assert len(w) == 0 and w.total_count == 0


@pytest.mark.parametrize("bad", [5, 1.5, None])
def test_extend_not_iterable(window_cls: Any, bad: Any) -> None:
    with pytest.raises(TypeError):
        window_cls(3).extend(bad)


def test_extend_strings_refused(window_cls: Any) -> None:
    w = window_cls(3)
    with pytest.raises(TypeError):
        w.extend("12")
    with pytest.raises(TypeError):
        w.extend(np.array(["1", "2"]))
    assert len(w) == 0


@pytest.mark.parametrize("q", [-0.001, 100.0001, math.nan, math.inf, -1e300])
def test_percentile_out_of_range(window_cls: Any, q: float) -> None:
    w = window_cls(3)
    w.add(1.0)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        w.percentile(q)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        w.percentiles([50, q])
    empty = window_cls(3)
    with pytest.raises(ValueError):          # checked even when empty
        empty.percentile(q)


@pytest.mark.parametrize("q", ["50", None, [50]])
def test_percentile_not_a_number(window_cls: Any, q: Any) -> None:
    w = window_cls(3)
    with pytest.raises(TypeError):
        w.percentile(q)
    with pytest.raises(TypeError):
        w.percentiles([q])
    with pytest.raises(TypeError):
        w.percentiles(50)


# -------------------------------------------------------------------- native only


def test_native_large_capacity_allocates_lazily() -> None:
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    before = proc.memory_info().rss
    windows = [native_module.RollingWindow(2**26) for _ in range(8)]   # 8 x ~2 GiB if eager
    for w in windows:
        w.add(1.0)
    assert proc.memory_info().rss - before < 64 * 2**20
    del windows


def test_native_read_only_array_extend() -> None:
    a = np.arange(5.0)
    a.flags.writeable = False
    w = native_module.RollingWindow(10)
    w.extend(a)
    np.testing.assert_array_equal(w.values(), a)


def test_native_cannot_be_pickled() -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(native_module.RollingWindow(3))

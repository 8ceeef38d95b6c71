"""Reliability: bad input never crashes the process.

A Hypothesis search over arrays (0-d, empty, non-contiguous, Fortran order, byte-swapped,
object, string, complex, bool, datetime, a leading dimension far above small row and byte
caps) and non-array items through ``enqueue_predict``: each gets the result of the model
applied to it alone, or a clear exception at enqueue (docs/formats.md). Then the
native modules' public entry points get wrong types and values directly: each call
returns or raises an ordinary Python exception, never crashes.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchproc._native.batch_assembler import BatchAssembler
from batchproc._native.request_queue import QueueClosed, RequestQueue
from batchproc._native.rolling_window import RollingWindow

HANG = 10.0  # seconds: a guard against a hung processor, never a speed assertion

DTYPES = ["f8", "f4", "f2", "i8", "i4", "i2", "u1", "c16", "c8", "?", "U3", "S3",
          "M8[s]", "m8[ms]", "O", ">f8", ">i4", "<c16", ">U2"]
LAYOUTS = ["C", "F", "strided", "transposed", "swapped"]
ENOUGH = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])


def make_array(dtype: str, shape: tuple[int, ...], layout: str) -> np.ndarray:
    n = math.prod(shape)
    base = np.arange(n) % 7 + 1
    kind = np.dtype(dtype).kind
    if kind in "US":
        values = np.array([f"s{v}" for v in base], dtype=dtype)
    elif kind == "O":
        values = np.empty(n, dtype=object)
        for i, v in enumerate(base):
            values[i] = ("o", int(v)) if v % 2 else int(v)
    elif kind in "Mm":
        values = base.astype(dtype)
    elif kind == "b":
        values = (base % 2).astype(dtype)
    else:
        values = base.astype(dtype)
    arr = values.reshape(shape)
    if layout == "F":
        arr = np.asfortranarray(arr)
    elif layout == "strided" and arr.ndim >= 1:
        doubled = np.repeat(arr, 2, axis=0) if arr.shape[0] else arr
        arr = doubled[::2]
    elif layout == "transposed" and arr.ndim >= 2:
        arr = np.ascontiguousarray(np.swapaxes(arr, 0, 1)).swapaxes(0, 1)
    elif layout == "swapped" and kind not in "OUSb":
        arr = arr.astype(arr.dtype.newbyteorder("S"))
    return arr


shapes = st.one_of(
    st.just(()),                                                    # 0-d
    st.tuples(st.integers(0, 5)),                                   # 1-d, maybe empty
    st.tuples(st.integers(0, 5), st.integers(0, 4)),                # 2-d, (0, n) empty
    st.tuples(st.integers(0, 3), st.integers(1, 3), st.integers(1, 2)),
    st.tuples(st.integers(20, 300), st.integers(1, 40)),            # far above the caps
)
arrays = st.builds(make_array, st.sampled_from(DTYPES), shapes, st.sampled_from(LAYOUTS))
generic = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.binary(max_size=5),
                    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=2),
                    st.integers(), max_size=2), st.floats(allow_nan=False),
                    st.tuples(st.integers(), st.text(max_size=2)), st.builds(object))


def model(batch: Any) -> Any:
    """Identity, copied: the result of a request alone is the request itself."""
    if isinstance(batch, list):
        return list(batch)
    return np.array(batch, copy=True)


def same(result: Any, expected: Any) -> bool:
    if isinstance(expected, np.ndarray):
        return (isinstance(result, np.ndarray) and result.shape == expected.shape
                and result.dtype == expected.dtype.newbyteorder("=")
                and np.array_equal(result, expected))
    return result is expected or result == expected


@pytest.mark.parametrize("stack_items", [False, True], ids=["rows", "stacked"])
def test_odd_arrays_get_their_own_result_or_a_clear_error(make_processor, stack_items):
    # Small caps: the 20..300-row items (up to 96 KiB) exceed both the row cap and the
    # byte cap (max_batch_memory_mb=0.01 MiB, 10 KiB) and are split into chunks.
    p = make_processor(model, max_batch_size=8, initial_batch_size=8, max_workers=2,
                       max_batch_memory_mb=0.01, stack_items=stack_items,
                       max_queue_size=100, retry_delay=0.0, max_retries=0)
    tried = []

    @ENOUGH
    @given(st.lists(st.one_of(arrays, arrays, generic), min_size=1, max_size=4))
    def run(items: list[Any]) -> None:
        p.pause()  # the items of one example are batched together where compatible
        futures = []
        for x in items:
            tried.append(x)
            if isinstance(x, np.ndarray) and x.ndim == 0 and not stack_items:
                with pytest.raises(ValueError, match="0-d"):
                    p.enqueue_predict(x)
                continue
            futures.append((x, p.enqueue_predict(x)))
        p.resume()
        for x, f in futures:
            exc = f.exception(timeout=HANG)
            if exc is not None:
                raise AssertionError(f"{x!r} (dtype {getattr(x, 'dtype', None)}) failed: "
                                     f"{exc!r}")
            result = f.result(timeout=0)
            if isinstance(x, np.ndarray) and stack_items and x.ndim == 0:
                # out[i] of a stacked batch of 0-d samples is the scalar itself.
                expected = x[()]
            elif stack_items or not isinstance(x, np.ndarray):
                expected = x
            else:
                expected = model(x)
            assert same(result, expected), (x, result)

    run()
    assert len(tried) >= 300


def test_stacked_items_of_different_shapes_never_share_a_batch(make_processor):
    seen = []

    def record(batch):
        seen.append(batch.shape)
        return batch

    p = make_processor(record, stack_items=True, max_batch_size=16, initial_batch_size=16)
    p.pause()
    futures = [p.enqueue_predict(np.ones(n)) for n in (1, 2, 1, 3, 2)]
    p.resume()
    assert [f.result(timeout=HANG).shape for f in futures] == [(1,), (2,), (1,), (3,), (2,)]
    assert sorted(seen) == [(1, 3), (2, 1), (2, 2)]


# ---------------------------------------------------------------- native modules directly

ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=3),
    st.just(np.int64(3)), st.just(np.float32(1.5)), st.just([1, 2]), st.just(object()),
    st.just(np.array([1, 2])), st.just(np.array(7)), st.just(float("nan")),
    st.just(float("inf")), st.just(-0.0), st.just(2**63), st.just(-2**63 - 1),
)
EXPECTED = (TypeError, ValueError, OverflowError, MemoryError, queue.Full, QueueClosed)


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except EXPECTED:
        return None


@ENOUGH
@given(capacity=ODD, priorities=ODD, push=st.lists(st.tuples(ODD, ODD, ODD, ODD), max_size=4),
       pop=st.tuples(ODD, ODD, ODD, ODD), token=ODD)
def test_request_queue_entry_points_survive_odd_arguments(capacity, priorities, push, pop,
                                                          token):
    call(RequestQueue, capacity, priorities)
    q = RequestQueue(64, True)
    tokens = []
    for priority, rows, nbytes, key in push:
        tokens.append(call(q.push, "item", priority, rows, nbytes, key, 0))
    call(q.push, "item", 0, 1, 0, 0, pop[0])  # odd timeout (never blocks: room left)
    max_rows, max_bytes, fill, wait = pop
    call(q.pop_batch, max_rows, max_bytes, fill_rows=fill, max_wait=0.0, timeout=0)
    call(q.pop_batch, 4, 0, fill_rows=0, max_wait=wait if not isinstance(wait, float)
         or not wait > 0.01 else 0.0, idle_gap=fill, timeout=0)
    call(q.cancel, token)
    for t in tokens:
        if t is not None:
            call(q.cancel, t)
    assert len(q) >= 0 and q.rows >= 0
    q.close()
    assert isinstance(q.drain(), list)
    assert len(q) == 0


@ENOUGH
@given(buffers=ODD, arrays=st.lists(st.one_of(ODD, arrays), max_size=4),
       stacking=st.booleans())
def test_batch_assembler_entry_points_survive_odd_arguments(buffers, arrays, stacking):
    call(BatchAssembler, buffers)
    a = BatchAssembler(2)
    fn = a.stack if stacking else a.concat
    out = call(fn, arrays)
    if out is not None:
        expected = np.stack(arrays) if stacking else np.concatenate(arrays)
        assert out.shape == expected.shape and np.array_equal(out, expected)
    call(fn, iter(arrays))
    call(fn, tuple(arrays))


FIT = object()   # stands for the length or pad that fits the first array


@st.composite
def ragged(draw: st.DrawFn) -> list[np.ndarray]:
    """Arrays that concat_padded accepts, mostly: one dtype, one shape after axis 1."""
    dtype = draw(st.sampled_from(DTYPES))
    rest = draw(st.lists(st.integers(0, 2), max_size=2))
    return [make_array(dtype, (draw(st.integers(0, 3)), draw(st.integers(0, 5)), *rest),
                       draw(st.sampled_from(LAYOUTS)))
            for _ in range(draw(st.integers(1, 4)))]


@ENOUGH
@given(arrays=st.one_of(ragged(), st.lists(st.one_of(ODD, arrays), max_size=4)),
       length=st.one_of(st.just(FIT), st.integers(0, 400), ODD),
       pad=st.one_of(st.just(FIT), st.binary(max_size=17), ODD))
def test_batch_assembler_concat_padded_survives_odd_arguments(arrays, length, pad):
    first = arrays[0] if arrays and isinstance(arrays[0], np.ndarray) else None
    if length is FIT:
        length = max((x.shape[1] for x in arrays if isinstance(x, np.ndarray) and x.ndim > 1),
                     default=3)
    if pad is FIT:
        pad = bytes(first.itemsize if first is not None else 8)
    a = BatchAssembler(2)
    out = call(a.concat_padded, arrays, length, pad)
    if out is not None:
        assert out.shape == (sum(x.shape[0] for x in arrays), length, *arrays[0].shape[2:])
        for x, rows in zip(arrays, np.cumsum([x.shape[0] for x in arrays])):
            np.testing.assert_array_equal(out[rows - x.shape[0]:rows, :x.shape[1]], x)
    call(a.concat_padded, iter(arrays), length, pad)


@pytest.mark.parametrize("stacking", [False, True])
def test_batch_assembler_refuses_huge_batches_without_crashing(stacking):
    a = BatchAssembler(2)
    # Zero-stride views: no memory behind them, but 2**61 bytes (2 EiB) each to copy.
    huge = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(2**30, 2**28), strides=(0, 0))
    with pytest.raises((ValueError, MemoryError)):
        (a.stack if stacking else a.concat)([huge])
    overflow = huge
    with pytest.raises((ValueError, MemoryError)):
        (a.stack if stacking else a.concat)([overflow, overflow])
    # Still usable afterwards.
    assert np.array_equal(a.concat([np.ones((2, 1))]), np.ones((2, 1)))


def test_batch_assembler_is_not_shared_between_threads_silently():
    a = BatchAssembler(2)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)
    parts = [np.ones((1000, 64)) for _ in range(64)]

    def worker():
        barrier.wait()
        for _ in range(20):
            try:
                a.concat(parts)
            except RuntimeError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG)
    assert all("not thread-safe" in str(e) for e in errors)


@ENOUGH
@given(capacity=ODD, values=st.lists(ODD, max_size=5), q=ODD, qs=st.one_of(ODD, st.lists(ODD)))
def test_rolling_window_entry_points_survive_odd_arguments(capacity, values, q, qs):
    call(RollingWindow, capacity)
    w = RollingWindow(4)
    for v in values:
        call(w.add, v)
    call(w.extend, values)
    call(w.extend, qs)
    call(w.percentile, q)
    call(w.percentiles, qs)
    assert 0 <= len(w) <= 4
    for fn in (w.mean, w.min, w.max, w.values, w.clear):
        fn()

"""BatchAssembler: native module and its numpy twin run through the same tests."""

from __future__ import annotations

import gc
import importlib.machinery
import pickle
import warnings
from typing import Any

import numpy as np
import pytest
import reference_assembler
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from batchproc._native import batch_assembler as native_module

IMPLEMENTATIONS = {
    "native": native_module.BatchAssembler,
    "twin": reference_assembler.BatchAssembler,
}


@pytest.fixture(scope="module", params=sorted(IMPLEMENTATIONS))
def assembler_cls(request: pytest.FixtureRequest) -> Any:
    return IMPLEMENTATIONS[request.param]


def test_native_module_is_compiled() -> None:
    assert native_module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert native_module.BatchAssembler.__module__ == "batchproc._native.batch_assembler"


# --------------------------------------------------------------------- helpers

DTYPES = [
    np.dtype(t)
    for t in (
        "?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16",
        "M8[ns]", "m8[us]", ">f8", ">i4", ">c16", "S5", "U3", "V7",
        [("a", "<i4"), ("b", ">f8"), ("c", "S3")],
        [("x", "u1"), ("y", "<f4", (2,))],
    )
] + [
    np.dtype([("p", "u1"), ("q", "<i8")], align=True),  # padding bytes between fields
    np.dtype({"names": ["a", "b"], "formats": ["u1", ">i4"], "offsets": [0, 8],
              "itemsize": 16}),
]

LAYOUTS = ["C", "F", "flipped", "strided", "row-strided", "broadcast"]


def relayout(a: np.ndarray, layout: str) -> np.ndarray:
    """The same values as `a` (except 'broadcast') in a different memory layout."""
    if a.ndim == 0:
        return a
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "flipped":  # negative strides on every axis
        return np.flip(np.flip(a).copy())
    if layout == "strided" and a.ndim:
        b = np.zeros((*a.shape[:-1], a.shape[-1] * 2 + 1), dtype=a.dtype)
        b[..., 1::2] = a
        return b[..., 1::2]
    if layout == "row-strided" and a.ndim:
        b = np.zeros((a.shape[0] * 3, *a.shape[1:]), dtype=a.dtype)
        b[::3] = a
        return b[::3]
    if layout == "broadcast" and a.ndim and a.shape[0]:
        return np.broadcast_to(a[-1:], a.shape)  # zero stride on the sample axis
    return a


def padded_reference(items: list[np.ndarray], length: int, value: Any) -> np.ndarray:
    """Each item padded with `value` to `length` along axis 1, then concatenated."""
    fill = np.asarray(value, items[0].dtype)
    return np.concatenate([
        np.pad(a, [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
               constant_values=fill)
        for a in items])


def assert_same(out: np.ndarray, ref: np.ndarray, dtype: np.dtype) -> None:
    """out equals ref exactly: shape, values bit for bit, and out keeps the input dtype."""
    assert out.dtype == dtype
    assert out.shape == ref.shape
    assert out.flags.c_contiguous
    _assert_bits(out, ref)


def _assert_bits(out: np.ndarray, ref: np.ndarray) -> None:
    if out.dtype.names:
        # Compare field by field: padding bytes carry no value.
        for name in out.dtype.names:
            _assert_bits(out[name], ref[name])
    else:
        # NumPy >= 2 returns the canonical (native byte order) dtype; cast back to
        # compare raw bytes, which also checks NaN payloads and -0.0.
        assert out.tobytes() == ref.astype(out.dtype).tobytes()


@st.composite
def item_lists(draw: st.DrawFn, stacking: bool) -> tuple[np.dtype, list[np.ndarray]]:
    dtype = draw(st.sampled_from(DTYPES))
    trailing = draw(hnp.array_shapes(min_dims=0 if stacking else 0, max_dims=3,
                                     min_side=0, max_side=3))
    n = draw(st.integers(1, 8))
    items = []
    for _ in range(n):
        shape = trailing if stacking else (draw(st.integers(0, 4)), *trailing)
        if dtype.kind == "V" and not dtype.names:   # raw void: no inferred strategy
            raw = draw(hnp.arrays(np.uint8, (*shape, dtype.itemsize)))
            a = raw.view(dtype).reshape(shape)
        else:
            a = np.asarray(draw(hnp.arrays(dtype, shape)))   # shape () gives a scalar
        items.append(relayout(a, draw(st.sampled_from(LAYOUTS))))
    return dtype, items


# ------------------------------------------------------------ differential tests


@settings(max_examples=300)
@given(data=item_lists(stacking=False))
def test_concat_equals_numpy(assembler_cls: Any, data: tuple[np.dtype, list]) -> None:
    dtype, items = data
    ref = np.concatenate(items)
    out = assembler_cls().concat(items)
    assert_same(out, ref, dtype)


@settings(max_examples=300)
@given(data=item_lists(stacking=True))
def test_stack_equals_numpy(assembler_cls: Any, data: tuple[np.dtype, list]) -> None:
    dtype, items = data
    ref = np.stack(items)
    out = assembler_cls().stack(items)
    assert_same(out, ref, dtype)


def data_address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


@settings(max_examples=100)
@given(
    buffers=st.integers(1, 4),
    calls=st.lists(
        st.tuples(st.sampled_from(["concat", "stack", "padded"]), st.integers(0, 40),
                  st.sampled_from(["f4", "i2", "c16"]), st.booleans()),
        min_size=1, max_size=16),
)
def test_results_never_change_while_referenced(
        assembler_cls: Any, buffers: int, calls: list[tuple[str, int, str, bool]]) -> None:
    """A result that is kept never changes, whatever the calls after it (sizes, growth,
    methods); one that is dropped lets its buffer be written again."""
    asm = assembler_cls(buffers)
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    rng = np.random.default_rng(len(calls))
    for k, (method, rows, dt, keep) in enumerate(calls):
        if method == "stack":
            items = [rng.integers(-99, 99, size=3).astype(dt) for _ in range(max(rows, 1))]
            expected = np.stack(items)
            out = asm.stack(items)
        elif method == "concat":
            items = [rng.integers(-99, 99, size=(r, 3)).astype(dt)
                     for r in (rows // 2, rows - rows // 2)]
            expected = np.concatenate(items)
            out = asm.concat(items)
        else:
            items = [rng.integers(-99, 99, size=(r, 1 + r % 3, 2)).astype(dt)
                     for r in (rows // 2, rows - rows // 2)]
            expected = padded_reference(items, 3, np.zeros((), dt))
            out = asm.concat_padded(items, 3, np.zeros((), dt).tobytes())
        np.testing.assert_array_equal(out, expected)
        if keep:
            kept.append((out, expected))
        del out
        for j, (result, values) in enumerate(kept):
            np.testing.assert_array_equal(result, values, err_msg=f"kept {j} at call {k}")


class Holder:
    def __init__(self, value: Any) -> None:
        self.value = value


def test_views_at_any_depth_keep_their_values(assembler_cls: Any) -> None:
    """Hundreds of calls; each result is kept only through some view of it, nested in
    containers; every later call brings different values, so any reuse would show."""
    asm = assembler_cls(buffers=2)
    kept: list[tuple[Any, Any]] = []     # (how it is held, function giving the view back)

    def keep(k: int, out: np.ndarray) -> tuple[Any, Any]:
        form = k % 9
        if form == 0:      # a dict per row
            return [{"row": out[i]} for i in range(len(out))], lambda h: np.stack(
                [d["row"] for d in h])
        if form == 1:      # an object keeping a slice
            return Holder(out[1:]), lambda h: h.value
        if form == 2:      # views of views of views
            return out[::-1][1:][::-1], lambda h: h
        if form == 3:
            return {"a": [(np.flip(out),)]}, lambda h: h["a"][0][0]
        if form == 4:
            return memoryview(out), lambda h: np.asarray(h)
        if form == 5:      # a view whose parent result was deleted
            view = out.reshape(-1)[2:]
            return view, lambda h: h
        if form == 6:      # a view of a memoryview of a view
            return np.asarray(memoryview(out[:, 1:])), lambda h: h
        if form == 7:      # the result itself, deep in a list
            return [[[out]]], lambda h: h[0][0][0]
        return Holder(Holder(out.T)), lambda h: h.value.value

    expected: list[np.ndarray] = []
    for k in range(300):
        rows = 2 + k % 5
        items = [np.full((rows, 3), k, np.int32) + np.arange(3, dtype=np.int32)]
        out = asm.concat(items)
        held, get = keep(k, out)
        expected.append(np.array(get(held), copy=True))
        kept.append((held, get))
        del out, held
        if k % 50 == 49 or k == 299:
            for j, ((h, g), values) in enumerate(zip(kept, expected)):
                np.testing.assert_array_equal(g(h), values, err_msg=f"kept {j} at call {k}")


def test_torch_tensor_keeps_its_buffer(assembler_cls: Any) -> None:
    torch = pytest.importorskip("torch")
    asm = assembler_cls(buffers=1)
    tensor = torch.from_numpy(asm.concat([np.arange(8.0)])[2:])
    for _ in range(5):
        asm.concat([np.full(8, -1.0)])
    assert tensor.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


@pytest.mark.parametrize("method", ["concat", "stack", "padded"])
def test_buffer_is_reused_once_no_view_is_alive(assembler_cls: Any, method: str) -> None:
    asm = assembler_cls(buffers=2)

    def call(value: float) -> np.ndarray:
        if method == "concat":
            return asm.concat([np.full((3, 4), value)])
        if method == "stack":
            return asm.stack([np.full(4, value)] * 3)
        return asm.concat_padded([np.full((3, 2, 4), value)], 3,
                                 np.float64(-1.5).tobytes())

    first = call(1.0)
    address = data_address(first)
    view = {"deep": [first[1:][::-1]]}
    del first
    call(2.0)                                # buffer 1
    third = call(3.0)                        # buffer 0 is still viewed: a fresh one
    assert data_address(third) != address
    assert (view["deep"][0][:, :2] == 1.0).all()
    address = data_address(third)
    del third, view
    call(4.0)
    assert data_address(call(5.0)) == address    # nothing views it: reused

    # Dropped as soon as made: the calls alternate between the same two buffers.
    addresses = [data_address(call(float(v))) for v in range(20)]
    assert len(set(addresses)) == 2 and address in addresses
    assert addresses[0::2] == addresses[0:1] * 10


def test_dropped_result_buffer_is_reused_in_rotation(assembler_cls: Any) -> None:
    asm = assembler_cls(buffers=3)
    x = [np.ones((3, 5), np.float32)] * 4
    first = asm.concat(x)
    address = data_address(first)
    keep = memoryview(first)[1:]
    del first
    asm.concat(x)
    asm.concat(x)
    del keep                                # nothing views buffer 0 any more
    assert data_address(asm.concat(x)) == address


def test_growth_keeps_earlier_result_alive(assembler_cls: Any) -> None:
    asm = assembler_cls(buffers=1)
    small = asm.concat([np.arange(4, dtype=np.float64)])
    before = asm.nbytes
    big = asm.concat([np.ones(10_000)])          # replaces the only buffer
    assert asm.nbytes > before
    junk = [np.full(10_000, 7.0) for _ in range(20)]   # reuse freed memory if any
    np.testing.assert_array_equal(small, np.arange(4.0))
    np.testing.assert_array_equal(big, np.ones(10_000))
    del junk


def test_result_outlives_assembler(assembler_cls: Any) -> None:
    asm = assembler_cls()
    out = asm.concat([np.arange(1000, dtype=np.int64)])
    del asm
    gc.collect()
    junk = [np.full(1000, -1, dtype=np.int64) for _ in range(50)]
    np.testing.assert_array_equal(out, np.arange(1000))
    del junk


def test_buffers_are_reused_not_reallocated(assembler_cls: Any) -> None:
    """Results dropped before their buffer comes round again: the same two buffers."""
    asm = assembler_cls(buffers=2)
    x = [np.ones((3, 5), np.float32)] * 4
    first = data_address(asm.concat(x))
    second = data_address(asm.concat(x))
    size = asm.nbytes
    assert data_address(asm.concat(x)) == first
    assert data_address(asm.concat(x)) == second
    assert asm.nbytes == size
    smaller = asm.concat(x[:1])                    # a smaller batch fits: no growth
    assert asm.nbytes == size
    assert smaller.shape == (3, 5)
    assert data_address(smaller) == first


def test_a_viewed_buffer_is_let_go_not_counted(assembler_cls: Any) -> None:
    """nbytes counts the buffers the assembler holds now: one it replaced because a
    result still viewed it lives on in that result only."""
    asm = assembler_cls(buffers=1)
    big = asm.concat([np.zeros((1000, 8))])        # 64000 bytes -> a 65536-byte buffer
    assert asm.nbytes == 65536
    small = asm.concat([np.ones((2, 8))])          # big is alive: a fresh, small buffer
    assert asm.nbytes == 128
    assert (big == 0).all() and (small == 1).all()
    address = data_address(small)
    del big, small
    again = asm.concat([np.full((2, 8), 2.0)])     # nothing views it: reused
    assert data_address(again) == address and asm.nbytes == 128


def test_growth_is_geometric(assembler_cls: Any) -> None:
    asm = assembler_cls(buffers=1)
    sizes = set()
    for rows in range(1, 2000, 7):
        asm.concat([np.zeros((rows, 4), np.float32)])
        sizes.add(asm.nbytes)
    assert asm.nbytes >= 2000 * 16
    assert len(sizes) <= 12      # powers of two, not one allocation per size


def test_overlaps_tells_views_of_the_buffers_from_other_memory(assembler_cls: Any) -> None:
    """What a worker asks of a model's output: would a later batch overwrite it?"""
    asm = assembler_cls(buffers=2)
    assert not asm.overlaps(np.ones(3))            # no buffer yet
    first = asm.concat([np.arange(12.0).reshape(6, 2)])
    second = asm.concat([np.ones((4, 2))])
    for view in (first, second, first[2:3], first[::-1], first.T, first[:, 1],
                 first.reshape(-1), second[3]):
        assert asm.overlaps(view), view
    assert asm.overlaps(first[5:, 1:]) and asm.overlaps(np.flip(second))
    for other in (first.copy(), np.ones((6, 2)), first[:0], np.float64(1.0), [1.0, 2.0],
                  None, "x", memoryview(b"ab")):
        assert not asm.overlaps(other), other


def test_overlaps_forgets_a_buffer_it_grew_out_of(assembler_cls: Any) -> None:
    asm = assembler_cls(buffers=1)
    small = asm.concat([np.ones((2, 2))])
    big = asm.concat([np.ones((1000, 2))])         # the only buffer is replaced
    assert asm.overlaps(big)
    assert not asm.overlaps(small)                 # no later batch can overwrite it


def test_results_are_aligned_writeable_and_contiguous(assembler_cls: Any) -> None:
    asm = assembler_cls(buffers=3)
    for rows in (1, 3, 17, 1000):
        out = asm.concat([np.ones((rows, 3), np.float16)])
        assert out.ctypes.data % 64 == 0
        assert out.flags.writeable and out.flags.c_contiguous
        out[:] = 2                                 # process_func may work in place
        assert out.base is not None


class RawArray:
    """Memory given by address alone: an array made from it references nothing."""

    def __init__(self, address: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__array_interface__ = {"data": (address, False), "shape": shape,
                                    "typestr": typestr, "version": 3}


@pytest.mark.parametrize("method", ["concat", "padded"])
def test_input_aliasing_the_target_buffer_by_address(assembler_cls: Any, method: str) -> None:
    """Nothing references the buffer, yet an input points into it: the reference
    count alone would reuse the buffer while reading from it; the overlap check
    gives the call a fresh one."""
    asm = assembler_cls(buffers=1)
    asm.concat([np.zeros((100, 2))])                 # room for the next calls: no growth
    prev = asm.concat([np.arange(12.0).reshape(6, 2)])
    address, values = data_address(prev), prev.copy()
    del prev
    alias = np.asarray(RawArray(address, (6, 2), "<f8"))
    if method == "concat":
        out = asm.concat([alias[::-1], alias])
        expected = np.concatenate([values[::-1], values])
    else:
        out = asm.concat_padded([alias[None], alias[None, ::-1]], 8,
                                np.float64(-1.5).tobytes())
        expected = padded_reference([values[None], values[None, ::-1]], 8, -1.5)
    del alias                       # its memory went with the buffer the call replaced
    assert data_address(out) != address
    np.testing.assert_array_equal(out, expected)


def test_input_that_aliases_the_target_buffer(assembler_cls: Any) -> None:
    """A view of an earlier result (same buffer as this call's target) as input."""
    asm = assembler_cls(buffers=1)
    asm.concat([np.zeros((100, 2))])                 # room for the next calls: no growth
    prev = asm.concat([np.arange(12.0).reshape(6, 2)])
    items = [prev[::-1], prev[1:3], prev]
    expected = np.concatenate(items)
    out = asm.concat(items)
    np.testing.assert_array_equal(out, expected)


def test_zero_rows_and_zero_itemsize(assembler_cls: Any) -> None:
    asm = assembler_cls()
    out = asm.concat([np.zeros((0, 3, 2), np.int32)] * 3)
    assert out.shape == (0, 3, 2) and out.dtype == np.int32
    out = asm.stack([np.zeros((0, 2))] * 4)
    assert out.shape == (4, 0, 2)
    empty_struct = np.dtype([])
    out = asm.concat([np.zeros(3, empty_struct), np.zeros(2, empty_struct)])
    assert out.shape == (5,) and out.dtype == empty_struct


def test_stack_zero_d_items(assembler_cls: Any) -> None:
    items = [np.array(v, dtype=">i8") for v in (3, -1, 7)]
    out = assembler_cls().stack(items)
    assert out.dtype == np.dtype(">i8")
    np.testing.assert_array_equal(out, [3, -1, 7])


def test_accepts_tuples_and_generators(assembler_cls: Any) -> None:
    asm = assembler_cls()
    items = [np.full((2, 2), i) for i in range(3)]
    np.testing.assert_array_equal(asm.concat(tuple(items)), np.concatenate(items))
    np.testing.assert_array_equal(asm.stack(a for a in items), np.stack(items))


# -------------------------------------------------------------------- bad input


@pytest.mark.parametrize("buffers", [0, -1, 17, 2**70])
def test_buffers_out_of_range(assembler_cls: Any, buffers: int) -> None:
    with pytest.raises((ValueError, OverflowError), match="buffers"):
        assembler_cls(buffers)


@pytest.mark.parametrize("buffers", [2.0, "2", None, True])
def test_buffers_not_an_int(assembler_cls: Any, buffers: Any) -> None:
    with pytest.raises(TypeError, match="buffers"):
        assembler_cls(buffers)


def test_buffers_property(assembler_cls: Any) -> None:
    assert assembler_cls().buffers == 2
    assert assembler_cls(16).buffers == 16
    assert assembler_cls(3).nbytes == 0


@pytest.mark.parametrize("method", ["concat", "stack"])
def test_empty_list(assembler_cls: Any, method: str) -> None:
    with pytest.raises(ValueError, match="at least one"):
        getattr(assembler_cls(), method)([])


@pytest.mark.parametrize("method", ["concat", "stack"])
@pytest.mark.parametrize("bad", [[1.0, 2.0], None, "ab", np.float64(1.0)])
def test_non_ndarray_item(assembler_cls: Any, method: str, bad: Any) -> None:
    items = [np.zeros((1, 2)), np.zeros((1, 2)), bad]
    with pytest.raises(TypeError, match="item 2"):
        getattr(assembler_cls(), method)(items)
    with pytest.raises(TypeError, match="item 0"):
        getattr(assembler_cls(), method)([bad, np.zeros((1, 2))])


@pytest.mark.parametrize("method", ["concat", "stack"])
def test_not_iterable(assembler_cls: Any, method: str) -> None:
    with pytest.raises(TypeError):
        getattr(assembler_cls(), method)(5)


@pytest.mark.parametrize("method", ["concat", "stack"])
@pytest.mark.parametrize("dtype", [
    np.dtype(object),
    np.dtype([("a", "f8"), ("b", "O")]),
    np.dtypes.StringDType(),
])
def test_object_arrays_are_refused(assembler_cls: Any, method: str, dtype: Any) -> None:
    a = np.empty((2, 2), dtype=dtype)
    with pytest.raises(TypeError, match="object arrays are never raw-copied"):
        getattr(assembler_cls(), method)([a, a])


def test_zero_d_in_concat(assembler_cls: Any) -> None:
    asm = assembler_cls()
    with pytest.raises(ValueError, match="item 0 is a 0-d"):
        asm.concat([np.array(1.0), np.array(2.0)])
    with pytest.raises(ValueError, match="item 1 is a 0-d"):
        asm.concat([np.ones(2), np.array(2.0)])


@pytest.mark.parametrize("method", ["concat", "stack"])
def test_mismatched_dtype(assembler_cls: Any, method: str) -> None:
    items = [np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32),
             np.zeros((1, 2), np.float64)]
    with pytest.raises(ValueError, match=r"item 2 .*float64.*item 0 .*float32"):
        getattr(assembler_cls(), method)(items)
    with pytest.raises(ValueError, match="item 1"):     # byte order counts
        getattr(assembler_cls(), method)([np.zeros((1, 2), "<f8"), np.zeros((1, 2), ">f8")])


def test_mismatched_trailing_shape(assembler_cls: Any) -> None:
    items = [np.zeros((2, 3)), np.zeros((5, 3)), np.zeros((2, 4))]
    with pytest.raises(ValueError, match=r"item 2 .*\(4,\).*item 0 .*\(3,\)"):
        assembler_cls().concat(items)
    with pytest.raises(ValueError, match="item 1"):
        assembler_cls().concat([np.zeros((2, 3)), np.zeros((2, 3, 1))])


def test_stack_mismatched_shape(assembler_cls: Any) -> None:
    with pytest.raises(ValueError, match=r"item 1 .*\(2, 3\).*item 0 .*\(3, 3\)"):
        assembler_cls().stack([np.zeros((3, 3)), np.zeros((2, 3))])


def test_too_many_dimensions_for_stack(assembler_cls: Any) -> None:
    a = np.zeros((1,) * 64)
    with pytest.raises(ValueError, match="dimensions"):
        assembler_cls().stack([a])


def test_size_overflow(assembler_cls: Any) -> None:
    """Virtual (stride-0) arrays whose total size overflows: an error, no allocation."""
    huge = np.broadcast_to(np.zeros(1), (2**59,))       # 2**62 bytes each, 8 bytes real
    asm = assembler_cls()
    with pytest.raises(ValueError, match="too large"):
        asm.concat([huge, huge])
    with pytest.raises(ValueError, match="too large"):
        asm.stack([huge, huge, huge])
    assert asm.nbytes == 0
    np.testing.assert_array_equal(asm.concat([np.ones(3)]), np.ones(3))


def test_absurd_size_is_a_memory_error(assembler_cls: Any) -> None:
    huge = np.broadcast_to(np.zeros(1, np.uint8), (2**49,))   # 2 x 512 TiB: cannot map
    asm = assembler_cls()
    with pytest.raises(MemoryError):
        asm.concat([huge, huge])
    assert asm.nbytes == 0
    np.testing.assert_array_equal(asm.concat([np.ones(3)]), np.ones(3))


def test_failed_call_leaves_earlier_results_intact(assembler_cls: Any) -> None:
    asm = assembler_cls(buffers=2)
    a = asm.concat([np.arange(5)])
    with pytest.raises(ValueError):
        asm.concat([np.arange(5), np.arange(5.0)])
    b = asm.concat([np.arange(5) * 2])
    np.testing.assert_array_equal(a, np.arange(5))
    np.testing.assert_array_equal(b, np.arange(5) * 2)


# ---------------------------------------------------------------- concat_padded

PAD_DTYPES = [np.dtype(t) for t in (
    "?", "i1", "u1", "i2", "u4", "i8", "f2", "f4", "f8", "c8", "c16", ">f8", ">i2", "M8[s]")]


@st.composite
def padded_items(draw: st.DrawFn) -> tuple[np.dtype, list[np.ndarray], int, np.ndarray]:
    dtype = draw(st.sampled_from(PAD_DTYPES))
    rest = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3))
    lengths = draw(st.lists(st.integers(0, 6), min_size=1, max_size=6))
    length = max(lengths) + draw(st.integers(0, 3))
    items = []
    for seq_len in lengths:
        shape = (draw(st.integers(0, 3)), seq_len, *rest)
        a = np.asarray(draw(hnp.arrays(dtype, shape)))
        items.append(relayout_padded(a, draw(st.sampled_from([*LAYOUTS, "transposed"]))))
    values = hnp.from_dtype(dtype)
    if dtype.kind in "fc":      # -1.5: bytes that are not all equal, as most values
        values = st.one_of(st.sampled_from([0.0, -0.0, -1.5, 1.0]), values)
    fill = np.asarray(draw(values)).astype(dtype)
    return dtype, items, length, fill


def relayout_padded(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == "transposed":      # the same values, axes 0 and 1 swapped in memory
        return np.swapaxes(np.swapaxes(a, 0, 1).copy(), 0, 1)
    return relayout(a, layout)


@settings(max_examples=400)
@given(data=padded_items())
def test_concat_padded_equals_numpy(assembler_cls: Any, data: tuple) -> None:
    dtype, items, length, fill = data
    ref = padded_reference(items, length, fill)
    out = assembler_cls().concat_padded(items, length, fill.tobytes())
    assert_same(out, ref, dtype)


def test_concat_padded_small_example(assembler_cls: Any) -> None:
    items = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[7, 8]], np.float32),
             np.zeros((0, 4), np.float32), np.zeros((1, 0), np.float32)]
    out = assembler_cls().concat_padded(items, 4, np.float32(-1.5).tobytes())
    assert out.shape == (4, 4) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, [[0, 1, 2, -1.5], [3, 4, 5, -1.5],
                                        [7, 8, -1.5, -1.5], [-1.5] * 4])


@pytest.mark.parametrize("layout", ["C", "F", "flipped", "strided", "row-strided",
                                    "broadcast", "transposed"])
@pytest.mark.parametrize("fill", [0.0, -1.5, float("nan")])
def test_concat_padded_large_batch(assembler_cls: Any, layout: str, fill: float) -> None:
    """Above the size where the native copy runs without the GIL; many rows, each a
    different tail length (the pad pattern is reused from the longest tail so far)."""
    rng = np.random.default_rng(7)
    items = [relayout_padded(rng.random((int(rng.integers(1, 4)), int(n), 5), np.float32),
                             layout)
             for n in rng.integers(0, 300, size=40)]
    length = max(a.shape[1] for a in items) + 3
    out = assembler_cls().concat_padded(items, length, np.float32(fill).tobytes())
    assert out.nbytes > 1 << 16
    assert_same(out, padded_reference(items, length, np.float32(fill)), np.dtype("f4"))


def padded_bytes_reference(items: list[np.ndarray], length: int, pad: bytes) -> np.ndarray:
    """The expected result built byte by byte: each row's values, then the pad bytes."""
    rest = items[0].shape[2:]
    per_position = int(np.prod(rest, dtype=np.int64))
    chunks = []
    for a in items:
        c = np.ascontiguousarray(a)
        for r in range(a.shape[0]):
            chunks += [c[r].tobytes(), pad * ((length - a.shape[1]) * per_position)]
    rows = sum(a.shape[0] for a in items)
    return np.frombuffer(b"".join(chunks), dtype=items[0].dtype).reshape(
        rows, length, *rest)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_concat_padded_any_dtype(assembler_cls: Any, dtype: np.dtype) -> None:
    """Strings, structured and raw void dtypes: the pad is bytes, never a value."""
    raw = np.random.default_rng(3).integers(0, 256, size=(5, 4, 2, dtype.itemsize),
                                            dtype=np.uint8)
    whole = raw.view(dtype).reshape(5, 4, 2)
    items = [whole[:2, :3], whole[2:3, :1], relayout(whole[3:], "F"), whole[:1, ::-1]]
    pad = bytes(range(1, dtype.itemsize + 1))
    out = assembler_cls().concat_padded(items, 5, pad)
    assert_same(out, padded_bytes_reference(items, 5, pad), dtype)


def test_concat_padded_zero_sizes(assembler_cls: Any) -> None:
    asm = assembler_cls()
    pad = np.int16(-2).tobytes()
    out = asm.concat_padded([np.zeros((0, 3), np.int16)] * 2, 5, pad)
    assert out.shape == (0, 5) and out.dtype == np.int16
    out = asm.concat_padded([np.zeros((2, 0), np.int16), np.zeros((1, 0), np.int16)], 3, pad)
    np.testing.assert_array_equal(out, np.full((3, 3), -2))
    out = asm.concat_padded([np.zeros((2, 0), np.int16)], 0, pad)
    assert out.shape == (2, 0)
    out = asm.concat_padded([np.zeros((2, 1, 0, 3), np.int16),
                             np.zeros((1, 4, 0, 3), np.int16)], 4, pad)
    assert out.shape == (3, 4, 0, 3)
    empty_struct = np.dtype([])
    out = asm.concat_padded([np.zeros((2, 1), empty_struct)], 3, b"")
    assert out.shape == (2, 3) and out.dtype == empty_struct


def test_concat_padded_length_accepts_index_types(assembler_cls: Any) -> None:
    out = assembler_cls().concat_padded([np.ones((1, 2))], np.int64(3), bytes(8))
    np.testing.assert_array_equal(out, [[1, 1, 0]])


def test_concat_padded_empty_list(assembler_cls: Any) -> None:
    with pytest.raises(ValueError, match="at least one"):
        assembler_cls().concat_padded([], 3, bytes(8))


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], None, "ab", np.float64(1.0)])
def test_concat_padded_non_ndarray_item(assembler_cls: Any, bad: Any) -> None:
    ok = np.zeros((1, 2))
    with pytest.raises(TypeError, match="item 2"):
        assembler_cls().concat_padded([ok, ok, bad], 3, bytes(8))
    with pytest.raises(TypeError, match="item 0"):
        assembler_cls().concat_padded([bad, ok], 3, bytes(8))


@pytest.mark.parametrize("dtype", [np.dtype(object), np.dtype([("a", "f8"), ("b", "O")])])
def test_concat_padded_refuses_object_arrays(assembler_cls: Any, dtype: np.dtype) -> None:
    a = np.empty((2, 2), dtype=dtype)
    with pytest.raises(TypeError, match="object arrays are never raw-copied"):
        assembler_cls().concat_padded([a, a], 3, bytes(dtype.itemsize))


def test_concat_padded_needs_two_dimensions(assembler_cls: Any) -> None:
    asm = assembler_cls()
    with pytest.raises(ValueError, match=r"item 0 has shape \(3,\).*at least 2-d"):
        asm.concat_padded([np.zeros(3), np.zeros((1, 3))], 3, bytes(8))
    with pytest.raises(ValueError, match=r"item 1 has shape \(\).*at least 2-d"):
        asm.concat_padded([np.zeros((1, 3)), np.array(1.0)], 3, bytes(8))


def test_concat_padded_mismatched_dtype(assembler_cls: Any) -> None:
    items = [np.zeros((1, 2), np.float32)] * 2 + [np.zeros((1, 2), np.float64)]
    with pytest.raises(ValueError, match=r"item 2 .*float64.*item 0 .*float32"):
        assembler_cls().concat_padded(items, 3, bytes(4))


def test_concat_padded_mismatched_rest(assembler_cls: Any) -> None:
    asm = assembler_cls()
    items = [np.zeros((2, 3, 3)), np.zeros((1, 1, 3)), np.zeros((1, 2, 4))]
    with pytest.raises(ValueError,
                       match=r"item 2 has shape \(1, 2, 4\) but item 0 has shape \(2, 3, 3\)"):
        asm.concat_padded(items, 3, bytes(8))
    with pytest.raises(ValueError,
                       match=r"item 1 has shape \(2, 3\) but item 0 has shape \(2, 3, 3\)"):
        asm.concat_padded([np.zeros((2, 3, 3)), np.zeros((2, 3))], 3, bytes(8))


def test_concat_padded_item_longer_than_length(assembler_cls: Any) -> None:
    items = [np.zeros((2, 4)), np.zeros((1, 5))]
    with pytest.raises(ValueError, match=r"item 1 has shape \(1, 5\).*5 is more than length=4"):
        assembler_cls().concat_padded(items, 4, bytes(8))


@pytest.mark.parametrize("length", [2.0, "4", None, True])
def test_concat_padded_length_not_an_int(assembler_cls: Any, length: Any) -> None:
    with pytest.raises(TypeError, match="length must be an int"):
        assembler_cls().concat_padded([np.zeros((1, 2))], length, bytes(8))


@pytest.mark.parametrize("length", [-1, 2**70])
def test_concat_padded_length_out_of_range(assembler_cls: Any, length: int) -> None:
    with pytest.raises(ValueError, match="length"):
        assembler_cls().concat_padded([np.zeros((1, 2))], length, bytes(8))


@pytest.mark.parametrize("pad", ["\0" * 8, 0, 0.0, np.float64(0.0), bytearray(8),
                                 memoryview(bytes(8)), None])
def test_concat_padded_pad_not_bytes(assembler_cls: Any, pad: Any) -> None:
    with pytest.raises(TypeError, match=r"pad must be bytes .*np.asarray"):
        assembler_cls().concat_padded([np.zeros((1, 2))], 3, pad)


@pytest.mark.parametrize("size", [0, 4, 9])
def test_concat_padded_pad_of_the_wrong_size(assembler_cls: Any, size: int) -> None:
    with pytest.raises(ValueError, match=rf"pad has {size} bytes .*itemsize 8"):
        assembler_cls().concat_padded([np.zeros((1, 2))], 3, bytes(size))


def test_concat_padded_size_overflow(assembler_cls: Any) -> None:
    huge = np.broadcast_to(np.zeros((1, 1)), (2**59, 1))     # 2**62 bytes, 8 real
    asm = assembler_cls()
    with pytest.raises(ValueError, match="too large"):
        asm.concat_padded([huge, huge], 1, bytes(8))
    with pytest.raises(ValueError, match="too large"):
        asm.concat_padded([np.zeros((1, 1))], 2**62, bytes(8))
    with pytest.raises(ValueError, match="too large"):
        asm.concat_padded([np.zeros((3, 1))], 2**61, bytes(8))
    assert asm.nbytes == 0
    np.testing.assert_array_equal(asm.concat_padded([np.ones((1, 1))], 2, bytes(8)),
                                  [[1, 0]])


def test_concat_padded_absurd_size_is_a_memory_error(assembler_cls: Any) -> None:
    huge = np.broadcast_to(np.zeros((1, 1), np.uint8), (2**49, 1))   # 2 x 512 TiB
    asm = assembler_cls()
    with pytest.raises(MemoryError):
        asm.concat_padded([huge, huge], 1, b"\0")
    assert asm.nbytes == 0


# ------------------------------------------------------------------ native only


def test_native_large_copy_releases_the_gil() -> None:
    """A copy above the no-GIL threshold still gives the exact result (and a second
    thread can run meanwhile); exercised from two threads with two assemblers."""
    import threading

    items = [np.random.default_rng(i).random((512, 64)) for i in range(4)]
    expected = np.concatenate(items)
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work() -> None:
        asm = native_module.BatchAssembler()
        barrier.wait()
        try:
            for _ in range(20):
                np.testing.assert_array_equal(asm.concat(items), expected)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_native_cannot_be_pickled() -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(native_module.BatchAssembler())


def _base_chain(out: Any) -> list[Any]:
    chain = []
    while (out := out.base) is not None and isinstance(out, np.ndarray):
        chain.append(out)
    return [*chain, out]


@pytest.mark.parametrize("build", ["concat", "stack", "concat_padded"])
def test_a_result_s_base_chain_reaches_its_own_batch_only(assembler_cls: Any,
                                                           build: str) -> None:
    # A buffer reused for a smaller batch still holds, past it, rows an earlier batch
    # wrote there (other callers'); nothing reached through ``.base`` may show them.
    asm = assembler_cls(buffers=1)
    make = {"concat": lambda rows, v: asm.concat([np.full((rows, 4), v)]),
            "stack": lambda rows, v: asm.stack([np.full(4, v)] * rows),
            "concat_padded": lambda rows, v: asm.concat_padded(
                [np.full((rows, 4), v)], 4, np.zeros(1).tobytes())}[build]
    first = make(16, 1000.0)
    address = first.ctypes.data
    del first
    out = make(2, -1.0)
    assert out.ctypes.data == address             # the same buffer, written again
    row = out[1:]
    chain = _base_chain(row)
    arrays = [a for a in chain if isinstance(a, np.ndarray)]
    assert arrays and all(a.nbytes <= out.nbytes for a in arrays), chain
    assert not any((np.asarray(a) >= 1000).any() for a in [row, *arrays])
    holder = chain[-1]
    assert holder is not None and not isinstance(holder, np.ndarray)
    assert np.asarray(holder).size <= out.nbytes  # whatever it shows is the batch's
    if assembler_cls is native_module.BatchAssembler:
        with pytest.raises(TypeError, match="pickle"):  # __reduce__ would hand it out
            pickle.dumps(holder)


# ------------------------------------------------------------ first_changed_dtype


def test_first_changed_dtype_finds_an_array_whose_dtype_changed_in_place() -> None:
    # ``a.dtype = ...`` keeps the shape when the itemsize is the same: only the dtype
    # tells that the bytes are no longer what was queued.
    first_changed_dtype = native_module.first_changed_dtype
    arrays = [np.zeros((1, 2)) for _ in range(4)]
    assert first_changed_dtype(arrays, np.dtype(np.float64)) == -1
    assert first_changed_dtype(tuple(arrays), np.dtype(np.float64)) == -1
    assert first_changed_dtype(iter(arrays), np.dtype(np.float64)) == -1
    assert first_changed_dtype([], np.dtype(np.float64)) == -1
    with warnings.catch_warnings():  # numpy 2.5 deprecates setting it, but still does it
        warnings.simplefilter("ignore", DeprecationWarning)
        arrays[2].dtype = np.int64
        arrays[3].dtype = np.uint64
    assert first_changed_dtype(arrays, np.dtype(np.float64)) == 2
    assert first_changed_dtype(arrays, np.dtype(np.int64)) == 0


@pytest.mark.parametrize("queued, now, changed", [
    ("<f8", ">f8", True),            # byte order counts
    ("<f8", "=f8", False),           # another object for the same dtype
    ("f8", np.dtype("f8", metadata={"unit": "m"}), False),  # metadata does not
    ("i8", "u8", True),
    ("S8", "f8", True),
    ([("a", "<i4"), ("b", "<f4")], [("a", "<i4"), ("b", "<i4")], True),
    ("O", "O", False),
])
def test_first_changed_dtype_compares_dtypes_as_numpy_s_equivalence(queued: Any, now: Any,
                                                                     changed: bool) -> None:
    arrays = [np.zeros(2, queued), np.zeros(2, now)]
    assert native_module.first_changed_dtype(arrays, np.dtype(queued)) == (1 if changed else -1)


def test_first_changed_dtype_counts_what_is_not_an_array_as_changed() -> None:
    assert native_module.first_changed_dtype([np.zeros(1), [0.0]], np.dtype("f8")) == 1
    with pytest.raises(TypeError, match=r"dtype must be a numpy\.dtype, not str"):
        native_module.first_changed_dtype([np.zeros(1)], "f8")

"""Pure-Python twin of batchproc._native.batch_assembler, used only by the tests.

Same contract as the native BatchAssembler (validation, errors, buffer rotation,
reuse only while no view of a buffer is alive, growth to powers of two, 64-byte
alignment), built on np.concatenate / np.stack writing into the rotating buffers with
``out=``, and slice assignment for concat_padded.
"""

from __future__ import annotations

import ctypes
import operator
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

MAX_BUFFERS = 16
MAX_DIMS = 64
ALIGN = 64
MAX_CAPACITY = 1 << 62

# sys.getrefcount of an object held only by a list, read as ``the_list[i]``: the list's
# reference plus the temporary one of the expression (how _claim reads its owners).
_PROBE = [object()]
_OWN_REFS = sys.getrefcount(_PROBE[0])


def _hold(owner: np.ndarray[Any, Any], start: int, nbytes: int) -> Any:
    """The batch's bytes of ``owner`` as an object that is not an array (the native
    ``_BufferHold``'s part): a result's base chain ends at the batch, never at the
    whole buffer, which holds what earlier batches left past this one's bytes."""
    return (ctypes.c_char * nbytes).from_buffer(owner, start)


class BatchAssembler:
    """Copies items into reused, pre-allocated batch buffers (reference version)."""

    def __init__(self, buffers: int = 2) -> None:
        if isinstance(buffers, bool):
            raise TypeError(f"buffers must be an int, not {type(buffers).__name__}")
        try:
            n = operator.index(buffers)
        except TypeError:
            raise TypeError(f"buffers must be an int, not {type(buffers).__name__}") from None
        if not 1 <= n <= MAX_BUFFERS:
            raise ValueError(f"buffers must be in 1..{MAX_BUFFERS}, got {n}")
        self._buffers = n
        self._owners: list[np.ndarray[Any, Any] | None] = [None] * n
        self._caps = [0] * n
        self._next = 0

    @property
    def buffers(self) -> int:
        return self._buffers

    @property
    def nbytes(self) -> int:
        return sum(self._caps)

    def overlaps(self, obj: object) -> bool:
        return (isinstance(obj, np.ndarray) and obj.size > 0 and any(
            owner is not None and np.may_share_memory(obj, owner) for owner in self._owners))

    def concat(self, arrays: Iterable[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
        return self._assemble(arrays, stacking=False)

    def stack(self, arrays: Iterable[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
        return self._assemble(arrays, stacking=True)

    def concat_padded(self, arrays: Iterable[np.ndarray[Any, Any]], length: int,
                      pad: bytes) -> np.ndarray[Any, Any]:
        if isinstance(length, bool):
            raise TypeError("length must be an int, not bool")
        try:
            n_length = operator.index(length)
        except TypeError:
            raise TypeError(f"length must be an int, not {type(length).__name__}") from None
        if n_length < 0:
            raise ValueError(f"length must be >= 0, got {n_length}")
        if n_length >= 1 << 63:
            raise ValueError(f"length {n_length} is too large")
        if not isinstance(pad, bytes):
            raise TypeError(
                "pad must be bytes (the fill value encoded in the items' dtype, e.g. "
                f"np.asarray(value, dtype).tobytes()), not {type(pad).__name__}")
        seq = tuple(arrays)
        if not seq:
            raise ValueError("need at least one array to concatenate")
        for i, a in enumerate(seq):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"item {i} is {type(a).__name__}, not numpy.ndarray")
            if i == 0:
                if a.dtype.hasobject:
                    raise TypeError(
                        f"item 0 has dtype {a.dtype!r}, which holds Python object "
                        "references: object arrays are never raw-copied")
                if a.ndim < 2:
                    raise ValueError(
                        f"item 0 has shape {a.shape}: concat_padded needs items of shape "
                        "(rows, length, ...), at least 2-d")
                if len(pad) != a.dtype.itemsize:
                    raise ValueError(
                        f"pad has {len(pad)} bytes but dtype {a.dtype!r} has itemsize "
                        f"{a.dtype.itemsize}")
                first = a
            else:
                if a.dtype != first.dtype:
                    raise ValueError(
                        f"item {i} has dtype {a.dtype!r} but item 0 has dtype {first.dtype!r}")
                if a.ndim < 2:
                    raise ValueError(
                        f"item {i} has shape {a.shape}: concat_padded needs items of shape "
                        "(rows, length, ...), at least 2-d")
                if a.shape[2:] != first.shape[2:]:
                    raise ValueError(
                        f"item {i} has shape {a.shape} but item 0 has shape {first.shape}")
            if a.shape[1] > n_length:
                raise ValueError(
                    f"item {i} has shape {a.shape}: its length {a.shape[1]} is more than "
                    f"length={n_length}")
        dtype = first.dtype
        shape = (sum(a.shape[0] for a in seq), n_length, *first.shape[2:])
        total = dtype.itemsize
        for d in shape:
            total *= d
        if total > MAX_CAPACITY:
            raise ValueError(f"batch of shape {shape} is too large to assemble")

        slot = self._next
        owner, _replaced = self._claim(slot, total, seq)
        start = (-owner.ctypes.data) % ALIGN
        out = np.ndarray(shape, dtype=dtype, buffer=_hold(owner, start, total))
        if out.size and dtype.itemsize:
            out[...] = np.frombuffer(pad, dtype=dtype)
        row = 0
        for a in seq:
            rows, seq_len = a.shape[:2]
            out[row:row + rows, :seq_len] = a
            row += rows
        self._next = (slot + 1) % self._buffers
        return out

    def _assemble(self, arrays: Iterable[np.ndarray[Any, Any]], stacking: bool) -> Any:
        seq = tuple(arrays)
        if not seq:
            verb = "stack" if stacking else "concatenate"
            raise ValueError(f"need at least one array to {verb}")
        for i, a in enumerate(seq):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"item {i} is {type(a).__name__}, not numpy.ndarray")
            if i == 0:
                if a.dtype.hasobject:
                    raise TypeError(
                        f"item 0 has dtype {a.dtype!r}, which holds Python object "
                        "references: object arrays are never raw-copied")
                first = a
                if not stacking and a.ndim == 0:
                    raise ValueError("item 0 is a 0-d array: concat needs a leading sample axis")
                out_nd = a.ndim + 1 if stacking else a.ndim
                if out_nd > MAX_DIMS:
                    raise ValueError(f"result would have {out_nd} dimensions")
                continue
            if a.dtype != first.dtype:
                raise ValueError(
                    f"item {i} has dtype {a.dtype!r} but item 0 has dtype {first.dtype!r}")
            if stacking:
                if a.shape != first.shape:
                    raise ValueError(
                        f"item {i} has shape {a.shape} but item 0 has shape {first.shape}")
            else:
                if a.ndim == 0:
                    raise ValueError(f"item {i} is a 0-d array: concat needs a leading axis")
                if a.shape[1:] != first.shape[1:]:
                    raise ValueError(
                        f"item {i} has trailing shape {a.shape[1:]} but item 0 has "
                        f"trailing shape {first.shape[1:]}")
        dtype = first.dtype
        if stacking:
            shape = (len(seq), *first.shape)
        else:
            shape = (sum(a.shape[0] for a in seq), *first.shape[1:])
        total = dtype.itemsize
        for d in shape:
            total *= d
        if total > MAX_CAPACITY:
            raise ValueError(f"batch of shape {shape} is too large to assemble")

        slot = self._next
        owner, _replaced = self._claim(slot, total, seq)
        start = (-owner.ctypes.data) % ALIGN
        out: Any = np.ndarray(shape, dtype=dtype, buffer=_hold(owner, start, total))
        if stacking:
            np.stack(seq, out=out)
        else:
            np.concatenate(seq, out=out)
        self._next = (slot + 1) % self._buffers
        return out

    def _claim(self, slot: int, need: int, seq: tuple[np.ndarray[Any, Any], ...],
               ) -> tuple[np.ndarray[Any, Any], Any]:
        """Buffer `slot`, ready for `need` bytes, and the buffer it replaced (or None),
        which the caller keeps alive through its copy (an input may alias it by address)."""
        # Reuse only if nothing but our list references the owner: every view of a
        # result references it, directly or through its base chain.
        viewed = (self._owners[slot] is not None
                  and sys.getrefcount(self._owners[slot]) > _OWN_REFS)
        replaced = self._owners[slot]
        overlap = replaced is not None and any(
            a.size and np.may_share_memory(a, replaced) for a in seq)
        if replaced is None or viewed or overlap or self._caps[slot] < need:
            return self._grow(slot, need), replaced
        return replaced, None

    def _grow(self, slot: int, need: int) -> np.ndarray[Any, Any]:
        cap = ALIGN
        while cap < need:
            cap <<= 1
        try:
            owner = np.empty(cap + ALIGN - 1, dtype=np.uint8)
        except MemoryError:
            if cap == need:
                raise
            cap = need
            owner = np.empty(cap + ALIGN - 1, dtype=np.uint8)
        self._owners[slot] = owner
        self._caps[slot] = cap
        return owner

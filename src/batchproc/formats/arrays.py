"""numpy arrays: rows concatenated (or samples stacked) natively into reused buffers.

An array item carries a leading sample axis: a batch concatenates rows along axis 0 and
each request gets its rows back (Triton, TF Serving). With ``stack_items`` each item is
one sample: a batch stacks them on a new axis 0 (Ray Serve, PyTorch's collate). Arrays
share a batch when their dtype and trailing shape are equal (axis 1 excepted when it is
padded: ``padding.py``). Byte-swapped arrays are copied once into native order at
enqueue; other layouts (non-contiguous, Fortran, negative strides) are copied by the
assembler. Object arrays go through numpy's own concatenation, never a raw copy, and so
do ndarray subclasses (masked arrays keep their masks: ``numpy.ma``'s concatenation),
which share a batch only with their own class.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._native.batch_assembler import first_changed_dtype
from ..errors import ItemChangedError
from .base import BatchFormat, Description, Family, LeafFormat, Workspace
from .padding import Padding, pad_bytes

_ndarray = np.ndarray
_newaxis = np.newaxis


def _max_dims() -> int:
    """The most dimensions a numpy array may have: 64 since numpy 2.0, 32 before."""
    try:
        np.empty((1,) * 64)
    except ValueError:
        return 32
    return 64


# A stacked batch has one axis more than its items.
MAX_STACKED_DIMS = _max_dims() - 1


class ArrayLeaf:
    """Builds one input position of a batch from numpy arrays (of class ``cls``)."""

    __slots__ = ("_dtype", "_numpy", "_pad", "_stacked")

    def __init__(self, dtype: np.dtype[Any], stacked: bool, pad: Any,
                 cls: type = np.ndarray) -> None:
        self._dtype = dtype
        self._stacked = stacked
        # Object arrays and subclasses are numpy's to join; the assembler copies raw bytes.
        self._numpy = None
        # Plain arrays never touch np.ma: its first use imports numpy.ma (milliseconds, on
        # a caller's first request).
        if cls is not np.ndarray and issubclass(cls, np.ma.MaskedArray):
            self._numpy = np.ma.stack if stacked else np.ma.concatenate
        elif dtype.hasobject or cls is not np.ndarray:
            self._numpy = np.stack if stacked else np.concatenate
        if pad is not None and cls is not np.ndarray:
            raise ValueError(f"{cls.__name__} items cannot be padded; send plain arrays")
        if stacked and issubclass(cls, np.matrix):
            raise ValueError("np.matrix items cannot be stacked as samples: a matrix is "
                             "always 2-D, so the batch would have no sample axis; send "
                             "np.asarray(item)")
        self._pad = None if pad is None else pad_bytes(pad, dtype)

    @property
    def padded(self) -> bool:
        return self._pad is not None

    def build(self, items: list[Any] | tuple[Any, ...], workspace: Workspace, position: int,
              padded_length: int) -> Any:
        # Before anything reads an item as the dtype it was queued with.
        _check_dtypes(items, self._dtype)
        if self._pad is not None:
            if self._stacked:  # each sample is one row of a padded batch
                items = [item[_newaxis] for item in items]
            return workspace.assembler(position).concat_padded(items, padded_length, self._pad)
        if self._numpy is not None:
            return self._numpy(items)
        assembler = workspace.assembler(position)
        return assembler.stack(items) if self._stacked else assembler.concat(items)


def _check_dtypes(items: list[Any] | tuple[Any, ...], dtype: np.dtype[Any]) -> None:
    """``ItemChangedError`` unless every array still has the dtype it was queued with.
    ``a.dtype = ...`` changes it in place, and keeps the shape when the itemsize is the
    same: the assembler would copy the array's bytes as its new dtype (the whole batch,
    were it the first: a float64 format's model called with an int64 batch), and numpy's
    concatenation (object arrays, subclasses) would promote the batch to it, every
    caller's result with it. Failing the batch lets the failure search find the item and
    fail it alone, as a resized one. One native pass over the batch's items."""
    changed = first_changed_dtype(items, dtype)
    if changed >= 0:
        raise ItemChangedError(
            f"an array is {items[changed].dtype} where {dtype} was queued: it changed after "
            "it was queued (an item must not change until its result has come)")


def describe_array(item: Any, stacked: bool, padding: Padding | None, name: object,
                   ) -> tuple[tuple[Any, ...], Any, int, int, int]:
    """``(signature, item, rows, nbytes, length)`` of one array (an item, or one input of
    a mapping or tuple item called ``name``). ``ValueError`` for a 0-d array that needs a
    sample axis, and for one that has no room for the axis ``stack_items`` adds."""
    dtype = item.dtype
    if not dtype.isnative:
        # Byte-swapped input: copied once into native order so batches are native.
        item = item.astype(dtype.newbyteorder("="))
        dtype = item.dtype
    shape = item.shape
    if stacked:
        if len(shape) > MAX_STACKED_DIMS:
            raise ValueError(
                f"stack_items adds a sample axis: an array of {len(shape)} dimensions "
                f"would make a batch of {len(shape) + 1}, more than numpy's "
                f"{MAX_STACKED_DIMS + 1}")
        rows, trailing = 1, shape
    else:
        if not shape:
            raise ValueError(
                "0-d arrays have no sample axis to batch along; pass x.reshape(1) "
                "or use stack_items=True")
        rows, trailing = shape[0], shape[1:]
        if dtype.kind == "O" and item.size and _holds_sequences(item):
            raise ValueError(
                "an object array of sequences (ragged rows) cannot be batched by rows: "
                "send each sequence as an array of its own"
                + ("" if padding is not None else
                   " and set pad_value to batch sequences of different lengths together"))
    length = 0
    pad = None if padding is None else padding.value_for(name, trailing)
    if pad is not None:
        length = trailing[0]
        trailing = (-1, *trailing[1:])  # the padded axis is free
    # Dtypes that differ only in their metadata compare equal; a batch carries its first
    # item's dtype, so each caller's metadata keeps to batches of its own: by the dtype's
    # identity (equal metadata in two dtype objects only costs two batches). Its id is
    # not reused while the key lives: the format made for it keeps this dtype.
    metadata = None if dtype.metadata is None else id(dtype)
    return (("array", dtype, trailing, stacked, pad, type(item), metadata), item, rows,
            item.nbytes, length)


def _holds_sequences(item: Any) -> bool:
    """Whether an object array holds a list or an array anywhere (ragged rows).

    Every element is looked at, so the answer never depends on where the sequence is;
    the pass runs in C (``type`` of each element, gathered in a set), costing about
    what copying the array into a batch does, not a Python step per element. Only
    object arrays need it: no other dtype (StringDType, structured) can hold a list.
    """
    return any(issubclass(t, (list, _ndarray)) for t in set(map(type, item.flat)))


def _cut_rows(item: Any, start: int, stop: int) -> Any:
    return item[start:stop]


class ArrayFamily(Family):
    """numpy arrays (subclasses included)."""

    def __init__(self, stacked: bool, padding: Padding | None) -> None:
        self._stacked = stacked
        self._padding = padding

    def describe(self, item: Any) -> Description | None:
        if not isinstance(item, _ndarray):
            return None
        return describe_array(item, self._stacked, self._padding, None)

    def make_format(self, signature: Any) -> BatchFormat:
        _, dtype, trailing, stacked, pad, cls, _ = signature
        kind = "arrays" if cls is np.ndarray else cls.__name__
        label = (f"{'stacked ' if stacked else ''}{kind} of {dtype}, trailing shape {trailing}"
                 + ("" if pad is None else f", padded with {pad!r}"))
        return LeafFormat(ArrayLeaf(dtype, stacked, pad, cls), stacked, self._padding, _cut_rows,
                          label, trailing)

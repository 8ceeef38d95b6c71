"""Type stub for the compiled module batchproc._native.batch_assembler."""

from collections.abc import Iterable
from typing import Any, final

import numpy as np

@final
class BatchAssembler:
    """Copies items into reused, pre-allocated batch buffers.

    Not thread-safe: each worker owns one. A result is a view into the next buffer of
    a rotation of ``buffers``. A result's buffer is reused only once no view of it is
    alive (a later call writes into a fresh buffer instead); so a result never changes
    while anybody can see it. A view is anything referencing the result or its buffer,
    at any depth (slices of slices, ``np.flip``, ``memoryview``, ``torch.from_numpy``,
    a dict or object holding one); a raw address (``ctypes.data``) is not. Rotating
    over ``buffers`` lets the last ``buffers - 1`` results stay in use while the
    buffers are still reused.
    """

    def __init__(self, buffers: int = 2) -> None: ...
    @property
    def buffers(self) -> int: ...
    @property
    def nbytes(self) -> int:
        """Usable bytes of the buffers the assembler holds now (at most one per slot).
        A buffer it let go of because a result still viewed it lives on in that result
        and is no longer counted."""
    def overlaps(self, obj: object) -> bool:
        """Whether ``obj`` is a non-empty ndarray whose memory intersects one of the
        buffers this assembler holds now. Such an output is safe to deliver: a buffer
        is never written while a view of it is alive."""
    def concat(self, arrays: Iterable[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
        """Rows of every array along axis 0; equal to ``np.concatenate(arrays)``."""
    def stack(self, arrays: Iterable[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
        """One sample per array along a new axis 0; equal to ``np.stack(arrays)``."""
    def concat_padded(self, arrays: Iterable[np.ndarray[Any, Any]], length: int,
                      pad: bytes) -> np.ndarray[Any, Any]:
        """Ragged sequences padded to ``length`` and concatenated along axis 0.

        Item i has shape ``(r_i, L_i, *rest)`` (at least 2-d; one dtype and one
        ``rest`` for all items; ``L_i <= length``). The result is C-contiguous, of shape
        ``(sum r_i, length, *rest)``: item i's rows hold its values in ``[:, :L_i]``
        and ``pad`` everywhere after. ``pad`` is one value already encoded in the
        dtype, exactly ``itemsize`` bytes: ``np.asarray(value, dtype).tobytes()``.

        Raises TypeError for an item that is not an ndarray, an object dtype, a
        ``length`` that is not an int, a ``pad`` that is not bytes; ValueError for no
        items, an item under 2-d, a different dtype or ``rest`` (naming the item and
        both shapes), ``L_i > length``, ``length < 0``, ``pad`` of the wrong size, a
        size that overflows; MemoryError if the buffer cannot be allocated.
        """

def first_changed_dtype(arrays: Iterable[Any], dtype: np.dtype[Any]) -> int:
    """The index of the first of ``arrays`` whose dtype is no longer equivalent to
    ``dtype`` (the one it was queued with: ``a.dtype = ...`` changes it in place), or
    -1; an item that is not an ndarray counts as changed. One pass in C. TypeError
    unless ``dtype`` is a ``numpy.dtype``."""

"""Type stub for the compiled module batchproc._native.batch_assembler."""

from collections.abc import Iterable
from typing import Any, final

import numpy as np

@final
class BatchAssembler:
    """Copies items into reused, pre-allocated batch buffers.

    Not thread-safe: each worker owns one. A result is a view into the next buffer of
    a rotation of ``buffers``; the result of call k stays intact through call
    k + buffers - 1 and may be overwritten from call k + buffers on. A result keeps its
    own buffer alive (numpy base chain), also after the assembler grows.
    """

    def __init__(self, buffers: int = 2) -> None: ...
    @property
    def buffers(self) -> int: ...
    @property
    def nbytes(self) -> int:
        """Total usable bytes currently allocated across buffers."""
    def overlaps(self, obj: object) -> bool:
        """Whether ``obj`` is a non-empty ndarray whose memory intersects one of this
        assembler's buffers (which later batches overwrite)."""
    def concat(self, arrays: Iterable[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
        """Rows of every array along axis 0; equal to ``np.concatenate(arrays)``."""
    def stack(self, arrays: Iterable[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
        """One sample per array along a new axis 0; equal to ``np.stack(arrays)``."""

"""What a request is to the queue, and how a batch is built from requests and split back.

``ItemDescriber.describe`` runs once per request (cheap attribute reads and one dict
lookup); the row copies themselves are native (``BatchAssembler``).

Conventions (DESIGN.md "Semantics"):

* ``ndarray`` items carry a leading sample axis: batches concatenate rows and each
  request gets ``out[start:end]`` (Triton / TF Serving). With ``stack_items`` each item
  is one sample: batches stack on a new axis and request ``i`` gets ``out[i]``.
* Anything else is batched as a list and request ``i`` gets ``out[i]``.
* Only items with equal dtype and trailing shape share a batch: they share a
  compatibility key. Object arrays go through numpy's own concatenation, never a raw copy.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from ._native.batch_assembler import BatchAssembler
from .errors import BatchOutputError

# The key shared by all non-array items: they are batched together as Python lists.
GENERIC_KEY = 0

# A queued request: (future, item, rows, enqueue time). A tuple, because one is built per
# request on the hot path.
Request = tuple["Future[Any]", Any, int, float]


class ItemDescriber:
    """Validates an item and gives its rows, bytes and compatibility key."""

    def __init__(self, stack_items: bool) -> None:
        self._stack = stack_items
        self._keys: dict[tuple[Any, ...], int] = {}
        self._next_key = itertools.count(GENERIC_KEY + 1)
        self._lock = threading.Lock()

    def describe(self, item: Any) -> tuple[Any, int, int, int]:
        """Return ``(item, rows, nbytes, key)``; the item may be a normalised copy."""
        if not isinstance(item, np.ndarray):
            return item, 1, 0, GENERIC_KEY
        dtype = item.dtype
        if not dtype.isnative:
            # Byte-swapped input: copied once into native order so batches are native.
            item = item.astype(dtype.newbyteorder("="))
            dtype = item.dtype
        shape = item.shape
        if self._stack:
            rows, trailing = 1, shape
        else:
            if not shape:
                raise ValueError(
                    "0-d arrays have no sample axis to batch along; pass x.reshape(1) "
                    "or use stack_items=True")
            rows, trailing = shape[0], shape[1:]
        signature = (dtype, trailing)
        key = self._keys.get(signature)
        if key is None:
            key = self._key_for(signature)
        return item, rows, item.nbytes, key

    def _key_for(self, signature: tuple[Any, ...]) -> int:
        with self._lock:
            key = self._keys.get(signature)
            if key is None:
                if len(self._keys) >= 4096:
                    # Bounded memo: new keys are never reused, so forgetting old ones only
                    # stops items of an old signature from sharing a batch with newer ones.
                    self._keys.clear()
                key = self._keys[signature] = next(self._next_key)
            return key


class BatchBuilder:
    """Builds batches for one worker and splits outputs; owns that worker's buffers."""

    def __init__(self, stack_items: bool) -> None:
        self._stack = stack_items
        self._assembler = BatchAssembler(2)

    def build(self, items: Sequence[Any]) -> tuple[Any, int]:
        """The batch to pass to ``process_func`` and its expected output length."""
        first = items[0]
        if not isinstance(first, np.ndarray):
            return list(items), len(items)
        if self._stack:
            if first.dtype.hasobject:
                return np.stack(items), len(items)
            return self._assembler.stack(items), len(items)
        if first.dtype.hasobject:
            batch = np.concatenate(items)
        else:
            batch = self._assembler.concat(items)
        return batch, batch.shape[0]

    def check_output(self, out: Any, batch: Any, expected: int) -> Any:
        """Validate the output's length; copy it out of our buffer if it aliases it."""
        try:
            length = len(out)
        except TypeError:
            raise BatchOutputError(
                f"process_func returned {type(out).__name__}, which has no length; "
                f"expected {expected} results") from None
        if length != expected:
            raise BatchOutputError(
                f"process_func returned {length} results for a batch of {expected}")
        if isinstance(batch, np.ndarray):
            # A batch not built in our buffers (object dtype) is never reused: only
            # memory of the assembler's buffers can change under a delivered result.
            overlaps = self._assembler.overlaps
            if isinstance(out, np.ndarray):
                if overlaps(out):
                    # The output is (a view of) the reused input buffer: copy it out
                    # before the buffer is reused, so a delivered result never changes.
                    out = out.copy()
            elif isinstance(out, (list, tuple)) and any(map(overlaps, out)):
                # A sequence of views of the buffer (``list(batch)``): the same, per element.
                out = [o.copy() if overlaps(o) else o for o in out]
        return out

    def split(self, out: Any, requests: Sequence[Request]) -> list[Any]:
        """Each request's part of a checked output, in request order."""
        n = len(requests)
        if self._stack or not isinstance(requests[0][1], np.ndarray):
            return [out[i] for i in range(n)]
        if type(out) is np.ndarray and out.ndim:
            if n == 1:
                # One request (every batch at low load): the checked output is its part.
                return [out]
            for request in requests:
                if request[2] != 1:
                    break
            else:
                # One row each (the usual case): numpy makes the (1, ...) views in C, a
                # third cheaper per row than slicing them one by one.
                return list(out.reshape((n, 1, *out.shape[1:])))
        parts = []
        start = 0
        for request in requests:
            end = start + request[2]
            parts.append(out[start:end])
            start = end
        return parts

    def chunks(self, item: np.ndarray, max_rows: int, max_bytes: int) -> list[np.ndarray]:
        """Split an item too large for one batch into chunks that fit both caps."""
        rows = item.shape[0]
        row_bytes = item.nbytes // rows if rows else 0
        step = max_rows
        if max_bytes and row_bytes:
            # A single row larger than the byte cap goes alone in its own batch.
            step = max(1, min(step, max_bytes // row_bytes))
        return [item[i:i + step] for i in range(0, rows, step)]

    def join(self, parts: list[Any]) -> Any:
        if all(isinstance(p, np.ndarray) for p in parts):
            return np.concatenate(parts)
        joined: list[Any] = []
        for part in parts:
            joined.extend(part)
        return joined

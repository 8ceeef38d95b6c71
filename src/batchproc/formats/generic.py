"""Generic objects (strings, images, DataFrames, lists of sentences): batched as a list.

``process_func`` gets a list of the items, in order, and returns one result per item
(any output the output rule accepts, counted per item). Every generic item may share a
batch with every other. Each counts for one sample toward ``max_batch_size`` unless
``item_size`` says otherwise (Ray Serve's ``batch_size_fn``): a request carrying 32
sentences can count for 32. An item larger than the cap goes alone (it cannot be cut).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._native.future_state import Request, items_of, total_rows
from .._native.request_queue import MAX_COUNT
from .base import BatchFormat, Built, Description, Family, Workspace

_SIGNATURE = ("generic",)


class GenericFormat(BatchFormat):
    """A batch of arbitrary objects, passed to the model as a list."""

    one_sample = True

    def __repr__(self) -> str:
        return "<generic objects>"

    def build(self, requests: list[Request], workspace: Workspace) -> Built:
        items = items_of(requests)
        return Built(items, len(items), total_rows(requests))


class GenericFamily(Family):
    """Anything: the last family asked."""

    def __init__(self, item_size: Callable[[Any], int] | None) -> None:
        self._item_size = item_size

    def describe(self, item: Any) -> Description:
        size = self._item_size
        return _SIGNATURE, item, 1 if size is None else _samples(size, item), 0, 0

    def make_format(self, signature: Any) -> BatchFormat:
        return GenericFormat()


def _samples(item_size: Callable[[Any], int], item: Any) -> int:
    """``item_size(item)``, checked: a positive int, else an error naming the item's type."""
    try:
        size = item_size(item)
    except Exception as exc:
        raise ValueError(
            f"item_size raised {type(exc).__name__}: {exc} (for a {type(item).__name__} "
            "item)") from exc
    # numpy's bool too: older numpy gives it an index (0 or 1), with a warning.
    if isinstance(size, (bool, np.bool_)) or not hasattr(size, "__index__"):
        raise TypeError(
            f"item_size must return an int, got {size!r} for a {type(item).__name__} item")
    size = size.__index__()
    if size < 1:
        raise ValueError(
            f"item_size must return a positive number of samples, got {size} for a "
            f"{type(item).__name__} item")
    if size > MAX_COUNT:
        raise ValueError(
            f"item_size returned {size} samples for a {type(item).__name__} item; one "
            f"request counts for at most {MAX_COUNT}")
    return size

"""Pure-Python twin of batchproc._native.rolling_window, used only by the tests:
a deque of the last `capacity` samples and numpy.percentile over a copy of it."""

from __future__ import annotations

import math
import operator
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np

MAX_CAPACITY = 1 << 26


def _as_float(value: Any) -> float:
    """Convert like CPython's PyFloat_AsDouble: __float__, then __index__; no strings."""
    if isinstance(value, float):
        return value
    if isinstance(value, (str, bytes)):     # numpy.str_ has a __float__ that parses
        raise TypeError(f"must be real number, not {type(value).__name__}")
    method = getattr(type(value), "__float__", None)
    if method is not None:
        return float(method(value))
    try:
        return float(operator.index(value))
    except TypeError:
        raise TypeError(f"must be real number, not {type(value).__name__}") from None


class RollingWindow:
    """Fixed-capacity window over the most recent samples (reference version)."""

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool):
            raise TypeError("capacity must be an int, not bool")
        try:
            cap = operator.index(capacity)
        except TypeError:
            raise TypeError(
                f"capacity must be an int, not {type(capacity).__name__}") from None
        if not 1 <= cap <= MAX_CAPACITY:
            raise ValueError(f"capacity must be in 1..{MAX_CAPACITY}, got {cap}")
        self._capacity = cap
        self._items: deque[float] = deque(maxlen=cap)
        self._total = 0
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def total_count(self) -> int:
        with self._lock:
            return self._total

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def add(self, value: Any) -> None:
        x = _as_float(value)
        if not math.isfinite(x):
            raise ValueError(f"value must be finite, got {x!r}")
        with self._lock:
            self._items.append(x)
            self._total += 1

    def extend(self, values: Iterable[Any]) -> None:
        xs = []
        for i, v in enumerate(values):
            x = _as_float(v)
            if not math.isfinite(x):
                raise ValueError(f"values[{i}] must be finite, got {x!r}")
            xs.append(x)
        with self._lock:
            self._items.extend(xs)
            self._total += len(xs)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def _snapshot(self) -> np.ndarray[Any, np.dtype[np.float64]]:
        with self._lock:
            return np.array(self._items, dtype=np.float64)

    def mean(self) -> float:
        a = self._snapshot()
        if not a.size:
            return math.nan
        with np.errstate(over="ignore"):
            mean = float(a.mean())
        # numpy reads inf where the sum overflows though the mean does not: scale first.
        return mean if math.isfinite(mean) else float((a / a.size).sum())

    def min(self) -> float:
        a = self._snapshot()
        return float(a.min()) if a.size else math.nan

    def max(self) -> float:
        a = self._snapshot()
        return float(a.max()) if a.size else math.nan

    @staticmethod
    def _check_q(q: Any) -> float:
        x = _as_float(q)
        if not 0.0 <= x <= 100.0:
            raise ValueError(f"percentile q must be in [0, 100], got {x!r}")
        return x

    def percentile(self, q: float) -> float:
        x = self._check_q(q)
        a = self._snapshot()
        return float(np.percentile(a, x)) if a.size else math.nan

    def percentiles(self, qs: Iterable[float]) -> list[float]:
        xs = [self._check_q(q) for q in qs]
        a = self._snapshot()
        if not a.size:
            return [math.nan] * len(xs)
        return [float(np.percentile(a, x)) for x in xs]

    def values(self) -> np.ndarray[Any, np.dtype[np.float64]]:
        return self._snapshot()

"""Type stub for the compiled module batchproc._native.rolling_window."""

from collections.abc import Iterable
from typing import Final, SupportsFloat, SupportsIndex, final

import numpy as np
import numpy.typing as npt

MAX_CAPACITY: Final[int]
"""The most samples a window may hold (2**26): ``capacity``'s upper bound."""

@final
class RollingWindow:
    """Fixed-capacity window over the most recent samples; thread-safe."""

    def __init__(self, capacity: int) -> None: ...
    @property
    def capacity(self) -> int: ...
    @property
    def total_count(self) -> int:
        """Samples ever added, including those evicted or cleared."""
    def __len__(self) -> int: ...
    def add(self, value: SupportsFloat | SupportsIndex) -> None:
        """Add one sample; NaN and +-inf raise ValueError."""
    def extend(self, values: Iterable[SupportsFloat | SupportsIndex]) -> None:
        """Add every value, oldest first; nothing is added if any value is bad."""
    def clear(self) -> None: ...
    def mean(self) -> float: ...
    def min(self) -> float: ...
    def max(self) -> float: ...
    def percentile(self, q: float) -> float:
        """``numpy.percentile(window, q)`` ('linear'); q in [0, 100]; nan when empty."""
    def percentiles(self, qs: Iterable[float]) -> list[float]: ...
    def values(self) -> npt.NDArray[np.float64]:
        """A float64 copy of the window, oldest first."""

"""Pure-Python twin of ``batchproc._native.intake.KnownArrays``: a dict by (dtype, shape),
forgotten whole at its limit; a dtype with metadata is not its plain twin."""

from typing import Any

import numpy as np


class KnownArraysReference:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: dict[tuple[Any, Any], tuple[Any, ...]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, item: Any) -> tuple[Any, ...] | None:
        if type(item) is not np.ndarray:
            return None
        entry = self.entries.get((item.dtype, item.shape))
        if entry is None or (entry[6] is not item.dtype and item.dtype.metadata is not None):
            return None
        return entry

    def add(self, item: Any, entry: tuple[Any, ...]) -> None:
        if len(self.entries) >= self.limit:
            self.entries.clear()
        self.entries[item.dtype, item.shape] = entry

    def clear(self) -> None:
        self.entries.clear()

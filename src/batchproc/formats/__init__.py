"""Batch formats: what batchproc does with each kind of data (docs/formats.md).

``make_describer(config)`` gives the processor its ``Describer``, which picks each item's
format at enqueue; workers only talk to formats through ``BatchFormat``.
"""

from __future__ import annotations

from typing import Any

from .arrays import ArrayFamily
from .base import BatchFormat, Built, Describer, Family, Limits, Workspace
from .generic import GenericFamily
from .padding import Padding
from .tensors import TensorFamily
from .trees import TreeFamily

__all__ = ["BatchFormat", "Built", "Describer", "Family", "Limits", "Workspace",
           "make_describer"]


def make_describer(config: Any) -> Describer:
    """The describer for a ``BatchProcessorConfig``: families asked in this order."""
    padding = Padding.from_config(config)
    stacked = config.stack_items
    families: list[Family] = [
        ArrayFamily(stacked, padding),
        TensorFamily(stacked, padding),
        TreeFamily(stacked, padding),
        GenericFamily(config.item_size),
    ]
    return Describer(families, 1 if padding is None else padding.multiple)

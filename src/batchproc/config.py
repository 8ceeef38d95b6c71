"""Configuration and the small value types of the public API."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum, IntEnum
from typing import Any


class BatchPriority(IntEnum):
    """Request priority: lower values are served first."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3
    BACKGROUND = 4


class BatchProcessingStrategy(Enum):
    """How the processor chooses batch size and wait.

    FIXED: the target size only changes through ``update_batch_size``; a batch waits up to
    ``batch_timeout`` to fill. ADAPTIVE: the controller sets size and wait from measurements,
    never waiting longer than ``batch_timeout``. GREEDY: take what is queued, never wait.
    """

    FIXED = "fixed"
    ADAPTIVE = "adaptive"
    GREEDY = "greedy"


@dataclass(order=True)
class PrioritizedItem:
    """A queued request as ordered by the queue: by priority, then arrival sequence.

    The native queue keeps this ordering in C structs; this record is its Python form,
    used by the pure-Python reference queue and useful to callers building their own.
    """

    priority: int
    sequence: int
    item: Any = field(compare=False)
    future: Any = field(default=None, compare=False)


@dataclass
class BatchProcessorConfig:
    """Settings of a :class:`BatchProcessor`; see DESIGN.md "Public API" for each field.

    Contradictory values raise ``ValueError`` naming the field; an ``initial_batch_size``
    outside ``[min_batch_size, max_batch_size]`` is clamped into it.
    """

    initial_batch_size: int = 32
    min_batch_size: int = 1
    max_batch_size: int = 128
    batch_timeout: float = 0.1
    item_timeout: float = 30.0
    max_queue_size: int = 1000
    enable_priority_queue: bool = False
    max_workers: int = 4
    min_batch_interval: float = 0.0
    max_batch_memory_mb: float | None = None
    enable_memory_optimization: bool = True
    gc_batch_threshold: int = 100
    memory_warning_threshold: float = 80.0
    memory_critical_threshold: float = 90.0
    enable_adaptive_batching: bool = True
    processing_strategy: BatchProcessingStrategy = BatchProcessingStrategy.ADAPTIVE
    reduce_batch_on_failure: bool = True
    enable_monitoring: bool = True
    monitoring_window: int = 1000
    enable_health_monitoring: bool = True
    health_check_interval: float = 30.0
    queue_warning_threshold: int = 500
    queue_critical_threshold: int = 800
    max_retries: int = 3
    retry_delay: float = 1.0
    debug_mode: bool = False
    stack_items: bool = False
    # Batch formats (docs/formats.md). Ragged sequences: with pad_value set, arrays and
    # tensors that differ only in axis 1 share a batch, padded on axis 1 with pad_value (a
    # number, or {input name: number} for named inputs; unnamed inputs are not padded) to
    # the longest in the batch, rounded up to a multiple of pad_to_multiple_of.
    pad_value: float | Mapping[str, float] | None = None
    pad_to_multiple_of: int | None = None
    # Caps rows x padded length of a batch (needs pad_value).
    max_batch_tokens: int | None = None
    # Outputs whose axis 1 is the padded axis, cut back to each caller's own length: True
    # (every output), or the names (dict outputs) / positions (tuple outputs) of those
    # outputs. Never guessed from shapes.
    per_token_outputs: bool | Collection[str | int] = False
    # Generic items (neither arrays, tensors nor tuples/mappings of them): how many samples
    # an item counts for toward max_batch_size (Ray Serve's batch_size_fn); default 1.
    item_size: Callable[[Any], int] | None = None

    def __post_init__(self) -> None:
        for name in ("initial_batch_size", "min_batch_size", "max_batch_size", "max_queue_size",
                     "max_workers", "monitoring_window", "gc_batch_threshold",
                     "queue_warning_threshold", "queue_critical_threshold"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("max_retries", self.max_retries, minimum=0)
        for name in ("batch_timeout", "min_batch_interval", "retry_delay"):
            _require_number(name, getattr(self, name), minimum=0.0)
        for name in ("item_timeout", "health_check_interval"):
            _require_number(name, getattr(self, name), minimum=0.0, allow_zero=False)
        for name in ("memory_warning_threshold", "memory_critical_threshold"):
            value = _require_number(name, getattr(self, name), minimum=0.0)
            if value > 100.0:
                raise ValueError(f"{name} must be a percentage in [0, 100], got {value!r}")
        if self.max_batch_memory_mb is not None:
            _require_number("max_batch_memory_mb", self.max_batch_memory_mb, minimum=0.0,
                            allow_zero=False)
        if self.min_batch_size > self.max_batch_size:
            raise ValueError(
                f"min_batch_size ({self.min_batch_size}) must not exceed "
                f"max_batch_size ({self.max_batch_size})")
        if self.memory_warning_threshold > self.memory_critical_threshold:
            raise ValueError(
                f"memory_warning_threshold ({self.memory_warning_threshold}) must not exceed "
                f"memory_critical_threshold ({self.memory_critical_threshold})")
        if self.queue_warning_threshold > self.queue_critical_threshold:
            raise ValueError(
                f"queue_warning_threshold ({self.queue_warning_threshold}) must not exceed "
                f"queue_critical_threshold ({self.queue_critical_threshold})")
        if not isinstance(self.processing_strategy, BatchProcessingStrategy):
            try:
                self.processing_strategy = BatchProcessingStrategy(self.processing_strategy)
            except ValueError:
                raise ValueError(
                    f"processing_strategy must be a BatchProcessingStrategy, "
                    f"got {self.processing_strategy!r}") from None
        for f in fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be a bool, got {getattr(self, f.name)!r}")
        self._check_formats()
        self.initial_batch_size = min(max(self.initial_batch_size, self.min_batch_size),
                                      self.max_batch_size)

    def _check_formats(self) -> None:
        pad = self.pad_value
        if isinstance(pad, Mapping):
            if not pad:
                raise ValueError("pad_value must not be an empty mapping")
            for name, value in pad.items():
                if not isinstance(name, str):
                    raise ValueError(f"pad_value keys must be input names (str), got {name!r}")
                _require_pad_number(f"pad_value[{name!r}]", value)
        elif pad is not None:
            _require_pad_number("pad_value", pad)
        for name in ("pad_to_multiple_of", "max_batch_tokens"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name), minimum=1)
                if pad is None:
                    raise ValueError(f"{name} needs pad_value (it applies to padded batches)")
        per_token = self.per_token_outputs
        if not isinstance(per_token, bool):
            if isinstance(per_token, (str, bytes, Mapping)) or not isinstance(
                    per_token, Collection):
                raise ValueError("per_token_outputs must be a bool or a collection of output "
                                 f"names and positions, got {per_token!r}")
            for output in per_token:
                if isinstance(output, bool) or not isinstance(output, (str, int)):
                    raise ValueError("per_token_outputs must name outputs by str (dict "
                                     f"outputs) or int (tuple outputs), got {output!r}")
            self.per_token_outputs = frozenset(per_token)
        if self.per_token_outputs and pad is None:
            raise ValueError("per_token_outputs needs pad_value (it cuts padded outputs)")
        if self.item_size is not None and not callable(self.item_size):
            raise ValueError(f"item_size must be callable, got {self.item_size!r}")

    @property
    def max_batch_bytes(self) -> int:
        """``max_batch_memory_mb`` in bytes (MiB, 2**20), or 0 when there is no cap."""
        if self.max_batch_memory_mb is None:
            return 0
        return max(1, int(self.max_batch_memory_mb * 2**20))


def _require_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _require_pad_number(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Number) or isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a number, got {value!r}")


def _require_number(name: str, value: Any, *, minimum: float, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < minimum or (not allow_zero and value == 0):
        bound = f"> {minimum}" if not allow_zero else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)

"""Configuration and the small value types of the public API."""

from __future__ import annotations

import datetime
import difflib
import functools
import inspect
import math
import numbers
import operator
import sys
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import FrozenInstanceError, dataclass, field, fields, replace
from decimal import Decimal
from enum import Enum, IntEnum
from typing import Any, TypeVar

import numpy as np

from ._native.request_queue import MAX_CAPACITY as _MAX_QUEUE_SIZE
from ._native.rolling_window import MAX_CAPACITY as _MAX_MONITORING_WINDOW
from .errors import ConfigTypeError


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


# The default of the settings derived from others when not given (a None, typed as what
# __post_init__ makes of it).
_DERIVED: Any = None


class _DerivedInt(int):
    """A threshold's value derived in __post_init__, not given: an int in every use, and
    derived again by a config made from this one (``dataclasses.replace``), so that
    changing what it follows (``max_queue_size``) moves it instead of refusing it."""

    __slots__ = ()


class _DerivedFloat(float):
    """As ``_DerivedInt``, for the percentage thresholds."""

    __slots__ = ()


class _ClampedInt(int):
    """``initial_batch_size`` clamped into ``[min_batch_size, max_batch_size]`` in
    __post_init__: an int in every use, remembering the value given (or the default), so
    that a config made from this one (``dataclasses.replace``) clamps that again against
    its own bounds instead of keeping a clamp made for the old ones."""

    given: int

    def __new__(cls, value: int, given: int) -> _ClampedInt:
        self = super().__new__(cls, value)
        self.given = given
        return self

    def __getnewargs__(self) -> tuple[int, int]:  # type: ignore[override]
        return int(self), self.given


_DERIVED_FIELDS = ("gc_batch_threshold", "memory_warning_threshold",
                   "memory_critical_threshold", "queue_warning_threshold",
                   "queue_critical_threshold")


_C = TypeVar("_C")


def _keywords_named(cls: type[_C]) -> type[_C]:
    """A dataclass whose ``__init__`` refuses an unknown keyword with
    `check_keywords`'s message (the generated one names no close match)."""
    generated = cls.__init__

    @functools.wraps(generated)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        check_keywords(cls.__name__, kwargs)
        generated(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


@_keywords_named
@dataclass
class BatchProcessorConfig:
    """Settings of a `BatchProcessor`, each with a default; give them as keywords (taken
    positionally too, in the order below, which is easy to get wrong).

    Contradictory values (min above max, non-positive sizes, negative times, a warning
    threshold above its critical one, a queue threshold above ``max_queue_size``,
    ``gc_batch_threshold`` above ``max_batch_size``, ``max_batch_tokens`` under twice
    ``pad_to_multiple_of``, a percentage outside 0-100) raise ``ValueError`` naming the
    fields and values; so does a number that is not finite (``inf``, ``nan``) in any
    field (where ``None`` means no limit, that is the way to say it), and a
    ``min_batch_interval`` or ``retry_delay`` above ``MAX_SECONDS`` (the longest a
    thread can wait, ``threading.TIMEOUT_MAX``: about 292 years, 49 days on Windows);
    so does a setting
    of a feature switched off (a value other than its default for ``max_priority_wait``
    without ``enable_priority_queue``,
    ``gc_batch_threshold`` without ``enable_memory_optimization``,
    ``health_check_interval`` without ``enable_health_monitoring``, the padding settings
    without ``pad_value``): it would be ignored. An ``initial_batch_size`` outside
    ``[min_batch_size, max_batch_size]`` is clamped into it; a copy made with
    ``dataclasses.replace`` clamps the value given (or the default) again against its own
    bounds. A threshold not given (or
    given as ``None``) is derived from the settings it must agree with (each says how),
    so that a setting you change never makes a default one unreachable; a copy made with
    ``dataclasses.replace`` derives it again. A value of the wrong type (a float or a
    bool for an integer, a string or a duration for a number, anything that fails the
    conversion) raises `ConfigTypeError`, a
    ``TypeError`` that is also a ``ValueError``, naming the field, the value and what it
    accepts: integer fields take any integral number (``operator.index``: an int, a
    numpy integer), number fields any real number (a numpy number, a ``Fraction``, a
    ``Decimal``) and switches a bool or a numpy bool, stored as a Python ``int``,
    ``float`` and ``bool`` (what the config clamped or derived: a subclass remembering
    what was given). Rows are what a batch is counted in: an
    array item of shape ``(r, ...)`` is ``r`` rows, a stacked sample or a generic item
    one (docs/formats.md). Requests are calls of ``enqueue_predict``; an
    item split into chunks counts once.

    Attributes:
        initial_batch_size: Target rows per batch at start, in rows. Default ``32``.
            ADAPTIVE moves the target from there; FIXED keeps it until
            `BatchProcessor.update_batch_size`.
        min_batch_size: Lowest target the controller may set, in rows. Default ``1``.
            Failures and memory pressure never shrink the target below it.
        max_batch_size: Most rows in one batch, in rows. Default ``128``; at most
            ``2**31 - 1``. A hard cap: a larger item is split into chunks that fit and
            its result joined back.
        batch_timeout: Longest a batch waits to fill, in seconds from its oldest
            request's arrival. Default ``0.1``. A ceiling, not a delay: ADAPTIVE
            dispatches as soon as arrivals pause while the model is idle; FIXED waits up
            to it for ``current_batch_size`` rows; GREEDY never waits. It holds while
            other calls run long too: a worker without a call in progress (up to
            ``max_workers``) starts one for requests that waited that long. Any finite
            value: one longer than the process lives means a batch waits to fill.
        item_timeout: Longest one ``process_func`` call may run, in seconds. Default
            ``30.0``. Past it a new worker replaces the stuck one and a late result is
            discarded; a call of several requests fails none of them (each is queued again
            alone), and a request whose call of its own runs past it fails with
            `BatchTimeoutError`. Any finite value: one longer than the process lives
            means no limit.
        max_queue_size: Most requests waiting in the queue, in requests, at most
            ``2**24`` (the native queue's capacity). Default ``1000``.
            ``enqueue_predict`` blocks for room (up to its ``timeout``, then
            `QueueFullError`); ``enqueue_predict_async`` refuses at once.
        enable_priority_queue: Serve by `BatchPriority` (most urgent first, FIFO within a
            level), on or off. Default ``False``: the queue is FIFO and ``priority`` is
            accepted and ignored.
        max_workers: Most batches in progress at once, in batches (one worker thread
            each), at most ``MAX_WORKERS`` (1024). Default ``4``. ADAPTIVE runs one while
            nothing waits, two under load, and more only while each raises rows per
            second by 10%; FIXED runs all.
        min_batch_interval: Least time between the starts of two batches, across all
            workers, in seconds, at most ``MAX_SECONDS`` (a worker waits it out).
            Default ``0.0`` (no pacing).
        max_batch_memory_mb: Most input bytes in one batch, in MiB (2**20 bytes), or
            ``None`` for no cap, below ``2**43`` (so that its bytes fit 64 bits).
            Default ``None``. An item larger than the cap is split
            into chunks that fit; a single row larger than it runs alone.
        enable_memory_optimization: Garbage collection off the request path, on or off.
            Default ``True``: a young-generation collection after each batch of at least
            ``gc_batch_threshold`` requests, and a full one when memory is critical.
        gc_batch_threshold: Batch size that triggers the young-generation collection of
            ``enable_memory_optimization``, in requests, at most ``max_batch_size``.
            Default ``None``: ``100``, or ``max_batch_size`` when that is smaller. Needs
            ``enable_memory_optimization``.
        memory_warning_threshold: Memory level graded "warning", in percent: of the
            container's memory limit, the memory its cgroup counts (the working set),
            where there is a limit; else of the machine's memory, this process's
            resident set (``health()``'s ``memory`` check). Default ``None``:
            ``80.0``, or ``memory_critical_threshold`` when that is set lower. At warning
            the target is capped at half the throughput-optimal size.
        memory_critical_threshold: Memory level graded "critical", in percent, as above.
            Default ``None``: ``90.0``, or ``memory_warning_threshold`` when that is set
            higher. At critical the target drops to ``min_batch_size``.
        enable_adaptive_batching: Let the strategy adapt, on or off. Default ``True``;
            ``False`` makes every strategy behave as FIXED.
        processing_strategy: How batch size and wait are chosen, a
            `BatchProcessingStrategy`, or its value or name in any case (``"adaptive"``,
            ``"ADAPTIVE"``); anything else raises ``ValueError`` listing them. Default
            ``BatchProcessingStrategy.ADAPTIVE``.
        reduce_batch_on_failure: Halve the target after a batch fails though each of
            its requests then succeeds on a smaller call (out of memory on its size,
            say), on or off (not with FIXED). Default ``True``.
        enable_monitoring: Record every request's latency for the percentiles of
            ``get_stats()``, on or off. Default ``True``; off, the latency keys stay 0.
        monitoring_window: How many recent samples the statistics look at, in batches
            (and in requests for latencies), at most ``2**26``. Default ``1000``.
        enable_health_monitoring: Run the health checks every
            ``health_check_interval``, on or off: log transitions, feed memory pressure
            to the controller, report to the metrics collector. Default ``True``.
            ``health()`` answers on demand either way.
        health_check_interval: Time between periodic health checks, in seconds, any
            finite value. Default ``30.0``. Needs ``enable_health_monitoring``.
        queue_warning_threshold: Queue length graded "warning" by the health check, in
            requests, at most ``max_queue_size``. Default ``None``: half of
            ``max_queue_size`` (rounded up; ``500`` for the default ``1000``), or
            ``queue_critical_threshold`` when that is set lower. A queue that grew over
            three checks and is past half of it is a warning too.
        queue_critical_threshold: Queue length graded "critical", in requests, at most
            ``max_queue_size``. Default ``None``: 80% of ``max_queue_size`` (rounded up;
            ``800`` for the default ``1000``), or ``queue_warning_threshold`` when that
            is set higher.
        max_retries: Retries of a single failing request, in attempts after the first.
            Default ``3``. A failing batch of several requests is bisected first; only
            single requests are retried, each alone in its batch.
        retry_delay: Backoff before the first retry, in seconds, at most
            ``MAX_SECONDS``; retry ``k`` (from 0) waits ``retry_delay * 2**k``, at most
            ``MAX_SECONDS``. Default ``1.0``. A request backing off is parked in the
            queue: it holds no worker, and nothing waits for it.
        retry_on: Which failures of a single request are retried, an exception class or
            a tuple of them. Default ``(Exception,)`` (every ``Exception``); others
            fail the request at once. ``()`` retries nothing. A ``BaseException``
            that is not an ``Exception`` (``KeyboardInterrupt``; not asyncio's
            ``CancelledError``) is never retried, whatever this says. An output that breaks the
            output rule (`BatchOutputError`: wrong type, wrong rows) would come back on
            every try: it is retried only when ``retry_on`` names `BatchOutputError`
            (or a subclass of it) itself; a broader class (``Exception``,
            ``ValueError``) does not retry it.
        max_queue_time: Longest a request may wait in the queue (and parked for a
            retry) before its call, in seconds from enqueue. Default ``None``: no limit.
            A request still waiting when it runs out fails with ``QueueTimeoutError``
            and never reaches the model. Any finite value (one longer than the process
            lives never runs out). ``enqueue_predict``, ``enqueue`` and
            ``enqueue_predict_async`` and ``apredict`` take a per-request value.
        max_priority_wait: With ``enable_priority_queue``, the longest a request waits
            before it is served ahead of every newer request whatever its priority, in
            seconds. Default ``None``: strict priorities. A low priority then waits at
            most this long plus the time to serve the requests older than it (which go
            in arrival order), however many higher ones keep arriving. Any finite
            value. Needs
            ``enable_priority_queue`` (a FIFO queue serves in arrival order anyway).
        debug_mode: Log the controller's decisions and every delivery at DEBUG level,
            on or off. Default ``False``.
        stack_items: Treat each array or tensor item as one sample, stacked on a new
            axis 0 (each caller gets ``out[i]``), instead of rows concatenated on axis 0;
            on or off. Default ``False``.
        pad_value: Padding for ragged sequences: arrays and tensors that differ only in
            axis 1 share a batch, padded on axis 1 to the longest with this number (or
            ``{input name: number}`` for named inputs). Default ``None`` (no padding).
        pad_to_multiple_of: Round the padded length up to a multiple of this, in tokens
            (needs ``pad_value``; at most ``2**20``). Default ``None``.
        max_batch_tokens: Most rows x padded length in one batch, in tokens (needs
            ``pad_value``; at least twice ``pad_to_multiple_of``). Default ``None`` (no
            cap).
        per_token_outputs: Outputs whose axis 1 is the padded axis, cut back to each
            caller's own length: ``True`` for every output, or the names (dict outputs)
            and positions (tuple outputs) of those that are. Default ``False``.
        item_size: For generic items (neither arrays, tensors nor tuples or mappings of
            them), a function giving how many rows an item counts for toward
            ``max_batch_size``. Default ``None`` (each counts 1).
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
    # None (the default) in these four: derived in __post_init__ (see the docstring).
    gc_batch_threshold: int = _DERIVED
    memory_warning_threshold: float = _DERIVED
    memory_critical_threshold: float = _DERIVED
    enable_adaptive_batching: bool = True
    processing_strategy: BatchProcessingStrategy = BatchProcessingStrategy.ADAPTIVE
    reduce_batch_on_failure: bool = True
    enable_monitoring: bool = True
    monitoring_window: int = 1000
    enable_health_monitoring: bool = True
    health_check_interval: float = 30.0
    queue_warning_threshold: int = _DERIVED
    queue_critical_threshold: int = _DERIVED
    max_retries: int = 3
    retry_delay: float = 1.0
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,)
    max_queue_time: float | None = None
    max_priority_wait: float | None = None
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
        for name in _DERIVED_FIELDS:
            if isinstance(getattr(self, name), (_DerivedInt, _DerivedFloat)):
                setattr(self, name, None)  # derived for another config: derive it again
        if isinstance(self.initial_batch_size, _ClampedInt):
            # Clamped for another config's bounds: clamp what was given against these.
            self.initial_batch_size = self.initial_batch_size.given
        for name in ("initial_batch_size", "min_batch_size", "max_batch_size", "max_queue_size",
                     "max_workers", "monitoring_window"):
            setattr(self, name, _require_int(name, getattr(self, name), minimum=1))
        for name in ("gc_batch_threshold", "queue_warning_threshold",
                     "queue_critical_threshold"):
            if getattr(self, name) is not None:
                setattr(self, name, _require_int(name, getattr(self, name), minimum=1))
        for name in ("max_workers", "max_queue_size", "monitoring_window", "max_batch_size"):
            _require_at_most(name, getattr(self, name))
        self.max_retries = _require_int("max_retries", self.max_retries, minimum=0)
        for name in ("batch_timeout", "min_batch_interval", "retry_delay"):
            setattr(self, name, require_number(name, getattr(self, name), minimum=0.0))
        for name in ("min_batch_interval", "retry_delay"):
            if getattr(self, name) > MAX_SECONDS:
                # A worker waits out the pacing interval, and a parked retry's backoff is
                # capped at this (engine/execution.py): a thread can wait no longer.
                raise ValueError(
                    f"{name} must be <= {MAX_SECONDS!r} seconds (MAX_SECONDS, "
                    f"threading.TIMEOUT_MAX: the longest a thread can wait), got "
                    f"{getattr(self, name)!r}")
        for name in ("item_timeout", "health_check_interval"):
            setattr(self, name, require_number(name, getattr(self, name), minimum=0.0,
                                               allow_zero=False))
        for name in ("memory_warning_threshold", "memory_critical_threshold"):
            if getattr(self, name) is None:
                continue
            value = require_number(name, getattr(self, name), minimum=0.0)
            if value > 100.0:
                raise ValueError(f"{name} must be a percentage in [0, 100], got {value!r}")
            setattr(self, name, value)
        for name in ("max_batch_memory_mb", "max_queue_time", "max_priority_wait"):
            if getattr(self, name) is not None:
                setattr(self, name, require_number(
                    name, getattr(self, name), minimum=0.0,
                    allow_zero=name == "max_priority_wait", unlimited=_NONE_MEANS[name]))
        if self.max_batch_memory_mb is not None and self.max_batch_memory_mb >= _MIB_LIMIT:
            # max_batch_bytes must fit the native queue's 64-bit byte counts.
            raise ValueError(
                f"max_batch_memory_mb must be <= {math.nextafter(_MIB_LIMIT, 0)!r} (below "
                f"2**43 MiB: 2**63 bytes do not fit a 64-bit byte count), got "
                f"{self.max_batch_memory_mb!r}; use None for no cap")
        retry_on = self.retry_on
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        if not isinstance(retry_on, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in retry_on):
            raise ConfigTypeError(
                "retry_on must be an exception class or a tuple of them, got "
                f"{_shown(self.retry_on)}")
        self.retry_on = retry_on
        if self.min_batch_size > self.max_batch_size:
            raise ValueError(
                f"min_batch_size ({self.min_batch_size}) must not exceed "
                f"max_batch_size ({self.max_batch_size})")
        self.processing_strategy = _strategy(self.processing_strategy)
        for f in fields(self):
            if f.type == "bool":
                setattr(self, f.name, _require_bool(f.name, getattr(self, f.name)))
        self._check_switches()
        self._check_formats()
        given = {name for name in _DERIVED_FIELDS if getattr(self, name) is not None}
        self._derive_thresholds()
        for name in _DERIVED_FIELDS:
            if name not in given:
                value = getattr(self, name)
                setattr(self, name, _DerivedInt(value) if isinstance(value, int)
                        else _DerivedFloat(value))
        given_size = self.initial_batch_size
        clamped = min(max(given_size, self.min_batch_size), self.max_batch_size)
        if clamped != given_size:
            self.initial_batch_size = _ClampedInt(clamped, given_size)

    def _check_switches(self) -> None:
        for name, switch in _NEEDS_SWITCH:
            default = _DEFAULTS[name]
            value = getattr(self, name)
            if not getattr(self, switch) and value is not None and value != default:
                raise ValueError(
                    f"{name} has no effect while {switch} is False: set {switch}=True, "
                    f"or leave {name} at its default ({default!r})")

    def _derive_thresholds(self) -> None:
        """Fill in the thresholds not given, each from what it must stay consistent with;
        refuse a given one that could never take effect."""
        size = self.max_queue_size
        for name in ("queue_warning_threshold", "queue_critical_threshold"):
            value = getattr(self, name)
            if value is not None and value > size:
                # No new request is taken past max_queue_size (only retries of
                # requests taken before may briefly go past it): never graded so.
                raise ValueError(
                    f"{name} ({value}) must not exceed max_queue_size ({size}): no new "
                    "request is taken past it")
        warning, critical = _ordered(
            "queue", self.queue_warning_threshold, self.queue_critical_threshold,
            -(-size * _QUEUE_WARNING[0] // _QUEUE_WARNING[1]),
            -(-size * _QUEUE_CRITICAL[0] // _QUEUE_CRITICAL[1]))
        self.queue_warning_threshold, self.queue_critical_threshold = warning, critical
        self.memory_warning_threshold, self.memory_critical_threshold = _ordered(
            "memory", self.memory_warning_threshold, self.memory_critical_threshold,
            _MEMORY_WARNING, _MEMORY_CRITICAL)
        gc_threshold = self.gc_batch_threshold
        if gc_threshold is None:
            self.gc_batch_threshold = min(_GC_BATCH_THRESHOLD, self.max_batch_size)
        elif gc_threshold > self.max_batch_size:
            # A batch holds at most max_batch_size requests: it would never collect.
            raise ValueError(
                f"gc_batch_threshold ({gc_threshold}) must not exceed max_batch_size "
                f"({self.max_batch_size}): no batch holds more requests")

    def _check_formats(self) -> None:
        pad = self.pad_value
        if isinstance(pad, Mapping):
            if not pad:
                raise ValueError("pad_value must not be an empty mapping")
            for name, value in pad.items():
                if not isinstance(name, str):
                    raise ConfigTypeError(
                        f"pad_value keys must be input names (str), got {_shown(name)}")
                _require_pad_number(f"pad_value[{name!r}]", value)
        elif pad is not None:
            _require_pad_number("pad_value", pad)
        for name in ("pad_to_multiple_of", "max_batch_tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, _require_int(name, getattr(self, name), minimum=1))
                _require_at_most(name, getattr(self, name))
                if pad is None:
                    raise ValueError(f"{name} needs pad_value (it applies to padded batches)")
        multiple, tokens = self.pad_to_multiple_of, self.max_batch_tokens
        if multiple is not None and tokens is not None and tokens < 2 * multiple:
            # Every padded row costs at least `multiple` tokens: no batch could hold two.
            raise ValueError(
                f"max_batch_tokens ({tokens}) must be at least twice pad_to_multiple_of "
                f"({multiple}): each padded row counts for at least {multiple} tokens, so "
                "no two rows could share a batch")
        per_token = self.per_token_outputs
        if not isinstance(per_token, bool):
            if isinstance(per_token, (str, bytes, Mapping)) or not isinstance(
                    per_token, Collection):
                raise ConfigTypeError(
                    "per_token_outputs must be a bool or a collection of output names and "
                    f"positions, got {_shown(per_token)}")
            self.per_token_outputs = frozenset(_output_key(output) for output in per_token)
        if self.per_token_outputs and pad is None:
            raise ValueError("per_token_outputs needs pad_value (it cuts padded outputs)")
        if self.item_size is not None and not callable(self.item_size):
            raise ConfigTypeError(f"item_size must be callable, got {_shown(self.item_size)}")

    def __setattr__(self, name: str, value: Any) -> None:
        if _READ_ONLY in self.__dict__:
            raise FrozenInstanceError(_FIXED.format(action="set", name=name))
        if (type(self) is BatchProcessorConfig and name not in FIELD_NAMES
                and not name.startswith("_")):
            # A misspelt field would be set, and ignored: refused as the constructor does.
            # (A subclass may add fields and attributes of its own.)
            close = _closest(name, FIELD_NAMES)
            raise AttributeError(
                f"BatchProcessorConfig has no field {name!r}"
                + (f" (did you mean {close!r}?)" if close else "")
                + "; help(batchproc.BatchProcessorConfig) lists them")
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if _READ_ONLY in self.__dict__:
            raise FrozenInstanceError(_FIXED.format(action="delete", name=name))
        super().__delattr__(name)

    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.copy, deepcopy, pickle) is nobody's own copy: a config to change.
        state = dict(self.__dict__)
        state.pop(_READ_ONLY, None)
        return state

    @property
    def max_batch_bytes(self) -> int:
        """``max_batch_memory_mb`` in bytes (MiB, 2**20), or 0 when there is no cap."""
        if self.max_batch_memory_mb is None:
            return 0
        return max(1, int(self.max_batch_memory_mb * 2**20))


# Settings of a feature that a boolean switch turns off: set while it is off, they would
# be ignored and the feature believed on. (The padding settings, switched by pad_value,
# are checked with the formats.)
_NEEDS_SWITCH = (
    ("max_priority_wait", "enable_priority_queue"),
    ("gc_batch_threshold", "enable_memory_optimization"),
    ("health_check_interval", "enable_health_monitoring"),
)
# What the derived settings are when nothing constrains them: queue levels as fractions
# (numerator, denominator) of max_queue_size, rounded up; memory levels in percent.
_QUEUE_WARNING = (1, 2)
_QUEUE_CRITICAL = (4, 5)
_MEMORY_WARNING = 80.0
_MEMORY_CRITICAL = 90.0
_GC_BATCH_THRESHOLD = 100
# The documented defaults (a derived setting's when nothing constrains it).
_DEFAULTS = {f.name: f.default for f in fields(BatchProcessorConfig)}
_DEFAULTS["gc_batch_threshold"] = _GC_BATCH_THRESHOLD
# The most worker threads one processor may run (max_workers).
MAX_WORKERS = 1024
# The largest max_batch_size and pad_to_multiple_of (see _MOST).
MAX_BATCH_ROWS = 2**31 - 1
MAX_PAD_MULTIPLE = 2**20
# The longest wait in seconds a thread can make (threading.TIMEOUT_MAX: about 292 years,
# 49 days on Windows):
# the most min_batch_interval and retry_delay (and a retry's backoff) may be.
MAX_SECONDS: float = threading.TIMEOUT_MAX

# The largest values of the settings with an upper bound: a thread per worker (far more
# exhausts the process's threads long before it helps throughput), and the capacities of
# the native queue and statistics windows they size.
_MOST = {
    "max_workers": MAX_WORKERS,
    "max_queue_size": _MAX_QUEUE_SIZE,
    "monitoring_window": _MAX_MONITORING_WINDOW,
    # Rows and tokens the native code counts in machine integers: far past any batch, and
    # a padded length's bytes (tokens times a row's bytes per token) still fit them.
    "max_batch_size": MAX_BATCH_ROWS,
    "pad_to_multiple_of": MAX_PAD_MULTIPLE,
}
# max_batch_memory_mb is below this many MiB: its bytes fit an int64.
_MIB_LIMIT = 2.0**43

def _require_at_most(name: str, value: int) -> None:
    most = _MOST.get(name)
    if most is not None and value > most:
        raise ValueError(f"{name} must be <= {most}, got {value!r}")


# What None means for the number fields that take it.
_NONE_MEANS = {
    "max_batch_memory_mb": "no cap",
    "max_queue_time": "no limit",
    "max_priority_wait": "strict priorities (no limit)",
}


# The keywords BatchProcessorConfig takes.
FIELD_NAMES = tuple(f.name for f in fields(BatchProcessorConfig))


def keyword_only(function: Callable[..., Any]) -> tuple[str, ...]:
    """The names of ``function``'s keyword-only parameters (its own keywords, beside the
    config fields its ``**fields`` takes): ``check_keywords``'s ``own``."""
    return tuple(p.name for p in inspect.signature(function).parameters.values()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY)


def check_keywords(function: str, keywords: Iterable[str], own: Iterable[str] = ()) -> None:
    """``TypeError`` if a name in ``keywords`` is neither a field of
    `BatchProcessorConfig` nor one of ``own`` (the other keywords ``function`` takes):
    the message names ``function``, each unknown name with the closest valid one where
    one is close (in any case, ``-`` read as ``_``: ``MAX_BATCH_SIZE`` and
    ``max-batch-size`` mean ``max_batch_size``), and what ``function`` takes. For
    everything that builds a config from a caller's keywords (``batch(...)``,
    ``batched_deployment(...)``, the config itself), whose bare ``TypeError`` would name
    ``BatchProcessorConfig.__init__`` and no fix."""
    own = tuple(own)
    valid = (*FIELD_NAMES, *own)
    unknown = [name for name in keywords if name not in valid]
    if not unknown:
        return
    shown = []
    for name in unknown:
        close = _closest(str(name), valid)
        shown.append(f"{name!r}" + (f" (did you mean {close!r}?)" if close else ""))
    takes = "its fields" if function == BatchProcessorConfig.__name__ else (
        "BatchProcessorConfig's fields")
    also = f", and {', '.join(own)}" if own else ""
    got = "unexpected keyword arguments" if len(unknown) > 1 else (
        "an unexpected keyword argument")
    raise TypeError(
        f"{function}() got {got} {', '.join(shown)}. {function}() takes {takes} as keywords "
        f"(help(batchproc.BatchProcessorConfig) lists them){also}")


def _closest(name: str, valid: Iterable[str]) -> str | None:
    """The name in ``valid`` closest to ``name``, or None when none is close; compared
    folded (lower case, ``-`` as ``_``), as a name written in another case or with a
    command line's dashes is still the same name."""
    by_folded = {_folded(v): v for v in valid}
    close = difflib.get_close_matches(_folded(name), list(by_folded), n=1)
    return by_folded[close[0]] if close else None


def _folded(name: str) -> str:
    return name.lower().replace("-", "_")


# Set (in the instance's __dict__, never a field) on a processor's own copy of its config.
_READ_ONLY = "_read_only"
_FIXED = (
    "cannot {action} {name}: this config is a BatchProcessor's own, fixed when the "
    "processor was made (its queue, workers and controller were built from it). Use "
    "processor.update_batch_size(n) to change the target batch size, or make a new "
    "processor from dataclasses.replace(processor.config, {name}=...)")


def checked_copy(config: object) -> BatchProcessorConfig:
    """A new config made from ``config``'s fields, checked again: a dataclass checks only
    when it is made, and the object may have been changed since. ``TypeError`` if
    ``config`` is not a `BatchProcessorConfig`; ``ValueError`` (or `ConfigTypeError`)
    naming the field for a bad setting."""
    if not isinstance(config, BatchProcessorConfig):
        raise TypeError(f"config must be a BatchProcessorConfig, got {type(config).__name__}")
    return replace(config)


def read_only_copy(config: object) -> BatchProcessorConfig:
    """``checked_copy(config)`` that refuses to be changed: assigning (or deleting) a
    field raises ``dataclasses.FrozenInstanceError`` (an ``AttributeError``) saying what
    to do instead. ``dataclasses.replace`` and ``copy`` make ordinary configs from it."""
    config = checked_copy(config)
    object.__setattr__(config, _READ_ONLY, True)
    return config


def _strategy(value: Any) -> BatchProcessingStrategy:
    """``value`` as a `BatchProcessingStrategy`: a member, or a member's value or name in
    any case. Otherwise ``ValueError`` listing the valid values (``ConfigTypeError`` for
    what is neither a member nor a string)."""
    if isinstance(value, BatchProcessingStrategy):
        return value
    if isinstance(value, str):
        for member in BatchProcessingStrategy:
            if value.lower() in (member.value, member.name.lower()):
                return member
    valid = ", ".join(repr(member.value) for member in BatchProcessingStrategy)
    error = ValueError if isinstance(value, str) else ConfigTypeError
    raise error(
        f"processing_strategy must be a BatchProcessingStrategy or one of {valid} (any "
        f"case), got {value!r}")


def _ordered(kind: str, warning: Any, critical: Any, default_warning: Any,
             default_critical: Any) -> tuple[Any, Any]:
    """A warning and a critical level, either given or None (derived from its default,
    kept on its side of the other one). ``ValueError`` naming both when both are given
    and the warning level is above the critical one."""
    if warning is None:
        return (min(default_warning, critical if critical is not None else default_critical),
                critical if critical is not None else default_critical)
    if critical is None:
        return warning, max(default_critical, warning)
    if warning > critical:
        raise ValueError(
            f"{kind}_warning_threshold ({warning}) must not exceed "
            f"{kind}_critical_threshold ({critical})")
    return warning, critical


def _shown(value: Any) -> str:
    """A refused value for an error message: its repr and its type."""
    return f"{value!r} ({type(value).__name__})"


def as_int(value: Any) -> int | None:
    """``value`` as a plain int if it is an integral number (what ``operator.index``
    takes: an int, a numpy integer), else None. Never a bool: ``True`` is no size."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except Exception:  # whatever a broken __index__ raises, it is no integer
        return None


def _require_int(name: str, value: Any, *, minimum: int) -> int:
    """``value`` as a plain int at or above ``minimum``; ``ConfigTypeError`` for what is
    not an integral number (a float, even a whole one, a bool, a string)."""
    number = as_int(value)
    if number is None:
        raise ConfigTypeError(
            f"{name} must be an integer (an int or a numpy integer, not a bool or a "
            f"float), got {_shown(value)}")
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return number


def _require_bool(name: str, value: Any) -> bool:
    """``value`` as a plain bool: ``True``, ``False`` or a numpy bool, never ``0``/``1``
    or a string (``"false"`` would read as true)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigTypeError(f"{name} must be a bool (True or False), got {_shown(value)}")
    return bool(value)


def _output_key(output: Any) -> str | int:
    """An entry of ``per_token_outputs``: a dict output's name or a tuple output's
    position (an integer, numpy integers included, stored as an int)."""
    if isinstance(output, str):
        return output
    position = as_int(output)
    if position is None:
        raise ConfigTypeError(
            "per_token_outputs must name outputs by str (dict outputs) or int (tuple "
            f"outputs), got {_shown(output)}")
    return position


def _require_pad_number(name: str, value: Any) -> None:
    if (not isinstance(value, (numbers.Number, np.bool_))
            or isinstance(value, (str, bytes))):
        raise ConfigTypeError(f"{name} must be a number, got {_shown(value)}")
    # A number no array or tensor dtype holds (a Decimal, a Fraction, an int beyond 64
    # bits) would be refused by every padded enqueue: refuse it once, here.
    if np.asarray(value).dtype.kind not in "biufc":
        # An int too large is a value out of range; a Decimal or Fraction, a wrong type.
        error = ValueError if isinstance(value, int) else ConfigTypeError
        raise error(
            f"{name} must be a bool, int, float or complex number that fits 64 bits (what "
            f"arrays and tensors hold), got {_shown(value)}")


def require_number(name: str, value: Any, *, minimum: float, allow_zero: bool = True,
                   unlimited: str | None = None) -> float:
    """``value`` as a plain float: a finite real number (an int, a float, a numpy
    number, a ``Fraction`` or a ``Decimal``; never a bool) at or above ``minimum``.
    ``ConfigTypeError`` for anything else: a duration (a ``timedelta``, a numpy
    ``timedelta64``, whose unit is not seconds), or what ``float()`` fails on.
    Infinity is no way to say "unlimited" (a
    batch waiting for ever for a full batch, a deadline never reached): ``unlimited``
    says what ``None`` means for a field that takes it."""
    # A timedelta64 is registered as a number, but counts its own unit, not seconds.
    duration = isinstance(value, (np.timedelta64, datetime.timedelta))

    def refused() -> ConfigTypeError:
        return ConfigTypeError(
            f"{name} must be a real number (an int, a float, a numpy number, a Fraction or "
            f"a Decimal; not a bool), got {_shown(value)}"
            + ("; give a duration in seconds, as a number" if duration else ""))

    if duration or isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (numbers.Real, Decimal)):
        raise refused()
    try:
        number = float(value)
    except OverflowError:  # an int or a Fraction beyond what a float holds
        number = math.inf
    except Exception as error:
        if not (isinstance(value, Decimal) and value.is_nan()):  # a signalling NaN
            raise refused() from error
        number = math.nan
    if not math.isfinite(number):
        if isinstance(value, numbers.Rational) or (
                isinstance(value, Decimal) and value.is_finite()):
            raise ValueError(
                f"{name} must be a number a float holds (at most {sys.float_info.max!r}), "
                f"got {value!r}")
        hint = f"; use None for {unlimited}" if unlimited else ""
        raise ValueError(f"{name} must be a finite number, got {value!r}{hint}")
    if number < minimum or (not allow_zero and number == 0):
        bound = f"> {minimum}" if not allow_zero else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return number

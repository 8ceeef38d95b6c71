"""The seam between the engine and the kinds of data it batches.

A request's ``BatchFormat`` is chosen once, when ``Describer.describe`` sees its item at
enqueue, and owns everything that depends on the kind of data: the rows and bytes the
request counts for, which requests it may share a batch with (its compatibility key: the
queue only batches requests with equal keys, and equal keys mean one shared format
instance), how a batch is built from items, how an output is checked and split back per
request, how an oversized item is chunked and its results joined. The workers only call
``build``, ``split``, ``chunks`` and ``join``.

A new format is one new file: a ``Family`` that recognises its items and describes them
(a signature for the key, rows, bytes) and the ``BatchFormat`` it makes for a signature,
added to ``Describer``'s list of families.
"""

from __future__ import annotations

import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from .._native.batch_assembler import BatchAssembler
from .._native.future_state import (
    AT_MOST_LENGTH,
    QUEUED_LENGTH,
    QUEUED_ROWS,
    Request,
    changed_item,
    items_of,
    longest,
)
from .._native.intake import KnownArrays
from ..errors import BatchOutputError, ItemChangedError
from . import outputs

# Compatibility keys are small ints (the native queue compares them); new signatures get
# fresh ones, never reused, so forgetting old ones (below) cannot merge two kinds.
_MEMO_LIMIT = 4096
_ndarray = np.ndarray
_INF = float("inf")


class Limits(NamedTuple):
    """A batch's caps: ``rows`` (``max_batch_size``), ``nbytes`` (0: none) and ``tokens``
    (rows x padded length, 0: none)."""

    rows: int
    nbytes: int
    tokens: int


class Built(NamedTuple):
    """A batch as built for ``process_func``.

    ``inputs``: what the model is called with. ``length``: its leading length (rows, or
    items for one-sample formats): every output must have it on axis 0. ``rows``: samples
    it counts for (stats, controller). ``padded_length``: the length axis 1 was padded to
    (0: not padded).
    """

    inputs: Any
    length: int
    rows: int
    padded_length: int = 0


class Workspace:
    """One worker's reusable state: a ``BatchAssembler`` per input position, made on first
    use (position 0 for single arrays, one per leaf for named and tuple inputs)."""

    __slots__ = ("_assemblers",)

    def __init__(self) -> None:
        self._assemblers: list[BatchAssembler] = []

    def assembler(self, position: int) -> BatchAssembler:
        assemblers = self._assemblers
        while len(assemblers) <= position:
            assemblers.append(BatchAssembler(2))
        return assemblers[position]


class BatchFormat(ABC):
    """What a batch of compatible requests is to the engine (see the module docstring).

    ``one_sample``: each request is one element of the batch, and its caller gets element
    ``i`` of every output (stacked samples, generic objects); otherwise each request holds
    rows and its caller gets its rows ``[start:end]``. ``per_token``: which outputs are cut
    back to each caller's own sequence length (padded formats only).
    """

    one_sample: bool = False
    per_token: outputs.PerToken = outputs.NO_TRIM
    # The processor's (``Describer``), shared by its formats; a format made elsewhere
    # (a test's) gets its own on first use.
    _list_reading: outputs.ListReading | None = None

    @abstractmethod
    def build(self, requests: list[Request], workspace: Workspace) -> Built:
        """The batch of ``requests`` (in order) to call ``process_func`` with."""

    def split(self, out: Any, requests: list[Request], built: Built) -> list[Any]:
        """Each request's part of ``out``, in request order. ``BatchOutputError`` if the
        output does not have the batch's rows (docs/formats.md, "Outputs"), or if
        cutting it raises (an object with a length that does not slice by rows, a
        ``deque``): either way the output breaks the model's contract."""
        reading = self._list_reading
        if reading is None:
            reading = self._list_reading = outputs.ListReading()
        try:
            return outputs.split(out, requests, built, self.one_sample, self.per_token,
                                 reading)
        except BatchOutputError:
            raise
        except Exception as exc:
            raise BatchOutputError(
                f"process_func returned {type(out).__name__}, which could not be cut into "
                f"the parts of a batch of {built.length}: {type(exc).__name__}: {exc}",
            ) from exc

    def chunks(self, request: Request, limits: Limits) -> list[Request] | None:
        """Pieces of a request too large for one batch, each within ``limits``; None when
        it fits (or cannot be cut: it then runs alone)."""
        return None

    def join(self, parts: list[Any]) -> Any:
        """The result of a chunked request from its chunks' results, in order."""
        # Lists are joined as the module's rule read them in split: one result per row
        # only once a batch has shown it (one-row chunks read a list as outputs).
        reading = self._list_reading
        return outputs.join(parts, reading is not None and reading.outputs is not False)


class Leaf(Protocol):
    """Builds one input position of a batch (an array or a tensor of each request)."""

    @property
    def padded(self) -> bool: ...

    def build(self, items: list[Any] | tuple[Any, ...], workspace: Workspace, position: int,
              padded_length: int) -> Any: ...


class LeafFormat(BatchFormat):
    """A batch of items that are one array or tensor each (``leaf`` builds it).

    ``cut(item, start, stop)`` gives rows ``[start:stop]`` of an item (for chunks);
    ``label`` names the format in reprs and logs; ``trailing``: the signature's trailing
    shape (-1 at the padded axis).
    """

    def __init__(self, leaf: Leaf, stacked: bool, padding: Any,
                 cut: Callable[[Any, int, int], Any], label: str,
                 trailing: tuple[int, ...]) -> None:
        if padding is not None:
            padding.check_names(None, "an array or tensor item")
            padding.check_padded(leaf.padded, label)
        self._leaf = leaf
        self.one_sample = stacked
        self._padding = padding if leaf.padded else None
        if self._padding is not None:
            self.per_token = self._padding.per_token
        self._queued_shape = queued_shape(trailing, stacked, exact_length=True)
        self._cut = cut
        self._label = label

    def __repr__(self) -> str:
        return f"<{self._label}>"

    def build(self, requests: list[Request], workspace: Workspace) -> Built:
        padding = self._padding
        padded_length = 0 if padding is None else padding.padded_length(longest(requests))
        items = items_of(requests)
        check_queued_shapes(requests, items, self._queued_shape)
        batch = self._leaf.build(items, workspace, 0, padded_length)
        rows = batch.shape[0]
        return Built(batch, rows, rows, padded_length)

    def chunks(self, request: Request, limits: Limits) -> list[Request] | None:
        if self.one_sample:
            return None
        # Before its pieces are cut by the rows it was queued with.
        check_queued_shapes([request], [request.item], self._queued_shape)
        padding = self._padding
        tokens_per_row = 0 if padding is None else padding.padded_length(request.length)
        return row_chunks(request, limits, tokens_per_row, self._cut)


def queued_shape(trailing: tuple[int, ...], stacked: bool,
                 exact_length: bool) -> tuple[int, ...]:
    """The shape each item of a format (or one input of it) was queued with, as
    ``check_queued_shapes`` reads it: its request's rows (none for a stacked item: one
    sample), then ``trailing`` (a signature's; -1 at the padded axis, which is the
    request's length, or with ``exact_length`` false at most that: one input of a named
    item, whose request's length is its longest input's)."""
    length = QUEUED_LENGTH if exact_length else AT_MOST_LENGTH
    sizes = tuple(length if size == -1 else size for size in trailing)
    return sizes if stacked else (QUEUED_ROWS, *sizes)


def check_queued_shapes(requests: list[Request], items: Sequence[Any],
                        queued: tuple[int, ...]) -> None:
    """``ItemChangedError`` unless each of ``items`` (each request's item, or one input of
    it) has the shape its request was queued with (``queued``: see ``queued_shape``). An
    item resized after it was queued would shift every later caller's rows, which are
    cut from the output as queued (even where another's change made up for it in the
    batch's total), or be padded and cut back to a length it no longer has; failing the
    batch lets the failure search find the item and fail it alone."""
    changed = changed_item(requests, items, queued)
    if changed >= 0:
        shape = getattr(items[changed], "shape", None)
        now = "no shape" if shape is None else f"shape {_sizes(shape)}"
        raise ItemChangedError(
            f"an item (or the piece of it cut for this batch) has {now} where "
            f"{_sizes(_as_queued(queued, requests[changed]))} was queued: it changed after it "
            "was queued (an item must not change until its result has come)")


def _as_queued(queued: tuple[int, ...], request: Request) -> list[int | str]:
    marks: dict[int, int | str] = {QUEUED_ROWS: request.rows, QUEUED_LENGTH: request.length,
                                   AT_MOST_LENGTH: f"at most {request.length}"}
    return [marks.get(size, size) for size in queued]


def _sizes(shape: Sequence[int | str]) -> str:
    """``(2, 3)``, ``(3,)``, ``()``, as a tuple of sizes prints."""
    sizes = [str(size) for size in shape]
    return f"({', '.join(sizes)}{',' if len(sizes) == 1 else ''})"


def row_chunks(request: Request, limits: Limits, tokens_per_row: int,
               cut: Callable[[Any, int, int], Any]) -> list[Request] | None:
    """Cut a request that holds rows into pieces within ``limits`` (rows, bytes and
    ``rows x tokens_per_row`` tokens); None when it fits, or when it is a single row
    (which then runs alone, whatever it costs). ``cut(item, start, stop)`` gives the
    piece of rows ``[start:stop]``; its bytes are its rows' share of the request's (as
    counted at enqueue: padded to its length, which a piece keeps)."""
    rows = request.rows
    step = limits.rows
    if limits.nbytes and rows:
        step = min(step, max(1, limits.nbytes // max(1, request.nbytes // rows)))
    if limits.tokens and tokens_per_row:
        step = min(step, max(1, limits.tokens // tokens_per_row))
    if rows <= step:
        return None
    item, nbytes = request.item, request.nbytes
    pieces = []
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        pieces.append(request.replace_item(cut(item, start, stop), stop - start,
                                           -(-nbytes * (stop - start) // rows)))
    return pieces


# What a family tells the describer about one item, as a plain tuple (one is made per
# request): (signature, item, rows, nbytes, length). Equal signatures share a batch and a
# format; ``item`` is the item as the format keeps it (possibly normalised); ``length`` is
# its sequence length on the padded axis (0: not padded).
Description = tuple[Hashable, Any, int, int, int]


class Family(ABC):
    """Recognises one kind of item and makes the format for each of its signatures."""

    @abstractmethod
    def describe(self, item: Any) -> Description | None:
        """The item's description, or None if it is not of this family. Bad input of this
        family raises ``ValueError``/``TypeError`` naming the problem."""

    @abstractmethod
    def make_format(self, signature: Any) -> BatchFormat:
        """The format shared by all items with this signature."""


class Describer:
    """Chooses each item's format at enqueue (thread-safe) and builds its ``Request``.

    ``families`` are asked in order; the first that recognises the item describes it. A
    signature seen before gets its memoised key and format (one dict lookup).

    Plain ndarrays, the common case, skip the families once their (dtype, shape) has been
    described: everything a description holds follows from those two, unless the family
    had to change the item (byte order, a padded sample's new axis) or look into it
    (object arrays, checked for ragged rows every time), which are never memoised this
    way.
    """

    def __init__(self, families: list[Family], pad_multiple: int = 1) -> None:
        self._families = families
        self._multiple = pad_multiple
        self._memo: dict[Hashable, tuple[int, BatchFormat]] = {}
        # Plain ndarrays by (dtype, shape), shared with the native intake
        # (processor.enqueue_predict_async).
        self.known_arrays = KnownArrays(_MEMO_LIMIT)
        self._next_key = itertools.count(1)
        self._lock = threading.Lock()
        # What the model means by a list output, once a batch has shown it: one memory
        # for every format, since one model answers them all (and a format forgotten
        # past _MEMO_LIMIT, made again, must not forget it).
        self._list_reading = outputs.ListReading()

    def describe(self, item: Any, future: Any, now: float, priority: Any = 2,
                 max_queue_time: float = _INF) -> tuple[Request, int, int, int, int]:
        """``(request, rows, nbytes, key, queue_length)`` for ``item``: what the queue
        needs to order and group it. ``queue_length`` is its padded length rounded up to
        ``pad_to_multiple_of`` (what it costs in tokens per row). ``priority`` and
        ``max_queue_time`` (seconds from ``now``; the request's ``deadline`` is their sum)
        are kept in the request, for a retry to queue it again."""
        if type(item) is _ndarray:
            known = self.known_arrays.get(item)
            if known is not None:
                key, fmt, rows, nbytes, length, queue_length, _ = known
                return (Request(future, item, fmt, rows, nbytes, length, now, key,
                                queue_length, priority, max_queue_time),
                        rows, nbytes, key, queue_length)
        original = item
        for family in self._families:
            d = family.describe(item)
            if d is not None:
                break
        else:  # pragma: no cover - the generic family takes everything
            raise TypeError(f"no batch format for {type(item).__name__}")
        signature, item, rows, nbytes, length = d
        entry = self._memo.get(signature)
        if entry is None:
            entry = self._register(signature, family.make_format)
        queue_length = length
        if length:
            multiple = self._multiple
            queue_length = -(-length // multiple) * multiple
            # Bytes padded to its own rounded length: the queue scales them to a batch's
            # longest to hold max_batch_memory_mb for the padded batch.
            nbytes = -(-nbytes * queue_length // length)
        if (item is original and type(item) is _ndarray and item.dtype.kind != "O"
                and item.dtype.metadata is None):
            self.known_arrays.add(item, (entry[0], entry[1], rows, nbytes, length,
                                         queue_length, item.dtype))
        return (Request(future, item, entry[1], rows, nbytes, length, now, entry[0],
                        queue_length, priority, max_queue_time),
                rows, nbytes, entry[0], queue_length)

    def format_for(self, signature: Hashable, make: Callable[[Any], BatchFormat],
                   ) -> tuple[int, BatchFormat]:
        """The key and the format of ``signature`` (made by ``make(signature)`` on first
        use): for requests made other than by ``describe`` (``map``'s chunks)."""
        entry = self._memo.get(signature)
        return entry if entry is not None else self._register(signature, make)

    def _register(self, signature: Hashable, make: Callable[[Any], BatchFormat],
                  ) -> tuple[int, BatchFormat]:
        with self._lock:
            entry = self._memo.get(signature)
            if entry is None:
                if len(self._memo) >= _MEMO_LIMIT:
                    # Bounded: forgetting old signatures only stops their items from
                    # sharing a batch with newer ones of the same signature.
                    self._memo.clear()
                fmt = make(signature)
                fmt._list_reading = self._list_reading
                entry = self._memo[signature] = (next(self._next_key), fmt)
            return entry

"""``BatchProcessor.map`` and ``amap``: many items in, their results out in order.

A future per item costs about as much as a small CPU model's share of a batch, so a
bulk job through ``enqueue_predict`` spends its time on futures. Here consecutive items
of one kind are grouped into **chunks** of up to ``chunksize`` rows, and each chunk is
one request of the queue: one future, one push, one completion, whatever its size. The
per-item work left is what cannot be shared: describing each item (the processor's own
describer, as at enqueue; natively, ``take_like``, for a run of arrays exactly like the
one before), adding it to its chunk, and handing its result out. Items
reach the model as they would one by one (``formats/chunks.py``): a batch of chunks is
built natively by the items' own format and its output split per item.

Flow control: at most ``buffersize`` chunks are in flight (queued, running, or done
and not yet handed out); the input is read only to refill that window, so an infinite
or lazy input is read as fast as results are consumed and memory stays bounded.
``map`` hands results out a group of chunks at a time (``Grouping``). Results that are
ready are handed out before the window is refilled (``Window.hands_out_first``), so a
stream slower than the model gets them as they come, not a window later. A read that
goes on for ``Settings.read_wait`` is waiting on a slow source: it queues the open chunk
with the item that came last, and waits a moment for the oldest result before it reads
on.

Failures: a chunk of several items that fails is not retried whole (the engine fails
it at once, as it searches a failing batch of several requests at once). Its items are
queued again one by one as it fails, by the engine's thread failing it
(``Window.queue_again``), so the engine's bisection finds the failing item, retried as
it would be alone, and only that position raises (or yields the exception, with
``return_exceptions``); a ``stop()`` that comes before the iteration reaches the chunk
drains them as requests accepted before it. A chunk that expired (``QueueTimeoutError``)
or was refused or dropped at stop (``ProcessorStoppedError``) is not queued again: each
of its positions gets that error.
``ProcessorStoppedError`` and an exception raised by the input iterator always end the
iteration at their position, with or without ``return_exceptions``; a ``KeyboardInterrupt``
or ``SystemExit`` from the input iterator is raised at once.
"""

from __future__ import annotations

import asyncio
import functools
import math
import queue as _stdlib_queue
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from . import collecting
from ._native.future_state import (
    DUE,
    ENDED,
    TOOK_ALL,
    AsyncRequest,
    Request,
    take_like,
    total_rows,
)
from ._native.request_queue import MAX_COUNT, QueueClosed, priority_arg
from .aio import QueuedFuture
from .backpressure import push_when_room, room_wait
from .config import as_int
from .errors import ProcessorStoppedError, interrupts
from .formats.base import BatchFormat
from .formats.chunks import ChunkFormat

if TYPE_CHECKING:
    from .processor import BatchProcessor

_monotonic = time.monotonic
_INF = float("inf")
_ndarray = np.ndarray


# --------------------------------------------------------------------------- chunking


class Chunk:
    """Consecutive items of one kind, queued as one request."""

    __slots__ = ("format", "items", "key", "length", "nbytes", "queue_length", "requests",
                 "rows", "singles")

    def __init__(self, requests: list[Request], items: list[Any], fmt: BatchFormat,
                 key: int, rows: int, nbytes: int, length: int, queue_length: int) -> None:
        # Each item's request, as the describer made it: what enqueue_predict would queue
        # for the item, and does queue should the chunk fail (Window.queue_again).
        self.requests = requests
        self.items = items  # the items as given
        self.format = fmt
        self.key = key
        self.rows = rows
        self.nbytes = nbytes
        self.length = length
        self.queue_length = queue_length
        # Once it failed and its items were queued again one by one: a future each (or
        # the error that refused one).
        self.singles: list[Any] | None = None


class Failed:
    """Positions whose items could not be queued: one (bad input: the describer's error)
    or the ``count`` items of a chunk the queue refused (as it would refuse them one by
    one: a stopped processor, a size past its range), each getting ``error``."""

    __slots__ = ("count", "error")

    def __init__(self, error: BaseException, count: int = 1) -> None:
        self.error = error
        self.count = count


class InputFailed(Failed):
    """The input iterator raised: the iteration ends with its exception here."""

    __slots__ = ()


class Chunker:
    """Groups consecutive items of one kind (one compatibility key) into chunks within
    the processor's caps: its target rows per batch as the chunk opens
    (``current_batch_size``, which failures and memory pressure lower, as they do for
    requests one by one), at most ``chunksize``; ``max_batch_memory_mb`` and
    ``max_batch_tokens``. An item over a cap goes alone (the engine cuts it by rows).
    A chunk also holds at most as many items as rows: items of no rows (an array of
    shape ``(0, n)``) fill no rows, and the read-ahead is bounded in items.
    Closed chunks, and failures in their places, wait in ``ready``."""

    def __init__(self, processor: BatchProcessor[Any, Any], chunksize: int) -> None:
        config = processor.config
        self._processor = processor
        self._describer = processor._describer
        self._describe = self._describer.describe
        self._chunksize = chunksize
        self._max_rows = chunksize  # each chunk's, read as it opens (add)
        # Within the queue's range too (MAX_COUNT): items it takes one by one are taken
        # in a chunk, and a chunk refused at push is one item it would refuse alone.
        self._max_bytes = min(config.max_batch_bytes or MAX_COUNT, MAX_COUNT)
        self._max_tokens = min(config.max_batch_tokens or MAX_COUNT, MAX_COUNT)
        self.ready: deque[Chunk | Failed] = deque()
        self._requests: list[Request] = []
        self._items: list[Any] = []
        self._format: BatchFormat | None = None
        self._key = -1
        self._rows = 0
        self._nbytes = 0
        self._per_token = 0.0  # padded items: bytes per token of the padded axis, summed
        self._length = 0
        self._queue_length = 0
        self._chunk_formats: dict[int, tuple[int, BatchFormat]] = {}
        self._template: Request | None = None
        self.due = _INF  # when the async read in progress closes the open chunk (aread)

    def add(self, item: Any) -> None:
        try:
            request, rows, nbytes, key, queue_length = self._describe(item, None, 0.0)
        except Exception as exc:  # bad input: this position fails, the others go on
            self.flush()
            self.ready.append(Failed(exc))
            return
        grown = self._grown_bytes(nbytes, queue_length)
        if self._requests and (
                key != self._key or self._rows + rows > self._max_rows
                or grown > self._max_bytes
                or (self._rows + rows) * max(self._queue_length, queue_length)
                > self._max_tokens):
            self.flush()
            grown = self._grown_bytes(nbytes, queue_length)  # alone in a new chunk
        if not self._requests:  # a chunk opens
            self._max_rows = self._chunk_rows()
            self._key = key
            self._format = request.format
        self._requests.append(request)
        self._items.append(item)
        self._rows += rows
        self._nbytes = grown
        if queue_length:
            self._per_token += nbytes / queue_length
            self._queue_length = max(self._queue_length, queue_length)
            self._length = max(self._length, request.length)
        if self._full():
            self.flush()
        # A plain array (described as it is, nothing looked into): the items after it
        # that are exactly like it are described like it, natively (``read``).
        self._template = (request if type(item) is _ndarray and request.item is item
                          and not queue_length and rows and item.dtype.kind != "O" else None)

    def _grown_bytes(self, nbytes: int, queue_length: int) -> int:
        """The open chunk's bytes with an item of ``nbytes`` (padded to its own
        ``queue_length``; 0: not padded) added. The queue weighs padded bytes at the
        batch's longest length, so a chunk keeps its bytes per token and weighs them at
        its longest: a longer item pads every item before it."""
        if not queue_length:
            return self._nbytes + nbytes
        per_token = self._per_token + nbytes / queue_length
        return math.ceil(per_token * max(self._queue_length, queue_length))

    def holds_open(self) -> bool:
        """Some items wait in the open chunk."""
        return bool(self._requests)

    def _chunk_rows(self) -> int:
        """The rows of the next chunk: the processor's target now, at most ``chunksize``."""
        return min(self._chunksize, self._processor._current_batch_size)

    def _full(self) -> bool:
        """The open chunk holds its rows, or as many items (of no rows)."""
        return self._rows >= self._max_rows or len(self._requests) >= self._max_rows

    def flush(self) -> None:
        """Close the open chunk (if any) into ``ready``."""
        requests = self._requests
        if not requests:
            return
        key = self._key
        entry = self._chunk_formats.get(key)
        if entry is None:
            inner = self._format
            entry = self._chunk_formats[key] = self._describer.format_for(
                ("chunk", key), lambda _: ChunkFormat(inner))  # type: ignore[arg-type]
        self.ready.append(Chunk(requests, self._items, entry[1], entry[0], self._rows,
                                self._nbytes, self._length, self._queue_length))
        self._requests = []
        self._items = []
        self._rows = self._nbytes = self._length = self._queue_length = 0
        self._per_token = 0.0

    def _past(self, due: float) -> None:
        """After an item was added: at or after ``due``, close the open chunk."""
        if _monotonic() >= due:
            self.flush()

    def read(self, iterator: Iterator[Any], wait: float) -> bool:
        """Read items until a chunk (or a failure) is ready, or until an item comes
        ``wait`` seconds or more after the read began, which closes the open chunk with
        it (the source is slow); False once the input ended (or raised: an
        ``InputFailed`` is then last in ``ready``)."""
        add = self.add
        ready = self.ready
        due = _monotonic() + wait
        try:
            while not ready:
                template = self._template
                # A chunk opens through add(), which reads the target once its first
                # item has come (the source may have changed it meanwhile).
                if template is not None and self._requests:
                    room = min((self._max_rows - self._rows) // template.rows,
                               self._max_rows - len(self._requests))
                    if template.nbytes:
                        room = min(room, (self._max_bytes - self._nbytes) // template.nbytes)
                    if room > 0:
                        taken, item = take_like(iterator, template, room, self._requests,
                                                self._items, due)
                        self._rows += taken * template.rows
                        self._nbytes += taken * template.nbytes
                        if self._full():
                            self.flush()
                        if item is TOOK_ALL:
                            continue
                        if item is ENDED:
                            break
                        if item is DUE:
                            self.flush()
                            continue
                        add(item)
                        self._past(due)
                        continue
                item = next(iterator, ENDED)
                if item is ENDED:
                    break
                add(item)
                self._past(due)
            else:
                return True
        except Exception as exc:
            if self._template is not None and self._requests:
                # take_like may have taken items before the iterator raised.
                self._rows = total_rows(self._requests)
                self._nbytes = sum(r.nbytes for r in self._requests)
            self.flush()
            ready.append(InputFailed(exc))
            return False
        self.flush()
        return False

    async def aread(self, iterator: AsyncIterator[Any], wait: float) -> bool:
        """``read`` for an async iterator."""
        add = self.add
        ready = self.ready
        anext = iterator.__anext__
        due = self.due = _monotonic() + wait
        try:
            while True:
                try:
                    item = await anext()
                except StopAsyncIteration:
                    break
                add(item)
                self._past(due)
                if ready:
                    return True
        except Exception as exc:
            self.flush()
            ready.append(InputFailed(exc))
            return False
        self.flush()
        return False


# --------------------------------------------------------------------------- settings


class Settings:
    """What ``map``/``amap`` was called with, checked at the call by the rules the same
    arguments follow elsewhere: ``chunksize`` and ``buffersize`` are integers as the
    config reads them (``config.as_int``: an int or a numpy integer, never a bool or a
    float), ``priority`` is checked by the queue's own check (``priority_arg``: what
    ``enqueue_predict`` gets when its request is pushed), ``max_queue_time`` by
    ``enqueue_predict``'s (the processor checks it). ``TypeError`` for a wrong type,
    ``ValueError`` for a value out of range."""

    __slots__ = ("buffersize", "chunksize", "max_queue_time", "priority", "read_wait",
                 "return_exceptions")

    def __init__(self, processor: BatchProcessor[Any, Any], chunksize: int | None,
                 buffersize: int | None, priority: Any, max_queue_time: float | None,
                 return_exceptions: bool) -> None:
        config = processor.config
        most = config.max_batch_size
        self.chunksize = most if chunksize is None else _count_arg(
            "chunksize", chunksize, most, f"from 1 to max_batch_size ({most})")
        self.buffersize = (max(2, 2 * config.max_workers) if buffersize is None
                           else _count_arg("buffersize", buffersize, None, ">= 1"))
        self.priority = priority_arg(priority)
        # As a request keeps it: seconds, inf for none.
        self.max_queue_time = _INF if max_queue_time is None else max_queue_time
        self.read_wait = max(config.batch_timeout, READ_WAIT_MIN)
        if not isinstance(return_exceptions, (bool, np.bool_)):
            raise TypeError(f"return_exceptions must be a bool, got {return_exceptions!r}")
        self.return_exceptions = bool(return_exceptions)


def _count_arg(name: str, value: Any, most: int | None, allowed: str) -> int:
    """``value`` as a plain int from 1 to ``most`` (None: no upper bound); ``allowed``
    says that range in the ``ValueError``."""
    number = as_int(value)
    if number is None:
        raise TypeError(f"{name} must be an integer (an int or a numpy integer, not a "
                        f"bool or a float), got {value!r} ({type(value).__name__})")
    if number < 1 or (most is not None and number > most):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


# --------------------------------------------------------------------------- the window

# A read of the input this long waited on its source: map then waits up to
# ``GROUP_WAIT_S`` for the oldest result before it reads on, and a read queues its open
# chunk once it has gone on for ``batch_timeout``, at least this (``Settings.read_wait``).
# Items in memory fill a chunk in microseconds, but the reading thread may wait a switch
# interval (5 ms) or more for the GIL while a worker runs: a read cut short by that
# would only make a smaller chunk.
READ_WAIT_MIN = 0.02


class InFlight:
    """A queued chunk: the future of its list of results (a thread future for ``map``,
    an asyncio future for ``amap``), whose ``cancel()`` withdraws the chunk from the
    queue. Should the chunk fail, ``chunk.singles`` holds its items queued again."""

    __slots__ = ("chunk", "future")

    def __init__(self, chunk: Chunk, future: Any) -> None:
        self.chunk = chunk
        self.future = future


class Window:
    """One map's chunks in flight, oldest first, and what ``map`` and ``amap`` both do
    with them; the two differ only in how they wait, and in the futures of a failed
    chunk's items: ``make_future()`` gives one, as (what the queue completes, what the
    consumer waits on)."""

    def __init__(self, processor: BatchProcessor[Any, Any], settings: Settings) -> None:
        self.slots: deque[InFlight | Failed] = deque()
        self.reading = True
        self.closed = False
        self.handing_out = False  # results were ready after the last read
        self.make_future: Callable[[], tuple[Any, Any]] | None = None
        self._processor = processor
        self._settings = settings

    def add(self, slot: InFlight | Failed, ready: deque[Chunk | Failed]) -> None:
        self.slots.append(slot)
        if isinstance(slot, Failed) and isinstance(slot.error, ProcessorStoppedError):
            # Refused by the stopped processor: nothing after it is read.
            self.reading = False
            ready.clear()

    def wants_more(self) -> bool:
        return self.reading and len(self.slots) < self._settings.buffersize

    def _oldest_ready(self) -> bool:
        """The oldest slot can be handed out now, without a wait."""
        return bool(self.slots) and self.pending_oldest() is None

    def pending_oldest(self) -> Any:
        """The oldest slot's future if it is still pending, else None."""
        slot = self.slots[0] if self.slots else None
        if isinstance(slot, InFlight) and not slot.future.done():
            return slot.future
        return None

    def pending_after_slow_read(self, began: float) -> Any:
        """After a read that began at ``began`` (``time.monotonic()``) and its chunks
        were queued: the oldest slot's pending future to wait for, up to
        ``GROUP_WAIT_S``, before the next read, if this read waited on its source
        (``READ_WAIT_MIN`` or longer); else None. The source will likely keep the next
        read waiting too, and a result not handed out now would wait for it."""
        if _monotonic() - began < READ_WAIT_MIN:
            return None
        return self.pending_oldest()

    def refills(self) -> bool:
        """Whether to read into the window before handing out the oldest slot: not while
        results are ready since the last read (``hands_out_first``)."""
        if self.handing_out and self._oldest_ready():
            return False
        self.handing_out = False
        return True

    def hands_out_first(self) -> bool:
        """After a read and its chunks were queued: whether to stop reading and hand out
        the results that are ready. Where the model keeps up with the reading (a stream
        slower than the model), each result goes out as soon as it can, not once the
        window was refilled; where it does not, the oldest is pending and reading goes
        on, the window kept full."""
        self.handing_out = self._oldest_ready()
        return self.handing_out

    def queue_again(self, chunk: Chunk, error: BaseException) -> bool:
        """``chunk`` (of several items) fails with ``error``, a failure of its processing:
        queue its items again one by one, now, into ``chunk.singles``, each as
        ``enqueue_predict`` would (the map's priority, a ``max_queue_time`` of its own).
        The engine calls this on the thread that fails the chunk (a worker, or the
        supervisor for a time-out), before the chunk's future gets ``error``.

        Why then, rather than when the iteration reaches the chunk: its items are
        accepted as their chunk was, before any ``stop()`` that comes between. stop
        drains what was accepted before it and returns without waiting for the
        iteration, which would find the queue closed and nobody to run them. So they go
        in as requests accepted already (``BatchProcessor._push_accepted``: taken while
        stop drains the queue, which runs them or fails them). The bounds of the map
        hold: they are the chunk's items, in its place in the window (``buffersize``),
        and a full queue is not waited for (the caller is the engine's own thread): they
        go past ``max_queue_size``, as a retry does, never more than the chunks of the
        window held.

        False when nothing is queued: the map was closed first (nobody wants them) or
        stop has taken the queue's last requests (each of ``chunk.singles`` is then its
        ``ProcessorStoppedError``). The chunk then counts as the failure it was.

        No lock against ``cancel`` (the consumer closing, maybe from a garbage collection
        on this very thread): each sets its own flag before it reads the other's, so
        either ``cancel`` finds ``chunk.singles`` and withdraws them, or this finds
        ``closed`` after setting them and withdraws them itself."""
        settings = self._settings
        processor = self._processor
        make_future = self.make_future
        if self.closed or make_future is None:
            return False
        now = _monotonic()
        limit = settings.max_queue_time
        priority = settings.priority
        requests = []
        waits: list[Any] = []
        for r in chunk.requests:
            future, wait = make_future()
            requests.append(Request(future, r.item, r.format, r.rows, r.nbytes, r.length,
                                    now, r.key, r.queue_length, priority, limit))
            waits.append(wait)
        tokens = processor._push_accepted(requests)
        if tokens is None:
            stopped = ProcessorStoppedError(
                "processor stopped before the items of this failed chunk were queued "
                "again one by one")
            stopped.__cause__ = error
            chunk.singles = [stopped] * len(requests)
            return False
        for k, token in enumerate(tokens):
            if isinstance(token, BaseException):
                waits[k] = token  # this position gets the refusal
            else:
                waits[k]._bp_token = token  # its cancel() withdraws it
                waits[k]._bp_cancel_queued = processor._cancel_queued_ref
        chunk.singles = waits
        if self.closed:  # closed meanwhile: nobody will read them
            _withdraw_singles(waits)
        return True

    def take_failure(self) -> BaseException:
        """The oldest position could not be queued: its error, to yield; raised when it
        ends the iteration."""
        slot = self.slots[0]
        assert isinstance(slot, Failed)
        slot.count -= 1
        if not slot.count:
            self.slots.popleft()
        if type(slot) is InputFailed or self.final(slot.error):
            raise slot.error
        return slot.error

    def chunk_failed(self, slot: InFlight, error: BaseException) -> int:
        """The oldest chunk failed: 0 when its items were queued again one by one (as it
        failed: ``chunk.singles``); else how many positions get ``error`` (raised when it
        ends the iteration)."""
        if slot.chunk.singles is not None:
            return 0
        self.slots.popleft()
        if self.final(error):
            raise error
        return len(slot.chunk.items)

    def final(self, error: BaseException) -> bool:
        """Whether ``error`` at a position ends the iteration (is raised): always a
        ``ProcessorStoppedError`` and an interrupt of the model's (``KeyboardInterrupt``,
        ``SystemExit``: never a result, as an asyncio task raises them out of ``gather``
        whatever its ``return_exceptions``)."""
        return (not self._settings.return_exceptions
                or isinstance(error, ProcessorStoppedError) or interrupts(error))

    def cancel(self) -> None:
        """Withdraw what is still queued (what runs completes unseen): an iterator closed
        early leaves none of its requests behind in the queue. A chunk that fails after
        this keeps its items to itself (``queue_again``): it counts as one failure.

        Run by a garbage collection (a dropped map caught in a reference cycle), the
        withdrawal is left to the processor's supervisor (``BatchProcessor._run_soon``):
        a collection starts wherever an allocation happens, and this thread may hold a
        lock that withdrawing takes (the ``apredict`` line's, a future's)."""
        self.closed = True
        slots = list(self.slots)
        self.slots.clear()
        if collecting.on_this_thread():
            self._processor._run_soon(functools.partial(_withdraw_slots, slots))
        else:
            _withdraw_slots(slots)


def _withdraw_slots(slots: list[InFlight | Failed]) -> None:
    for slot in slots:
        if isinstance(slot, InFlight):
            _withdraw(slot.future)
            _withdraw_singles(slot.chunk.singles or ())


def _withdraw_singles(singles: Iterable[Any]) -> None:
    for single in singles:
        if not isinstance(single, BaseException):  # a refusal: nothing queued
            _withdraw(single)


def _withdraw(future: Any) -> None:
    """Cancel a future of the map's (a queued request leaves the queue); one that failed
    already has its error taken, which nobody will see (asyncio would log it)."""
    if not future.cancel() and future.done() and not future.cancelled():
        future.exception()


class ChunkRequest(AsyncRequest):
    """An ``amap`` chunk as the queue holds it: an ``AsyncRequest`` that also carries
    what queues its items again should it fail (``_bp_again``, as a ``map`` chunk's
    future does)."""

    __slots__ = ("_bp_again",)

    def __init__(self, future: asyncio.Future[Any], channel: Any,
                 again: Callable[[BaseException], bool]) -> None:
        super().__init__(future, channel)
        self._bp_again = again


def _request(future: Any, chunk: Chunk, priority: Any, settings: Settings) -> Request:
    """``chunk``'s request, enqueued now; its error counts its wait from ``enqueued_at``."""
    return Request(future, chunk.requests, chunk.format, chunk.rows, chunk.nbytes,
                   chunk.length, _monotonic(), chunk.key, chunk.queue_length, priority,
                   settings.max_queue_time)


# --------------------------------------------------------------------------- threads

# The longest map's iterating thread waits for a group of chunks (``Grouping``)
# before it takes the oldest one's results alone: what the grouping may add to the time
# a result takes to be handed out. Chunks that take longer than this gain nothing from
# being grouped (it saves one GIL hand-off a chunk). Also how long, after a slow read
# (a source that keeps it waiting), map waits for the oldest result before it reads on:
# the source will keep it waiting again, and the result would wait for that read.
GROUP_WAIT_S = 0.002
# After a group that did not complete in time, the chunks of 2**k windows are waited for
# one by one before the next try (k: the groups missed in a row before it, at most this).
MAX_GROUP_BACKOFF = 6


class Grouping:
    """How ``map``'s iterating thread waits while the oldest chunk is pending: for the
    chunk half a window after it, at most ``GROUP_WAIT_S``, so that the chunks up to it
    are handed out in one go.

    Each wake-up of the iterating thread takes the GIL while a worker is inside the
    model (numpy lets go of it there), and the model then waits for the GIL until this
    thread has handed out the chunk's results and queued the next chunk: woken once per
    chunk, the model stalls once per chunk; woken once per group, once per group
    (``benchmarks/ablate_map.py``). Nothing is waited for beyond that bound: a
    later chunk that is slow (retried, or in a call that hangs) holds up the results
    before it by ``GROUP_WAIT_S`` at most. After a group that did not complete in time,
    chunks are waited for one by one for a while (``MAX_GROUP_BACKOFF``)."""

    __slots__ = ("missed", "ungrouped")

    def __init__(self) -> None:
        self.ungrouped = 0  # chunks to wait for one by one before grouping again
        self.missed = 0  # groups in a row that did not complete in time

    def wait(self, slots: deque[InFlight | Failed]) -> None:
        """The oldest of ``slots`` is pending: wait for its group (or not at all)."""
        if self.ungrouped:
            self.ungrouped -= 1
            return
        later = slots[len(slots) // 2]
        if later is slots[0] or not isinstance(later, InFlight):
            return
        later.future._wait(GROUP_WAIT_S)
        if later.future.done():
            self.missed = 0
        else:
            self.ungrouped = len(slots) << self.missed
            self.missed = min(self.missed + 1, MAX_GROUP_BACKOFF)


def map_results(processor: BatchProcessor[Any, Any], items: Iterable[Any],
                settings: Settings) -> Iterator[Any]:
    """``BatchProcessor.map`` (see its docstring): a generator."""
    from .processor import _RequestFuture

    queue = processor._queue
    priority = settings.priority
    window = Window(processor, settings)
    # A full queue is waited for, within the chunk's max_queue_time (counted from then).
    wait = room_wait(None, settings.max_queue_time)

    def make_future() -> tuple[Any, Any]:
        future = _RequestFuture()
        return future, future

    window.make_future = make_future

    def submit(entry: Chunk | Failed) -> InFlight | Failed:
        if not isinstance(entry, Chunk):
            return entry
        future = _RequestFuture()
        future._bp_again = functools.partial(window.queue_again, entry)  # before it runs
        request = _request(future, entry, priority, settings)
        try:
            token = queue.push(request, priority, entry.rows, entry.nbytes, entry.key,
                               wait.seconds, entry.queue_length, request.deadline)
        except (_stdlib_queue.Full, QueueClosed) as exc:
            return Failed(processor._refusal(exc, *wait), len(entry.items))
        except Exception as exc:  # refused as enqueue_predict's push would refuse it
            return Failed(exc, len(entry.items))
        except BaseException as exc:
            processor._count_interrupted_wait(exc)
            raise
        future._bp_token = token  # its cancel() withdraws it from the queue
        future._bp_cancel_queued = processor._cancel_queued_ref
        return InFlight(entry, future)

    iterator = iter(items)  # a TypeError at the call; nothing is read before next()

    def gen() -> Iterator[Any]:
        chunker = Chunker(processor, settings.chunksize)
        ready = chunker.ready
        slots = window.slots
        grouping = Grouping()
        read_wait = settings.read_wait
        try:
            while True:
                if window.refills():
                    while window.wants_more():
                        began = _monotonic()
                        window.reading = chunker.read(iterator, read_wait)
                        while ready:
                            window.add(submit(ready.popleft()), ready)
                        pending = window.pending_after_slow_read(began)
                        if pending is not None:
                            pending._wait(GROUP_WAIT_S)
                        if window.hands_out_first():
                            break
                if not slots:
                    return
                slot = slots[0]
                if not isinstance(slot, InFlight):
                    yield window.take_failure()
                    continue
                if not slot.future.done():
                    grouping.wait(slots)
                # Its own outcome first (a failed chunk's items are queued again before
                # its failure is set).
                try:
                    parts = slot.future.result()
                except BaseException as exc:
                    if not slot.future.done():
                        # Interrupted while waiting (KeyboardInterrupt): not the chunk's
                        # outcome; it stays in the window to be withdrawn.
                        raise
                    count = window.chunk_failed(slot, exc)
                    for _ in range(count):
                        yield exc
                    if count:
                        continue
                else:
                    slots.popleft()
                    yield from parts
                    continue
                # Its items one by one. The slot stays first in the window meanwhile, so
                # closing the iterator withdraws the ones not handed out yet.
                singles = slot.chunk.singles
                assert singles is not None
                while singles:
                    single = singles[0]
                    failed = isinstance(single, BaseException)  # refused: its error
                    value = single
                    if not failed:
                        try:
                            value = single.result()
                        except BaseException as exc:
                            if not single.done():
                                raise  # interrupted while waiting: withdrawn below
                            value, failed = exc, True
                    del singles[0]
                    if failed and window.final(value):
                        raise value
                    yield value
                slots.popleft()
        finally:
            window.cancel()

    return gen()


# --------------------------------------------------------------------------- asyncio


def amap_results(processor: BatchProcessor[Any, Any],
                 items: Iterable[Any] | AsyncIterable[Any],
                 settings: Settings) -> AsyncIterator[Any]:
    """``BatchProcessor.amap`` (see its docstring): an async generator."""
    priority = settings.priority
    window = Window(processor, settings)
    # A TypeError at the call; nothing is read before the first item is asked for.
    if isinstance(items, AsyncIterable):
        aiterator: AsyncIterator[Any] | None = items.__aiter__()
    else:
        aiterator = None
        iterator = iter(items)

    async def submit(entry: Chunk | Failed, loop: asyncio.AbstractEventLoop,
                     channel: Any) -> InFlight | Failed:
        if not isinstance(entry, Chunk):
            return entry
        # Cancelling the task that awaits it cancels this future, which then takes the
        # chunk out of the queue at once (as apredict's does).
        future = QueuedFuture(loop=loop)
        again = functools.partial(window.queue_again, entry)
        request = _request(ChunkRequest(future, channel, again), entry, priority, settings)
        try:
            token = await push_when_room(processor, request, priority, entry.rows,
                                         entry.nbytes, entry.key, entry.queue_length,
                                         None)
        except Exception as exc:  # refused as enqueue_predict's push would refuse it
            return Failed(exc, len(entry.items))
        future._bp_token = token
        future._bp_cancel_queued = processor._cancel_queued_ref
        return InFlight(entry, future)

    async def gen() -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        channel = processor._channel_for(loop)

        def make_future() -> tuple[Any, Any]:
            # On the thread failing a chunk: an asyncio future of this loop is only made
            # there, completed on the loop (through the channel).
            future = QueuedFuture(loop=loop)
            return AsyncRequest(future, channel), future

        window.make_future = make_future
        chunker = Chunker(processor, settings.chunksize)
        ready = chunker.ready
        slots = window.slots
        read_wait = settings.read_wait
        reader = (None if aiterator is None
                  else SourceReader(chunker, aiterator, read_wait))
        try:
            while True:
                if window.refills():
                    while window.wants_more():
                        if aiterator is None:
                            began = _monotonic()
                            window.reading = chunker.read(iterator, read_wait)
                        else:
                            assert reader is not None
                            got = await reader.read_or_result(window)
                            if got is False:
                                break  # the oldest result is ready: hand it out first
                            if got:
                                window.reading = reader.take()
                        while ready:
                            window.add(await submit(ready.popleft(), loop, channel), ready)
                        if aiterator is None:  # (the reader's race covers an async source)
                            pending = window.pending_after_slow_read(began)
                            if pending is not None:
                                await asyncio.wait((pending,), timeout=GROUP_WAIT_S)
                        if window.hands_out_first():
                            break
                if not slots:
                    return
                slot = slots[0]
                if not isinstance(slot, InFlight):
                    yield window.take_failure()
                    continue
                # Its own outcome first, even once its items were queued again (they are
                # before its failure is set): asyncio logs a failure never retrieved.
                try:
                    parts = await slot.future
                except Exception as exc:
                    count = window.chunk_failed(slot, exc)
                    for _ in range(count):
                        yield exc
                    if count:
                        continue
                else:
                    slots.popleft()
                    for part in parts:
                        yield part
                    continue
                singles = slot.chunk.singles
                assert singles is not None
                while singles:
                    single = singles[0]
                    if isinstance(single, BaseException):  # refused: its error
                        value = single
                        if window.final(value):
                            raise value
                    else:
                        try:
                            value = await single
                        except Exception as exc:
                            if window.final(exc):
                                raise
                            value = exc
                    del singles[0]
                    yield value
                slots.popleft()
        finally:
            if reader is not None:
                reader.cancel()
            window.cancel()

    return gen()


class SourceReader:
    """``amap``'s async source, read a chunk at a time (``Chunker.aread``) in one task of
    its own, so that results are handed out while the source keeps a read waiting (a
    message queue gone quiet), and the open chunk is queued at the read's due time
    without waiting for a next item. A context the source holds across its yields and that
    binds to a task (``asyncio.timeout``, a task group) binds to that task: should it
    cancel the task while the source is not running (at a yield), the input ends there
    with a ``RuntimeError`` (the cancellation its ``__cause__``), as the cancellation
    cannot reach the source there. Any other ``BaseException`` out of the source (an
    ``Exception`` ends the input at its position, ``Chunker.aread``) reaches the
    consumer as it is."""

    __slots__ = ("_ask", "_begun", "_chunker", "_closing", "_failure", "_iterator", "_read",
                 "_task", "_wait")

    def __init__(self, chunker: Chunker, iterator: AsyncIterator[Any], wait: float) -> None:
        self._chunker = chunker
        self._iterator = iterator
        self._wait = wait
        self._ask: asyncio.Future[None] | None = None  # the task waits on it between reads
        self._read: asyncio.Future[bool] | None = None  # the read asked for, until taken
        self._begun = False  # the task has begun that read
        self._task: asyncio.Future[None] | None = None
        self._closing = False  # cancel() was called: the amap ends
        self._failure: BaseException | None = None  # what ended the reading task

    async def read_or_result(self, window: Window) -> bool | None:
        """Read a chunk into ``chunker.ready`` (begun now, or still going on from an
        earlier call): True once it ended (``take`` gives what ``aread`` returned, or
        raises what ended the reading); False as soon as the oldest result in
        ``window`` is ready while it goes on; None once the open chunk was closed at
        the read's due time while the source keeps it waiting (its items are in
        ``chunker.ready``; the read goes on)."""
        read = self._read
        if read is None:
            read = self._read = asyncio.get_running_loop().create_future()
            self._begun = False
            if self._failure is not None:
                read.set_exception(self._failure)
            elif self._task is None:
                self._task = asyncio.ensure_future(self._run())
            elif self._ask is not None and not self._ask.done():
                self._ask.set_result(None)
            # (else the task was cancelled as it waited: it fails this read.)
        if not read.done() and not self._begun:
            # Its turn first (it was scheduled before this step): a source that does not
            # keep it waiting gives a whole chunk in it, and the window stays full.
            await asyncio.sleep(0)
        chunker = self._chunker
        while not read.done():
            waits: tuple[asyncio.Future[Any], ...] = (read,)
            if window.slots:
                pending = window.pending_oldest()
                if pending is None:
                    return False
                waits = (read, pending)
            # Until the read's due time: items that join the open chunk meanwhile go at
            # that time. Past it, an item that comes closes its chunk itself (aread).
            left = chunker.due - _monotonic()
            if left <= 0 and chunker.holds_open():
                chunker.flush()
                return None
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED,
                               timeout=left if left > 0 else None)
        return True

    def take(self) -> bool:
        """What the read that ended returned (``Chunker.aread``). Should the reading have
        failed with an ``Exception``, the input ends there, as when the source raises
        one (``InputFailed`` after the items read before); any other exception is
        raised here."""
        assert self._read is not None
        read, self._read = self._read, None
        failure = None if read.cancelled() else read.exception()
        if isinstance(failure, Exception):
            self._chunker.flush()
            self._chunker.ready.append(InputFailed(failure))
            return False
        return read.result()

    def cancel(self) -> None:
        """Stop reading (the amap ends): items read and not queued are dropped."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        read = self._read
        if read is not None and read.done() and not read.cancelled():
            read.exception()  # never taken: not an unretrieved failure

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                read = self._read
                assert read is not None
                self._begun = True
                ended = await self._chunker.aread(self._iterator, self._wait)
                self._ask = loop.create_future()
                read.set_result(ended)
                await self._ask
        except BaseException as exc:
            if self._closing:
                raise
            failure = exc
            if isinstance(exc, asyncio.CancelledError):
                failure = RuntimeError(
                    "amap's task reading its async source was cancelled while the source "
                    "was not running: by a context the source holds across its yields "
                    "(asyncio.timeout, a task group)")
                failure.__cause__ = exc
            self._failure = failure
            read = self._read
            if read is not None and not read.done():
                read.set_exception(failure)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise

"""Awaiting room in a full queue from asyncio: ``BatchProcessor.apredict``.

``enqueue_predict_async`` can only refuse when the queue is full (blocking the event loop
is not an option). ``apredict`` waits instead, the way ``asyncio.Queue.put`` does, and
without a thread per waiting request; unlike ``asyncio.Queue.put`` it serves callers in
arrival order. A coroutine that finds the queue full, or anyone in line (``ahead``:
waiters still waiting, and waiters handed room that have not pushed yet), takes a place
at the back of ``RoomWaiters``' line instead of pushing, and sleeps on an ``asyncio``
future of its own loop. With nobody in line, the fast path, that costs one int read.

The line hands out room, oldest waiter first: it reads the queue's ``room`` under its
lock and hands out what no waiter holds yet, whenever requests leave the queue
(``release``), when the first waiter joins, and when a waiter handed room pushed
(``settle``) or gave it up (``withdraw``). The wakes travel to each loop through its
``LoopChannel`` (aio.py), so a batch's worth of waiters costs a loop one wake-up, the
same as a batch's results; posted under the lock in the order handed out, they push in
that order. A waiter handed room that finds the queue full when it pushes (a caller
outside the line took it) waits again in its old place, ahead of those who came after it.

Outside the line: threads calling ``enqueue_predict`` (and ``map``) push whenever the
queue has room, or wait for it in the queue itself, up to their ``timeout``;
``enqueue_predict_async`` pushes or is refused at once. Either may take room handed to
a waiter that has not run yet, which then waits again, first in line. The line orders
the ``apredict`` and ``amap`` callers among themselves.

No wake-up is lost: a caller reads the queue's room and registers under the lock that
``release`` takes, and room freed after that read is released after it, so the release
finds it in line. (``epoch``, bumped by each release and read before a push that found
the queue full, registers a waiter only if no room was released since; the caller
pushes again otherwise. Without a queue to read, that protocol alone holds.) A waiter
that goes away (its task was cancelled, its ``timeout`` passed) after it was handed room
passes that room on to the next waiter. Room goes only to a waiter whose loop is
running: one on a closed loop could never take it (it leaves the line), and one on a
stopped loop is woken without room, so that it asks again if its loop runs again. A
loop can also stop (or close) after its waiter was handed room and before the waiter
ran: that claim is taken back, the waiter counted as woken without room, at the next
hand-out or at the supervisor's next tick (``reclaim``), whichever comes first (a loop
that stops tells nobody, and no request may leave the queue to start a hand-out). The
line is kept in order of first arrival (a ticket each).

Nobody waits beside room that nobody will hand out: while anyone waits, room in the
queue that no waiter holds always has a hand-out on its way. Room is freed only in ways
that call ``release`` afterwards: a worker's pop (engine/workers.py); a queued request
cancelled, by its caller or by a ``map``/``amap`` withdrawing its chunks
(``BatchProcessor._cancel_queued``); one expired by ``max_queue_time``
(``Engine.expire_queued``, from the supervisor and from ``stop``); and ``stop``, which
closes the line first (everyone woken, every push refused) and only then drains the
queue. ``pause`` and ``resume`` free nothing (pops stop, then pops release); a retry
parked after a failed call only takes room. (A push that runs out of memory after it
took a slot gives the slot back unreported: the next release hands it out.) A claim
ends by its push (``settle`` hands out what a release between that push and it could
not, counting the room as still held), by a failure or a departure (``withdraw``, which
releases), by finding the room taken (the caller pushes again at once if room was
released since, else waits again), or by its loop stopping (``reclaim``). And the first
to join a line where nobody waits hands out the room nobody holds (left over by a
release that found fewer waiters than room); later ones join behind a waiter, so any
such room's hand-out is on its way.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import queue as _stdlib_queue
import reprlib
import threading
import time
from collections import deque
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

from . import collecting
from ._native.future_state import AsyncRequest
from ._native.request_queue import QueueClosed, RequestQueue
from .aio import LoopChannel, QueuedFuture
from .config import BatchPriority

if TYPE_CHECKING:
    from .processor import BatchProcessor

T = TypeVar("T")
U = TypeVar("U")

# A waiter's states: in the line; handed room; woken without room (its loop was not
# running: it tries again when it runs); withdrawn.
_WAITING, _CLAIMED, _NUDGED, _GONE = 0, 1, 2, 3
_monotonic = time.monotonic
_INF = float("inf")


class _Waiter:
    __slots__ = ("channel", "future", "state", "ticket")

    def __init__(self, future: asyncio.Future[None], channel: LoopChannel,
                 ticket: int) -> None:
        self.future = future
        self.channel = channel
        self.state = _WAITING
        self.ticket = ticket


class RoomWaiters:
    """Coroutines waiting for room in one processor's queue, served in arrival order.

    ``queue``: the ``RequestQueue`` whose room it hands out; its ``room`` is read under
    this line's lock, and only room not handed out already goes to the oldest waiters.
    Without one (a line on its own) a release hands out the count it is given.
    ``defer``: runs work later on a thread of its own (``BatchProcessor._run_soon``):
    a waiter withdrawn by a garbage collection (``collecting``) withdraws there."""

    def __init__(self, queue: RequestQueue | None = None,
                 defer: Callable[[Callable[[], object]], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._defer = defer
        self._line: deque[_Waiter] = deque()
        self._waiting = 0  # entries of _line still _WAITING
        self._claimed = 0  # waiters handed room that have neither pushed nor left
        # Those waiters, by the channel of their loop: a hand-out looks at each loop once
        # (whether it still runs), not at each waiter, of which there may be a queue's worth.
        self._claims: dict[LoopChannel, set[_Waiter]] = {}
        # _waiting + _claimed: whoever finds it 0 may push at once (apredict's fast path).
        self.ahead = 0
        self._queue = queue
        self._closed = False
        self._tickets = itertools.count()
        self.epoch = 0

    def __len__(self) -> int:
        return self._waiting

    def ticket(self) -> int:
        """A new caller's place in the line (kept when it waits again)."""
        return next(self._tickets)

    def wait(self, loop: asyncio.AbstractEventLoop, channel: LoopChannel,
             epoch: int | None, ticket: int, lost: _Waiter | None = None,
             ) -> _Waiter | None:
        """On the loop: register a waiter with its ``ticket``, in ticket order; or None:
        push now. ``epoch``: read before a push that found the queue full, which makes
        this None once room was released since; ``None`` for a caller that did not just
        push, which gets None only if nobody is ahead of it and the queue has room.
        ``lost``: this caller's waiter handed room that another caller took first: it
        gives up that claim. The first to wait is handed at once the room nobody holds
        (others waiting already: the releases to come hand it out)."""
        future = loop.create_future()
        with self._lock:
            if lost is not None and lost.state == _CLAIMED:
                self._unclaim_locked(lost, _GONE)
            if self._closed:
                return None
            if epoch is not None:
                if epoch != self.epoch:
                    return None
            elif not self.ahead and (self._queue is None or self._queue.room > 0):
                return None
            waiter = _Waiter(future, channel, ticket)
            first = not self._waiting
            line = self._line
            if not line or line[-1].ticket < ticket:
                line.append(waiter)  # a first wait: the newest ticket
            else:
                # Woken but the room was taken: back among the oldest, in ticket order.
                i = 0
                while line[i].ticket < ticket:
                    i += 1
                line.insert(i, waiter)
            self._waiting += 1
            self.ahead += 1
            if first:
                self._hand_out_locked(self._unclaimed_locked())
        return waiter

    def release(self, count: int) -> None:
        """From any thread: ``count`` requests left the queue; hand the room nobody
        claimed yet to the oldest waiters."""
        with self._lock:
            self.epoch += 1
            if not self._waiting:
                return
            if self._closed:
                count = len(self._line)
            elif self._queue is not None:
                count = self._unclaimed_locked()
            self._hand_out_locked(count)

    def settle(self, waiter: _Waiter) -> None:
        """On the loop: a waiter handed room has pushed: it took its room. (One that
        could not push withdraws: its room goes on.) A release between its push and
        this counted it as holding room it had taken: what that release could not hand
        out, this does."""
        with self._lock:
            if waiter.state == _CLAIMED:
                self._unclaim_locked(waiter, _GONE)
                self._hand_out_locked(self._unclaimed_locked())

    def close(self) -> None:
        """The queue is closed: wake everyone (their push raises ``QueueClosed``)."""
        with self._lock:
            self._closed = True
        self.release(0)

    def withdraw(self, waiter: _Waiter) -> None:
        """On the loop: the waiter stops waiting (cancelled, timed out). Room it was
        already handed goes to the next waiter.

        Run by a garbage collection (a waiting coroutine nobody kept, its loop closed
        under it), on a thread that may hold this line's lock, it is left to ``defer``;
        meanwhile the waiter's closed loop keeps it from any room (``_hand_out_locked``,
        ``_unclaimed_locked``)."""
        if self._defer is not None and collecting.on_this_thread():
            self._defer(functools.partial(self._withdraw, waiter))
        else:
            self._withdraw(waiter)

    def _withdraw(self, waiter: _Waiter) -> None:
        with self._lock:
            state = waiter.state
            if state == _CLAIMED:
                self._unclaim_locked(waiter, _GONE)
            waiter.state = _GONE
            if state == _WAITING:
                self._waiting -= 1
                self.ahead -= 1
                if not self._waiting:
                    self._line.clear()
                elif len(self._line) > 64 and self._waiting < len(self._line) // 2:
                    # Many left without being woken (a paused processor, time-outs):
                    # drop them now rather than at the next release.
                    self._line = deque(w for w in self._line if w.state == _WAITING)
        if state == _CLAIMED:
            self.release(1)

    def reclaim(self) -> None:
        """From any thread (the supervisor, at its tick): take back the room of waiters
        handed it whose loop has stopped or closed since, and hand it to those waiting.
        A loop that stops says so to nobody; without this, waiters behind such a claim
        would wait for the next request to leave the queue, which may never come."""
        if not self._claimed:
            return
        with self._lock:
            # Taken back even with nobody waiting: a claim counts in ``ahead``, which
            # sends every caller to the line (and refuses those that cannot wait).
            self._drop_dead_claims_locked()
            if self._waiting:
                self._hand_out_locked(self._unclaimed_locked())

    def _unclaim_locked(self, waiter: _Waiter, state: int) -> None:
        """``waiter`` no longer holds the room it was handed; its new ``state``."""
        waiter.state = state
        claims = self._claims[waiter.channel]
        claims.discard(waiter)
        if not claims:
            del self._claims[waiter.channel]
        self._claimed -= 1
        self.ahead -= 1

    def _unclaimed_locked(self) -> int:
        """Room in the queue not handed to a waiter yet (0 without waiters to hand it
        to, or without a queue to read). Room held by a waiter whose loop stopped or
        closed after it was handed the room counts as not handed: that waiter is woken
        without room, as if its loop had not been running at the hand-out."""
        if not self._waiting or self._queue is None:
            return 0
        self._drop_dead_claims_locked()
        return self._queue.room - self._claimed

    def _drop_dead_claims_locked(self) -> None:
        """Take back the room of waiters whose loop stopped or closed after they were
        handed it: each is woken without room, as if its loop had not been running at
        the hand-out."""
        for channel in [c for c in self._claims if not c.serving()]:
            for waiter in list(self._claims[channel]):
                closed = waiter.future.get_loop().is_closed()
                self._unclaim_locked(waiter, _GONE if closed else _NUDGED)

    def _hand_out_locked(self, count: int) -> None:
        """Hand ``count`` units of room to the oldest waiters whose loop runs, and wake
        them. One on a stopped loop is woken without room (to ask again if its loop runs
        again); one on a closed loop leaves the line. The wakes are posted under the
        lock: posted by two threads at once they could reach a loop out of turn."""
        line = self._line
        while count > 0 and self._waiting:
            waiter = line.popleft()
            if waiter.state != _WAITING:
                continue
            self._waiting -= 1
            if waiter.channel.serving():
                waiter.state = _CLAIMED
                self._claims.setdefault(waiter.channel, set()).add(waiter)
                self._claimed += 1
                count -= 1
            else:
                self.ahead -= 1
                if waiter.future.get_loop().is_closed():
                    waiter.state = _GONE  # its loop is closed: it will never take room
                    continue
                waiter.state = _NUDGED  # a stopped loop: to try again if it runs
            waiter.channel.post(waiter.future, True, None)


def _count_given_up(processor: BatchProcessor[Any, Any]) -> None:
    """A caller that stopped waiting for room (its task cancelled) counts as refused: its
    request was never accepted. Run by a garbage collection (a waiting coroutine closed
    with its loop), on a thread that may hold the counts' lock, the count is left to the
    processor's supervisor, as ``RoomWaiters.withdraw`` leaves its own work."""
    if collecting.on_this_thread():
        processor._run_soon(processor._count_refusal)
    else:
        processor._count_refusal()


class _NoRoomInTime(Exception):
    """A waiter's ``timeout`` passed."""


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(_NoRoomInTime())


class RoomWait(NamedTuple):
    """How long a push may wait for room in a full queue, and which limit set it."""

    seconds: float | None  # None: as long as it takes
    by_max_queue_time: bool  # the request's max_queue_time, not the caller's timeout


def room_wait(timeout: float | None, max_queue_time: float) -> RoomWait:
    """How long a push may wait for room in a full queue: ``timeout`` (``None``: as long
    as it takes), never past the request's ``max_queue_time`` left (seconds, ``inf``:
    none), which counts from the call: a wait for room is time in the queue to its
    caller."""
    if max_queue_time < (_INF if timeout is None else timeout):
        return RoomWait(max(max_queue_time, 0.0), True)
    return RoomWait(timeout, False)


def timeout_arg(timeout: Any) -> float | None:
    """A ``timeout`` argument (``apredict``'s wait for room, ``stop``'s): ``None`` or
    seconds >= 0, any number ``enqueue_predict`` takes (numpy scalars, ``Fraction``,
    ``Decimal``; an int too large for a float is for ever). ``TypeError`` for a
    non-number (a string, a bool, numpy's included), ``ValueError`` for a NaN (a
    ``Decimal`` signalling one too) or a negative number."""
    if timeout is None:
        return None
    if isinstance(timeout, (str, bytes, bytearray)) or type(timeout).__name__ in ("bool", "bool_"):
        raise TypeError(f"timeout must be None or a number of seconds, got {_shown(timeout)}")
    try:
        value = float(timeout)
    except OverflowError:
        value = math.inf if timeout > 0 else -math.inf
    except (TypeError, ValueError):
        if not (isinstance(timeout, Decimal) and timeout.is_nan()):  # a signalling NaN
            raise TypeError(
                f"timeout must be None or a number of seconds, got {_shown(timeout)}"
            ) from None
        value = math.nan
    if value != value or value < 0:
        raise ValueError(f"timeout must be None or >= 0, got {_shown(timeout)}")
    return value


def _shown(value: Any) -> str:
    """A refused timeout in an error message: its repr, cut short (an int of hundreds
    of digits)."""
    return reprlib.repr(value)


async def apredict(processor: BatchProcessor[T, U], item: T, timeout: float | None,
                   priority: BatchPriority | int, max_queue_time: float | None) -> U:
    """See ``BatchProcessor.apredict``; ``max_queue_time``: the request's, checked
    (seconds), or ``None``."""
    timeout = timeout_arg(timeout)
    loop = asyncio.get_running_loop()
    future = QueuedFuture(loop=loop)
    request, rows, nbytes, key, length = processor._describe(
        item, AsyncRequest(future, processor._channel_for(loop)), _monotonic(), priority,
        _INF if max_queue_time is None else max_queue_time)
    token = await push_when_room(processor, request, priority, rows, nbytes, key, length,
                                 timeout)
    # Cancelling the awaiting task cancels the future: still queued, the request leaves
    # the queue at once (its room goes to the next waiter); already dispatched, the worker
    # sees the cancelled future and its result is dropped.
    future._bp_token = token
    future._bp_cancel_queued = processor._cancel_queued_ref
    return cast("U", await future)


async def push_when_room(processor: BatchProcessor[Any, Any], request: Any,
                         priority: BatchPriority | int, rows: int, nbytes: int, key: int,
                         length: int, timeout: float | None) -> int:
    """On the loop: push a described request (its future an ``AsyncRequest`` of this
    loop; its ``deadline`` the queue's), waiting for room in a full queue, or behind
    those already waiting for it, up to ``timeout`` seconds (``None``: as long as it
    takes), and never past the request's ``max_queue_time`` (its ``deadline``), which
    counts from the call: a wait for room is time in the queue to its caller; its token.
    ``QueueFullError`` when the time is up, ``ProcessorStoppedError`` once stopped; a
    caller that stops waiting (its task cancelled) is counted as refused: its request was
    never accepted."""
    room = processor._room
    if room is None or not room.ahead:
        # Nobody in line (the fast path): push, as enqueue_predict_async does.
        try:
            return processor._queue.push(request, priority, rows, nbytes, key, 0, length,
                                         request.deadline)
        except QueueClosed as exc:
            raise processor._refusal(exc, timeout) from None
        except _stdlib_queue.Full:
            pass
    wait = room_wait(timeout, request.deadline - _monotonic())
    return await _push_in_line(processor, room, request, priority, rows, nbytes, key,
                               length, wait)


async def _push_in_line(processor: BatchProcessor[Any, Any], room: RoomWaiters | None,
                        request: Any, priority: BatchPriority | int, rows: int,
                        nbytes: int, key: int, length: int, wait: RoomWait) -> int:
    """``push_when_room`` once it found the queue full or others in line: take a place
    at the back of the line, and push when handed room."""
    loop = asyncio.get_running_loop()
    queue = processor._queue
    deadline = None if wait.seconds is None else loop.time() + wait.seconds
    if deadline is not None and loop.time() >= deadline:
        # It would have to wait (timeout=0): refused at once.
        raise processor._refusal(_stdlib_queue.Full(), *wait)
    if room is None:
        # Made on first need; every release reaches it from now on (room freed before,
        # it reads from the queue).
        room = processor._room_waiters()
    channel = processor._channel_for(loop)
    ticket = room.ticket()
    epoch: int | None = None
    claim: _Waiter | None = None  # this caller's waiter, handed room, about to push
    while True:
        waiter = room.wait(loop, channel, epoch, ticket, claim)
        claim = None
        if waiter is not None:
            if deadline is not None and loop.time() >= deadline:
                room.withdraw(waiter)
                raise processor._refusal(_stdlib_queue.Full(), *wait)
            timer = None if deadline is None else loop.call_at(deadline, _expire, waiter.future)
            try:
                await waiter.future
            except _NoRoomInTime:
                room.withdraw(waiter)
                raise processor._refusal(_stdlib_queue.Full(), *wait) from None
            except BaseException:
                room.withdraw(waiter)
                _count_given_up(processor)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
            if waiter.state != _CLAIMED:
                epoch = None
                continue  # woken without room (its loop had stopped): ask again
            claim = waiter
        epoch = room.epoch
        try:
            token = queue.push(request, priority, rows, nbytes, key, 0, length,
                               request.deadline)
        except QueueClosed as exc:
            if claim is not None:
                room.withdraw(claim)
            raise processor._refusal(exc, *wait) from None
        except _stdlib_queue.Full as exc:
            # Taken by a caller outside the line: wait again, in this caller's old place.
            if deadline is not None and loop.time() >= deadline:
                if claim is not None:
                    room.withdraw(claim)
                raise processor._refusal(exc, *wait) from None
            continue
        if claim is not None:
            room.settle(claim)
        return token

"""Awaiting room in a full queue from asyncio: ``BatchProcessor.apredict``.

``enqueue_predict_async`` can only refuse when the queue is full (blocking the event loop
is not an option). ``apredict`` waits instead, the way ``asyncio.Queue.put`` does, and
without a thread per waiting request: a coroutine that finds the queue full registers a
waiter in ``RoomWaiters`` and sleeps on an ``asyncio`` future of its own loop. Room is
given back by whoever frees it: a worker that popped a batch of ``n`` requests wakes the
``n`` oldest waiters, a cancelled request wakes one, ``stop()`` wakes them all. The wakes
travel to each loop through its ``LoopChannel`` (aio.py), so a batch's worth of waiters
costs a loop one wake-up, the same as a batch's results. A woken waiter pushes again; if
somebody else took the room first (a thread in ``enqueue_predict``, a new request on the
loop), it waits again in its old place, ahead of those who came after it.

No wake-up is lost: each release bumps ``epoch``, which a coroutine reads before its push;
``wait`` registers it only if no room was freed since then, under the same lock release
takes. A waiter that goes away (its task was cancelled, its ``timeout`` passed) after it
was handed room passes that room on to the next waiter. Room goes only to a waiter whose
loop is running: one on a closed loop could never take it (it leaves the line), and one
on a stopped loop is woken without being counted, so that it tries again if its loop
runs again. The line is kept in order of first arrival (a ticket each), so that waiters
woken together who lost their room go back in their old order.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue as _stdlib_queue
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ._native.request_queue import QueueClosed
from .aio import AsyncRequest, LoopChannel, QueuedFuture
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
    """Coroutines waiting for room in one processor's queue, woken oldest first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._line: deque[_Waiter] = deque()
        self._waiting = 0  # entries of _line still _WAITING
        self._closed = False
        self._tickets = itertools.count()
        self.epoch = 0

    def __len__(self) -> int:
        return self._waiting

    def ticket(self) -> int:
        """A new waiter's place in the line (kept when it waits again)."""
        return next(self._tickets)

    def wait(self, loop: asyncio.AbstractEventLoop, channel: LoopChannel, epoch: int,
             ticket: int) -> _Waiter | None:
        """On the loop: register a waiter with its ``ticket``, in ticket order, or None if
        room was freed since ``epoch``."""
        with self._lock:
            if self.epoch != epoch or self._closed:
                return None
            waiter = _Waiter(loop.create_future(), channel, ticket)
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
        return waiter

    def release(self, count: int) -> None:
        """From any thread: ``count`` requests left the queue; wake as many waiters."""
        with self._lock:
            self.epoch += 1
            if not self._waiting:
                return
            woken = []
            line = self._line
            while count > 0 and line:
                waiter = line.popleft()
                if waiter.state != _WAITING:
                    continue
                self._waiting -= 1
                if waiter.channel.serving():
                    waiter.state = _CLAIMED
                    count -= 1
                elif waiter.future.get_loop().is_closed():
                    waiter.state = _GONE  # its loop is closed: it will never take room
                    continue
                else:
                    waiter.state = _NUDGED  # a stopped loop: to try again if it runs
                woken.append(waiter)
        for waiter in woken:
            waiter.channel.post(waiter.future, True, None)

    def close(self) -> None:
        """The queue is closed: wake everyone (their push raises ``QueueClosed``)."""
        with self._lock:
            self._closed = True
        self.release(len(self._line))

    def withdraw(self, waiter: _Waiter) -> None:
        """On the loop: the waiter stops waiting (cancelled, timed out). Room it was
        already handed goes to the next waiter."""
        with self._lock:
            state, waiter.state = waiter.state, _GONE
            if state == _WAITING:
                self._waiting -= 1
                if len(self._line) > 64 and self._waiting < len(self._line) // 2:
                    # Many left without being woken (a paused processor, time-outs):
                    # drop them now rather than at the next release.
                    self._line = deque(w for w in self._line if w.state == _WAITING)
        if state == _CLAIMED:
            self.release(1)


class _NoRoomInTime(Exception):
    """A waiter's ``timeout`` passed."""


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(_NoRoomInTime())


def timeout_arg(timeout: Any) -> float | None:
    """A ``timeout`` argument (``apredict``'s wait for room, ``stop``'s): ``None`` or
    seconds >= 0, any number ``enqueue_predict`` takes (numpy scalars, ``Fraction``,
    ``Decimal``; an int too large for a float is for ever). ``TypeError`` for a
    non-number (a string, a bool, numpy's included), ``ValueError`` for NaN or a negative
    number."""
    if timeout is None:
        return None
    if isinstance(timeout, (str, bytes, bytearray)) or type(timeout).__name__ in ("bool", "bool_"):
        raise TypeError(f"timeout must be None or a number of seconds, got {timeout!r}")
    try:
        value = float(timeout)
    except OverflowError:
        value = math.inf if timeout > 0 else -math.inf
    except (TypeError, ValueError):
        raise TypeError(
            f"timeout must be None or a number of seconds, got {timeout!r}") from None
    if value != value or value < 0:
        raise ValueError(f"timeout must be None or >= 0, got {timeout!r}")
    return value


async def apredict(processor: BatchProcessor[T, U], item: T, timeout: float | None,
                   priority: BatchPriority | int, deadline_at: float | None) -> U:
    """See ``BatchProcessor.apredict``; ``deadline_at``: the request's ``max_queue_time``
    deadline (monotonic seconds), or ``None``."""
    timeout = timeout_arg(timeout)
    loop = asyncio.get_running_loop()
    future = QueuedFuture(loop=loop)
    request, rows, nbytes, key, length = processor._describe(
        item, AsyncRequest(future, _channel(processor, loop)), _monotonic(), priority,
        _INF if deadline_at is None else deadline_at)
    token = await push_when_room(processor, request, priority, rows, nbytes, key, length,
                                 deadline_at, timeout)
    # Cancelling the awaiting task cancels the future: still queued, the request leaves
    # the queue at once (its room goes to the next waiter); already dispatched, the worker
    # sees the cancelled future and its result is dropped.
    future._bp_token = token
    future._bp_owner = processor
    return cast("U", await future)


def _channel(processor: BatchProcessor[Any, Any], loop: asyncio.AbstractEventLoop,
             ) -> LoopChannel:
    channel = processor._last_channel
    if channel is None or channel.loop_ref() is not loop:
        channel = processor._channel_for(loop)
    return channel


async def push_when_room(processor: BatchProcessor[Any, Any], request: Any,
                         priority: BatchPriority | int, rows: int, nbytes: int, key: int,
                         length: int, deadline_at: float | None, timeout: float | None,
                         ) -> int:
    """On the loop: push a described request (its future an ``AsyncRequest`` of this
    loop), waiting for room in a full queue up to ``timeout`` seconds (``None``: as long
    as it takes); its token. ``QueueFullError`` when the time is up,
    ``ProcessorStoppedError`` once stopped."""
    loop = asyncio.get_running_loop()
    queue = processor._queue
    room: RoomWaiters | None = None
    epoch = 0
    ticket = -1  # its place in the line, once it first waits
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        try:
            return queue.push(request, priority, rows, nbytes, key, 0, length, deadline_at)
        except QueueClosed as exc:
            raise processor._refusal(exc, timeout) from None
        except _stdlib_queue.Full as exc:
            if deadline is not None and loop.time() >= deadline:
                raise processor._refusal(exc, timeout) from None
            if room is None:
                # First time full: make sure room is reported from now on, then try again
                # (room freed before that was reported to nobody).
                room = processor._room_waiters()
                epoch = room.epoch
                continue
        if ticket < 0:
            ticket = room.ticket()
        waiter = room.wait(loop, _channel(processor, loop), epoch, ticket)
        if waiter is not None:
            timer = None if deadline is None else loop.call_at(deadline, _expire, waiter.future)
            try:
                await waiter.future
            except _NoRoomInTime:
                room.withdraw(waiter)
                raise processor._refusal(_stdlib_queue.Full(), timeout) from None
            except BaseException:
                room.withdraw(waiter)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
        epoch = room.epoch

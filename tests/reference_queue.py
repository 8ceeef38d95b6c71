"""Pure-Python twin of ``batchproc._native.request_queue``, used only by the tests.

Same API and semantics as the native ``RequestQueue``, written for obviousness rather
than speed: a ``heapq`` of entries with lazy cancellation, one ``threading.Condition``,
and ``notify_all`` on every change. Differential tests run the same operations on both.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
import queue
import threading
import time
from typing import Any

_MAX_CAPACITY = 2**24
# How much faster than the rows carried across a call its wave must come (native: WAVE_PACE).
WAVE_PACE = 8.0
_MAX_PRIORITY = 2**31 - 1
_MAX_COUNT = 2**39 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class QueueClosed(RuntimeError):
    """Raised by ``RequestQueue.push`` once the queue is closed."""


def _int_arg(v: Any, name: str, lo: int, hi: int) -> int:
    try:
        x = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(v).__name__}") from None
    if not lo <= x <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v!r}")
    return x


def _int_clamped(v: Any, name: str) -> int:
    try:
        x = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(v).__name__}") from None
    return min(max(x, _INT64_MIN), _INT64_MAX)


def _float_arg(v: Any, name: str) -> float:
    if isinstance(v, (str, bytes, bytearray)) or not (
        hasattr(type(v), "__float__") or hasattr(type(v), "__index__")
    ):
        raise TypeError(f"{name} must be a number of seconds, not {type(v).__name__}")
    try:
        x = float(v)
    except OverflowError:
        x = math.inf if v > 0 else -math.inf
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN")
    return x


def _timeout_arg(v: Any) -> float:
    if v is None:
        return math.inf
    x = _float_arg(v, "timeout")
    if x < 0:
        raise ValueError(f"timeout must be None or >= 0, got {v!r}")
    return x


_AGED = -1  # the priority of an entry that waited past max_priority_wait
# The order entries were made, so their deadlines set: deadlines that tie expire in it.
_MADE = itertools.count()


class _Entry:
    __slots__ = ("aged", "cancelled", "deadline", "due", "item", "key", "length", "made",
                 "nbytes", "priority", "rows", "seq", "solo", "t_push")

    def __init__(self, priority: int, seq: int, rows: int, nbytes: int, key: int,
                 length: int, item: Any, deadline: float = math.inf) -> None:
        self.priority = priority
        self.seq = seq
        self.rows = rows
        self.nbytes = nbytes
        self.key = key
        self.length = length
        self.item = item
        self.t_push = time.monotonic()
        self.cancelled = False
        self.deadline = deadline
        self.made = next(_MADE)
        self.solo = False
        self.due = 0.0
        self.aged = False

    def __lt__(self, other: _Entry) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)


def _bytes_per_token(e: _Entry) -> int:
    """An entry's bytes per row and unit of length, rounded up (0 unless it has both)."""
    if e.rows <= 0 or e.length <= 0:
        return 0
    return -(-e.nbytes // (e.rows * e.length))


class RequestQueue:
    """Reference twin of the native RequestQueue (see its docstrings for the contract).

    Cancelled entries stay in the heap, flagged, and are dropped when a pop meets them;
    they stop counting in len(), rows and capacity at cancel time, as in the native one.
    """

    def __init__(self, capacity: int, priorities: bool = True,
                 max_priority_wait: float | None = None) -> None:
        self._capacity = _int_arg(capacity, "capacity", 1, _MAX_CAPACITY)
        self._priorities = bool(priorities)
        aging = -1.0
        if max_priority_wait is not None:
            aging = _float_arg(max_priority_wait, "max_priority_wait")
            if aging < 0:
                raise ValueError(
                    f"max_priority_wait must be None or >= 0, got {max_priority_wait!r}")
        self._aging = aging if self._priorities else -1.0
        self._parked: list[_Entry] = []     # not yet due, any order
        self._parked_until = math.inf       # once closed: no wait for entries due later
        self._expired: list[_Entry] = []    # expired, not yet taken
        self._heap: list[_Entry] = []
        self._live: dict[int, _Entry] = {}      # token (= seq) -> queued entry
        self._rows = 0
        self._seq = itertools.count()
        self._pushed = 0
        self._closed = False
        self._paused = False
        self._retargets = 0
        self._in_flight = 0
        self._idle_since = 0.0
        self._idle_rows = 0
        self._begun_at = self._answered_at = 0.0
        self._answered_rows = 0
        self._last_push = 0.0
        self._last_arrival = 0.0  # the latest push time given to an entry coming into line
        self._last_batch_rows = 0
        self._last_batch_len = 0
        self._cond = threading.Condition(threading.Lock())
        self._w_items = self._w_fill = self._w_room = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    @property
    def rows(self) -> int:
        with self._cond:
            return self._rows

    @property
    def room(self) -> int:
        with self._cond:
            return max(0, self._capacity - self._used())

    def __len__(self) -> int:
        with self._cond:
            return len(self._live) + len(self._parked)

    @property
    def parked(self) -> int:
        with self._cond:
            return len(self._parked)

    def _used(self) -> int:
        return len(self._live) + len(self._parked) + len(self._expired)

    def _tick(self) -> None:
        """Expire, queue what is due, age: what the native queue does on every look."""
        now = time.monotonic()
        gone = [e for e in list(self._live.values()) + self._parked if e.deadline <= now]
        for e in sorted(gone, key=lambda e: (e.deadline, e.made)):
            if e in self._parked:
                self._parked.remove(e)
            else:
                del self._live[e.seq]
                e.cancelled = True
                self._rows -= e.rows
            self._expired.append(e)
        self._arrive_due(now)
        if self._aging >= 0:
            changed = False
            for e in self._live.values():
                if not e.aged and e.t_push + self._aging < now:
                    e.aged, e.priority, changed = True, _AGED, True
            if changed:
                heapq.heapify(self._heap)

    def _arrive_due(self, now: float) -> None:
        """Queue the parked entries due by ``now`` (on every look, and before a push)."""
        for e in sorted((e for e in self._parked if e.due <= now), key=lambda e: e.due):
            self._parked.remove(e)
            e.seq = next(self._seq)
            # Pushed when it was due; in a FIFO queue no earlier than the entries ahead.
            if not self._live or e.due >= self._last_arrival:
                self._last_arrival = e.due
            e.t_push = e.due if self._priorities else self._last_arrival
            heapq.heappush(self._heap, e)
            self._live[e.seq] = e
            self._rows += e.rows

    def _next_due(self) -> float:
        return min((e.due for e in self._parked), default=math.inf)

    def _nothing_coming(self) -> bool:
        return self._closed and (not self._parked or self._next_due() > self._parked_until)

    def push(self, item: object, priority: int = 0, rows: int = 1, nbytes: int = 0,
             key: int = 0, timeout: float | None = None, length: int = 0,
             deadline: float | None = None) -> int:
        prio = _int_arg(priority, "priority", 0, _MAX_PRIORITY)
        rows = _int_arg(rows, "rows", 0, _MAX_COUNT)
        nbytes = _int_arg(nbytes, "nbytes", 0, _MAX_COUNT)
        key = _int_arg(key, "key", _INT64_MIN, _INT64_MAX)
        until = time.monotonic() + _timeout_arg(timeout)
        length = _int_arg(length, "length", 0, _MAX_COUNT)
        expires = math.inf if deadline is None else _float_arg(deadline, "deadline")
        with self._cond:
            while True:
                if self._closed:
                    raise QueueClosed("push on a closed RequestQueue")
                if self._used() < self._capacity:
                    break
                left = until - time.monotonic()
                if left <= 0:
                    raise queue.Full
                self._w_room += 1
                try:
                    self._cond.wait(None if math.isinf(left) else left)
                finally:
                    self._w_room -= 1
            return self._publish(item, prio, rows, nbytes, key, length, expires)

    def _publish(self, item: object, prio: int, rows: int, nbytes: int, key: int,
                 length: int, expires: float) -> int:
        """Queue a new entry (the lock held), the retries due first: the native queue's
        ``_publish_locked``."""
        self._arrive_due(time.monotonic())
        self._pushed += 1
        e = _Entry(prio if self._priorities else 0, next(self._seq), rows, nbytes, key,
                   length, item, expires)
        heapq.heappush(self._heap, e)
        self._live[e.seq] = e
        self._rows += rows
        self._last_push = self._last_arrival = e.t_push
        self._cond.notify_all()
        return e.seq

    def push_again(self, item: object, priority: int, rows: int, nbytes: int, key: int,
                   length: int = 0, deadline: float | None = None) -> int:
        prio = _int_arg(priority, "priority", 0, _MAX_PRIORITY)
        rows = _int_arg(rows, "rows", 0, _MAX_COUNT)
        nbytes = _int_arg(nbytes, "nbytes", 0, _MAX_COUNT)
        key = _int_arg(key, "key", _INT64_MIN, _INT64_MAX)
        length = _int_arg(length, "length", 0, _MAX_COUNT)
        expires = math.inf if deadline is None else _float_arg(deadline, "deadline")
        with self._cond:
            if self._used() >= _MAX_CAPACITY:
                raise queue.Full
            return self._publish(item, prio, rows, nbytes, key, length, expires)

    def park(self, item: object, priority: int, rows: int, nbytes: int, key: int,
             length: int, not_before: float, deadline: float | None = None) -> None:
        prio = _int_arg(priority, "priority", 0, _MAX_PRIORITY)
        rows = _int_arg(rows, "rows", 0, _MAX_COUNT)
        nbytes = _int_arg(nbytes, "nbytes", 0, _MAX_COUNT)
        key = _int_arg(key, "key", _INT64_MIN, _INT64_MAX)
        length = _int_arg(length, "length", 0, _MAX_COUNT)
        due = _float_arg(not_before, "not_before")
        expires = math.inf if deadline is None else _float_arg(deadline, "deadline")
        with self._cond:
            e = _Entry(prio if self._priorities else 0, -1, rows, nbytes, key, length, item,
                       expires)
            e.solo = True
            e.due = due
            self._parked.append(e)
            self._cond.notify_all()

    def take_expired(self, timeout: float | None = 0.0) -> list[Any]:
        deadline = time.monotonic() + _timeout_arg(timeout)
        with self._cond:
            while True:
                self._tick()
                if self._expired or self._closed:
                    break
                now = time.monotonic()
                if now >= deadline:
                    break
                soonest = min((e.deadline for e in list(self._live.values()) + self._parked),
                              default=math.inf)
                until = min(deadline, soonest)
                self._cond.wait(None if math.isinf(until) else max(0.0, until - now))
            out = [e.item for e in self._expired]
            self._expired.clear()
            self._cond.notify_all()
            return out

    def _head(self) -> _Entry | None:
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else None

    def _take(self, e: _Entry) -> Any:
        del self._live[e.seq]
        self._rows -= e.rows
        item, e.item = e.item, None
        return item

    def pop_batch(self, max_rows: int, max_bytes: int = 0, *, max_tokens: int = 0,
                  fill_rows: int = 0, max_wait: float = 0.0, idle_gap: float | None = None,
                  fill_time: float = 0.0, timeout: float | None = None,
                  retargets: int | None = None) -> list[Any]:
        max_rows = _int_clamped(max_rows, "max_rows")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows!r}")
        max_bytes = _int_clamped(max_bytes, "max_bytes")
        max_tokens = _int_clamped(max_tokens, "max_tokens")
        fill_rows = _int_clamped(fill_rows, "fill_rows")
        max_wait = _float_arg(max_wait, "max_wait")
        idle_gap = -1.0 if idle_gap is None else _float_arg(idle_gap, "idle_gap")
        fill_time = _float_arg(fill_time, "fill_time")
        deadline = time.monotonic() + _timeout_arg(timeout)
        fill = fill_rows > 0 and max_wait > 0
        if retargets is not None:
            retargets = _int_arg(retargets, "retargets", 0, 2**64 - 1)
        def stale() -> bool:
            return retargets is not None and retargets != self._retargets

        with self._cond:
            if stale():
                return []
            while True:
                # Step 1: any live entry (parked ones are coming, even after close).
                self._tick()
                while not self._live or (self._paused and not self._closed):
                    now = time.monotonic()
                    left = deadline - now
                    if self._nothing_coming() or left <= 0 or stale():
                        return []
                    if not self._paused or self._closed:
                        left = min(left, max(0.0, self._next_due() - now))
                    self._w_items += 1
                    try:
                        self._cond.wait(None if math.isinf(left) else left)
                    finally:
                        self._w_items -= 1
                    self._tick()
                # Step 2: fill wait (rows only, never tokens).
                while (fill and self._live and not self._closed and not self._paused
                       and self._rows < fill_rows and not self._head().solo):  # type: ignore[union-attr]
                    if stale():
                        return []
                    head = self._head()
                    assert head is not None
                    # The ceiling, always, from the oldest entry (not the head: with
                    # priorities an urgent arrival must not restart an older one's wait).
                    until = min(e.t_push for e in self._live.values()) + max_wait
                    if (idle_gap >= 0 and self._in_flight == 0 and fill_time > 0
                            and head.t_push < self._idle_since):
                        until = self._wave_deadline(idle_gap, max_wait, head.t_push)
                    elif (idle_gap >= 0 and self._in_flight == 0 and fill_time > 0
                          and 0 < self._last_batch_len <= len(self._live)
                          and self._last_batch_rows <= self._rows
                          and head.t_push <= self._idle_since + fill_time):
                        until = 0.0  # a wave as large as the last batch: back whole
                    elif idle_gap >= 0 and self._in_flight == 0:
                        # The pause ends the wait, unless the queue fills on pace.
                        gap_end = max(self._last_push, self._idle_since) + idle_gap
                        if (fill_time > 0 and 2 <= self._rows < self._last_batch_rows
                                and head.t_push <= self._idle_since + fill_time):
                            gap_end = max(gap_end, head.t_push + fill_time * self._rows
                                          / self._last_batch_rows)
                        until = min(until, gap_end)
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._w_fill += 1
                    try:
                        self._cond.wait(None if math.isinf(left) else left)
                    finally:
                        self._w_fill -= 1
                    self._tick()
                if self._live and not (self._paused and not self._closed):
                    break
            if stale():
                return []
            # Step 3: select.
            head = self._head()
            assert head is not None
            heapq.heappop(self._heap)
            out = [self._take(head)]
            total_rows, total_bytes, longest = head.rows, head.nbytes, head.length
            per_token = _bytes_per_token(head)
            skipped: list[_Entry] = []
            while self._heap and not head.solo:
                e = self._heap[0]
                if e.cancelled:
                    heapq.heappop(self._heap)
                elif e.key != head.key or e.solo:
                    skipped.append(heapq.heappop(self._heap))
                elif total_rows + e.rows > max_rows or (
                    max_bytes > 0 and total_bytes + e.nbytes > max_bytes
                ) or (
                    # A padded batch costs its rows times its longest length.
                    max_tokens > 0
                    and (total_rows + e.rows) * max(longest, e.length) > max_tokens
                ) or (
                    # ... and, padded, its rows times its longest length times the most
                    # bytes per row and unit of length among its entries.
                    max_bytes > 0
                    and (total_rows + e.rows) * max(longest, e.length)
                    * max(per_token, _bytes_per_token(e)) > max_bytes
                ):
                    break
                else:
                    heapq.heappop(self._heap)
                    out.append(self._take(e))
                    total_rows += e.rows
                    total_bytes += e.nbytes
                    longest = max(longest, e.length)
                    per_token = max(per_token, _bytes_per_token(e))
            for e in skipped:
                heapq.heappush(self._heap, e)
            if not head.solo:
                self._last_batch_rows = total_rows
                self._last_batch_len = len(out)
            self._cond.notify_all()
            return out

    def cancel(self, token: int) -> bool:
        try:
            token = operator.index(token)
        except TypeError:
            raise TypeError(f"token must be an int, not {type(token).__name__}") from None
        with self._cond:
            e = self._live.pop(token, None)
            if e is None:
                return False
            e.cancelled = True
            self._rows -= e.rows
            item, e.item = e.item, None
            self._cond.notify_all()
        del item        # dropped outside the lock, as the native queue does
        return True

    def drain(self) -> list[Any]:
        with self._cond:
            out = [self._take(e) for e in sorted(self._live.values())]
            self._heap.clear()
            for e in sorted(self._parked, key=lambda e: e.due):
                out.append(e.item)
            self._parked.clear()
            self._cond.notify_all()
            return out

    @property
    def exhausted(self) -> bool:
        with self._cond:
            self._tick()
            return not self._live and self._nothing_coming()

    def close(self, parked_until: float | None = None) -> None:
        until = math.inf if parked_until is None else _float_arg(parked_until, "parked_until")
        with self._cond:
            self._closed = True
            self._parked_until = min(self._parked_until, until)
            self._cond.notify_all()

    def _wave_deadline(self, idle_gap: float, max_wait: float, head_pushed: float) -> float:
        # A head carried across the last batch goes at once, unless that batch's
        # clients come back faster than WAVE_PACE times the carried rows came.
        wave = self._rows - self._idle_rows
        if wave >= self._last_batch_rows:
            return 0.0
        wave = max(wave, 0)
        until = max(self._last_push, self._idle_since) + idle_gap
        busy = self._idle_since - head_pushed
        if self._idle_rows > 0 and busy > 0:
            until = min(until, self._idle_since
                        + (wave + 1) * busy / (WAVE_PACE * self._idle_rows))
        return min(until, self._idle_since + max_wait)

    def begin_batch(self) -> None:
        with self._cond:
            self._in_flight += 1
            self._begun_at = time.monotonic()

    def answer_batch(self) -> None:
        with self._cond:
            self._answered_at = time.monotonic()
            self._answered_rows = self._rows

    def end_batch(self) -> None:
        with self._cond:
            if self._in_flight > 0:
                self._in_flight -= 1
                if self._in_flight == 0:
                    if self._answered_at >= self._begun_at:
                        self._idle_since = self._answered_at
                        self._idle_rows = self._answered_rows
                    else:
                        self._idle_since = time.monotonic()
                        self._idle_rows = self._rows
                    self._cond.notify_all()

    @property
    def pushed(self) -> int:
        return self._pushed

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def pause(self) -> None:
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def retargets(self) -> int:
        return self._retargets

    def retarget(self) -> None:
        with self._cond:
            self._retargets += 1
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def oldest_age(self) -> float:
        with self._cond:
            if not self._live:
                return 0.0
            oldest = min(e.t_push for e in self._live.values())
        return max(0.0, time.monotonic() - oldest)

    def newest_age(self) -> float:
        with self._cond:
            if not self._live:
                return 0.0
            newest = self._last_arrival
        return max(0.0, time.monotonic() - newest)

    def _waiters(self) -> tuple[int, int, int]:
        with self._cond:
            return (self._w_items, self._w_fill, self._w_room)

    def __repr__(self) -> str:
        return (f"<reference RequestQueue capacity={self._capacity} len={len(self)} "
                f"priorities={self._priorities} closed={self.closed}>")

"""RequestQueue: the native heap and its pure-Python twin, held to the same contract.

Every semantic test runs on both implementations through the ``impl`` fixture (the
module: ``impl.RequestQueue``, ``impl.QueueClosed``); a Hypothesis state machine runs
random operation sequences on both side by side; a few tests are native-only.
Orderings between threads are made to happen with the queues' ``_waiters()`` hook,
events and barriers, never by sleeping. Time bounds are hang guards, not speed claims.
"""

from __future__ import annotations

import functools
import gc
import importlib.machinery
import math
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import reference_queue
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from batchproc._native import request_queue as native_queue

IMPLS = {"native": native_queue, "reference": reference_queue}
HANG = 10.0  # seconds: only a guard against a hung thread, never a speed assertion
# A pop's own timeout (and a spin) in a test is ten times (a hundred times) that: one that
# ran out on a loaded machine would return [] (stop spinning), a wrong result instead of a
# thread found still blocked when joined.
ITEMS, FILL, ROOM = 0, 1, 2  # indices into _waiters()


@pytest.fixture(params=sorted(IMPLS))
def impl(request: pytest.FixtureRequest) -> Any:
    return IMPLS[request.param]


class Worker(threading.Thread):
    """Runs fn in a thread and hands back its result or exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self._call = (fn, args, kwargs)
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        fn, args, kwargs = self._call
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as exc:
            self.error = exc

    def outcome(self) -> Any:
        self.join(HANG)
        assert not self.is_alive(), "thread still blocked"
        if self.error is not None:
            raise self.error
        return self.result


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll a condition (not a sleep-and-hope: the test proceeds when it holds)."""
    deadline = time.monotonic() + HANG
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.0005)


def blocked(q: Any, which: int, count: int = 1) -> None:
    wait_until(lambda: q._waiters()[which] >= count, f"waiter {which} x{count}")


# ------------------------------------------------------------------ the compiled module


def test_native_module_is_compiled() -> None:
    path = native_queue.__file__
    assert path is not None
    assert path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), path
    assert native_queue.RequestQueue.__module__ == "batchproc._native.request_queue"


# ------------------------------------------------------------------ ordering


def test_priority_then_arrival(impl: Any) -> None:
    q = impl.RequestQueue(16)
    prios = [2, 0, 1, 0, 2, 1, 0]
    for i, p in enumerate(prios):
        q.push(i, priority=p)
    expected = sorted(range(len(prios)), key=lambda i: (prios[i], i))
    assert q.pop_batch(100) == expected
    assert q.pop_batch(100, timeout=0) == []


def test_fifo_when_priorities_off(impl: Any) -> None:
    q = impl.RequestQueue(16, priorities=False)
    for i, p in enumerate([3, 0, 2, 1]):
        q.push(i, priority=p)
    assert q.pop_batch(100) == [0, 1, 2, 3]


def test_key_grouping_leaves_others_in_place(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("a", priority=1, key=1)
    q.push("b", priority=1, key=2)
    q.push("c", priority=1, key=1)
    q.push("d", priority=0, key=2)      # most urgent: the head
    q.push("e", priority=2, key=2)
    assert q.pop_batch(100) == ["d", "b", "e"]
    q.push("f", priority=0, key=1)
    # a and c kept their places: f (more urgent) first, then a, c by arrival.
    assert q.pop_batch(100) == ["f", "a", "c"]
    assert len(q) == 0


def test_row_cap_stops_at_first_misfit(impl: Any) -> None:
    q = impl.RequestQueue(16)
    for name, rows in [("a", 2), ("b", 3), ("c", 1)]:
        q.push(name, rows=rows)
    # b does not fit after a; c would, but may not overtake b.
    assert q.pop_batch(4) == ["a"]
    assert q.rows == 4
    assert q.pop_batch(4) == ["b", "c"]
    assert q.rows == 0


def test_incompatible_entries_do_not_end_the_batch(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("a", rows=2, key=0)
    q.push("big-other", rows=100, key=1)
    q.push("b", rows=2, key=0)
    assert q.pop_batch(4) == ["a", "b"]
    assert q.pop_batch(4) == ["big-other"]


def test_head_always_taken(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("huge", rows=10, nbytes=1000)
    q.push("zero", rows=0, nbytes=0)
    q.push("small", rows=1, nbytes=1)
    # The head exceeds both caps and goes alone: nothing fits after it, not even 0 rows.
    assert q.pop_batch(4, max_bytes=100) == ["huge"]
    assert q.pop_batch(4, max_bytes=100) == ["zero", "small"]


def test_byte_cap(impl: Any) -> None:
    q = impl.RequestQueue(16)
    for i in range(4):
        q.push(i, rows=1, nbytes=100)
    assert q.pop_batch(100, max_bytes=250) == [0, 1]
    assert q.pop_batch(100, max_bytes=0) == [2, 3]      # <= 0: no byte cap


def test_zero_row_entries_fill_a_full_batch(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("a", rows=4)
    q.push("b", rows=0)
    q.push("c", rows=1)
    assert q.pop_batch(4) == ["a", "b"]


# ------------------------------------------------------------------ token cap
# A padded batch costs (its rows) x (its longest length); max_tokens caps that cost.


def test_token_cap_exactly_equal_fits(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("a", rows=2, length=4)
    q.push("b", rows=1, length=6)       # 3 rows padded to 6: 18 tokens
    q.push("c", rows=1, length=1)       # 4 x 6 = 24
    assert q.pop_batch(100, max_tokens=18) == ["a", "b"]
    assert q.pop_batch(100, max_tokens=18) == ["c"]


def test_token_cap_one_over_ends_the_batch(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("a", rows=2, length=4)
    q.push("b", rows=1, length=6)       # 18 tokens: one over 17
    q.push("c", rows=1, length=4)       # would fit after a (12), may not overtake b
    assert q.pop_batch(100, max_tokens=17) == ["a"]
    assert q.rows == 2
    assert q.pop_batch(100, max_tokens=17) == ["b", "c"]     # 2 x 6 = 12


def test_token_cap_head_over_it_goes_alone(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("long", rows=2, length=100)
    q.push("short", rows=1, length=1)
    q.push("empty", rows=0, length=0)
    # 200 tokens alone, over the cap: taken anyway, and nothing joins it.
    assert q.pop_batch(100, max_tokens=50) == ["long"]
    assert q.pop_batch(100, max_tokens=50) == ["short", "empty"]


def test_a_long_entry_later_in_line_ends_the_batch(impl: Any) -> None:
    q = impl.RequestQueue(16)
    for name, length in [("a", 8), ("b", 8), ("long", 64), ("c", 8)]:
        q.push(name, length=length)
    # long would pad the batch to 3 x 64: it ends the batch rather than being skipped,
    # and c, which would fit, does not overtake it.
    assert q.pop_batch(100, max_tokens=100) == ["a", "b"]
    assert q.pop_batch(100, max_tokens=100) == ["long"]      # 2 x 64 > 100
    assert q.pop_batch(100, max_tokens=100) == ["c"]


def test_token_cap_ignores_entries_of_other_keys(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("a", rows=1, length=4, key=0)
    q.push("other", rows=10, length=1000, key=1)
    q.push("b", rows=1, length=4, key=0)     # 2 x 4 = 8: the skipped entry counts nothing
    q.push("c", rows=1, length=4, key=0)     # 12 > 8
    assert q.pop_batch(100, max_tokens=8) == ["a", "b"]
    assert q.pop_batch(100, max_tokens=8) == ["other"]       # the head now: goes alone
    assert q.pop_batch(100, max_tokens=8) == ["c"]


def test_token_cap_with_length_zero_entries(impl: Any) -> None:
    q = impl.RequestQueue(16)
    for i in range(5):
        q.push(i, rows=3)                       # not sequences: cost nothing
    assert q.pop_batch(100, max_tokens=1) == [0, 1, 2, 3, 4]
    q.push("seq", rows=1, length=10)
    q.push("flat", rows=1, length=0)        # its row is padded too: 2 x 10 = 20
    assert q.pop_batch(100, max_tokens=15) == ["seq"]
    assert q.pop_batch(100, max_tokens=15) == ["flat"]
    q.push("flat", rows=2, length=0)
    q.push("seq", rows=0, length=10)        # no rows of its own, but pads flat's: 20
    assert q.pop_batch(100, max_tokens=15) == ["flat"]
    assert q.pop_batch(100, max_tokens=15) == ["seq"]


def test_token_cap_off_and_beside_the_other_caps(impl: Any) -> None:
    q = impl.RequestQueue(16)
    for i in range(12):
        q.push(i, rows=1, nbytes=10, length=50)
    assert q.pop_batch(4, max_tokens=0) == [0, 1, 2, 3]       # <= 0: no cap
    assert q.pop_batch(4, max_tokens=-5) == [4, 5, 6, 7]
    # Whichever cap binds first ends the batch.
    assert q.pop_batch(3, max_bytes=1000, max_tokens=1000) == [8, 9, 10]   # rows
    q.push(12, rows=1, nbytes=10, length=50)
    assert q.pop_batch(9, max_bytes=15, max_tokens=1000) == [11]            # bytes
    for i in range(13, 16):
        q.push(i, rows=1, nbytes=10, length=50)
    assert q.pop_batch(9, max_bytes=1000, max_tokens=100) == [12, 13]      # tokens


def test_token_cap_arithmetic_does_not_overflow(impl: Any) -> None:
    big = 2**39 - 1
    q = impl.RequestQueue(16)
    for name in "abc":
        q.push(name, rows=2**23, length=big)
    exact = 2**24 * big                     # a + b, just below 2**63
    assert q.pop_batch(2**80, max_tokens=exact) == ["a", "b"]
    q.push("d", rows=2**23, length=big)
    assert q.pop_batch(2**80, max_tokens=exact - 1) == ["c"]
    q.push("e", rows=big, length=big)       # its product with a total is far past 2**63
    q.push("f", rows=big, length=big)
    assert q.pop_batch(2**80, max_tokens=2**63 - 1) == ["d"]
    assert q.pop_batch(2**80, max_tokens=2**80) == ["e"]     # clamped to 2**63 - 1
    assert q.pop_batch(2**80, max_tokens=0) == ["f"]


def test_byte_cap_holds_for_the_padded_batch(impl: Any) -> None:
    # A padded batch's bytes: rows x longest length x bytes per row and unit of length.
    q = impl.RequestQueue(16)
    q.push("long", rows=1, nbytes=400, length=100)      # 4 bytes per token
    q.push("short", rows=1, nbytes=4, length=1)         # padded to 100: 400 bytes
    q.push("short2", rows=1, nbytes=4, length=1)
    # Unpadded the three are 408 bytes; padded, two rows already take 800.
    assert q.pop_batch(100, max_bytes=799) == ["long"]
    assert q.pop_batch(100, max_bytes=799) == ["short", "short2"]     # 2 x 1 x 4
    q.push("a", rows=2, nbytes=48, length=3)            # 8 bytes per token
    q.push("b", rows=1, nbytes=10, length=5)            # 2 per token, but the batch's
    q.push("c", rows=1, nbytes=8, length=1)             # most is a's 8: 3 x 5 x 8 = 120
    assert q.pop_batch(100, max_bytes=120) == ["a", "b"]
    assert q.pop_batch(100, max_bytes=120) == ["c"]
    q.push("a", rows=2, nbytes=48, length=3)
    q.push("b", rows=1, nbytes=10, length=5)
    assert q.pop_batch(100, max_bytes=119) == ["a"]
    assert q.pop_batch(100, max_bytes=119) == ["b"]
    big = 2**39 - 1                                      # rows x length past any nbytes
    q.push("x", rows=big, nbytes=big, length=big)
    q.push("y", rows=1, nbytes=1, length=1)
    assert q.pop_batch(2**80, max_bytes=2**62) == ["x"]
    assert q.pop_batch(2**80, max_bytes=2**62) == ["y"]


def test_length_is_push_last_positional_parameter(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("a", 0, 2, 0, 0, None, 5)        # item, priority, rows, nbytes, key, timeout, length
    q.push("b", 0, 1, 0, 0, 0, 5)
    assert q.pop_batch(100, max_tokens=14) == ["a"]
    assert q.pop_batch(100, max_tokens=14) == ["b"]
    with pytest.raises(TypeError, match="positional"):
        q.pop_batch(100, 0, 14)             # max_tokens is keyword-only


def test_fill_wait_counts_rows_not_tokens(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("a", rows=2, length=1000)        # far over the token cap, but 2 rows
    assert q.pop_batch(100, max_tokens=10, fill_rows=2, max_wait=10 * HANG) == ["a"]
    t_before = time.monotonic()
    q.push("b", rows=1, length=1000)
    # The token cap cannot grow this batch, yet it still waits for fill_rows rows.
    assert q.pop_batch(100, max_tokens=10, fill_rows=2, max_wait=0.2, timeout=0) == ["b"]
    assert time.monotonic() >= t_before + 0.2 - 1e-4


def test_drain_takes_all_keys_in_order(impl: Any) -> None:
    q = impl.RequestQueue(16)
    for i, (p, k) in enumerate([(1, 0), (0, 1), (1, 2), (0, 0)]):
        q.push(i, priority=p, key=k, rows=50)
    assert q.drain() == [1, 3, 0, 2]
    assert (len(q), q.rows, q.drain()) == (0, 0, [])


def test_len_rows_and_oldest_age(impl: Any) -> None:
    q = impl.RequestQueue(16)
    assert (len(q), q.rows, q.oldest_age()) == (0, 0, 0.0)
    t0 = time.monotonic()
    q.push("old", priority=5, rows=3)
    t1 = time.monotonic()
    while time.monotonic() < t1 + 0.02:   # a known minimum age, without sleeping
        pass
    t2 = time.monotonic()
    q.push("new", priority=0, rows=4)
    t3 = time.monotonic()
    age = q.oldest_age()
    # The oldest by push time is the low-priority entry, not the head.
    assert 0.02 <= age <= time.monotonic() - t0
    newest = q.newest_age()
    assert newest <= time.monotonic() - t2 and newest <= q.oldest_age() - 0.02
    assert (len(q), q.rows) == (2, 7)
    while time.monotonic() < t3 + 0.02:
        pass
    assert q.newest_age() >= 0.02  # since the latest push, whichever entry is left
    assert q.pop_batch(1) == ["new"]
    assert q.oldest_age() >= 0.02 and q.newest_age() >= 0.02
    assert q.pop_batch(10) == ["old"]
    assert q.oldest_age() == 0.0 and q.newest_age() == 0.0


# ------------------------------------------------------------------ capacity and timeouts


def test_push_full_without_wait_raises_queue_full(impl: Any) -> None:
    q = impl.RequestQueue(2)
    q.push(1)
    q.push(2)
    with pytest.raises(queue.Full):
        q.push(3, timeout=0)
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        q.push(3, timeout=0.05)
    assert time.monotonic() - t0 >= 0.05 - 1e-4
    assert len(q) == 2
    assert q.pop_batch(1) == [1]
    q.push(3, timeout=0)     # popping freed room
    assert q.drain() == [2, 3]


def test_room_is_what_push_takes_now(impl: Any) -> None:
    q = impl.RequestQueue(3)
    assert q.room == 3
    token = q.push("a")
    q.push("b")
    assert q.room == 1
    assert q.cancel(token)
    assert q.room == 2
    q.push("c", deadline=time.monotonic() - 1)
    assert q.pop_batch(10, timeout=0) == ["b"]
    assert q.room == 2                                 # "c" expired: held until taken
    assert q.take_expired() == ["c"]
    assert q.room == 3
    for item in "def":
        q.push(item)
    assert q.room == 0
    q.park("retry", 0, 1, 0, 0, 0, 1e12)               # past capacity
    assert (q.room, len(q)) == (0, 4)
    assert q.pop_batch(1, timeout=0) == ["d"]
    assert q.room == 0                                 # the retry still fills it
    assert q.pop_batch(1, timeout=0) == ["e"]
    assert q.room == 1


def test_pop_timeout_returns_empty(impl: Any) -> None:
    q = impl.RequestQueue(2)
    assert q.pop_batch(1, timeout=0) == []
    t0 = time.monotonic()
    assert q.pop_batch(1, timeout=0.05) == []
    assert time.monotonic() - t0 >= 0.05 - 1e-4


def test_pop_wakes_a_blocked_pusher(impl: Any) -> None:
    q = impl.RequestQueue(2)
    q.push("a")
    q.push("b")
    pusher = Worker(q.push, "c", timeout=10 * HANG)
    blocked(q, ROOM)
    assert q.pop_batch(1) == ["a"]
    assert isinstance(pusher.outcome(), int)
    assert q.drain() == ["b", "c"]


def test_a_blocked_pop_wakes_on_push(impl: Any) -> None:
    q = impl.RequestQueue(2)
    popper = Worker(q.pop_batch, 4, timeout=10 * HANG)
    blocked(q, ITEMS)
    q.push("x")
    assert popper.outcome() == ["x"]


class HoldingTheGil:
    """Keeps the GIL in this thread (a long switch interval) until the block ends, as an
    event loop does while it resumes its tasks and each pushes its next request. Inside,
    only calls that never let go of the GIL (``push``, ``pause`` or ``_try_len`` on a
    free lock)."""

    def __enter__(self) -> HoldingTheGil:
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(HANG)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setswitchinterval(self._interval)

    @staticmethod
    def until_taken(q: Any) -> None:
        """Run on, GIL held, until the woken pop has taken the queued entries (it now
        waits for the GIL). The twin's pop takes nothing before it has the GIL: no wait."""
        if not hasattr(q, "_try_len"):
            return
        deadline = time.monotonic() + HANG
        while q._try_len() != 0:
            assert time.monotonic() < deadline, "the woken pop never took its head"


def test_a_worker_s_calls_on_every_batch_keep_the_gil_on_a_free_lock() -> None:
    # begin_batch, answer_batch and end_batch run on every batch. Letting go of the GIL
    # for a lock that was free handed it to a thread waiting for it (a thread
    # submitting), and the worker then waited for it back: a thread switch a call in a
    # burst. A thread waiting for the GIL here runs only if one of them lets go of it.
    q = native_queue.RequestQueue(8)
    ran = [0]
    stop = threading.Event()

    def run_when_let_in() -> None:
        while not stop.is_set():
            ran[0] += 1
            time.sleep(0)  # lets go of the GIL at once, to wait for it again

    waiting = threading.Thread(target=run_when_let_in)
    with HoldingTheGil():
        waiting.start()
        while ran[0] == 0:  # it has run; it waits for the GIL (long switch interval)
            time.sleep(0.001)
        before = ran[0]
        for _ in range(10_000):
            q.begin_batch()
            q.answer_batch()
            q.end_batch()
        after = ran[0]
        stop.set()
    waiting.join(HANG)
    assert after == before


def popped_beside_a_held_gil(q: Any, max_rows: int, first: Callable[[], object],
                             then: Callable[[], object]) -> list[Any]:
    """The batch of a pop that waits for an entry while this thread, holding the GIL,
    pushes ``first()`` (which wakes the pop), lets the pop take it, then pushes
    ``then()``."""
    popper = Worker(q.pop_batch, max_rows, timeout=10 * HANG)
    blocked(q, ITEMS)
    with HoldingTheGil() as gil:
        first()
        gil.until_taken(q)
        then()
    result: list[Any] = popper.outcome()
    return result


def test_a_pop_seals_its_batch_once_it_holds_the_gil(impl: Any) -> None:
    # A pop woken by the first push cannot run its batch before it has the GIL, which
    # the pusher holds while it pushes more: those join the batch, not the next one.
    q = impl.RequestQueue(8)
    batch = popped_beside_a_held_gil(q, 8, lambda: q.push("a"),
                                     lambda: [q.push(x) for x in "bcd"])
    assert batch == ["a", "b", "c", "d"]
    assert len(q) == 0


def test_what_joins_a_batch_while_its_pop_waits_for_the_gil_follows_the_batch_rules(
        impl: Any) -> None:
    # Other keys stay queued in their place; the first compatible entry that does not
    # fit ends the batch (no overtaking), as in a pop that took everything at once.
    q = impl.RequestQueue(8)

    def then() -> None:
        q.push("x", 0, 1, 0, 2)
        q.push("b", 0, 1, 0, 1)
        q.push("c", 0, 3, 0, 1)
        q.push("d", 0, 1, 0, 1)

    assert popped_beside_a_held_gil(q, 4, lambda: q.push("a", 0, 1, 0, 1), then) == [
        "a", "b"]
    assert q.pop_batch(8, timeout=0) == ["x"]
    assert q.pop_batch(8, timeout=0) == ["c", "d"]


def test_a_more_urgent_push_while_a_pop_waits_for_the_gil_heads_the_next_batch() -> None:
    # Native only (the twin takes its head holding the GIL): a batch stays in
    # (priority, arrival) order, so the walk ends at the first more urgent entry.
    q = native_queue.RequestQueue(8)
    later = [("b", 1), ("u", 0), ("c", 1)]
    batch = popped_beside_a_held_gil(q, 8, lambda: q.push("a", 1),
                                     lambda: [q.push(x, p) for x, p in later])
    assert batch == ["a"]
    assert q.pop_batch(8, timeout=0) == ["u", "b", "c"]


def test_a_pop_paused_while_it_waits_for_the_gil_takes_no_more() -> None:
    # Native only: the twin, holding the GIL throughout, has not taken its head yet.
    # (pause() on a free lock keeps the GIL, as a push does.)
    q = native_queue.RequestQueue(8)
    assert popped_beside_a_held_gil(
        q, 8, lambda: q.push("a"), lambda: (q.pause(), q.push("b"))) == ["a"]
    q.resume()
    assert q.pop_batch(8, timeout=0) == ["b"]


def test_a_pop_that_waited_for_the_gil_takes_no_more_than_max_rows(impl: Any) -> None:
    q = impl.RequestQueue(8)
    batch = popped_beside_a_held_gil(q, 3, lambda: q.push("a"),
                                     lambda: [q.push(x) for x in "bcd"])
    assert batch == ["a", "b", "c"]
    assert q.pop_batch(8, timeout=0) == ["d"]


def test_a_push_wakes_the_pop_that_blocked_last() -> None:
    # LIFO: at low load the worker that just finished (so parked last) takes the next
    # request while the others sleep on. Native only: wake order is not the twin's job.
    q = native_queue.RequestQueue(4)
    first = Worker(q.pop_batch, 1, timeout=10 * HANG)
    blocked(q, ITEMS, 1)
    last = Worker(q.pop_batch, 1, timeout=10 * HANG)
    blocked(q, ITEMS, 2)
    q.push("x")
    assert last.outcome() == ["x"]
    assert first.is_alive()
    q.push("y")
    assert first.outcome() == ["y"]


def test_a_timed_out_pop_leaves_the_waiter_stack_intact() -> None:
    # The middle waiter times out and must unlink itself; the other two are still woken,
    # one per push, newest first, and close() wakes everyone left.
    q = native_queue.RequestQueue(4)
    bottom = Worker(q.pop_batch, 1, timeout=10 * HANG)
    blocked(q, ITEMS, 1)
    middle = Worker(q.pop_batch, 1, timeout=1.0)  # time for `top` to park above it
    blocked(q, ITEMS, 2)
    top = Worker(q.pop_batch, 1, timeout=10 * HANG)
    blocked(q, ITEMS, 3)
    assert middle.outcome() == []
    q.push("a")
    assert top.outcome() == ["a"]
    spare = [Worker(q.pop_batch, 1) for _ in range(3)]  # timeout=None
    blocked(q, ITEMS, 4)
    q.close()
    assert bottom.outcome() == []
    assert [w.outcome() for w in spare] == [[], [], []]


# ------------------------------------------------------------------ fill wait


def test_fill_wait_returns_once_fill_rows_is_reached(impl: Any) -> None:
    q = impl.RequestQueue(16)
    go = threading.Event()

    def producer() -> None:
        assert go.wait(HANG)
        blocked(q, FILL)            # the consumer is filling its batch
        q.push("b", rows=2)         # 3 rows: not yet
        q.push("c", rows=2)         # 5 rows: reached

    q.push("a", rows=1)
    prod = Worker(producer)
    go.set()
    t0 = time.monotonic()
    batch = q.pop_batch(10, fill_rows=4, max_wait=6 * HANG)
    assert batch == ["a", "b", "c"]
    assert time.monotonic() - t0 < 3 * HANG      # hang guard: did not sit out max_wait
    prod.outcome()


def test_fill_wait_ends_after_max_wait(impl: Any) -> None:
    q = impl.RequestQueue(16)
    t_before = time.monotonic()
    q.push("a", rows=1)
    assert q.pop_batch(10, fill_rows=5, max_wait=0.2, timeout=0) == ["a"]
    # Waited until the head was max_wait old (same clock as time.monotonic()).
    assert time.monotonic() >= t_before + 0.2 - 1e-4


def test_fill_wait_ends_early_on_idle_gap(impl: Any) -> None:
    q = impl.RequestQueue(16)
    t_before = time.monotonic()
    q.push("a", rows=1)
    batch = q.pop_batch(10, fill_rows=5, max_wait=6 * HANG, idle_gap=0.2)
    assert batch == ["a"]
    t = time.monotonic()
    assert t >= t_before + 0.2 - 1e-4
    assert t - t_before < 3 * HANG               # hang guard: ended on the gap


def answering(q: Any, rows: int, *, answered: bool) -> None:
    """A batch of ``rows`` rows popped and running; with ``answered`` its results are
    being handed out (``answer_batch``), without it the call just returned."""
    for i in range(rows):
        q.push(f"earlier-{i}")
    assert len(q.pop_batch(rows)) == rows
    q.begin_batch()
    if answered:
        q.answer_batch()


def answered(q: Any, rows: int) -> None:
    """One batch of ``rows`` rows popped, run and ended now: the wave that comes back
    after it has that many."""
    answering(q, rows, answered=False)
    q.end_batch()


def test_a_pause_does_not_end_a_fill_on_pace(impl: Any) -> None:
    # The last batch held 4 rows; 3 came back at once: at that rate all 4 are in within
    # fill_time, so a pause longer than idle_gap (clients coming back after a delivery,
    # one by one) does not cut the batch before 3/4 of fill_time; the fourth completes it.
    q = impl.RequestQueue(16)
    answered(q, 4)
    for name in "abc":
        q.push(name)
    popper = Worker(q.pop_batch, 10, fill_rows=10, max_wait=6 * HANG, idle_gap=0.001,
                    fill_time=HANG, timeout=10 * HANG)
    blocked(q, FILL)
    paused_from = time.monotonic()
    wait_until(lambda: time.monotonic() - paused_from > 0.05, "a pause of 50 idle gaps")
    assert popper.is_alive()  # still filling: on pace until 7.5 s after the first push
    pushed = time.monotonic()
    q.push("d")  # 4 of fill_rows=10: the wave is in and goes at once ...
    assert popper.outcome() == ["a", "b", "c", "d"]
    # ... which the push must wake the waiting pop for: not the pace's 7.5 s (a bound
    # far below the pace).
    assert time.monotonic() - pushed < HANG / 4


@pytest.mark.parametrize("last_rows", [1, 2, 3])
def test_a_wave_as_large_as_the_last_batch_goes_at_once(impl: Any, last_rows: int) -> None:
    # As many rows came back after a batch as it held (fewer clients than fill_rows),
    # within fill_time of its end: nothing more is coming, so the wait ends at once, not
    # on the pause (idle_gap) nor the pace or the ceiling.
    q = impl.RequestQueue(16)
    answered(q, last_rows)
    names = [f"back-{i}" for i in range(last_rows)]
    t_before = time.monotonic()
    for name in names:
        q.push(name)
    assert q.pop_batch(10, fill_rows=10, max_wait=60 * HANG, idle_gap=6 * HANG,
                       fill_time=60 * HANG, timeout=10 * HANG) == names
    assert time.monotonic() - t_before < HANG


def _answered_sizes(q: Any, sizes: list[int]) -> None:
    """One batch of requests of ``sizes`` rows popped, run and ended now."""
    for i, rows in enumerate(sizes):
        q.push(f"earlier-{i}", rows=rows)
    assert len(q.pop_batch(sum(sizes))) == len(sizes)
    q.begin_batch()
    q.end_batch()


def test_a_wave_goes_at_once_only_with_all_its_requests_back(impl: Any) -> None:
    # The last batch held 2 requests of 1 and 5 rows. One client back with 6 rows holds
    # as many rows but not as many requests: the other client's is still coming, so
    # the pause (idle_gap), not the rows, ends the wait.
    q = impl.RequestQueue(16)
    _answered_sizes(q, [1, 5])
    t_before = time.monotonic()
    q.push("a", rows=6)
    assert q.pop_batch(20, fill_rows=20, max_wait=60 * HANG, idle_gap=0.3,
                       fill_time=60 * HANG, timeout=10 * HANG) == ["a"]
    waited = time.monotonic() - t_before
    assert waited >= 0.3 - 1e-3
    assert waited < 3 * HANG
    # Both back, in other sizes: at once.
    _answered_sizes(q, [1, 5])
    t_before = time.monotonic()
    q.push("b", rows=5)
    q.push("c", rows=1)
    assert q.pop_batch(20, fill_rows=20, max_wait=60 * HANG, idle_gap=6 * HANG,
                       fill_time=60 * HANG, timeout=10 * HANG) == ["b", "c"]
    assert time.monotonic() - t_before < HANG


def test_a_wave_completed_by_a_push_goes_at_once(impl: Any) -> None:
    # The last of a wave's rows wakes the pop filling for it (on pace, it would wait a
    # quarter of fill_time; on the pause, idle_gap).
    q = impl.RequestQueue(16)
    answered(q, 4)
    for name in "abc":
        q.push(name)
    popper = Worker(q.pop_batch, 10, fill_rows=10, max_wait=60 * HANG, idle_gap=6 * HANG,
                    fill_time=60 * HANG, timeout=10 * HANG)
    blocked(q, FILL)
    pushed = time.monotonic()
    q.push("d")
    assert popper.outcome() == ["a", "b", "c", "d"]
    assert time.monotonic() - pushed < HANG


def test_rows_as_many_as_the_last_batch_after_a_quiet_spell_wait_for_the_pause(
        impl: Any) -> None:
    # Rows that come fill_time after the last batch ended are no wave of its clients,
    # however many: the pause (idle_gap) ends their wait.
    q = impl.RequestQueue(16)
    answered(q, 2)
    ended = time.monotonic()
    wait_until(lambda: time.monotonic() - ended > 0.25, "a quiet spell past fill_time")
    t_before = time.monotonic()
    q.push("a")
    q.push("b")
    assert q.pop_batch(10, fill_rows=8, max_wait=60 * HANG, idle_gap=0.3, fill_time=0.2,
                       timeout=10 * HANG) == ["a", "b"]
    waited = time.monotonic() - t_before
    assert waited >= 0.3 - 1e-3
    assert waited < 3 * HANG


def test_a_fill_off_pace_ends_on_the_pause(impl: Any) -> None:
    # 2 rows back of a batch of 8 are on pace for a quarter of fill_time (0.1 s); then
    # the pause ends it, long before the ceiling.
    q = impl.RequestQueue(16)
    answered(q, 8)
    t_before = time.monotonic()
    q.push("a")
    q.push("b")
    assert q.pop_batch(10, fill_rows=8, max_wait=6 * HANG, idle_gap=0.001, fill_time=0.4,
                       timeout=10 * HANG) == ["a", "b"]
    waited = time.monotonic() - t_before
    assert waited >= 0.1 - 1e-4
    assert waited < 3 * HANG  # not the ceiling


def test_a_lone_row_is_no_wave(impl: Any) -> None:
    # One row back of a batch of 2 gives no rate to go by: the pause ends its wait (it
    # would otherwise wait half of fill_time, 3 * HANG).
    q = impl.RequestQueue(16)
    answered(q, 2)
    t_before = time.monotonic()
    q.push("a")
    assert q.pop_batch(10, fill_rows=8, max_wait=60 * HANG, idle_gap=0.001,
                       fill_time=6 * HANG, timeout=10 * HANG) == ["a"]
    assert time.monotonic() - t_before < HANG


def test_rows_after_a_quiet_spell_are_no_wave(impl: Any) -> None:
    # Two rows that come fill_time after the last batch ended are not its clients coming
    # back: the pause ends the wait (on pace, it would last half of fill_time, 0.5 s).
    q = impl.RequestQueue(16)
    answered(q, 4)
    ended = time.monotonic()
    wait_until(lambda: time.monotonic() - ended > 1.05, "a quiet spell past fill_time")
    t_before = time.monotonic()
    q.push("a")
    q.push("b")
    assert q.pop_batch(10, fill_rows=8, max_wait=6 * HANG, idle_gap=0.001, fill_time=1.0,
                       timeout=10 * HANG) == ["a", "b"]
    assert time.monotonic() - t_before < 0.4


def carried_across(q: Any, last_rows: int, carried: list[str], busy: float) -> float:
    """A batch of ``last_rows`` rows popped and in flight while ``carried`` came, then
    ended at least ``busy`` seconds after them: they were carried across it. Returns a
    time no later than the end (a thread preempted after ``end_batch`` reads a later
    one), so waits measured from it are never shorter than the queue's."""
    answered(q, last_rows)
    q.begin_batch()
    for name in carried:
        q.push(name)
    pushed = time.monotonic()
    wait_until(lambda: time.monotonic() - pushed > busy, "the batch's call")
    ending = time.monotonic()
    q.end_batch()
    return ending


def test_rows_carried_across_a_call_go_at_once_without_a_wave(impl: Any) -> None:
    # An open load: two rows came during a call of 0.2 s. Nothing comes after its end
    # faster than 8 times their rate, so they go once the first row of a wave is late
    # (0.2 s / (8 x 2) = 12.5 ms), not after an idle gap of 5 s.
    q = impl.RequestQueue(16)
    ended = carried_across(q, 3, ["x", "y"], busy=0.2)
    assert q.pop_batch(10, fill_rows=10, max_wait=6 * HANG, idle_gap=HANG / 2,
                       fill_time=HANG, timeout=10 * HANG) == ["x", "y"]
    assert 0.0125 - 1e-3 <= time.monotonic() - ended < HANG / 4


def test_the_wave_after_a_delivery_joins_the_rows_carried_across_it(impl: Any) -> None:
    # One client came during a call of three (0.4 s); the three come back after its
    # delivery, faster than 8 times that rate: one batch of four, although the carried
    # row is past its own max_wait (0.3 s) and a lone row ends no wait by itself.
    q = impl.RequestQueue(16)
    carried_across(q, 3, ["x"], busy=0.4)
    q.push("a")
    popper = Worker(q.pop_batch, 10, fill_rows=10, max_wait=0.3, idle_gap=6 * HANG,
                    fill_time=HANG, timeout=10 * HANG)
    blocked(q, FILL)
    q.push("b")
    q.push("c")  # the wave is back: the wait ends now, not on a gap or the ceiling
    assert popper.outcome() == ["x", "a", "b", "c"]


def test_a_client_back_during_the_delivery_is_its_wave_not_carried(impl: Any) -> None:
    # Two clients answered by a batch of two: the first is back before the delivery
    # ends, the second after. Both are the delivery's wave: the first waits for the
    # second (its idle gap of HANG / 2 is not up), one batch of two.
    q = impl.RequestQueue(16)
    answering(q, 2, answered=True)
    q.push("a")
    q.end_batch()
    popper = Worker(q.pop_batch, 10, fill_rows=2, max_wait=6 * HANG, idle_gap=HANG / 2,
                    fill_time=HANG, timeout=10 * HANG)
    blocked(q, FILL)
    q.push("b")
    assert popper.outcome() == ["a", "b"]


@pytest.mark.parametrize("answered_before_begin", [False, True])
def test_a_row_pushed_before_the_batch_was_answered_is_carried(
        impl: Any, answered_before_begin: bool) -> None:
    # No answer_batch since the batch began (none at all, or one for an earlier batch):
    # a row pushed before end_batch came during the call, and goes at once (an open
    # load), not after an idle gap of HANG / 2.
    q = impl.RequestQueue(16)
    if answered_before_begin:
        q.answer_batch()
    answering(q, 2, answered=False)
    q.push("a")
    q.end_batch()
    t_before = time.monotonic()
    assert q.pop_batch(10, fill_rows=2, max_wait=6 * HANG, idle_gap=HANG / 2,
                       fill_time=HANG, timeout=10 * HANG) == ["a"]
    assert time.monotonic() - t_before < HANG / 4


def test_a_wave_too_slow_for_the_carried_rows_ends_their_wait(impl: Any) -> None:
    # Two rows came during a call of 0.2 s (10 rows/s); one more after its end at
    # nowhere near 80 rows/s is an open load going on, not clients coming back: the
    # wait ends when the next row is late, 2 x 12.5 ms after the end.
    q = impl.RequestQueue(16)
    carried_across(q, 8, ["x", "y"], busy=0.2)
    batch, waited = pop_after_a_late_row(q, time.monotonic())
    assert batch == ["x", "y", "a"]
    assert waited < HANG / 4


def pop_after_a_late_row(q: Any, ended: float) -> tuple[list[Any], float]:
    """Push a row 30 ms after ``ended`` (the last batch's end), then pop with a long idle
    gap: (the batch, seconds the pop took)."""
    wait_until(lambda: time.monotonic() - ended > 0.03, "a row after the end")
    q.push("a")
    t_before = time.monotonic()
    batch = q.pop_batch(10, fill_rows=10, max_wait=6 * HANG, idle_gap=HANG / 2,
                        fill_time=HANG, timeout=10 * HANG)
    return batch, time.monotonic() - t_before


def test_the_carried_rows_rate_counts_from_the_head_not_the_busy_spell(impl: Any) -> None:
    # Batches in flight for 2 s, the two carried rows pushed in its last 10 ms: they came
    # at 200 rows/s, not 1 row/s, so a row 30 ms after the end is no wave (it would be,
    # at 8 x 1 row/s, for 250 ms): the pop takes what is queued at once.
    q = impl.RequestQueue(16)
    answered(q, 8)
    q.begin_batch()
    began = time.monotonic()
    wait_until(lambda: time.monotonic() - began > 2.0, "a long busy spell")
    q.push("x")
    q.push("y")
    pushed = time.monotonic()
    wait_until(lambda: time.monotonic() - pushed > 0.01, "the carried rows' spell")
    q.end_batch()
    batch, waited = pop_after_a_late_row(q, time.monotonic())
    assert batch == ["x", "y", "a"]
    assert waited < 0.2


def test_a_wave_on_pace_ends_at_max_wait_after_the_delivery(impl: Any) -> None:
    # A wave that keeps its pace (a row every 5 ms; 250 ms would do, so a stalled test
    # thread still keeps it) but never brings back the 40 rows of the last batch: the
    # carried row's wait for it ends max_wait (0.1 s) after the end, not on the row's own
    # max_wait (long past) or the gap.
    q = impl.RequestQueue(64)
    ended = carried_across(q, 40, ["x"], busy=2.0)
    popper = Worker(q.pop_batch, 64, fill_rows=64, max_wait=0.1, idle_gap=6 * HANG,
                    fill_time=HANG, timeout=10 * HANG)
    pushed = 0
    while popper.is_alive() and pushed < 30:
        q.push(f"w{pushed}")
        pushed += 1
        next_row = time.monotonic() + 0.005
        wait_until(lambda at=next_row: time.monotonic() > at, "the next row of the wave")
    out = popper.outcome()
    assert out[0] == "x" and 1 < len(out) < 31
    assert 0.1 - 1e-3 <= time.monotonic() - ended < HANG / 4


def test_a_fill_on_pace_still_ends_at_the_ceiling(impl: Any) -> None:
    q = impl.RequestQueue(16)
    answered(q, 4)
    t_before = time.monotonic()
    for name in "abc":
        q.push(name)
    assert q.pop_batch(10, fill_rows=4, max_wait=0.2, idle_gap=0.0, fill_time=6 * HANG,
                       timeout=10 * HANG) == ["a", "b", "c"]
    waited = time.monotonic() - t_before
    assert 0.2 - 1e-4 <= waited < 3 * HANG


def test_no_fill_wait_without_fill_rows_or_max_wait(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("a")
    assert q.pop_batch(10, fill_rows=0, max_wait=10 * HANG) == ["a"]
    q.push("b")
    assert q.pop_batch(10, fill_rows=100, max_wait=0.0) == ["b"]
    q.push("c", rows=3)
    assert q.pop_batch(10, fill_rows=3, max_wait=10 * HANG) == ["c"]   # already filled


def test_close_ends_a_fill_wait(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("a")
    popper = Worker(q.pop_batch, 10, fill_rows=5, max_wait=10 * HANG)
    blocked(q, FILL)
    q.close()
    assert popper.outcome() == ["a"]


def test_fill_wait_goes_back_to_step_one_when_emptied(impl: Any) -> None:
    q = impl.RequestQueue(16)
    tok = q.push("a")
    popper = Worker(q.pop_batch, 10, fill_rows=5, max_wait=10 * HANG, timeout=10 * HANG)
    blocked(q, FILL)
    assert q.cancel(tok)
    blocked(q, ITEMS)               # waiting for an entry again, not returning []
    q.push("b", rows=5)
    assert popper.outcome() == ["b"]


# ------------------------------------------------------------------ retarget


def test_a_pop_planned_before_a_retarget_takes_nothing(impl: Any) -> None:
    q = impl.RequestQueue(16)
    planned = q.retargets
    q.push("a")
    q.retarget()
    assert q.retargets == planned + 1
    assert q.pop_batch(10, retargets=planned, timeout=0) == []
    assert len(q) == 1  # still queued, for the pop planned again
    assert q.pop_batch(10, retargets=q.retargets, timeout=0) == ["a"]


def test_a_retarget_ends_a_pop_waiting_for_entries(impl: Any) -> None:
    q = impl.RequestQueue(16)
    popper = Worker(q.pop_batch, 10, retargets=q.retargets, timeout=10 * HANG)
    blocked(q, ITEMS)
    q.retarget()
    assert popper.outcome() == []


def test_a_retarget_ends_a_fill_wait_leaving_the_entries_queued(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("a")
    q.push("b")
    popper = Worker(q.pop_batch, 10, fill_rows=5, max_wait=10 * HANG, retargets=q.retargets)
    blocked(q, FILL)
    q.retarget()
    assert popper.outcome() == []
    assert q.pop_batch(2, retargets=q.retargets, timeout=0) == ["a", "b"]


@pytest.mark.parametrize("retargets", [0.5, 1.0, -1, 2**64, "0"])
def test_a_pop_names_a_bad_retargets(impl: Any, retargets: Any) -> None:
    # A count the queue gave out: a float was cut to an int without a word.
    q = impl.RequestQueue(4)
    q.push("a")
    with pytest.raises((TypeError, ValueError, OverflowError), match="retargets"):
        q.pop_batch(10, timeout=0, retargets=retargets)
    assert q.pop_batch(10, timeout=0, retargets=q.retargets) == ["a"]


def test_a_pop_that_gives_no_retargets_is_not_ended_by_one(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("a")
    popper = Worker(q.pop_batch, 10, fill_rows=2, max_wait=10 * HANG, timeout=10 * HANG)
    blocked(q, FILL)
    q.retarget()
    q.push("b")
    assert popper.outcome() == ["a", "b"]


# ------------------------------------------------------------------ close


def test_close_releases_blocked_push_and_pop(impl: Any) -> None:
    full = impl.RequestQueue(1)
    full.push("x")
    pusher = Worker(full.push, "y")              # timeout=None: waits for room
    empty = impl.RequestQueue(1)
    popper = Worker(empty.pop_batch, 1)          # timeout=None: waits until closed
    blocked(full, ROOM)
    blocked(empty, ITEMS)
    full.close()
    empty.close()
    with pytest.raises(impl.QueueClosed):
        pusher.outcome()
    assert popper.outcome() == []
    assert full.drain() == ["x"]


def test_after_close(impl: Any) -> None:
    q = impl.RequestQueue(8)
    q.push("a", key=1)
    q.push("b", key=2)
    q.push("c", key=1)
    assert not q.closed
    q.close()
    q.close()                                    # idempotent
    assert q.closed
    assert issubclass(impl.QueueClosed, RuntimeError)
    with pytest.raises(impl.QueueClosed):
        q.push("d", timeout=0)
    with pytest.raises(impl.QueueClosed):
        q.push("d")
    # No waiting at all, not even a fill wait; same batching rules.
    assert q.pop_batch(10, fill_rows=100, max_wait=10 * HANG) == ["a", "c"]
    assert q.pop_batch(10) == ["b"]
    assert q.pop_batch(10) == []


# ------------------------------------------------------------------ cancel


def test_cancel(impl: Any) -> None:
    q = impl.RequestQueue(3)
    ta = q.push("a", rows=2)
    tb = q.push("b", rows=3)
    tc = q.push("c", rows=4)
    assert len({ta, tb, tc}) == 3 and min(ta, tb, tc) >= 0
    assert q.cancel(tb) is True
    assert (len(q), q.rows) == (2, 6)
    q.push("d", timeout=0)                       # capacity released at cancel time
    assert q.cancel(tb) is False                 # already cancelled
    assert q.pop_batch(100) == ["a", "c", "d"]   # never returned
    assert q.cancel(ta) is False                 # already popped
    assert q.cancel(-1) is False
    assert q.cancel(2**70) is False
    assert q.cancel(123456789) is False


def test_cancel_token_of_a_reused_slot(impl: Any) -> None:
    q = impl.RequestQueue(1)
    old = q.push("a")
    assert q.pop_batch(1) == ["a"]
    new = q.push("b")                            # reuses the only slot
    assert new != old
    assert q.cancel(old) is False
    assert len(q) == 1
    assert q.cancel(new) is True
    assert len(q) == 0


def test_cancel_wakes_a_blocked_pusher(impl: Any) -> None:
    q = impl.RequestQueue(1)
    tok = q.push("a")
    pusher = Worker(q.push, "b", timeout=10 * HANG)
    blocked(q, ROOM)
    assert q.cancel(tok)
    pusher.outcome()
    assert q.drain() == ["b"]


def test_dropped_item_finalizer_may_call_the_queue(impl: Any) -> None:
    q = impl.RequestQueue(4)
    seen: list[int] = []

    class CallsBack:
        def __del__(self) -> None:
            seen.append(len(q))
            q.push("from-finalizer", timeout=0)

    def scenario() -> None:
        tok = q.push(CallsBack())
        assert q.cancel(tok)

    Worker(scenario).outcome()       # a deadlock would leave the thread blocked
    assert seen == [0]
    assert q.drain() == ["from-finalizer"]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("capacity", "exc"),
    [(0, ValueError), (-1, ValueError), (2**25, ValueError), (2**24 + 1, ValueError),
     (2**80, ValueError), (1.5, TypeError), (None, TypeError), ("3", TypeError)],
)
def test_bad_capacity(impl: Any, capacity: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="capacity"):
        impl.RequestQueue(capacity)


def test_capacity_limits_accepted(impl: Any) -> None:
    assert impl.RequestQueue(1).capacity == 1
    assert impl.RequestQueue(2**24).capacity == 2**24


BAD_PUSH_ARGUMENTS = [
        ({"priority": -1}, ValueError, "priority"),
        ({"priority": 2**31}, ValueError, "priority"),
        ({"priority": "x"}, TypeError, "priority"),
        ({"priority": 1.0}, TypeError, "priority"),
        ({"rows": -1}, ValueError, "rows"),
        ({"rows": 2**39}, ValueError, "rows"),
        ({"rows": 1.5}, TypeError, "rows"),
        ({"nbytes": -1}, ValueError, "nbytes"),
        ({"nbytes": None}, TypeError, "nbytes"),
        ({"key": 2**63}, ValueError, "key"),
        ({"key": -(2**63) - 1}, ValueError, "key"),
        ({"key": "k"}, TypeError, "key"),
        ({"length": -1}, ValueError, "length"),
        ({"length": 2**39}, ValueError, "length"),
        ({"length": 2**80}, ValueError, "length"),
        ({"length": 1.5}, TypeError, "length"),
        ({"length": None}, TypeError, "length"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"timeout": math.nan}, ValueError, "timeout"),
        ({"timeout": "1"}, TypeError, "timeout"),
]


@pytest.mark.parametrize(("kwargs", "exc", "name"), BAD_PUSH_ARGUMENTS)
def test_bad_push(impl: Any, kwargs: dict[str, Any], exc: type[Exception], name: str) -> None:
    for priorities in (True, False):             # validated even when ignored
        q = impl.RequestQueue(4, priorities=priorities)
        with pytest.raises(exc, match=name):
            q.push("x", **kwargs)
        assert (len(q), q.rows) == (0, 0)


def test_push_limits_accepted(impl: Any) -> None:
    q = impl.RequestQueue(8)
    q.push("a", priority=2**31 - 1, rows=2**39 - 1, nbytes=2**39 - 1, key=2**63 - 1)
    q.push("b", priority=0, rows=0, nbytes=0, key=-(2**63), timeout=math.inf)
    q.push("c", rows=True, timeout=0.5)
    assert q.rows == 2**39
    assert q.drain() == ["b", "c", "a"]


def test_push_length_limits_accepted(impl: Any) -> None:
    class Seven:
        def __index__(self) -> int:
            return 7

    q = impl.RequestQueue(8)
    q.push("a", length=2**39 - 1)
    q.push("b", length=0)
    q.push("c", length=True)
    q.push("d", length=Seven())
    assert q.pop_batch(8, max_tokens=8) == ["a"]
    assert q.pop_batch(8, max_tokens=8) == ["b", "c"]        # 2 x 1; then 3 x 7 > 8
    assert q.pop_batch(8, max_tokens=8) == ["d"]


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "name"),
    [
        ((0,), {}, ValueError, "max_rows"),
        ((-5,), {}, ValueError, "max_rows"),
        ((-(2**80),), {}, ValueError, "max_rows"),
        ((1.5,), {}, TypeError, "max_rows"),
        ((None,), {}, TypeError, "max_rows"),
        ((1, "x"), {}, TypeError, "max_bytes"),
        ((1,), {"fill_rows": 1.0}, TypeError, "fill_rows"),
        ((1,), {"max_tokens": 1.0}, TypeError, "max_tokens"),
        ((1,), {"max_tokens": "x"}, TypeError, "max_tokens"),
        ((1,), {"max_tokens": None}, TypeError, "max_tokens"),
        ((1,), {"max_wait": math.nan}, ValueError, "max_wait"),
        ((1,), {"max_wait": "x"}, TypeError, "max_wait"),
        ((1,), {"idle_gap": math.nan}, ValueError, "idle_gap"),
        ((1,), {"fill_time": math.nan}, ValueError, "fill_time"),
        ((1,), {"fill_time": "soon"}, TypeError, "fill_time"),
        ((1,), {"timeout": -0.1}, ValueError, "timeout"),
        ((1,), {"timeout": math.nan}, ValueError, "timeout"),
    ],
)
def test_bad_pop(impl: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 exc: type[Exception], name: str) -> None:
    q = impl.RequestQueue(4)
    q.push("x")
    with pytest.raises(exc, match=name):
        q.pop_batch(*args, **kwargs)
    assert len(q) == 1


def test_pop_limits_accepted(impl: Any) -> None:
    q = impl.RequestQueue(4)
    q.push("x", rows=5)
    q.push("y", rows=5)
    assert q.pop_batch(2**80, max_bytes=-(2**80), fill_rows=-(2**80), max_wait=-1.0,
                       idle_gap=-1.0, timeout=math.inf) == ["x", "y"]
    q.push("x", rows=5, length=2**39 - 1)
    q.push("y", rows=5, length=2**39 - 1)
    assert q.pop_batch(2**80, max_tokens=-(2**80)) == ["x", "y"]
    q.push("x", rows=5, length=2**39 - 1)
    q.push("y", rows=5, length=2**39 - 1)
    assert q.pop_batch(2**80, max_tokens=2**80) == ["x", "y"]     # 10 x (2**39 - 1) fits
    with pytest.raises(TypeError, match="positional"):
        q.pop_batch(1, 0, 0)                       # fill_rows and later are keyword-only


@pytest.mark.parametrize("token", ["x", 1.5, None])
def test_bad_cancel(impl: Any, token: Any) -> None:
    q = impl.RequestQueue(4)
    with pytest.raises(TypeError, match="token"):
        q.cancel(token)


# ------------------------------------------------------------------ threads


def test_producers_and_one_consumer(impl: Any) -> None:
    producers, per_producer = 4, 300
    q = impl.RequestQueue(8)        # small: producers block on a full queue
    start = threading.Barrier(producers + 1)

    def prio(p: int, i: int) -> int:
        return (p * 7 + i * 13) % 3

    def produce(p: int) -> None:
        start.wait(HANG)
        for i in range(per_producer):
            q.push((p, i), priority=prio(p, i), timeout=10 * HANG)

    workers = [Worker(produce, p) for p in range(producers)]
    start.wait(HANG)
    out: list[tuple[int, int]] = []
    while len(out) < producers * per_producer:
        batch = q.pop_batch(5, timeout=10 * HANG)
        assert batch, "consumer starved"
        levels = [prio(*item) for item in batch]
        assert levels == sorted(levels)          # a batch is in priority order
        out.extend(batch)
    for w in workers:
        w.outcome()
    assert sorted(out) == [(p, i) for p in range(producers) for i in range(per_producer)]
    assert q.pop_batch(5, timeout=0) == []
    _assert_priority_then_arrival_per_producer(out, prio)


def _assert_priority_then_arrival_per_producer(
        out: list[tuple[int, int]], prio: Callable[[int, int], int]) -> None:
    # If a producer pushed i before j and prio(i) <= prio(j), i must come out first.
    latest: dict[tuple[int, int], int] = {}      # (producer, level) -> max i seen
    for p, i in out:
        level = prio(p, i)
        later = [v for (pp, lv), v in latest.items() if pp == p and lv >= level]
        assert all(v < i for v in later), f"{(p, i)} overtaken"
        latest[(p, level)] = max(latest.get((p, level), -1), i)


def test_producers_and_several_consumers(impl: Any) -> None:
    producers, consumers, per_producer = 3, 3, 300
    q = impl.RequestQueue(4)
    start = threading.Barrier(producers + consumers)

    def produce(p: int) -> None:
        start.wait(HANG)
        for i in range(per_producer):
            q.push((p, i), priority=i % 2, timeout=10 * HANG)

    def consume() -> list[tuple[int, int]]:
        start.wait(HANG)
        got: list[tuple[int, int]] = []
        while batch := q.pop_batch(3, timeout=10 * HANG):   # [] only once closed and empty
            assert [i % 2 for _, i in batch] == sorted(i % 2 for _, i in batch)
            got.extend(batch)
        return got

    cons = [Worker(consume) for _ in range(consumers)]
    prods = [Worker(produce, p) for p in range(producers)]
    for w in prods:
        w.outcome()
    q.close()
    out = [item for c in cons for item in c.outcome()]
    assert sorted(out) == [(p, i) for p in range(producers) for i in range(per_producer)]


def test_blocking_calls_release_the_gil(impl: Any) -> None:
    q = impl.RequestQueue(1)
    popper = Worker(q.pop_batch, 1)
    blocked(q, ITEMS)
    total = sum(range(200_000))      # runs only if the blocked thread let the GIL go
    q.push(total)
    assert popper.outcome() == [total]


def test_ctrl_c_interrupts_a_blocked_main_thread(impl: Any) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    q = impl.RequestQueue(1)
    main = threading.main_thread().ident
    assert main is not None

    def interrupt() -> None:
        blocked(q, ITEMS)
        signal.pthread_kill(main, signal.SIGINT)

    # Python raises KeyboardInterrupt only with its own SIGINT handler, which it does not
    # install when started with SIGINT ignored (a background job of a script, say).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sender = Worker(interrupt)
        with pytest.raises(KeyboardInterrupt):
            q.pop_batch(1)                       # timeout=None: only the signal ends it
        sender.outcome()
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------ native only


def test_native_tokens_unique_across_slot_reuse() -> None:
    q = native_queue.RequestQueue(2)
    tokens = set()
    for i in range(1000):
        tokens.add(q.push(i))
        assert q.pop_batch(1) == [i]
    assert len(tokens) == 1000
    assert not any(q.cancel(t) for t in tokens)


def test_native_big_queue_grows_on_demand() -> None:
    q = native_queue.RequestQueue(2**24, priorities=False)
    n = 5000
    for i in range(n):
        q.push(i, priority=i % 7, rows=1)
    assert (len(q), q.rows) == (n, n)
    assert q.pop_batch(2 * n) == list(range(n))


def test_native_refuses_pickle_and_reinit() -> None:
    q = native_queue.RequestQueue(4)
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(q)
    with pytest.raises(RuntimeError, match="initialised"):
        q.__init__(8)
    assert q.capacity == 4


def test_native_uninitialised_queue_is_inert() -> None:
    q = native_queue.RequestQueue.__new__(native_queue.RequestQueue)
    with pytest.raises(queue.Full):
        q.push("x", timeout=0)
    assert (len(q), q.rows, q.pop_batch(1, timeout=0), q.drain()) == (0, 0, [], [])
    assert q.cancel(0) is False
    assert q.oldest_age() == 0.0


# ------------------------------------------------------------------ differential


# Mostly short, so that several share a batch; now and then the largest one (overflow).
LENGTHS = st.integers(0, 12).map(lambda n: n if n <= 11 else 2**39 - 1)


@functools.total_ordering
class Item:
    """A queue entry the cyclic garbage collector manages (an int is not one), equal and
    ordered by its number like the ints it stands for."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Item) and other.n == self.n

    def __lt__(self, other: Item) -> bool:
        return self.n < other.n

    def __hash__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Item({self.n})"


class NativeVsReference(RuleBasedStateMachine):
    """Random operation sequences on both queues, compared step by step; and the native
    queue's entries off the garbage collector's lists exactly while they are queued
    (once it has been popped from), whatever took them out."""

    # max_priority_wait: off, or 0 (every entry has waited past it by the next pop).
    @initialize(capacity=st.integers(1, 12), priorities=st.booleans(),
                aging=st.sampled_from([None, 0.0]))
    def make(self, capacity: int, priorities: bool, aging: float | None) -> None:
        self.native = native_queue.RequestQueue(capacity, priorities, aging)
        self.ref = reference_queue.RequestQueue(capacity, priorities, aging)
        self.next_item = 0
        self.parks = 0
        self.tokens: list[tuple[int, int]] = []
        self.popped_from = False     # the native queue hides entries pushed from then on
        self.queued: dict[Item, bool] = {}   # in the native queue -> hidden when pushed
        self.items: list[Item] = []
        self.by_token: dict[int, Item] = {}
        # The longest any call of both queues took, s: how far apart their clocks' reads
        # of one step (a push's time) may be, on a machine that stalls the test.
        self.slowest = 0.0

    def _new_item(self) -> Item:
        item = Item(self.next_item)
        self.next_item += 1
        self.items.append(item)
        return item

    def _queued(self, item: Item) -> None:
        self.queued[item] = self.popped_from

    def _left(self, items: list[Item]) -> None:
        for item in items:
            del self.queued[item]

    def _both(self, fn_n: Callable[[], Any], fn_r: Callable[[], Any]) -> tuple[Any, Any]:
        results = []
        started = time.monotonic()
        for fn in (fn_n, fn_r):
            try:
                results.append(("ok", fn()))
            except Exception as exc:
                results.append(("raised", type(exc).__name__))
        self.slowest = max(self.slowest, time.monotonic() - started)
        (kn, vn), (kr, vr) = results
        assert kn == kr, results
        if kn == "raised":
            assert vn == vr, results
        return vn, vr

    @rule(priority=st.integers(0, 3), rows=st.integers(0, 4), nbytes=st.integers(0, 300),
          key=st.integers(0, 2), length=LENGTHS)
    def push(self, priority: int, rows: int, nbytes: int, key: int, length: int) -> None:
        item = self._new_item()
        tn, tr = self._both(      # timeout=0, then length: all positional
            lambda: self.native.push(item, priority, rows, nbytes, key, 0, length),
            lambda: self.ref.push(item, priority, rows, nbytes, key, 0, length))
        if isinstance(tn, int):
            self.tokens.append((tn, tr))
            self.by_token[tn] = item
            self._queued(item)

    # Several entries of one key in one step: one push at a time seldom queues enough of
    # them for the caps (the token cap above all) to decide a batch's end.
    @rule(key=st.integers(0, 2),
          entries=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), LENGTHS),
                           min_size=2, max_size=8))
    def push_run(self, key: int, entries: list[tuple[int, int, int]]) -> None:
        for priority, rows, length in entries:
            self.push(priority, rows, 0, key, length)

    # Deadlines and parking with times either long past (expired, due) or far ahead, so
    # that both queues see the same thing whenever they look.
    @rule(priority=st.integers(0, 3), rows=st.integers(0, 4), key=st.integers(0, 2),
          expired=st.booleans())
    def push_with_deadline(self, priority: int, rows: int, key: int, expired: bool) -> None:
        item = self._new_item()
        deadline = 1.0 if expired else 1e12
        tn, tr = self._both(
            lambda: self.native.push(item, priority, rows, 0, key, 0, 0, deadline),
            lambda: self.ref.push(item, priority, rows, 0, key, 0, 0, deadline))
        if isinstance(tn, int):
            self.tokens.append((tn, tr))
            self.by_token[tn] = item
            self._queued(item)

    @rule(priority=st.integers(0, 3), rows=st.integers(0, 4), key=st.integers(0, 2),
          due=st.sampled_from(["long ago", 1.0, 2.0, 3.0, "later"]),
          deadline=st.sampled_from([None, 1.0, 1e12]))
    def park(self, priority: int, rows: int, key: int, due: str | float,
             deadline: float | None) -> None:
        item = self._new_item()
        self.parks += 1
        # Due long ago (all at one time: they come back in the order parked), some
        # seconds ago (their ages tell whether each counts from when it was due), or
        # not in this test.
        not_before = (1e-6 if due == "long ago" else 1e12 + self.parks if due == "later"
                      else time.monotonic() - float(due))
        got, _ = self._both(
            lambda: self.native.park(item, priority, rows, 0, key, 0, not_before, deadline),
            lambda: self.ref.park(item, priority, rows, 0, key, 0, not_before, deadline))
        if got is None:  # parked (else the name of what it raised)
            self._queued(item)

    @rule()
    def take_expired(self) -> None:
        got_n, got_r = self._both(lambda: self.native.take_expired(0),
                                  lambda: self.ref.take_expired(0))
        assert got_n == got_r  # deadlines that tie expire in the order they were set
        self._left(got_n)

    @rule(max_rows=st.integers(1, 9), max_bytes=st.integers(-1, 700),
          max_tokens=st.integers(-1, 62).map(lambda n: {61: 2**63 - 1, 62: 2**80}.get(n, n)))
    def pop(self, max_rows: int, max_bytes: int, max_tokens: int) -> None:
        got_n, got_r = self._both(
            lambda: self.native.pop_batch(max_rows, max_bytes, max_tokens=max_tokens,
                                          timeout=0),
            lambda: self.ref.pop_batch(max_rows, max_bytes, max_tokens=max_tokens,
                                       timeout=0))
        assert got_n == got_r
        self.popped_from = True
        self._left(got_n)

    @rule(max_tokens=st.integers(1, 40))
    def pop_by_tokens(self, max_tokens: int) -> None:
        # Only the token cap: with the others drawn too, it seldom decides a batch's end.
        got_n, got_r = self._both(
            lambda: self.native.pop_batch(2**63 - 1, max_tokens=max_tokens, timeout=0),
            lambda: self.ref.pop_batch(2**63 - 1, max_tokens=max_tokens, timeout=0))
        assert got_n == got_r
        self.popped_from = True
        self._left(got_n)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        tn, tr = data.draw(st.sampled_from(self.tokens))
        cancelled = self.native.cancel(tn)
        assert cancelled == self.ref.cancel(tr)
        if cancelled:
            self._left([self.by_token[tn]])

    @rule()
    def drain(self) -> None:
        got = self.native.drain()
        assert got == self.ref.drain()
        self._left(got)

    @precondition(lambda self: self.next_item >= 25)   # late, so most runs explore first
    @rule()
    def close(self) -> None:
        self.native.close()
        self.ref.close()

    @invariant()
    def same_state(self) -> None:
        assert len(self.native) == len(self.ref)
        assert self.native.room == self.ref.room
        assert self.native.parked == self.ref.parked
        assert self.native.rows == self.ref.rows
        assert self.native.closed == self.ref.closed
        assert (self.native.oldest_age() == 0.0) == (len(self.ref) == self.ref.parked)
        # Ages of a second or more apart, when a parked entry came into line; those of
        # one entry are as far apart as the two queues' reads of the clock for it (its
        # push, and these reads): microseconds, unless the machine stalled the test.
        started = time.monotonic()
        oldest = self.native.oldest_age(), self.ref.oldest_age()
        newest = self.native.newest_age(), self.ref.newest_age()
        apart = 0.5 + self.slowest + (time.monotonic() - started)
        assert abs(oldest[0] - oldest[1]) < apart and abs(newest[0] - newest[1]) < apart

    @invariant()
    def entries_hidden_from_the_collector_exactly_while_queued(self) -> None:
        if not hasattr(self, "items"):
            return  # before make()
        for item in self.items:
            assert gc.is_tracked(item) != self.queued.get(item, False), item

    def teardown(self) -> None:
        # Dropped with the queue, what it still held is tracked again.
        items = getattr(self, "items", [])
        self.native = self.ref = None  # type: ignore[assignment]
        assert all(gc.is_tracked(item) for item in items)


NativeVsReference.TestCase.settings = settings(max_examples=300, stateful_step_count=60)
TestNativeVsReference = NativeVsReference.TestCase


# ------------------------------------------------------------------ pause / resume


def test_pause_holds_pops_and_resume_releases_them(impl: Any) -> None:
    q = impl.RequestQueue(8)
    q.pause()
    assert q.paused
    q.push("a")
    q.push("b")  # intake goes on while paused
    assert q.pop_batch(8, timeout=0) == []
    assert q.pop_batch(8, timeout=0.05) == []
    popper = Worker(q.pop_batch, 8, timeout=10 * HANG)
    blocked(q, ITEMS)  # waiting although entries are queued
    assert len(q) == 2
    q.resume()
    assert popper.outcome() == ["a", "b"]
    assert not q.paused


def test_pause_ends_a_fill_wait_without_popping(impl: Any) -> None:
    q = impl.RequestQueue(8)
    q.push("a")
    popper = Worker(q.pop_batch, 8, fill_rows=4, max_wait=HANG, timeout=10 * HANG)
    blocked(q, FILL)
    q.pause()
    q.push("b")  # wakes the fill wait, which must now hold instead of popping
    blocked(q, ITEMS)
    assert len(q) == 2
    q.resume()
    q.push("c")
    q.push("d")
    assert popper.outcome() == ["a", "b", "c", "d"]


def test_a_held_queue_wakes_no_pop_on_push_or_park() -> None:
    # A paused queue hands nothing out: a push, or a retry parked, must not wake a pop
    # waiting for an entry only for it to wait again (a thread wake-up per request, on
    # the pushing thread's time, while a processor is paused under load). resume()
    # wakes it, and it takes what came meanwhile.
    q = native_queue.RequestQueue(16)
    q.pause()
    popper = Worker(q.pop_batch, 16, timeout=10 * HANG)
    blocked(q, ITEMS)
    woken = q._item_wakes()
    for i in range(5):
        q.push(i)
    q.park("retry", 0, 1, 0, 0, 0, time.monotonic() + HANG)
    assert q._item_wakes() == woken
    assert q._waiters()[ITEMS] == 1
    q.resume()
    assert popper.outcome() == [0, 1, 2, 3, 4]
    assert q._item_wakes() == woken + 1


def test_a_push_or_a_park_wakes_a_pop_waiting_for_an_entry() -> None:
    # Unpaused, each wakes the waiting pop: the push to take it, the park to learn
    # when the retry is due. (The pops wait on a queue with no recent push: no spin.)
    q = native_queue.RequestQueue(16)
    popper = Worker(q.pop_batch, 16, timeout=10 * HANG)
    blocked(q, ITEMS)
    woken = q._item_wakes()
    q.push("a")
    assert popper.outcome() == ["a"]
    assert q._item_wakes() == woken + 1
    popper = Worker(q.pop_batch, 16, timeout=10 * HANG)
    blocked(q, ITEMS)
    q.park("retry", 0, 1, 0, 0, 0, time.monotonic() + 0.05)
    assert q._item_wakes() == woken + 2
    assert popper.outcome() == ["retry"]  # once due


def test_close_overrides_pause(impl: Any) -> None:
    q = impl.RequestQueue(8)
    q.pause()
    q.push("a")
    popper = Worker(q.pop_batch, 8, timeout=10 * HANG)
    blocked(q, ITEMS)
    q.close()
    assert popper.outcome() == ["a"]
    assert q.pop_batch(8) == []


# ------------------------------------------------------------------ batches in flight


def test_idle_gap_only_counts_while_no_batch_is_in_flight(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.begin_batch()
    assert q.in_flight == 1
    q.push("a")
    popper = Worker(q.pop_batch, 10, fill_rows=5, max_wait=6 * HANG, idle_gap=0.0,
                    timeout=10 * HANG)
    blocked(q, FILL)  # idle_gap=0 would end the wait at once, but a batch is in flight
    q.push("b")
    blocked(q, FILL)
    started = time.monotonic()
    q.end_batch()  # the model is idle: the batch goes once arrivals pause for idle_gap
    assert popper.outcome() == ["a", "b"]
    assert q.in_flight == 0
    assert time.monotonic() - started < HANG


def test_idle_gap_is_measured_from_the_end_of_the_last_batch(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.push("a")
    q.begin_batch()
    ending = time.monotonic()
    q.end_batch()
    assert q.pop_batch(10, fill_rows=5, max_wait=6 * HANG, idle_gap=0.2) == ["a"]
    assert time.monotonic() >= ending + 0.2 - 1e-4


def test_idle_gap_none_turns_the_early_end_off(impl: Any) -> None:
    q = impl.RequestQueue(16)
    t_before = time.monotonic()
    q.push("a")
    assert q.pop_batch(10, fill_rows=5, max_wait=0.3, idle_gap=None) == ["a"]
    assert time.monotonic() >= t_before + 0.3 - 1e-4
    q.end_batch()  # unbalanced end: ignored
    assert q.in_flight == 0


def test_a_batch_in_flight_fills_only_up_to_max_wait(impl: Any) -> None:
    # max_wait is a ceiling from the head's arrival even while a batch is in flight: a
    # long call never holds the queued requests past it.
    q = impl.RequestQueue(16)
    q.begin_batch()
    pushed = time.monotonic()
    q.push("a")
    # idle_gap=0 would end an idle wait at once: only the ceiling ends this one.
    assert q.pop_batch(10, fill_rows=5, max_wait=0.2, idle_gap=0.0, timeout=10 * HANG) == ["a"]
    assert 0.2 - 1e-4 <= time.monotonic() - pushed < HANG
    assert q.in_flight == 1


def test_plain_fill_wait_ignores_batches_in_flight(impl: Any) -> None:
    q = impl.RequestQueue(16)
    q.begin_batch()
    t_before = time.monotonic()
    q.push("a")
    assert q.pop_batch(10, fill_rows=5, max_wait=0.1) == ["a"]  # idle_gap=None
    assert HANG > time.monotonic() - t_before >= 0.1 - 1e-4


def test_pushed_counts_accepted_entries_only(impl: Any) -> None:
    q = impl.RequestQueue(2)
    assert q.pushed == 0
    token = q.push("a")
    q.push("b")
    with pytest.raises(queue.Full):
        q.push("c", timeout=0)
    q.cancel(token)
    assert q.pop_batch(8) == ["b"]
    q.close()
    with pytest.raises(impl.QueueClosed):
        q.push("d")
    assert q.pushed == 2  # refused pushes never count; cancel and pop do not uncount


# ------------------------------------------------------------------ deadlines, parking, ageing


def test_an_entry_past_its_deadline_is_never_popped(impl: Any) -> None:
    q = impl.RequestQueue(4)
    q.push("late", deadline=time.monotonic() - 1)
    q.push("ok", deadline=time.monotonic() + 3600)
    assert q.pop_batch(10, timeout=0) == ["ok"]
    assert len(q) == 0 and q.rows == 0
    assert q.take_expired() == ["late"]
    assert q.take_expired() == []


def test_take_expired_waits_for_the_earliest_deadline(impl: Any) -> None:
    q = impl.RequestQueue(4)
    collector = Worker(q.take_expired, HANG)
    q.push("a", deadline=time.monotonic() + 6 * HANG)
    q.push("b", deadline=time.monotonic() + 0.05)   # earlier: wakes the collector
    assert collector.outcome() == ["b"]
    assert len(q) == 1


def test_expired_entries_hold_capacity_until_taken(impl: Any) -> None:
    q = impl.RequestQueue(1)
    q.push("a", deadline=time.monotonic() - 1)
    assert q.pop_batch(10, timeout=0) == []         # expired on this look
    with pytest.raises(queue.Full):
        q.push("b", timeout=0)
    assert q.take_expired() == ["a"]
    q.push("b", timeout=0)


def test_a_parked_entry_comes_back_alone_when_due(impl: Any) -> None:
    q = impl.RequestQueue(4)
    q.park("retry", 0, 1, 0, 0, 0, time.monotonic() + 0.05)
    assert len(q) == 1 and q.parked == 1 and q.rows == 0
    q.push("x")
    q.push("y")
    assert q.pop_batch(10, timeout=0) == ["x", "y"]
    popper = Worker(q.pop_batch, 10, timeout=10 * HANG)   # wakes when the park is due
    assert popper.outcome() == ["retry"]
    q.push("z")
    q.park("r2", 0, 1, 0, 0, 0, 0.0)                  # due: it arrives on the next look
    q.push("z2")
    assert q.pop_batch(10, timeout=0) == ["z", "z2"]  # solo: it joins no batch
    assert q.pop_batch(10, timeout=0) == ["r2"]


def test_a_retry_due_while_nobody_looked_waits_from_when_it_was_due() -> None:
    # A hung call holds the only call slot: no pop looks at the queue, only the watch,
    # a period apart. A retry due a second before that look has waited a second, not
    # since the look (which left it waiting up to another watch period to be late).
    q = native_queue.RequestQueue(4)
    q.park("retry", 0, 1, 0, 0, 0, time.monotonic() - 1.0)
    assert q.await_late(0.5, 0.0, 0.0, q.watch_wakes, 0.01) is True
    assert q.oldest_age() >= 1.0
    assert q.pop_batch(10, timeout=0) == ["retry"]


def test_an_await_late_on_an_empty_queue_looks_when_a_parked_retry_is_late() -> None:
    # Pushes are not watched (it looks a period on), but a parked retry's due time is
    # known: it looks when the retry will have waited ``age``, not a period (60 s) on.
    # (Off the main thread, whose waits come back often to run signal handlers.)
    q = native_queue.RequestQueue(4)
    due = time.monotonic() + 0.05
    q.park("retry", 0, 1, 0, 0, 0, due)
    watcher = Worker(q.await_late, 0.05, 0.0, 2.0, q.watch_wakes, 60.0)
    assert watcher.outcome() is True
    assert due + 0.05 <= time.monotonic() < due + 1.5  # not at its timeout, 2 s
    assert q.pop_batch(10, timeout=0) == ["retry"]


@pytest.mark.parametrize("priorities", [False, True])
def test_a_retry_due_before_a_push_stays_ahead_of_it(impl: Any, priorities: bool) -> None:
    # Due a second ago, not yet looked at when "x" is pushed: the push queues it first,
    # so it keeps its place ahead of x (it went behind, and in a FIFO queue counted
    # from x's push), and its age from when it was due.
    q = impl.RequestQueue(4, priorities=priorities)
    q.park("retry", 0, 1, 0, 0, 0, time.monotonic() - 1.0)
    q.push("x")
    assert q.oldest_age() >= 1.0
    assert q.pop_batch(10, timeout=0) == ["retry"]
    assert q.pop_batch(10, timeout=0) == ["x"]


def test_retries_due_at_one_time_come_back_in_the_order_they_were_parked(
        impl: Any) -> None:
    # As the requests of an abandoned call are (one time for all): a heap of due times
    # alone gave them back in its own order.
    q = impl.RequestQueue(64)
    due = time.monotonic() - 0.5
    for i in range(10):
        q.park(f"r{i}", 0, 1, 0, 0, 0, due)
    assert [q.pop_batch(10, timeout=0) for _ in range(10)] == [[f"r{i}"] for i in range(10)]


@pytest.mark.parametrize("priorities", [False, True])
def test_a_retry_is_never_newer_than_the_queue_says(impl: Any, priorities: bool) -> None:
    # Only a retry in line, nothing ever pushed: the newest entry is that retry, a
    # second old, not the last push (none).
    q = impl.RequestQueue(4, priorities=priorities)
    q.park("r", 0, 1, 0, 0, 0, time.monotonic() - 1.0)
    assert q.exhausted is False  # a look: it comes into line
    assert 1.0 <= q.oldest_age() < 1.5 and 1.0 <= q.newest_age() <= q.oldest_age()


def test_a_retry_due_earlier_than_one_ahead_of_it_is_no_older_in_a_fifo_queue(
        impl: Any) -> None:
    # "a" came into line counting from 1 s ago; "b", due 5 s ago but looked at after,
    # comes in behind it: it counts from a's time, so the head is still the oldest.
    q = impl.RequestQueue(8, priorities=False)
    t = time.monotonic()
    q.park("a", 0, 1, 0, 0, 0, t - 1.0)
    assert q.exhausted is False
    q.park("b", 0, 1, 0, 0, 0, t - 5.0)
    assert q.exhausted is False
    assert 1.0 <= q.oldest_age() < 1.5
    assert q.pop_batch(10, timeout=0) == ["a"]
    assert 1.0 <= q.oldest_age() < 1.5
    assert q.pop_batch(10, timeout=0) == ["b"]


def test_with_priorities_a_retry_ages_from_when_it_was_due_whatever_came_since(
        impl: Any) -> None:
    # An urgent push between the retry's due time and the look does not restart the
    # retry's clock: due a second ago, it has waited past max_priority_wait and goes
    # first (the oldest entry is found by a scan with priorities: no order to keep).
    q = impl.RequestQueue(8, priorities=True, max_priority_wait=0.5)
    q.park("retry", 3, 1, 0, 0, 0, time.monotonic() - 1.0)
    q.push("urgent", 0)
    assert q.pop_batch(10, timeout=0) == ["retry"]
    assert q.pop_batch(10, timeout=0) == ["urgent"]


def test_a_closed_queue_still_hands_out_parked_entries(impl: Any) -> None:
    q = impl.RequestQueue(2)
    q.park("retry", 0, 1, 0, 0, 0, time.monotonic() + 0.05)
    q.close()
    assert q.pop_batch(10, timeout=10 * HANG) == ["retry"]
    assert q.pop_batch(10, timeout=10 * HANG) == []


def returns_at_once(fn: Callable[[], Any]) -> Any:
    """fn's result, checking it did not wait (it would wait HANG, or far longer)."""
    started = time.monotonic()
    got = fn()
    assert time.monotonic() - started < HANG / 2
    return got


def test_a_closed_queue_waits_for_no_parked_entry_due_after_its_horizon(impl: Any) -> None:
    q = impl.RequestQueue(4)
    now = time.monotonic()
    q.park("late", 0, 1, 0, 0, 0, now + 1e6)
    q.close(parked_until=now + 60)
    assert returns_at_once(lambda: q.pop_batch(10, timeout=10 * HANG)) == []
    assert q.exhausted
    assert len(q) == 1 and q.parked == 1
    assert q.drain() == ["late"]  # left for the consumer to fail


def test_a_parked_entry_due_within_the_horizon_is_still_waited_for(impl: Any) -> None:
    q = impl.RequestQueue(4)
    now = time.monotonic()
    q.park("soon", 0, 1, 0, 0, 0, now + 0.05)
    q.park("late", 0, 1, 0, 0, 0, now + 1e6)
    q.close(parked_until=now + 60)
    assert not q.exhausted
    assert q.pop_batch(10, timeout=10 * HANG) == ["soon"]
    assert returns_at_once(lambda: q.pop_batch(10, timeout=10 * HANG)) == []
    assert q.exhausted and q.drain() == ["late"]


def test_the_earliest_parked_horizon_given_to_close_counts(impl: Any) -> None:
    q = impl.RequestQueue(4)
    now = time.monotonic()
    q.park("x", 0, 1, 0, 0, 0, now + 100)
    q.close(parked_until=now + 10)
    q.close()                           # none given: the horizon stays
    q.close(parked_until=now + 1000)    # a later one does not extend it
    assert returns_at_once(lambda: q.pop_batch(10, timeout=10 * HANG)) == []
    assert q.exhausted


def test_exhausted_only_once_closed_with_nothing_to_hand_out(impl: Any) -> None:
    q = impl.RequestQueue(4)
    assert not q.exhausted  # open: more may come
    q.push("a")
    q.park("retry", 0, 1, 0, 0, 0, time.monotonic() + 1e6)
    q.close()
    assert not q.exhausted  # "a" to pop, and the retry to wait for (no horizon)
    assert q.pop_batch(10, timeout=0) == ["a"]
    assert not q.exhausted
    assert q.drain() == ["retry"]
    assert q.exhausted


@pytest.mark.parametrize(("value", "error"), [(float("nan"), ValueError), ("soon", TypeError)])
def test_close_refuses_a_parked_horizon_that_is_not_a_number(impl: Any, value: Any,
                                                              error: type) -> None:
    q = impl.RequestQueue(4)
    with pytest.raises(error, match="parked_until"):
        q.close(parked_until=value)


def test_a_park_past_capacity_is_accepted(impl: Any) -> None:
    q = impl.RequestQueue(1)
    q.push("a")
    q.park("retry", 0, 1, 0, 0, 0, 1e12)
    assert len(q) == 2
    assert q.drain() == ["a", "retry"]


# ------------------------------------------------------------------ push_again


def test_push_again_needs_no_room_and_never_waits(impl: Any) -> None:
    q = impl.RequestQueue(1)
    q.push("a")
    with pytest.raises(queue.Full):
        q.push("b", timeout=0)
    q.push_again("b", 0, 1, 0, 0)  # accepted once already: past capacity, at once
    assert (len(q), q.rows, q.pushed) == (2, 2, 2)
    with pytest.raises(queue.Full):
        q.push("c", timeout=0)  # full until both have left
    assert q.pop_batch(10, timeout=0) == ["a", "b"]  # one batch: no solo entry
    q.push("c", timeout=0)


def test_push_again_is_accepted_after_close_and_handed_out(impl: Any) -> None:
    q = impl.RequestQueue(4)
    q.push("a")
    q.close()
    with pytest.raises(impl.QueueClosed):
        q.push("b")
    token = q.push_again("b", 0, 1, 0, 0)
    q.push_again("c", 0, 1, 0, 0)
    assert not q.exhausted and q.pushed == 3
    assert q.cancel(token)
    assert q.pop_batch(10, timeout=10 * HANG) == ["a", "c"]
    assert q.exhausted
    assert returns_at_once(lambda: q.pop_batch(10, timeout=10 * HANG)) == []


def test_push_again_orders_and_expires_as_push_does(impl: Any) -> None:
    q = impl.RequestQueue(4)
    q.push("low", priority=3)
    q.push_again("urgent", 0, 1, 0, 0)
    q.push_again("late", 1, 1, 0, 0, 0, time.monotonic() - 1)
    assert q.take_expired() == ["late"]
    assert q.pop_batch(10, timeout=0) == ["urgent", "low"]


@pytest.mark.parametrize(("kwargs", "exc", "name"),
                         [case for case in BAD_PUSH_ARGUMENTS if "timeout" not in case[0]])
def test_bad_push_again(impl: Any, kwargs: dict[str, Any], exc: type[Exception],
                        name: str) -> None:
    q = impl.RequestQueue(4)
    with pytest.raises(exc, match=name):
        q.push_again("x", **{"priority": 0, "rows": 1, "nbytes": 0, "key": 0, **kwargs})
    assert (len(q), q.rows, q.pushed) == (0, 0, 0)


def test_an_expired_park_goes_to_take_expired(impl: Any) -> None:
    q = impl.RequestQueue(2)
    q.park("retry", 0, 1, 0, 0, 0, 1e12, time.monotonic() - 1)
    assert q.take_expired() == ["retry"]
    assert len(q) == 0


def test_max_priority_wait_serves_an_aged_entry_first(impl: Any) -> None:
    q = impl.RequestQueue(8, True, 0.05)
    q.push("low", 3)
    time.sleep(0.1)   # "low" has now waited past max_priority_wait
    q.push("high", 0)
    q.push("high2", 0)
    assert q.pop_batch(1, timeout=0) == ["low"]
    assert q.pop_batch(10, timeout=0) == ["high", "high2"]
    with pytest.raises(ValueError, match="max_priority_wait"):
        impl.RequestQueue(8, True, -1)


# ------------------------------------------------------------------ spinning (native only)
# A pop that finds the queue empty soon after a push busy-waits for the next one before
# it parks (``spin``): an optimisation of the native queue's waits, not of its semantics,
# so the reference queue has none.


def _spinning_queue(spin: float = 100 * HANG) -> Any:
    q = native_queue.RequestQueue(16)
    q.spin = spin
    q.spin_window = 1e9  # every pop on an empty queue spins (no push needed first)
    return q


@pytest.mark.parametrize("value", [-1e-6, math.nan, math.inf])
@pytest.mark.parametrize("name", ["spin", "spin_window"])
def test_spin_settings_refuse_what_is_not_finite_seconds(name: str, value: float) -> None:
    q = native_queue.RequestQueue(4)
    with pytest.raises(ValueError, match=name):
        setattr(q, name, value)
    with pytest.raises(TypeError, match=name):
        setattr(q, name, "1ms")
    assert (q.spin, q.spin_window) == (0.0, 0.002)  # the defaults: no spinning


def test_a_spinning_pop_takes_a_push_waking_no_parked_consumer() -> None:
    q = _spinning_queue()
    q.spin = 0.0
    parked = Worker(q.pop_batch, 10, timeout=10 * HANG)
    blocked(q, ITEMS)  # parked without spinning
    q.spin = 100 * HANG
    spinning = Worker(q.pop_batch, 10, timeout=10 * HANG)
    wait_until(lambda: q._spins() == (1, 1), "the second pop spinning")
    assert q._waiters()[ITEMS] == 1  # a spinning pop is not on the waiters' stack
    q.push("x")
    assert spinning.outcome() == ["x"]  # long before its spin would end
    assert q._spins() == (0, 1)
    assert q._waiters()[ITEMS] == 1 and parked.is_alive()  # the push woke nobody
    q.close()
    assert parked.outcome() == []


def test_a_spin_ends_at_the_pops_timeout() -> None:
    q = _spinning_queue()
    assert q.pop_batch(10, timeout=0.05) == []  # not at the spin's end
    assert q._spins() == (0, 1)


def test_a_pop_spins_once_then_parks_and_a_push_wakes_it() -> None:
    q = _spinning_queue(spin=0.001)
    popping = Worker(q.pop_batch, 10, timeout=10 * HANG)
    blocked(q, ITEMS)  # the spin ended without a push: parked
    assert q._spins() == (0, 1)
    q.push("x")
    assert popping.outcome() == ["x"]
    assert q._spins() == (0, 1)


def test_a_pop_long_after_the_last_push_parks_without_spinning() -> None:
    q = _spinning_queue()
    q.spin_window = 0.0
    q.push("a")
    assert q.pop_batch(10) == ["a"]
    popping = Worker(q.pop_batch, 10, timeout=10 * HANG)
    blocked(q, ITEMS)
    q.push("b")
    assert popping.outcome() == ["b"]
    assert q._spins() == (0, 0)


def test_a_paused_queue_is_not_spun_on() -> None:
    q = _spinning_queue()
    q.pause()
    popping = Worker(q.pop_batch, 10, timeout=10 * HANG)
    blocked(q, ITEMS)
    q.push("x")
    q.resume()
    assert popping.outcome() == ["x"]
    assert q._spins() == (0, 0)


def test_two_spinning_pops_share_one_push_and_the_other_parks() -> None:
    q = _spinning_queue()
    pops = [Worker(q.pop_batch, 10, timeout=10 * HANG) for _ in range(2)]
    wait_until(lambda: q._spins() == (2, 2), "both pops spinning")
    q.push("x")
    blocked(q, ITEMS)  # one took it; the other, having spun once, parked
    assert q._spins() == (0, 2)
    q.push("y")
    assert sorted(w.outcome()[0] for w in pops) == ["x", "y"]


@pytest.mark.parametrize("how", ["close", "retarget"])
def test_what_ends_every_wait_ends_a_spin(how: str) -> None:
    q = _spinning_queue(spin=1000.0)
    retargets = q.retargets
    popping = Worker(q.pop_batch, 10, timeout=100.0, retargets=retargets)
    wait_until(lambda: q._spins() == (1, 1), "the pop spinning")
    getattr(q, how)()
    assert popping.outcome() == []  # at once, not after the spin or the timeout
    assert q._spins() == (0, 1)


# A pop that a spin caught waits, without the GIL, for the thread that pushed to let go
# of it (to wait for its result: batchproc._native.waiting's let-go count) before taking
# it back: asked for while the pusher holds it, the GIL would park the pop, to be woken
# (a thread wake-up). Only while such waits see their let-go.


@pytest.fixture
def pop_linger() -> Any:
    """Set the longest wait of a pop for its pusher's let-go, for one test."""
    yield native_queue._set_pop_linger
    native_queue._set_pop_linger(native_queue.POP_LINGER)


def _let_go_of_the_gil() -> None:
    """Drop the GIL to wait, as a consumer does (a pop that parks on another queue)."""
    assert native_queue.RequestQueue(1).pop_batch(1, timeout=1e-3) == []


def test_a_pop_a_spin_caught_waits_for_its_pusher_to_let_go_of_the_gil(
        pop_linger: Any) -> None:
    pop_linger(HANG * 10)  # only a let-go ends the wait here
    q = _spinning_queue()
    popping = Worker(q.pop_batch, 10, timeout=10 * HANG)
    wait_until(lambda: q._spins() == (1, 1), "the pop spinning")
    q.push("x")
    wait_until(lambda: q._lingers()[0] == 1, "the pop waiting for a let-go")
    assert popping.is_alive()  # its item taken, it waits
    _let_go_of_the_gil()
    assert popping.outcome() == ["x"]
    assert q._lingers() == (1, 1, 1.0)


def test_a_pop_that_parked_does_not_wait_for_a_let_go(pop_linger: Any) -> None:
    pop_linger(HANG * 10)
    q = native_queue.RequestQueue(16)
    popping = Worker(q.pop_batch, 10, timeout=10 * HANG)
    blocked(q, ITEMS)
    q.push("x")
    assert popping.outcome() == ["x"]
    assert q._lingers() == (0, 0, 1.0)


def test_pops_stop_waiting_for_let_gos_that_do_not_come_but_one_in_128(
        pop_linger: Any) -> None:
    """Each wait that times out moves the share of waits that saw their let-go 1/8 of
    the way down: after 6 in a row it is under half, and only one pop in 128 waits."""
    pop_linger(5e-4)
    q = _spinning_queue()
    for i in range(20):
        popping = Worker(q.pop_batch, 10, timeout=10 * HANG)
        wait_until(lambda: q._spins()[0] == 1, "the pop spinning")
        q.push(i)  # and no let-go: this thread waits on a plain lock (join)
        assert popping.outcome() == [i]
    score = 256
    for _ in range(7):
        score -= -(-score // 8)
    assert q._lingers() == (7, 0, score / 256)  # 6 in a row, then the first probe


def _a_push_while_a_stale_pop_still_counts_as_spinning() -> tuple[bool, Any, Worker]:
    """One try at: P parked, S spinning in a pop planned before a ``retarget()``, which
    ends S's spin; ``x`` pushed into the empty queue before S takes the queue's lock
    back (S kept off the CPU: this thread's CPU, at idle priority). (whether S still
    counted as spinning at the push, the queue, P)."""
    import os

    cpus = sorted(os.sched_getaffinity(0))
    mine = os.sched_getaffinity(0)
    q = native_queue.RequestQueue(16)
    parked = Worker(q.pop_batch, 10, timeout=100.0)  # past outcome()'s wait: a lost wake
    blocked(q, ITEMS)
    q.spin, q.spin_window = 1000.0, 1e9
    stale = Worker(q.pop_batch, 10, timeout=10 * HANG, retargets=q.retargets)
    wait_until(lambda: q._spins() == (1, 1), "the planned pop spinning")
    q.spin = 0.0  # P, woken by the retarget, parks again without spinning
    os.sched_setaffinity(stale.native_id, {cpus[0]})
    os.sched_setscheduler(stale.native_id, os.SCHED_IDLE, os.sched_param(0))
    os.sched_setaffinity(0, {cpus[0]})
    try:
        q.retarget()
        while q._waiters()[ITEMS] < 1:  # busy: the stale pop stays off the CPU
            pass
        counted = q._spins()[0] == 1
        q.push("x")
    finally:
        os.sched_setaffinity(0, mine)
    assert stale.outcome() == []  # stale: it takes nothing
    return counted, q, parked


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setscheduler")
                    or len(__import__("os").sched_getaffinity(0)) < 2,
                    reason="needs Linux scheduling calls and two CPUs")
def test_a_push_a_stale_spinning_pop_was_counted_on_reaches_a_parked_consumer() -> None:
    # The push sees a spinner and wakes nobody; the spinner, stale, leaves without it:
    # it must hand the wake on, or the entry waits for the parked consumer's timeout.
    # Tries go on for a while, not a number of times: the setup needs this thread's CPU
    # to itself, which another process's load can take for a spell of many tries.
    until = time.monotonic() + 6 * HANG
    while True:
        counted, q, parked = _a_push_while_a_stale_pop_still_counts_as_spinning()
        if counted or time.monotonic() > until:
            break
        q.close()  # the stale pop took the lock back first: try again
        parked.outcome()
    assert counted, "the stale pop never stayed off the CPU long enough"
    assert parked.outcome() == ["x"]


# ------------------------------------------------------------------ the watch's wait


def test_await_late_returns_once_an_entry_has_waited_the_age() -> None:
    q = native_queue.RequestQueue(4)
    q.push("a")
    pushed = time.monotonic()
    assert q.await_late(0.05, 0.0, HANG, q.watch_wakes, 0.005) is True
    assert time.monotonic() - pushed >= 0.05
    assert q.await_late(0.05, 0.0, HANG, q.watch_wakes, 0.005) is True  # still late


def test_await_late_waits_on_past_an_entry_popped_before_it_was_late() -> None:
    # The oldest entry leaves before its age: the wait goes on (to its timeout), it does
    # not report the entry, nor spin while the queue is empty.
    q = native_queue.RequestQueue(4)
    q.push("a")
    popper = Worker(q.pop_batch, 10, timeout=10 * HANG)
    assert popper.outcome() == ["a"]
    looks = q._watch_looks_count()
    began = time.monotonic()
    assert q.await_late(0.02, 0.0, 0.2, q.watch_wakes, 0.02) is False
    waited = time.monotonic() - began
    assert waited >= 0.2
    assert 0 < q._watch_looks_count() - looks <= waited / 0.02 + 2


def test_await_late_looks_first_after_first_look() -> None:
    q = native_queue.RequestQueue(4)
    q.push("a")
    began = time.monotonic()
    assert q.await_late(0.0, 0.1, HANG, q.watch_wakes, 0.005) is True
    assert time.monotonic() - began >= 0.1


def test_await_late_ends_at_its_timeout_before_its_first_look() -> None:
    # A timeout shorter than the first look ends the wait (it spun until the first look).
    q = native_queue.RequestQueue(4)
    q.push("a")
    watcher = Worker(q.await_late, 0.0, 60.0, 0.05, q.watch_wakes, 0.005)
    assert watcher.outcome() is False
    assert q._watch_looks_count() == 0


def test_await_late_sees_an_entry_pushed_while_it_waits() -> None:
    q = native_queue.RequestQueue(4)
    watcher = Worker(q.await_late, 0.01, 0.0, HANG, q.watch_wakes, 0.01)
    wait_until(lambda: q._watch_looks_count() >= 1, "the watch's first look")
    q.push("a")
    assert watcher.outcome() is True


@pytest.mark.parametrize("wake", ["wake_watch", "close", "pause", "resume"])
def test_a_wake_ends_an_await_late_and_one_since_it_was_read(wake: str) -> None:
    q = native_queue.RequestQueue(4)
    since = q.watch_wakes
    # It looks at once, then waits (the lock let go only by the wait): a wake that
    # takes the lock after the look comes during the wait.
    watcher = Worker(q.await_late, 60.0, 0.0, None, since, 60.0)
    wait_until(lambda: q._watch_looks_count() == 1, "the watch waiting")
    getattr(q, wake)()
    assert watcher.outcome() is False
    assert q.watch_wakes == since + 1
    # A wake between reading the count and the wait: the wait returns at once.
    assert q.await_late(60.0, 60.0, None, since, 60.0) is False


@pytest.mark.parametrize(("args", "error"), [
    ((float("nan"), 0.0, 1.0, 0, 0.01), ValueError),
    ((-1.0, 0.0, 1.0, 0, 0.01), ValueError),
    ((0.01, -1.0, 1.0, 0, 0.01), ValueError),
    ((0.01, 0.0, -1.0, 0, 0.01), ValueError),
    ((0.01, 0.0, 1.0, 0, 0.0), ValueError),
    ((0.01, 0.0, 1.0, 0, float("inf")), ValueError),
    (("1", 0.0, 1.0, 0, 0.01), TypeError),
    ((0.01, 0.0, 1.0, -1, 0.01), ValueError),
    ((0.01, 0.0, 1.0, 2**64, 0.01), ValueError),
    ((0.01, 0.0, 1.0, 0.0, 0.01), TypeError),
    ((0.01, 0.0, 1.0, None, 0.01), TypeError),
])
def test_await_late_rejects_bad_arguments(args: tuple[Any, ...], error: type) -> None:
    with pytest.raises(error):
        native_queue.RequestQueue(4).await_late(*args)


@pytest.mark.parametrize("since", [1.5, -1, 2**64, None])
def test_await_late_names_a_bad_since(since: Any) -> None:
    # A float was cut to an int without a word (1.5 waited as 1: a wake count it never
    # had, so the wait ended at once); the others raised without naming the argument.
    q = native_queue.RequestQueue(4)
    with pytest.raises((TypeError, ValueError), match="since"):
        q.await_late(0.01, 0.0, 1.0, since, 0.01)

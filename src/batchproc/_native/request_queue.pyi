"""Bounded request heap in front of the batch dispatcher (compiled: request_queue.pyx)."""

from typing import Any, Final, SupportsFloat, SupportsIndex, final

MAX_CAPACITY: Final[int]
"""The most entries a queue may hold (2**24): ``capacity``'s upper bound."""

MAX_COUNT: Final[int]
"""The most rows, bytes or sequence length one entry may count for (2**39 - 1)."""

POP_LINGER: Final[float]
"""The longest, in seconds, a pop that a spin caught waits for its pusher to let go of
the GIL before it takes the GIL back."""

def _set_pop_linger(seconds: float) -> None:
    """Test hook: the longest a pop that a spin caught waits for a let-go."""

def _set_wave_pace(pace: float) -> float:
    """Test hook: how much faster than the carried rows a wave must come; returns the
    pace it replaces."""

def priority_arg(priority: SupportsIndex) -> int:
    """``priority`` as ``RequestQueue.push`` reads it, as an int in [0, 2**31-1];
    ``TypeError`` for what is not an integer, ``ValueError`` out of range."""

class QueueClosed(RuntimeError):
    """Raised by ``RequestQueue.push`` once the queue is closed."""

@final
class RequestQueue:
    """Bounded queue of requests, ordered by (priority, arrival), popped a batch at a time."""

    def __init__(
        self,
        capacity: SupportsIndex,
        priorities: bool = True,
        max_priority_wait: SupportsFloat | SupportsIndex | None = None,
    ) -> None:
        """``max_priority_wait`` (seconds, None: off): with priorities, an entry queued
        longer than this is served before every entry that has not, by arrival."""
    @property
    def spin(self) -> float:
        """Seconds a pop on the empty queue busy-waits for a push before it parks, if
        the last push was at most ``spin_window`` seconds ago (0.0: never). A pop that a
        spin caught then waits up to ``POP_LINGER`` for the pusher to let go of the GIL
        (while most such waits see it)."""
    @spin.setter
    def spin(self, value: SupportsFloat) -> None: ...
    @property
    def spin_window(self) -> float: ...
    @spin_window.setter
    def spin_window(self, value: SupportsFloat) -> None: ...
    @property
    def capacity(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def rows(self) -> int: ...
    @property
    def room(self) -> int:
        """How many more entries ``push`` takes now: ``capacity`` less every slot in use
        (entries queued or parked, expired ones not yet taken, pushes and pops in
        progress); 0 while parked retries hold it past capacity."""
    def __len__(self) -> int: ...
    def push(
        self,
        item: object,
        priority: SupportsIndex = 0,
        rows: SupportsIndex = 1,
        nbytes: SupportsIndex = 0,
        key: SupportsIndex = 0,
        timeout: SupportsFloat | SupportsIndex | None = None,
        length: SupportsIndex = 0,
        deadline: SupportsFloat | SupportsIndex | None = None,
    ) -> int:
        """``length``: the entry's sequence length (0 .. 2**39-1, 0 if not a sequence),
        weighed against ``pop_batch``'s ``max_tokens``. ``deadline``: when (monotonic
        clock) it expires if still queued; then ``take_expired()`` hands it out."""

    def push_again(
        self,
        item: object,
        priority: SupportsIndex,
        rows: SupportsIndex,
        nbytes: SupportsIndex,
        key: SupportsIndex,
        length: SupportsIndex = 0,
        deadline: SupportsFloat | SupportsIndex | None = None,
    ) -> int:
        """``push`` for a request accepted once already: never waits, may go past
        ``capacity``, accepted after ``close()`` too; joins batches as any entry does."""

    def park(
        self,
        item: object,
        priority: SupportsIndex,
        rows: SupportsIndex,
        nbytes: SupportsIndex,
        key: SupportsIndex,
        length: SupportsIndex,
        not_before: SupportsFloat | SupportsIndex,
        deadline: SupportsFloat | SupportsIndex | None = None,
    ) -> None:
        """Queue ``item`` as a batch of its own once ``not_before`` (monotonic) comes,
        counted as pushed then (in a FIFO queue, never older than an entry ahead of it);
        retries due together come back in the order parked."""

    def take_expired(self, timeout: SupportsFloat | SupportsIndex | None = 0.0) -> list[Any]:
        """Items whose deadline passed while queued or parked; waits up to ``timeout``."""

    @property
    def parked(self) -> int: ...

    def pop_batch(
        self,
        max_rows: SupportsIndex,
        max_bytes: SupportsIndex = 0,
        *,
        max_tokens: SupportsIndex = 0,
        fill_rows: SupportsIndex = 0,
        max_wait: SupportsFloat | SupportsIndex = 0.0,
        idle_gap: SupportsFloat | SupportsIndex | None = None,
        fill_time: SupportsFloat | SupportsIndex = 0.0,
        timeout: SupportsFloat | SupportsIndex | None = None,
        retargets: SupportsIndex | None = None,
    ) -> list[Any]:
        """Caps: ``max_rows`` (>= 1), ``max_bytes`` and ``max_tokens`` (<= 0: none), where a
        batch's tokens are its rows times the longest ``length`` among its entries. The
        head is always taken; the first entry of its key that does not fit ends the batch.
        ``fill_rows`` counts rows, not tokens. ``retargets``: ``retargets`` as read before
        the sizes were chosen; ``[]`` once ``retarget()`` was called since."""

    def cancel(self, token: SupportsIndex) -> bool: ...
    def drain(self) -> list[Any]: ...
    @property
    def exhausted(self) -> bool: ...
    def close(self, parked_until: float | None = None) -> None: ...
    def begin_batch(self) -> None: ...
    def answer_batch(self) -> None: ...
    def end_batch(self) -> None: ...
    @property
    def pushed(self) -> int: ...
    @property
    def retargets(self) -> int: ...
    def retarget(self) -> None: ...
    @property
    def in_flight(self) -> int: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    @property
    def paused(self) -> bool: ...
    def oldest_age(self) -> float: ...
    def newest_age(self) -> float: ...
    def await_late(self, age: float, first_look: float, timeout: float | None,
                   since: int, period: float) -> bool:
        """Wait, the GIL released, until a queued entry has waited ``age`` seconds (looking
        first after ``first_look``, then whenever one could be; while none is queued,
        every ``period`` or when a parked one will have), at most ``timeout``; at once
        after ``wake_watch()``, ``close()``, ``pause()`` or ``resume()`` since ``since``
        (``watch_wakes``). True if one is that late now."""
    @property
    def watch_wakes(self) -> int: ...
    def wake_watch(self) -> None: ...
    def _watch_looks_count(self) -> int:
        """Test hook: how many times ``await_late`` looked at the queue."""
    def _spins(self) -> tuple[int, int]:
        """Test hook: (pops spinning now, pops that spun so far)."""
    def _lingers(self) -> tuple[int, int, float]:
        """Test hook: (pops that a spin caught and that then waited for their pusher's
        let-go of the GIL, those that saw it, the share of recent waits that saw it)."""
    def _item_wakes(self) -> int:
        """Test hook: how many times a consumer waiting for an entry was chosen and woken."""
    def _try_len(self) -> int | None: ...
    def _waiters(self) -> tuple[int, int, int]:
        """Test hook: threads blocked in (pop for an entry, pop for a fill, push for room)."""

"""Log lines that could repeat once per request or per call, limited to one per interval.

A model failing or hanging on every call must cost a service a line every few seconds,
not one per call: a flood of identical lines hides everything else in its log and costs
the workers time. ``LogLimiter`` lets the first line of each kind through at once, then
at most one per ``interval`` seconds, and tells that line how many it stands for; what
it held back when no line of its kind comes again, the owner logs as a summary at the
supervisor's tick and at stop (``held``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)


class Admitted(NamedTuple):
    """A line let through: how many of its kind were left out since the last line of that
    kind (0 for the first), and how long ago that line was (seconds)."""

    left_out: int
    since: float


class LogLimiter(Generic[K]):
    """At most one line per kind (a hashable key) per ``interval`` seconds; what it
    held back is told by the next line of its kind, or by a summary line (``held``).

    Thread-safe: workers and the supervisor log through one limiter.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (time of its last line, lines left out since, time of the last of those)
        self._last: dict[K, tuple[float, int, float]] = {}

    def admit(self, key: K) -> Admitted | None:
        """``Admitted`` if a line of kind ``key`` may be logged now, else None (it is
        counted, and the next line of its kind says so)."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self.interval:
                self._last[key] = (last[0], last[1] + 1, now)
                return None
            self._last[key] = (now, 0, now)
        return Admitted(0, 0.0) if last is None else Admitted(last[1], now - last[0])

    def held(self, final: bool = False) -> list[tuple[K, Admitted]]:
        """The kinds whose lines left out no later line of theirs will tell: none came
        for an interval after the last of them (or, when ``final``, the logging source
        stops). Each with how many and since its last line; the caller logs one summary
        line for each. A kind still coming is left to its next line, which names what
        happened; after a summary, the next line of its kind is let through as a first."""
        now = self._clock()
        due = []
        with self._lock:
            for key, (at, left_out, seen) in list(self._last.items()):
                if left_out and (final or now - seen >= self.interval):
                    due.append((key, Admitted(left_out, max(now - at, 0.0))))
                    del self._last[key]
        return due


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 request``, ``2 requests``, ``1,024 requests``; ``nouns`` where the plural
    is not ``noun`` + s (``plural(2, "batch", "batches")``)."""
    if count == 1:
        return f"1 {noun}"
    return f"{count:,} {noun + 's' if nouns is None else nouns}"


def seconds(value: float) -> str:
    """Seconds to the millisecond (``0.250 s``, ``10.012 s``: a time past a limit reads
    past it), and a time under a millisecond to three significant digits, so that it
    does not read as none (``0.0001 s``)."""
    if value == 0.0 or not abs(value) < 0.001:
        return f"{value:.3f} s"
    return f"{value:.3g} s"

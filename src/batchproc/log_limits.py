"""Log lines that could repeat once per request or per call, limited to one per interval.

A model failing or hanging on every call must cost a service a line every few seconds,
not one per call: a flood of identical lines hides everything else in its log and costs
the workers time. ``LogLimiter`` lets the first line of each kind through at once, then
at most one per ``interval`` seconds, and tells that line how many it stands for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import NamedTuple


class Admitted(NamedTuple):
    """A line let through: how many of its kind were left out since the last line of that
    kind (0 for the first), and how long ago that line was (seconds)."""

    left_out: int
    since: float


class LogLimiter:
    """At most one line per kind (any hashable key) per ``interval`` seconds.

    Thread-safe: workers and the supervisor log through one limiter.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (time of its last line, lines left out since)
        self._last: dict[Hashable, tuple[float, int]] = {}

    def admit(self, key: Hashable) -> Admitted | None:
        """``Admitted`` if a line of kind ``key`` may be logged now, else None (it is
        counted, and the next line of its kind says so)."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self.interval:
                self._last[key] = (last[0], last[1] + 1)
                return None
            self._last[key] = (now, 0)
        return Admitted(0, 0.0) if last is None else Admitted(last[1], now - last[0])


def plural(count: int, noun: str) -> str:
    """``1 request``, ``2 requests``, ``1,024 requests``."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def seconds(value: float) -> str:
    """Seconds with three significant digits, so a short time does not read as 0.000 s:
    ``0.0001 s``, ``0.25 s``, ``1.5 s``, ``30 s``."""
    return f"{value:.3g} s" if value < 1000 else f"{value:.0f} s"

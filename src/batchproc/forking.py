"""After ``os.fork()``: a processor started before the fork refuses requests in the child.

A fork copies only the thread that called it. The child gets the processor's objects, its
queue and its locks (possibly held by a thread that no longer exists), but none of its
workers: a request queued there would never complete. So every processor registers here
when it starts, and in a forked child each one is marked forked: from then on it refuses
requests with ``ProcessorForkedError``, at the cost of one flag check per request.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class _Forkable(Protocol):
    def _forked_in_child(self) -> None: ...


_started: weakref.WeakSet[_Forkable] = weakref.WeakSet()


def track(processor: _Forkable) -> None:
    """Mark ``processor`` forked in any child forked from now on."""
    _started.add(processor)


def _after_fork_in_child() -> None:
    # The child runs only this thread: nothing else touches these objects meanwhile.
    processors = list(_started)
    _started.clear()
    for processor in processors:
        processor._forked_in_child()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)

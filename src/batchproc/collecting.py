"""Whether this thread is running a garbage collection.

A collection starts at any allocation, on any thread, maybe one inside a lock; the
finalizers it runs there (a dropped ``map`` in a reference cycle, an ``apredict``
coroutine whose loop was closed under it) may not take that lock. Code run by one asks
:func:`on_this_thread` and hands its locking work to the processor's supervisor
(``BatchProcessor._run_soon``) instead.
"""

from __future__ import annotations

import gc
import threading

# The thread running a collection, while one runs (gc.callbacks: one collection at a
# time, its callbacks on the collecting thread).
_collecting_thread: int | None = None


def _note(phase: str, info: dict[str, int]) -> None:
    global _collecting_thread
    _collecting_thread = threading.get_ident() if phase == "start" else None


def on_this_thread() -> bool:
    """Whether the calling thread is inside a collection."""
    return _collecting_thread == threading.get_ident()


# Followed from import on: a user that had to ask first could forget to.
gc.callbacks.append(_note)

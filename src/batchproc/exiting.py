"""Stopping what still runs when the interpreter exits.

A processor's workers are daemon threads (one stuck in a model call must never keep the
interpreter alive), so work still queued at exit would die with them unnoticed. Instead,
as ``concurrent.futures.ThreadPoolExecutor`` does, an ``atexit`` hook stops every running
``BatchProcessor`` and every ``@batch`` function: their queued work is finished, within
``EXIT_TIMEOUT`` seconds for all of them together, and what is left then fails with
``ProcessorStoppedError`` as in ``stop()``. A Ctrl-C during that wait gives up at once on
what is left (it fails with ``ProcessorStoppedError``), and the interpreter exits.

Held weakly, and stopped in the order registered: a decorated function comes before the
processor it starts, so its ``stop()`` (final) is what stops that processor.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Any

logger = logging.getLogger(__name__)

# The most seconds the exit hook spends stopping everything registered (stop()'s default
# timeout): a model that hangs delays exit by this much, never more.
EXIT_TIMEOUT = 5.0

_lock = threading.Lock()
# Objects with a ``stop(timeout)`` method, in the order registered (the dict keeps it).
_registered: weakref.WeakKeyDictionary[Any, None] = weakref.WeakKeyDictionary()


def stop_at_exit(obj: Any) -> None:
    """Call ``obj.stop(timeout)`` at interpreter exit, unless ``forget(obj)`` was called
    first or ``obj`` was collected."""
    with _lock:
        _registered[obj] = None


def forget(obj: Any) -> None:
    """Take ``obj`` off the list (it stopped by itself). Safe if it is not on it."""
    with _lock:
        _registered.pop(obj, None)


def registered() -> list[Any]:
    """What the exit hook would stop now, in its order."""
    with _lock:
        return list(_registered)


@atexit.register
def stop_all() -> None:
    """Stop everything registered, within ``EXIT_TIMEOUT`` seconds in all."""
    deadline = time.monotonic() + EXIT_TIMEOUT
    for obj in registered():
        try:
            obj.stop(max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            # Ctrl-C during the drain: the interrupted stop gave up on its work; the
            # others give up on theirs at once, so every accepted request still ends.
            deadline = 0.0
            logger.warning("interrupted at interpreter exit: queued work given up "
                           "(ProcessorStoppedError)")
        except Exception:  # one failing stop must not keep the others running
            logger.exception("stopping %r at interpreter exit failed", obj)

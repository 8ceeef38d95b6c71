"""Stopping what still runs when the interpreter exits.

A processor's workers are daemon threads (one stuck in a model call must never keep the
interpreter alive), so work still queued at exit would die with them unnoticed. Instead,
as ``concurrent.futures.ThreadPoolExecutor`` does, an ``atexit`` hook stops every running
``BatchProcessor`` and every ``@batch`` function. It runs once the interpreter has
waited for its non-daemon threads (an executor's own hook included, which finishes the
tasks queued on it): a thread that goes on serving after the main thread returned (a
server loop, an executor's queued tasks) is still served; one that waits on a result
waits as for anything else, until its call returns or ``item_timeout`` fails it, and on
a paused processor until it is resumed or stopped. Their queued work is finished, within
``EXIT_TIMEOUT`` seconds for all of them together, and what is left then fails with
``ProcessorStoppedError`` as in ``stop()``. A Ctrl-C (or any exception a signal handler
raises), however often, gives up at once on what is left (it fails with
``ProcessorStoppedError``); the stops run on a helper thread (``shielded``) so that no
interrupt can cut them short. The interpreter then exits with the status it had: a hook
cannot change it.

Held weakly, and stopped in the order registered: a decorated function comes before the
processor it starts, so its ``stop()`` (final) is what stops that processor.
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
import time
import weakref
from typing import Any

from . import shielded

logger = logging.getLogger(__name__)

# The most seconds the exit hook spends stopping everything registered (stop()'s default
# timeout): a model that hangs delays exit by this much, never more.
EXIT_TIMEOUT = 5.0

_lock = threading.Lock()
_has_run = False  # the exit hook began
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


def has_run() -> bool:
    """Whether the exit hook has begun: what would start a processor now must not."""
    return _has_run


def registered() -> list[Any]:
    """What the exit hook would stop now, in its order."""
    with _lock:
        return list(_registered)


@atexit.register
def stop_all() -> None:
    """Stop everything registered, within ``EXIT_TIMEOUT`` seconds in all.

    Interrupted (Ctrl-C), what is left is given up at once and everything is still
    stopped; the interrupt is logged, not raised: an ``atexit`` hook's exception (a
    ``SystemExit`` too) is only printed as ignored and cannot change the exit status."""
    global _has_run
    _has_run = True
    interrupted: str | None = None
    deadline = time.monotonic() + EXIT_TIMEOUT
    while True:
        try:
            # A done-callback that blocks cannot hold the exit past the deadline (or,
            # once interrupted, past shielded.GRACE): the stops go on in the background.
            shielded.run(functools.partial(_stop_registered, interrupted is not None),
                         name="batchproc-exit",
                         wait_until=deadline if interrupted is None else time.monotonic())
            break
        except BaseException as exc:
            # An interrupt, raised once the stops were done, or before they began: run
            # them again, giving up at once (with nothing left to stop, a no-op).
            interrupted = type(exc).__name__
    if interrupted is not None:
        logger.warning("interrupted at interpreter exit (%s): queued work given up "
                       "(ProcessorStoppedError)", interrupted)


# Held while the stops run: a run again after an interrupt that ended the hook's wait
# early (the stops it began have taken the objects off the list) waits for them.
_stopping = threading.Lock()


def _stop_registered(give_up: bool, shield: shielded.Shield) -> None:
    with _stopping:
        _stop_each(give_up, shield)


def _stop_each(give_up: bool, shield: shielded.Shield) -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT
    for obj in registered():
        # Once interrupted, the others give up at once too (an interrupt during a stop
        # reaches it through the shield they share).
        if give_up or shield.interrupted:
            remaining = 0.0
        else:
            remaining = max(0.0, deadline - time.monotonic())
        try:
            obj.stop(remaining)
        except Exception:  # one failing stop must not keep the others running
            logger.exception("stopping %r at interpreter exit failed", obj)

"""Completing a batch's asyncio futures on their loop, and waking their awaiters in the
same pass.

When an asyncio future completes, asyncio schedules each of its done-callbacks (for an
awaiting task, the task's wake-up) as a separate ``Handle`` with ``loop.call_soon``, and
a later pass of the loop runs each one: per result, a ``call_soon``, a ``Handle``
object and a turn of the loop, in Python, on the one thread that runs every task. A
flush that completes a whole batch's futures (``aio.LoopChannel``) is already such a
turn of the loop, so it runs each future's callbacks itself, right after completing it,
each in its own context, as ``Handle._run`` would (asyncio's ``events.py``): an exception
from a callback goes to the loop's exception handler, and ``KeyboardInterrupt`` or
``SystemExit`` goes on out of the loop, with what it left undone (the rest of this
future's callbacks, the rest of the batch) handed to asyncio first, as usual.

A loop in debug mode gets asyncio's own way (its ``Handle`` records where each callback
was scheduled and times it), as does an asyncio whose futures do not show their
callbacks (``Future._callbacks``, private to asyncio: read here, never written).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import Any

from .errors import for_callers

Outcome = tuple["asyncio.Future[Any]", bool, Any]  # (future, ok, result or exception)

_CALLBACKS_READABLE = hasattr(asyncio.Future, "_callbacks")


def complete(loop: asyncio.AbstractEventLoop | None, outcomes: list[Outcome]) -> None:
    """On ``loop``'s thread: complete each ``(future, ok, value)`` of ``outcomes`` not done
    yet (cancelled by its awaiter meanwhile) with ``value``, its result if ``ok`` else its
    exception, and run its done-callbacks now. ``loop`` None (gone) or in debug mode, or
    a task of it running (a task's wake-up cannot run inside another task): asyncio
    schedules the callbacks, as ``set_result`` does."""
    pending = iter(outcomes)
    if (loop is None or not _CALLBACKS_READABLE or loop.get_debug()
            or asyncio.current_task(loop) is not None):
        _complete_and_schedule(pending)
        return
    try:
        for future, ok, value in pending:
            if future.done():
                continue
            # A copy: removing them below may edit the future's own list.
            callbacks = tuple(future._callbacks or ())
            if callbacks:
                for callback, _ in callbacks:
                    future.remove_done_callback(callback)
            _settle(future, ok, value)
            if callbacks:
                _run(loop, future, callbacks)
    except BaseException:
        _complete_and_schedule(pending)
        raise


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if ok:
        future.set_result(value)
    else:
        # An asyncio future refuses a StopIteration, and a CancelledError would read as
        # the awaiting task's own cancellation (asyncio, TaskGroups and servers would
        # treat it so).
        future.set_exception(for_callers(value))


def _complete_and_schedule(pending: Iterator[Outcome]) -> None:
    for future, ok, value in pending:
        if not future.done():
            _settle(future, ok, value)


def _run(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any],
         callbacks: Iterable[tuple[Any, Any]]) -> None:
    """Run ``future``'s done-callbacks, as a ``Handle`` each would."""
    left = iter(callbacks)
    try:
        for callback, context in left:
            try:
                context.run(callback, future)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                loop.call_exception_handler({
                    "message": f"Exception in callback {callback!r}({future!r})",
                    "exception": exc,
                    "future": future,
                })
    except BaseException:
        for callback, context in left:
            loop.call_soon(callback, future, context=context)
        raise

"""Completing a batch's asyncio futures on their loop, and waking their awaiters in the
same pass.

When an asyncio future completes, asyncio schedules each of its done-callbacks (for an
awaiting task, the task's wake-up) with ``loop.call_soon``: per result, a ``Handle``
made and queued in Python, and run on the loop's next turn. A flush that completes a
whole batch's futures (``aio.LoopChannel``) is already a callback of the loop, so it
runs their callbacks itself: it first completes every future of the batch (so an
awaiter sees all of them done, as with ``set_result``), then runs each one's callbacks
in order, each in its own context, as ``Handle._run`` would (asyncio's ``events.py``).

What asyncio's way gives and this keeps:

* an exception from a callback goes to the loop's exception handler, with the handle
  asyncio would have made for it, in the callback's context (where asyncio on CPython
  3.12+ and uvloop run it; asyncio before 3.12 ran it in the loop's own);
* ``KeyboardInterrupt`` or ``SystemExit`` goes on out of the loop, the callbacks not run
  yet handed to ``call_soon`` first;
* a callback that runs the loop again (a nested loop: ``nest_asyncio``) finds the
  callbacks not run yet in the loop's queue: a sentinel queued before the first one
  hands them over if the loop turns before they are all run.

A loop in debug mode gets asyncio's own way (its handles record where each callback was
scheduled and time it), as does a call from inside a running task (a task's wake-up
cannot run inside another task) and an asyncio whose futures do not show their callbacks
(``Future._callbacks``, private to asyncio: read here, never written).
"""

from __future__ import annotations

import asyncio
import functools
import types
from asyncio import format_helpers
from collections import deque
from collections.abc import Callable
from contextvars import Context
from typing import Any

from .errors import for_callers

Outcome = tuple["asyncio.Future[Any]", bool, Any]  # (future, ok, result or exception)
_Callback = tuple[Callable[..., Any], Context, "asyncio.Future[Any]"]

_CALLBACKS_READABLE = hasattr(asyncio.Future, "_callbacks")
# remove_done_callback compares the future's callbacks with ``==``: the flush takes them
# off only where every one of them is of a type whose equality runs no code of anyone
# else's (functions, C functions such as a task's wake-up, partials): an object with
# its own ``__eq__`` could raise, or stand for another. A future with any other
# callback is left to asyncio.
_DETACHABLE = frozenset({types.FunctionType, types.BuiltinFunctionType, functools.partial})
# How asyncio names a callback in its error messages (with its source line).
_format_callback_source = getattr(format_helpers, "_format_callback_source",
                                  lambda func, args: repr(func))


def complete(loop: asyncio.AbstractEventLoop | None, outcomes: list[Outcome]) -> None:
    """On ``loop``'s thread, from a callback of it: complete each ``(future, ok, value)``
    of ``outcomes`` not done yet (cancelled by its awaiter meanwhile) with ``value``, its
    result if ``ok`` else its exception, then run their done-callbacks. ``loop`` None
    (gone) or in debug mode, or a task of it running: asyncio schedules the callbacks,
    as ``set_result`` does."""
    rest = iter(outcomes)
    callbacks: deque[_Callback] = deque()
    # The outcome being handled: a signal's handler may run between any two calls here
    # (raise KeyboardInterrupt, or cancel a future, as asyncio.run's does), and then
    # this one must still end with its callbacks run or scheduled, once each.
    current = None
    try:
        if (loop is None or not _CALLBACKS_READABLE or loop.get_debug()
                or asyncio.current_task(loop) is not None):
            for future, ok, value in rest:
                if not future.done():
                    _settle(future, ok, value)
            return
        for current in rest:  # recorded as it is taken
            future, ok, value = current
            if future.done():
                continue
            taken = future._callbacks
            if taken and len(taken) == 1 and type(taken[0][0]) in _DETACHABLE:
                # The common case (the awaiting task's wake-up), without the copy below.
                callback, context = taken[0]
                callbacks.append((callback, context, future))  # first: never lost
                if not future.remove_done_callback(callback):
                    callbacks.pop()  # cancelled meanwhile: asyncio scheduled it
            elif taken and _detachable(taken):
                _take_all(future, callbacks)
            _settle(future, ok, value)  # else asyncio schedules its callbacks, if any
        current = None
        if callbacks:
            _run(loop, callbacks)
    except BaseException:
        if current is not None and not current[0].done():
            future, ok, value = current
            for callback, _, of in callbacks:  # taken already: off it, then settled
                if of is future:
                    future.remove_done_callback(callback)
            _settle(future, ok, value)
        for future, ok, value in rest:
            if not future.done():
                _settle(future, ok, value)
        if loop is not None:
            _hand_over(loop, callbacks)
        raise


def _detachable(taken: list[tuple[Any, Any]]) -> bool:
    return all(type(callback) in _DETACHABLE for callback, _ in taken)


def _take_all(future: asyncio.Future[Any], callbacks: deque[_Callback]) -> None:
    """Move every done-callback of ``future`` to the end of ``callbacks``, in order and as
    often as it was added (asyncio runs a callback added twice twice).
    ``remove_done_callback`` takes off every copy of a callback at once, so each distinct
    one is removed once. Should one be gone (the future cancelled meanwhile, by a
    signal's handler: asyncio scheduled what was still on it), its copies and those of
    the callbacks not removed yet leave ``callbacks`` again."""
    # A copy (removal edits the list); None once cancelled (asyncio scheduled them).
    entries = tuple(future._callbacks or ())
    start = len(callbacks)
    callbacks.extend((callback, context, future) for callback, context in entries)  # never lost
    removed: list[Callable[..., Any]] = []
    for callback, _ in entries:
        if callback in removed:  # ==, as asyncio compares: safe for _DETACHABLE types
            continue
        if not future.remove_done_callback(callback):
            # Right to left: a deletion leaves the indices before it as they were.
            for k in range(len(entries) - 1, -1, -1):
                if entries[k][0] not in removed:
                    del callbacks[start + k]
            return
        removed.append(callback)


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    """Complete ``future``, unless it was cancelled meanwhile (by its awaiter, or by a
    signal's handler between a check and this)."""
    try:
        if ok:
            future.set_result(value)
        else:
            # An asyncio future refuses a StopIteration, and a CancelledError would read
            # as the awaiting task's own cancellation (asyncio, TaskGroups and servers
            # would treat it so).
            future.set_exception(for_callers(value))
    except asyncio.InvalidStateError:
        pass


def _run(loop: asyncio.AbstractEventLoop, callbacks: deque[_Callback]) -> None:
    """Run ``callbacks`` in order, as a ``Handle`` each would; whatever is left when the
    loop turns (nested) or an interrupt goes out goes to ``call_soon``."""
    sentinel = loop.call_soon(_hand_over, loop, callbacks)
    try:
        while callbacks:
            callback, context, future = callbacks.popleft()
            try:
                context.run(callback, future)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                _report(loop, callback, context, future, exc)
    finally:
        sentinel.cancel()
        _hand_over(loop, callbacks)


def _hand_over(loop: asyncio.AbstractEventLoop, callbacks: deque[_Callback]) -> None:
    while callbacks:
        callback, context, future = callbacks.popleft()
        loop.call_soon(callback, future, context=context)


def _report(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], context: Context,
            future: asyncio.Future[Any], exc: BaseException) -> None:
    """What ``Handle._run`` tells the loop's exception handler of a callback's exception."""
    handle = asyncio.Handle(callback, (future,), loop, context)
    report = {
        "message": f"Exception in callback {_format_callback_source(callback, (future,))}",
        "exception": exc,
        "handle": handle,
    }
    if isinstance(loop, asyncio.BaseEventLoop) and hasattr(handle, "get_context"):
        # asyncio on CPython 3.12+ runs the handler in the handle's context itself.
        loop.call_exception_handler(report)
        return
    try:
        context.run(loop.call_exception_handler, report)
    except RuntimeError:  # its context is entered further up (what the callback hit)
        loop.call_exception_handler(report)

"""Exceptions a caller of batchproc may need to catch."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue

# A model's exceptions that would read as control flow where the caller raises them: its
# own future or task cancelled, or the end of an iteration (``map(f, ...)`` with ``f``
# calling ``result()`` would stop early, silently; an asyncio future refuses them).
_CONTROL_FLOW = (asyncio.CancelledError, concurrent.futures.CancelledError, StopIteration,
                 StopAsyncIteration)


class BatchProcessorError(Exception):
    """Base class of the errors batchproc raises itself."""


class QueueFullError(BatchProcessorError, queue.Full):
    """The queue stayed full for the whole ``timeout`` given to ``enqueue_predict``."""


class ProcessorStoppedError(BatchProcessorError, RuntimeError):
    """The processor is stopped (or stopping): the request was refused or not finished in time."""


class BatchTimeoutError(BatchProcessorError, TimeoutError):
    """``process_func`` ran longer than ``item_timeout`` on the batch holding this request."""


class ConfigTypeError(BatchProcessorError, TypeError, ValueError):
    """A `BatchProcessorConfig` setting of the wrong type: a float or a bool where an
    integer goes, a string where a number goes. A ``TypeError``, and a ``ValueError``
    as every refused setting is, so that ``except ValueError`` still catches them all.
    The message names the field, the value given and what the field accepts."""


class BatchOutputError(BatchProcessorError, ValueError):
    """``process_func`` returned an output that cannot be cut into its callers' parts:
    one whose length on axis 0 differs from its batch's rows (or that the output rule
    does not cover, docs/formats.md).

    ``path``: where in the output the wrong length is (a tuple of keys and positions,
    ``()`` for the output itself), and ``rows``: that length (None: no axis 0); both
    None when the error is of another kind."""

    def __init__(self, message: str, *, path: tuple[object, ...] | None = None,
                 rows: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.rows = rows


class ItemChangedError(BatchProcessorError, ValueError):
    """A queued item's shape changed before its batch was built (an array or tensor
    resized or reshaped in place): the rows and length queued with it no longer say
    where its part of the output is, nor what the batch holds."""


class ProcessorForkedError(ProcessorStoppedError):
    """This process is a fork (``os.fork()``, gunicorn ``--preload``, multiprocessing's
    "fork" start method) of the one that started the processor. Its threads did not
    survive the fork, so it refuses requests instead of queueing them for nobody; start
    a processor in this process instead."""


class QueueTimeoutError(BatchProcessorError, TimeoutError):
    """The request ran out of its ``max_queue_time`` before it had a result.

    Still waiting in the queue, it was never processed. Parked for a retry, it was
    processed and failed: the message says how many times, and its first failure (the
    one it was being retried after) is the ``__cause__``. Either way the model does not
    see it again."""


def interrupts(error: BaseException) -> bool:
    """Whether the model's ``error`` fails its whole call at once, never searched for the
    request that caused it nor retried: a ``BaseException`` that is not an ``Exception``
    (``KeyboardInterrupt``, ``SystemExit``). Not asyncio's ``CancelledError`` (a
    ``BaseException`` too): raised by a model (a client library's own cancellation), it
    is a failure like any other, so the requests that did not cause it get their
    results (its callers get it as a ``RuntimeError``: ``for_callers``)."""
    return not isinstance(error, (Exception, asyncio.CancelledError))


def for_callers(error: BaseException) -> BaseException:
    """The exception a caller gets for ``error``, raised by ``process_func``: the error
    itself, unless it would read as control flow where the caller raises it: a
    ``CancelledError`` (asyncio's or ``concurrent.futures``'), as the caller's own future
    or task cancelled (``except CancelledError``, a task awaiting ``asyncio.to_thread``),
    or ``StopIteration``/``StopAsyncIteration``, as the end of an iteration the call is
    made in. Then a ``RuntimeError`` whose ``__cause__`` it is."""
    if not isinstance(error, _CONTROL_FLOW):
        return error
    wrapped = RuntimeError(f"process_func raised {error!r}")
    wrapped.__cause__ = error
    return wrapped

"""Built-in batch functions for benchmarks, and loading the user's own.

A model is a callable taking a batch (by default a float32 array of shape
``(rows, features)``; what ``--input`` describes otherwise, see :mod:`.inputs`) and
returning an output whose leading length is ``rows``; or an ``async def`` one
(:func:`is_async_model`), which every system awaits: batchproc on its processor's event
loop, the check, the limit and no batching each on a loop of their own. The three
built-ins span the cases that matter:

- ``identity`` returns its input: all the time measured is the batcher's own overhead.
- ``mlp`` is a small float32 numpy MLP (features -> 256 -> 256 -> 16, ReLU, fixed seed):
  its cost grows with the batch, but far slower than linearly. Its width, ``features``,
  is the requests': ``--features``, or what ``--input`` describes
  (:func:`row_width`).
- ``fixed`` costs a fixed time per call, whatever the batch, behind one lock — the shape
  of one GPU: calls are serialized and a full batch costs what a single row does.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import BenchError
from .inputs import RequestSource

Model = Callable[[np.ndarray], Any]

BUILTIN_MODELS = ("identity", "mlp", "fixed")
DEFAULT_FIXED_MS = 5.0
# How long one call of the check before the runs may take (a first call may load or
# compile: generous), and when a warning says it is being waited for.
CHECK_TIMEOUT_S = 60.0
CHECK_SLOW_S = 10.0

log = logging.getLogger(__name__)


def identity(batch: np.ndarray) -> np.ndarray:
    """Return the batch unchanged: measures pure batching overhead."""
    return batch


class MLP:
    """A small float32 MLP with ReLU, ``features -> 256 -> 256 -> 16``, fixed seed."""

    def __init__(self, features: int = 64, hidden: int = 256, out: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)

        def layer(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
            w = rng.standard_normal((n_in, n_out), dtype=np.float32) / np.float32(np.sqrt(n_in))
            return w, np.zeros(n_out, dtype=np.float32)

        self.w1, self.b1 = layer(features, hidden)
        self.w2, self.b2 = layer(hidden, hidden)
        self.w3, self.b3 = layer(hidden, out)
        self.features = features

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        h = np.maximum(batch @ self.w1 + self.b1, 0.0)
        h = np.maximum(h @ self.w2 + self.b2, 0.0)
        out: np.ndarray = h @ self.w3 + self.b3
        return out

    def __repr__(self) -> str:
        return f"MLP({self.features}->256->256->16)"


class FixedCost:
    """A fixed cost per call behind one lock, like one GPU: ``with lock: sleep(cost)``."""

    def __init__(self, cost_s: float = DEFAULT_FIXED_MS / 1000.0):
        self.cost_s = cost_s
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            time.sleep(self.cost_s)
        return batch

    def __repr__(self) -> str:
        return f"FixedCost({self.cost_s * 1000:g} ms)"


def load_user_model(spec: str) -> Model:
    """Import ``package.module:callable`` (the attribute may be dotted) and return it.

    Raises :class:`BenchError` with a one-line reason when it cannot be imported or is
    not callable. The current directory is importable, as it is under ``python -m``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BenchError(
            f"--model {spec!r}: expected one of {', '.join(BUILTIN_MODELS)} "
            "or package.module:callable"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = _users_code(spec, f"cannot import {module_name!r}",
                           importlib.import_module, module_name)
    for part in attr.split("."):
        try:
            obj = _users_code(spec, f"getting {part!r} of {module_name!r} raised",
                              getattr, obj, part, passes=(AttributeError,))
        except AttributeError:
            raise BenchError(
                f"--model {spec!r}: {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise BenchError(f"--model {spec!r}: {attr!r} is {_a(type(obj).__name__)}, not callable")
    return obj  # type: ignore[no-any-return]


def _users_code(spec: str, failed: str, call: Callable[..., Any], *args: Any,
                passes: tuple[type[BaseException], ...] = ()) -> Any:
    """``call(*args)``, which runs code of the user's module (its import, a module
    ``__getattr__``): whatever that raises but Ctrl-C and ``passes`` is a one-line
    ``--model`` error saying ``failed`` (``sys.exit()`` and ``GeneratorExit`` too: the
    command reports them, it does not exit with them)."""
    let_through: tuple[type[BaseException], ...] = (KeyboardInterrupt, *passes)
    try:
        return call(*args)
    except let_through:
        raise
    except BaseException as exc:
        raise BenchError(f"--model {spec!r}: {failed}: {error_text(exc)}") from None


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: ``a list``, ``an int``."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


# The built-in models made for float32 rows of one width, by name: built for the width
# of the requests they are sent. The others take any request.
ROW_MODELS: dict[str, Callable[[int], Model]] = {"mlp": MLP}


def make_model(name: str, *, features: int = 64, model_ms: float = DEFAULT_FIXED_MS,
               source: RequestSource | None = None) -> Model:
    """A built-in model by name, or the user's ``package.module:callable``. A model of
    :data:`ROW_MODELS` is built for the width of ``source``'s requests
    (:func:`row_width`), or ``features`` without a source.

    Raises:
        BenchError: ``source``'s requests are not what the built-in model takes, or the
            user's model cannot be loaded.
    """
    if name in ROW_MODELS:
        return ROW_MODELS[name](features if source is None else row_width(name, source))
    if name == "identity":
        return identity
    if name == "fixed":
        return FixedCost(model_ms / 1000.0)
    return load_user_model(name)


def row_width(name: str, source: RequestSource) -> int:
    """The width of ``source``'s requests, for the built-in model ``name`` (one of
    :data:`ROW_MODELS`): their rows' length, when every request is float32 rows of that
    one length (any number of rows).

    Raises:
        BenchError: one line, naming what the model takes and what ``source`` sends:
            named inputs, another dtype, another number of dimensions, or rows of
            lengths that differ (padded). (A request of no values never gets here:
            ``--input`` refuses it, from a spec or a file.)
    """
    first = source.requests(0)[0]
    if isinstance(first, Mapping):
        sends = f"named inputs ({', '.join(first)})"
    elif first.dtype != np.float32:
        sends = f"{first.dtype} requests"
    elif first.ndim != 2:
        sends = f"requests of {first.ndim} dimension{'s' if first.ndim != 1 else ''}"
    elif source.padded:
        sends = "rows whose lengths differ"
    else:
        return int(first.shape[1])
    raise BenchError(
        f"--model {name} takes float32 rows of one width (--input float32:1xN, or "
        f"--features N), not {sends}: {source.description}")


def is_async_model(model: Any) -> bool:
    """Whether calling ``model`` gives a coroutine to await (``async def``, an ``async
    def __call__``, a ``functools.partial`` of either): batchproc's own test."""
    from batchproc.async_model import is_async_callable

    return is_async_callable(model)


async def awaited(model: Any, inputs: Any) -> Any:
    """The result of an async model's call on ``inputs``."""
    return await model(inputs)


def check_model(model: Model, source: RequestSource, name: str = "model", seed: int = 0,
                max_batch: int | None = None, timeout: float | None = None) -> None:
    """Call ``model`` on batches of one and two sample requests of ``source`` and, given
    ``max_batch``, on the limit's first full batch of up to ``max_batch`` rows; raise
    BenchError (one line) if it fails on the first two, or returns what batchproc would
    refuse (its own output rule: :meth:`~.inputs.Batch.check`) for any, or a call does
    not return within ``timeout`` seconds (default :data:`CHECK_TIMEOUT_S`). Each call
    runs on a thread of its own, so that one that never returns is left to it. A failure
    on the full batch is left to the runs, which report it (batchproc isolates it; the
    limit fails)."""
    from batchproc.errors import BatchOutputError

    timeout = CHECK_TIMEOUT_S if timeout is None else timeout
    pool = source.requests(seed)
    checks = [(pool[:1], True), (pool[:2] if len(pool) >= 2 else pool * 2, True)]
    if max_batch is not None:
        full = source.limit_plan(max_batch, seed)[0]
        if len(full) > 2:
            checks.append((full, False))
    for requests, must_run in checks:
        batch = source.batch(requests)
        what = batch.describe()
        call = _BoundedCall(model, batch.inputs)
        if not call.wait(timeout, f"{name} has not returned in {CHECK_SLOW_S:g} s on {what} "
                         f"(the check before any run); it has {timeout:g} s"):
            raise BenchError(f"{name} did not return within {timeout:g} s on {what} (the "
                             "check before any run); the call was left running")
        if call.error is not None:
            if not must_run:
                continue
            if isinstance(call.error, SystemExit):
                raise BenchError(f"{name} called sys.exit({call.error.code!r}) on {what}")
            raise BenchError(f"{name} failed on {what}: {error_text(call.error)}")
        try:
            batch.check(call.result)
        except BatchOutputError as exc:
            hint = ""
            result = call.result
            # asyncio counts a generator as a coroutine: asked first.
            if inspect.isgenerator(result) or inspect.isasyncgen(result):
                hint = (" (a generator function: return the batch's outputs, do not yield "
                        "them)")
            elif asyncio.iscoroutine(result):
                result.close()  # never run: no "never awaited" warning either
                hint = " (a plain function returning a coroutine: make it async def)"
            raise BenchError(f"{name} returned an output batchproc refuses for {what}: "
                             f"{error_text(exc)}{hint}") from None


# The most of an exception's message a report quotes, in characters.
ERROR_TEXT_MAX = 300


def error_text(exc: BaseException, limit: int = ERROR_TEXT_MAX) -> str:
    """``RuntimeError: no GPU``, on one line (the message's lines joined) and cut at
    ``limit`` characters; ``KeyboardInterrupt`` when it says nothing. An exception whose
    ``str()`` itself raises is named with that failure, never replaced by it."""
    name = type(exc).__name__
    try:
        text = " ".join(str(exc).split())
    except BaseException as broken:  # the user's __str__: the report must still be made
        text = f"(its message could not be read: str() raised {type(broken).__name__})"
    text = f"{name}: {text}" if text else name
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _BoundedCall:
    """One model call on a daemon thread of its own (an async model's awaited on an
    event loop of that thread's own): waited for with a bound, and left running when it
    does not return (a daemon thread does not hold the process at exit); an async call
    is cancelled then. Whatever it raises is kept, ``SystemExit`` and
    ``KeyboardInterrupt`` included: the model's, not the command's."""

    def __init__(self, model: Model, inputs: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._model = model
        self._inputs = inputs
        self._loop: OwnLoop | None = OwnLoop() if is_async_model(model) else None
        threading.Thread(target=self._run, name="batchproc-bench-check", daemon=True).start()

    def _run(self) -> None:
        try:
            if self._loop is not None:
                self.result = self._loop.run(awaited(self._model, self._inputs))
            else:
                self.result = self._model(self._inputs)
        except BaseException as exc:
            self.error = exc
        finally:
            self._done.set()

    def wait(self, timeout: float, slow: str) -> bool:
        """Whether the call ended within ``timeout`` s; ``slow`` is logged as a warning
        once it has taken :data:`CHECK_SLOW_S` (if that is sooner). An async call that
        has not ended is cancelled."""
        if timeout > CHECK_SLOW_S:
            if self._done.wait(CHECK_SLOW_S):
                return True
            log.warning("%s", slow)
            ended = self._done.wait(timeout - CHECK_SLOW_S)
        else:
            ended = self._done.wait(timeout)
        if not ended and self._loop is not None:
            self._loop.cancel()
        return ended


class OwnLoop:
    """An event loop that runs one coroutine on the thread calling :meth:`run`, which
    another thread may :meth:`cancel`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._cancelled = False

    def run(self, coro: Any) -> Any:
        """Run ``coro`` to its end on a new event loop; its result, or what it raised
        (``CancelledError`` once cancelled)."""
        loop = asyncio.new_event_loop()
        try:
            with self._lock:
                if self._cancelled:
                    coro.close()  # never started: closed, so never "never awaited"
                    raise asyncio.CancelledError
                self._loop, self._task = loop, loop.create_task(coro)
            return loop.run_until_complete(self._task)
        finally:
            with self._lock:
                self._loop = None
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def cancel(self) -> None:
        """Cancel the coroutine (before it starts, or on its loop)."""
        with self._lock:
            self._cancelled = True
            if self._loop is not None and self._task is not None:
                self._loop.call_soon_threadsafe(self._task.cancel)

"""``@batchproc.batch``: a batch function turned into a per-item callable.

::

    @batchproc.batch(max_batch_size=64, batch_timeout=0.005)
    def embed(batch):               # called with a batch, returns one result per row
        return model(batch)

    embed(x)                        # from any thread: x's result
    await embed.acall(x)            # from a coroutine (waits for room, see apredict)
    embed.submit(x)                 # the concurrent.futures.Future
    embed.processor                 # the BatchProcessor behind it
    embed.stop()                    # also done at interpreter exit

The processor is made and started on first use, one per decorated function, or one
per instance for a method (kept in the instance's ``__dict__`` under a key of the
method's own, not under its name, where it would hide a subclass's override; a copy or
an unpickled instance binds its own on first use). What counts as which:

- a function written in a class body that takes the instance and the batch is a method;
- one that takes only the batch (``@staticmethod``, above or below ``@batch``) is a
  function: one processor for the class, its subclasses and instances;
- a bound method (``batch(...)(obj.method)``) is a function: one processor per
  decoration, which keeps ``obj`` alive;
- ``@classmethod`` is refused (``TypeError``): there is no per-class processor.

``stop()`` is final, as ``BatchProcessor.stop`` is: every later call (and
``.processor``) raises ``ProcessorStoppedError`` rather than silently starting a new
processor, also after ``.processor.stop()`` or the ``atexit`` hook stopped it (an
instance first called after the hook included); decorate the function again for a new
one. On a method, ``Class.method.stop()`` stops it for every instance, those
made later included. A processor lives as long as its owner
(the decorated function; for a method, the instance), reference cycles included (its
workers reach the function only through a weak reference, so a function that names
itself is collected too): once the owner is collected its processor is stopped and
its threads exit. A request still
pending keeps its owner alive (its future, or the coroutine awaiting it, holds it), so
none is lost that way. Every processor still running at interpreter exit is stopped by
an ``atexit`` hook (``batchproc.exiting``), so queued work is finished or failed, never
lost silently. A process
forked after the first call (a pre-forking server that warmed the model up before
forking) does not inherit the processor, whose threads stay in the parent: its first
call starts its own. A module-level decorated function pickles by reference, as a
plain function does (``multiprocessing``: each process starts its own processor). A
batched method pickles with its instance, as a bound method does; its instance
unpickled is held weakly, as any is: pickle the instance with it, or alone and take the
method from it.

``async def`` batch functions are async models of the processor: they run on the event
loop it owns, up to ``max_workers`` batches awaiting at once (docs/asyncio.md).
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import os
import pickle
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar, cast, overload

from .. import exiting
from ..async_model import is_async_callable
from ..backpressure import timeout_arg
from ..config import (
    BatchPriority,
    BatchProcessorConfig,
    check_keywords,
    checked_copy,
    keyword_only,
)
from ..errors import ProcessorStoppedError
from ..metrics import MetricsSink, collector_methods
from ..processor import BatchProcessor

T = TypeVar("T")
U = TypeVar("U")
S = TypeVar("S")
B = TypeVar("B")
R = TypeVar("R")

_NORMAL = BatchPriority.NORMAL


class BatchedFunction(Generic[T, U]):
    """A batch function called one item at a time; see the module for the interface."""

    def __init__(self, func: Callable[[Any], Any], config: BatchProcessorConfig,
                 metrics_collector: object | None, name: str,
                 instance: weakref.ref[Any] | None = None) -> None:
        functools.update_wrapper(self, func, updated=())
        self.name = name
        self._func = func
        self._config = config
        self._metrics_collector = metrics_collector
        self._lock = threading.Lock()
        self._stopping = threading.Lock()
        self._processor: BatchProcessor[T, U] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._stopped = False  # stop() was called: final
        # The processor stop() stopped, while someone keeps it (its get_stats()): the
        # calls refused after stop() count in its total_rejected.
        self._stopped_processor: weakref.ref[BatchProcessor[T, U]] | None = None
        self._instance = instance  # a method's instance, which its function needs
        # For a method: its descriptor, and the instance itself where it has no weak
        # reference (the binding holds it anyway).
        self._method: BatchedMethod[Any, T, U] | None = None
        self._pinned: Any = None
        _LIVE.add(self)
        exiting.stop_at_exit(self)

    # ----------------------------------------------------------------- calling

    def __call__(self, item: T, *more: object, timeout: float | None = None,
                 priority: BatchPriority | int = _NORMAL) -> U:
        """From a thread: the item's result. ``timeout`` bounds the wait for room in a
        full queue (then ``QueueFullError``); a failure raises what the function raised.
        Do not call it on an event loop's thread (it blocks): use ``acall``. ``timeout``
        and ``priority`` are keywords (here, in ``submit`` and in ``acall``): a second
        positional argument, a second input, is a ``TypeError``."""
        if more:
            raise _one_item(self.name, more)
        future = self._submit(item, timeout, priority)
        try:
            return future.result()
        finally:
            # The worker that completed it may still hold the future a moment after this
            # thread woke: it must not hold the owner (a method's instance) with it.
            future._bp_pending_owner = None  # type: ignore[attr-defined]

    async def acall(self, item: T, *more: object, timeout: float | None = None,
                    priority: BatchPriority | int = _NORMAL) -> U:
        """From a coroutine: the item's result. A full queue is waited out without
        blocking the loop (``BatchProcessor.apredict``)."""
        if more:
            raise _one_item(f"{self.name}.acall", more)
        _owner = self._live_owner()  # held by this frame while the request is pending
        return await self._running(a_request=True).apredict(item, timeout, priority)

    def submit(self, item: T, *more: object, timeout: float | None = None,
               priority: BatchPriority | int = _NORMAL) -> Future[U]:
        """The ``concurrent.futures.Future`` of the item's result. ``ProcessorStoppedError``
        after ``stop()`` (as every way of calling it). Kept once done, it no longer keeps
        the function's owner (a method's instance) nor its processor alive."""
        if more:
            raise _one_item(f"{self.name}.submit", more)
        future = self._submit(item, timeout, priority)
        future.add_done_callback(_forget_owner)
        return future

    def _submit(self, item: T, timeout: float | None,
                priority: BatchPriority | int) -> Future[U]:
        owner = self._live_owner()
        future = self._running(a_request=True).enqueue_predict(item, timeout, priority)
        # The queue, then the worker, hold the future until it completes: through it a
        # pending request keeps the owner, and so the processor, alive.
        future._bp_pending_owner = owner  # type: ignore[attr-defined]
        return future

    def _owner(self) -> Any:
        """What the processor lives as long as: this function, or a method's instance."""
        return self if self._instance is None else self._instance()

    def _live_owner(self) -> Any:
        """``_owner()``, or ``ReferenceError`` at once if a method's instance is gone (its
        batch could only fail, after every retry)."""
        owner = self._owner()
        if owner is None:
            raise ReferenceError(
                f"@batchproc.batch method {self.name}: its instance is gone (a temporary, "
                "as in Model().method(x), or a method unpickled without its instance?). A "
                "batch method's processor lives in its instance: keep the instance while "
                "you call it")
        return owner

    # ----------------------------------------------------------------- lifecycle

    @property
    def processor(self) -> BatchProcessor[T, U]:
        """The running processor (started now if it was not).

        Raises ``ProcessorStoppedError`` after ``stop()``."""
        return self._running(a_request=False)

    def _running(self, a_request: bool) -> BatchProcessor[T, U]:
        """The running processor, started now if it was not. ``a_request``: for a call
        queueing a request, which counts as rejected if refused after ``stop()``."""
        processor = self._processor
        if processor is not None and processor.running:
            return processor
        with self._lock:
            processor = self._processor
            if processor is not None and processor.running:
                return processor
            if processor is not None or exiting.has_run():
                # Stopped through .processor.stop(), or by the exit hook: final too.
                self._stop_locked()
            if self._stopped:
                if a_request:
                    self._count_refusal()
                raise ProcessorStoppedError(
                    f"batched function {self.name} was stopped; stop() is final (decorate "
                    "the function again for a new processor)")
            processor = BatchProcessor(self._config, self._metrics_collector)
            # A method's function holds its instance weakly already; a function is reached
            # weakly too. An async def one runs on the processor's loop.
            processor.start(self._func if self._method is not None else _through_weakly(self))
            self._processor = processor
            self._finalizer = _stop_when_collected(self, processor)
            return processor

    def _count_refusal(self) -> None:
        """Count a request refused after ``stop()`` as the processor counts its own
        refusals: in its ``get_stats()`` while someone keeps it, and in the metrics."""
        ref = self._stopped_processor
        stopped = None if ref is None else ref()
        if stopped is not None:
            stopped._count_refusal()
        else:
            MetricsSink(self._metrics_collector).rejected(1)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the processor (finishing queued work within ``timeout``, as
        ``BatchProcessor.stop``). Final: later calls raise ``ProcessorStoppedError``.
        Idempotent, and safe before the first call. ``timeout``: ``TypeError`` if not a
        number, ``ValueError`` if NaN or negative."""
        timeout = timeout_arg(timeout)
        with self._stopping:  # a second stop() returns once the first has finished
            with self._lock:
                processor = self._stop_locked()
            if processor is not None:
                processor.stop(timeout)

    def _stop_locked(self) -> BatchProcessor[T, U] | None:
        """Mark it stopped for good (under ``_lock``); the processor to stop, if any."""
        exiting.forget(self)
        self._stopped = True
        processor, self._processor = self._processor, None
        if processor is not None:
            self._stopped_processor = weakref.ref(processor)
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer.detach()
        return processor

    def _is_bound_to(self, method: object, instance: Any) -> bool:
        """Whether this is ``method`` bound to ``instance`` (not to the instance a copy of
        it was made from, nor another descriptor's under the same key)."""
        return self._method is method and self._bound_instance() is instance

    # Copied, it stays itself, as a function and a bound method do.
    def __copy__(self) -> BatchedFunction[T, U]:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> BatchedFunction[T, U]:
        if self._method is None:
            return self
        # A method held elsewhere in a copied graph: bound to its instance's copy, as a
        # bound method is copied (the copy keeps to the rule: keep its instance).
        return cast("BatchedFunction[T, U]",
                    self._method.__get__(copy.deepcopy(self._bound_instance(), memo)))

    def _bound_instance(self) -> Any:
        """A method's instance (None once it is gone)."""
        return self._pinned if self._instance is None else self._instance()

    def __reduce__(self) -> str | tuple[Any, ...]:
        method = self._method
        if method is not None:
            # As a bound method pickles: its instance and the method; unpickled, the method
            # of the instance unpickled, with a processor of its own. (In its instance's
            # own __dict__ it is left behind instead: _Binding.)
            instance = self._bound_instance()
            found = _holder(method, instance)
            if instance is None or found is None:
                raise pickle.PicklingError(
                    f"cannot pickle batched method {self.name}: its instance is gone, or "
                    "its class no longer holds it")
            return (_bound_method, (*found, instance))
        qualname = getattr(self, "__qualname__", None)
        if not isinstance(qualname, str):  # a decorated partial or callable object
            raise pickle.PicklingError(
                f"cannot pickle {self!r}: a batched function pickles by reference, as a "
                "module-level function does; this one decorates "
                f"{type(self._func).__name__}, which has no name to find it by")
        # By reference (module and qualified name), as plain functions pickle.
        return qualname

    def _forget_after_fork(self) -> None:
        # In a forked child the parent's threads do not exist: its processor would accept
        # work and never run it. The locks may have been held by a parent thread at the
        # fork. The old processor is kept, never stopped or collected here: stopping it
        # would wait on threads that are not there.
        if self._processor is not None:
            _INHERITED.append(self._processor)
        if self._finalizer is not None:
            self._finalizer.detach()
        self._processor = self._finalizer = None
        self._lock = threading.Lock()
        self._stopping = threading.Lock()

    def _threads(self) -> list[threading.Thread]:
        """Test hook: the threads this function's processor runs."""
        return [] if self._processor is None else self._processor._threads()

    def __repr__(self) -> str:
        processor = self._processor
        if self._stopped or (processor is not None and not processor.running):
            state = "stopped"  # (the latter through .processor.stop(): final too)
        elif processor is not None:
            state = "running"
        else:
            state = "idle"
        return f"<batched function {self.name} ({state})>"


class BatchedMethod(Generic[S, T, U]):
    """A batch method: each instance gets its own ``BatchedFunction`` (and processor)."""

    def __init__(self, func: Callable[..., Any], config: BatchProcessorConfig,
                 metrics_collector: object | None, name: str) -> None:
        functools.update_wrapper(cast(Any, self), func, updated=())
        self._func = func
        self._config = config
        self._metrics_collector = metrics_collector
        self._name = name
        # Where an instance keeps its binding: a key of this descriptor's own (one function
        # may be decorated twice), not its name (there the binding would hide a
        # subclass's method of that name).
        self._key = f"_batchproc:{func.__module__}.{func.__qualname__}#{next(_DESCRIPTORS)}"
        self._lock = threading.Lock()
        self._bound: weakref.WeakSet[BatchedFunction[T, U]] = weakref.WeakSet()
        self._stopped = False  # stop() was called: instances bound later are stopped too

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None,
                ) -> BatchedMethod[S, T, U]: ...

    @overload
    def __get__(self, instance: S, owner: type[Any] | None = None) -> BatchedFunction[T, U]: ...

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        if instance is None:
            return self
        if isinstance(instance, type):  # @classmethod above @batch
            raise TypeError(_CLASSMETHOD.format(name=self._name))
        try:
            namespace = instance.__dict__
        except AttributeError:
            raise TypeError(
                f"@batchproc.batch on {self._name}: the instance needs a __dict__ "
                f"to hold its processor") from None
        held = namespace.get(self._key)
        if type(held) is _Binding and held.bound._is_bound_to(self, instance):
            return held.bound
        with self._lock:
            held = namespace.get(self._key)
            if type(held) is _Binding and held.bound._is_bound_to(self, instance):
                return held.bound  # another thread bound it meanwhile
            try:
                ref: weakref.ref[Any] | None = weakref.ref(instance)
            except TypeError:  # not weakly referenceable: it lives as long as its processor
                ref = None
            # The bound function lives in the instance, so it goes when the instance goes
            # (and its processor with it: see BatchedFunction).
            bound = BatchedFunction[T, U](
                _bind(self._func, instance, ref), self._config, self._metrics_collector,
                self._name, ref)
            _show_as_bound(bound, self._func)
            bound._stopped = self._stopped
            bound._method = self
            if ref is None:
                bound._pinned = instance
            namespace[self._key] = _Binding(bound)
            self._bound.add(bound)
        return bound

    def __call__(self, instance: S, item: T, *more: object, timeout: float | None = None,
                 priority: BatchPriority | int = _NORMAL) -> U:
        """Called on the class, ``Class.method(instance, item)``: as
        ``instance.method(item)``."""
        if more:
            raise _one_item(self._name, more)
        bound: BatchedFunction[T, U] = self.__get__(instance, type(instance))
        return bound(item, timeout=timeout, priority=priority)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the processor of every instance. Final, as ``BatchedFunction.stop``: the
        method of every instance, also of one made later, raises
        ``ProcessorStoppedError``. ``timeout`` is each instance's, checked as
        ``BatchedFunction.stop`` checks it."""
        timeout = timeout_arg(timeout)
        with self._lock:  # no instance binds meanwhile: the set does not change under us
            self._stopped = True
            bound_now = list(self._bound)
        for bound in bound_now:
            bound.stop(timeout)


_CLASSMETHOD = (
    "@batchproc.batch on {name}: a classmethod cannot be batched (a batch method has one "
    "processor per instance, and there is none per class). For one processor shared by "
    "the class, write it as a @staticmethod taking only the batch (or a module-level "
    "function); for one per instance, as a method taking self and the batch")


def _one_item(called: str, more: tuple[object, ...]) -> TypeError:
    """A call given more than its one item (``timeout`` and ``priority`` are keywords)."""
    return TypeError(
        f"{called}() takes one item, got {1 + len(more)} positional arguments: a batched "
        "function is called with one item (its batch is made for it); timeout= and "
        "priority= are keywords")


def _forget_owner(future: Future[Any]) -> None:
    """A done-callback: the future no longer keeps its request's owner alive."""
    future._bp_pending_owner = None  # type: ignore[attr-defined]


def _bind(func: Callable[..., Any], instance: Any,
          ref: weakref.ref[Any] | None) -> Callable[[Any], Any]:
    """``func`` with ``instance`` as its first argument, held weakly through ``ref``
    where there is one (the processor's workers would otherwise keep the instance alive
    for ever)."""
    if ref is None:
        return functools.partial(func, instance)

    def method() -> Callable[[Any], Any]:
        obj = ref()
        if obj is None:
            raise ReferenceError("the instance of this batch method was garbage-collected")
        return functools.partial(func, obj)

    return _calling(method, inspect.iscoroutinefunction(func))


def _show_as_bound(bound: BatchedFunction[Any, Any], func: Callable[..., Any]) -> None:
    """Name, docstring and signature of ``bound`` as the method ``func`` bound to an
    instance (its first parameter left out), as Python shows a bound method: not those of
    the call that reaches the instance weakly. Holds no instance."""
    functools.update_wrapper(bound, func, updated=())
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # no signature to show (some builtins)
        return
    parameters = list(signature.parameters.values())[1:]
    bound.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=parameters)


def _through_weakly(owner: BatchedFunction[Any, Any]) -> Callable[[Any], Any]:
    """What the processor calls: ``owner``'s function, reached through a weak reference
    to ``owner``, so that its workers do not keep alive a function whose body names
    itself (a pending request keeps ``owner`` alive, so a batch always finds it)."""
    ref = weakref.ref(owner)

    def func() -> Callable[[Any], Any]:
        obj = ref()
        if obj is None:
            raise ReferenceError("the batched function was garbage-collected")
        return obj._func

    return _calling(func, is_async_callable(owner._func))


def _calling(resolve: Callable[[], Callable[[Any], Any]],
             is_async: bool) -> Callable[[Any], Any]:
    """A batch function calling what ``resolve()`` gives at each call: a coroutine
    function for an async one (the processor runs those on its loop)."""
    if is_async:
        async def call_async(batch: Any) -> Any:
            return await resolve()(batch)
        return call_async

    def call(batch: Any) -> Any:
        return resolve()(batch)
    return call


class _Binding:
    """What an instance's ``__dict__`` holds for a batched method: its binding, which
    copies and pickles of the instance leave behind (each binds its own on first use,
    with a processor of its own)."""

    __slots__ = ("bound",)

    def __init__(self, bound: BatchedFunction[Any, Any]) -> None:
        self.bound = bound

    def __copy__(self) -> _Binding:
        return self  # the copy's method finds it bound to another instance

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_left_behind, ())


def _left_behind() -> None:
    """A method's binding in an unpickled instance: none yet."""
    return None


# Numbers the descriptors, for their keys: in the order a program defines them.
_DESCRIPTORS = itertools.count()


def _holder(method: BatchedMethod[Any, Any, Any], instance: Any) -> tuple[type[Any], str] | None:
    """The class of ``instance`` whose namespace holds ``method``, and its name there."""
    for cls in type(instance).__mro__:
        for name, value in vars(cls).items():
            if value is method:
                return cls, name
    return None


def _bound_method(owner: type[Any], attr: str, instance: Any) -> BatchedFunction[Any, Any]:
    """A batched method unpickled: ``owner``'s method ``attr`` (the class that holds it,
    not a subclass's override) bound to ``instance``."""
    method: BatchedMethod[Any, Any, Any] = vars(owner)[attr]
    return cast("BatchedFunction[Any, Any]", method.__get__(instance, owner))


def _stop_when_collected(owner: BatchedFunction[Any, Any],
                         processor: BatchProcessor[Any, Any]) -> weakref.finalize[Any, Any]:
    """Stop ``processor`` once ``owner`` is collected, also as part of a reference cycle
    (the finalizer holds the processor, never the owner). Not at exit: ``_stop_all``
    stops it then."""
    finalizer = weakref.finalize(owner, stop_in_background, processor)
    finalizer.atexit = False
    return finalizer


def stop_in_background(processor: BatchProcessor[Any, Any]) -> None:
    """Stop ``processor`` on a thread of its own: for finalizers. Off the thread that
    collected the owner: that may be one of the processor's own workers, which stop()
    joins, or one holding a lock stop() takes. Queued work is finished as by stop()."""
    try:
        threading.Thread(target=processor.stop, name="stop-collected:batchproc",
                         daemon=True).start()
    except RuntimeError:
        # No thread to be had: exiting, on CPython 3.12+. The exit hook, running, stops it.
        pass


# Every BatchedFunction alive, forgotten in a forked child (each is also stopped at
# interpreter exit: exiting.py).
_LIVE: weakref.WeakSet[BatchedFunction[Any, Any]] = weakref.WeakSet()


# Processors a forked child inherited from its parent, threads gone (see _forget_after_fork).
_INHERITED: list[BatchProcessor[Any, Any]] = []


def _forget_all_after_fork() -> None:
    for fn in list(_LIVE):
        fn._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all_after_fork)


def _signature(func: Callable[..., Any], follow_wrapped: bool) -> inspect.Signature | None:
    """``func``'s signature (``follow_wrapped``: of the function a ``functools.wraps``
    wrapper wraps, as written); None where there is none to read (some builtins)."""
    try:
        return inspect.signature(func, follow_wrapped=follow_wrapped)
    except (TypeError, ValueError):
        return None


def _is_method(func: Callable[..., Any]) -> bool:
    """Whether ``func`` is a batch method: a function written in a class body (its
    qualified name says so) that takes the instance and the batch: its first parameter
    is ``self``, or it requires two. One that takes only the batch is a static method
    (what the typed overloads of ``_Decorator`` also say)."""
    if inspect.ismethod(func):
        return False  # bound already
    parts = getattr(func, "__qualname__", "").split(".")
    if len(parts) < 2 or parts[-2] == "<locals>":
        return False
    signature = _signature(func, follow_wrapped=True)
    if signature is None:  # no signature to read: as written in a class body
        return True
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional and positional[0].name == "self":
        return True
    return sum(p.default is p.empty for p in positional) >= 2


class _Decorator:
    def __init__(self, config: BatchProcessorConfig, metrics_collector: object | None,
                 name: str | None) -> None:
        self._config = config
        self._metrics_collector = metrics_collector
        self._name = name

    # Plain functions: a list of items in, a sequence of results out (generic items) ...
    @overload
    def __call__(self, func: Callable[[list[T]], Awaitable[Sequence[U]]],
                 ) -> BatchedFunction[T, U]: ...

    @overload
    def __call__(self, func: Callable[[list[T]], Sequence[U]]) -> BatchedFunction[T, U]: ...

    # ... or the batch has the items' own type (arrays, tensors, dicts of them).
    @overload
    def __call__(self, func: Callable[[B], Awaitable[R]]) -> BatchedFunction[B, R]: ...

    @overload
    def __call__(self, func: Callable[[B], R]) -> BatchedFunction[B, R]: ...

    # Methods: the same, after ``self``.
    @overload
    def __call__(self, func: Callable[[S, list[T]], Awaitable[Sequence[U]]],
                 ) -> BatchedMethod[S, T, U]: ...

    @overload
    def __call__(self, func: Callable[[S, list[T]], Sequence[U]],
                 ) -> BatchedMethod[S, T, U]: ...

    @overload
    def __call__(self, func: Callable[[S, B], Awaitable[R]]) -> BatchedMethod[S, B, R]: ...

    @overload
    def __call__(self, func: Callable[[S, B], R]) -> BatchedMethod[S, B, R]: ...

    def __call__(self, func: Callable[..., Any]) -> Any:
        if isinstance(func, classmethod):
            raise TypeError(_CLASSMETHOD.format(name=func.__func__.__qualname__))
        static = False
        if isinstance(func, staticmethod):
            # A BatchedFunction is no descriptor: through the class or an instance it is
            # the same callable, so it needs no staticmethod around it.
            func, static = func.__func__, True
        if not callable(func):
            raise TypeError(f"@batchproc.batch(...) decorates a function, got {func!r}")
        name = self._name or _callable_name(func)
        method = not static and _is_method(func)
        # What the processor calls is the outermost function, not one it wraps.
        signature = _signature(func, follow_wrapped=False)
        if signature is not None:
            _check_takes_the_batch(signature, name, method)
        if method:
            return BatchedMethod[Any, Any, Any](func, self._config, self._metrics_collector,
                                                name)
        return BatchedFunction[Any, Any](func, self._config, self._metrics_collector, name)


def _callable_name(func: Any) -> str:
    """How errors and ``repr`` name a decorated callable without a ``name``: a function's
    qualified name; ``partial(name)`` for a ``functools.partial``; ``Class.__call__`` for
    an instance of a class with ``__call__`` (its repr would change with every object)."""
    if isinstance(func, functools.partial):
        return f"partial({_callable_name(func.func)})"
    name = getattr(func, "__qualname__", None)
    return name if isinstance(name, str) else f"{type(func).__qualname__}.__call__"


def _check_takes_the_batch(signature: inspect.Signature, name: str, method: bool) -> None:
    """``TypeError`` now, at decoration, for a function of ``signature`` that cannot be
    called with the batch alone (a method: the instance and the batch), as the processor
    calls it. Every call would otherwise fail, and only once its retries ran out (the
    decorated function takes one item, and ``timeout`` and ``priority`` as keywords)."""
    try:
        signature.bind(*(("instance", "batch") if method else ("batch",)))
    except TypeError:
        takes = ("the instance and the batch as its only arguments" if method
                 else "the batch as its only argument")
        raise TypeError(f"@batchproc.batch: {name}{signature} must take {takes}: the "
                        f"processor calls it with nothing else") from None


def batch(function: None = None, /, *, config: BatchProcessorConfig | None = None,
          metrics_collector: object = None, name: str | None = None,
          **fields: Any) -> _Decorator:
    """Turn a batch function into a per-item callable (see the module).

    ``fields`` are ``BatchProcessorConfig``'s fields (``max_batch_size=64``, ...), checked
    now; or pass a whole ``config``, checked now too and copied (later changes to it
    change nothing). ``metrics_collector`` (checked now) goes to each processor made
    (``batchproc.observe.prometheus.PrometheusMetrics`` for Prometheus: its own ``name``
    is the metrics' ``processor`` label); ``name`` names the function in its errors and
    ``repr`` (default: the function's qualified name; ``partial(name)`` for a
    ``functools.partial``, ``Class.__call__`` for a callable instance; ``TypeError`` if
    not a str).

    The function takes a batch and returns one result per row, as ``process_func`` does
    (docs/formats.md): a list of items for generic items, the concatenated array or tensor
    for arrays and tensors. A function written in a class body that takes the instance
    and the batch (its first parameter is ``self``, or it requires two) is a method: each
    instance gets its own processor. A static method
    (one taking only the batch, with or without ``@staticmethod``) gets one processor,
    as does a bound method (``batch(...)(obj.method)``, per decoration). ``TypeError``
    for a classmethod, and for a function that cannot be called with the batch alone (a
    method: the instance and the batch), checked when decorating. The processor starts
    on the first call; ``stop()`` is final (later calls raise ``ProcessorStoppedError``).

    ``TypeError`` when used without parentheses (``@batch``): it takes keywords only;
    for a keyword that is neither a field nor one of its own, naming the closest field.
    """
    if isinstance(function, BatchProcessorConfig):
        raise TypeError("batch takes its config as a keyword: "
                        "@batchproc.batch(config=BatchProcessorConfig(...))")
    if function is not None:
        raise TypeError(
            "batch takes keyword arguments only: write @batchproc.batch() (with "
            "parentheses) or @batchproc.batch(max_batch_size=..., ...)")
    check_keywords("batch", fields, keyword_only(batch))
    if config is not None and fields:
        raise TypeError("pass either config or its fields, not both")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str (how errors and repr name the function) or "
                        f"None, got {name!r}")
    # Validated now, and kept: later changes to the caller's object change nothing.
    config = BatchProcessorConfig(**fields) if config is None else checked_copy(config)
    if metrics_collector is not None:
        collector_methods(metrics_collector)  # a TypeError now, not on the first call
    return _Decorator(config, metrics_collector, name)

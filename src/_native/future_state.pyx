# cython: language_level=3
"""Atomic state transitions for ``batchproc.futures.RequestFuture``.

Why native: two threads must never interleave inside one transition of a future (the
worker completing it, the caller cancelling it or adding a callback). The standard Future
allocates a lock per future and takes it on every call. Each function here runs, with
the GIL held, only compiled code that calls no Python code (attribute reads and writes
of a plain instance, list appends, ``_thread`` lock releases), and compiled code is never
interrupted to switch threads: so each call is one indivisible step for every other
Python thread, and the future needs no lock of its own. One exception: making an object
the collector tracks (a list) may start a garbage collection, which runs Python code
(finalizers, ``gc.callbacks``), and other threads with it. So a function makes what it
stores before it reads the state; and since storing an attribute an instance does not
have yet may make its ``__dict__``, an allocation too, a future is born with every
attribute stored here (``RequestFuture.__init__``).

That holds while the future has no lock (``_cond is None``). One exists once something
asked for ``_condition``: ``concurrent.futures.wait()`` and ``as_completed()`` hold it while
they read the state and register a waiter, so from then on every function answers
``NEED_LOCK`` and the caller takes its locked path. ``_cond`` never goes back to None.

On a free-threaded CPython build the argument needs the GIL: this module does not declare
itself free-threading compatible, so importing it there turns the GIL back on.

Codes returned: ``NEED_LOCK`` (-1) everywhere; otherwise as each function says.

``Request`` is the record of one queued request. ``start_all`` and ``finish_all`` run a
transition over the futures of a whole batch of requests, and ``items_of``/``enqueued_of``
read a batch's items and arrival times, so the per-request loops a worker runs on every
batch are compiled too. Each future's transition is still one indivisible step; another
thread may run between two of them, and does where ``finish_all`` wakes the callers it
gathered (``waiting.release_all`` lets go of the GIL): between transitions, never
inside one.
"""

cimport cython
from libc.math cimport INFINITY
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cimport numpy as cnp

from batchproc._native.waiting import release_all as _release_all
from concurrent.futures import InvalidStateError
from concurrent.futures._base import (
    CANCELLED as _CANCELLED_S,
    CANCELLED_AND_NOTIFIED as _NOTIFIED_S,
    FINISHED as _FINISHED_S,
    PENDING as _PENDING_S,
    RUNNING as _RUNNING_S,
)

cnp.import_array()

cdef object PENDING = _PENDING_S
cdef object RUNNING = _RUNNING_S
cdef object CANCELLED = _CANCELLED_S
cdef object CANCELLED_AND_NOTIFIED = _NOTIFIED_S
cdef object FINISHED = _FINISHED_S

cdef enum:
    _NEED_LOCK = -1
    _INVALID = -2

NEED_LOCK = _NEED_LOCK
INVALID = _INVALID

# The class whose instances start_all/finish_all transition here (RequestFuture, bound
# by batchproc.futures): anything else in a batch goes through its own methods.
cdef object _direct = None


def bind(cls):
    """Let ``start_all``/``finish_all`` transition instances of ``cls`` (which must keep
    this module's attributes: ``_cond``, ``_state``, ``_result``, ...) directly."""
    global _direct
    _direct = cls


# AsyncRequest's states.
cdef enum:
    _ASYNC_PENDING = 0
    _ASYNC_RUNNING = 1
    _ASYNC_DONE = 2


cdef class AsyncRequest:
    """The queue's view of an async request: a future-like whose results go to a loop.

    It stands in the queue where a ``RequestFuture`` would: the workers only call
    ``set_running_or_notify_cancel``, ``set_result``, ``set_exception`` and ``done``, and
    ``start_all``/``finish_all`` do the same for a whole batch without a call each,
    handing each loop's channel the results of a batch in one post. Thread rules: the
    asyncio future (``_future``) is only ever completed on its loop, by its channel
    (``_channel``, a ``batchproc.aio.LoopChannel``: ``post``, ``post_many``); the workers
    only read whether it was cancelled."""

    cdef readonly object _future
    cdef readonly object _channel
    cdef int _state

    def __init__(self, future, channel):
        self._future = future
        self._channel = channel
        self._state = _ASYNC_PENDING

    def set_running_or_notify_cancel(self):
        """Called once, by the worker that popped it (or by stop()): False if the
        awaiter has cancelled, and then it is never processed."""
        if self._future.cancelled():
            self._state = _ASYNC_DONE
            return False
        self._state = _ASYNC_RUNNING
        return True

    def set_result(self, result):
        self._state = _ASYNC_DONE
        self._channel.post(self._future, True, result)

    def set_exception(self, exception):
        self._state = _ASYNC_DONE
        self._channel.post(self._future, False, exception)

    def done(self):
        return self._state == _ASYNC_DONE


cdef inline bint _done(object state):
    return state is FINISHED or state is CANCELLED or state is CANCELLED_AND_NOTIFIED


cdef inline void _wake(object f, list woken=None) except *:
    """Release every thread blocked in result()/exception() (their own locks); or, with
    ``woken``, add their sleepers to it, for the caller to release together."""
    cdef object sleepers = f._sleepers
    if sleepers is not None:
        if woken is not None:
            woken.extend(<list>sleepers)  # before they leave the future: it may fail
            f._sleepers = None
            return
        f._sleepers = None
        for sleeper in <list>sleepers:
            sleeper.release()


def start(f):
    """``set_running_or_notify_cancel``: 1 now RUNNING; 0 it was cancelled, now
    CANCELLED_AND_NOTIFIED; ``INVALID`` in any other state."""
    return _start(f)


cdef int _start(object f) except? -3:
    if f._cond is not None:
        return _NEED_LOCK
    state = f._state
    if state is PENDING:
        f._state = RUNNING
        return 1
    if state is CANCELLED:
        f._state = CANCELLED_AND_NOTIFIED
        return 0
    return _INVALID


def finish(f, value, bint is_exception):
    """``set_result``/``set_exception``: 1 done and callbacks are waiting to be called;
    0 done, no callbacks; ``INVALID`` if it was already done or cancelled."""
    return _finish(f, value, is_exception)


cdef int _finish(object f, object value, bint is_exception, list woken=None) except? -3:
    if f._cond is not None:
        return _NEED_LOCK
    if _done(f._state):
        return _INVALID
    if is_exception:
        f._exception = value
    else:
        f._result = value
    f._state = FINISHED
    _wake(f, woken)
    return 0 if f._first_callback is None else 1


def cancel(f):
    """``cancel``: 1 cancelled now (call the callbacks); 2 it already was; 0 it cannot be
    (running or finished)."""
    if f._cond is not None:
        return _NEED_LOCK
    state = f._state
    if state is PENDING:
        f._state = CANCELLED
        _wake(f)
        return 1
    if state is CANCELLED or state is CANCELLED_AND_NOTIFIED:
        return 2
    return 0


def add_callback(f, fn):
    """``add_done_callback``: 1 added; 0 the future is done (call ``fn`` now)."""
    cdef list new = None
    if f._first_callback is not None and type(f._done_callbacks) is not list:
        new = [fn]  # before the state is read (see the module)
    if f._cond is not None:
        return _NEED_LOCK
    if _done(f._state):
        return 0
    # The first callback is kept without a list: a future that outlives its batch (a
    # caller holding thousands) then holds one object fewer for the cyclic GC to scan.
    if f._first_callback is None:
        f._first_callback = fn
        return 1
    callbacks = f._done_callbacks
    if type(callbacks) is list:
        (<list>callbacks).append(fn)
    else:
        # Made above: with no list made, nothing ran since the first callback was read.
        f._done_callbacks = new
    return 1


def add_sleeper(f, sleeper):
    """A thread is about to block on ``sleeper`` (a held lock) until the future is done:
    1 registered (``finish``/``cancel`` will release it); 0 already done, do not block."""
    cdef list new = [sleeper]  # before the state is read (see the module)
    if f._cond is not None:
        return _NEED_LOCK
    if _done(f._state):
        return 0
    sleepers = f._sleepers
    if sleepers is None:
        f._sleepers = new
    else:
        (<list>sleepers).append(sleeper)
    return 1


def remove_sleeper(f, sleeper):
    """A blocked thread timed out: forget its lock. 1 removed; 0 it was not registered
    (it was released meanwhile)."""
    if f._cond is not None:
        return _NEED_LOCK
    sleepers = f._sleepers
    if sleepers is None:
        return 0
    for i in range(len(<list>sleepers)):
        if (<list>sleepers)[i] is sleeper:
            del (<list>sleepers)[i]
            return 1
    return 0


@cython.final
@cython.freelist(256)  # one is made and freed per request: reuse their memory
cdef class Request:
    """One queued request, as the queue and the workers hold it (immutable).

    ``future``: what the caller waits on (a ``RequestFuture`` or a future-like with the same
    ``set_running_or_notify_cancel``/``set_result``/``set_exception``/``done``).
    ``item``: the data as its format keeps it. ``format``: the ``BatchFormat`` that described
    it (shared by every request it may be batched with). ``rows``: samples it counts for
    toward ``max_batch_size``; ``nbytes``: bytes toward ``max_batch_memory_mb``; ``length``:
    its sequence length on the padded axis (0 when it is not padded). ``enqueued_at``:
    ``time.monotonic()`` at enqueue, in seconds.

    What the queue needs to queue it again for a retry: ``key`` (its compatibility key),
    ``queue_length`` (its length as the queue weighs it), ``priority`` (as given at
    enqueue) and ``deadline`` (monotonic time it expires while queued: ``enqueued_at``
    plus ``max_queue_time``, the limit as given, in seconds; ``inf``: never). The limit is
    kept as given, since the sum's rounding to the clock's magnitude loses what the
    subtraction would recover of a limit of microseconds or less.
    ``attempt``: 0 for the first try, k for the k-th retry; ``error``: the failure that
    sent it to be retried, or that ended a call it was in without a result for it (then
    with ``attempt`` 0: ``requeued``); None otherwise. ``done_parts``: for an item run in
    pieces (too large for one batch) and sent to be retried from a failing piece, what
    its attempts so far completed, ``(rows, outputs)``: its first ``rows`` rows, and the
    outputs of the pieces that held them, in order; None otherwise.
    """

    cdef readonly object future
    cdef readonly object item
    cdef readonly object format
    cdef readonly Py_ssize_t rows
    cdef readonly Py_ssize_t nbytes
    cdef readonly Py_ssize_t length
    cdef readonly double enqueued_at
    cdef readonly long long key
    cdef readonly Py_ssize_t queue_length
    cdef readonly object priority
    cdef readonly double max_queue_time
    cdef readonly double deadline
    cdef readonly int attempt
    cdef readonly object error
    cdef readonly object done_parts

    def __cinit__(self, future, item, format, Py_ssize_t rows, Py_ssize_t nbytes,
                  Py_ssize_t length, double enqueued_at, long long key=0,
                  Py_ssize_t queue_length=0, priority=2, double max_queue_time=INFINITY):
        self.future = future
        self.item = item
        self.format = format
        self.rows = rows
        self.nbytes = nbytes
        self.length = length
        self.enqueued_at = enqueued_at
        self.key = key
        self.queue_length = queue_length
        self.priority = priority
        self.max_queue_time = max_queue_time
        self.deadline = enqueued_at + max_queue_time

    cdef Request _copy(self, object item, Py_ssize_t rows, Py_ssize_t nbytes):
        cdef Request r = Request(self.future, item, self.format, rows, nbytes, self.length,
                                 self.enqueued_at, self.key, self.queue_length,
                                 self.priority, self.max_queue_time)
        r.attempt = self.attempt
        r.error = self.error
        r.done_parts = self.done_parts
        return r

    def replace_item(self, item, Py_ssize_t rows, Py_ssize_t nbytes):
        """The same request (future, format, length, arrival) holding part of its item:
        one chunk of an item too large for a batch."""
        cdef Request r = self._copy(item, rows, nbytes)
        r.done_parts = None
        return r

    def for_retry(self, error, done_parts=None):
        """The same request, to be tried once more after ``error``; ``done_parts``: what
        its attempts so far completed (see the class), kept for the next."""
        cdef Request r = self._copy(self.item, self.rows, self.nbytes)
        r.attempt = self.attempt + 1
        r.error = error
        r.done_parts = done_parts
        return r

    def requeued(self, error):
        """The same request, queued again alone after ``error`` ended its call without a
        result of its own (a call abandoned past ``item_timeout``): the same attempt;
        ``error`` kept, where it has no failure yet, to say why it ran before should it
        expire or be stopped before it runs again."""
        cdef Request r = self._copy(self.item, self.rows, self.nbytes)
        if r.error is None:
            r.error = error
        return r

    def __repr__(self):
        return (f"Request(rows={self.rows}, nbytes={self.nbytes}, length={self.length}, "
                f"format={self.format!r}, future={self.future!r})")

    def __reduce__(self):
        raise TypeError("Request cannot be pickled: it holds a live future")


def items_of(list requests):
    """The item of each request, in order."""
    cdef list out = []
    for r in requests:
        out.append((<Request?>r).item)
    return out


def enqueued_of(list requests):
    """The ``enqueued_at`` of each request, in order."""
    cdef list out = []
    for r in requests:
        out.append((<Request?>r).enqueued_at)
    return out


def total_rows(list requests):
    """The sum of the requests' ``rows``."""
    cdef Py_ssize_t total = 0
    for r in requests:
        total += (<Request?>r).rows
    return total


# What a queued shape (``changed_item``) holds besides fixed sizes: the request's rows,
# its length, or any size up to its length (one padded input of a named item: the
# request's length is its longest input's).
cdef enum:
    _QUEUED_LENGTH = -1
    _QUEUED_ROWS = -2
    _AT_MOST_LENGTH = -3

QUEUED_LENGTH = _QUEUED_LENGTH
QUEUED_ROWS = _QUEUED_ROWS
AT_MOST_LENGTH = _AT_MOST_LENGTH


cdef inline bint _size_fits(Py_ssize_t size, Py_ssize_t queued, Request request) noexcept:
    if queued >= 0:
        return size == queued
    if queued == _QUEUED_ROWS:
        return size == request.rows
    if queued == _QUEUED_LENGTH:
        return size == request.length
    return size <= request.length


def changed_item(list requests, items, tuple queued_shape):
    """The index of the first of ``items`` (each request's item, or one input of it, in
    order) whose shape now differs from the one its request was queued with, or -1.
    ``queued_shape``: the shape every one was queued with, a size per axis or
    ``QUEUED_ROWS`` (the request's ``rows``), ``QUEUED_LENGTH`` (its ``length``),
    ``AT_MOST_LENGTH`` (up to its ``length``). An ndarray's shape is read natively,
    anything else's from its ``shape`` (a tensor's); one with no shape differs.
    ``ValueError`` unless there is one item per request."""
    cdef list column = items if type(items) is list else list(items)
    cdef Py_ssize_t i, j, ndim = len(queued_shape)
    cdef Request request
    cdef cnp.npy_intp* dims
    if len(column) != len(requests):  # read unchecked below (boundscheck off)
        raise ValueError(f"{len(requests)} requests but {len(column)} items")
    for i in range(len(requests)):
        item = column[i]
        request = <Request?>requests[i]
        if cnp.PyArray_Check(item):
            if cnp.PyArray_NDIM(<cnp.ndarray>item) != ndim:
                return i
            dims = cnp.PyArray_DIMS(<cnp.ndarray>item)
            for j in range(ndim):
                if not _size_fits(dims[j], queued_shape[j], request):
                    return i
            continue
        try:
            shape = item.shape
            if len(shape) != ndim:
                return i
            for j in range(ndim):
                if not _size_fits(shape[j], queued_shape[j], request):
                    return i
        except (AttributeError, TypeError, IndexError, OverflowError):
            return i
    return -1


def longest(list requests):
    """The largest ``length`` among the requests (0 for none)."""
    cdef Py_ssize_t most = 0
    for r in requests:
        if (<Request?>r).length > most:
            most = (<Request>r).length
    return most


def start_all(list requests):
    """``set_running_or_notify_cancel`` on the future of each ``Request``, in order: the
    list of those now running. A cancelled one is left out, and its future becomes
    CANCELLED_AND_NOTIFIED.

    The ``Future`` API lets a caller start or complete its own future, which makes this
    call raise ``RuntimeError`` (logged) for that future. Here the rest of the batch must
    not be lost with it: a future already running is kept (it is completed as usual),
    one already done is left out. A retried request's future is running already: it is
    kept unless it is done."""
    cdef list live = []
    cdef object f
    cdef int code
    cdef bint started
    for r in requests:
        f = (<Request?>r).future
        if (<Request>r).attempt:
            # A retry: its future has been running since its first try.
            if not f.done():
                live.append(r)
            continue
        if type(f) is AsyncRequest:
            # Only reads whether the awaiter cancelled: the asyncio future itself is
            # only ever completed on its loop.
            if (<AsyncRequest>f)._future.cancelled():
                (<AsyncRequest>f)._state = _ASYNC_DONE
            else:
                (<AsyncRequest>f)._state = _ASYNC_RUNNING
                live.append(r)
            continue
        if _direct is not None and isinstance(f, _direct):
            code = _start(f)
            if code == 1:
                live.append(r)
                continue
            if code == 0:
                continue
            if f._state is RUNNING:
                # Running already (queued again after its batch's call was abandoned
                # past item_timeout), with a lock or not: kept, not started again
                # (its locked method would log the state as unexpected).
                live.append(r)
                continue
            if code == _INVALID:
                continue  # done: left out
        # A future with a lock, one its caller started or completed, or another
        # future-like: its own method.
        try:
            started = f.set_running_or_notify_cancel()
        except RuntimeError:
            started = not f.done()
        if started:
            live.append(r)
    return live


def finish_all(list requests, list results, list deferred=None, bint keep_gil=False):
    """``set_result(results[i])`` on the future of each ``Request``, in order; the results
    of ``AsyncRequest``s go to their loops' channels, one post per run of requests of one
    channel. In three steps: every transition (no code of the user's runs), then the
    threads blocked on these futures are woken together (``waiting.release_all``), then
    the futures' callbacks run, in order, and ``set_result`` is called on any future of
    another class. As ``Future.set_result`` wakes its callers before it runs a callback,
    no caller of a ``RequestFuture`` waits on a callback of the same ``finish_all`` (a
    slow one, one that waits for a caller or reads another future it completes).

    ``deferred``: a list the ``RequestFuture``s whose callbacks are still to run are
    appended to, in order, instead of running them (``futures.invoke_callbacks`` runs
    them): a failed batch's search completes its parts one call at a time, and a
    callback of one part must not run before the next part's call.

    ``keep_gil``: wake the blocked threads with the GIL held (``waiting.release_all``).

    Returns how many futures were already done: their results are dropped."""
    cdef Py_ssize_t i, n = len(requests), already_done = 0
    cdef object f, value
    cdef object channel = None
    cdef list posts = None
    cdef list woken = []
    cdef list later = None  # (future, value, _finish_one's code): the third step
    cdef int code
    if len(results) != n:
        raise ValueError(f"{n} requests but {len(results)} results")
    try:
        for i in range(n):
            f = (<Request?>requests[i]).future
            value = results[i]
            if type(f) is AsyncRequest:
                (<AsyncRequest>f)._state = _ASYNC_DONE
                if (<AsyncRequest>f)._channel is not channel:
                    if posts:
                        channel.post_many(posts)
                    channel = (<AsyncRequest>f)._channel
                    posts = []
                posts.append(((<AsyncRequest>f)._future, True, value))
                continue
            code = _finish_one(f, value, woken)
            if code == _DONE_NOW:
                continue
            if code == _WAS_DONE:
                already_done += 1
                continue
            if code == _CALLBACKS_LATER and deferred is not None:
                deferred.append(f)
                continue
            if later is None:
                later = []
            later.append((f, value, code))
    finally:
        try:
            if posts:
                channel.post_many(posts)
        finally:
            try:
                if woken:
                    _release_all(woken, keep_gil)
            finally:
                if later is not None:
                    already_done += _run_later(later)
    return already_done


# What _finish_one did with a future.
cdef enum:
    _DONE_NOW = 0          # done, nothing left to run
    _WAS_DONE = 1          # it was done already: its result dropped
    _CALLBACKS_LATER = 2   # done; its callbacks are to run in the third step
    _SET_LATER = 3         # another class's: its set_result is to run in the third step


cdef int _finish_one(object f, object value, list woken) except -1:
    """``finish_all``'s first step for one future other than an ``AsyncRequest``: what it
    did (``_DONE_NOW`` ...). Its sleepers join ``woken``."""
    cdef int code
    if _direct is not None and isinstance(f, _direct):
        code = _finish(f, value, False, woken)
        if code == _NEED_LOCK:
            # Handed to wait()/as_completed(): its transition under its lock, which
            # notifies their waiters and wakes its own callers at once.
            code = f._finish_locked(value, False)
        if code == 0:
            return _DONE_NOW
        if code == _INVALID:
            return _WAS_DONE
        return _CALLBACKS_LATER
    return _SET_LATER


cdef Py_ssize_t _run_later(list later) except -1:
    """``finish_all``'s third step: how many of ``later``'s futures were already done.
    What one raises (a broken future class) is raised once the others have run."""
    cdef Py_ssize_t already_done = 0
    cdef object error = None
    for f, value, code in later:
        try:
            if code == _CALLBACKS_LATER:
                f._invoke_callbacks()  # it runs them all, whatever one raises
            else:
                f.set_result(value)
        except InvalidStateError:
            already_done += 1
        except BaseException as exc:
            if error is None:
                error = exc
    if error is not None:
        raise error
    return already_done


# What take_like returns in place of an item: it stopped because it took ``count`` items,
# because the iterator ended, or because an item it took came at or after ``due``.
TOOK_ALL = object()
ENDED = object()
DUE = object()


cdef inline double _monotonic() noexcept nogil:
    """``time.monotonic()`` (CLOCK_MONOTONIC, as CPython reads it on POSIX)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def take_like(iterator, Request template, Py_ssize_t count, list requests, list items,
              double due=INFINITY):
    """Take up to ``count`` more items from ``iterator`` as long as each is exactly like
    ``template.item`` (a plain ndarray: same type, same dtype object, same shape), which
    the describer would describe as it did ``template``: append a copy of ``template``
    holding each to ``requests`` and the item to ``items``. Returns ``(taken, stop)``:
    ``stop`` is ``TOOK_ALL``, ``ENDED``, ``DUE`` (the last item taken came at or after
    ``due``, a ``time.monotonic()`` time: the source is slow, and the caller queues what
    it has), or the first item that differs (taken from the iterator, not appended: the
    caller describes it). Exceptions of the iterator propagate; what was taken before
    stays appended.

    ``BatchProcessor.map``'s per-item loop for the common case, an iterator of arrays
    of one shape: no Python step per item."""
    cdef object proto = template.item
    cdef object cls = type(proto)
    cdef object dtype = proto.dtype
    cdef object shape = proto.shape
    cdef bint timed = due != INFINITY
    cdef Py_ssize_t taken = 0
    cdef object item
    cdef Request r
    while taken < count:
        item = next(iterator, ENDED)
        if item is ENDED:
            return taken, ENDED
        if type(item) is not cls or item.dtype is not dtype or item.shape != shape:
            return taken, item
        r = template._copy(item, template.rows, template.nbytes)
        requests.append(r)
        items.append(item)
        taken += 1
        if timed and _monotonic() >= due:
            return taken, DUE
    return taken, TOOK_ALL

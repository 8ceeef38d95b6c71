# cython: language_level=3
"""The per-request intake of ``enqueue_predict`` and ``enqueue_predict_async``, in one
native call.

Why native: the intake runs on the caller's thread, once per request, holding the GIL
that the workers need too: on an event loop it runs on the one thread that also runs
every task, so each microsecond of it is a microsecond of the loop's capacity, and a
burst from one thread is as fast as its intake (benchmarks/profile_async.py measures the
intake and its parts). The common case, a plain ndarray of a dtype and shape described
before, is all here: for a coroutine, the check that its loop is the one used last; the
memoised description (``KnownArrays``); the future (for a coroutine, the asyncio future
and the queue's stand-in for it, ``future_state.AsyncRequest``); the ``Request`` record
and the push. Anything else (another item, an argument to check, a refusal, another
loop) is answered ``None``, and the caller takes its Python path, which does all of it
with its errors; nothing is queued then.

``KnownArrays`` is also the describer's own memo of plain ndarrays
(``formats.base.Describer``): one memo, so the two paths can never give one kind of item
two keys (which would split its batches).
"""

cimport cython
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.object cimport PyObject
from libc.math cimport INFINITY, NAN, isfinite
from libc.string cimport memcmp, memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cimport numpy as cnp
from numpy cimport npy_intp

import asyncio as _asyncio
import os as _os
import queue as _queue

import numpy as np

from batchproc._native.future_state import AsyncRequest as _AsyncRequest
from batchproc._native.future_state import Request as _Request
from batchproc._native.request_queue import QueueClosed as _QueueClosed

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    int np_ndim "PyArray_NDIM"(cnp.PyArrayObject* arr) noexcept nogil
    npy_intp* np_dims "PyArray_DIMS"(cnp.PyArrayObject* arr) noexcept nogil
    cnp.PyArray_Descr* np_descr "PyArray_DESCR"(cnp.PyArrayObject* arr) noexcept nogil

cdef object _ndarray = np.ndarray
cdef object _get_running_loop = _asyncio._get_running_loop
cdef object _Full = _queue.Full

# The longest shape the last-entry cache compares (numpy 2 allows 64 dimensions; a
# longer one is simply not cached).
cdef enum:
    _CACHED_DIMS = 64

# Which loop runs in this thread, read as asyncio reads it but without its getpid():
# CPython 3.10 and 3.11 keep, in the thread-state dict, a holder of the running loop and
# of the process id it was set in, and ask the kernel for the process id at every
# ``get_running_loop()`` (a system call per request on the loop's one thread). Here the
# process id is this module's, renewed in a forked child (as CPython 3.12+ itself does,
# resetting the running loop there). The holder's layout is fixed in those released
# versions and checked by its type's name; anything else is answered -1 (unknown), and
# asyncio is asked.
cdef extern from *:
    """
    #if PY_VERSION_HEX < 0x030C0000 && defined(HAVE_GETPID) && !defined(MS_WINDOWS)
    typedef struct {
        PyObject_HEAD
        PyObject *rl_loop;
        pid_t rl_pid;
    } bp_RunningLoopHolder;

    static int bp_running_loop_is(PyObject *key, PyObject *loop, long pid) {
        PyObject *dict = PyThreadState_GetDict();
        PyObject *holder;
        if (dict == NULL) return -1;
        holder = PyDict_GetItemWithError(dict, key);
        if (holder == NULL) {
            PyErr_Clear();
            return -1;
        }
        if (strcmp(Py_TYPE(holder)->tp_name, "_RunningLoopHolder") != 0) return -1;
        return ((bp_RunningLoopHolder *)holder)->rl_loop == loop
            && ((bp_RunningLoopHolder *)holder)->rl_pid == (pid_t)pid;
    }
    #else
    static int bp_running_loop_is(PyObject *key, PyObject *loop, long pid) {
        return -1;
    }
    #endif
    """
    int bp_running_loop_is(PyObject* key, PyObject* loop, long pid) noexcept


cdef str _RUNNING_LOOP_KEY = "__asyncio_running_event_loop__"  # the dict's key
cdef long _pid = _os.getpid()


def _renew_pid():
    global _pid
    _pid = _os.getpid()


if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_renew_pid)


cdef inline int _reading(loop) noexcept:
    """1 if ``loop`` runs in this thread, 0 if it does not, -1 if only asyncio can tell
    (CPython 3.12+, or a holder not recognised)."""
    return bp_running_loop_is(<PyObject*>_RUNNING_LOOP_KEY, <PyObject*>loop, _pid)


def _running_loop_is(loop):
    """The reading above, for tests."""
    return _reading(loop)


cdef object _running_loop_of(channel):
    """``channel``'s loop if it is the loop running in this thread, else None."""
    loop = channel.loop_ref()
    if loop is None:
        return None
    cdef int running = _reading(loop)
    if running == 1 or (running == -1 and _get_running_loop() is loop):
        return loop
    return None


cdef double _queue_seconds(object max_queue_time) except? -1.0:
    """A request's ``max_queue_time`` in seconds: ``inf`` for None, itself for a positive
    finite float; NaN for anything else (the Python path checks it)."""
    cdef double seconds
    if max_queue_time is None:
        return INFINITY
    if PyFloat_CheckExact(max_queue_time):
        seconds = PyFloat_AS_DOUBLE(max_queue_time)
        if isfinite(seconds) and seconds > 0.0:
            return seconds
    return NAN


cdef inline double _monotonic() noexcept nogil:
    """``time.monotonic()`` (CLOCK_MONOTONIC on Linux, as CPython's)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


@cython.final
cdef class KnownArrays:
    """What describing a plain ndarray gave, by its (dtype, shape): the entry
    ``(key, format, rows, nbytes, length, queue_length, dtype)`` of the first item
    described with them (tuples of Python objects, as the queue and ``Request`` take
    them). At most ``limit`` entries: past it, all are forgotten at once (an item then
    only gets described again).

    Only dtypes without metadata are remembered, and a dtype with metadata compares (and
    hashes) equal to them: ``get`` checks it has none, unless it is the very dtype
    remembered (an unpickled array's is an equal copy). The last entry found is also
    kept by the identity of its dtype and its shape, so a stream of one kind of item
    finds it without building a key."""

    cdef dict _entries
    cdef Py_ssize_t _limit
    cdef object _last            # the last entry found or added; None when forgotten
    cdef PyObject* _last_descr   # its dtype (held by the entry)
    cdef int _last_ndim
    cdef npy_intp _last_dims[_CACHED_DIMS]

    def __cinit__(self, Py_ssize_t limit):
        self._entries = {}
        self._limit = limit
        self._last = None

    def __len__(self):
        return len(self._entries)

    def get(self, item):
        """The entry of ``item`` (an exact ``np.ndarray``, else None), or None."""
        if type(item) is not _ndarray:
            return None
        return self._find(<cnp.ndarray>item)

    def add(self, cnp.ndarray item not None, tuple entry not None):
        """Remember ``entry`` (of the form above, its dtype ``item``'s, without metadata)
        for ``item``'s dtype and shape. ``TypeError`` for an item other than an exact
        ndarray (``get`` finds no other), ``ValueError`` for an entry of another length."""
        if type(item) is not _ndarray:
            raise TypeError(f"an exact numpy.ndarray, not {type(item).__name__}")
        if len(entry) != 7:
            raise ValueError(f"an entry holds 7 fields, not {len(entry)}")
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[item.dtype, (<object>item).shape] = entry
        self._keep_last(item, entry)

    cdef object _find(self, cnp.ndarray arr):
        cdef int ndim = np_ndim(<cnp.PyArrayObject*>arr)
        cdef PyObject* descr = <PyObject*>np_descr(<cnp.PyArrayObject*>arr)
        if (descr == self._last_descr and ndim == self._last_ndim and self._last is not None
                and memcmp(np_dims(<cnp.PyArrayObject*>arr), self._last_dims,
                           ndim * sizeof(npy_intp)) == 0):
            return self._last
        dtype = <object>descr
        entry = self._entries.get((dtype, (<object>arr).shape))
        if entry is None:
            return None
        if (<tuple>entry)[6] is not dtype and dtype.metadata is not None:
            return None
        self._keep_last(arr, <tuple>entry)
        return entry

    cdef int _keep_last(self, cnp.ndarray arr, tuple entry) except -1:
        cdef int ndim = np_ndim(<cnp.PyArrayObject*>arr)
        cdef object dtype = entry[6]
        if ndim > _CACHED_DIMS or <PyObject*>np_descr(<cnp.PyArrayObject*>arr) != <PyObject*>dtype:
            self._last = None  # an equal dtype of another identity: found by key
            return 0
        memcpy(self._last_dims, np_dims(<cnp.PyArrayObject*>arr), ndim * sizeof(npy_intp))
        self._last_ndim = ndim
        self._last_descr = <PyObject*>dtype
        self._last = entry
        return 0

    def clear(self):
        self._entries.clear()
        self._last = None


@cython.final
cdef class Intake:
    """The common case of ``enqueue_predict`` and ``enqueue_predict_async`` (see the
    module's docstring), for one processor: ``queue`` its ``RequestQueue``, ``arrays`` its
    describer's memo, ``future_type`` the future ``enqueue_predict`` returns and
    ``async_future_type`` the asyncio future ``enqueue_predict_async`` returns, and
    ``cancel_queued`` the ``weakref.WeakMethod`` of the processor's ``_cancel_queued``.
    Each future gets its ``_bp_token`` and ``_bp_cancel_queued`` here; neither this object
    nor a future holds its processor."""

    cdef KnownArrays _arrays
    cdef object _push
    cdef object _future_type
    cdef object _async_future_type
    cdef object _cancel_queued
    # The LoopChannel used last: read once per call (another thread may replace it
    # meanwhile), and the loop taken from the channel read.
    cdef readonly object last_channel

    def __cinit__(self, queue, KnownArrays arrays, future_type, async_future_type,
                  cancel_queued):
        self._arrays = arrays
        self._push = queue.push
        self._future_type = future_type
        self._async_future_type = async_future_type
        self._cancel_queued = cancel_queued
        self.last_channel = None

    def use_channel(self, channel):
        """The channel of the loop the last async request came from (``LoopChannel``)."""
        self.last_channel = channel

    def enqueue(self, item, priority, max_queue_time):
        """``enqueue_predict(item, None, priority, max_queue_time)``: queue ``item``,
        waiting for room in a full queue (without the GIL), and return its future; or
        ``None``, with nothing queued, unless ``item`` is a plain ndarray known to the memo,
        ``max_queue_time`` is None or a positive finite float (seconds) and the queue is
        open. With a ``max_queue_time``, a full queue is left to the Python path, whose
        wait for room ends by it. Bad ``priority``: ``TypeError``/``ValueError`` from the
        queue, as on the Python path."""
        cdef double now, limit
        known = self._known(item, max_queue_time, &now, &limit)
        if known is None:
            return None
        future = self._future_type()
        if not self._push_request(known, item, future, future, priority, now, limit,
                                  max_queue_time, None if limit == INFINITY else 0):
            return None
        return future

    def enqueue_async(self, item, priority, max_queue_time):
        """``enqueue_predict_async(item, priority, max_queue_time)``: queue ``item`` and
        return its asyncio future; or ``None``, with nothing queued, unless the channel's
        loop runs in this thread, ``item`` is a plain ndarray known to the memo,
        ``max_queue_time`` is None or a positive finite float (seconds), and the queue
        takes it without waiting. Bad ``priority``: as ``enqueue``."""
        cdef double now, limit
        channel = self.last_channel
        if channel is None or type(item) is not _ndarray:
            return None
        loop = _running_loop_of(channel)
        if loop is None:
            return None
        known = self._known(item, max_queue_time, &now, &limit)
        if known is None:
            return None
        future = self._async_future_type(loop=loop)
        stand_in = _AsyncRequest(future, channel)
        if not self._push_request(known, item, stand_in, future, priority, now, limit,
                                  max_queue_time, 0):
            return None
        return future

    cdef tuple _known(self, item, max_queue_time, double* now, double* limit):
        """The memo's entry of ``item``, its arrival time (``now``) and its
        ``max_queue_time`` in seconds (``limit``, ``inf`` for none); None where the Python
        path must take it."""
        if type(item) is not _ndarray:
            return None
        entry = self._arrays._find(<cnp.ndarray>item)
        if entry is None:
            return None
        limit[0] = _queue_seconds(max_queue_time)
        if limit[0] != limit[0]:
            return None
        now[0] = _monotonic()
        return <tuple>entry

    cdef bint _push_request(self, tuple known, item, stand_in, future, priority,
                            double now, double limit, max_queue_time,
                            timeout) except -1:
        """Push ``item``'s request (its future-like ``stand_in``) as described by
        ``known``; set ``future._bp_token`` and ``_bp_cancel_queued``. False if the queue
        refused it (full past ``timeout``, or closed)."""
        key, rows, nbytes, queue_length = known[0], known[2], known[3], known[5]
        request = _Request(stand_in, item, known[1], rows, nbytes, known[4], now, key,
                           queue_length, priority, limit)
        try:  # the request's deadline, as it sums it (inf: never)
            token = self._push(request, priority, rows, nbytes, key, timeout, queue_length,
                               now + limit)
        except (_Full, _QueueClosed):
            return False
        future._bp_token = token
        future._bp_cancel_queued = self._cancel_queued
        return True

# cython: autotestdict=False
"""Bounded request heap in front of the batch dispatcher.

``RequestQueue`` orders requests by (priority, arrival) in a binary heap of C structs and
hands them out a batch at a time. It has its own mutex and condition variables, so every
blocking wait runs without the GIL and other Python threads keep running meanwhile.

How the GIL and the queue mutex meet (the one rule that keeps this deadlock-free): a
thread never waits for the GIL while it holds the mutex, and never runs Python code
(nor allocates Python objects, which may start the GC and its finalizers) under it. A
thread that holds the GIL only ever *tries* the mutex (fast path); when that fails, or
when it has to wait, it drops the GIL first and then locks. Under the mutex the only
Python-level work is moving object pointers in and out of the item table, which runs
no Python code.

Python objects never reach nogil code: they live in a Python list indexed by slot, and the
heap only holds slot numbers. A popped slot is put back on the free list only after its
object has been moved out of the table, so a slot is never reused under a live object.

Once a consumer has taken a batch, an object in the table is off the cyclic garbage
collector's lists (see ``_leave_gc``) and back on them the moment it leaves, by whatever
path: a burst of waiting requests costs the collector nothing.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.list cimport PyList_New
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.number cimport PyNumber_Index
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.ref cimport PyObject, Py_XDECREF, Py_XINCREF
from libc.math cimport INFINITY, isnan
from libc.stdint cimport INT64_MAX, INT64_MIN, UINT64_MAX, int32_t, int64_t, uint64_t
from libc.stdlib cimport free, realloc

import queue as _queue
import threading as _threading

from batchproc._native import waiting as _waiting

cdef extern from "Python.h":
    # Declared on PyObject* so moves between the table and C buffers stay plain
    # pointer moves, with reference counts handled explicitly.
    PyObject* PyList_GET_ITEM(PyObject* lst, Py_ssize_t i)
    void PyList_SET_ITEM(PyObject* lst, Py_ssize_t i, PyObject* o)
    Py_ssize_t PyList_GET_SIZE(PyObject* lst)
    unsigned long PyThread_get_thread_ident() nogil

cdef extern from "Python.h":
    int PyObject_IS_GC(object o)
    int PyObject_GC_IsTracked(object o)
    void PyObject_GC_Track(object o)
    void PyObject_GC_UnTrack(object o)


# A queued entry is reachable through its queue until it leaves, so while it waits the
# collector need not walk it, nor carry it up its generations (a burst of waiting
# requests would otherwise start full collections over the whole heap). Untracking is
# safe for an object that stays reachable: it only hides the cycles it is part of, and
# tracking it again when it leaves lets the collector find them (CPython untracks its
# own dicts and tuples of atomic values the same way). The one cycle that must not be
# hidden runs through the queue itself, which only a collection could then free: hence
# entries stay tracked until a consumer has taken a batch (one that does drains the
# queue before it lets go of it).
cdef inline void _leave_gc(object o) noexcept:
    if PyObject_IS_GC(o) and PyObject_GC_IsTracked(o):
        PyObject_GC_UnTrack(o)


cdef inline void _rejoin_gc(object o) noexcept:
    # No Python code, no allocation: safe under the mutex.
    if PyObject_IS_GC(o) and not PyObject_GC_IsTracked(o):
        PyObject_GC_Track(o)


cdef extern from "request_queue_sync.h" namespace "batchproc_rq":
    cdef cppclass Sync:
        pass
    cdef cppclass PopBuf:
        int32_t* slots
        void** objs
        size_t n
        PopBuf() noexcept nogil
        bint has_room() noexcept nogil

    double mono_now "batchproc_rq::now"() noexcept nogil
    void set_let_go "batchproc_rq::set_let_go"(void* count) noexcept nogil
    Sync* sync_new() noexcept nogil
    void sync_delete(Sync* s) noexcept nogil
    bint sync_try_lock(Sync* s) noexcept nogil
    void sync_lock(Sync* s) noexcept nogil
    void sync_unlock(Sync* s) noexcept nogil
    void wait_items(Sync* s, double deadline) noexcept nogil
    bint spin_items(Sync* s, double until, uint64_t* pushed_at) noexcept nogil
    void linger_for_let_go(Sync* s, uint64_t pushed_at, double seconds) noexcept nogil
    int spinners(Sync* s) noexcept nogil
    uint64_t spins(Sync* s) noexcept nogil
    uint64_t item_wakes(Sync* s) noexcept nogil
    uint64_t lingers(Sync* s) noexcept nogil
    uint64_t lingers_seen(Sync* s) noexcept nogil
    int linger_score(Sync* s) noexcept nogil
    int PAY_ONE "batchproc_busy::PayScore::ONE"
    void notify_pushed(Sync* s) noexcept nogil
    void wait_fill(Sync* s, double deadline) noexcept nogil
    void wait_room(Sync* s, double deadline) noexcept nogil
    void wait_expiry(Sync* s, double deadline) noexcept nogil
    void notify_expiry_all(Sync* s) noexcept nogil
    void wait_watch(Sync* s, double deadline) noexcept nogil
    void notify_watch_all(Sync* s) noexcept nogil
    void notify_items_one(Sync* s) noexcept nogil
    size_t items_waiting(Sync* s) noexcept nogil
    void notify_fill_all(Sync* s) noexcept nogil
    void notify_room_one(Sync* s) noexcept nogil
    void notify_room_all(Sync* s) noexcept nogil
    void notify_everyone(Sync* s) noexcept nogil


# The let-go count of batchproc._native.waiting (see there). A consumer starting to wait
# for items bumps it: a caller spinning for its result takes the GIL back once the
# worker that delivered it waits for the next requests. And the other way round: a pop
# that a spin caught waits for its pusher to let go of the GIL (linger_for_let_go),
# which a caller does as it begins to wait for its result.
set_let_go(PyCapsule_GetPointer(_waiting.let_go_capsule, b"batchproc._native.waiting.let_go"))


class QueueClosed(RuntimeError):
    """Raised by ``RequestQueue.push`` once the queue is closed."""


# A token packs the entry's sequence number above its slot: slot = token & _SLOT_MASK.
# Capacity is at most 2**24, so a slot fits in 24 bits.
cdef int _SLOT_BITS = 24
cdef int64_t _SLOT_MASK = (1 << 24) - 1
cdef int64_t _MAX_CAPACITY = 1 << 24
MAX_CAPACITY = _MAX_CAPACITY  # for Python callers that check a capacity first (the config)
cdef int64_t _MAX_PRIORITY = 2147483647
# rows, nbytes and length are capped so that the totals of a full queue (2**24 entries)
# can never overflow int64: 2**24 * (2**39 - 1) < 2**63.
cdef int64_t _MAX_COUNT = (1 << 39) - 1
MAX_COUNT = _MAX_COUNT  # for Python callers that check a count before pushing it
# Below this a token fits in an int64 and is built without Python arithmetic.
cdef uint64_t _FAST_SEQ_LIMIT = (<uint64_t>1) << 39
# The main thread wakes this often from a blocking wait to run signal handlers, so that
# Ctrl-C interrupts a push/pop blocked with timeout=None. Other threads never poll.
cdef double _SIGNAL_SLICE = 0.1
# How much faster than the requests carried across a call (an open load's rate) the rows
# after its delivery must come to be its clients coming back (see _wave_deadline).
cdef double WAVE_PACE = 8.0


def _set_wave_pace(pace):
    """Test hook: how much faster than the carried rows a wave must come (default 8);
    returns the pace it replaces."""
    global WAVE_PACE
    previous = WAVE_PACE
    WAVE_PACE = float(pace)
    return previous


# The longest a pop that a spin caught waits for its pusher to let go of the GIL
# (linger_for_let_go): as long as a caller waits for the worker's (waiting.LINGER_MAX).
POP_LINGER = 30e-6
cdef double _pop_linger = POP_LINGER


def _set_pop_linger(seconds):
    """Test hook: the longest a pop that a spin caught waits for a let-go (default
    POP_LINGER)."""
    global _pop_linger
    _pop_linger = float(seconds)


cdef unsigned long _MAIN_IDENT = <unsigned long>_threading.main_thread().ident

# Status codes of the locked helpers (negative = nothing happened, try again).
cdef enum:
    RQ_OK = 0
    RQ_FULL = 1
    RQ_CLOSED = 2
    RQ_NOMEM = 3
    RQ_RETRY = -1       # the caller must wait (fast path) or handle signals (main thread)


ctypedef struct Entry:
    int64_t priority    # _AGED once it waited past max_priority_wait
    uint64_t seq        # arrival order; also the token's high part
    int64_t rows
    int64_t nbytes
    int64_t key
    int64_t length      # sequence length; a batch costs rows x its longest length
    double t_push       # mono_now() at publication (for a parked entry: when it is due)
    int32_t slot
    bint solo           # always a batch of its own (a request being retried)

ctypedef struct TEntry:
    # An entry of a timer heap: what time it is keyed on, its slot, and the order it came
    # in (entries due at one time leave in that order: retries parked together come
    # back in line as they were).
    double key
    int32_t slot
    uint64_t order

ctypedef struct SlotInfo:
    uint64_t seq        # seq of the slot's latest entry (UINT64_MAX: none yet)
    Py_ssize_t pos      # its index in the heap while queued, else -1
    Py_ssize_t dpos     # its index in the deadline heap, else -1
    Py_ssize_t ppos     # its index in the parked heap, else -1
    Py_ssize_t apos     # its index in the ageing heap, else -1

ctypedef struct PopParams:
    int64_t max_rows
    int64_t max_bytes
    int64_t max_tokens  # <= 0: no cap
    int64_t fill_rows
    double max_wait
    double idle_gap
    double fill_time
    bint fill           # whether step 2 (the fill wait) applies at all
    uint64_t retargets  # the queue's retargets the caller planned for (stale: pop nothing)
    bint planned        # whether the caller gave one
    bint caught_push    # out: a spin of this pop was ended (by a push: linger_for_let_go) ...
    uint64_t pushed_at  # ... and the let-go count then


ctypedef struct Taken:
    # The batch a pop is taking, as the walk of step 3 needs it to take more.
    int64_t key
    bint ended          # a solo head, or a compatible entry that ended the walk: no more
    int64_t rows
    int64_t nbytes
    int64_t longest     # the longest length among its entries
    int64_t per_token   # the most bytes per row and unit of length among its entries
    int64_t last_priority   # the (priority, seq) of its last entry
    uint64_t last_seq


# The priority an entry gets once it has waited longer than max_priority_wait: above
# every level a push accepts, so aged entries go first, among themselves by arrival.
cdef int64_t _AGED = -1

# Which position field of SlotInfo a timer heap keeps up to date.
cdef enum:
    T_DEADLINE = 0
    T_PARKED = 1
    T_AGE = 2


# ---------------------------------------------------------------- heap kernels
# Min-heap on (priority, seq). Every move records the entry's new index in SlotInfo.pos so
# cancel() can remove an entry from the middle in O(log n).

cdef inline int64_t _bytes_per_token(const Entry* e) noexcept nogil:
    """An entry's bytes per row and unit of length, rounded up (0 unless it has both)."""
    if e.rows <= 0 or e.length <= 0:
        return 0
    if e.rows > _MAX_COUNT // e.length:
        # rows x length exceeds any nbytes (< 2**39): less than a byte each, rounded up.
        return 1 if e.nbytes > 0 else 0
    return (e.nbytes + e.rows * e.length - 1) // (e.rows * e.length)


cdef inline bint _before(const Entry* a, const Entry* b) noexcept nogil:
    return a.priority < b.priority or (a.priority == b.priority and a.seq < b.seq)


cdef void _sift_up(Entry* h, SlotInfo* info, Py_ssize_t i) noexcept nogil:
    cdef Entry e = h[i]
    cdef Py_ssize_t parent
    while i > 0:
        parent = (i - 1) >> 1
        if not _before(&e, &h[parent]):
            break
        h[i] = h[parent]
        info[h[i].slot].pos = i
        i = parent
    h[i] = e
    info[e.slot].pos = i


cdef void _sift_down(Entry* h, SlotInfo* info, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    cdef Entry e = h[i]
    cdef Py_ssize_t child
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and _before(&h[child + 1], &h[child]):
            child += 1
        if not _before(&h[child], &e):
            break
        h[i] = h[child]
        info[h[i].slot].pos = i
        i = child
    h[i] = e
    info[e.slot].pos = i


cdef inline void _heap_push(Entry* h, SlotInfo* info, Py_ssize_t* n,
                            const Entry* e) noexcept nogil:
    h[n[0]] = e[0]
    n[0] += 1
    _sift_up(h, info, n[0] - 1)


cdef void _heap_remove(Entry* h, SlotInfo* info, Py_ssize_t* n, Py_ssize_t i,
                       Entry* out) noexcept nogil:
    """Remove h[i] into *out and restore the heap."""
    out[0] = h[i]
    info[out.slot].pos = -1
    n[0] -= 1
    if i == n[0]:
        return
    h[i] = h[n[0]]
    if i > 0 and _before(&h[i], &h[(i - 1) >> 1]):
        _sift_up(h, info, i)
    else:
        _sift_down(h, info, n[0], i)


# ---------------------------------------------------------------- timer heaps
# Min-heaps of (time, slot) for deadlines, parked entries and ageing. Each records its
# entries' indexes in one position field of SlotInfo, so an entry leaving the queue any
# way (popped, cancelled, expired) leaves its timer heaps in O(log n).

cdef inline void _t_setpos(SlotInfo* info, int which, int32_t slot,
                           Py_ssize_t i) noexcept nogil:
    if which == T_DEADLINE:
        info[slot].dpos = i
    elif which == T_PARKED:
        info[slot].ppos = i
    else:
        info[slot].apos = i


cdef inline bint _t_before(const TEntry* a, const TEntry* b) noexcept nogil:
    return a.key < b.key or (a.key == b.key and a.order < b.order)


cdef void _t_sift_up(TEntry* h, SlotInfo* info, int which, Py_ssize_t i) noexcept nogil:
    cdef TEntry e = h[i]
    cdef Py_ssize_t parent
    while i > 0:
        parent = (i - 1) >> 1
        if not _t_before(&e, &h[parent]):
            break
        h[i] = h[parent]
        _t_setpos(info, which, h[i].slot, i)
        i = parent
    h[i] = e
    _t_setpos(info, which, e.slot, i)


cdef void _t_sift_down(TEntry* h, SlotInfo* info, int which, Py_ssize_t n,
                       Py_ssize_t i) noexcept nogil:
    cdef TEntry e = h[i]
    cdef Py_ssize_t child
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and _t_before(&h[child + 1], &h[child]):
            child += 1
        if not _t_before(&h[child], &e):
            break
        h[i] = h[child]
        _t_setpos(info, which, h[i].slot, i)
        i = child
    h[i] = e
    _t_setpos(info, which, e.slot, i)


cdef inline void _t_push(TEntry* h, SlotInfo* info, int which, Py_ssize_t* n, double key,
                         int32_t slot, uint64_t* order) noexcept nogil:
    h[n[0]].key = key
    h[n[0]].slot = slot
    h[n[0]].order = order[0]
    order[0] += 1
    n[0] += 1
    _t_sift_up(h, info, which, n[0] - 1)


cdef void _t_remove(TEntry* h, SlotInfo* info, int which, Py_ssize_t* n,
                    Py_ssize_t i) noexcept nogil:
    _t_setpos(info, which, h[i].slot, -1)
    n[0] -= 1
    if i == n[0]:
        return
    h[i] = h[n[0]]
    if i > 0 and _t_before(&h[i], &h[(i - 1) >> 1]):
        _t_sift_up(h, info, which, i)
    else:
        _t_sift_down(h, info, which, n[0], i)


# ---------------------------------------------------------------- argument checks
# Validate with the GIL, before any lock: bad input raises, never reaches the C state.

cdef int64_t _int_arg(object v, str name, int64_t lo, int64_t hi) except? -1:
    """v as an int64 in [lo, hi]; TypeError/ValueError naming the argument."""
    cdef int overflow = 0
    cdef long long x
    if not PyLong_Check(v):
        v = _as_index(v, name)
    x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow != 0 or x < lo or x > hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v!r}")
    return x


cdef inline int64_t _priority_arg(object v) except? -1:
    return _int_arg(v, "priority", 0, _MAX_PRIORITY)


def priority_arg(priority):
    """``priority`` as ``RequestQueue.push`` (so ``enqueue_predict``) reads it, as an int:
    an integer (``operator.index``: an int, a bool as the int it is, a numpy integer)
    from 0 to 2**31-1.
    ``TypeError`` for what is not an integer, ``ValueError`` out of range, naming it. For
    a caller that checks a priority before it pushes (``map``, at the call)."""
    return _priority_arg(priority)


cdef int64_t _int_arg_clamped(object v, str name) except? -1:
    """v as an int64, saturating at the int64 limits (for caps where that is exact)."""
    cdef int overflow = 0
    cdef long long x
    if not PyLong_Check(v):
        v = _as_index(v, name)
    x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow > 0:
        return INT64_MAX
    if overflow < 0:
        return INT64_MIN
    return x


cdef uint64_t _count_arg(object v, str name) except? 0:
    """v as a uint64 (a count the queue gave out, such as ``watch_wakes``): an integer
    (``operator.index``), never a float cut to one; TypeError/ValueError naming it."""
    if not PyLong_Check(v):
        v = _as_index(v, name)
    if v < 0 or v > UINT64_MAX:
        raise ValueError(f"{name} must be in [0, {UINT64_MAX}], got {v!r}")
    return v


cdef object _as_index(object v, str name):
    # Kept out of the int helpers so their common path (an int) sets up no try block.
    cdef type kind = type(v)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"):
        # No integer: numpy 2.3+ refuses its index, older numpy warns and gives 0 or 1.
        raise TypeError(f"{name} must be an int, not numpy.{kind.__name__}")
    try:
        return PyNumber_Index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(v).__name__}") from None


cdef double _float_arg(object v, str name) except? -1.0:
    """v as a double; NaN and non-numbers rejected."""
    cdef double x
    if PyFloat_CheckExact(v):
        x = PyFloat_AS_DOUBLE(v)
    else:
        x = _as_double(v, name)
    if isnan(x):
        raise ValueError(f"{name} must not be NaN")
    return x


cdef double _spin_arg(object v, str name) except? -1.0:
    cdef double x = _float_arg(v, name)
    if not 0.0 <= x < INFINITY:
        raise ValueError(f"{name} must be finite seconds >= 0, got {v!r}")
    return x


cdef double _as_double(object v, str name) except? -1.0:
    cdef double x
    try:
        x = v
    except TypeError:
        raise TypeError(f"{name} must be a number of seconds, not {type(v).__name__}") from None
    except OverflowError:       # an int too large for a double
        x = INFINITY if v > 0 else -INFINITY
    return x


cdef double _timeout_arg(object v) except? -1.0:
    """None -> +inf (wait forever); else seconds >= 0."""
    if v is None:
        return INFINITY
    cdef double x = _float_arg(v, "timeout")
    if x < 0.0:
        raise ValueError(f"timeout must be None or >= 0, got {v!r}")
    return x


cdef double _deadline_arg(object v) except? -1.0:
    """A point in time on the monotonic clock; +inf means never."""
    return _float_arg(v, "deadline")


cdef inline double _wake_by() noexcept:
    """When a blocking wait must come back to run signal handlers (main thread only)."""
    if PyThread_get_thread_ident() == _MAIN_IDENT:
        return mono_now() + _SIGNAL_SLICE
    return INFINITY


cdef inline object _token(uint64_t seq, int32_t slot):
    if seq < _FAST_SEQ_LIMIT:
        return <int64_t>((seq << _SLOT_BITS) | <uint64_t>slot)
    return ((<object>seq) << _SLOT_BITS) | slot     # ~5e11 pushes later: still unique


cdef inline bint _grow(void** array, size_t nbytes) noexcept nogil:
    """realloc ``*array`` to ``nbytes``; on failure it is left as it was."""
    cdef void* grown = realloc(array[0], nbytes)
    if grown == NULL:
        return False
    array[0] = grown
    return True


cdef inline double _age_since(double pushed) noexcept nogil:
    """Seconds since ``pushed`` (monotonic); 0.0 for INFINITY (nothing queued)."""
    if pushed == INFINITY:
        return 0.0
    return max(0.0, mono_now() - pushed)


@cython.final
@cython.auto_pickle(False)
@cython.no_gc_clear     # the item table must outlive finalizers that may still call us
cdef class RequestQueue:
    """Bounded queue of requests, ordered by (priority, arrival), popped a batch at a time.

    ``capacity`` (1 .. 2**24) bounds the number of entries held; a push on a full queue
    waits for room. Lower ``priority`` values are served first and entries of one level
    in arrival order; with ``priorities=False`` the queue is plain FIFO and ``priority``
    arguments are still validated but otherwise ignored.

    All methods are thread-safe. Blocking waits release the GIL; the main thread wakes
    every 0.1 s while blocked so that Ctrl-C (signal handlers) still works. Times are
    measured on the clock of ``time.monotonic()``.

    Capacity accounting: a slot counts against ``capacity`` from the moment a push
    reserves it until the object has been handed out (pop/drain) or dropped (cancel), i.e.
    until the call that removed it returns; ``len()`` counts only queued entries.
    """

    cdef Sync* _sync
    cdef Entry* _heap           # _len entries, heap-ordered
    cdef SlotInfo* _info        # per slot, _nslots of them
    cdef int32_t* _free         # free slots (LIFO: the most recently used is warm in cache)
    cdef Entry* _skip           # scratch for entries a pop walks past (used under the lock)
    cdef Py_ssize_t _len, _nfree, _nslots, _arrays_cap, _skip_cap
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _used       # reserved slots: queued + being pushed + being handed out
    cdef int64_t _rows          # rows of queued entries
    cdef uint64_t _seq
    cdef double _last_push
    cdef double _last_arrival   # the latest push time given to an entry coming into line
    cdef uint64_t _timed        # entries put on a timer heap (their order there)
    cdef bint _priorities, _closed
    cdef bint _paused           # pops hand nothing out while set (until close)
    cdef Py_ssize_t _in_flight  # batches the consumer says are running (begin/end_batch)
    cdef double _idle_since     # when the batches that left _in_flight at 0 were answered
    cdef int64_t _idle_rows     # rows queued then (carried across the last call)
    cdef double _begun_at       # the latest begin_batch
    cdef double _answered_at    # the latest answer_batch, and the rows queued then
    cdef int64_t _answered_rows
    cdef int64_t _last_batch_rows  # rows of the last batch popped by pop_batch ...
    cdef Py_ssize_t _last_batch_len  # ... and its entries
    # Threads waiting for a batch to fill, and for room (item waiters: the Sync's stack).
    cdef Py_ssize_t _w_fill, _w_room
    cdef int64_t _fill_need     # least fill_rows among the filling consumers
    cdef list _items            # slot -> object; only touched with the GIL held
    cdef bint _hide_entries     # from the first pop_batch: entries off the GC's lists
    cdef double _parked_until   # once closed, pops wait for no parked entry due later
    # Time: deadlines of queued and parked entries; parked entries by when they are due
    # (their records in _parked, by slot); queued entries by push time while ageing is on
    # (_aging >= 0); slots of expired entries not yet taken out (take_expired).
    cdef TEntry* _dheap
    cdef TEntry* _pheap
    cdef TEntry* _aheap
    cdef Entry* _parked
    cdef int32_t* _expired
    cdef Py_ssize_t _dlen, _plen, _alen, _nexpired, _w_exp
    cdef double _aging
    cdef uint64_t _pushed       # entries accepted by push() (parks are not arrivals)
    cdef uint64_t _retargets    # retarget() calls: pops planned before one pop nothing
    cdef uint64_t _watch_wakes  # wake_watch() (close, pause, resume) calls: see await_late
    cdef uint64_t _watch_looks  # times await_late looked at the queue (a test hook's)
    cdef double _spin           # seconds a pop spins on an empty queue before parking ...
    cdef double _spin_window    # ... if the last push was at most this long ago

    def __cinit__(self, *args, **kwargs):
        self._fill_need = INT64_MAX
        self._spin_window = 0.002
        self._parked_until = INFINITY
        self._sync = sync_new()
        if self._sync == NULL:
            raise MemoryError()

    def __init__(self, capacity, priorities=True, max_priority_wait=None):
        cdef bint ok
        cdef double aging = -1.0
        if self._items is not None:
            raise RuntimeError("RequestQueue is already initialised")
        self._capacity = <Py_ssize_t>_int_arg(capacity, "capacity", 1, _MAX_CAPACITY)
        self._priorities = bool(priorities)
        if max_priority_wait is not None:
            aging = _float_arg(max_priority_wait, "max_priority_wait")
            if aging < 0.0:
                raise ValueError(
                    f"max_priority_wait must be None or >= 0, got {max_priority_wait!r}")
        # Without priorities the heap is FIFO already: nothing to age.
        self._aging = aging if self._priorities else -1.0
        with nogil:     # nobody else can see the queue yet; the lock is for form only
            sync_lock(self._sync)
            ok = self._grow_arrays(False)
            sync_unlock(self._sync)
        if not ok:
            raise MemoryError()
        # Last: it marks the queue as initialised. Until then capacity is 0, so a queue
        # made by __new__ alone refuses pushes (queue.Full) and is empty, never crashes.
        self._items = []

    def __reduce__(self):
        raise TypeError("a RequestQueue cannot be pickled (it holds threads' waits)")

    def __dealloc__(self):
        cdef object entry
        if self._items is not None:
            # What is still queued goes back to the collector before the table lets go
            # of it: a cycle it is part of can then be found.
            for entry in self._items:
                _rejoin_gc(entry)
        free(self._heap)
        free(self._info)
        free(self._free)
        free(self._skip)
        free(self._dheap)
        free(self._pheap)
        free(self._aheap)
        free(self._parked)
        free(self._expired)
        if self._sync != NULL:
            sync_delete(self._sync)

    # ------------------------------------------------------------ locked helpers
    # Everything below that ends in _locked runs with the mutex held and touches no
    # Python object; callers hold the GIL (fast path) or not (slow path).

    cdef bint _grow_arrays(self, bint beyond_capacity) noexcept nogil:
        # A parked retry may take a slot past capacity (it was accepted already), up to
        # the slot limit of a token.
        cdef Py_ssize_t limit = _MAX_CAPACITY if beyond_capacity else self._capacity
        cdef Py_ssize_t ncap = self._arrays_cap * 2
        if ncap < 16:
            ncap = 16
        if ncap > limit:
            ncap = limit
        if ncap <= self._arrays_cap:
            return False
        # Each array is grown in place; one that fails leaves the others larger, which
        # is harmless: _arrays_cap stays the capacity all of them have.
        if not (_grow(<void**>&self._dheap, ncap * sizeof(TEntry))
                and _grow(<void**>&self._pheap, ncap * sizeof(TEntry))
                and _grow(<void**>&self._aheap, ncap * sizeof(TEntry))
                and _grow(<void**>&self._parked, ncap * sizeof(Entry))
                and _grow(<void**>&self._expired, ncap * sizeof(int32_t))
                and _grow(<void**>&self._heap, ncap * sizeof(Entry))
                and _grow(<void**>&self._info, ncap * sizeof(SlotInfo))
                and _grow(<void**>&self._free, ncap * sizeof(int32_t))):
            return False
        self._arrays_cap = ncap
        return True

    cdef bint _grow_skip(self) noexcept nogil:
        cdef Py_ssize_t ncap = self._skip_cap * 2
        if ncap < 16:
            ncap = 16
        cdef Entry* s = <Entry*>realloc(self._skip, ncap * sizeof(Entry))
        if s == NULL:
            return False
        self._skip = s
        self._skip_cap = ncap
        return True

    cdef int _reserve_locked(self, int32_t* slot) noexcept nogil:
        """Take a free slot for a push: RQ_OK, RQ_FULL, RQ_CLOSED or RQ_NOMEM."""
        if self._closed:
            return RQ_CLOSED
        if self._used >= self._capacity:
            return RQ_FULL
        return self._take_slot_locked(slot, False)

    cdef int _take_slot_locked(self, int32_t* slot, bint beyond_capacity) noexcept nogil:
        cdef int32_t s
        if self._nfree > 0:
            self._nfree -= 1
            s = self._free[self._nfree]
        else:
            if self._nslots == self._arrays_cap and not self._grow_arrays(beyond_capacity):
                return RQ_FULL if self._nslots >= _MAX_CAPACITY else RQ_NOMEM
            s = <int32_t>self._nslots
            self._nslots += 1
            self._info[s].seq = UINT64_MAX
            self._info[s].pos = -1
            self._info[s].dpos = -1
            self._info[s].ppos = -1
            self._info[s].apos = -1
        self._used += 1
        slot[0] = s
        return RQ_OK

    cdef int _reserve_wait_locked(self, double deadline, double wake_by,
                                  int32_t* slot) noexcept nogil:
        cdef int r
        cdef double t
        while True:
            r = self._reserve_locked(slot)
            if r != RQ_FULL:
                return r
            t = mono_now()
            if t >= deadline:
                return RQ_FULL
            if t >= wake_by:
                return RQ_RETRY
            self._w_room += 1
            wait_room(self._sync, deadline if deadline < wake_by else wake_by)
            self._w_room -= 1

    cdef inline bint _held_locked(self) noexcept nogil:
        """Paused and not closed: pops hand nothing out until resume() wakes them all."""
        return self._paused and not self._closed

    cdef int _publish_locked(self, int32_t s, int64_t priority, int64_t rows, int64_t nbytes,
                             int64_t key, int64_t length, double deadline,
                             uint64_t* seq, bint accepted) noexcept nogil:
        """Queue the entry whose object is already in slot s; wake consumers. On a closed
        queue only an entry ``accepted`` already (``push_again``)."""
        cdef Entry e
        cdef double now
        if self._closed and not accepted:
            return RQ_CLOSED
        now = mono_now()
        if self._plen > 0:
            self._arrive_due_locked(now)
        e.priority = priority if self._priorities else 0
        e.seq = self._seq
        self._seq += 1
        self._pushed += 1
        e.rows = rows
        e.nbytes = nbytes
        e.key = key
        e.length = length
        e.t_push = now
        e.slot = s
        e.solo = False
        self._info[s].seq = e.seq
        _heap_push(self._heap, self._info, &self._len, &e)
        self._rows += rows
        self._last_push = self._last_arrival = e.t_push
        if self._aging >= 0.0:
            _t_push(self._aheap, self._info, T_AGE, &self._alen, e.t_push, s, &self._timed)
        if deadline != INFINITY:
            self._add_deadline_locked(deadline, s)
        # One new entry can start one idle consumer. Filling consumers only need waking
        # once the rows they wait for are there (_fill_need: fill_rows, or the rows at
        # which a wave or a fill on pace is complete, see _wake_rows_locked): short of
        # those a push only moves their other deadlines (head age, idle gap) later, and
        # they re-check those when they wake. Waking them on every push would cost a
        # context switch per request in a burst. A paused queue hands nothing out, so a
        # push wakes no consumer (resume() wakes them all).
        if not self._held_locked():
            if self._len == 1:
                notify_pushed(self._sync)
            else:
                notify_items_one(self._sync)
        if self._w_fill > 0 and self._rows >= self._fill_need:
            notify_fill_all(self._sync)
        seq[0] = e.seq
        return RQ_OK

    cdef void _add_deadline_locked(self, double deadline, int32_t s) noexcept nogil:
        # The collector waits for the earliest deadline: wake it if this one is earlier.
        if self._w_exp > 0 and (self._dlen == 0 or deadline < self._dheap[0].key):
            notify_expiry_all(self._sync)
        _t_push(self._dheap, self._info, T_DEADLINE, &self._dlen, deadline, s, &self._timed)

    cdef void _unindex_locked(self, int32_t s) noexcept nogil:
        """Take a slot that leaves the queue out of its deadline and ageing heaps."""
        cdef SlotInfo* inf = &self._info[s]
        if inf.dpos >= 0:
            _t_remove(self._dheap, self._info, T_DEADLINE, &self._dlen, inf.dpos)
        if inf.apos >= 0:
            _t_remove(self._aheap, self._info, T_AGE, &self._alen, inf.apos)

    cdef bint _remove_slot_locked(self, int32_t s) noexcept nogil:
        """Take the entry of slot s out of the queue, queued or parked; False if it is
        neither."""
        cdef Entry e
        cdef SlotInfo* inf = &self._info[s]
        if inf.pos >= 0:
            _heap_remove(self._heap, self._info, &self._len, inf.pos, &e)
            self._rows -= e.rows
        elif inf.ppos >= 0:
            _t_remove(self._pheap, self._info, T_PARKED, &self._plen, inf.ppos)
        else:
            return False
        self._unindex_locked(s)
        if self._w_fill > 0:
            # A filling consumer may have lost its head (or every entry): let it
            # re-evaluate, or go back to waiting for an entry under its own timeout.
            notify_fill_all(self._sync)
        return True

    cdef void _tick_locked(self) noexcept nogil:
        """Apply the clock: expire entries past their deadline, queue parked entries that
        are due, age entries that waited past max_priority_wait. Cheap when none of these
        is in use (three length checks)."""
        cdef double now
        cdef int32_t s
        cdef Py_ssize_t i, before
        if self._dlen == 0 and self._plen == 0 and self._alen == 0:
            return
        now = mono_now()
        before = self._nexpired
        while self._dlen > 0 and self._dheap[0].key <= now:
            s = self._dheap[0].slot
            self._remove_slot_locked(s)
            self._expired[self._nexpired] = s
            self._nexpired += 1
        if self._nexpired > before and self._w_exp > 0:
            notify_expiry_all(self._sync)
        if self._plen > 0:
            self._arrive_due_locked(now)
        while self._alen > 0 and self._aheap[0].key + self._aging < now:
            s = self._aheap[0].slot
            _t_remove(self._aheap, self._info, T_AGE, &self._alen, 0)
            i = self._info[s].pos
            self._heap[i].priority = _AGED
            _sift_up(self._heap, self._info, i)

    cdef void _arrive_due_locked(self, double now) noexcept nogil:
        """Queue the parked entries due by ``now``, soonest due first (on every look,
        and before a push: an entry pushed after a retry was due goes behind it)."""
        cdef double arrived
        cdef int32_t s
        cdef Entry e
        while self._plen > 0 and self._pheap[0].key <= now:
            s = self._pheap[0].slot
            arrived = self._pheap[0].key
            _t_remove(self._pheap, self._info, T_PARKED, &self._plen, 0)
            e = self._parked[s]
            # Due: it arrives again, at the back of the line. It waits from when it was
            # due, not from this tick (which may come late: no pop may be looking while
            # a call hangs); in a FIFO queue no earlier than the entries ahead of it came
            # into line, so that the head stays the oldest entry.
            if self._len == 0 or arrived >= self._last_arrival:
                self._last_arrival = arrived
            elif not self._priorities:
                arrived = self._last_arrival
            e.seq = self._seq
            self._seq += 1
            e.t_push = arrived
            self._info[s].seq = e.seq
            _heap_push(self._heap, self._info, &self._len, &e)
            self._rows += e.rows
            if self._aging >= 0.0:
                _t_push(self._aheap, self._info, T_AGE, &self._alen, arrived, s,
                        &self._timed)

    cdef inline bint _nothing_coming_locked(self) noexcept nogil:
        """Closed, with no parked entry a pop should wait for (none parked, or the first
        due after ``close``'s ``parked_until``)."""
        return self._closed and (self._plen == 0
                                 or self._next_due_locked() > self._parked_until)

    cdef double _next_due_locked(self) noexcept nogil:
        """When the earliest parked entry is due (INFINITY: none is parked)."""
        return self._pheap[0].key if self._plen > 0 else INFINITY

    cdef void _release_slots_locked(self, const int32_t* slots, Py_ssize_t n) noexcept nogil:
        """Return emptied slots to the free list and wake as many producers."""
        cdef Py_ssize_t i, _k
        for i in range(n):
            self._free[self._nfree] = slots[i]
            self._nfree += 1
        self._used -= n
        if self._w_room > 0:
            if n >= self._w_room:
                notify_room_all(self._sync)
            else:
                for _k in range(n):
                    notify_room_one(self._sync)

    cdef inline double _fill_deadline(self, const PopParams* p) noexcept nogil:
        """When the fill wait for the current head ends (see pop_batch, step 2)."""
        cdef double head_pushed = self._heap[0].t_push
        # The ceiling, always, from the oldest entry: with priorities the head may be
        # newer (an urgent arrival), and must not restart an older one's wait. (A scan
        # then, of fewer entries than the batch's rows: this only runs while it fills.)
        cdef double d = self._oldest_locked() + p.max_wait
        cdef double g, on_pace
        if p.idle_gap < 0.0 or self._in_flight > 0:
            return d        # plain, or the model is busy: keep filling up to the ceiling
        if self._head_carried(p):
            return self._wave_deadline(p, head_pushed)
        # Idle model: a wave that began within fill_time of the last batch's end and
        # holds as many entries and rows as that batch did is back whole (its clients,
        # answered together): nothing more of it is coming to wait for. (Rows alone
        # would send the first of clients whose requests differ in size without the
        # rest.)
        if (p.fill_time > 0.0 and 0 < self._last_batch_len <= self._len
                and self._last_batch_rows <= self._rows
                and head_pushed <= self._idle_since + p.fill_time):
            return 0.0
        # Otherwise the batch also goes once arrivals pause for idle_gap ...
        g = (self._last_push if self._last_push > self._idle_since
             else self._idle_since) + p.idle_gap
        # ... unless a wave of arrivals is still coming in on pace: it began within
        # fill_time of the last batch's end (the clients it answered coming back), holds
        # at least two rows (a rate to go by) but fewer than that batch held, and at the
        # rate rows came since the head, as many would be in within fill_time. Then the
        # pause is a hiccup in the wave, and going now would leave the rest of it a call
        # of its own.
        if (p.fill_time > 0.0 and 2 <= self._rows < self._last_batch_rows
                and head_pushed <= self._idle_since + p.fill_time):
            on_pace = head_pushed + p.fill_time * (
                <double>self._rows / <double>self._last_batch_rows)
            if on_pace > g:
                g = on_pace
        return g if g < d else d

    cdef inline double _wave_deadline(self, const PopParams* p,
                                      double head_pushed) noexcept nogil:
        """The fill wait of a head carried across the last batch (pushed while it ran).

        Carried requests came while the model was busy; they go at once, whatever their
        age, unless the batch just delivered brings its clients back in a wave: the rows
        pushed since the end come faster than ``WAVE_PACE`` times the rate the carried
        rows came at (from the head's push to the end), and fewer are back than that
        batch held.
        Then the wait lasts while each next row of the wave keeps that pace and comes
        within ``idle_gap`` of the last, never past ``max_wait`` after the end. Going
        without the wave would leave it a call of its own, and the two halves of a
        closed loop would alternate at a model that runs one call at a time.
        """
        cdef int64_t wave = self._rows - self._idle_rows
        cdef double busy = self._idle_since - head_pushed
        cdef double until, by_pace
        if wave >= self._last_batch_rows:
            return 0.0      # the wave is back
        if wave < 0:
            wave = 0        # some were taken or cancelled meanwhile
        until = (self._last_push if self._last_push > self._idle_since
                 else self._idle_since) + p.idle_gap
        if self._idle_rows > 0 and busy > 0.0:
            by_pace = self._idle_since + <double>(wave + 1) * busy / (
                WAVE_PACE * <double>self._idle_rows)
            if by_pace < until:
                until = by_pace
        if until > self._idle_since + p.max_wait:
            until = self._idle_since + p.max_wait
        return until

    cdef inline bint _head_carried(self, const PopParams* p) noexcept nogil:
        """The fill wait is the wave rule's (``_wave_deadline``): the idle rules are on,
        nothing is in flight, and the head was pushed before the last batch ended."""
        return (p.idle_gap >= 0.0 and p.fill_time > 0.0 and self._in_flight == 0
                and self._heap[0].t_push < self._idle_since)

    cdef inline int64_t _wake_rows_locked(self, const PopParams* p) noexcept nogil:
        """Queued rows at which a fill wait must be woken because its deadline moves
        earlier: the wave of _wave_deadline complete, or, for a fill held on pace
        (_fill_deadline), as many rows as the last batch held (the pace no longer holds
        it, the idle gap does); INT64_MAX when neither rule holds the wait."""
        if self._head_carried(p):
            return self._idle_rows + self._last_batch_rows
        if (p.idle_gap >= 0.0 and p.fill_time > 0.0 and self._in_flight == 0
                and self._rows < self._last_batch_rows):
            return self._last_batch_rows
        return INT64_MAX

    cdef Py_ssize_t _select_locked(self, const PopParams* p, PopBuf* buf,
                                   Taken* t) noexcept nogil:
        """Step 3 of pop_batch: move the batch's slots into buf. Requires _len > 0."""
        cdef Entry head
        _heap_remove(self._heap, self._info, &self._len, 0, &head)
        buf.slots[buf.n] = head.slot        # buf starts empty with stack room: no check
        buf.n += 1
        self._rows -= head.rows
        self._unindex_locked(head.slot)
        t.key = head.key
        t.ended = head.solo
        t.rows = head.rows
        t.nbytes = head.nbytes
        t.longest = head.length
        t.per_token = _bytes_per_token(&head)
        t.last_priority = head.priority
        t.last_seq = head.seq
        self._extend_locked(p, buf, t)
        self._last_batch_rows = t.rows
        self._last_batch_len = <Py_ssize_t>buf.n
        return <Py_ssize_t>buf.n

    cdef Py_ssize_t _extend_locked(self, const PopParams* p, PopBuf* buf,
                                   Taken* t) noexcept nogil:
        """Step 3's walk after the head: take the queued entries that join batch t, in
        (priority, arrival) order, up to the first that does not fit. How many it took."""
        cdef Entry e
        cdef const Entry* top
        cdef Py_ssize_t nskip = 0, i
        cdef size_t before = buf.n
        cdef int64_t longest_after, per_token_after
        if t.ended:
            return 0
        while self._len > 0:
            top = &self._heap[0]
            if top.key != t.key or top.solo:
                # Incompatible: set aside, reinserted below with its own (priority, seq),
                # so it keeps its place and order.
                if nskip == self._skip_cap and not self._grow_skip():
                    break       # out of memory: a shorter batch, never a crash
                _heap_remove(self._heap, self._info, &self._len, 0, &self._skip[nskip])
                nskip += 1
                continue
            # No overtaking: the first compatible entry that does not fit ends the batch.
            # (Written as differences: totals never exceed 2**63 - 1, caps are >= 0.)
            t.ended = True
            if top.priority < t.last_priority or (
                    top.priority == t.last_priority and top.seq < t.last_seq):
                # Pushed after the batch was taken and more urgent than its last entry
                # (a top-up): it heads the next batch, and this one stays in order.
                break
            if top.rows > p.max_rows - t.rows:
                break
            if p.max_bytes > 0 and top.nbytes > p.max_bytes - t.nbytes:
                break
            if p.max_tokens > 0:
                # (rows after) x (longest after) <= max_tokens, tested by division: the
                # product could overflow. Both sides are >= 0, so // floors exactly.
                longest_after = top.length if top.length > t.longest else t.longest
                if (longest_after > 0 and
                        t.rows + top.rows > p.max_tokens // longest_after):
                    break
            if p.max_bytes > 0 and (t.longest > 0 or top.length > 0):
                # Padded, the batch's bytes are its rows x its longest length x the most
                # bytes per row and unit of length among its entries (by division again).
                longest_after = top.length if top.length > t.longest else t.longest
                per_token_after = _bytes_per_token(top)
                if per_token_after < t.per_token:
                    per_token_after = t.per_token
                if per_token_after > 0 and (
                        longest_after > p.max_bytes // per_token_after or
                        t.rows + top.rows >
                        p.max_bytes // per_token_after // longest_after):
                    break
            if not buf.has_room():
                break
            t.ended = False
            _heap_remove(self._heap, self._info, &self._len, 0, &e)
            buf.slots[buf.n] = e.slot
            buf.n += 1
            self._unindex_locked(e.slot)
            t.rows += e.rows
            t.nbytes += e.nbytes
            if e.length > t.longest:
                t.longest = e.length
            per_token_after = _bytes_per_token(&e)
            if per_token_after > t.per_token:
                t.per_token = per_token_after
            t.last_priority = e.priority
            t.last_seq = e.seq
            self._rows -= e.rows
        for i in range(nskip):
            _heap_push(self._heap, self._info, &self._len, &self._skip[i])
        return <Py_ssize_t>(buf.n - before)

    cdef inline bint _stale_locked(self, const PopParams* p) noexcept nogil:
        return p.planned and p.retargets != self._retargets

    cdef Py_ssize_t _try_pop_locked(self, const PopParams* p, bint may_wait,
                                    PopBuf* buf, Taken* t) noexcept nogil:
        """pop_batch without waiting: the batch size, or RQ_RETRY if it must wait."""
        if self._stale_locked(p):
            return 0
        self._tick_locked()
        if self._len == 0 or self._held_locked():
            if self._nothing_coming_locked() or not may_wait:
                return 0
            return RQ_RETRY
        if (p.fill and not self._closed and self._rows < p.fill_rows
                and not self._heap[0].solo):
            if mono_now() < self._fill_deadline(p):
                return RQ_RETRY
        return self._select_locked(p, buf, t)

    cdef Py_ssize_t _wait_pop_locked(self, PopParams* p, double deadline, double wake_by,
                                     PopBuf* buf, Taken* taken) noexcept nogil:
        """pop_batch steps 1-3 with waits: the batch size (0: none), or RQ_RETRY at wake_by
        (the objects still in their slots: ``_top_up`` takes them out)."""
        cdef double t, d
        cdef int64_t wake_rows
        cdef bint spun = False
        while True:
            # Step 1: wait for any live entry (and, while paused, for resume or close).
            # Parked entries count as coming: a wait ends when the first is due, and a
            # closed queue still hands them out then.
            self._tick_locked()
            while self._len == 0 or self._held_locked():
                if self._nothing_coming_locked() or self._stale_locked(p):
                    return 0
                t = mono_now()
                if t >= deadline:
                    return 0
                if t >= wake_by:
                    return RQ_RETRY
                d = deadline if deadline < wake_by else wake_by
                if not self._held_locked():
                    if self._next_due_locked() < d:
                        d = self._next_due_locked()
                if (not spun and self._spin > 0.0 and not self._paused
                        and t - self._last_push <= self._spin_window):
                    # Requests came a moment ago: the next may be as near (a client
                    # waiting on each answer).
                    spun = True
                    p.caught_push = spin_items(
                        self._sync, t + self._spin if t + self._spin < d else d, &p.pushed_at)
                else:
                    wait_items(self._sync, d)
                self._tick_locked()
            # Step 2: let the batch fill, bounded by the head's age and the idle gap.
            if p.fill:
                while (self._len > 0 and not self._closed and not self._paused
                       and self._rows < p.fill_rows and not self._heap[0].solo):
                    if self._stale_locked(p):
                        return self._leave_stale_locked()
                    d = self._fill_deadline(p)
                    t = mono_now()
                    if t >= d:
                        break
                    if t >= wake_by:
                        return RQ_RETRY
                    self._w_fill += 1
                    if p.fill_rows < self._fill_need:
                        self._fill_need = p.fill_rows
                    wake_rows = self._wake_rows_locked(p)
                    if wake_rows < self._fill_need:
                        self._fill_need = wake_rows
                    wait_fill(self._sync, d if d < wake_by else wake_by)
                    self._w_fill -= 1
                    if self._w_fill == 0:
                        self._fill_need = INT64_MAX
                    self._tick_locked()
                if self._len == 0 or self._held_locked():
                    # Cancelled, taken by another consumer or paused meanwhile: back to
                    # step 1, with what is left of `timeout`.
                    continue
            if self._stale_locked(p):
                return self._leave_stale_locked()
            return self._select_locked(p, buf, taken)

    cdef void _top_up(self, const PopParams* p, PopBuf* buf, Taken* t):
        """After a pop that waited, the GIL held again: take the entries pushed since
        that join batch t, then move the objects out and free the slots. The batch
        cannot run before its worker holds the GIL, and a producer holds it while it
        pushes (an event loop resuming its tasks pushes their next requests in one
        pass): those requests go in this batch instead of waiting for the next."""
        if not sync_try_lock(self._sync):
            with nogil:
                sync_lock(self._sync)
        self._tick_locked()
        if not self._held_locked() and self._extend_locked(p, buf, t) > 0:
            self._last_batch_rows = t.rows
            self._last_batch_len = <Py_ssize_t>buf.n
        self._move_out(buf)
        self._release_slots_locked(buf.slots, <Py_ssize_t>buf.n)
        sync_unlock(self._sync)

    cdef Py_ssize_t _leave_stale_locked(self) noexcept nogil:
        """A stale pop (see ``retarget``) leaves entries it may have been counted on to
        take (a push into the empty queue while it spun wakes nobody): the wake goes on
        to a parked consumer. 0: popped nothing."""
        notify_items_one(self._sync)
        return 0

    cdef Py_ssize_t _drain_locked(self, PopBuf* buf) noexcept nogil:
        cdef Entry e
        cdef int32_t s
        while self._len > 0 and buf.has_room():
            _heap_remove(self._heap, self._info, &self._len, 0, &e)
            buf.slots[buf.n] = e.slot
            buf.n += 1
            self._rows -= e.rows
            self._unindex_locked(e.slot)
        # Then the parked entries, soonest due first.
        while self._plen > 0 and buf.has_room():
            s = self._pheap[0].slot
            _t_remove(self._pheap, self._info, T_PARKED, &self._plen, 0)
            self._unindex_locked(s)
            buf.slots[buf.n] = s
            buf.n += 1
        return <Py_ssize_t>buf.n

    cdef bint _unlink_locked(self, int64_t slot, uint64_t seq) noexcept nogil:
        """Remove the queued entry (slot, seq) from the heap; False if not queued."""
        cdef SlotInfo* inf
        if slot >= self._nslots:
            return False
        inf = &self._info[slot]
        # The seq check is what tells a reused slot's new entry from the old token.
        if inf.pos < 0 or inf.seq != seq:
            return False
        return self._remove_slot_locked(<int32_t>slot)

    # ------------------------------------------------------------ GIL-side helpers

    cdef void _store(self, int32_t s, object item) noexcept:
        """Put item into table slot s, which holds None (and take it off the collector's
        lists once the queue has a consumer); or put None back into the slot of an item,
        which is tracked again (a push undone: its caller still holds it). Safe under the
        mutex: the reference dropped is None's, or one the caller also holds, so no
        Python code can run."""
        cdef PyObject* lst = <PyObject*>self._items
        cdef PyObject* old = PyList_GET_ITEM(lst, s)
        if item is not None and self._hide_entries:
            _leave_gc(item)
        if old != <PyObject*>None:
            _rejoin_gc(<object>old)
        Py_XINCREF(<PyObject*>item)
        PyList_SET_ITEM(lst, s, <PyObject*>item)
        Py_XDECREF(old)

    cdef void _move_out(self, PopBuf* buf) noexcept:
        """Move the objects of buf's slots into buf.objs, leaving None behind, and track
        them again. Only pointer moves (we take over the table's references) and the
        collector's list links, so it is safe under the mutex."""
        cdef PyObject* lst = <PyObject*>self._items
        cdef PyObject* none = <PyObject*>None
        cdef size_t i
        cdef int32_t s
        for i in range(buf.n):
            s = buf.slots[i]
            buf.objs[i] = <void*>PyList_GET_ITEM(lst, s)
            _rejoin_gc(<object>buf.objs[i])
            Py_XINCREF(none)
            PyList_SET_ITEM(lst, s, none)

    cdef void _release_slots(self, const int32_t* slots, Py_ssize_t n) noexcept:
        if sync_try_lock(self._sync):
            self._release_slots_locked(slots, n)
            sync_unlock(self._sync)
        else:
            with nogil:
                sync_lock(self._sync)
                self._release_slots_locked(slots, n)
                sync_unlock(self._sync)

    cdef int _ensure_table(self, int32_t s) except -1:
        """Grow the item table (GIL only, never under the mutex) to hold slot s."""
        cdef Py_ssize_t n = len(self._items)
        cdef Py_ssize_t target
        if s < n:
            return 0
        target = max(16, 2 * n, s + 1)
        if target > self._capacity:
            target = max(self._capacity, s + 1)    # past capacity only for parked retries
        self._items.extend([None] * (target - n))
        return 0

    cdef list _to_list(self, PopBuf* buf):
        """A list owning buf.objs' references (PyList_SET_ITEM steals them)."""
        cdef Py_ssize_t n = <Py_ssize_t>buf.n, i
        cdef list out
        try:
            out = PyList_New(n)
        except BaseException:
            for i in range(n):
                Py_XDECREF(<PyObject*>buf.objs[i])
            buf.n = 0
            raise
        for i in range(n):
            PyList_SET_ITEM(<PyObject*>out, i, <PyObject*>buf.objs[i])
        buf.n = 0
        return out

    # ------------------------------------------------------------ public API

    @property
    def spin(self):
        """Seconds a pop that finds the queue empty busy-waits for a push before it
        parks, if the last push was at most ``spin_window`` seconds ago; 0.0 (the
        default): never. It spins with the GIL and the queue's lock released, yielding
        its CPU between looks, and takes a push it sees at once, without the thread
        wake-up a parked consumer costs (that push wakes no parked consumer); once per
        pop. A paused queue is never spun on. Having taken its entries, such a pop waits
        up to ``POP_LINGER`` seconds more, the GIL still released, for the pushing thread
        to let go of the GIL (as a caller does when it begins to wait for its result),
        so that it does not ask for the GIL while the pusher holds it and park on it;
        only while most recent such waits saw their let-go (one in 128 otherwise).
        ``ValueError`` for a negative, infinite or NaN value."""
        return self._spin

    @spin.setter
    def spin(self, value):
        self._spin = _spin_arg(value, "spin")

    @property
    def spin_window(self):
        """How recent the last push must be for a pop to spin (seconds; default 0.002): a
        queue idle for longer is waited on without spinning. ``ValueError`` for a
        negative, infinite or NaN value."""
        return self._spin_window

    @spin_window.setter
    def spin_window(self, value):
        self._spin_window = _spin_arg(value, "spin_window")

    @property
    def capacity(self):
        """The most entries the queue holds (fixed at construction)."""
        return self._capacity

    @property
    def closed(self):
        """True once close() was called."""
        cdef bint c
        if sync_try_lock(self._sync):
            c = self._closed
            sync_unlock(self._sync)
        else:
            with nogil:
                sync_lock(self._sync)
                c = self._closed
                sync_unlock(self._sync)
        return c

    @property
    def rows(self):
        """Total rows of the queued (not cancelled, not yet popped) entries."""
        cdef int64_t r
        if sync_try_lock(self._sync):
            r = self._rows
            sync_unlock(self._sync)
        else:
            with nogil:
                sync_lock(self._sync)
                r = self._rows
                sync_unlock(self._sync)
        return r

    @property
    def room(self):
        """How many more entries ``push`` takes now: ``capacity`` less every slot in use
        (entries queued or parked, expired ones not yet taken, pushes and pops in
        progress); 0 while parked retries hold it past capacity."""
        cdef Py_ssize_t spare
        if sync_try_lock(self._sync):
            spare = self._capacity - self._used
            sync_unlock(self._sync)
        else:
            with nogil:
                sync_lock(self._sync)
                spare = self._capacity - self._used
                sync_unlock(self._sync)
        return spare if spare > 0 else 0

    def __len__(self):
        """Number of queued (not cancelled, not yet popped) entries, parked ones too."""
        cdef Py_ssize_t n
        if sync_try_lock(self._sync):
            n = self._len + self._plen
            sync_unlock(self._sync)
        else:
            with nogil:
                sync_lock(self._sync)
                n = self._len + self._plen
                sync_unlock(self._sync)
        return n

    def __repr__(self):
        return (f"<RequestQueue capacity={self._capacity} len={len(self)} "
                f"priorities={bool(self._priorities)} closed={self.closed}>")

    def push(self, item, priority=0, rows=1, nbytes=0, key=0, timeout=None, length=0,
             deadline=None):
        """Queue ``item`` behind every entry of a lower-or-equal ``priority`` value pushed
        before it, and return its token (an int >= 0, unique for the queue's lifetime)
        for ``cancel()``.

        ``priority``: 0 .. 2**31-1, lower is served first (validated, then ignored when
        the queue was made with ``priorities=False``). ``rows``, ``nbytes``: 0 .. 2**39-1,
        what the entry weighs against ``pop_batch``'s caps. ``key``: any int64; only
        entries with the head's key share a batch. ``length``: 0 .. 2**39-1, the entry's
        sequence length, already rounded up by the caller (0 for entries that are not
        sequences); a batch weighs its rows times its longest length against
        ``max_tokens``. ``deadline``: None, or the ``time.monotonic()`` time at which the
        entry expires if it is still queued: it then leaves the queue, is never popped,
        and is handed to ``take_expired()``.

        When the queue is full, ``timeout=None`` waits for room, ``0`` does not wait and
        a positive number waits that many seconds; then ``queue.Full`` is raised.
        ``QueueClosed`` is raised if the queue is closed, before or during the wait.
        Bad arguments raise ``TypeError``/``ValueError`` naming the argument.
        """
        cdef int64_t c_prio = _priority_arg(priority)
        cdef int64_t c_rows = _int_arg(rows, "rows", 0, _MAX_COUNT)
        cdef int64_t c_nbytes = _int_arg(nbytes, "nbytes", 0, _MAX_COUNT)
        cdef int64_t c_key = _int_arg(key, "key", INT64_MIN, INT64_MAX)
        cdef double c_timeout = _timeout_arg(timeout)
        # Most entries are not sequences: the default (the interpreter's cached 0) skips
        # the conversion, a C-API call on push's fast path.
        cdef int64_t c_length = 0 if length is 0 else _int_arg(length, "length", 0, _MAX_COUNT)
        cdef double c_deadline = INFINITY if deadline is None else _deadline_arg(deadline)
        cdef int32_t s = -1
        cdef int r = RQ_FULL
        cdef uint64_t seq = 0
        cdef double until, wake_by
        cdef bint reserved = False

        # Fast path, GIL held: only try the mutex (never block on it with the GIL).
        if sync_try_lock(self._sync):
            r = self._reserve_locked(&s)
            if r == RQ_OK and s < PyList_GET_SIZE(<PyObject*>self._items):
                self._store(s, item)
                # Cannot fail: we held the lock since _reserve_locked saw it open.
                self._publish_locked(
                    s, c_prio, c_rows, c_nbytes, c_key, c_length, c_deadline, &seq, False)
                sync_unlock(self._sync)
                return _token(seq, s)
            sync_unlock(self._sync)
            if r == RQ_OK:
                reserved = True         # a fresh slot beyond the table: grow it first
            elif r == RQ_CLOSED:
                raise QueueClosed("push on a closed RequestQueue")
            elif r == RQ_NOMEM:
                raise MemoryError()
            elif c_timeout <= 0.0:
                raise _queue.Full

        if not reserved:
            # Slow path: wait for room without the GIL.
            until = mono_now() + c_timeout
            while True:
                wake_by = _wake_by()
                with nogil:
                    sync_lock(self._sync)
                    r = self._reserve_wait_locked(until, wake_by, &s)
                    sync_unlock(self._sync)
                if r != RQ_RETRY:
                    break
                PyErr_CheckSignals()    # main thread only: lets Ctrl-C through
            if r == RQ_CLOSED:
                raise QueueClosed("push on a closed RequestQueue")
            if r == RQ_FULL:
                raise _queue.Full
            if r == RQ_NOMEM:
                raise MemoryError()

        # Slot s is ours; store the object (GIL, no mutex), then publish it.
        try:
            self._ensure_table(s)
        except BaseException:
            self._release_slots(&s, 1)
            raise
        self._store(s, item)
        if sync_try_lock(self._sync):
            r = self._publish_locked(
                s, c_prio, c_rows, c_nbytes, c_key, c_length, c_deadline, &seq, False)
            sync_unlock(self._sync)
        else:
            with nogil:
                sync_lock(self._sync)
                r = self._publish_locked(
                    s, c_prio, c_rows, c_nbytes, c_key, c_length, c_deadline, &seq, False)
                sync_unlock(self._sync)
        if r == RQ_CLOSED:
            # Closed while we held the slot: give it back, drop our reference.
            self._store(s, None)
            self._release_slots(&s, 1)
            raise QueueClosed("push on a closed RequestQueue")
        return _token(seq, s)

    def push_again(self, item, priority, rows, nbytes, key, length=0, deadline=None):
        """Queue ``item`` as ``push`` does, for a request accepted once already (an item of
        a failed ``map`` chunk, queued again one by one): it never waits, may take a slot
        past ``capacity`` and is accepted after ``close()`` too, as ``park`` is; unlike a
        parked entry it arrives now and joins batches as any entry does. Counted in
        ``pushed``; returns its token, as ``push``. Whether a consumer will still pop it
        from a closed queue is the caller's to know. Arguments as for ``push``.
        ``queue.Full`` only at the slot limit of a token (2**24 entries held at once).
        """
        cdef int64_t c_prio = _priority_arg(priority)
        cdef int64_t c_rows = _int_arg(rows, "rows", 0, _MAX_COUNT)
        cdef int64_t c_nbytes = _int_arg(nbytes, "nbytes", 0, _MAX_COUNT)
        cdef int64_t c_key = _int_arg(key, "key", INT64_MIN, INT64_MAX)
        cdef int64_t c_length = _int_arg(length, "length", 0, _MAX_COUNT)
        cdef double c_deadline = INFINITY if deadline is None else _deadline_arg(deadline)
        cdef int32_t s = -1
        cdef int r
        cdef uint64_t seq = 0
        with nogil:
            sync_lock(self._sync)
            r = self._take_slot_locked(&s, True)
            sync_unlock(self._sync)
        if r == RQ_FULL:
            raise _queue.Full
        if r != RQ_OK:
            raise MemoryError()
        try:
            self._ensure_table(s)
        except BaseException:
            self._release_slots(&s, 1)
            raise
        self._store(s, item)
        with nogil:
            sync_lock(self._sync)
            self._publish_locked(
                s, c_prio, c_rows, c_nbytes, c_key, c_length, c_deadline, &seq, True)
            sync_unlock(self._sync)
        return _token(seq, s)

    def pop_batch(self, max_rows, max_bytes=0, *, max_tokens=0, fill_rows=0, max_wait=0.0,
                  idle_gap=None, fill_time=0.0, timeout=None, retargets=None):
        """Take the next batch: a list of items in (priority, arrival) order.

        1. Wait up to ``timeout`` seconds (None: until closed; 0: not at all) for at least
           one queued entry; if none comes, return ``[]``.
        2. If ``fill_rows > 0`` and ``max_wait > 0``, keep waiting while the queue holds
           fewer than ``fill_rows`` rows, the head (most urgent, oldest entry) was pushed
           less than ``max_wait`` seconds ago (a ceiling, whatever is in flight). With
           ``idle_gap`` given (>= 0), while no batch is in flight (see ``begin_batch``)
           the wait also ends once nothing was pushed for ``idle_gap`` seconds since the
           later of the latest push and the moment the last batch in flight ended (its
           results began to be handed out: ``end_batch``, ``answer_batch``), but
           not while a wave of arrivals comes in on pace: with ``fill_time > 0``
           (seconds), while the head came within ``fill_time`` of that end, at least 2
           but fewer rows are queued than the last batch popped held, and at least that
           many times the share of ``fill_time`` since the head's push. Such a wave
           ends the wait at once when it holds as many entries and rows as that batch
           did. A head pushed
           before that end (carried across the last batch) ends the wait at once, unless
           with ``fill_time > 0`` a wave comes back: fewer rows were pushed since the end
           than the last batch popped held, and each came within ``idle_gap`` of the one
           before and faster than 8 times the rate the rows queued at the end came
           (from the head's push to the end); the wait for it ends ``max_wait`` after
           the end.
           ``idle_gap=None`` (or negative) keeps the plain rule. A solo head (a parked
           retry) never waits to fill. This step applies whatever
           ``timeout`` is. Should the queue empty meanwhile (cancel, another consumer),
           the call goes back to step 1 with what is left of ``timeout``. The fill counts
           rows, never tokens (``max_tokens`` plays no part in it).
        3. Under one lock acquisition, take the head, always, even if its rows exceed
           ``max_rows``, its bytes ``max_bytes`` or its tokens ``max_tokens``. Then walk
           on in (priority, arrival) order: entries whose key differs from the head's are
           skipped and stay queued in their place; entries with the head's key are taken
           while the batch's rows stay <= ``max_rows``, (if ``max_bytes > 0``) its bytes
           <= ``max_bytes`` and (if ``max_tokens > 0``) its padded size, rows times the
           longest ``length`` among its entries, <= ``max_tokens``; the first one that
           does not fit ends the batch (no overtaking). For entries with a ``length``
           (padded sequences) the byte cap also holds for the padded batch: its rows x
           its longest length x the most bytes per row and unit of length among its
           entries (an entry's ``nbytes / (rows x length)``, rounded up).
           A call that waited (step 1 or 2) walks on once it holds the GIL again,
           taking by the same rules the entries pushed meanwhile (none while paused),
           up to the first compatible one more urgent than the batch's last (it heads
           the next batch: a batch is always in (priority, arrival) order): its worker
           could not run the batch before, and a producer pushes holding the GIL (an
           event loop resuming its tasks pushes their next requests in one pass).

        ``retargets``: the value of ``retargets`` the caller read before it chose
        ``max_rows`` and ``fill_rows``; once ``retarget()`` has been called since, the
        call returns ``[]`` at once, or as soon as it is woken, taking nothing (``None``:
        not checked).

        After ``close()`` nothing waits: the call returns what remains by the same rules,
        and ``[]`` once the queue is empty. ``max_rows`` must be >= 1 (else
        ``ValueError``); ``max_bytes <= 0`` means no byte cap, ``max_tokens <= 0`` no
        token cap. Cost: O((k + s) log n) for k taken and s skipped entries.
        """
        cdef PopParams p
        self._hide_entries = True   # a consumer, which will drain us (_leave_gc says why)
        p.max_rows = _int_arg_clamped(max_rows, "max_rows")
        if p.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows!r}")
        p.max_bytes = _int_arg_clamped(max_bytes, "max_bytes")
        p.max_tokens = 0 if max_tokens is 0 else _int_arg_clamped(max_tokens, "max_tokens")
        p.fill_rows = _int_arg_clamped(fill_rows, "fill_rows")
        p.max_wait = _float_arg(max_wait, "max_wait")
        p.idle_gap = -1.0 if idle_gap is None else _float_arg(idle_gap, "idle_gap")
        p.fill_time = _float_arg(fill_time, "fill_time")
        p.fill = p.fill_rows > 0 and p.max_wait > 0.0
        p.planned = retargets is not None
        p.caught_push = False
        p.pushed_at = 0
        p.retargets = _count_arg(retargets, "retargets") if p.planned else 0
        cdef double c_timeout = _timeout_arg(timeout)
        cdef double deadline, wake_by
        cdef PopBuf buf
        cdef Taken taken
        cdef Py_ssize_t n = RQ_RETRY

        # Fast path, GIL held: if no wait is needed, select, move the objects out and free
        # the slots in one critical section.
        if sync_try_lock(self._sync):
            n = self._try_pop_locked(&p, c_timeout > 0.0, &buf, &taken)
            if n > 0:
                self._move_out(&buf)
                self._release_slots_locked(buf.slots, n)
            sync_unlock(self._sync)
            if n >= 0:
                return self._to_list(&buf)

        # Slow path: wait and select without the GIL; then, the GIL taken back, take
        # what joined the batch meanwhile, move the objects out and free the slots.
        deadline = mono_now() + c_timeout
        while True:
            wake_by = _wake_by()
            with nogil:
                sync_lock(self._sync)
                n = self._wait_pop_locked(&p, deadline, wake_by, &buf, &taken)
                sync_unlock(self._sync)
                if n > 0 and p.caught_push:
                    linger_for_let_go(self._sync, p.pushed_at, _pop_linger)
            if n != RQ_RETRY:
                break
            PyErr_CheckSignals()
        if n > 0:
            self._top_up(&p, &buf, &taken)
        return self._to_list(&buf)

    def park(self, item, priority, rows, nbytes, key, length, not_before, deadline=None):
        """Hold ``item`` out of line until ``not_before`` (a ``time.monotonic()`` time),
        then queue it as a new arrival of ``priority`` that always makes a batch of its own
        (a request waiting to be retried), at the back of the line; it counts as pushed
        when it was due, however late the queue looks (its age, for ``max_wait``,
        ``await_late`` and ageing), except that in a FIFO queue it is never older than
        an entry ahead of it (while some are queued: then it counts from the latest
        time an entry came into line, if later). Retries due at one time come into
        line in the order they were parked. Meanwhile it counts in
        ``len()`` and ``parked``, not in ``rows``; a pop waiting for entries wakes when it
        is due, even on a closed queue (``pop_batch`` returns ``[]`` only once nothing is
        parked either, or nothing due by ``close``'s ``parked_until``). ``deadline`` as
        for ``push``. It never waits for room and is accepted even after ``close()``: the
        request was accepted once already.
        """
        cdef int64_t c_prio = _priority_arg(priority)
        cdef int64_t c_rows = _int_arg(rows, "rows", 0, _MAX_COUNT)
        cdef int64_t c_nbytes = _int_arg(nbytes, "nbytes", 0, _MAX_COUNT)
        cdef int64_t c_key = _int_arg(key, "key", INT64_MIN, INT64_MAX)
        cdef int64_t c_length = _int_arg(length, "length", 0, _MAX_COUNT)
        cdef double c_due = _float_arg(not_before, "not_before")
        cdef double c_deadline = INFINITY if deadline is None else _deadline_arg(deadline)
        cdef int32_t s = -1
        cdef int r
        with nogil:
            sync_lock(self._sync)
            r = self._take_slot_locked(&s, True)
            sync_unlock(self._sync)
        if r == RQ_FULL:
            raise _queue.Full
        if r != RQ_OK:
            raise MemoryError()
        try:
            self._ensure_table(s)
        except BaseException:
            self._release_slots(&s, 1)
            raise
        self._store(s, item)
        with nogil:
            sync_lock(self._sync)
            self._park_locked(s, c_prio, c_rows, c_nbytes, c_key, c_length, c_due,
                              c_deadline)
            sync_unlock(self._sync)

    cdef void _park_locked(self, int32_t s, int64_t priority, int64_t rows, int64_t nbytes,
                           int64_t key, int64_t length, double due,
                           double deadline) noexcept nogil:
        cdef Entry* e = &self._parked[s]
        e.priority = priority if self._priorities else 0
        e.seq = 0               # given when it is due: it arrives then
        e.rows = rows
        e.nbytes = nbytes
        e.key = key
        e.length = length
        e.t_push = due
        e.slot = s
        e.solo = True
        _t_push(self._pheap, self._info, T_PARKED, &self._plen, due, s, &self._timed)
        if deadline != INFINITY:
            self._add_deadline_locked(deadline, s)
        # A consumer blocked without a time limit must learn when this one is due (a held
        # one goes by resume()'s wake-up).
        if not self._held_locked():
            notify_items_one(self._sync)

    def take_expired(self, timeout=0.0):
        """The items whose ``deadline`` passed while they were queued or parked, in the
        order they expired; they are out of the queue already (len, rows) and their
        capacity is released before this returns. Waits up to ``timeout`` seconds
        (None: until closed) for one to expire; returns at once once closed.
        """
        cdef double c_timeout = _timeout_arg(timeout)
        cdef double deadline = mono_now() + c_timeout
        cdef double wake_by
        cdef PopBuf buf
        cdef Py_ssize_t n = RQ_RETRY
        while True:
            wake_by = _wake_by()
            with nogil:
                sync_lock(self._sync)
                n = self._wait_expired_locked(deadline, wake_by, &buf)
                sync_unlock(self._sync)
            if n != RQ_RETRY:
                break
            PyErr_CheckSignals()
        if n > 0:
            self._move_out(&buf)
            self._release_slots(buf.slots, n)
        return self._to_list(&buf)

    cdef Py_ssize_t _wait_expired_locked(self, double deadline, double wake_by,
                                         PopBuf* buf) noexcept nogil:
        cdef double t, d
        cdef Py_ssize_t i, k
        while True:
            self._tick_locked()
            if self._nexpired > 0 or self._closed:
                break
            t = mono_now()
            if t >= deadline:
                break
            if t >= wake_by:
                return RQ_RETRY
            d = deadline if deadline < wake_by else wake_by
            if self._dlen > 0 and self._dheap[0].key < d:
                d = self._dheap[0].key
            self._w_exp += 1
            wait_expiry(self._sync, d)
            self._w_exp -= 1
        k = 0
        while k < self._nexpired and buf.has_room():
            buf.slots[buf.n] = self._expired[k]
            buf.n += 1
            k += 1
        # Whatever did not fit (out of memory) stays for the next call.
        for i in range(k, self._nexpired):
            self._expired[i - k] = self._expired[i]
        self._nexpired -= k
        return <Py_ssize_t>buf.n

    @property
    def parked(self):
        """Entries parked by ``park()`` and not yet due."""
        return self._plen

    def cancel(self, token):
        """Withdraw a queued entry: it will never be returned, stops counting in ``len()``
        and ``rows`` at once, and its capacity is released before this call returns
        (one waiting producer is woken). Returns True if the entry was queued and is now
        cancelled; False if the token is unknown, already popped or already cancelled
        (a token never matches a later entry that reuses its slot).

        The item's last reference held by the queue is dropped outside the queue's lock,
        so its finalizer may safely call back into the queue.
        """
        cdef int overflow = 0
        cdef long long t
        cdef int64_t slot
        cdef uint64_t seq
        cdef bint found
        cdef PopBuf buf
        if not PyLong_Check(token):
            try:
                token = PyNumber_Index(token)
            except TypeError:
                raise TypeError(
                    f"token must be an int, not {type(token).__name__}") from None
        t = PyLong_AsLongLongAndOverflow(token, &overflow)
        if overflow < 0 or (overflow == 0 and t < 0):
            return False
        if overflow == 0:
            slot = t & _SLOT_MASK
            seq = (<uint64_t>t) >> _SLOT_BITS
        else:
            if (token >> _SLOT_BITS) > 0xFFFFFFFFFFFFFFFF:
                return False
            slot = token & _SLOT_MASK
            seq = token >> _SLOT_BITS
        if sync_try_lock(self._sync):
            found = self._unlink_locked(slot, seq)
            if found:
                buf.slots[0] = <int32_t>slot
                buf.n = 1
                self._move_out(&buf)
                self._release_slots_locked(buf.slots, 1)
            sync_unlock(self._sync)
        else:
            with nogil:
                sync_lock(self._sync)
                found = self._unlink_locked(slot, seq)
                sync_unlock(self._sync)
            if found:
                buf.slots[0] = <int32_t>slot
                buf.n = 1
                self._move_out(&buf)
                self._release_slots(buf.slots, 1)
        if found:
            Py_XDECREF(<PyObject*>buf.objs[0])     # finalizers run here, lock released
        return found

    def drain(self):
        """Pop every queued entry, all keys, in (priority, arrival) order; never waits.
        Meant for shutdown, typically after ``close()``.
        """
        cdef PopBuf buf
        cdef Py_ssize_t n
        if sync_try_lock(self._sync):
            n = self._drain_locked(&buf)
            self._move_out(&buf)
            self._release_slots_locked(buf.slots, n)
            sync_unlock(self._sync)
        else:
            with nogil:
                sync_lock(self._sync)
                n = self._drain_locked(&buf)
                sync_unlock(self._sync)
            self._move_out(&buf)
            self._release_slots(buf.slots, n)
        return self._to_list(&buf)

    @property
    def exhausted(self):
        """True once closed and nothing is left that a pop would return or wait for: no
        queued entry, and no parked one due by ``close``'s ``parked_until`` (one due
        later stays, for ``drain()``)."""
        cdef bint done
        with nogil:
            sync_lock(self._sync)
            self._tick_locked()
            done = self._len == 0 and self._nothing_coming_locked()
            sync_unlock(self._sync)
        return done

    def close(self, parked_until=None):
        """Stop intake; idempotent. Every waiter wakes: blocked pushes raise
        ``QueueClosed``, blocked pops return what remains (or ``[]``). Queued entries
        stay poppable. Pops go on waiting for parked entries to come due, except, with
        ``parked_until`` (a ``time.monotonic()`` time; the earliest given counts), for
        those due after it: once nothing else is left they return ``[]`` (the entries
        stay, for ``drain()``), as a consumer stopping by then could never run them.
        """
        cdef double until = INFINITY
        if parked_until is not None:
            until = _float_arg(parked_until, "parked_until")
        with nogil:
            sync_lock(self._sync)
            self._closed = True
            if until < self._parked_until:
                self._parked_until = until
            notify_everyone(self._sync)
            self._wake_watch_locked()
            sync_unlock(self._sync)

    # The three calls a worker makes on every batch keep the GIL when the lock is free
    # (as the properties do): letting go of it for a moment hands it to any thread
    # waiting for it (a thread submitting), and the worker then waits for it back.

    def begin_batch(self):
        """Tell the queue a popped batch is now running (see ``pop_batch``'s fill wait)."""
        if sync_try_lock(self._sync):
            self._begin_batch_locked()
            sync_unlock(self._sync)
        else:
            with nogil:
                sync_lock(self._sync)
                self._begin_batch_locked()
                sync_unlock(self._sync)

    cdef inline void _begin_batch_locked(self) noexcept nogil:
        self._in_flight += 1
        self._begun_at = mono_now()

    def answer_batch(self):
        """Tell the queue a running batch's results are being handed out: what is pushed
        from now on came back after its call (its clients' wave), not during it."""
        if sync_try_lock(self._sync):
            self._answer_batch_locked()
            sync_unlock(self._sync)
        else:
            with nogil:
                sync_lock(self._sync)
                self._answer_batch_locked()
                sync_unlock(self._sync)

    cdef inline void _answer_batch_locked(self) noexcept nogil:
        self._answered_at = mono_now()
        self._answered_rows = self._rows

    def end_batch(self):
        """Undo one ``begin_batch()``; when none is left running, fill waits re-check.

        The last call's end, which tells requests carried across it from the wave it
        brings back (``pop_batch``), is then when its results began to be handed out
        (``answer_batch``, if called since the latest ``begin_batch``), else now: clients
        answered early in a delivery come back before it ends."""
        if sync_try_lock(self._sync):
            self._end_batch_locked()
            sync_unlock(self._sync)
        else:
            with nogil:
                sync_lock(self._sync)
                self._end_batch_locked()
                sync_unlock(self._sync)

    cdef inline void _end_batch_locked(self) noexcept nogil:
        if self._in_flight > 0:
            self._in_flight -= 1
            if self._in_flight == 0:
                if self._answered_at >= self._begun_at:
                    self._idle_since = self._answered_at
                    self._idle_rows = self._answered_rows
                else:
                    self._idle_since = mono_now()
                    self._idle_rows = self._rows
                notify_fill_all(self._sync)

    @property
    def pushed(self):
        """Entries ever accepted by push() (never decreases; parks do not count)."""
        return self._pushed

    @property
    def retargets(self):
        """How many times ``retarget()`` was called: read it before choosing a pop's sizes
        and pass it to ``pop_batch(retargets=...)``."""
        return self._retargets

    def retarget(self):
        """The batch sizes changed: every pop planned before this call (its ``retargets``
        older) returns ``[]`` now, or when it next looks, taking nothing, so that its
        caller plans again (``BatchProcessor.update_batch_size``)."""
        with nogil:
            sync_lock(self._sync)
            self._retargets += 1
            notify_everyone(self._sync)
            sync_unlock(self._sync)

    @property
    def in_flight(self):
        """Batches between ``begin_batch()`` and ``end_batch()``."""
        return self._in_flight

    def pause(self):
        """Hold every pop: until ``resume()`` (or ``close()``), ``pop_batch`` hands nothing
        out and waits as if the queue were empty (up to its ``timeout``). Pushes go on.
        """
        # As a push does: the mutex is only tried with the GIL, never waited for.
        if sync_try_lock(self._sync):
            self._pause_locked()
        else:
            with nogil:
                sync_lock(self._sync)
                self._pause_locked()
        sync_unlock(self._sync)

    cdef void _pause_locked(self) noexcept nogil:
        self._paused = True
        notify_fill_all(self._sync)     # a filling pop must hold, not pop at its deadline
        self._wake_watch_locked()       # the watch dozes instead (nothing is popped)

    def resume(self):
        """Undo ``pause()``; waiting pops wake and go on."""
        with nogil:
            sync_lock(self._sync)
            self._paused = False
            notify_everyone(self._sync)
            self._wake_watch_locked()
            sync_unlock(self._sync)

    @property
    def paused(self):
        """True between ``pause()`` and ``resume()``."""
        return self._paused

    def oldest_age(self):
        """Seconds since the oldest queued entry (by push time, whatever its priority) was
        pushed; 0.0 when empty. O(1) for a FIFO queue, O(n) with priorities.
        """
        return _age_since(self._push_time(False))

    def newest_age(self):
        """Seconds since the latest entry came into line (a push, or a parked retry at
        the time it counts as pushed, ``park``) while something is queued (arrivals
        still coming in, or stopped a while ago); 0.0 when empty. Never more than
        ``oldest_age()``. O(1)."""
        return _age_since(self._push_time(True))

    cdef double _push_time(self, bint newest):
        """The newest (or oldest) queued entry's push time; INFINITY when empty. Takes the
        lock at once when it is free, releasing the GIL only to wait for it."""
        cdef double t
        if sync_try_lock(self._sync):
            t = self._newest_locked() if newest else self._oldest_locked()
            sync_unlock(self._sync)
        else:
            with nogil:
                sync_lock(self._sync)
                t = self._newest_locked() if newest else self._oldest_locked()
                sync_unlock(self._sync)
        return t

    cdef inline double _newest_locked(self) noexcept nogil:
        return self._last_arrival if self._len > 0 else INFINITY

    cdef double _oldest_locked(self) noexcept nogil:
        cdef Py_ssize_t i
        cdef double t = INFINITY
        if self._len == 0:
            return INFINITY
        if not self._priorities:
            return self._heap[0].t_push      # FIFO: the head is the oldest
        for i in range(self._len):
            if self._heap[i].t_push < t:
                t = self._heap[i].t_push
        return t

    # The watch for entries waiting too long (a worker without a call slot, see
    # engine/workers.py) looks every batch_timeout while requests flow. Between looks
    # it waits here, the GIL released: a thread that woke and took the GIL that often
    # would hold up the worker and the callers it hands results to, for nothing in
    # nearly every look (the requests were popped in time).

    def await_late(self, age, first_look, timeout, since, period):
        """Wait, the GIL released, until a queued entry has waited ``age`` seconds or
        more, looking first after ``first_look`` seconds, then whenever one could be
        that late (while none is queued, every ``period`` seconds, a push not being
        watched, or sooner when a parked entry will have waited ``age`` since it is
        due); at most ``timeout`` seconds. Returns at once once ``wake_watch()``,
        ``close()``, ``pause()`` or ``resume()`` was called since ``since``
        (``watch_wakes`` as read before). True if an entry is that late now."""
        cdef double c_age = _spin_arg(age, "age")
        cdef double c_period = _spin_arg(period, "period")
        cdef double start = mono_now()
        cdef double look_at = start + _spin_arg(first_look, "first_look")
        cdef double deadline = start + _timeout_arg(timeout)
        cdef uint64_t c_since = _count_arg(since, "since")
        cdef double wake_by
        cdef int late = RQ_RETRY
        if c_period == 0.0:
            raise ValueError("period must be > 0 seconds, got 0")
        while late == RQ_RETRY:
            wake_by = _wake_by()
            with nogil:
                sync_lock(self._sync)
                late = self._await_late_locked(c_age, c_period, look_at, deadline,
                                               c_since, wake_by)
                sync_unlock(self._sync)
            if late == RQ_RETRY:
                PyErr_CheckSignals()
        return late == 1

    cdef int _await_late_locked(self, double age, double period, double look_at,
                                double deadline, uint64_t since,
                                double wake_by) noexcept nogil:
        cdef double t, until
        while True:
            if self._watch_wakes != since:
                return 0
            t = mono_now()
            if t >= look_at:
                self._watch_looks += 1
                self._tick_locked()
                until = self._oldest_locked() + age
                if until <= t:
                    return 1
                if until == INFINITY:
                    # Nothing queued: pushes are not watched, so look again a period on,
                    # or when a parked retry will have waited ``age`` since it is due.
                    until = self._next_due_locked() + age
                    if until > t + period:
                        until = t + period
            else:
                until = look_at
            if t >= deadline:
                return 0
            if until > deadline:
                until = deadline
            if t >= wake_by:
                return RQ_RETRY
            if until > wake_by:
                until = wake_by
            wait_watch(self._sync, until)

    @property
    def watch_wakes(self):
        """How many times ``wake_watch()``, ``close()``, ``pause()`` or ``resume()`` was
        called: read it before ``await_late``."""
        return self._watch_wakes

    def wake_watch(self):
        """End every ``await_late`` in progress (one began after this returns waits)."""
        with nogil:
            sync_lock(self._sync)
            self._wake_watch_locked()
            sync_unlock(self._sync)

    cdef inline void _wake_watch_locked(self) noexcept nogil:
        self._watch_wakes += 1
        notify_watch_all(self._sync)

    def _watch_looks_count(self):
        """Test hook: how many times ``await_late`` looked at the queue."""
        return self._watch_looks

    def _spins(self):
        """Test hook: (pops spinning right now, pops that spun so far)."""
        cdef int now
        cdef uint64_t total
        with nogil:
            sync_lock(self._sync)
            now = spinners(self._sync)
            total = spins(self._sync)
            sync_unlock(self._sync)
        return (now, total)

    def _lingers(self):
        """Test hook: (pops that a spin caught and that then waited for their pusher's
        let-go of the GIL, those that saw it, the share of recent waits that saw it)."""
        return (lingers(self._sync), lingers_seen(self._sync),
                linger_score(self._sync) / <double>PAY_ONE)

    def _item_wakes(self):
        """Test hook: how many times a consumer waiting for an entry was chosen and woken
        (by a push, ``resume()``, ``close()``, ...)."""
        cdef uint64_t n
        with nogil:
            sync_lock(self._sync)
            n = item_wakes(self._sync)
            sync_unlock(self._sync)
        return n

    def _try_len(self):
        """Test hook: ``len()`` if the queue's lock is free now, else None; never lets go
        of the GIL (a test holding it watches a pop without handing the GIL over)."""
        cdef Py_ssize_t n
        if not sync_try_lock(self._sync):
            return None
        n = self._len + self._plen
        sync_unlock(self._sync)
        return n

    def _waiters(self):
        """Test hook: threads blocked right now in (pop waiting for an entry, pop waiting
        for a batch to fill, push waiting for room), so tests can order events without
        sleeping.
        """
        cdef Py_ssize_t a, b, c
        with nogil:
            sync_lock(self._sync)
            a = <Py_ssize_t>items_waiting(self._sync)
            b = self._w_fill
            c = self._w_room
            sync_unlock(self._sync)
        return (a, b, c)

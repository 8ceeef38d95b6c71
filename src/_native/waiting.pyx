# cython: autotestdict=False
"""What a thread blocked in ``RequestFuture.result()`` waits on: a ``Sleeper``.

Why native: a caller that parks at once costs each round trip two thread wake-ups'
worth of time: the worker's release of a lock someone sleeps on is a system call, and
the sleeper's CPU must be woken to run it again (tens of microseconds on an idle core).
A result that comes within microseconds (a small model at low load) is caught sooner by
a caller that busy-waits a moment first. The busy wait reads a flag without the GIL,
which a Python loop could not: a spinning Python thread would take the GIL from the
worker delivering the very result it waits for.

A ``Sleeper`` is released once, by whoever completes or cancels the future (its
``release``). Its ``wait`` first spins, the GIL released, for up to the module's
``spin`` seconds, yielding its CPU between looks (on a busy machine the worker may be
waiting for that CPU); then it blocks on a lock of CPython's own (what a ``_thread``
lock wraps), interruptible as that lock's acquire is (Ctrl-C). A worker completing a
batch wakes its parked callers together, the GIL released (``release_all``): each
release is a system call, and each caller it wakes can take the GIL and run meanwhile,
where a release with the GIL held would leave that caller blocked on it, to be woken a
second time. Except where a full batch is queued: the model then waits for the worker's
next call, and a worker that let go of the GIL would take it back only after each
caller it woke had run; it keeps the GIL, and they run once it lets go (in a call of a
model that releases the GIL, or its next wait).

At most one thread of the process spins at a time: any other waiter parks at once, so
many callers blocked together cost one CPU's spin at most, never all of them. And a spin
must pay: one that sees its release saves a thread wake-up, one that does not costs its
CPU time for nothing (callers of a model that takes milliseconds). The process keeps
the recent share of spins that saw their release (an exponential average over about
eight spins); below half, waits park at once, except one in ``PROBE_EVERY``, which spins
to find out whether spinning pays again (adaptive spinning, as in glibc's adaptive
mutexes and the JVM's monitors).

How long a spin may last is bounded by what it saves (competitive spinning: Karlin, Li,
Manasse and Owicki, "Empirical studies of competitive spinning for a shared-memory
multiprocessor", SOSP 1991: spinning as long as a block costs, then blocking, costs at
most twice the better choice made in hindsight). A park costs a client that sends its
next request on its answer two wake-ups: its own (the time from its release to its
resumption, the GIL taken back), and, since its next request then comes that much later,
past the worker's own spin (``RequestQueue.spin``), the worker's on the next request. So
a wait spins for twice a park's cost as measured, or the ``spin`` setting where that is
longer, and never more than ``SPIN_STRETCH_MAX`` times the setting nor, through that
stretch, past ``SPIN_STRETCH_LIMIT`` (a spin set longer stays as set). The module
measures every park that its release ends and keeps a low quantile of those costs (about
the quarter below: a release followed by a long hold of the GIL, which inflates one
measure, does not stretch the spin). Where many callers park together, they resume one
at a time as each takes the GIL, and that queue is most of what they measure: the spin
then stays at its longest, which costs one CPU at most (one caller spins at a time) and
only while spins see their answers (the score above). The cost is measured on parked
waits only, whose resumption the spinner (without the GIL) does not delay, so the two do
not feed each other: where a park costs 15 us a spin is the 30 us setting; where it
costs 40 us the spin reaches the answers a 30 us one missed, and neither the caller nor,
next time, the worker is woken.

A spin that sees its release must still take the GIL back, which the releasing worker
holds through the rest of its delivery. A thread that asks for a held GIL blocks, and is
woken when it is dropped: the very wake-up the spin saved. So the spinner goes on
spinning, up to ``LINGER_MAX`` (30 us; less if ``spin`` is shorter, never past the
wait's timeout), until a thread lets go of the GIL after the release: the ``let_go``
count, which the request queue bumps each time a worker drops the GIL to wait for
requests (``request_queue_sync.h``), as a worker does once it has delivered a batch.
Any later let-go ends the wait too; a worker that runs on instead (another batch), or a
future completed by some other thread, is waited out to that limit, then the GIL is
asked for as usual. A signal that comes during a spin is handled once it ends.
The same holds the other way round: a spinning worker sees a caller's push while the
caller still holds the GIL, on its way to wait for the result. So a spin, as it begins,
bumps the let-go count too, which such a worker waits for before it asks for the GIL
(``RequestQueue.spin``).
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (
    NOWAIT_LOCK,
    PY_LOCK_ACQUIRED,
    PY_LOCK_FAILURE,
    PyLockStatus,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
    PyThread_type_lock,
)
from cpython.pycapsule cimport PyCapsule_New
from libc.math cimport INFINITY, fmax, fmin
from libc.stdint cimport uint64_t

import _thread
import threading as _threading
import os as _os
from numbers import Real as _Real

cdef extern from "Python.h":
    unsigned long PyThread_get_thread_ident() nogil
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds,
                                             int intr_flag) nogil

cdef extern from *:
    """
    #include <sched.h>
    #include <atomic>
    #include <chrono>
    #include "busy_wait.h"

    namespace batchproc_wait {
    // Times a thread dropped the GIL to wait (see the module), bumped in other modules
    // through the address in `let_go_capsule`.
    inline std::atomic<uint64_t> let_go{0};
    // Threads in spin_until_set now, and counts for the tests.
    inline std::atomic<int> spinners{0};
    inline std::atomic<uint64_t> spun{0};     // spins begun
    inline std::atomic<uint64_t> caught{0};   // spins that saw their flag set
    inline std::atomic<uint64_t> crowded{0};  // waits that parked at once: another spun
    inline std::atomic<uint64_t> handed{0};   // caught spins that then saw a let-go
    inline std::atomic<int> lingering{0};     // caught spins waiting for a let-go now
    inline std::atomic<uint64_t> declined{0}; // waits that parked at once: spins did not pay

    // The recent share of spins that caught their release (see busy_wait.h); written
    // only by the thread holding the spinner's place. Waits spin while it is half or
    // more, and one in PROBE_EVERY of the others does.
    inline batchproc_busy::PayScore spin_score;
    inline int score_now() noexcept { return spin_score.now(); }

    inline void* let_go_address() noexcept { return &let_go; }
    // The count with this let-go, which its own later waits for a let-go must not take
    // for another thread's.
    inline uint64_t note_let_go() noexcept {
        return let_go.fetch_add(1, std::memory_order_release) + 1;
    }
    inline uint64_t let_go_now() noexcept { return let_go.load(std::memory_order_acquire); }

    inline double seconds_now() noexcept {
        using namespace std::chrono;
        return duration<double>(steady_clock::now().time_since_epoch()).count();
    }
    inline void flag_set(int* flag) noexcept {
        __atomic_store_n(flag, 1, __ATOMIC_RELEASE);
    }
    inline bool flag_is_set(int* flag) noexcept {
        return __atomic_load_n(flag, __ATOMIC_ACQUIRE) != 0;
    }
    // Whether this wait may spin: it takes the spinner's place, unless another thread
    // holds it or spins do not pay (see spin_score), except a probe.
    inline bool claim_spin() noexcept {
        if (!spin_score.pays_or_probe()) {
            declined.fetch_add(1, std::memory_order_relaxed);
            return false;
        }
        int expected = 0;
        if (!spinners.compare_exchange_strong(expected, 1)) {
            crowded.fetch_add(1, std::memory_order_relaxed);
            return false;
        }
        return true;
    }
    // With the spinner's place claimed: busy-waits up to `seconds` for *flag; once it is
    // set, up to `linger` seconds more (and never past `deadline`) for a let-go later
    // than *released_at (the count when the flag was set); gives the place back.
    // Touches no Python object: runs without the GIL.
    inline bool spin_until_set(int* flag, uint64_t* released_at, double seconds,
                               double linger, double deadline) noexcept {
        spun.fetch_add(1, std::memory_order_relaxed);
        uint64_t own = note_let_go();  // this thread let go of the GIL to wait
        double until = seconds_now() + seconds;
        bool set = flag_is_set(flag);
        while (!set && seconds_now() < until) {
            sched_yield();
            set = flag_is_set(flag);
        }
        if (set) {
            caught.fetch_add(1, std::memory_order_relaxed);
            lingering.fetch_add(1, std::memory_order_relaxed);
            uint64_t seen = *released_at;  // written before the flag (release order)
            // A release between this wait's start and its let-go read a count without
            // it: its own let-go is not the one it waits for.
            if (seen < own) seen = own;
            until = seconds_now() + linger;
            if (until > deadline) until = deadline;
            bool let = batchproc_busy::wait_for_let_go(let_go, seen, until);
            if (let) handed.fetch_add(1, std::memory_order_relaxed);
            lingering.fetch_sub(1, std::memory_order_relaxed);
        }
        spin_score.note(set);
        spinners.store(0, std::memory_order_release);
        return set;
    }
    // A forked child has only the thread that forked: one spinning in the parent then
    // holds the spinner's place for ever there.
    inline void forget_spinners() noexcept {
        spinners.store(0);
        lingering.store(0);
    }
    inline void reset_score() noexcept { spin_score.reset(); }
    }  // namespace batchproc_wait
    """
    bint claim_spin "batchproc_wait::claim_spin"() noexcept nogil
    bint spin_until_set "batchproc_wait::spin_until_set"(
        int* flag, uint64_t* released_at, double seconds, double linger,
        double deadline) noexcept nogil
    void* let_go_address "batchproc_wait::let_go_address"() noexcept nogil
    uint64_t let_go_now "batchproc_wait::let_go_now"() noexcept nogil
    uint64_t note_let_go "batchproc_wait::note_let_go"() noexcept nogil
    uint64_t handed_count "batchproc_wait::handed.load"() noexcept nogil
    int lingering_now "batchproc_wait::lingering.load"() noexcept nogil
    uint64_t declined_count "batchproc_wait::declined.load"() noexcept nogil
    int score_now "batchproc_wait::score_now"() noexcept nogil
    int SCORE_ONE "batchproc_busy::PayScore::ONE"
    uint64_t PROBE_EVERY_ "batchproc_busy::PayScore::PROBE_EVERY"
    void reset_score "batchproc_wait::reset_score"() noexcept nogil
    void forget_spinners "batchproc_wait::forget_spinners"() noexcept nogil
    void flag_set "batchproc_wait::flag_set"(int* flag) noexcept nogil
    bint flag_is_set "batchproc_wait::flag_is_set"(int* flag) noexcept nogil
    double seconds_now "batchproc_wait::seconds_now"() noexcept nogil
    int spinners_now "batchproc_wait::spinners.load"() noexcept nogil
    uint64_t spun_count "batchproc_wait::spun.load"() noexcept nogil
    uint64_t caught_count "batchproc_wait::caught.load"() noexcept nogil
    uint64_t crowded_count "batchproc_wait::crowded.load"() noexcept nogil

cdef const char* LET_GO_CAPSULE = "batchproc._native.waiting.let_go"

# The longest a caught spin waits for a let-go: a worker's bookkeeping after a delivery
# takes microseconds; a future completed by another thread (set_result from user code,
# a worker going on to another batch) brings none, and its caller must not wait long.
LINGER_MAX = 30e-6
cdef double _linger_max = LINGER_MAX

# The longest spin on the main thread: Python runs signal handlers there, and a spin
# (without the GIL) handles a signal (Ctrl-C) only once it ends.
MAIN_SPIN_MAX = 1e-3
cdef double _main_spin_max = MAIN_SPIN_MAX
cdef unsigned long _MAIN_IDENT = <unsigned long>_threading.main_thread().ident

# How long a wait spins before it parks, in seconds (0.0: it parks at once). Set by
# batchproc.futures from the CPUs the process may use.
cdef double _spin = 0.0

# The longest spin, in multiples of the setting, however much parks cost: a machine so
# busy that its wake-ups take a millisecond has no CPU to spare for spinning that long.
SPIN_STRETCH_MAX = 4.0
cdef double _stretch_max = SPIN_STRETCH_MAX
# Nor does the stretch take a spin past 1 ms: no wake-up is worth more of a CPU.
SPIN_STRETCH_LIMIT = 1e-3
cdef double _stretch_limit = SPIN_STRETCH_LIMIT
# A park's cost, seconds (0.0: none measured yet): a low quantile of release-to-resumption
# times, tracked in place. Each measure below moves it down by PARK_COST_DOWN of itself,
# each one above up by PARK_COST_UP; it settles where a quarter of the measures are below
# (UP / (UP + DOWN)). Read and written with the GIL held.
PARK_COST_DOWN = 1.0 / 8.0
PARK_COST_UP = 1.0 / 24.0
cdef double _park_cost = 0.0


cdef inline void _note_park_cost(double took) noexcept:
    global _park_cost
    if _park_cost == 0.0:
        _park_cost = took
    elif took < _park_cost:
        _park_cost -= _park_cost * PARK_COST_DOWN
    else:
        _park_cost += _park_cost * PARK_COST_UP


cdef inline double _spin_length() noexcept:
    """How long the next wait spins, seconds: the setting, stretched to two parks' cost
    but no further than _stretch_max times it nor past _stretch_limit (a longer setting
    stays as set)."""
    cdef double spin = _spin
    if spin <= 0.0:
        return spin
    return fmax(spin, fmin(2.0 * _park_cost,
                           fmin(spin * _stretch_max, fmax(spin, _stretch_limit))))

# The let-go count's address, for the modules that bump it (the request queue).
let_go_capsule = PyCapsule_New(let_go_address(), LET_GO_CAPSULE, NULL)

_TIMEOUT_MAX = _thread.TIMEOUT_MAX


def set_spin(seconds):
    """Set how long each wait spins before it parks, in seconds: a real number from 0
    to 1 (``TypeError`` for anything else than a number, ``ValueError`` outside). 0.0
    turns the spin off."""
    if not isinstance(seconds, _Real) or isinstance(seconds, bool):
        raise TypeError(f"spin must be a number of seconds, got {type(seconds).__name__}")
    cdef double s = float(seconds)
    if not (0.0 <= s <= 1.0):  # also false for nan
        raise ValueError(f"spin must be between 0 and 1 second, got {seconds!r}")
    global _spin
    _spin = s


def get_spin():
    """Seconds each wait spins before it parks at least (the setting; see spin_length)."""
    return _spin


def spin_length():
    """Seconds the next wait spins before it parks: the setting, or twice a park's cost
    where that is longer, at most ``SPIN_STRETCH_MAX`` times the setting and, through
    that stretch, ``SPIN_STRETCH_LIMIT`` (0.0 while the setting is 0.0)."""
    return _spin_length()


def park_cost():
    """A park's cost as measured, seconds: a low quantile of the times from a parked
    wait's release to its resumption with the GIL, its wake-up and its turn for the GIL
    (0.0 before the first)."""
    return _park_cost


def _set_park_cost(seconds):
    """Test hook: set the measured park cost (0.0: forget it)."""
    global _park_cost
    _park_cost = float(seconds)


def _set_stretch_limit(seconds):
    """Test hook: the longest spin the stretch makes (default SPIN_STRETCH_LIMIT)."""
    global _stretch_limit
    _stretch_limit = float(seconds)


def _record_park_cost(seconds):
    """Test hook: count one park of ``seconds``, as a released parked wait does."""
    _note_park_cost(float(seconds))


def spin_counts():
    """(spinning now, spins begun, spins that caught their release, waits that parked at
    once because another thread spun): counts since import, for tests and benchmarks."""
    return (spinners_now(), spun_count(), caught_count(), crowded_count())


PROBE_EVERY = PROBE_EVERY_


def spin_score():
    """The recent share of spins that saw their release, 0.0 to 1.0 (waits spin while it
    is 0.5 or more), and the waits that parked at once because it was not: for tests and
    benchmarks."""
    return (<double>score_now() / SCORE_ONE, declined_count())


def _set_linger_max(seconds):
    """Test hook: the longest a caught spin waits for a let-go (default LINGER_MAX)."""
    global _linger_max
    _linger_max = float(seconds)


def _set_main_spin_max(seconds):
    """Test hook: the longest spin on the main thread (default MAIN_SPIN_MAX)."""
    global _main_spin_max
    _main_spin_max = float(seconds)


def _reset_spin_score():
    """Test hook: forget how spins went (they pay, as at import)."""
    reset_score()


def _forget_spinners_in_child():
    forget_spinners()


if hasattr(_os, "register_at_fork"):  # not on Windows, which has no fork
    _os.register_at_fork(after_in_child=_forget_spinners_in_child)


def let_go_counts():
    """(the let-go count, caught spins waiting for a let-go now, caught spins that saw
    one before their limit): since import, for tests and benchmarks."""
    return (let_go_now(), lingering_now(), handed_count())


cdef inline void _free_park(PyThread_type_lock park) noexcept:
    """Free a park lock, held or not: unlocked first, as CPython's _thread lock frees
    its own."""
    PyThread_acquire_lock(park, NOWAIT_LOCK)
    PyThread_release_lock(park)
    PyThread_free_lock(park)


@cython.final
cdef class Sleeper:
    """One blocked wait for one future: ``release`` once, from any thread; ``wait`` by
    the thread that made it."""

    cdef int _released  # read and written only through flag_set / flag_is_set
    cdef uint64_t _released_at  # the let-go count at release, written before the flag
    cdef double _released_time  # seconds_now() at the release of a parked waiter
    # A held lock the waiter parks on, made only once its spin is over: a result caught
    # by the spin costs no lock. Published with the GIL held, in compiled code that runs
    # no Python code, which no other thread interleaves with: a release sees it
    # published, or the waiter sees the flag set before it publishes one. A plain C
    # lock (CPython's own, as a ``_thread`` lock wraps): a batch's releases can then
    # run without the GIL (``release_all``).
    cdef PyThread_type_lock _park

    def __dealloc__(self):
        if self._park != NULL:
            _free_park(self._park)

    cdef inline PyThread_type_lock _mark_released(self) except? NULL:
        """Set the flag; the lock its parked waiter blocks on (NULL: none parked), for
        the caller to release."""
        if flag_is_set(&self._released):
            raise RuntimeError("release unlocked lock")
        self._released_at = let_go_now()
        flag_set(&self._released)
        if self._park != NULL:
            self._released_time = seconds_now()
        return self._park

    def release(self):
        """Wake the waiter. A second release raises ``RuntimeError`` (as a lock's)."""
        cdef PyThread_type_lock park = self._mark_released()
        if park != NULL:
            PyThread_release_lock(park)

    cdef bint _publish_park(self) except -1:
        """Make the lock to block on, held, unless released meanwhile (then False). A
        wait after one that timed out or was interrupted blocks on the same lock, still
        held (a release since has unlocked it)."""
        if self._park != NULL:
            return True
        cdef PyThread_type_lock park = PyThread_allocate_lock()
        if park == NULL:
            raise MemoryError("no lock to park on")
        PyThread_acquire_lock(park, NOWAIT_LOCK)  # new, so free: taken at once
        if flag_is_set(&self._released):
            _free_park(park)
            return False
        self._park = park
        return True

    @property
    def released(self):
        return flag_is_set(&self._released)

    @property
    def parked(self):
        """Whether its waiter parked: its spin, if any, ended before the release (True
        from then on)."""
        return self._park != NULL

    def wait(self, timeout=None):
        """Block until released or until ``timeout`` seconds pass (``None``, or more than
        ``threading.TIMEOUT_MAX``: no limit; <= 0: do not block). True if released."""
        cdef double limit = -1.0  # no limit
        cdef double spin, started, deadline
        cdef bint caught
        if timeout is not None:
            # float and int first: the abstract class's check costs more per wait.
            if (type(timeout) is not float and type(timeout) is not int
                    and not isinstance(timeout, _Real)):  # as a lock's acquire
                raise TypeError(f"timeout must be a number of seconds or None, got "
                                f"{type(timeout).__name__}")
            limit = float(timeout)
            if not limit > 0.0:  # nan too, as a lock's acquire(False)
                return flag_is_set(&self._released)
            if limit > _TIMEOUT_MAX:
                limit = -1.0
        if flag_is_set(&self._released):
            return True
        started = seconds_now()
        # Claimed with the GIL held: a wait that may not spin never drops and takes
        # the GIL back for nothing (with many callers, each time a GIL hand-off).
        if _spin > 0.0 and claim_spin():
            spin = _spin_length()
            if 0.0 <= limit < spin:
                spin = limit
            if spin > _main_spin_max and PyThread_get_thread_ident() == _MAIN_IDENT:
                spin = _main_spin_max
            deadline = started + limit if limit >= 0.0 else INFINITY
            with nogil:
                caught = spin_until_set(&self._released, &self._released_at, spin,
                                        spin if spin < _linger_max else _linger_max, deadline)
            if caught:
                return True
            # A signal that came while spinning: its handler runs now (Ctrl-C raises
            # KeyboardInterrupt here), not after a wait that nothing may end.
            PyErr_CheckSignals()
            if limit >= 0.0 and seconds_now() - started >= limit:
                return flag_is_set(&self._released)
        if not self._publish_park():
            return True
        if not self._block(started, limit):
            return False
        # Released while parked (the lock is released nowhere else): what this park cost.
        _note_park_cost(seconds_now() - self._released_time)
        return True

    cdef bint _block(self, double started, double limit) except -1:
        """Block on the park lock until released (True) or ``limit`` seconds from
        ``started`` pass (False; limit < 0: none), the GIL released; a signal's handler
        runs as it comes (as in a ``_thread`` lock's acquire), and what it raises ends
        the wait."""
        cdef PyLockStatus got
        cdef long long micros = -1
        while True:
            if limit >= 0.0:
                micros = <long long>((started + limit - seconds_now()) * 1e6)
                if micros <= 0:
                    return PyThread_acquire_lock_timed(self._park, 0, 0) == PY_LOCK_ACQUIRED
            with nogil:
                got = PyThread_acquire_lock_timed(self._park, micros, 1)
            if got == PY_LOCK_ACQUIRED:
                return True
            if got == PY_LOCK_FAILURE:
                return False
            PyErr_CheckSignals()  # PY_LOCK_INTR: a signal came


# How many parked callers release_all wakes per let-go of the GIL (its stack buffer).
cdef enum:
    _WAKE_CHUNK = 64


def release_all(list sleepers, bint keep_gil=False):
    """``release`` each of ``sleepers``, then wake those that parked with the GIL
    released: a worker completing a batch makes one system call per parked caller, and
    each caller it wakes may take the GIL and run while it makes the next. A sleeper
    released already raises ``RuntimeError`` (as ``release``), anything else in the list
    ``TypeError``: the first such error, once the others are woken.

    ``keep_gil``: wake them with the GIL held instead, for a worker whose next call is
    waiting for it (a full batch queued): otherwise it takes the GIL back only after the
    callers it woke have each had their turn, the model idle meanwhile. They run once it
    lets go (in its next call of a model that releases the GIL, or its next wait).
    """
    cdef PyThread_type_lock parks[_WAKE_CHUNK]
    cdef PyThread_type_lock park
    cdef Py_ssize_t parked = 0
    cdef list held = None  # the parked sleepers, whatever becomes of the list meanwhile
    cdef object error = None
    for sleeper in sleepers:
        try:
            park = (<Sleeper?>sleeper)._mark_released()
        except Exception as exc:  # released already, or no Sleeper: the rest go on
            if error is None:
                error = exc
            continue
        if park == NULL:
            continue
        if held is None:
            held = []
        held.append(sleeper)  # so its lock outlives its release
        parks[parked] = park
        parked += 1
        if parked == _WAKE_CHUNK:
            _release_parks(parks, parked, keep_gil)
            parked = 0
    if parked:
        _release_parks(parks, parked, keep_gil)
    if error is not None:
        raise error


cdef void _release_parks(PyThread_type_lock* parks, Py_ssize_t n,
                         bint keep_gil) noexcept:
    """Release ``n`` park locks, the GIL let go (see the module: a let-go) unless
    ``keep_gil``."""
    if keep_gil:
        _unpark(parks, n)
        return
    note_let_go()
    with nogil:
        _unpark(parks, n)


cdef inline void _unpark(PyThread_type_lock* parks, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        PyThread_release_lock(parks[i])

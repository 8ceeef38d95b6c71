# cython: language_level=3
"""Fixed-capacity window of recent samples: mean, min, max and percentiles.

Storage is a ring buffer in insertion order whose slots are also the nodes of a
treap (randomised balanced BST) keyed by (value, sequence number) and augmented
with subtree sizes, so the k-th smallest value is O(log n) expected. Node i is ring
slot i - 1; node 0 is the empty sentinel (size 0). Arrays grow lazily up to the
capacity, so a large, mostly empty window costs little memory.

In a window of at most LAZY_CAPACITY samples, adding one only writes the ring
(O(1)); the treap takes in the samples added since it was last brought up to date
when an order statistic is asked for (O(log n) each, evicting the samples they
replaced), without the GIL when there are many. A sample evicted before anyone asks
is never indexed: the engine adds every request's latency and reads percentiles only
in get_stats(). A larger window indexes each sample as it is added, so that neither
an add nor a query ever waits for more than one sample's indexing.
"""

cimport cython
from libc.math cimport fabs, floor, isfinite, NAN
from libc.stdint cimport int32_t, uint32_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy
from _types cimport count_arg
from scratch_array cimport ScratchArray

import numpy as np

cdef enum:
    _MAX_CAPACITY = 1 << 26
    NOGIL_EXTEND = 4096     # extend() releases the GIL for batches at least this long
    LAZY_CAPACITY = 4096    # largest window that indexes its samples only when asked
    NOGIL_INDEX = 256       # a query indexing this many samples releases the GIL

MAX_CAPACITY = _MAX_CAPACITY  # for Python callers that check a capacity first (the config)

# A compensated sum of n terms is off by about n * eps**2 times the sum of their
# magnitudes: past this many times the sum, for up to 2**26 terms, that may exceed 1e-12
# of the sum, and the mean sums the window again.
cdef double CANCELLATION = 2.0 ** 40


cdef inline int _grow(void** block, size_t size) noexcept nogil:
    """realloc ``*block`` to ``size`` bytes; -1 (the block kept as it was) on failure."""
    cdef void* p = realloc(block[0], size)
    if p == NULL:
        return -1
    block[0] = p
    return 0


@cython.final
cdef class RollingWindow:
    """Fixed-capacity window over the most recent samples; thread-safe.

    Every method takes the window's own lock; no Python code runs while it is held.
    """

    cdef cython.pymutex _lock
    cdef readonly Py_ssize_t capacity
    cdef Py_ssize_t _n              # samples in the window
    cdef Py_ssize_t _head           # ring slot of the oldest sample (0 until full)
    cdef Py_ssize_t _alloc          # node slots allocated (excluding the sentinel)
    cdef unsigned long long _total  # samples ever added
    cdef Py_ssize_t _evictions      # since the running sum was last recomputed
    cdef double _sum, _comp         # Neumaier running sum of the window
    cdef double _magnitude          # sum of |x| over what it added and took away since
    cdef uint32_t _rng
    cdef int32_t _root
    cdef Py_ssize_t _pending        # newest samples not in the treap yet (<= _n)
    cdef Py_ssize_t _indexed_n      # _n when the treap was last brought up to date
    cdef uint32_t _pushed           # samples pushed, wrapping: sequence numbers
    cdef double* _val               # the ring: each slot's current sample
    cdef double* _key               # each treap node's value (its slot's, when indexed)
    cdef uint32_t* _seq             # each treap node's sequence number: ties, older first
    cdef int32_t* _left
    cdef int32_t* _right
    cdef int32_t* _size
    cdef uint32_t* _prio

    def __cinit__(self, *args, **kwargs):
        self._val = NULL
        self._key = NULL
        self._seq = NULL
        self._left = NULL
        self._right = NULL
        self._size = NULL
        self._prio = NULL
        self._alloc = -1
        self.capacity = 0

    def __init__(self, capacity):
        cdef Py_ssize_t cap = count_arg(capacity, "capacity", _MAX_CAPACITY)
        if self.capacity:
            raise RuntimeError("RollingWindow is already initialised")
        self._rng = 0x9E3779B9u ^ <uint32_t>cap
        self._reset()
        self._alloc = 0
        if self._reserve(min(cap, 64)) < 0:
            raise MemoryError()
        self.capacity = cap

    def __dealloc__(self):
        free(self._val)
        free(self._key)
        free(self._seq)
        free(self._left)
        free(self._right)
        free(self._size)
        free(self._prio)

    def __repr__(self):
        return f"RollingWindow(capacity={self.capacity}, len={len(self)})"

    # ---------------------------------------------------------------- mutation

    def add(self, double value):
        """Add one sample; NaN and +-inf raise ValueError."""
        cdef int rc = 0
        if not isfinite(value):
            raise ValueError(f"value must be finite, got {value!r}")
        self._check_init()
        with self._lock:
            rc = self._push(value)
            if rc == 0:
                self._total += 1
        if rc < 0:
            raise MemoryError("RollingWindow could not grow its storage")

    def extend(self, values):
        """Add every value of an iterable, oldest first; all or nothing on bad input."""
        cdef ScratchArray[double] buf
        cdef double x
        cdef const double[::1] view
        cdef Py_ssize_t i, k
        cdef int rc = 0
        self._check_init()
        if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "biuf":
            view = np.ascontiguousarray(values, dtype=np.float64)
            k = view.shape[0]
            if not buf.resize(k):
                raise MemoryError("RollingWindow.extend could not copy its values")
            for i in range(k):
                x = view[i]
                if not isfinite(x):
                    raise ValueError(f"values[{i}] must be finite, got {x!r}")
                buf[i] = x
        else:
            i = 0
            for v in values:
                x = v
                if not isfinite(x):
                    raise ValueError(f"values[{i}] must be finite, got {x!r}")
                if not buf.push_back(x):
                    raise MemoryError("RollingWindow.extend could not copy its values")
                i += 1
        k = <Py_ssize_t>buf.size()
        if k == 0:
            return
        with self._lock:
            if k >= NOGIL_EXTEND:
                with nogil:
                    rc = self._push_many(buf.data(), k)
            else:
                rc = self._push_many(buf.data(), k)
        if rc < 0:
            raise MemoryError("RollingWindow could not grow its storage")

    def clear(self):
        """Empty the window (total_count keeps counting)."""
        self._check_init()
        with self._lock:
            self._reset()

    # ----------------------------------------------------------------- queries

    def __len__(self):
        cdef Py_ssize_t n = 0
        with self._lock:
            n = self._n
        return n

    @property
    def total_count(self):
        """Samples ever added, including those evicted or cleared."""
        cdef unsigned long long t = 0
        with self._lock:
            t = self._total
        return t

    def mean(self):
        """Mean of the window; nan when empty."""
        cdef double r = NAN
        self._check_init()
        with self._lock:
            if self._n:
                if not self._sum_is_exact():
                    self._recompute_sum()
                r = (self._sum + self._comp) / self._n
                if not isfinite(r):
                    r = self._scaled_mean()
        return r

    def min(self):
        """Smallest sample in the window; nan when empty."""
        cdef double r = NAN
        self._check_init()
        with self._lock:
            if self._n:
                self._index_for_query()
                r = self._select(0)
        return r

    def max(self):
        """Largest sample in the window; nan when empty."""
        cdef double r = NAN
        self._check_init()
        with self._lock:
            if self._n:
                self._index_for_query()
                r = self._select(self._n - 1)
        return r

    def percentile(self, double q):
        """numpy.percentile(window, q) with the default 'linear' method; nan when empty."""
        cdef double r = NAN
        if not (0.0 <= q <= 100.0):
            raise ValueError(f"percentile q must be in [0, 100], got {q!r}")
        self._check_init()
        with self._lock:
            if self._n:
                self._index_for_query()
                r = self._quantile(q)
        return r

    def percentiles(self, qs):
        """Several percentiles under one lock acquisition; a list of floats."""
        cdef ScratchArray[double] qv
        cdef double q
        cdef Py_ssize_t i, m
        cdef bint empty = True
        self._check_init()
        for v in qs:
            q = v
            if not (0.0 <= q <= 100.0):
                raise ValueError(f"percentile q must be in [0, 100], got {q!r}")
            if not qv.push_back(q):
                raise MemoryError("RollingWindow.percentiles could not copy its arguments")
        m = <Py_ssize_t>qv.size()
        with self._lock:
            empty = self._n == 0
            if not empty:
                self._index_for_query()
                for i in range(m):
                    qv[i] = self._quantile(qv[i])
        if empty:
            return [float("nan")] * m
        return [qv[i] for i in range(m)]

    def values(self):
        """A float64 copy of the window in insertion order (oldest first)."""
        cdef ScratchArray[double] tmp
        cdef Py_ssize_t n = 0, first, cap
        cdef double[::1] view
        self._check_init()
        # Copy out under the lock into C memory (no Python code while it is held),
        # then build the array.
        if not tmp.reserve(<size_t>self.capacity if self.capacity < 4096 else 4096):
            raise MemoryError("RollingWindow.values could not copy the window")
        while True:
            with self._lock:
                n = self._n
                if <size_t>n <= tmp.capacity():
                    tmp.resize(<size_t>n)  # within capacity: cannot fail
                    cap = self.capacity
                    first = cap - self._head
                    if first > n:
                        first = n
                    if n:
                        memcpy(tmp.data(), self._val + 1 + self._head, first * sizeof(double))
                        memcpy(tmp.data() + first, self._val + 1,
                               (n - first) * sizeof(double))
                    break
            if not tmp.reserve(<size_t>n):
                raise MemoryError("RollingWindow.values could not copy the window")
        out = np.empty(n, dtype=np.float64)
        if n:
            view = out
            memcpy(&view[0], tmp.data(), n * sizeof(double))
        return out

    # --------------------------------------------------------------- internals

    cdef inline int _check_init(self) except -1:
        if self.capacity == 0:
            raise RuntimeError("RollingWindow.__init__ was not called")
        return 0

    cdef void _reset(self) noexcept nogil:
        self._n = 0
        self._head = 0
        self._root = 0
        self._pending = 0
        self._indexed_n = 0
        self._sum = 0.0
        self._comp = 0.0
        self._magnitude = 0.0
        self._evictions = 0

    cdef int _reserve(self, Py_ssize_t want) noexcept nogil:
        """Make room for `want` nodes (plus the sentinel); -1 when out of memory."""
        cdef Py_ssize_t new_alloc, slots
        if want <= self._alloc:
            return 0
        new_alloc = self._alloc * 2
        if new_alloc < want:
            new_alloc = want
        if new_alloc > self.capacity and self.capacity:
            new_alloc = self.capacity
        if new_alloc < want:
            new_alloc = want
        slots = new_alloc + 1
        # Each realloc keeps the old block on failure, so a failure leaves a
        # consistent (if partly larger) set of arrays; _alloc only moves at the end.
        if (_grow(<void**>&self._val, slots * sizeof(double)) < 0
                or _grow(<void**>&self._key, slots * sizeof(double)) < 0
                or _grow(<void**>&self._seq, slots * sizeof(uint32_t)) < 0
                or _grow(<void**>&self._left, slots * sizeof(int32_t)) < 0
                or _grow(<void**>&self._right, slots * sizeof(int32_t)) < 0
                or _grow(<void**>&self._size, slots * sizeof(int32_t)) < 0
                or _grow(<void**>&self._prio, slots * sizeof(uint32_t)) < 0):
            return -1
        if self._alloc <= 0:
            # The sentinel: an empty subtree.
            self._val[0] = 0.0
            self._key[0] = 0.0
            self._seq[0] = 0
            self._left[0] = 0
            self._right[0] = 0
            self._size[0] = 0
            self._prio[0] = 0
        self._alloc = new_alloc
        return 0

    cdef inline uint32_t _next_prio(self) noexcept nogil:
        # xorshift32; never 0, which is reserved for the sentinel.
        cdef uint32_t x = self._rng
        x ^= x << 13
        x ^= x >> 17
        x ^= x << 5
        self._rng = x
        return x

    cdef inline bint _less(self, int32_t a, int32_t b) noexcept nogil:
        """Order of nodes: by value, ties broken by sequence number (older first). The
        treap's nodes span fewer than 2 * capacity pushes, far less than 2**31: the
        difference of two sequence numbers, as signed, orders them across wrapping."""
        cdef double va = self._key[a], vb = self._key[b]
        if va != vb:
            return va < vb
        return <int32_t>(self._seq[a] - self._seq[b]) < 0

    cdef inline void _update(self, int32_t t) noexcept nogil:
        self._size[t] = 1 + self._size[self._left[t]] + self._size[self._right[t]]

    cdef void _split(self, int32_t t, int32_t x, int32_t* l, int32_t* r) noexcept nogil:
        """Split subtree t into nodes ordered before x (into *l) and after x (*r)."""
        if t == 0:
            l[0] = 0
            r[0] = 0
            return
        if self._less(t, x):
            self._split(self._right[t], x, &self._right[t], r)
            l[0] = t
        else:
            self._split(self._left[t], x, l, &self._left[t])
            r[0] = t
        self._update(t)

    cdef int32_t _merge(self, int32_t a, int32_t b) noexcept nogil:
        """Join subtrees a and b, every node of a ordered before every node of b."""
        if a == 0:
            return b
        if b == 0:
            return a
        if self._prio[a] > self._prio[b]:
            self._right[a] = self._merge(self._right[a], b)
            self._update(a)
            return a
        self._left[b] = self._merge(a, self._left[b])
        self._update(b)
        return b

    cdef void _insert(self, int32_t x) noexcept nogil:
        cdef int32_t* link = &self._root
        cdef int32_t t
        cdef uint32_t px = self._prio[x]
        while True:
            t = link[0]
            if t == 0 or px > self._prio[t]:
                break
            self._size[t] += 1
            if self._less(x, t):
                link = &self._left[t]
            else:
                link = &self._right[t]
        self._split(t, x, &self._left[x], &self._right[x])
        self._update(x)
        link[0] = x

    cdef void _erase(self, int32_t x) noexcept nogil:
        cdef int32_t* link = &self._root
        cdef int32_t t = 0
        while True:
            t = link[0]
            if t == x:
                break
            self._size[t] -= 1
            if self._less(x, t):
                link = &self._left[t]
            else:
                link = &self._right[t]
        link[0] = self._merge(self._left[x], self._right[x])

    cdef double _select(self, Py_ssize_t k) noexcept nogil:
        """The k-th smallest value, 0 <= k < n."""
        cdef int32_t t = self._root
        cdef Py_ssize_t ls
        while True:
            ls = self._size[self._left[t]]
            if k < ls:
                t = self._left[t]
            elif k == ls:
                return self._key[t]
            else:
                k -= ls + 1
                t = self._right[t]

    cdef double _quantile(self, double q) noexcept nogil:
        """numpy's 'linear' percentile (Hyndman & Fan 7), same arithmetic; n > 0."""
        cdef Py_ssize_t n = self._n, lo
        cdef double virtual = (n - 1) * (q / 100.0)
        cdef double prev = floor(virtual)
        cdef double gamma, a, b, diff
        if virtual >= n - 1:
            return self._select(n - 1)
        lo = <Py_ssize_t>prev
        gamma = virtual - prev
        a = self._select(lo)
        b = self._select(lo + 1)
        diff = b - a
        if gamma >= 0.5:
            return b - diff * (1.0 - gamma)
        return a + diff * gamma

    cdef inline void _sum_add(self, double x) noexcept nogil:
        # Neumaier's compensated summation.
        cdef double s = self._sum
        cdef double t = s + x
        if fabs(s) >= fabs(x):
            self._comp += (s - t) + x
        else:
            self._comp += (x - t) + s
        self._sum = t

    cdef inline bint _sum_is_exact(self) noexcept nogil:
        """Whether the running sum still holds the window's to double precision. A
        compensated sum's error grows with the magnitudes that went through it, so
        samples far larger than the window's sum, added then evicted (1e300 before a
        run of ones), leave it wrong: then it is summed again from the ring."""
        cdef double total = self._sum + self._comp
        return isfinite(total) and self._magnitude <= CANCELLATION * fabs(total)

    cdef double _scaled_mean(self) noexcept nogil:
        """The mean as the sum of each sample over n: for samples whose sum overflows a
        double (near 1e308) though their mean does not (the sum read inf, or NaN once
        the compensation overflowed too)."""
        cdef Py_ssize_t i
        cdef double total = 0.0
        for i in range(self._n):
            total += self._val[1 + (self._head + i) % self.capacity] / self._n
        return total

    cdef void _recompute_sum(self) noexcept nogil:
        cdef Py_ssize_t i
        cdef double x
        self._sum = 0.0
        self._comp = 0.0
        self._magnitude = 0.0
        for i in range(self._n):
            x = self._val[1 + (self._head + i) % self.capacity]
            self._sum_add(x)
            self._magnitude += fabs(x)
        self._evictions = 0

    cdef int _push(self, double x) noexcept nogil:
        """Append x, evicting the oldest sample when full. -1: out of memory."""
        cdef int32_t node
        cdef double old
        if self._n < self.capacity:
            if self._n >= self._alloc and self._reserve(self._n + 1) < 0:
                return -1
            node = <int32_t>(self._n + 1)      # not full: head is 0
            self._n += 1
            self._val[node] = x
        else:
            # The treap may still hold the evicted sample at this node: _key and _seq
            # keep it there until _index takes it out.
            node = <int32_t>(self._head + 1)
            old = self._val[node]
            self._val[node] = x
            self._head += 1
            if self._head == self.capacity:
                self._head = 0
            self._sum_add(-old)
            self._magnitude += fabs(old)
            self._evictions += 1
        self._pushed += 1
        if self._pending < self._n:
            self._pending += 1
        self._sum_add(x)
        self._magnitude += fabs(x)
        if self._evictions >= self.capacity:
            self._recompute_sum()
        if self.capacity > LAZY_CAPACITY:
            self._index()
        return 0

    cdef void _index_for_query(self) noexcept:
        """``_index`` for a query holding the lock (and the GIL, released when the
        samples to index are many)."""
        if self._pending >= NOGIL_INDEX:
            with nogil:
                self._index()
        else:
            self._index()

    cdef void _index(self) noexcept nogil:
        """Bring the treap up to date: take in the `_pending` newest samples, each in
        place of what its node held when the treap was last up to date (a sample since
        evicted). All of them pending: index the window afresh."""
        cdef Py_ssize_t n = self._n, k = self._pending, age
        cdef int32_t node
        cdef bint afresh = k == n
        if k == 0:
            return
        if afresh:
            self._root = 0
        for age in range(n - k, n):
            node = <int32_t>((self._head + age) % self.capacity + 1)
            # Its slot held a sample when the treap was last up to date (slots fill
            # from 0 until the window is full, and _indexed_n is capacity after).
            if not afresh and node - 1 < self._indexed_n:
                self._erase(node)
            self._key[node] = self._val[node]
            self._seq[node] = self._pushed - <uint32_t>(n - age)
            self._left[node] = 0
            self._right[node] = 0
            self._prio[node] = self._next_prio()
            self._insert(node)
        self._indexed_n = n
        self._pending = 0

    cdef int _push_many(self, const double* xs, Py_ssize_t k) noexcept nogil:
        cdef Py_ssize_t i, start = 0
        if k >= self.capacity:
            # Only the last `capacity` values survive: start from an empty window.
            start = k - self.capacity
            self._reset()
        if self._reserve(min(self._n + (k - start), self.capacity)) < 0:
            return -1
        for i in range(start, k):
            if self._push(xs[i]) < 0:
                self._total += <unsigned long long>(i - start)
                return -1
        self._total += <unsigned long long>k
        return 0

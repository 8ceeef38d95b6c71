# cython: language_level=3
"""Copies request items into reused, pre-allocated batch buffers.

Validation (types, dtypes, shapes, overflow-checked sizes) runs with the GIL and
without allocating; the copy itself is a ``noexcept nogil`` kernel over ``char*``:
one ``memcpy`` per C-contiguous item (per row when padding), a strided loop for any
other layout. A buffer is written again only while nothing but the assembler
references it (see ``BatchAssembler``).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport uintptr_t
from libc.string cimport memcpy, memset
from _types cimport count_arg
from scratch_array cimport ScratchArray

cimport numpy as cnp
from numpy cimport npy_intp

import numpy as np
from operator import index as _index

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    # Raw-pointer spellings of the numpy C API: no reference counting per item.
    bint np_is_array "PyArray_Check"(PyObject* op)
    int np_ndim "PyArray_NDIM"(cnp.PyArrayObject* arr) noexcept nogil
    npy_intp* np_dims "PyArray_DIMS"(cnp.PyArrayObject* arr) noexcept nogil
    npy_intp* np_strides "PyArray_STRIDES"(cnp.PyArrayObject* arr) noexcept nogil
    char* np_bytes "PyArray_BYTES"(cnp.PyArrayObject* arr) noexcept nogil
    int np_flags "PyArray_FLAGS"(cnp.PyArrayObject* arr) noexcept nogil
    npy_intp np_itemsize "PyArray_ITEMSIZE"(cnp.PyArrayObject* arr) noexcept nogil
    npy_intp np_size "PyArray_SIZE"(cnp.PyArrayObject* arr) noexcept nogil
    cnp.PyArray_Descr* np_descr "PyArray_DESCR"(cnp.PyArrayObject* arr) noexcept nogil
    bint np_refchk "PyDataType_REFCHK"(cnp.PyArray_Descr* d) noexcept
    unsigned char np_equiv "PyArray_EquivTypes"(cnp.PyArray_Descr* a, cnp.PyArray_Descr* b)
    # Steals a reference to descr, also on failure.
    object np_new_from_descr "PyArray_NewFromDescr"(
        PyTypeObject* subtype, cnp.PyArray_Descr* descr, int nd, npy_intp* dims,
        npy_intp* strides, void* data, int flags, PyObject* obj)
    # Steals a reference to base, also on failure.
    int np_set_base "PyArray_SetBaseObject"(cnp.PyArrayObject* arr, PyObject* base) except -1
    PyTypeObject np_array_type "PyArray_Type"
    enum:
        NPY_ARRAY_C_CONTIGUOUS
        NPY_ARRAY_ALIGNED
        NPY_ARRAY_WRITEABLE

cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX
    # On a raw pointer: no temporary reference of our own inflates the count.
    Py_ssize_t py_refcnt "Py_REFCNT"(PyObject* op) noexcept nogil


cdef enum:
    MAX_BUFFERS = 16
    MAX_DIMS = 64           # NPY_MAXDIMS on NumPy 2; NumPy 1.x itself refuses > 32
    ALIGN = 64              # buffer alignment in bytes
    NOGIL_BYTES = 1 << 16   # release the GIL only for copies at least this large

# Largest capacity handed to the allocator: the rounding to a power of two and the
# alignment slack must not overflow Py_ssize_t.
cdef Py_ssize_t MAX_CAPACITY = (<Py_ssize_t>1) << 62


cdef struct Item:
    # One input array as the copy kernel sees it; shapes are copied (not borrowed)
    # so nothing another thread does to the array object can change them mid-copy.
    const char* src
    Py_ssize_t nbytes       # bytes this item contributes to the batch
    int contiguous          # 1: one memcpy of nbytes
    int nd                  # strided items: dims/strides live in shape_pool[shape_at:]
    Py_ssize_t shape_at


cdef struct PadItem:
    # One input of concat_padded: `rows` rows of `seq_bytes` bytes of values each.
    const char* src
    Py_ssize_t rows
    Py_ssize_t row_stride   # bytes from one row of src to the next (any sign)
    Py_ssize_t seq_bytes    # L_i * inner: the values of one row, C order
    int contiguous          # 1: the whole item is C-contiguous
    int nd                  # strided items: one row's dims/strides at shape_pool[shape_at:]
    Py_ssize_t shape_at


cdef inline bint _mul(Py_ssize_t a, Py_ssize_t b, Py_ssize_t* out) noexcept nogil:
    """out = a * b for a, b >= 0; True when that overflows."""
    if a != 0 and b > PY_SSIZE_T_MAX // a:
        return True
    out[0] = a * b
    return False


cdef void _strided_copy(char* dst, const char* src, int nd, const npy_intp* dims,
                        const npy_intp* strides, Py_ssize_t itemsize) noexcept nogil:
    """Copy an nd array at src (any strides, negative included) to dst in C order."""
    cdef npy_intp counter[MAX_DIMS]
    cdef Py_ssize_t block = itemsize
    cdef int k = nd, d, j
    cdef npy_intp n_inner, inner_stride, _i
    cdef const char* p
    for d in range(nd):
        if dims[d] == 0:
            return
    # Fold trailing dimensions that are already contiguous into one memcpy block.
    while k > 0 and (dims[k - 1] == 1 or strides[k - 1] == block):
        block *= dims[k - 1]
        k -= 1
    if k == 0:
        memcpy(dst, src, block)
        return
    n_inner = dims[k - 1]
    inner_stride = strides[k - 1]
    for d in range(k - 1):
        counter[d] = 0
    while True:
        # Offset of the current outer index.
        p = src
        for d in range(k - 1):
            p += counter[d] * strides[d]
        if block == 8:
            for _i in range(n_inner):
                memcpy(dst, p, 8)
                dst += 8
                p += inner_stride
        elif block == 4:
            for _i in range(n_inner):
                memcpy(dst, p, 4)
                dst += 4
                p += inner_stride
        else:
            for _i in range(n_inner):
                memcpy(dst, p, block)
                dst += block
                p += inner_stride
        # Odometer over the outer k-1 dimensions.
        j = k - 2
        while j >= 0:
            counter[j] += 1
            if counter[j] < dims[j]:
                break
            counter[j] = 0
            j -= 1
        if j < 0:
            return


cdef void _copy_items(char* dst, const Item* items, Py_ssize_t n,
                      const npy_intp* shape_pool, Py_ssize_t itemsize) noexcept nogil:
    cdef Py_ssize_t i
    cdef const Item* it
    for i in range(n):
        it = &items[i]
        if it.nbytes == 0:
            continue
        if it.contiguous:
            memcpy(dst, it.src, it.nbytes)
        else:
            _strided_copy(dst, it.src, it.nd, shape_pool + it.shape_at,
                          shape_pool + it.shape_at + it.nd, itemsize)
        dst += it.nbytes


cdef inline void _fill(char* dst, Py_ssize_t n, const char* pad, Py_ssize_t itemsize,
                       int fill_byte, const char** tmpl, Py_ssize_t* tmpl_len) noexcept nogil:
    """Fill n bytes (a whole number of items, n > 0) with the pad pattern.

    fill_byte >= 0: every pad byte equals it, one memset. Otherwise copy the longest
    tail filled so far (tmpl; every tail starts on an item boundary, so its pattern
    lines up) and double from there.
    """
    cdef Py_ssize_t done, c
    if fill_byte >= 0:
        memset(dst, fill_byte, <size_t>n)
        return
    if tmpl_len[0] >= n:
        memcpy(dst, tmpl[0], <size_t>n)
        return
    if tmpl_len[0]:
        memcpy(dst, tmpl[0], <size_t>tmpl_len[0])
        done = tmpl_len[0]
    else:
        memcpy(dst, pad, <size_t>itemsize)
        done = itemsize
    while done < n:
        c = done if done < n - done else n - done
        memcpy(dst + done, dst, <size_t>c)
        done += c
    tmpl[0] = dst
    tmpl_len[0] = n


cdef void _copy_padded(char* dst, const PadItem* items, Py_ssize_t n,
                       const npy_intp* shape_pool, Py_ssize_t itemsize,
                       Py_ssize_t row_bytes, const char* pad, int fill_byte) noexcept nogil:
    """Each item's rows at dst, row_bytes apart: values first, the pad pattern after."""
    cdef const char* tmpl = NULL
    cdef Py_ssize_t tmpl_len = 0, i, r, tail
    cdef const PadItem* it
    for i in range(n):
        it = &items[i]
        if it.rows == 0:
            continue
        tail = row_bytes - it.seq_bytes
        if it.contiguous and tail == 0:
            memcpy(dst, it.src, <size_t>(it.rows * row_bytes))
            dst += it.rows * row_bytes
            continue
        for r in range(it.rows):
            if it.seq_bytes:
                if it.contiguous:
                    memcpy(dst, it.src + r * it.seq_bytes, <size_t>it.seq_bytes)
                else:
                    _strided_copy(dst, it.src + r * it.row_stride, it.nd,
                                  shape_pool + it.shape_at,
                                  shape_pool + it.shape_at + it.nd, itemsize)
            if tail:
                _fill(dst + it.seq_bytes, tail, pad, itemsize, fill_byte, &tmpl, &tmpl_len)
            dst += row_bytes


cdef inline bint _overlaps(const char* src, int nd, const npy_intp* dims,
                           const npy_intp* strides, Py_ssize_t itemsize,
                           uintptr_t lo, uintptr_t hi) noexcept nogil:
    """Whether the memory an array spans intersects [lo, hi)."""
    cdef uintptr_t a = <uintptr_t>src, b = <uintptr_t>src + itemsize
    cdef int d
    for d in range(nd):
        if strides[d] < 0:
            a -= <uintptr_t>(-strides[d]) * <uintptr_t>(dims[d] - 1)
        else:
            b += <uintptr_t>strides[d] * <uintptr_t>(dims[d] - 1)
    return a < hi and lo < b


@cython.final
@cython.no_gc  # holds one uint8 array, which holds nothing: no cycle can pass through it
@cython.auto_pickle(False)  # pickling support would hand the buffer out (__reduce__)
cdef class _BufferHold:
    """A batch's hold on its buffer: the base of a batch array, in the buffer's place.

    A buffer is sized for the largest batch it has held, and past this batch's bytes
    it keeps what earlier batches wrote there: other callers' rows. With the buffer as
    the batch's base, ``result.base`` would reach them; through a hold, a result's base
    chain ends at the batch itself (numpy stops collapsing views at a base that is not
    an array), and the hold shows Python nothing. The buffer stays alive as long as
    any hold does, which is what tells the assembler it is still in use.
    """
    cdef object _owner


cdef class BatchAssembler:
    """Copies items into reused, pre-allocated batch buffers.

    Not thread-safe: each worker owns one. ``concat``/``stack``/``concat_padded``
    return a view into the next buffer of a rotation of ``buffers``. A result's buffer
    is reused only once no view of it is alive (a later call writes into a fresh buffer
    instead); so a result never changes while anybody can see it. A view is anything
    that references the result or its buffer, at any depth: slices of slices,
    ``np.flip``, ``memoryview``, ``torch.from_numpy``, an object or dict holding one.
    A raw address (``ctypes.data``) is not a view. Rotating over ``buffers`` lets the
    last ``buffers - 1`` results stay in use while the buffers are still reused.
    """

    cdef readonly int buffers
    cdef int _next
    cdef bint _busy
    cdef list _owners                       # uint8 arrays owning each buffer (or None)
    cdef char* _data[MAX_BUFFERS]           # ALIGN-aligned start of each buffer
    cdef Py_ssize_t _cap[MAX_BUFFERS]       # usable bytes from _data[i]
    cdef ScratchArray[Item] _items                # scratch, reused across calls
    cdef ScratchArray[PadItem] _pad_items
    cdef ScratchArray[npy_intp] _shape_pool       # dims + strides of non-contiguous items
    cdef npy_intp _out_dims[MAX_DIMS]

    def __cinit__(self):
        cdef int i
        for i in range(MAX_BUFFERS):
            self._data[i] = NULL
            self._cap[i] = 0
        self._owners = [None] * MAX_BUFFERS
        self.buffers = 0
        self._next = 0
        self._busy = False

    def __init__(self, buffers=2):
        cdef Py_ssize_t n = count_arg(buffers, "buffers", MAX_BUFFERS)
        if self.buffers:
            raise RuntimeError("BatchAssembler is already initialised")
        self.buffers = <int>n

    @property
    def nbytes(self):
        """Usable bytes of the buffers the assembler holds now (at most one per slot).

        A buffer it let go of because a result still viewed it lives on in that result
        and is no longer counted.
        """
        cdef Py_ssize_t total = 0
        cdef int i
        for i in range(MAX_BUFFERS):
            total += self._cap[i]
        return total

    def __repr__(self):
        return f"BatchAssembler(buffers={self.buffers}, nbytes={self.nbytes})"

    def __reduce__(self):
        raise TypeError("BatchAssembler cannot be pickled")

    def overlaps(self, obj):
        """Whether ``obj`` is an ndarray whose memory intersects one of the buffers this
        assembler holds now (a model's output that is, or views, its input). Anything
        else, an empty array included, is False. Such an output is safe to deliver:
        a buffer is never written while a view of it is alive."""
        cdef cnp.PyArrayObject* arr
        cdef uintptr_t lo
        cdef int i
        if not np_is_array(<PyObject*>obj):
            return False
        arr = <cnp.PyArrayObject*>obj
        if np_size(arr) == 0:
            return False
        for i in range(MAX_BUFFERS):
            if self._cap[i]:
                lo = <uintptr_t>self._data[i]
                if _overlaps(np_bytes(arr), np_ndim(arr), np_dims(arr), np_strides(arr),
                             np_itemsize(arr), lo, lo + <uintptr_t>self._cap[i]):
                    return True
        return False

    def concat(self, arrays):
        """Concatenate the rows of every array along axis 0 into the next buffer."""
        return self._assemble(arrays, False)

    def stack(self, arrays):
        """Stack arrays (one sample each) along a new axis 0 into the next buffer."""
        return self._assemble(arrays, True)

    def concat_padded(self, arrays, length, pad):
        """Concatenate items of shape (r_i, L_i, *rest) into (sum r_i, length, *rest),
        each row's values in [:, :L_i] and ``pad`` (one item's bytes) after them."""
        cdef Py_ssize_t n_length = _length_arg(length)
        if not isinstance(pad, bytes):
            raise TypeError(
                f"pad must be bytes (the fill value encoded in the items' dtype, e.g. "
                f"np.asarray(value, dtype).tobytes()), not {type(pad).__name__}")
        cdef tuple seq = self._begin(arrays)
        try:
            return self._pad_tuple(seq, n_length, <bytes>pad)
        finally:
            self._busy = False

    cdef object _assemble(self, arrays, bint stacking):
        cdef tuple seq = self._begin(arrays)
        try:
            return self._assemble_tuple(seq, stacking)
        finally:
            self._busy = False

    cdef tuple _begin(self, arrays):
        """The items as a tuple, with the assembler marked busy (the caller clears it)."""
        if self.buffers == 0:
            raise RuntimeError("BatchAssembler.__init__ was not called")
        if self._busy:
            raise RuntimeError(
                "BatchAssembler is not thread-safe: it is already assembling a batch "
                "(use one assembler per worker)")
        # A tuple snapshot: the items stay referenced (and the sequence unchanged)
        # for the whole call, whatever other threads do to a list passed in.
        cdef tuple seq = arrays if type(arrays) is tuple else tuple(arrays)
        self._busy = True
        return seq

    cdef object _assemble_tuple(self, tuple seq, bint stacking):
        cdef Py_ssize_t n = PyTuple_GET_SIZE(seq)
        cdef Py_ssize_t i, rows, total_rows = 0, row_bytes, total_bytes = 0, sample_bytes
        cdef Py_ssize_t itemsize
        cdef int nd, nd0, d, out_nd, slot
        cdef PyObject* obj
        cdef cnp.PyArrayObject* arr
        cdef cnp.PyArrayObject* arr0
        cdef cnp.PyArray_Descr* descr0
        cdef npy_intp* dims0
        cdef npy_intp* dims
        cdef npy_intp* strides
        cdef Item* item
        cdef bint overlap = False, release
        cdef uintptr_t lo, hi
        cdef char* dst

        if n == 0:
            raise ValueError(
                f"need at least one array to {'stack' if stacking else 'concatenate'}")

        obj = PyTuple_GET_ITEM(seq, 0)
        if not np_is_array(obj):
            raise TypeError(
                f"item 0 is {type(<object>obj).__name__}, not numpy.ndarray")
        arr0 = <cnp.PyArrayObject*>obj
        descr0 = np_descr(arr0)
        if np_refchk(descr0):
            raise TypeError(
                f"item 0 has dtype {(<object>descr0)!r}, which holds Python object "
                "references: object arrays are never raw-copied (use numpy's own "
                "concatenation)")
        nd0 = np_ndim(arr0)
        dims0 = np_dims(arr0)
        itemsize = np_itemsize(arr0)
        if not stacking and nd0 == 0:
            raise ValueError(
                "item 0 is a 0-d array: concat needs a leading sample axis "
                "(use stack for one sample per item)")
        out_nd = nd0 + 1 if stacking else nd0
        if out_nd > MAX_DIMS:
            raise ValueError(f"result would have {out_nd} dimensions, more than {MAX_DIMS}")

        # Bytes of one row (concat) or one sample (stack), overflow-checked.
        row_bytes = itemsize
        for d in range(0 if stacking else 1, nd0):
            if _mul(row_bytes, dims0[d], &row_bytes):
                raise ValueError("item 0 is too large: its size overflows")
        sample_bytes = row_bytes

        # Target buffer of this call; inputs that are views into it force a new one.
        slot = self._next
        lo = <uintptr_t>self._data[slot]
        hi = lo + <uintptr_t>self._cap[slot]

        if not self._items.resize(<size_t>n):
            raise MemoryError("could not grow the assembler's scratch space")
        self._shape_pool.clear()
        for i in range(n):
            obj = PyTuple_GET_ITEM(seq, i)
            if i:
                arr = _array_like_first(obj, i, descr0)
                nd = np_ndim(arr)
                dims = np_dims(arr)
                if stacking:
                    if nd != nd0 or not _same_dims(dims, dims0, nd):
                        raise ValueError(
                            f"item {i} has shape {_shape(dims, nd)} but item 0 has shape "
                            f"{_shape(dims0, nd0)}: stack needs equal shapes")
                else:
                    if nd == 0:
                        raise ValueError(
                            f"item {i} is a 0-d array: concat needs a leading sample axis")
                    if nd != nd0 or not _same_dims(dims + 1, dims0 + 1, nd - 1):
                        raise ValueError(
                            f"item {i} has trailing shape {_shape(dims + 1, nd - 1)} but "
                            f"item 0 has trailing shape {_shape(dims0 + 1, nd0 - 1)}: "
                            "concat needs equal dtype and trailing shape")
            else:
                arr = arr0
                nd = nd0
                dims = dims0
            item = &self._items[i]
            item.src = np_bytes(arr)
            if stacking:
                item.nbytes = sample_bytes
                rows = 1
            else:
                rows = dims[0]
                if _mul(rows, row_bytes, &item.nbytes):
                    raise ValueError(f"item {i} is too large: its size overflows")
            if total_rows > PY_SSIZE_T_MAX - rows:
                raise ValueError("batch is too large: its row count overflows")
            total_rows += rows
            if item.nbytes == 0:
                item.contiguous = 1
                continue
            strides = np_strides(arr)
            if hi != lo and not overlap:
                overlap = _overlaps(item.src, nd, dims, strides, itemsize, lo, hi)
            if np_flags(arr) & NPY_ARRAY_C_CONTIGUOUS:
                item.contiguous = 1
            else:
                item.contiguous = 0
                item.nd = nd
                item.shape_at = <Py_ssize_t>self._shape_pool.size()
                for d in range(nd):
                    if not self._shape_pool.push_back(dims[d]):
                        raise MemoryError("could not grow the assembler's scratch space")
                for d in range(nd):
                    if not self._shape_pool.push_back(strides[d]):
                        raise MemoryError("could not grow the assembler's scratch space")

        if _mul(total_rows, row_bytes, &total_bytes) or total_bytes > MAX_CAPACITY:
            raise ValueError(
                f"batch of {total_rows} rows x {row_bytes} bytes is too large to assemble")

        # Output shape: (total_rows, *trailing) or (n, *shape).
        self._out_dims[0] = total_rows
        if stacking:
            for d in range(nd0):
                self._out_dims[d + 1] = dims0[d]
        else:
            for d in range(1, nd0):
                self._out_dims[d] = dims0[d]

        _replaced = self._claim(slot, total_bytes, overlap)   # alive until we return
        out = self._result(slot, descr0, out_nd)
        dst = self._data[slot]

        # Nothing below runs Python code: the items, shapes and buffer are fixed.
        release = total_bytes >= NOGIL_BYTES
        if release:
            with nogil:
                _copy_items(dst, self._items.data(), n, self._shape_pool.data(), itemsize)
        else:
            _copy_items(dst, self._items.data(), n, self._shape_pool.data(), itemsize)
        self._next = slot + 1 if slot + 1 < self.buffers else 0
        return out

    cdef object _pad_tuple(self, tuple seq, Py_ssize_t length, bytes pad):
        cdef Py_ssize_t n = PyTuple_GET_SIZE(seq)
        cdef Py_ssize_t i, rows, total_rows = 0, inner, row_bytes, total_bytes
        cdef Py_ssize_t itemsize
        cdef int nd, nd0, d, slot, fill_byte
        cdef PyObject* obj
        cdef cnp.PyArrayObject* arr
        cdef cnp.PyArrayObject* arr0
        cdef cnp.PyArray_Descr* descr0
        cdef npy_intp* dims0
        cdef npy_intp* dims
        cdef npy_intp* strides
        cdef PadItem* item
        cdef bint overlap = False
        cdef uintptr_t lo, hi
        cdef const char* pad_bytes = PyBytes_AS_STRING(pad)
        cdef char* dst

        if n == 0:
            raise ValueError("need at least one array to concatenate")
        obj = PyTuple_GET_ITEM(seq, 0)
        if not np_is_array(obj):
            raise TypeError(
                f"item 0 is {type(<object>obj).__name__}, not numpy.ndarray")
        arr0 = <cnp.PyArrayObject*>obj
        descr0 = np_descr(arr0)
        if np_refchk(descr0):
            raise TypeError(
                f"item 0 has dtype {(<object>descr0)!r}, which holds Python object "
                "references: object arrays are never raw-copied (pad them with numpy)")
        nd0 = np_ndim(arr0)
        dims0 = np_dims(arr0)
        if nd0 < 2:
            raise ValueError(
                f"item 0 has shape {_shape(dims0, nd0)}: concat_padded needs items of "
                "shape (rows, length, ...), at least 2-d")
        itemsize = np_itemsize(arr0)
        if PyBytes_GET_SIZE(pad) != itemsize:
            raise ValueError(
                f"pad has {PyBytes_GET_SIZE(pad)} bytes but dtype {(<object>descr0)!r} has "
                f"itemsize {itemsize}: pass one value encoded in that dtype, e.g. "
                "np.asarray(value, dtype).tobytes()")
        # Bytes of one position along the length axis, and of one output row.
        inner = itemsize
        for d in range(2, nd0):
            if _mul(inner, dims0[d], &inner):
                raise ValueError("item 0 is too large: its size overflows")
        if _mul(length, inner, &row_bytes):
            raise ValueError(f"length {length} is too large: a row's size overflows")

        slot = self._next
        lo = <uintptr_t>self._data[slot]
        hi = lo + <uintptr_t>self._cap[slot]

        if not self._pad_items.resize(<size_t>n):
            raise MemoryError("could not grow the assembler's scratch space")
        self._shape_pool.clear()
        for i in range(n):
            obj = PyTuple_GET_ITEM(seq, i)
            if i:
                arr = _array_like_first(obj, i, descr0)
                nd = np_ndim(arr)
                dims = np_dims(arr)
                if nd < 2:
                    raise ValueError(
                        f"item {i} has shape {_shape(dims, nd)}: concat_padded needs "
                        "items of shape (rows, length, ...), at least 2-d")
                if nd != nd0 or not _same_dims(dims + 2, dims0 + 2, nd - 2):
                    raise ValueError(
                        f"item {i} has shape {_shape(dims, nd)} but item 0 has shape "
                        f"{_shape(dims0, nd0)}: concat_padded needs equal dtype and "
                        "equal shape after the first two axes")
            else:
                arr = arr0
                nd = nd0
                dims = dims0
            if dims[1] > length:
                raise ValueError(
                    f"item {i} has shape {_shape(dims, nd)}: its length {dims[1]} is "
                    f"more than length={length}")
            rows = dims[0]
            if total_rows > PY_SSIZE_T_MAX - rows:
                raise ValueError("batch is too large: its row count overflows")
            total_rows += rows
            item = &self._pad_items[i]
            item.src = np_bytes(arr)
            item.rows = rows
            item.seq_bytes = dims[1] * inner      # <= row_bytes: no overflow
            item.contiguous = 1
            if rows == 0 or item.seq_bytes == 0:
                continue                          # nothing of it is read
            strides = np_strides(arr)
            if hi != lo and not overlap:
                overlap = _overlaps(item.src, nd, dims, strides, itemsize, lo, hi)
            if not np_flags(arr) & NPY_ARRAY_C_CONTIGUOUS:
                item.contiguous = 0
                item.row_stride = strides[0]
                item.nd = nd - 1
                item.shape_at = <Py_ssize_t>self._shape_pool.size()
                for d in range(1, nd):
                    if not self._shape_pool.push_back(dims[d]):
                        raise MemoryError("could not grow the assembler's scratch space")
                for d in range(1, nd):
                    if not self._shape_pool.push_back(strides[d]):
                        raise MemoryError("could not grow the assembler's scratch space")

        if _mul(total_rows, row_bytes, &total_bytes) or total_bytes > MAX_CAPACITY:
            raise ValueError(
                f"batch of {total_rows} rows x {row_bytes} bytes is too large to assemble")

        self._out_dims[0] = total_rows
        self._out_dims[1] = length
        for d in range(2, nd0):
            self._out_dims[d] = dims0[d]

        # memset when every byte of the pattern is the same (0, -1 in ints, False...).
        fill_byte = <unsigned char>pad_bytes[0] if itemsize else 0
        for i in range(1, itemsize):
            if pad_bytes[i] != pad_bytes[0]:
                fill_byte = -1
                break

        _replaced = self._claim(slot, total_bytes, overlap)   # alive until we return
        out = self._result(slot, descr0, nd0)
        dst = self._data[slot]

        # Nothing below runs Python code; pad stays referenced by our caller's frame.
        if total_bytes:
            if total_bytes >= NOGIL_BYTES:
                with nogil:
                    _copy_padded(dst, self._pad_items.data(), n, self._shape_pool.data(),
                                 itemsize, row_bytes, pad_bytes, fill_byte)
            else:
                _copy_padded(dst, self._pad_items.data(), n, self._shape_pool.data(),
                             itemsize, row_bytes, pad_bytes, fill_byte)
        self._next = slot + 1 if slot + 1 < self.buffers else 0
        return out

    cdef object _claim(self, int slot, Py_ssize_t need, bint overlap):
        """Make buffer `slot` ready for `need` bytes. Returns the buffer it replaced (or
        None), for the caller to keep alive until its copy is done: an input may still
        alias that memory by address alone."""
        # Every view of a result (a slice, memoryview, tensor, at any depth) references
        # the owner through its base chain (the result's hold); our list holds one
        # reference.
        cdef PyObject* held = PyList_GET_ITEM(self._owners, slot)
        if (self._data[slot] != NULL and py_refcnt(held) == 1 and not overlap
                and self._cap[slot] >= need):
            return None
        replaced = <object>held
        self._grow(slot, need)
        return replaced

    cdef object _result(self, int slot, cnp.PyArray_Descr* descr, int nd):
        """A C-contiguous array of shape _out_dims[:nd] at the start of buffer `slot`,
        its base a hold on the buffer's owner (``_BufferHold``)."""
        cdef _BufferHold hold = _BufferHold.__new__(_BufferHold)
        hold._owner = self._owners[slot]
        Py_INCREF(<object>descr)    # stolen by PyArray_NewFromDescr
        out = np_new_from_descr(
            &np_array_type, descr, nd, self._out_dims, NULL, self._data[slot],
            NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_WRITEABLE, NULL)
        Py_INCREF(hold)             # stolen by PyArray_SetBaseObject
        np_set_base(<cnp.PyArrayObject*>out, <PyObject*>hold)
        return out

    cdef int _grow(self, int slot, Py_ssize_t need) except -1:
        """Give buffer `slot` a fresh allocation of at least `need` bytes."""
        cdef Py_ssize_t cap = ALIGN
        cdef uintptr_t addr
        while cap < need:
            cap <<= 1               # need <= 2**62, so this stops at 2**62 at most
        try:
            owner = np.empty(cap + ALIGN - 1, dtype=np.uint8)
        except MemoryError:
            if cap == need:
                raise
            cap = need              # the power of two did not fit: try exact size
            owner = np.empty(cap + ALIGN - 1, dtype=np.uint8)
        addr = <uintptr_t>cnp.PyArray_DATA(<cnp.ndarray>owner)
        # The old buffer (if any) lives on in the base of every result that views it.
        self._owners[slot] = owner
        self._data[slot] = <char*>((addr + ALIGN - 1) & ~(<uintptr_t>(ALIGN - 1)))
        self._cap[slot] = cap
        return 0


def first_changed_dtype(arrays, dtype):
    """The index of the first of ``arrays`` (a batch's, or one input of each item) whose
    dtype is no longer equivalent to ``dtype``, the one it was queued with, or -1; an
    item that is not an array counts as changed. ``a.dtype = ...`` changes an array's
    dtype in place, its shape kept when the itemsize is: a batch would be built from its
    bytes read as the new dtype. One pass in C: a pointer comparison per array that kept
    its dtype object, numpy's equivalence test for another dtype object."""
    if not isinstance(dtype, np.dtype):
        raise TypeError(f"dtype must be a numpy.dtype, not {type(dtype).__name__}")
    cdef tuple seq = arrays if type(arrays) is tuple else tuple(arrays)
    cdef cnp.PyArray_Descr* want = <cnp.PyArray_Descr*>dtype
    cdef cnp.PyArray_Descr* descr
    cdef PyObject* obj
    cdef Py_ssize_t i
    for i in range(PyTuple_GET_SIZE(seq)):
        obj = PyTuple_GET_ITEM(seq, i)
        if not np_is_array(obj):
            return i
        descr = np_descr(<cnp.PyArrayObject*>obj)
        if descr != want and not np_equiv(descr, want):
            return i
    return -1


cdef inline cnp.PyArrayObject* _array_like_first(
        PyObject* obj, Py_ssize_t i, cnp.PyArray_Descr* descr0) except NULL:
    """Item ``i`` as an array, checked to have item 0's dtype."""
    if not np_is_array(obj):
        raise TypeError(f"item {i} is {type(<object>obj).__name__}, not numpy.ndarray")
    cdef cnp.PyArrayObject* arr = <cnp.PyArrayObject*>obj
    cdef cnp.PyArray_Descr* descr = np_descr(arr)
    if descr != descr0 and not np_equiv(descr, descr0):
        raise ValueError(
            f"item {i} has dtype {(<object>descr)!r} but item 0 has dtype "
            f"{(<object>descr0)!r}: all items must have the same dtype")
    return arr


cdef inline bint _same_dims(const npy_intp* a, const npy_intp* b, int n) noexcept:
    cdef int d
    for d in range(n):
        if a[d] != b[d]:
            return False
    return True


cdef tuple _shape(const npy_intp* dims, int n):
    return tuple([dims[d] for d in range(n)])


cdef Py_ssize_t _length_arg(object v) except -1:
    """concat_padded's length: an int (not a bool) in [0, PY_SSIZE_T_MAX]."""
    if isinstance(v, bool):
        raise TypeError("length must be an int, not bool")
    try:
        n = _index(v)
    except TypeError:
        raise TypeError(f"length must be an int, not {type(v).__name__}") from None
    if n < 0:
        raise ValueError(f"length must be >= 0, got {n}")
    if n > PY_SSIZE_T_MAX:
        raise ValueError(f"length {n} is too large")
    return n

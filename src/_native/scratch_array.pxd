# scratch_array.h: the native modules' growable scratch arrays, whose growth returns False
# on exhausted memory (the modules have no C++ exceptions; raise MemoryError then).

cdef extern from "scratch_array.h" namespace "batchproc_native" nogil:
    cdef cppclass ScratchArray[T]:
        ScratchArray() noexcept
        bint reserve(size_t want) noexcept
        bint resize(size_t k) noexcept
        bint push_back(T x) noexcept
        void clear() noexcept
        T* data() noexcept
        size_t size() noexcept
        size_t capacity() noexcept
        T& operator[](size_t i) noexcept

// A growable array of trivially copyable T on the C heap, for the native modules' scratch
// space (std::vector's place). Growth reports failure by returning false instead of
// throwing: the modules are compiled without C++ exceptions (CMakeLists.txt says why).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace batchproc_native {

template <class T>
struct ScratchArray {
    static_assert(std::is_trivially_copyable<T>::value, "moved with realloc");

    T* ptr = nullptr;
    std::size_t n = 0;
    std::size_t cap = 0;

    ScratchArray() noexcept = default;
    ~ScratchArray() { std::free(ptr); }
    ScratchArray(const ScratchArray&) = delete;
    ScratchArray& operator=(const ScratchArray&) = delete;

    // Room for `want` elements; false (nothing changed) when memory is exhausted.
    bool reserve(std::size_t want) noexcept {
        if (want <= cap) return true;
        if (want > SIZE_MAX / sizeof(T)) return false;
        std::size_t ncap = cap > want / 2 ? cap * 2 : want;  // doubling amortises growth
        if (ncap > SIZE_MAX / sizeof(T)) ncap = want;
        void* grown = std::realloc(ptr, ncap * sizeof(T));
        if (grown == nullptr) return false;
        ptr = static_cast<T*>(grown);
        cap = ncap;
        return true;
    }
    // `k` elements; those added are uninitialised. False (nothing changed) when memory
    // is exhausted.
    bool resize(std::size_t k) noexcept {
        if (!reserve(k)) return false;
        n = k;
        return true;
    }
    bool push_back(T x) noexcept {
        if (n == cap && !reserve(n < 8 ? 8 : n + 1)) return false;
        ptr[n++] = x;
        return true;
    }
    void clear() noexcept { n = 0; }
    T* data() noexcept { return ptr; }
    std::size_t size() const noexcept { return n; }
    std::size_t capacity() const noexcept { return cap; }
    T& operator[](std::size_t i) noexcept { return ptr[i]; }
};

}  // namespace batchproc_native

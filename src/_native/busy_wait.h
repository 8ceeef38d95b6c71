// What the native busy waits share: batchproc._native.waiting's (a caller's spin for its
// result, then for the worker's let-go of the GIL) and the request queue's (a pop's wait
// for its pusher's let-go of the GIL). Run without the GIL; touch no Python object.
#pragma once

#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdint>

namespace batchproc_busy {

// Whether a busy wait pays (adaptive spinning, as in glibc's adaptive mutexes and the
// JVM's monitors): the recent share of waits that saw what they waited for, an
// exponential average over about WEIGHT waits. While it is below half, a wait is made
// only by one caller in PROBE_EVERY, to find out whether waiting pays again. Lock-free;
// threads that race on it only blur the average.

struct PayScore {
    static constexpr int ONE = 256;
    static constexpr int HALF = ONE / 2;
    static constexpr int WEIGHT = 8;  // each wait moves the score 1/WEIGHT of the way
    static constexpr uint64_t PROBE_EVERY = 128;

    std::atomic<int> score{ONE};
    std::atomic<uint64_t> probes{0};

    // Whether the next wait may be made: waits pay, or it is a probe.
    bool pays_or_probe() noexcept {
        return score.load(std::memory_order_relaxed) >= HALF
               || probes.fetch_add(1, std::memory_order_relaxed) % PROBE_EVERY == 0;
    }
    void note(bool paid) noexcept {
        int s = score.load(std::memory_order_relaxed);
        s += paid ? (ONE - s + WEIGHT - 1) / WEIGHT : -((s + WEIGHT - 1) / WEIGHT);
        score.store(s, std::memory_order_relaxed);
    }
    int now() const noexcept { return score.load(std::memory_order_relaxed); }
    void reset() noexcept {
        score.store(ONE);
        probes.store(0);
    }
};

// Busy-waits, yielding the CPU between looks, until `count` (a let-go count: times a
// thread dropped the GIL to wait) differs from `seen` or steady-clock time `until`
// (seconds) passes: whether it moved. A thread that asks for a GIL another still holds
// blocks on it and must be woken once it is dropped; after a let-go it is free.
inline bool wait_for_let_go(const std::atomic<uint64_t>& count, uint64_t seen,
                            double until) noexcept {
    using namespace std::chrono;
    while (count.load(std::memory_order_acquire) == seen) {
        if (duration<double>(steady_clock::now().time_since_epoch()).count() >= until)
            return false;
        sched_yield();
    }
    return true;
}

}  // namespace batchproc_busy

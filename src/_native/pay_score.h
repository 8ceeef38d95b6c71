// Whether a busy wait pays (adaptive spinning, as in glibc's adaptive mutexes and the
// JVM's monitors): the recent share of waits that saw what they waited for, an
// exponential average over about WEIGHT waits. While it is below half, a wait is made
// only by one caller in PROBE_EVERY, to find out whether waiting pays again.
// Used by batchproc._native.waiting (a caller's spin for its result) and the request
// queue (a pop's wait for its pusher to let go of the GIL). Lock-free; threads that
// race on it only blur the average.
#pragma once

#include <atomic>
#include <cstdint>

namespace batchproc_pay {

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

}  // namespace batchproc_pay

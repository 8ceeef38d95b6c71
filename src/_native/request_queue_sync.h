// Synchronisation and scratch helpers for request_queue.pyx.
//
// Why a header: Cython cannot hold a std::unique_lock across a condition-variable wait, so
// the waits live here. Every function is noexcept and touches no Python object, so the
// .pyx may call them with or without the GIL. The only C++ exception these could raise is
// std::system_error from a broken mutex, which terminates: there is no sane recovery.
#pragma once

#include <pthread.h>
#include <sched.h>
#include <time.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "busy_wait.h"

namespace batchproc_rq {

// batchproc._native.waiting's let-go count (set at import, from its capsule): bumped
// when a consumer, the GIL dropped, begins to wait for items. A caller that spun until
// its result was set waits for this before it asks for the GIL the worker held.
inline std::atomic<uint64_t>* let_go = nullptr;
inline void set_let_go(void* count) noexcept {
    let_go = static_cast<std::atomic<uint64_t>*>(count);
}
// Returns the count with this let-go (0 before the count is set), which this thread's
// own later waits for a let-go must not take for another thread's.
inline uint64_t note_let_go() noexcept {
    if (let_go == nullptr) return 0;
    return let_go->fetch_add(1, std::memory_order_release) + 1;
}

using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC on Linux, as time.monotonic()

// Seconds on the monotonic clock, comparable with Python's time.monotonic().
inline double now() noexcept {
    return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}

// A condition variable whose timed waits run on CLOCK_MONOTONIC, whatever the C library.
// std::condition_variable::wait_until(steady_clock) only waits on the monotonic clock when
// the C library it was compiled against has pthread_cond_clockwait (glibc 2.30+); built for
// an older glibc (the manylinux wheel targets 2.17) it converts the deadline to the wall
// clock, so a wall-clock step back during a wait would stretch the wait by the step.
// pthread_condattr_setclock (glibc 2.3.3) gives the monotonic wait everywhere.
struct CondVar {
    pthread_cond_t cv;

    CondVar() noexcept {
        pthread_condattr_t attr;
        pthread_condattr_init(&attr);
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        pthread_cond_init(&cv, &attr);
        pthread_condattr_destroy(&attr);
    }
    ~CondVar() { pthread_cond_destroy(&cv); }
    CondVar(const CondVar&) = delete;
    CondVar& operator=(const CondVar&) = delete;

    void notify_one() noexcept { pthread_cond_signal(&cv); }
    void notify_all() noexcept { pthread_cond_broadcast(&cv); }
    // Both wait with `mu` held and return with it held again.
    void wait(std::mutex& mu) noexcept { pthread_cond_wait(&cv, mu.native_handle()); }
    // Waits at most `seconds` (finite, > 0), rounded up to whole nanoseconds: never wakes
    // before the deadline, so a timed-out waiter sees it passed.
    void wait_for(std::mutex& mu, double seconds) noexcept {
        timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        double whole = std::floor(seconds);
        long long ns = static_cast<long long>(std::ceil((seconds - whole) * 1e9)) + ts.tv_nsec;
        ts.tv_sec += static_cast<time_t>(whole) + static_cast<time_t>(ns / 1000000000);
        ts.tv_nsec = static_cast<long>(ns % 1000000000);
        pthread_cond_timedwait(&cv, mu.native_handle(), &ts);
    }
};

// A consumer waiting for the queue to become non-empty. Item waiters form a stack, and a
// push wakes the one that parked last (LIFO): at low load the worker that just finished a
// batch, with its buffers still in cache, takes the next request, and the others stay
// asleep. A shared condition variable would wake the longest-sleeping thread instead,
// rotating every batch through every worker (measured: about 30 us more per round trip
// with two workers; benchmarks/bench_round_trip.py).
struct ItemWaiter {
    CondVar cv;
    ItemWaiter* next = nullptr;
    bool linked = false;  // still on the stack: not yet chosen by a notify
};

// The queue's mutex, the stack of item waiters and two condition variables:
//   items: consumers waiting for the queue to become non-empty (step 1 of pop_batch);
//   fill:  consumers waiting for a batch to fill (step 2);
//   room:  producers waiting for free capacity.
// Separate waits let a push wake one idle consumer instead of every producer too.
struct Sync {
    std::mutex mu;
    ItemWaiter* items = nullptr;  // top of the stack; guarded by mu
    uint64_t pushed_let_go = 0;  // the let-go count at a push a spinner took; guarded by mu
    batchproc_busy::PayScore lingers_pay;     // see linger_for_let_go
    std::atomic<uint64_t> lingers{0};         // waits begun, and those that saw their
    std::atomic<uint64_t> lingers_seen{0};    // let-go: counts for the tests
    std::atomic<uint64_t> wakes{0};  // pushes into an empty queue, wake-ups of all: end a spin
    int spinners = 0;                 // consumers in spin_items; guarded by mu
    uint64_t spins = 0;               // spin_items calls so far; guarded by mu
    uint64_t item_wakes = 0;          // item waiters chosen by a notify; guarded by mu
    CondVar fill;
    CondVar room;
    CondVar expiry;  // the collector of expired entries (take_expired)
    CondVar watch;   // the watcher of entries waiting too long (await_late)
};

inline Sync* sync_new() noexcept {
    return new (std::nothrow) Sync();
}
inline void sync_delete(Sync* s) noexcept { delete s; }
inline bool sync_try_lock(Sync* s) noexcept { return s->mu.try_lock(); }
inline void sync_lock(Sync* s) noexcept { s->mu.lock(); }
inline void sync_unlock(Sync* s) noexcept { s->mu.unlock(); }

// Waits on `cv` with s->mu already held by the caller; returns with it held again.
// `deadline` is in now() seconds; +inf waits untimed. A finite deadline far away is
// waited for in slices of at most a day so the conversion to a timespec cannot
// overflow; callers re-check their predicate and deadline after every return anyway
// (spurious wake-ups are allowed), so slicing is invisible to them.
inline void wait_until(Sync* s, CondVar& cv, double deadline) noexcept {
    if (std::isinf(deadline)) {
        cv.wait(s->mu);
    } else {
        double left = deadline - now();
        if (left > 0.0) {
            if (left > 86400.0) left = 86400.0;
            cv.wait_for(s->mu, left);
        }
    }
}
// Parks on the item-waiter stack until notified, the deadline passes or a spurious
// wake-up; always leaves the stack before returning.
inline void wait_items(Sync* s, double deadline) noexcept {
    note_let_go();
    ItemWaiter w;
    w.next = s->items;
    w.linked = true;
    s->items = &w;
    wait_until(s, w.cv, deadline);
    if (w.linked) {  // not chosen by a notify (timed out or spurious): unlink itself
        for (ItemWaiter** p = &s->items; *p != nullptr; p = &(*p)->next) {
            if (*p == &w) {
                *p = w.next;
                break;
            }
        }
    }
}
// Busy-waits, the mutex released, until a push into the empty queue (or a wake-up of all:
// close, pause, retarget) or `until`; returns
// with the mutex held again. A parked consumer costs the push a thread wake-up (tens of
// microseconds on an idle core); one that spins sees the push at once.
inline bool spin_items(Sync* s, double until, uint64_t* pushed_at) noexcept {
    uint64_t seen = s->wakes.load(std::memory_order_relaxed);
    ++s->spinners;
    ++s->spins;
    s->mu.unlock();
    uint64_t own = note_let_go();
    while (s->wakes.load(std::memory_order_acquire) == seen && now() < until) {
        // Yielding, not a pause instruction: on a busy machine the thread about to push
        // may be waiting for this CPU (measured: spinning on pause lost to parking
        // there, yielding did not).
        sched_yield();
    }
    s->mu.lock();
    --s->spinners;
    // A push between this spin's start and its let-go read a count without it: its own
    // let-go is not the pusher's.
    *pushed_at = s->pushed_let_go < own ? own : s->pushed_let_go;
    return s->wakes.load(std::memory_order_relaxed) != seen;
}
// After a pop that a spin caught: waits, the GIL and the mutex released, up to
// `seconds` for a let-go later than `pushed_at` (the pusher dropping the GIL to wait
// for its result), so that this thread's request for the GIL does not find it held
// and park on it (a thread wake-up). Only while such waits see their let-go
// (busy_wait.h): a pusher that runs on (an event loop pushing many requests) lets go
// of the GIL unseen, and is then waited for only by probes.
inline void linger_for_let_go(Sync* s, uint64_t pushed_at, double seconds) noexcept {
    if (let_go == nullptr || !s->lingers_pay.pays_or_probe()) return;
    s->lingers.fetch_add(1, std::memory_order_relaxed);
    bool seen = batchproc_busy::wait_for_let_go(*let_go, pushed_at, now() + seconds);
    if (seen) s->lingers_seen.fetch_add(1, std::memory_order_relaxed);
    s->lingers_pay.note(seen);
}
inline void wait_fill(Sync* s, double deadline) noexcept { wait_until(s, s->fill, deadline); }
inline void wait_room(Sync* s, double deadline) noexcept { wait_until(s, s->room, deadline); }
inline void wait_expiry(Sync* s, double deadline) noexcept { wait_until(s, s->expiry, deadline); }
inline void notify_expiry_all(Sync* s) noexcept { s->expiry.notify_all(); }
inline void wait_watch(Sync* s, double deadline) noexcept { wait_until(s, s->watch, deadline); }
inline void notify_watch_all(Sync* s) noexcept { s->watch.notify_all(); }

// Notifications are sent with the mutex held (the waiter counts they depend on are only
// consistent under it).
// Item waiters parked and not yet chosen (a test hook's count; O(waiters)).
inline std::size_t items_waiting(Sync* s) noexcept {
    std::size_t n = 0;
    for (ItemWaiter* w = s->items; w != nullptr; w = w->next) ++n;
    return n;
}
inline void notify_items_one(Sync* s) noexcept {
    ItemWaiter* w = s->items;
    if (w != nullptr) {
        s->items = w->next;
        w->linked = false;
        ++s->item_wakes;
        w->cv.notify_one();
    }
}
inline int spinners(Sync* s) noexcept { return s->spinners; }
inline uint64_t lingers(Sync* s) noexcept { return s->lingers.load(); }
inline uint64_t lingers_seen(Sync* s) noexcept { return s->lingers_seen.load(); }
inline int linger_score(Sync* s) noexcept { return s->lingers_pay.now(); }
inline uint64_t spins(Sync* s) noexcept { return s->spins; }
inline uint64_t item_wakes(Sync* s) noexcept { return s->item_wakes; }
// A push into the empty queue: a spinning consumer takes it, else one parked is woken.
inline void notify_pushed(Sync* s) noexcept {
    if (s->spinners > 0) {
        if (let_go != nullptr) s->pushed_let_go = let_go->load(std::memory_order_acquire);
        s->wakes.fetch_add(1, std::memory_order_release);
    } else {
        notify_items_one(s);
    }
}
inline void notify_fill_all(Sync* s) noexcept { s->fill.notify_all(); }
inline void notify_room_one(Sync* s) noexcept { s->room.notify_one(); }
inline void notify_room_all(Sync* s) noexcept { s->room.notify_all(); }
inline void notify_everyone(Sync* s) noexcept {
    s->wakes.fetch_add(1, std::memory_order_release);
    while (s->items != nullptr) notify_items_one(s);
    s->fill.notify_all();
    s->room.notify_all();
    s->expiry.notify_all();
}

// Per-call buffer of the slots a pop takes, and later of the objects moved out of them.
// Small batches live on the stack; larger ones grow on the C heap. add() reports
// allocation failure instead of throwing so it can run under the queue mutex.
struct PopBuf {
    static constexpr size_t kSmall = 64;
    int32_t* slots;
    void** objs;
    size_t n;
    size_t cap;
    int32_t small_slots[kSmall];
    void* small_objs[kSmall];

    PopBuf() noexcept : slots(small_slots), objs(small_objs), n(0), cap(kSmall) {}
    ~PopBuf() { release(); }
    PopBuf(const PopBuf&) = delete;
    PopBuf& operator=(const PopBuf&) = delete;

    void release() noexcept {
        if (slots != small_slots) {
            std::free(slots);
            std::free(objs);
            slots = small_slots;
            objs = small_objs;
            cap = kSmall;
        }
    }
    bool grow() noexcept {
        size_t ncap = cap * 2;
        int32_t* ns = static_cast<int32_t*>(std::malloc(ncap * sizeof(int32_t)));
        void** no = static_cast<void**>(std::malloc(ncap * sizeof(void*)));
        if (ns == nullptr || no == nullptr) {
            std::free(ns);
            std::free(no);
            return false;
        }
        std::memcpy(ns, slots, n * sizeof(int32_t));
        std::memcpy(no, objs, n * sizeof(void*));
        if (slots != small_slots) {
            std::free(slots);
            std::free(objs);
        }
        slots = ns;
        objs = no;
        cap = ncap;
        return true;
    }
    // Room for one more slot? Grows if needed; false only when memory is exhausted.
    bool has_room() noexcept { return n < cap || grow(); }
};

}  // namespace batchproc_rq

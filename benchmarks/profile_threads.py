"""Where a request's time goes when many client threads each wait on their own result.

    python benchmarks/profile_threads.py                 # 64 threads, 2 s per system
    python benchmarks/profile_threads.py --clients 16 --seconds 3

Every system serves the identity model (one row of 64 float32, max batch 64, max delay
5 ms) to closed-loop client threads. For each: requests per second, and per request the
process's CPU time in user space and in the kernel (getrusage) and its context switches,
voluntary (a thread blocked: on its result, or on the GIL a woken thread could not take)
and involuntary. A system whose kernel time and context switches per request dominate is
bound by waking threads, not by its own code.

Systems: batchproc (ADAPTIVE, default workers), batchproc with one worker, batchproc
FIXED (each batch waits up to the max delay to fill: with as many clients as the max
batch, full batches), the minimal batcher, and the no-work batcher of
no_work_batchers.py (one C-coded queue and a lock per client: no model, no copies). Also
per system: the mean batch, and the CPU time per request of the client threads and of
the batcher's own threads (Linux; "-" elsewhere).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROW = np.ones((1, 64), np.float32)


# Who spends a request's CPU time (profile's "threads"): the closed loop's client
# threads; the other threads Python started (the batcher's own: its server or workers);
# and threads Python did not start, such as a BLAS library's pool, whose threads busy-wait
# between calls for work on cores the others need.
CLIENTS, BATCHER, NOT_PYTHONS = "client threads", "batcher threads", "threads Python did not start"


def thread_cpu() -> dict[int, float]:
    """Seconds on a CPU so far (user and kernel), per thread of this process by its native
    id, in nanoseconds' precision (``/proc/self/task/*/schedstat``: Linux; elsewhere an
    empty dict). A thread's user/kernel split in ``stat`` is counted in clock ticks,
    coarser than what each of many client threads spends in a run."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return {}
    times = {}
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                times[int(tid)] = int(f.read().split()[0]) / 1e9
        except OSError:  # it ended meanwhile, or no scheduler statistics
            continue
    return times


def _by_group(before: dict[int, float], after: dict[int, float], clients: set[int | None],
              requests: int) -> dict[str, float]:
    """Microseconds of CPU time per request, per group of threads, between two
    ``thread_cpu`` readings taken while the client threads ran."""
    pythons = {t.native_id for t in threading.enumerate()}
    main = threading.main_thread().native_id
    groups = dict.fromkeys((CLIENTS, BATCHER, NOT_PYTHONS), 0.0)
    for tid, seconds in after.items():
        if tid == main:
            continue  # asleep while the clients run
        group = CLIENTS if tid in clients else BATCHER if tid in pythons else NOT_PYTHONS
        groups[group] += seconds - before.get(tid, 0.0)
    return {group: seconds * 1e6 / max(requests, 1) for group, seconds in groups.items()}


# What a system's start() returns: (one blocking request, requests served so far,
# batches served so far, stop).
Started = tuple[Callable[[], Any], Callable[[], int], Callable[[], int], Callable[[], None]]


def profile(name: str, start: Callable[[], Started], clients: int,
            seconds: float) -> dict[str, Any]:
    """Figures over ``seconds`` of ``clients`` threads calling ``start()``'s request back
    to back; ``threads``: the CPU time per request of each group of threads
    (``_by_group``; empty where ``thread_cpu`` is)."""
    call, served, batches, stop = start()
    stopping = threading.Event()

    def client() -> None:
        while not stopping.is_set():
            call()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)  # every client in its loop
        n0, b0 = served(), batches()
        u0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        per_thread0 = thread_cpu()
        time.sleep(seconds)
        per_thread1 = thread_cpu()
        n, u1 = served() - n0, resource.getrusage(resource.RUSAGE_SELF)
        batched = batches() - b0
        elapsed = time.perf_counter() - t0
        by_group = (_by_group(per_thread0, per_thread1, {t.native_id for t in threads}, n)
                    if per_thread1 else {})
        stopping.set()
        for t in threads:
            t.join()
    finally:
        stop()
    per = 1e6 / max(n, 1)
    return {
        "system": name, "req_s": n / elapsed,
        "user_us": (u1.ru_utime - u0.ru_utime) * per,
        "sys_us": (u1.ru_stime - u0.ru_stime) * per,
        "voluntary": (u1.ru_nvcsw - u0.ru_nvcsw) / max(n, 1),
        "involuntary": (u1.ru_nivcsw - u0.ru_nivcsw) / max(n, 1),
        "mean_batch": n / max(batched, 1),
        "threads": by_group,
    }


def _batchproc(workers: int | None, strategy: str = "adaptive") -> Callable[[], Started]:
    def start() -> Started:
        from batchproc import BatchProcessor, BatchProcessorConfig

        fields: dict[str, Any] = {"max_batch_size": 64, "initial_batch_size": 64,
                                  "batch_timeout": 0.005, "processing_strategy": strategy}
        if workers is not None:
            fields["max_workers"] = workers
        p: Any = BatchProcessor(BatchProcessorConfig(**fields))
        p.start(lambda batch: batch)
        enqueue = p.enqueue_predict
        return (lambda: enqueue(ROW).result(),
                lambda: p.get_stats()["total_processed"],
                lambda: p.get_stats()["total_batches"], p.stop)
    return start


def _minimal() -> Started:
    from batchproc.bench.minimal import MinimalBatcher

    served, batches = [0], [0]

    def model(batch: Any) -> Any:
        served[0] += len(batch)
        batches[0] += 1
        return batch

    b = MinimalBatcher(model, max_batch=64, max_delay=0.005).start()
    return (lambda: b.submit(ROW).result(), lambda: served[0], lambda: batches[0], b.stop)


def _no_work() -> Started:
    import queue

    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    served, batches = [0], [0]
    local = threading.local()

    def server() -> None:
        while True:
            batch = [inbox.get()]
            while True:
                try:
                    batch.append(inbox.get_nowait())
                except queue.Empty:
                    break
            batches[0] += 1
            for lock in batch:
                if lock is None:
                    return
                served[0] += 1
                lock.release()

    srv = threading.Thread(target=server, daemon=True)
    srv.start()

    def call() -> None:
        lock = getattr(local, "lock", None)
        if lock is None:
            lock = local.lock = threading.Lock()
            lock.acquire()
        inbox.put(lock)
        lock.acquire()

    def stop() -> None:
        inbox.put(None)
        srv.join()

    return call, lambda: served[0], lambda: batches[0], stop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args(argv)
    systems = [("batchproc", _batchproc(None)), ("batchproc, 1 worker", _batchproc(1)),
               ("batchproc FIXED", _batchproc(None, "fixed")),
               ("minimal batcher", _minimal), ("no-work batcher", _no_work)]
    print(f"{args.clients} client threads, identity model, {args.seconds:g} s per system\n")
    print("| system | req/s | mean batch | user us/req | kernel us/req | voluntary "
          "switches/req | involuntary/req | client threads us/req | batcher threads "
          "us/req |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, start in systems:
        r = profile(name, start, args.clients, args.seconds)
        threads = r["threads"]
        split = (f"{threads[CLIENTS]:.1f} | {threads[BATCHER]:.1f}" if threads
                 else "- | -")
        print(f"| {r['system']} | {r['req_s']:,.0f} | {r['mean_batch']:.1f} | "
              f"{r['user_us']:.1f} | {r['sys_us']:.1f} | {r['voluntary']:.2f} | "
              f"{r['involuntary']:.2f} | {split} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What CPython alone allows a batcher of 64 clients, with no batcher in the way.

Each floor is a batcher that does no work at all: no queue policy, no copies, no model.
Clients hand a request to one server and wait for their answer; the server answers
everything waiting at once. Whatever a real batcher does on top can only be slower, so
a throughput ratio against a peer can be no larger than the floor's ratio against it
(compare_peers.py prints both).

* ``threads``: 64 client threads, each blocking on its own lock (as a
  ``RequestFuture`` waiter does) after a put to a C-coded queue; one server thread takes
  everything queued and releases each lock.
  Each request costs at least one wake-up of a blocked thread and its turn at the GIL.
* ``asyncio``: 64 tasks in one event loop, each awaiting a loop future; one callback per
  pass of the loop completes every pending future (as ``batchproc.aio`` flushes a batch).
  Each request costs a future and a task step.

    python benchmarks/floors.py         # both floors, 3 runs of 1.5 s each
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import statistics
import threading
import time
from typing import Any

CLIENTS = 64


def threads_floor(clients: int = CLIENTS, seconds: float = 1.5) -> float:
    """Requests per second through a no-work server thread, ``clients`` client threads."""
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()  # C-coded: a cheap put, a nogil get
    stopping = threading.Event()
    served = [0] * clients

    def server() -> None:
        get, get_nowait = inbox.get, inbox.get_nowait
        while True:
            batch = [get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(get_nowait())
            for lock in batch:
                if lock is None:
                    return
                lock.release()

    def client(k: int) -> None:
        lock = threading.Lock()
        lock.acquire()  # held: the next acquire blocks until the server releases it
        put = inbox.put
        n = 0
        while not stopping.is_set():
            put(lock)
            lock.acquire()
            n += 1
        served[k] = n

    srv = threading.Thread(target=server, name="floor-server", daemon=True)
    srv.start()
    workers = [threading.Thread(target=client, args=(k,), daemon=True)
               for k in range(clients)]
    t0 = time.perf_counter()
    for th in workers:
        th.start()
    time.sleep(seconds)
    stopping.set()
    for th in workers:  # each leaves after its last answer: none is left blocked
        th.join()
    elapsed = time.perf_counter() - t0
    inbox.put(None)
    srv.join()
    return sum(served) / elapsed


def asyncio_floor(clients: int = CLIENTS, seconds: float = 1.5) -> float:
    """Requests per second through one no-work flush per loop pass, ``clients`` tasks."""

    async def run() -> float:
        loop = asyncio.get_running_loop()
        pending: list[asyncio.Future[int]] = []
        scheduled = False
        done = 0
        deadline = loop.time() + seconds

        def flush() -> None:
            nonlocal scheduled
            scheduled = False
            batch = pending[:]
            pending.clear()
            for f in batch:
                f.set_result(1)

        async def client() -> None:
            nonlocal scheduled, done
            while loop.time() < deadline:
                f = loop.create_future()
                pending.append(f)
                if not scheduled:
                    scheduled = True
                    loop.call_soon(flush)
                await f
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done / (time.perf_counter() - t0)

    return asyncio.run(run())


def floors(repeat: int = 3) -> dict[str, float]:
    """Median requests per second of each floor over ``repeat`` runs."""
    return {
        "threads_64_rps": statistics.median(threads_floor() for _ in range(repeat)),
        "asyncio_64_rps": statistics.median(asyncio_floor() for _ in range(repeat)),
    }


if __name__ == "__main__":
    for name, rps in floors().items():
        print(f"{name}: {rps:,.0f} req/s")

"""Batchers that do no work, at 64 clients: what CPython's own primitives allow.

Each is a batcher with no queue policy, no copies and no model. Clients hand a request
to one server and wait for their answer; the server answers everything waiting at once.
They are not strict floors (batchproc's compiled queue and futures can be cheaper than
the primitives used here), but a target far above what a no-work batcher reaches against
the same peer is out of reach for per-request waits of this kind: compare_peers.py
prints both ratios.

* ``threads``: 64 client threads, each blocking on its own lock (as a
  ``RequestFuture`` waiter does) after a put to a C-coded queue; one server thread takes
  everything queued and releases each lock.
  Each request costs at least one wake-up of a blocked thread and its turn at the GIL.
* ``asyncio``: 64 tasks in one event loop, each awaiting a loop future; one callback per
  pass of the loop completes every pending future (as ``batchproc.aio`` flushes a batch).
  Each request costs a future and a task step.
* ``asyncio, answered from a thread``: the same tasks, but each pass's requests go to a
  server thread (one put to a C-coded queue), which answers the whole batch with one
  ``loop.call_soon_threadsafe``: the least that a batcher whose model runs off the event
  loop (batchproc's workers) pays. Ray Serve's ``serve.batch`` runs the batch on the loop
  itself, so the plain ``asyncio`` figure is its own ceiling and this one is batchproc's.
  Each batch costs the server thread's wake-up and the loop's.
* ``threads, full batches`` (``threads_full_batches``, for the fixed model only, which
  compare_peers.py passes it): the 64 client threads again, but the server knows them
  and waits for all 64 before each call of the model. No batcher of closed-loop threads
  keeps a fixed-cost model busier: every call waits for the wave of clients its last
  answers woke, each taking its turn at the GIL.

    python benchmarks/no_work_batchers.py   # all three, median of 3 runs of 1.5 s each
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

CLIENTS = 64


Inbox = queue.SimpleQueue[Any]


def _threads(clients: int, seconds: float,
             serve: Callable[[Inbox, threading.Event], None]) -> float:
    """Requests per second of ``clients`` closed-loop client threads, each putting its own
    held lock on a C-coded queue and blocking on it; ``serve(inbox, stopping)`` runs on
    one server thread, takes the locks from ``inbox`` and releases them, and returns on a
    ``None``, put there once ``stopping`` is set and every client has left."""
    inbox: Inbox = queue.SimpleQueue()  # C-coded: a cheap put, a nogil get
    stopping = threading.Event()
    served = [0] * clients

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

    srv = threading.Thread(target=serve, args=(inbox, stopping), name="no-work-server",
                           daemon=True)
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


def threads(clients: int = CLIENTS, seconds: float = 1.5) -> float:
    """Requests per second through a no-work server thread, ``clients`` client threads."""

    def serve(inbox: Inbox, stopping: threading.Event) -> None:
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

    return _threads(clients, seconds, serve)


def threads_full_batches(model: Callable[[Any], Any], clients: int = CLIENTS,
                         seconds: float = 1.5) -> float:
    """Requests per second of ``clients`` client threads through a server that knows
    them all: it waits for every one of them, calls ``model`` once with the batch (the
    clients' locks, in arrival order: a model whose cost is fixed ignores what it gets),
    then answers them. On a model whose cost per call is fixed,
    the most any batcher serving closed-loop threads can reach: each call waits for the
    wave of clients its last answers woke, and no batch is short."""

    def serve(inbox: Inbox, stopping: threading.Event) -> None:
        get = inbox.get
        while True:
            batch = []
            while len(batch) < clients:
                try:
                    lock = get(timeout=0.05)
                except queue.Empty:
                    if stopping.is_set():  # some clients have left: answer the rest
                        break
                    continue
                if lock is None:
                    return
                batch.append(lock)
            else:
                model(batch)
            for lock in batch:
                lock.release()

    return _threads(clients, seconds, serve)


Batch = list[asyncio.Future[int]]


async def _tasks(clients: int, seconds: float, hand_over: Callable[[Batch], None]) -> float:
    """Requests per second of ``clients`` tasks on the running loop, each awaiting its
    own future in a closed loop; each pass of the loop hands the futures made since the
    last one to ``hand_over`` at once, which must see them answered."""
    loop = asyncio.get_running_loop()
    pending: Batch = []
    scheduled = False
    done = 0
    deadline = loop.time() + seconds

    def pass_on() -> None:
        nonlocal scheduled
        scheduled = False
        batch = pending[:]
        pending.clear()
        hand_over(batch)

    async def client() -> None:
        nonlocal scheduled, done
        while loop.time() < deadline:
            f = loop.create_future()
            pending.append(f)
            if not scheduled:
                scheduled = True
                loop.call_soon(pass_on)
            await f
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - t0)


def _answer(batch: Batch) -> None:
    for f in batch:
        f.set_result(1)


def asyncio_loop(clients: int = CLIENTS, seconds: float = 1.5) -> float:
    """Requests per second through one no-work flush per loop pass, ``clients`` tasks."""
    return asyncio.run(_tasks(clients, seconds, _answer))


def asyncio_thread(clients: int = CLIENTS, seconds: float = 1.5) -> float:
    """Requests per second of ``clients`` tasks whose requests a no-work server thread
    answers, a batch (one loop pass's requests) per hand-over each way."""

    async def run() -> float:
        loop = asyncio.get_running_loop()
        inbox: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()

        def server() -> None:
            get, answer_soon = inbox.get, loop.call_soon_threadsafe
            while (batch := get()) is not None:
                answer_soon(_answer, batch)

        srv = threading.Thread(target=server, name="no-work-server", daemon=True)
        srv.start()
        try:
            return await _tasks(clients, seconds, inbox.put)
        finally:
            inbox.put(None)
            srv.join()

    return asyncio.run(run())


def measure(repeat: int = 3) -> dict[str, float]:
    """Median requests per second of each no-work batcher over ``repeat`` runs."""
    return {
        "threads_64_rps": statistics.median(threads() for _ in range(repeat)),
        "asyncio_64_rps": statistics.median(asyncio_loop() for _ in range(repeat)),
        "asyncio_thread_64_rps": statistics.median(asyncio_thread() for _ in range(repeat)),
    }


if __name__ == "__main__":
    for name, rps in measure().items():
        print(f"{name}: {rps:,.0f} req/s")

"""Waiting for a state a test makes happen elsewhere (a worker, another thread)."""

import gc
import threading
import time


def wait_for(predicate, what, timeout=10.0):
    """Poll ``predicate()`` until it holds, blocking the calling thread on purpose (an
    event loop too, when called from it); fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def collected_holding(lock, timeout=10.0):
    """Run a garbage collection on a thread that holds ``lock``, as a collection may start
    at any allocation on any thread: whether it ended within ``timeout`` seconds (False:
    a finalizer it ran is stuck on the lock)."""
    ended = threading.Event()

    def collect():
        with lock:
            gc.collect()
        ended.set()

    threading.Thread(target=collect, daemon=True).start()
    return ended.wait(timeout)

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


class collection_runs:
    """Within the block, the next allocation of an object the collector tracks starts a
    collection, and ``action`` runs at its start, once: what another thread could do at
    that point, since a collection runs Python code (``gc.callbacks``, finalizers) and
    so may switch threads. ``ran`` says whether it came."""

    def __init__(self, action):
        self.action = action
        self.ran = False
        self._held = []

    def _callback(self, phase, info):
        if phase == "start" and not self.ran:
            self.ran = True
            self.action()

    def __enter__(self):
        self._threshold = gc.get_threshold()
        self._enabled = gc.isenabled()
        gc.collect()
        # CPython reuses freed dicts without allocating: with its free list taken, making
        # one (an instance's own __dict__) starts the collection too.
        self._held = [{} for _ in range(100)]
        gc.enable()
        gc.callbacks.append(self._callback)
        gc.set_threshold(1)
        return self

    def __exit__(self, *exc):
        gc.set_threshold(*self._threshold)
        gc.callbacks.remove(self._callback)
        self._held.clear()
        if not self._enabled:
            gc.disable()
        return False

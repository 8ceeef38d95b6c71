"""Waiting for a state a test makes happen elsewhere (a worker, another thread)."""

import time


def wait_for(predicate, what, timeout=10.0):
    """Poll ``predicate()`` until it holds, blocking the calling thread on purpose (an
    event loop too, when called from it); fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)

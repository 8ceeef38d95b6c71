"""Done-callbacks of the requests the supervisor fails (``max_queue_time`` run out,
a call of one request abandoned past ``item_timeout``) run on the processor's callbacks
thread, not on the supervisor, which enforces every time limit: a callback that blocks
holds up no later deadline.

Orderings come from pause/resume and events; time bounds are generous guards (HANG),
never speed assertions.
"""

import logging
import threading
import time

import numpy as np
import pytest
from waiting import wait_for

from batchproc import BatchTimeoutError, QueueTimeoutError

HANG = 20.0
CALLBACKS = "batchproc-callbacks"


def item(v):
    return np.array([[v]], dtype=np.float64)


class FakeProbe:
    def read(self):
        return {"rss_bytes": 1.0, "percent": 10.0, "system_percent": 10.0}


class Blocking:
    """A done-callback that blocks until ``release`` (or HANG), noting its thread."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()
        self.ran_on = []

    def __call__(self, future):
        self.ran_on.append(threading.current_thread().name)
        self.entered.set()
        self.release.wait(HANG)
        self.returned.set()


def expire_with(p, callback, max_queue_time=0.05):
    """A request that expires in the paused processor's queue, ``callback`` added."""
    future = p.enqueue_predict(item(1.0), max_queue_time=max_queue_time)
    future.add_done_callback(callback)
    return future


def test_a_blocking_callback_of_an_expired_request_holds_up_no_later_expiry(
        make_processor):
    # On the supervisor a callback blocking 3 s held every later max_queue_time: a 0.1 s
    # one expired after 3 s.
    p = make_processor(lambda b: b, max_workers=1)
    p.pause()
    blocking = Blocking()
    first = expire_with(p, blocking)
    try:
        assert blocking.entered.wait(HANG)
        assert isinstance(first.exception(timeout=0), QueueTimeoutError)
        later = p.enqueue_predict(item(2.0), max_queue_time=0.05)
        assert isinstance(later.exception(timeout=HANG), QueueTimeoutError)
        assert not blocking.returned.is_set()  # expired while the callback still blocks
        assert blocking.ran_on == [CALLBACKS]
    finally:
        blocking.release.set()
    p.resume()


@pytest.mark.parametrize("blocked_by", ["an expired request", "a timed-out request"])
def test_a_blocking_callback_holds_up_no_item_timeout(make_processor, blocked_by):
    # A call hanging while a callback the supervisor ran blocked was abandoned only once
    # the callback returned (a 0.3 s item_timeout enforced after 3 s).
    hang = threading.Event()

    def model(batch):
        if batch[0, 0] >= 9.0:
            hang.wait(HANG)
        return batch

    p = make_processor(model, max_workers=2, item_timeout=0.3)
    blocking = Blocking()
    try:
        if blocked_by == "an expired request":
            p.pause()
            first = expire_with(p, blocking)
            assert blocking.entered.wait(HANG)
            p.resume()
            assert isinstance(first.exception(timeout=0), QueueTimeoutError)
        else:
            p.pause()
            first = p.enqueue_predict(item(9.0))
            first.add_done_callback(blocking)
            p.resume()
            assert blocking.entered.wait(HANG)
            assert isinstance(first.exception(timeout=0), BatchTimeoutError)
        hung = p.enqueue_predict(item(10.0))
        assert isinstance(hung.exception(timeout=HANG), BatchTimeoutError)
        assert not blocking.returned.is_set()  # abandoned while the callback blocks
        assert blocking.ran_on == [CALLBACKS]
    finally:
        blocking.release.set()
        hang.set()


class HeldProbe(FakeProbe):
    """A memory probe whose first read holds the supervisor (a health check runs on it)
    until ``release``."""

    def __init__(self):
        self.held = threading.Event()
        self.release = threading.Event()

    def read(self):
        if not self.held.is_set():
            self.held.set()
            self.release.wait(HANG)
        return super().read()


def test_requests_expiring_together_all_have_their_errors_before_a_callback_runs(
        make_processor):
    p = make_processor(lambda b: b, max_workers=1, health_check_interval=0.01)
    probe = p._health.memory_probe = HeldProbe()
    p.pause()
    # The four run out while the supervisor is held: its next look takes them together,
    # however far apart they were enqueued.
    assert probe.held.wait(HANG)
    seen = []
    futures = [p.enqueue_predict(item(float(v)), max_queue_time=0.01) for v in range(4)]

    def callback(future):
        seen.append((threading.current_thread().name, [f.done() for f in futures]))

    for f in futures:
        f.add_done_callback(callback)
    deadline = time.monotonic() + 0.01
    while time.monotonic() <= deadline:
        probe.release.wait(0.01)
    assert not any(f.done() for f in futures)
    probe.release.set()
    for f in futures:
        assert isinstance(f.exception(timeout=HANG), QueueTimeoutError)
    wait_for(lambda: len(seen) == 4, "the callbacks to run", HANG)
    # Expired in one look of the supervisor: each callback saw every error set.
    assert seen == [(CALLBACKS, [True] * 4)] * 4
    p.resume()


def test_a_raising_callback_is_logged_and_the_next_callbacks_still_run(
        make_processor, caplog):
    p = make_processor(lambda b: b, max_workers=1)
    p.pause()
    ran = []

    def raising(future):
        ran.append(("raising", threading.current_thread().name))
        raise SystemExit("from a callback")

    def noting(future):
        ran.append(("noting", threading.current_thread().name))

    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        first = expire_with(p, raising)
        first.add_done_callback(noting)
        wait_for(lambda: len(ran) == 2, "the first request's callbacks", HANG)
        later = expire_with(p, noting)
        assert isinstance(later.exception(timeout=HANG), QueueTimeoutError)
        wait_for(lambda: len(ran) == 3, "the later request's callback", HANG)
    assert ran == [("raising", CALLBACKS), ("noting", CALLBACKS), ("noting", CALLBACKS)]
    assert "exception calling callback" in caplog.text
    assert "SystemExit: from a callback" in caplog.text
    p.resume()


def _blocking_then_queued(p):
    """In the paused ``p``: a request expired whose callback blocks the callbacks thread,
    then one expired whose callback notes its thread in the list returned, behind it."""
    blocking = Blocking()
    queued = []
    expire_with(p, blocking)
    assert blocking.entered.wait(HANG)
    later = expire_with(p, lambda f: queued.append(threading.current_thread().name))
    assert isinstance(later.exception(timeout=HANG), QueueTimeoutError)
    return blocking, queued


def test_stop_runs_the_callbacks_still_queued(make_processor):
    p = make_processor(lambda b: b, max_workers=1)
    p.pause()
    blocking, queued = _blocking_then_queued(p)
    assert queued == []  # behind the blocking one
    stopping = threading.Thread(target=p.stop, args=(HANG,))
    stopping.start()
    blocking.release.set()
    stopping.join(HANG)
    assert not stopping.is_alive()
    # Once stop() has returned, every callback handed to the thread has run.
    assert queued == [CALLBACKS]
    assert not any(t.name == CALLBACKS for t in threading.enumerate())


def test_stop_does_not_wait_for_ever_on_a_blocking_callback(make_processor):
    p = make_processor(lambda b: b, max_workers=1)
    p.pause()
    blocking, queued = _blocking_then_queued(p)
    try:
        began = time.monotonic()
        p.stop(timeout=0.1)
        # Within its timeout and a grace (DELIVERY_GRACE), as for a blocking callback of
        # a delivery; HANG is only a guard.
        assert time.monotonic() - began < HANG / 2
        assert queued == []
    finally:
        blocking.release.set()
    # Nothing is lost: once the blocking callback returns, the thread runs the rest.
    wait_for(lambda: queued == [CALLBACKS], "the queued callback", HANG)


def test_stop_from_a_callback_on_the_callbacks_thread_does_not_wait_for_itself(
        make_processor):
    p = make_processor(lambda b: b, max_workers=1)
    p.pause()
    stopped = []

    def stopping(future):
        began = time.monotonic()
        p.stop(timeout=HANG)
        stopped.append((threading.current_thread().name, time.monotonic() - began))

    expire_with(p, stopping)
    wait_for(lambda: stopped, "the callback's stop() to return", HANG)
    [(name, took)] = stopped
    assert name == CALLBACKS
    assert took < HANG / 2  # it never joins its own thread
    assert not p.running


def test_a_callback_blocking_past_item_timeout_is_a_stuck_delivery_not_a_dead_worker(
        make_processor):
    # Run on the supervisor, it went unseen by health(). On the callbacks thread it holds
    # no worker: a warning (degraded), never critical, even with max_workers=1.
    p = make_processor(lambda b: b, max_workers=1, item_timeout=0.3)
    p._health.memory_probe = FakeProbe()
    p.pause()
    blocking = Blocking()
    expire_with(p, blocking)
    try:
        assert blocking.entered.wait(HANG)
        p.resume()
        wait_for(lambda: p.health()["checks"]["stuck_batches"]["value"] == 1,
                 "the callback to run past item_timeout", HANG)
        report = p.health()
        stuck = report["checks"]["stuck_batches"]
        [entry] = stuck["batches"]
        assert (entry["worker"], entry["requests"]) == (CALLBACKS, 1)
        assert (entry["delivering"], entry["abandoned"]) == (True, False)
        assert entry["running_for"] > 0.3
        assert stuck["status"] == "warning"
        assert (report["ready"], report["live"], report["status"]) == (
            True, True, "degraded")
        assert p.enqueue_predict(item(2.0)).result(timeout=HANG)[0, 0] == 2.0
    finally:
        blocking.release.set()
    wait_for(lambda: p.health()["status"] == "healthy", "the callback to end", HANG)

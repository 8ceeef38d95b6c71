"""Reliability: a Hypothesis state machine over the public API of BatchProcessor.

Random sequences of enqueue (arrays of several dtypes and shapes, generic items, random
priorities, some with a ``max_queue_time``), enqueue_predict, cancel, pause, resume,
update_batch_size, fork and stop run, with retries backing off briefly or for longer,
against a model (a plain function or an ``async def`` one) that, decided by each
request's own id, fails, returns the wrong number of rows, hangs briefly, or succeeds.
Because the outcome depends on the request alone, the expected outcome of every request
is known whatever batch it lands in.

Invariants, after every step and at teardown (docs/architecture.md, "Guarantees";
docs/failures.md):

* every accepted future completes exactly once (done-callbacks are counted);
* every result equals the model applied to that request alone, and every failure is the
  exception the request alone would get (ProcessorStoppedError only once stop began;
  QueueTimeoutError only for a request with a max_queue_time, and then the model never
  saw it unless it was waiting for a retry);
* no request is seen by the model after its future was cancelled, and nothing enqueued
  while paused is seen before resume;
* stop() returns within its timeout plus a small margin and leaves no thread behind;
* get_stats(): total_processed + total_errors + total_cancelled + total_expired + pending
  == total_accepted;
* in a forked child the processor refuses requests with ProcessorForkedError and reports
  itself neither ready nor live, at once; the parent's processor is unaffected.

Time bounds are hang guards (HANG) or the stop() bound the contract states; orderings come
from pause()/resume() and events, never from sleeping.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from batchproc import (
    BatchOutputError,
    BatchProcessingStrategy,
    BatchProcessor,
    BatchProcessorConfig,
    ProcessorForkedError,
    ProcessorStoppedError,
    QueueTimeoutError,
)

HANG = 20.0  # seconds: a guard against a hung processor, never a speed assertion
STOP_MARGIN = 1.0  # seconds stop() may run past its timeout (thread joins, one short hang)
BRIEF_HANG = 0.005  # seconds a "hang" request keeps the model waiting on an event
MAX_BATCH = 8

# The kind of a request is a function of its id alone.
FAIL, WRONG_LENGTH, HANG_KIND, OK = "fail", "wrong_length", "hang", "ok"


def kind_of(rid: int) -> str:
    r = rid % 11
    if r == 3:
        return FAIL
    if r == 5:
        return WRONG_LENGTH
    if r in (7, 8):
        return HANG_KIND
    return OK


class ModelFault(Exception):
    pass


class Model:
    """The model under test. Records every id it is called with (at call start)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: set[int] = set()
        self.calls = 0
        self.never = threading.Event()  # never set while running: waits time out

    def __call__(self, batch: Any) -> Any:
        ids = batch_ids(batch)
        with self.lock:
            self.seen.update(ids)
            self.calls += 1
        if any(kind_of(i) == HANG_KIND for i in ids):
            self.never.wait(BRIEF_HANG)
        return pure_model(batch)


class AsyncModel(Model):
    """The same model as an ``async def``: it runs on the processor's event loop."""

    async def __call__(self, batch: Any) -> Any:  # type: ignore[override]
        ids = batch_ids(batch)
        with self.lock:
            self.seen.update(ids)
            self.calls += 1
        await asyncio.sleep(0)
        if any(kind_of(i) == HANG_KIND for i in ids):
            await asyncio.sleep(BRIEF_HANG)
        return pure_model(batch)


def batch_ids(batch: Any) -> set[int]:
    if isinstance(batch, list):
        return {x[1] for x in batch}
    if batch.shape[0] == 0:
        return set()
    return {int(v) for v in np.unique(batch[:, 0].real)}


def pure_model(batch: Any) -> Any:
    """What the model computes, without recording or waiting."""
    ids = batch_ids(batch)
    faults = sorted(i for i in ids if kind_of(i) == FAIL)
    if faults:
        raise ModelFault(f"fault {faults[0]}")
    if isinstance(batch, list):
        out: Any = [("r", x[1], x[2] * 2) for x in batch]
        if any(kind_of(i) == WRONG_LENGTH for i in ids):
            out.append(("extra", -1, 0))
        return out
    out = batch * 2 + 1
    if any(kind_of(i) == WRONG_LENGTH for i in ids):
        out = np.concatenate([out, out[:1]])
    return out


def expected_alone(item: Any) -> tuple[str, Any]:
    """The outcome of ``item`` processed alone: ("ok", result) or ("err", (type, msg))."""
    batch = item if isinstance(item, np.ndarray) else [item]
    try:
        out = pure_model(batch)
    except ModelFault as exc:
        return "err", (ModelFault, str(exc))
    if len(out) != len(batch):
        # An item larger than max_batch_size runs in chunks: the message names the
        # lengths of the chunk that failed, so only its shape is predictable.
        return "err", (BatchOutputError, "results for a batch of")
    return "ok", (out if isinstance(item, np.ndarray) else out[0])


@dataclass
class Tracked:
    rid: int
    item: Any
    future: Any
    expected: tuple[str, Any]
    callbacks: list[int] = field(default_factory=list)
    cancelled: bool = False
    checked: bool = False
    deadline: bool = False  # enqueued with a max_queue_time


DTYPES = [np.float64, np.float32, np.int64, np.int32, np.int16, np.complex128]


class ProcessorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.p: BatchProcessor[Any, Any] | None = None

    @initialize(
        strategy=st.sampled_from(list(BatchProcessingStrategy)),
        priorities=st.booleans(),
        workers=st.integers(1, 3),
        async_model=st.booleans(),
        retry_delay=st.sampled_from([0.001, 0.05]),
    )
    def start(self, strategy: BatchProcessingStrategy, priorities: bool, workers: int,
              async_model: bool, retry_delay: float) -> None:
        self.threads_before = set(threading.enumerate())
        self.model = AsyncModel() if async_model else Model()
        self.config = BatchProcessorConfig(
            max_batch_size=MAX_BATCH, initial_batch_size=4, max_workers=workers,
            processing_strategy=strategy, enable_priority_queue=priorities,
            max_retries=2, retry_delay=retry_delay, item_timeout=HANG, batch_timeout=0.01,
            max_queue_size=10_000, health_check_interval=0.05)
        self.p = BatchProcessor(self.config)
        self.p.start(self.model)
        self.tracked: list[Tracked] = []
        self.next_id = 1
        self.fire_and_forget = 0
        self.paused = False
        self.paused_ids: set[int] = set()
        self.stopped = False
        self.stop_called = False
        self.forked = False

    # ------------------------------------------------------------ intake

    def _new_id(self) -> int:
        rid = self.next_id
        self.next_id += 1
        return rid

    def _submit(self, item: Any, rid: int, priority: int, predict: bool,
                max_queue_time: float | None = None) -> None:
        assert self.p is not None
        if self.stopped:
            started = time.monotonic()
            if predict:
                try:
                    self.p.enqueue_predict(item, priority=priority)
                except ProcessorStoppedError:
                    pass
                else:
                    raise AssertionError("enqueue_predict accepted a request after stop()")
            else:
                self.p.enqueue(item, priority=priority)  # never raises
            assert time.monotonic() - started < 1.0, "a refused request must fail at once"
            return
        if self.paused:
            self.paused_ids.add(rid)
        if not predict:
            self.p.enqueue(item, priority=priority, max_queue_time=max_queue_time)
            self.fire_and_forget += 1
            return
        future = self.p.enqueue_predict(item, priority=priority,
                                        max_queue_time=max_queue_time)
        t = Tracked(rid, item, future, expected_alone(item),
                    deadline=max_queue_time is not None)
        future.add_done_callback(lambda f, t=t: t.callbacks.append(1))
        self.tracked.append(t)

    @rule(dtype=st.sampled_from(DTYPES), rows=st.integers(0, 2 * MAX_BATCH + 3),
          width=st.integers(1, 3), priority=st.integers(0, 4),
          predict=st.booleans() | st.just(True))
    def enqueue_array(self, dtype: Any, rows: int, width: int, priority: int,
                      predict: bool) -> None:
        rid = self._new_id()
        item = np.full((rows, width), rid, dtype=dtype)
        self._submit(item, rid, priority, predict)

    # A deadline that has passed by the time any worker looks (or one long enough to
    # expire only during a backoff or a pause): the request expires or completes as
    # usual, never both, and an expired one never reached the model unless it was
    # waiting for a retry.
    @rule(rows=st.integers(1, 3), priority=st.integers(0, 4),
          max_queue_time=st.sampled_from([1e-6, 0.02]), predict=st.booleans())
    def enqueue_with_deadline(self, rows: int, priority: int, max_queue_time: float,
                              predict: bool) -> None:
        rid = self._new_id()
        item = np.full((rows, 2), rid, dtype=np.float64)
        self._submit(item, rid, priority, predict, max_queue_time)

    @rule(priority=st.integers(0, 4), predict=st.booleans() | st.just(True))
    def enqueue_generic(self, priority: int, predict: bool) -> None:
        rid = self._new_id()
        self._submit(("g", rid, rid % 97), rid, priority, predict)

    @rule(index=st.integers(0, 1_000))
    def cancel(self, index: int) -> None:
        # Drawn independently of timing (whether a future is done yet), so that the
        # generated steps replay identically; cancelling a done future returns False.
        if not self.tracked:
            return
        t = self.tracked[-1 - index % len(self.tracked)]
        if t.future.cancel():
            t.cancelled = True
            with self.model.lock:
                assert t.rid not in self.model.seen, "a future was cancelled after dispatch"

    # ------------------------------------------------------------ control

    @precondition(lambda self: not self.stopped)
    @rule()
    def pause(self) -> None:
        assert self.p is not None
        self.p.pause()
        assert self.p.is_paused
        self.paused = True

    @precondition(lambda self: not self.stopped)
    @rule()
    def resume(self) -> None:
        assert self.p is not None
        with self.model.lock:
            early = self.paused_ids & self.model.seen
        assert not early, f"requests enqueued while paused were processed: {sorted(early)}"
        self.p.resume()
        self.paused = False
        self.paused_ids.clear()

    @rule(n=st.integers(-5, 3 * MAX_BATCH))
    def update_batch_size(self, n: int) -> None:
        assert self.p is not None
        self.p.update_batch_size(n)
        size = self.p.current_batch_size
        assert self.config.min_batch_size <= size <= self.config.max_batch_size
        if self.config.processing_strategy is BatchProcessingStrategy.FIXED:
            assert size == min(max(n, self.config.min_batch_size), MAX_BATCH)

    @precondition(lambda self: not self.forked)  # one fork per run: each costs a process
    @rule()
    def fork(self) -> None:
        """A forked child's copy refuses at once, whatever the parent's copy is doing."""
        assert self.p is not None
        self.forked = True
        p = self.p

        def child() -> list[Any]:
            try:
                p.enqueue_predict(np.zeros((1, 1)))
            except ProcessorForkedError:
                refused = "forked"
            except ProcessorStoppedError:
                refused = "stopped"  # stopped before the fork (never started: not here)
            else:
                refused = "accepted"
            report = p.health()
            p.stop(timeout=HANG)
            return [refused, report["ready"], report["live"]]

        refused, ready, live = run_in_fork(child)
        assert refused == "forked" and not ready and not live

    @precondition(lambda self: not self.stopped and not self.paused)
    @rule()
    def settle(self) -> None:
        """Wait for everything accepted to complete, then the counts must add up exactly."""
        self._wait_all_done()
        self._check_counts_settle()

    @rule(timeout=st.sampled_from([0.0, 0.02, 2.0]))
    def stop(self, timeout: float) -> None:
        assert self.p is not None
        self.stop_called = True
        started = time.monotonic()
        self.p.stop(timeout=timeout)
        elapsed = time.monotonic() - started
        assert elapsed <= timeout + STOP_MARGIN, f"stop({timeout}) took {elapsed:.3f} s"
        self.stopped = True
        self.paused = False
        assert not self.p.running and self.p.shutdown_event.is_set()
        # Every accepted future is complete once stop() returns.
        for t in self.tracked:
            assert t.future.done(), f"request {t.rid} still pending after stop()"

    # ------------------------------------------------------------ checks

    def _wait_all_done(self) -> None:
        deadline = time.monotonic() + HANG
        for t in self.tracked:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                t.future.exception(timeout=remaining)
            except Exception:
                pass  # cancelled (CancelledError) or a hang, which the check reports
            assert t.future.done(), f"request {t.rid} never completed (lost)"

    def _counts(self) -> tuple[int, int]:
        assert self.p is not None
        s = self.p.get_stats()
        counted = (s["total_processed"] + s["total_errors"] + s["total_cancelled"]
                   + s["total_expired"])
        return counted, s["total_accepted"]

    def _check_counts_settle(self) -> None:
        # All futures we hold are done; fire-and-forget ones finish on their own and a
        # cancel that raced a pop is counted by the worker that drops it: wait for both.
        deadline = time.monotonic() + HANG
        while True:
            counted, accepted = self._counts()
            if counted == accepted or time.monotonic() > deadline:
                break
            time.sleep(0.001)  # polling a condition, bounded by HANG
        assert counted == accepted, (
            f"processed + errors + cancelled = {counted}, accepted = {accepted}, "
            f"pending = 0: stats {self.p.get_stats() if self.p else None}")

    @invariant()
    def outcomes_are_right(self) -> None:
        if self.p is None:
            return
        for t in self.tracked:
            assert len(t.callbacks) <= 1, f"request {t.rid} completed {len(t.callbacks)} times"
            if t.checked or not t.future.done():
                continue
            self._check_outcome(t)
            t.checked = True

    def _check_outcome(self, t: Tracked) -> None:
        f = t.future
        if f.cancelled():
            assert t.cancelled, f"request {t.rid} was cancelled, but not by us"
            return
        assert not t.cancelled
        exc = f.exception(timeout=0)
        if exc is not None and isinstance(exc, ProcessorStoppedError):
            assert self.stop_called, f"request {t.rid}: ProcessorStoppedError before stop()"
            return
        if isinstance(exc, QueueTimeoutError):
            assert t.deadline, f"request {t.rid} expired without a max_queue_time"
            if exc.__cause__ is None:  # not waiting for a retry: never called
                with self.model.lock:
                    assert t.rid not in self.model.seen, f"expired {t.rid} was processed"
            return
        kind, expected = t.expected
        if kind == "err":
            etype, msg = expected
            assert isinstance(exc, etype), (t.rid, kind_of(t.rid), repr(exc))
            assert msg in str(exc), (t.rid, str(exc), msg)
            return
        assert exc is None, f"request {t.rid} ({kind_of(t.rid)}) failed: {exc!r}"
        result = f.result(timeout=0)
        if isinstance(t.item, np.ndarray):
            assert isinstance(result, np.ndarray)
            assert result.dtype == expected.dtype and result.shape == expected.shape, (
                t.rid, result.dtype, result.shape, expected.dtype, expected.shape)
            assert np.array_equal(result, expected), (t.rid, result, expected)
        else:
            assert result == expected, (t.rid, result, expected)

    @invariant()
    def nothing_cancelled_was_processed(self) -> None:
        if self.p is None:
            return
        with self.model.lock:
            seen = set(self.model.seen)
        bad = [t.rid for t in self.tracked if t.cancelled and t.rid in seen]
        assert not bad, f"cancelled requests reached the model: {bad}"

    @invariant()
    def counts_never_exceed_accepted(self) -> None:
        if self.p is None:
            return
        counted, accepted = self._counts()
        assert counted <= accepted, f"counted {counted} > accepted {accepted}"

    def teardown(self) -> None:
        if self.p is None:
            return
        try:
            if not self.stopped:
                if self.paused:
                    self.resume()
                self.settle()
                self.stop(2.0)
            self.outcomes_are_right()
            for t in self.tracked:
                assert t.checked and len(t.callbacks) == 1, (
                    f"request {t.rid}: {len(t.callbacks)} completions")
            self._check_counts_settle()
        finally:
            self.model.never.set()
            self.p.stop(timeout=HANG)
            for thread in self.p._threads():
                thread.join(HANG)
        leaked = [th for th in threading.enumerate()
                  if th not in self.threads_before and th.name.startswith("batchproc")
                  and th.is_alive()]
        assert not leaked, f"threads left behind: {leaked}"


def run_in_fork(body: Any) -> Any:
    """``body()`` in a forked child that reports its JSON result through a pipe and
    exits; a child that hangs past HANG is killed and fails the test."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(body()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    data = b""
    try:
        deadline = time.monotonic() + HANG
        while True:
            ready, _, _ = select.select([read_end], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError("a forked child hung")
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert data and os.waitstatus_to_exitcode(status) == 0, "the forked child failed"
    return json.loads(data)


ProcessorMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None)
test_processor_state_machine = pytest.mark.slow(ProcessorMachine.TestCase)


def test_a_refused_fire_and_forget_request_keeps_the_counts_balanced(make_processor):
    """enqueue() after stop() is refused (logged, never raised); it was never accepted,
    so it must not break processed + errors + cancelled + pending == accepted."""
    p = make_processor(lambda batch: batch)
    assert p.enqueue_predict(["a"]).result(timeout=HANG) == ["a"]
    p.stop(timeout=2.0)
    p.enqueue(["refused"])
    s = p.get_stats()
    assert s["total_accepted"] == 1
    assert s["total_processed"] + s["total_errors"] + s["total_cancelled"] == 1, s

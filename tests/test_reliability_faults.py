"""Reliability: fault injection. Each fault gets the behaviour docs/failures.md describes
and a clear log line (asserted through caplog).

Faults: BaseException subclasses from the model, a model that never returns, outputs that
are not arrays or have the wrong dtype, a metrics collector that raises in every method,
psutil failing, and memory pressure reported by psutil. Orderings come from events and
pause()/resume(); time bounds are hang guards or the stop() bound of the contract.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import psutil
import pytest
from waiting import wait_for

from batchproc import BatchOutputError, BatchTimeoutError, ProcessorStoppedError

HANG = 10.0  # seconds: a guard against a hung processor, never a speed assertion
STOP_MARGIN = 1.0  # seconds stop() may run past its timeout


def item(v: float, rows: int = 1) -> np.ndarray:
    return np.full((rows, 2), v, dtype=np.float64)


def records(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= level and text in r.getMessage()]


# ---------------------------------------------------------------- BaseException subclasses


class Interrupt(BaseException):
    """A KeyboardInterrupt-like exception: not an Exception."""


@pytest.mark.parametrize("exc_type", [Interrupt, KeyboardInterrupt, SystemExit, GeneratorExit])
def test_base_exceptions_fail_their_futures_are_logged_and_the_worker_serves_on(
        make_processor, caplog, exc_type):
    calls = []

    def model(batch):
        calls.append(batch[:, 0].tolist())
        if (batch == -1).any():
            raise exc_type("from the model")
        return batch * 2

    p = make_processor(model, max_workers=1, max_retries=3, retry_delay=0.0,
                       max_batch_size=1, initial_batch_size=1)
    with caplog.at_level(logging.ERROR, logger="batchproc"):
        bad = p.enqueue_predict(item(-1))
        with pytest.raises(exc_type):
            bad.result(timeout=HANG)
        # The one worker is alive and serves the requests that come after.
        good = [p.enqueue_predict(item(v)) for v in range(5)]
        assert [f.result(timeout=HANG)[0, 0] for f in good] == [0, 2, 4, 6, 8]
    assert calls.count([-1.0]) == 1, "a BaseException is not retried"
    assert records(caplog, logging.ERROR, "process_func raised"), caplog.text
    assert p.get_stats()["total_errors"] == 1
    assert p._dispatcher.alive_workers()[0] == 1


def test_a_base_exception_on_a_chunked_item_is_logged(make_processor, caplog):
    """An item larger than max_batch_size runs in chunks; a BaseException there must be
    as loud as anywhere else (the worker must not swallow it silently)."""

    def model(batch):
        if (batch == 1).any():
            raise Interrupt("chunk")
        return batch * 2

    p = make_processor(model, max_workers=1, max_batch_size=4, initial_batch_size=4,
                       retry_delay=0.0)
    with caplog.at_level(logging.WARNING, logger="batchproc"):
        future = p.enqueue_predict(item(1, rows=10))
        with pytest.raises(Interrupt):
            future.result(timeout=HANG)
    assert records(caplog, logging.ERROR, "Interrupt"), (
        "no log line for a BaseException from process_func on a chunked item:\n"
        + caplog.text)
    # The worker serves on.
    assert p.enqueue_predict(item(2, rows=10)).result(timeout=HANG).sum() == 80


# ---------------------------------------------------------------- a model that never returns


def test_a_model_that_never_returns_times_out_is_replaced_and_stop_is_bounded(
        make_processor, caplog):
    release = threading.Event()
    stuck = threading.Event()

    def model(batch):
        if (batch == 666).any():
            stuck.set()
            release.wait()  # never returns until the test releases it at the end
        return batch * 2

    p = make_processor(model, item_timeout=0.3, max_workers=1, max_batch_size=1,
                       initial_batch_size=1)
    try:
        with caplog.at_level(logging.ERROR, logger="batchproc"):
            hung = p.enqueue_predict(item(666))
            assert stuck.wait(HANG)
            with pytest.raises(TimeoutError) as info:
                hung.result(timeout=HANG)
            assert isinstance(info.value, BatchTimeoutError)
            # A replacement worker serves on (the only worker is stuck in process_func).
            after = [p.enqueue_predict(item(v)) for v in range(4)]
            assert [f.result(timeout=HANG)[0, 0] for f in after] == [0, 2, 4, 6]
        assert records(caplog, logging.ERROR, "past item_timeout"), caplog.text
        # stop() is bounded even though a thread is still stuck in process_func.
        started = time.monotonic()
        p.stop(timeout=1.0)
        assert time.monotonic() - started <= 1.0 + STOP_MARGIN
        with pytest.raises(ProcessorStoppedError):
            p.enqueue_predict(item(1))
    finally:
        release.set()
    for thread in p._threads():
        thread.join(HANG)
    with pytest.raises(BatchTimeoutError):
        hung.result(timeout=0)  # the late result was discarded


def test_stop_while_the_supervisor_replaces_a_stuck_worker(make_processor, monkeypatch):
    """stop() arriving while the replacement of a stuck worker is being started: its join
    must never meet a worker thread that is not started yet (it raised RuntimeError,
    "cannot join thread before it is started")."""
    release = threading.Event()

    def model(batch):
        if (batch == 666).any():
            release.wait()
        return batch

    p = make_processor(model, item_timeout=0.3, max_workers=1, max_batch_size=1,
                       initial_batch_size=1)
    errors = []

    def stop():
        try:
            p.stop(timeout=1.0)
        except BaseException as exc:
            errors.append(exc)

    stopper = threading.Thread(target=stop, name="test-stopper")
    replacing = threading.Event()
    real_start = threading.Thread.start

    def start(thread):
        if thread.name.startswith("batchproc-worker") and not stopper.ident:
            release.set()       # the stuck worker exits: stop()'s join moves past it
            stopper.start()     # stop() begins while the replacement is not started yet
            replacing.set()
            stopper.join(0.5)   # it failed at once; now it waits for the start to finish
        real_start(thread)

    try:
        monkeypatch.setattr(threading.Thread, "start", start)
        hung = p.enqueue_predict(item(666))
        assert isinstance(hung.exception(timeout=HANG), BatchTimeoutError)
        assert replacing.wait(HANG)
        stopper.join(HANG)
        assert not stopper.is_alive() and errors == []
    finally:
        release.set()
    for thread in p._threads():
        thread.join(HANG)


@pytest.mark.parametrize("refusals", [1, 3])
def test_a_replacement_the_system_refuses_fails_nothing_and_is_started_later(
        make_processor, monkeypatch, caplog, refusals):
    """The one worker hangs past item_timeout and the system refuses the thread of its
    replacement (``refusals`` times in a row): the hung request still times out, the
    slot it held is freed, and a worker is started in its place once the system lets
    it. (The refusal escaped the time limit's clean-up: the hung request never
    completed, not even at stop, and the processor served nothing more.)"""
    release = threading.Event()

    def model(batch):
        if (batch == 666).any():
            release.wait(HANG)
        return batch

    p = make_processor(model, item_timeout=0.2, max_workers=1, max_batch_size=1,
                       initial_batch_size=1)
    refused = []
    real_start = threading.Thread.start

    def start(thread):
        if thread.name.startswith("batchproc-worker") and len(refused) < refusals:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        real_start(thread)

    try:
        assert p.enqueue_predict(item(1)).result(timeout=HANG)[0, 0] == 1
        monkeypatch.setattr(threading.Thread, "start", start)
        with caplog.at_level(logging.WARNING, logger="batchproc"):
            hung = p.enqueue_predict(item(666))
            assert isinstance(hung.exception(timeout=HANG), BatchTimeoutError)
            assert p.enqueue_predict(item(2)).result(timeout=HANG)[0, 0] == 2
            # The supervisor logs the start after the thread runs: it may answer first.
            wait_for(lambda: records(caplog, logging.WARNING,
                                     "started a worker in a place left empty"),
                     "the late start logged")
        assert len(refused) == refusals
        assert records(caplog, logging.ERROR, "could not start a worker in place of")
        assert p.health()["checks"]["workers"]["value"] == 1
    finally:
        release.set()
    p.stop(timeout=HANG)


def test_a_worker_abandoned_in_a_hang_that_then_crashes_is_not_replaced_twice(
        make_processor, monkeypatch, caplog):
    """The time limit replaced the worker; when its late call returns, a bug in batchproc
    crashes it: the crash path's replacement would be a second one (two workers for
    max_workers=1)."""
    from batchproc.engine import execution

    release = threading.Event()

    def model(batch):
        if (batch == 666).any():
            release.wait(HANG)
        return batch

    real_run = execution.Executor.run

    def run(self, batch, workspace, target):
        real_run(self, batch, workspace, target)
        if batch.worker.abandoned:
            raise RuntimeError("a bug after an abandoned call")

    monkeypatch.setattr(execution.Executor, "run", run)
    p = make_processor(model, item_timeout=0.2, max_workers=1, max_batch_size=1,
                       initial_batch_size=1)
    try:
        assert p.enqueue_predict(item(1)).result(timeout=HANG)[0, 0] == 1
        hung = p.enqueue_predict(item(666))
        assert isinstance(hung.exception(timeout=HANG), BatchTimeoutError)
        first = next(t for t in p._threads() if t.name == "batchproc-worker-1")
        with caplog.at_level(logging.CRITICAL, logger="batchproc"):
            release.set()  # the late call returns, and its worker crashes
            first.join(HANG)
        assert not first.is_alive()
        assert records(caplog, logging.CRITICAL, "crashed")
        assert p.health()["checks"]["workers"]["value"] == 1
        assert sum(t.name.startswith("batchproc-worker") and t.is_alive()
                   for t in p._threads()) == 1
        assert p.enqueue_predict(item(2)).result(timeout=HANG)[0, 0] == 2
    finally:
        release.set()
    p.stop(timeout=HANG)


# ---------------------------------------------------------------- odd outputs


def test_an_output_without_a_length_is_a_clear_error(make_processor, caplog):
    p = make_processor(lambda batch: 42, max_retries=1, retry_delay=0.0)
    with pytest.raises(BatchOutputError, match="int, which the output rule cannot split"):
        p.enqueue_predict(item(1)).result(timeout=HANG)
    with caplog.at_level(logging.WARNING, logger="batchproc"):
        p.enqueue(item(1))  # fire and forget: nobody gets the error, so it is logged
        p.stop(timeout=HANG)
    assert records(caplog, logging.WARNING, "BatchOutputError"), caplog.text


def test_none_from_the_model_is_a_clear_error(make_processor):
    p = make_processor(lambda batch: None, max_retries=0, retry_delay=0.0)
    with pytest.raises(BatchOutputError, match="NoneType"):
        p.enqueue_predict(["generic"]).result(timeout=HANG)
    with pytest.raises(BatchOutputError, match="NoneType"):
        p.enqueue_predict(item(1)).result(timeout=HANG)


def test_a_list_output_for_an_array_batch_gives_each_caller_its_rows(make_processor):
    p = make_processor(lambda batch: [float(row.sum()) for row in batch],
                       max_batch_size=16, initial_batch_size=16)
    p.pause()
    futures = [p.enqueue_predict(item(v, rows=2)) for v in range(4)]
    p.resume()
    for v, f in enumerate(futures):
        assert f.result(timeout=HANG) == [2.0 * v, 2.0 * v]


def test_a_list_of_views_into_the_batch_never_changes_after_delivery(make_processor):
    """docs/formats.md, "A delivered result never changes": a reused buffer is not
    reused while an output refers to it. ``list(batch)`` is a list of views of it."""
    p = make_processor(lambda batch: list(batch), max_workers=1, batch_timeout=0.0)
    first = p.enqueue_predict(item(1.0)).result(timeout=HANG)
    snapshot = [np.array(row, copy=True) for row in first]
    for v in range(2, 8):  # later batches reuse (and overwrite) the assembler's buffers
        p.enqueue_predict(item(float(v))).result(timeout=HANG)
    assert all(np.array_equal(a, b) for a, b in zip(first, snapshot)), (
        f"a delivered result changed afterwards: {snapshot} -> {first}")


def test_an_output_of_another_dtype_is_delivered_as_the_model_returned_it(make_processor):
    p = make_processor(lambda batch: (batch * 2).astype(np.float32))
    out = p.enqueue_predict(item(3.0)).result(timeout=HANG)
    assert out.dtype == np.float32 and np.array_equal(out, [[6.0, 6.0]])
    p2 = make_processor(lambda batch: batch.astype(np.int8), max_batch_size=4,
                        initial_batch_size=4)
    big = p2.enqueue_predict(item(5.0, rows=10)).result(timeout=HANG)  # chunked, joined
    assert big.dtype == np.int8 and big.shape == (10, 2) and (big == 5).all()


def test_a_dict_of_per_row_values_fails_clearly_naming_the_leaf(make_processor, caplog):
    # A dict is several outputs (docs/formats.md): here its one leaf is a row, not the
    # batch's rows, so the batch fails with an error that names it, and is logged.
    p = make_processor(lambda batch: {i: row for i, row in enumerate(batch)},
                       max_retries=0, retry_delay=0.0)
    exc = p.enqueue_predict(item(1.0)).exception(timeout=HANG)
    assert isinstance(exc, BatchOutputError) and "output[0]" in str(exc)
    # The processor serves on.
    assert p.enqueue_predict(["still served"]).exception(timeout=HANG) is not None
    np.testing.assert_array_equal(
        make_processor(lambda b: b).enqueue_predict(item(2.0)).result(timeout=HANG),
        item(2.0))
    with caplog.at_level(logging.WARNING, logger="batchproc"):
        p.enqueue(item(1.0))  # fire and forget: nobody gets the error, so it is logged
        p.stop(timeout=HANG)
    assert records(caplog, logging.WARNING, "BatchOutputError"), caplog.text


# ---------------------------------------------------------------- metrics collector


class RaisingCollector:
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.health_seen = threading.Event()

    def _raise(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        raise RuntimeError(f"collector {name} broke")

    def bind_processor(self, processor: Any) -> None:
        self._raise("bind_processor")  # in the processor's constructor

    def record_batch(self, *args: Any) -> None:
        self._raise("record_batch")

    def record_error(self, *args: Any) -> None:
        self._raise("record_error")

    def record_health(self, *args: Any) -> None:
        # Set on the second call: the first call's failure has been logged by then (the
        # supervisor thread calls record_health, then logs, then checks again).
        if self.calls.get("record_health"):
            self.health_seen.set()
        self._raise("record_health")


def test_a_collector_that_raises_everywhere_never_breaks_processing(make_processor, caplog):
    collector = RaisingCollector()

    def model(batch):
        if (batch == -1).any():
            raise ValueError("bad row")
        return batch * 2

    with caplog.at_level(logging.ERROR, logger="batchproc"):
        p = make_processor(model, metrics_collector=collector, max_retries=0,
                           retry_delay=0.0, health_check_interval=0.02)
        for _ in range(3):
            assert p.enqueue_predict(item(2)).result(timeout=HANG)[0, 0] == 4
            with pytest.raises(ValueError, match="bad row"):
                p.enqueue_predict(item(-1)).result(timeout=HANG)
        assert collector.health_seen.wait(HANG)
    assert collector.calls["record_batch"] >= 3 and collector.calls["record_error"] >= 3
    assert collector.calls["bind_processor"] == 1
    for name in ("bind_processor", "record_batch", "record_error", "record_health"):
        logged = records(caplog, logging.ERROR, f"metrics_collector.{name} raised")
        assert len(logged) == 1, (name, caplog.text)  # once per method, not per call
    stats = p.get_stats()
    assert stats["total_processed"] == 3 and stats["total_errors"] == 3


# ---------------------------------------------------------------- psutil


def test_psutil_failing_reads_as_unknown_and_processing_goes_on(make_processor, caplog,
                                                                monkeypatch):
    def broken(*args, **kwargs):
        raise psutil.AccessDenied(pid=1)

    monkeypatch.setattr(psutil.Process, "memory_info", broken)
    monkeypatch.setattr(psutil, "virtual_memory", broken)
    reports: list[dict[str, Any]] = []
    got = threading.Event()

    class Collector:
        def record_health(self, report):
            reports.append(report)
            got.set()

    with caplog.at_level(logging.WARNING, logger="batchproc"):
        p = make_processor(lambda b: b * 2, metrics_collector=Collector(),
                           health_check_interval=0.02)
        assert got.wait(HANG)
        assert p.enqueue_predict(item(4)).result(timeout=HANG)[0, 0] == 8
    assert reports[0]["checks"]["memory"]["status"] == "unknown"
    assert p.health()["checks"]["memory"]["status"] == "unknown"
    assert records(caplog, logging.WARNING, "psutil could not read memory"), caplog.text
    assert p.get_stats()["memory_level"] == "ok"  # unknown never shrinks batches


def _fake_memory(monkeypatch, percent: float) -> None:
    """Make psutil report this process using ``percent`` % of the machine's memory."""
    total = 100 * 2**30

    class FakeProcess:
        def __init__(self, *args: Any) -> None:
            pass

        def memory_info(self):
            return type("mem", (), {"rss": int(total * percent / 100)})()

    def virtual_memory():
        return type("vm", (), {"total": total, "percent": percent})()

    monkeypatch.setattr(psutil, "Process", FakeProcess)
    monkeypatch.setattr(psutil, "virtual_memory", virtual_memory)


def test_memory_pressure_from_psutil_shrinks_batches_and_logs_an_error(make_processor,
                                                                       caplog, monkeypatch):
    _fake_memory(monkeypatch, 95.0)
    critical = threading.Event()

    class Collector:
        def record_health(self, report):
            if report["checks"]["memory"]["status"] == "critical":
                critical.set()

    with caplog.at_level(logging.ERROR, logger="batchproc"):
        p = make_processor(metrics_collector=Collector(), min_batch_size=2,
                           max_batch_size=64, initial_batch_size=64,
                           health_check_interval=0.02)
        assert p.current_batch_size == 64
        p.start(lambda b: b * 2)
        assert critical.wait(HANG)
    assert p.current_batch_size == 2  # critical: down to min_batch_size
    assert p.get_stats()["memory_level"] == "critical"
    logged = records(caplog, logging.ERROR, "health memory is critical")
    assert logged and "95" in logged[0].getMessage(), caplog.text
    # It still serves, in small batches.
    p.pause()
    futures = [p.enqueue_predict(item(v)) for v in range(10)]
    p.resume()
    assert [f.result(timeout=HANG)[0, 0] for f in futures] == [2 * v for v in range(10)]


# ---------------------------------------------------------------- stop while pacing


def test_stop_fails_a_batch_held_back_by_min_batch_interval(make_processor):
    """A batch popped and waiting for its min_batch_interval slot is in flight: stop()
    must complete it (result or ProcessorStoppedError) before it returns, and the model
    must never run after stop() returned."""
    calls: list[tuple[float, Any]] = []

    def model(batch):
        calls.append((time.monotonic(), list(batch)))
        return batch

    p = make_processor(model, min_batch_interval=3.0, max_workers=2, max_batch_size=1,
                       initial_batch_size=1)
    assert p.enqueue_predict("first").result(timeout=HANG) == "first"
    second = p.enqueue_predict("second")
    deadline = time.monotonic() + HANG
    while not second.running():  # popped and marked running, now waiting for its slot
        assert time.monotonic() < deadline, "the second batch was never popped"
        time.sleep(0.001)
    started = time.monotonic()
    p.stop(timeout=0.2)
    returned = time.monotonic()
    assert returned - started <= 0.2 + STOP_MARGIN
    assert second.done(), "stop() returned with an accepted request still pending"
    assert isinstance(second.exception(timeout=0), ProcessorStoppedError)
    for thread in p._threads():
        thread.join(HANG)
    late = [c for c in calls if c[0] >= returned]
    assert not late, f"process_func ran after stop() returned: {late}"

"""Logging manners: the library prints nothing unless the application configures logging,
and a fire-and-forget request that fails is logged once, with repeats rate-limited."""

import logging
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from hanging import HANGS_ON, hangs_on_666

from batchproc.engine import execution, limits
from batchproc.errors import BatchTimeoutError, QueueFullError
from batchproc.log_limits import LogLimiter, plural, seconds
from batchproc.processor import FAILURE_LOG_INTERVAL, FailureLog

FAILING_ENQUEUE = """
import logging, sys
import numpy as np
from batchproc import BatchProcessor, BatchProcessorConfig
if sys.argv[1] == "configured":
    logging.basicConfig(format="%(levelname)s %(name)s %(message)s")

def model(batch):
    raise ValueError("bad batch")

p = BatchProcessor(BatchProcessorConfig(max_retries=0, retry_delay=0.0))
p.start(model)
p.enqueue(np.ones((1, 2)))
p.stop(timeout=10.0)   # joins the workers: the failure has been handled and logged
assert p.get_stats()["total_errors"] == 1
"""


def run_failing_enqueue(mode):
    return subprocess.run([sys.executable, "-c", FAILING_ENQUEUE, mode], capture_output=True,
                          text=True, timeout=60, check=True)


def test_unconfigured_logging_prints_nothing():
    # Without the package's NullHandler, logging's last-resort handler would print the
    # failure to the stderr of an application that never asked for logs.
    assert run_failing_enqueue("unconfigured").stderr == ""


def test_a_failed_fire_and_forget_request_is_logged_once():
    lines = run_failing_enqueue("configured").stderr.splitlines()
    assert lines == ["WARNING batchproc.processor enqueue: request failed: "
                     "ValueError('bad batch')"], lines


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("batchproc")]


def test_repeats_of_one_error_type_are_logged_once_per_interval(caplog):
    clock = FakeClock()
    log = FailureLog(interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="batchproc"):
        log("failed", ValueError("a"))           # the first: at once
        for _ in range(5):
            clock.now += 1.0
            log("failed", ValueError("b"))       # within 10 s of it: left out
        clock.now = 110.0
        log("failed", ValueError("c"))           # 10 s later: logged, with the count
        log("failed", ValueError("d"))           # left out again
    assert warnings_of(caplog) == [
        "enqueue: request failed: ValueError('a')",
        "enqueue: request failed: ValueError('c') (and 5 more ValueError in the last 10 s)",
    ]


def test_each_error_type_and_refusals_have_their_own_limit(caplog):
    clock = FakeClock()
    log = FailureLog(interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="batchproc"):
        log("failed", ValueError("v"))
        log("failed", KeyError("k"))
        log("refused", QueueFullError("full"))
        log("failed", ValueError("v2"))
        log("refused", QueueFullError("full again"))
    assert warnings_of(caplog) == [
        "enqueue: request failed: ValueError('v')",
        "enqueue: request failed: KeyError('k')",
        "enqueue: request refused: QueueFullError('full')",
    ]


def test_a_processor_failing_every_request_logs_one_line_and_a_count_at_stop(
        make_processor, caplog):
    def model(batch):
        raise RuntimeError("model down")

    p = make_processor(max_retries=0, retry_delay=0.0, max_batch_size=1)
    clock = FakeClock()  # frozen: every failure falls in the first interval
    p._failure_log = FailureLog(clock=clock)
    assert p._failure_log.interval == FAILURE_LOG_INTERVAL
    with caplog.at_level(logging.DEBUG, logger="batchproc"):
        p.start(model)
        for _ in range(20):
            p.enqueue(np.ones((1, 2)))
        p.stop(timeout=10.0)
    assert p.get_stats()["total_errors"] == 20
    assert warnings_of(caplog) == [
        "enqueue: request failed: RuntimeError('model down')",
        # stop tells what no later line will: the failures of the interval left out
        "enqueue: 19 more requests failed with RuntimeError in the last 0.000 s",
    ]


# ----------------------------------------------------------------- engine lines, limited


def test_a_log_limiter_lets_one_line_per_kind_through_per_interval():
    clock = FakeClock()
    limiter = LogLimiter(10.0, clock)
    assert limiter.admit("a") == (0, 0.0)
    assert limiter.admit("b") == (0, 0.0)  # each kind its own
    clock.now += 9.9
    assert limiter.admit("a") is None and limiter.admit("a") is None
    clock.now += 0.1
    assert limiter.admit("a") == (2, 10.0)  # the two left out, and since when
    assert limiter.admit("a") is None
    clock.now += 25.0
    assert limiter.admit("a") == (1, 25.0)


def test_what_a_log_limiter_held_back_is_told_once_its_kind_goes_quiet():
    clock = FakeClock()
    limiter = LogLimiter(10.0, clock)
    limiter.admit("a")
    limiter.admit("a")
    limiter.admit("a")
    limiter.admit("b")  # logged, nothing held back
    clock.now += 9.0
    assert limiter.held() == []  # within the interval: the next line of "a" may tell it
    clock.now += 1.0
    assert limiter.held() == [("a", (2, 10.0))]  # an interval without "a": told now
    assert limiter.held() == []  # told once
    assert limiter.admit("a") == (0, 0.0)  # after a summary, a line of its own again
    assert limiter.admit("a") is None
    assert limiter.held(final=True) == [("a", (1, 0.0))]  # at stop, whatever the time


def test_a_kind_still_coming_is_told_by_its_next_line_not_by_a_summary():
    # Failures 3 s apart: each interval's line names the failure and counts the others.
    clock = FakeClock()
    limiter = LogLimiter(10.0, clock)
    assert limiter.admit("a") == (0, 0.0)
    for _ in range(3):
        clock.now += 3.0
        assert limiter.admit("a") is None
        assert limiter.held() == []
    clock.now += 1.0
    assert limiter.held() == []  # 10 s since its line, 1 s since the last left out
    clock.now += 2.0
    assert limiter.admit("a") == (3, 12.0)


@pytest.mark.parametrize("count, text", [(1, "1 batch"), (2, "2 batches"), (1024, "1,024 batches")])
def test_counts_in_log_lines_take_their_plural(count, text):
    assert plural(count, "batch", "batches") == text
    assert plural(count, "call") == text.replace("batch", "call").replace("calles", "calls")


@pytest.mark.parametrize("value, text", [
    (0.0, "0.000 s"), (0.0001, "0.0001 s"), (1e-7, "1e-07 s"), (0.001, "0.001 s"),
    (0.25, "0.250 s"), (10.0123, "10.012 s"), (30.0, "30.000 s"), (999.96, "999.960 s"),
    (86400.0, "86400.000 s")])
def test_seconds_in_log_lines_keep_the_millisecond_and_a_shorter_time_its_digits(
        value, text):
    assert seconds(value) == text


def overdue_lines(caplog):
    return [r.getMessage() for r in caplog.records if "past item_timeout" in r.getMessage()]


@pytest.mark.parametrize("hangs, told", [
    (2, "1 more process_func call ran past item_timeout=0\\.0001 s in the last \\S+ s \\(not "
        "logged one by one\\); it failed its request with BatchTimeoutError"),
    (3, "2 more process_func calls ran past item_timeout=0\\.0001 s in the last \\S+ s \\(not "
        "logged one by one\\); each failed its request with BatchTimeoutError")])
def test_calls_abandoned_past_item_timeout_are_logged_once_per_interval(
        make_processor, caplog, monkeypatch, hangs, told):
    # A model hanging on every call: one line, not one per call; the calls it stands for
    # are told by a summary at the latest when the processor stops.
    monkeypatch.setattr(limits, "OVERDUE_LOG_S", 3600.0)
    model, release, _ = hangs_on_666()
    p = make_processor(model, max_batch_size=1, item_timeout=0.0001, max_retries=0)
    try:
        with caplog.at_level(logging.ERROR, logger="batchproc"):
            futures = [p.enqueue_predict(np.full((1, 2), HANGS_ON)) for _ in range(hangs)]
            for f in futures:
                assert isinstance(f.exception(timeout=10.0), BatchTimeoutError)
            lines = overdue_lines(caplog)
            assert len(lines) == 1, lines
            assert re.fullmatch(
                r"process_func ran \S+ s on a batch of 1 request, past "
                r"item_timeout=0\.0001 s; failing it with BatchTimeoutError and replacing "
                r"worker \S+", lines[0]), lines[0]
            p.stop(timeout=10.0)
            lines = overdue_lines(caplog)
    finally:
        release.set()
    assert len(lines) == 2, lines
    assert re.fullmatch(told, lines[1]), lines


def test_failures_left_out_of_enqueues_log_are_told_once_their_interval_passes(caplog):
    clock = FakeClock()
    log = FailureLog(interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="batchproc"):
        log("failed", ValueError("a"))
        log("failed", ValueError("b"))
        log("failed", ValueError("c"))
        log.flush()  # within the interval: nothing yet
        clock.now += 12.0
        log.flush()  # no ValueError since: the two left out are told now
        log.flush()
    assert warnings_of(caplog) == [
        "enqueue: request failed: ValueError('a')",
        "enqueue: 2 more requests failed with ValueError in the last 12.000 s",
    ]


def test_the_supervisor_tells_what_the_log_left_out_once_its_interval_passes(
        make_processor, caplog):
    def model(batch):
        raise RuntimeError("model down")

    # One worker, batches of one: requests run in order, each delivery (and the log's
    # callback) before the next, so the last one's failure follows all the logged ones.
    p = make_processor(max_retries=0, retry_delay=0.0, max_batch_size=1, max_workers=1)
    clock = FakeClock()
    p._failure_log = FailureLog(clock=clock)
    with caplog.at_level(logging.WARNING, logger="batchproc"):
        p.start(model)
        for _ in range(5):
            p.enqueue(np.ones((1, 2)))
        assert isinstance(p.enqueue_predict(np.ones((1, 2))).exception(timeout=10.0),
                          RuntimeError)
        clock.now += FAILURE_LOG_INTERVAL  # no failure since: the next tick tells the rest
        summary = "enqueue: 4 more requests failed with RuntimeError in the last 10.000 s"
        deadline = time.monotonic() + 10.0
        while summary not in warnings_of(caplog) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert warnings_of(caplog) == [
            "enqueue: request failed: RuntimeError('model down')", summary]
        assert p.running  # told by the supervisor, not by stop


def interrupt_lines(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.ERROR and "without retry" in r.getMessage()]


@pytest.mark.parametrize("raised", [SystemExit(4), KeyboardInterrupt(), GeneratorExit("x")])
def test_calls_raising_an_interrupt_are_logged_once_per_interval(make_processor, caplog,
                                                                 monkeypatch, raised):
    # A model raising SystemExit on every call: one line, not one per call, as for its
    # other failures; the calls it stands for are told at the latest at stop.
    monkeypatch.setattr(execution, "INTERRUPT_LOG_S", 3600.0)

    def model(batch):
        raise raised

    p = make_processor(model, max_batch_size=1, max_workers=1)
    with caplog.at_level(logging.ERROR, logger="batchproc"):
        for _ in range(3):
            error = p.enqueue_predict(np.ones((1, 2))).exception(timeout=10.0)
            assert type(error) is type(raised)
        lines = interrupt_lines(caplog)
        assert lines == [f"process_func raised {raised!r}; failing its 1 request without "
                         "retry"], lines
        p.stop(timeout=10.0)
    lines = interrupt_lines(caplog)
    assert len(lines) == 2, lines
    assert re.fullmatch(rf"process_func raised {type(raised).__name__} in 2 more calls in "
                        r"the last \S+ s \(not logged one by one\); their requests failed "
                        "without retry", lines[1]), lines

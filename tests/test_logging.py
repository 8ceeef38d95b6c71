"""Logging manners: the library prints nothing unless the application configures logging,
and a fire-and-forget request that fails is logged once, with repeats rate-limited."""

import logging
import subprocess
import sys

import numpy as np

from batchproc.errors import QueueFullError
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


def test_a_processor_failing_every_request_logs_one_line(make_processor, caplog):
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
    assert warnings_of(caplog) == ["enqueue: request failed: RuntimeError('model down')"]
    clock.now += FAILURE_LOG_INTERVAL
    with caplog.at_level(logging.WARNING, logger="batchproc"):
        caplog.clear()
        p._failure_log("failed", RuntimeError("model down"))
    assert warnings_of(caplog) == ["enqueue: request failed: RuntimeError('model down') "
                                   "(and 19 more RuntimeError in the last 10 s)"]

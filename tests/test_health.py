"""The health report, its checks and the actions they trigger."""

import logging
import threading
import time

import numpy as np
import psutil

from batchproc.controller import MEMORY_CRITICAL, MEMORY_OK, MEMORY_WARNING


class FakeProbe:
    def __init__(self, percent):
        self.percent = percent

    def read(self):
        if self.percent is None:
            return None
        return {"rss_bytes": 1.0, "percent": self.percent, "system_percent": self.percent}


def test_report_has_overall_status_and_each_check(make_processor):
    p = make_processor(lambda b: b)
    report = p.health()
    assert report["status"] in ("healthy", "degraded", "unhealthy")
    assert set(report["checks"]) == {"memory", "queue", "stuck_batches", "workers"}
    for check in report["checks"].values():
        assert {"status", "value"} <= set(check)
    assert report["checks"]["workers"]["value"] == 4
    assert report["checks"]["memory"]["value"] > 0


def test_memory_thresholds_grade_and_feed_the_controller(make_processor, caplog):
    p = make_processor(lambda b: b, memory_warning_threshold=50.0,
                       memory_critical_threshold=70.0, initial_batch_size=64)
    monitor = p._health
    monitor.memory_probe = FakeProbe(60.0)
    with caplog.at_level(logging.WARNING, logger="batchproc"):
        report = monitor.check_and_act()
    assert report["checks"]["memory"]["status"] == "warning"
    assert report["status"] == "degraded"
    assert p._controller.memory_level == MEMORY_WARNING
    assert any("memory" in r.getMessage() for r in caplog.records)
    monitor.memory_probe = FakeProbe(75.0)
    assert monitor.check_and_act()["status"] == "unhealthy"
    assert p._controller.memory_level == MEMORY_CRITICAL
    assert p.current_batch_size == 1
    monitor.memory_probe = FakeProbe(10.0)
    assert monitor.check_and_act()["status"] == "healthy"
    assert p._controller.memory_level == MEMORY_OK


def test_psutil_failure_reads_as_unknown_and_never_breaks(make_processor, monkeypatch,
                                                           caplog):
    def broken(*args, **kwargs):
        raise psutil.AccessDenied(pid=1)

    monkeypatch.setattr(psutil.Process, "memory_info", broken)
    p = make_processor(lambda b: b)
    p._health.memory_probe._process = None
    with caplog.at_level(logging.WARNING, logger="batchproc"):
        report = p._health.check_and_act()
    assert report["checks"]["memory"]["status"] == "unknown"
    assert report["status"] == "degraded"
    assert any("psutil" in r.getMessage() for r in caplog.records)
    assert p.enqueue_predict(np.array([1])).result(timeout=10)[0] == 1


def test_queue_thresholds(make_processor):
    p = make_processor(lambda b: b, queue_warning_threshold=3, queue_critical_threshold=6)
    p.pause()
    for i in range(4):
        p.enqueue_predict(np.array([i]))
    assert p.health()["checks"]["queue"]["status"] == "warning"
    for i in range(3):
        p.enqueue_predict(np.array([i]))
    report = p.health()
    assert report["checks"]["queue"]["status"] == "critical"
    assert report["checks"]["queue"]["value"] == 7
    p.resume()


def test_a_small_queue_is_graded_by_thresholds_derived_from_its_size(make_processor):
    # max_queue_size=10 with the thresholds left alone: warning at 5, critical at 8 (half
    # and 80% of it), not the 500 and 800 of a queue of 1000 that this one never reaches.
    p = make_processor(lambda b: b, max_queue_size=10)
    p.pause()
    for i in range(5):
        p.enqueue_predict(np.array([i]))
    queue = p.health()["checks"]["queue"]
    assert (queue["warning"], queue["critical"], queue["status"]) == (5, 8, "warning")
    for i in range(3):
        p.enqueue_predict(np.array([i]))
    assert p.health()["checks"]["queue"]["status"] == "critical"
    p.resume()


def test_periodic_checks_reach_the_metrics_collector(make_processor):
    got = threading.Event()
    reports = []

    class Collector:
        def record_health(self, report):
            reports.append(report)
            got.set()

    make_processor(lambda b: b, metrics_collector=Collector(), health_check_interval=0.05)
    assert got.wait(10)
    assert reports[0]["status"] in ("healthy", "degraded", "unhealthy")


def test_periodic_checks_come_every_interval_even_below_half_a_second(make_processor):
    # The supervisor's tick followed item_timeout alone (at most 0.5 s): with the default
    # item_timeout, checks asked for every 0.05 s came every 0.5 s.
    times = []
    eleven = threading.Event()

    class Collector:
        def record_health(self, report):
            times.append(time.monotonic())
            if len(times) == 11:
                eleven.set()

    make_processor(lambda b: b, metrics_collector=Collector(), health_check_interval=0.05)
    assert eleven.wait(30)
    # Ten intervals: 0.5 s, give or take a tick (0.05 s), and whatever a busy machine
    # adds; at a 0.5 s tick at least 5 s.
    assert 0.4 < times[10] - times[0] < 4.0


def test_no_monitor_checks_when_health_monitoring_is_off(make_processor):
    calls = []

    class Collector:
        def record_health(self, report):
            calls.append(report)

    p = make_processor(metrics_collector=Collector(), enable_health_monitoring=False)
    # The config refuses this pair; forced into the processor's read-only copy, a check
    # would be due at once if the switch were ignored.
    object.__setattr__(p.config, "health_check_interval", 0.01)
    p.start(lambda b: b)
    assert p.enqueue_predict(np.array([1])).result(timeout=10)[0] == 1
    p.stop()
    assert calls == []
    assert p.health()["status"]  # on-demand reports still work

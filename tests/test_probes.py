"""health() for probes: readiness and liveness through the processor's life, and memory
graded against the container's limit (fake cgroup directories)."""

import threading
import time

import pytest

from batchproc import BatchProcessorConfig
from batchproc.controller import MEMORY_CRITICAL, Controller
from batchproc.health import CgroupMemory, HealthMonitor, MemoryProbe
from batchproc.metrics import MetricsSink

HANG = 10.0
GiB = 1 << 30
MiB = 1 << 20


class FakeProbe:
    def __init__(self, percent=10.0):
        self.percent = percent

    def read(self):
        return {"rss_bytes": 1.0, "percent": self.percent, "system_percent": self.percent}


def wait_for(predicate, what):
    """Poll a state the test is waiting for, bounded by HANG."""
    deadline = time.monotonic() + HANG
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def probe_view(report):
    return report["state"], report["ready"], report["live"], report["status"]


# ----------------------------------------------------------------- readiness and liveness


def test_ready_only_while_running_and_not_paused(make_processor):
    p = make_processor(max_workers=2)
    p._health.memory_probe = FakeProbe(10.0)
    assert probe_view(p.health()) == ("new", False, True, "unhealthy")
    p.start(lambda batch: batch)
    assert probe_view(p.health()) == ("running", True, True, "healthy")
    p.pause()
    assert probe_view(p.health()) == ("paused", False, True, "degraded")
    p.resume()
    assert probe_view(p.health()) == ("running", True, True, "healthy")
    p.stop()
    assert probe_view(p.health()) == ("stopped", False, True, "unhealthy")


def test_existing_report_keys_stay(make_processor):
    report = make_processor(lambda batch: batch).health()
    assert {"status", "timestamp", "checks"} <= set(report)
    assert set(report["checks"]) == {"memory", "queue", "stuck_batches", "workers"}


def monitor(state="running", percent=10.0, workers=(2, 2), stuck=0, queue=0, **config):
    cfg = BatchProcessorConfig(max_workers=2, **config)
    return HealthMonitor(
        cfg, Controller(cfg), MetricsSink(None),
        queue_size=lambda: queue,
        stuck_batches=lambda: [{"worker": f"w{i}", "requests": 1, "running_for": 99.0,
                                "abandoned": True} for i in range(stuck)],
        workers=lambda: workers, memory_probe=FakeProbe(percent), state=lambda: state)


@pytest.mark.parametrize("kwargs, ready, live, status", [
    ({}, True, True, "healthy"),
    ({"percent": 85.0}, True, True, "degraded"),          # memory warning: still ready
    ({"percent": 95.0}, False, True, "unhealthy"),        # memory critical: shed load
    ({"queue": 900}, False, True, "unhealthy"),           # queue past critical
    ({"stuck": 1}, True, True, "degraded"),               # one stuck: the other serves
    ({"stuck": 2}, False, False, "unhealthy"),            # every worker stuck
    ({"workers": (1, 2)}, False, False, "unhealthy"),     # a worker missing
    ({"state": "paused", "stuck": 2}, False, False, "unhealthy"),
    ({"state": "stopping"}, False, True, "unhealthy"),
    ({"state": "forked"}, False, False, "unhealthy"),
])
def test_readiness_and_liveness_rules(kwargs, ready, live, status):
    report = monitor(**kwargs).check()
    assert (report["ready"], report["live"], report["status"]) == (ready, live, status)


def test_a_forked_report_reads_nothing_of_the_parents(make_processor):
    def untouchable():
        raise AssertionError("read in a forked child")

    cfg = BatchProcessorConfig()
    health = HealthMonitor(cfg, Controller(cfg), MetricsSink(None),
                           queue_size=untouchable, stuck_batches=untouchable,
                           workers=untouchable, memory_probe=FakeProbe(),
                           state=lambda: "forked")
    report = health.check()
    assert report["checks"]["workers"]["status"] == "critical"
    assert report["checks"]["queue"]["status"] == "unknown"


def test_every_worker_stuck_past_item_timeout_is_not_live(make_processor):
    release = threading.Event()

    def model(batch):
        release.wait(HANG)
        return batch

    p = make_processor(model, max_workers=1, item_timeout=0.05, max_batch_size=1)
    p._health.memory_probe = FakeProbe()
    stuck = p.enqueue_predict([1])
    stuck.exception(timeout=HANG)  # abandoned: its thread is still inside the model
    report = p.health()
    assert report["checks"]["stuck_batches"]["value"] == 1
    assert (report["ready"], report["live"]) == (False, False)
    release.set()
    wait_for(lambda: p.health()["live"], "the stuck call to return")
    assert p.health()["ready"]


def test_calls_stuck_on_their_own_requests_leave_it_live_while_others_return(
        make_processor):
    # A request that hangs alone leaves its thread stuck; the worker that took its place
    # still answers the others: the process can serve, so a liveness probe must not
    # restart it. Only when nothing has returned since the newest stuck call began (a
    # wedged device) is it not live.
    release = threading.Event()

    def model(batch):
        if batch[0] == "hang":
            release.wait(HANG)
        return batch

    p = make_processor(model, max_workers=1, item_timeout=0.05, max_batch_size=1)
    p._health.memory_probe = FakeProbe()
    try:
        p.enqueue_predict("hang").exception(timeout=HANG)  # abandoned: its thread stuck
        assert p.health()["live"] is False  # nothing has returned since it began
        assert p.enqueue_predict("ok").result(timeout=HANG) == "ok"
        report = p.health()
        stuck = report["checks"]["stuck_batches"]
        assert (stuck["value"], stuck["calls_returned_since"]) == (1, True)
        assert (report["ready"], report["live"], stuck["status"]) == (True, True, "warning")
        p.enqueue_predict("hang").exception(timeout=HANG)  # the next call hangs too
        report = p.health()
        stuck = report["checks"]["stuck_batches"]
        assert (stuck["value"], stuck["calls_returned_since"]) == (2, False)
        assert report["live"] is False
    finally:
        release.set()
    wait_for(lambda: p.health()["live"], "the stuck calls to return")


def test_a_request_that_hangs_alone_leaves_it_ready_while_the_others_are_served(
        make_processor):
    # One hung request must not take the process out of its load balancer's rotation
    # while its other workers serve the rest: the stuck call is a warning, not critical.
    release = threading.Event()

    def model(batch):
        if "poison" in batch:
            release.wait(HANG)
        return batch

    p = make_processor(model, max_workers=4, item_timeout=0.3)
    p._health.memory_probe = FakeProbe()
    try:
        p.enqueue_predict("poison").exception(timeout=HANG)  # abandoned: its thread stuck
        futures = [p.enqueue_predict(f"r{i}") for i in range(15)]
        assert [f.result(timeout=HANG) for f in futures] == [f"r{i}" for i in range(15)]
        report = p.health()
        stuck = report["checks"]["stuck_batches"]
        assert (stuck["value"], stuck["status"]) == (1, "warning")
        assert probe_view(report) == ("running", True, True, "degraded")
    finally:
        release.set()
    wait_for(lambda: p.health()["status"] == "healthy", "the stuck call to return")


def _fails_on_bad(batch):
    if "bad" in batch:
        raise ValueError("bad item")
    return batch


@pytest.mark.parametrize("after", ["a delivery", "a failure search"])
def test_a_done_callback_that_blocks_its_worker_past_item_timeout_is_a_stuck_batch(
        make_processor, after):
    # The worker completing a batch's futures runs their done-callbacks: one that blocks
    # holds it outside process_func, as surely as a call that hangs, and nothing
    # abandons it. With max_workers=1 nothing more is served: neither ready nor live.
    # A search runs the callbacks of the parts it delivered once its calls are over,
    # outside any delivery: one that blocked there went unseen (healthy, live, ready).
    entered, block = threading.Event(), threading.Event()

    def blocking(future):
        entered.set()
        block.wait(HANG)

    p = make_processor(_fails_on_bad, max_workers=1, item_timeout=0.3, max_retries=0)
    p._health.memory_probe = FakeProbe()
    p.pause()  # the callback is added before the future can complete
    p.enqueue_predict("first").add_done_callback(blocking)
    if after == "a failure search":
        bad = p.enqueue_predict("bad")
    p.resume()
    try:
        assert entered.wait(HANG)
        if after == "a failure search":
            assert isinstance(bad.exception(timeout=HANG), ValueError)
        later = p.enqueue_predict("later")
        wait_for(lambda: p.health()["checks"]["stuck_batches"]["value"] == 1,
                 "the callback to run past item_timeout")
        report = p.health()
        [batch] = report["checks"]["stuck_batches"]["batches"]
        assert (batch["delivering"], batch["abandoned"]) == (True, False)
        assert report["checks"]["stuck_batches"]["status"] == "critical"
        assert probe_view(report) == ("running", False, False, "unhealthy")
        assert not later.done()
    finally:
        block.set()
    assert later.result(timeout=HANG) == "later"
    wait_for(lambda: p.health()["status"] == "healthy", "the callback to end")


# ----------------------------------------------------------------- cgroup memory


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_cgroup(root, path, max_, current, inactive=0):
    d = root / path.strip("/") if path.strip("/") else root
    write(d / "memory.max", f"{max_}\n")
    write(d / "memory.current", f"{current}\n")
    write(d / "memory.stat", f"anon {current}\nfile 0\ninactive_file {inactive}\n"
                             "active_file 0\n")


def test_cgroup_v2_limit_and_working_set(tmp_path):
    write(tmp_path / "cgroup.controllers", "cpu memory pids\n")
    write(tmp_path / "self_cgroup", "0::/\n")
    v2_cgroup(tmp_path, "/", GiB, 768 * MiB, inactive=256 * MiB)
    reading = CgroupMemory(tmp_path, tmp_path / "self_cgroup").read()
    # The page cache the kernel would reclaim first does not count (the kubelet's rule).
    assert reading == {"usage_bytes": 512 * MiB, "limit_bytes": GiB, "percent": 50.0,
                       "source": "cgroup v2"}


def test_cgroup_v2_the_limit_nearest_to_being_reached_counts(tmp_path):
    write(tmp_path / "cgroup.controllers", "memory\n")
    write(tmp_path / "self_cgroup", "0::/kubepods/pod1/ctr\n")
    v2_cgroup(tmp_path, "/kubepods/pod1/ctr", 2 * GiB, GiB)             # 50%
    v2_cgroup(tmp_path, "/kubepods/pod1", "max", GiB)                   # no limit
    v2_cgroup(tmp_path, "/kubepods", 4 * GiB, 3 * GiB + 614 * MiB)      # ~90%
    reading = CgroupMemory(tmp_path, tmp_path / "self_cgroup").read()
    assert reading["limit_bytes"] == 4 * GiB
    assert reading["percent"] == pytest.approx(100.0 * (3 * GiB + 614 * MiB) / (4 * GiB))


def test_cgroup_headroom_is_the_fewest_bytes_left_at_any_level(tmp_path):
    # The nearest limit in percent is not the one with the least room in bytes: a
    # container at 95% of 2 GiB has 0.1 GiB left, its pod at 99% of 1 TiB 10 GiB.
    write(tmp_path / "cgroup.controllers", "memory\n")
    write(tmp_path / "self_cgroup", "0::/pod/ctr\n")
    v2_cgroup(tmp_path, "/pod/ctr", 2 * GiB, 2 * GiB - 100 * MiB)
    v2_cgroup(tmp_path, "/pod", 1024 * GiB, 1014 * GiB)
    memory = CgroupMemory(tmp_path, tmp_path / "self_cgroup")
    assert memory.read()["limit_bytes"] == 1024 * GiB  # nearest to being reached
    assert memory.headroom() == 100 * MiB
    write(tmp_path / "pod" / "ctr" / "memory.max", "max\n")
    assert memory.headroom() == 10 * GiB
    assert CgroupMemory(tmp_path / "missing", tmp_path / "self_cgroup").headroom() is None


def test_cgroup_v2_without_a_limit_reads_as_none(tmp_path):
    write(tmp_path / "cgroup.controllers", "memory\n")
    write(tmp_path / "self_cgroup", "0::/\n")
    v2_cgroup(tmp_path, "/", "max", GiB)
    assert CgroupMemory(tmp_path, tmp_path / "self_cgroup").read() is None


def test_cgroup_v1_in_a_container_reads_the_mount_root(tmp_path):
    # Without a cgroup namespace /proc/self/cgroup names the host's path, which does not
    # exist inside the container's mount: the mount's root is the container's cgroup.
    write(tmp_path / "self_cgroup", "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    base = tmp_path / "memory"
    write(base / "memory.limit_in_bytes", f"{GiB}\n")
    write(base / "memory.usage_in_bytes", f"{900 * MiB}\n")
    write(base / "memory.stat", f"inactive_file 1\ntotal_inactive_file {100 * MiB}\n")
    reading = CgroupMemory(tmp_path, tmp_path / "self_cgroup").read()
    assert reading == {"usage_bytes": 800 * MiB, "limit_bytes": GiB,
                       "percent": 100.0 * 800 / 1024, "source": "cgroup v1"}


def test_cgroup_v1_unlimited_reads_as_none(tmp_path):
    write(tmp_path / "self_cgroup", "4:memory:/\n")
    write(tmp_path / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp_path / "memory" / "memory.usage_in_bytes", f"{GiB}\n")
    assert CgroupMemory(tmp_path, tmp_path / "self_cgroup").read() is None


def test_no_cgroup_filesystem_reads_as_none(tmp_path):
    assert CgroupMemory(tmp_path / "absent", tmp_path / "absent_too").read() is None


def test_unreadable_cgroup_files_read_as_none(tmp_path):
    write(tmp_path / "cgroup.controllers", "memory\n")
    write(tmp_path / "self_cgroup", "0::/\n")
    v2_cgroup(tmp_path, "/", GiB, "not a number")
    assert CgroupMemory(tmp_path, tmp_path / "self_cgroup").read() is None


def test_memory_is_graded_against_the_container_limit(make_processor, tmp_path):
    write(tmp_path / "cgroup.controllers", "memory\n")
    write(tmp_path / "self_cgroup", "0::/\n")
    v2_cgroup(tmp_path, "/", GiB, 800 * MiB)  # 78%: past warning (50), short of critical
    p = make_processor(lambda batch: batch, memory_warning_threshold=50.0,
                       memory_critical_threshold=90.0, initial_batch_size=64)
    p._health.memory_probe = MemoryProbe(tmp_path, tmp_path / "self_cgroup")
    memory = p.health()["checks"]["memory"]
    assert memory["status"] == "warning" and memory["source"] == "cgroup v2"
    assert memory["value"] == pytest.approx(100.0 * 800 / 1024, abs=1e-3)
    assert (memory["usage_bytes"], memory["limit_bytes"]) == (800 * MiB, GiB)
    assert memory["rss_bytes"] > 0  # the process's own memory, from psutil, still there
    v2_cgroup(tmp_path, "/", GiB, 1000 * MiB)
    report = p._health.check_and_act()
    assert report["checks"]["memory"]["status"] == "critical"
    assert not report["ready"]
    assert p._controller.memory_level == MEMORY_CRITICAL


def test_without_a_cgroup_limit_memory_is_a_share_of_the_machine(make_processor, tmp_path):
    p = make_processor(lambda batch: batch)
    p._health.memory_probe = MemoryProbe(tmp_path, tmp_path / "self_cgroup")
    memory = p.health()["checks"]["memory"]
    assert memory["source"] == "system" and "limit_bytes" not in memory
    assert 0 < memory["value"] < 100


# ------------------------------------------------------------------ usable CPUs
# (workers spin for the next request only where two CPUs' worth of time is theirs)


def test_usable_cpus_take_the_tightest_cgroup_v2_quota(tmp_path, monkeypatch):
    from batchproc.engine import cpus

    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(8)))
    write(tmp_path / "cgroup.controllers", "cpu memory\n")
    write(tmp_path / "self_cgroup", "0::/kubepods/pod1/ctr\n")
    write(tmp_path / "kubepods/pod1/ctr/cpu.max", "max 100000\n")
    write(tmp_path / "kubepods/pod1/cpu.max", "150000 100000\n")  # the pod: 1.5 CPUs
    write(tmp_path / "kubepods/cpu.max", "400000 100000\n")
    assert cpus.usable_cpus(tmp_path, tmp_path / "self_cgroup") == 1.5
    write(tmp_path / "kubepods/pod1/cpu.max", "max 100000\n")
    assert cpus.usable_cpus(tmp_path, tmp_path / "self_cgroup") == 4.0
    write(tmp_path / "kubepods/cpu.max", "max 100000\n")
    assert cpus.usable_cpus(tmp_path, tmp_path / "self_cgroup") == 8.0  # the affinity


def test_usable_cpus_read_a_cgroup_v1_quota_in_a_container(tmp_path, monkeypatch):
    from batchproc.engine import cpus

    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    write(tmp_path / "self_cgroup", "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "100000\n")  # the mount's root: its own
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cpus.usable_cpus(tmp_path, tmp_path / "self_cgroup") == 1.0
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1\n")  # no quota
    assert cpus.usable_cpus(tmp_path, tmp_path / "self_cgroup") == 4.0


def test_usable_cpus_without_a_readable_quota_are_the_affinity(tmp_path, monkeypatch):
    from batchproc.engine import cpus

    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpus.usable_cpus(tmp_path / "absent", tmp_path / "absent_too") == 2.0
    write(tmp_path / "cgroup.controllers", "cpu\n")
    write(tmp_path / "self_cgroup", "0::/\n")
    write(tmp_path / "cpu.max", "lots 100000\n")
    assert cpus.usable_cpus(tmp_path, tmp_path / "self_cgroup") == 2.0

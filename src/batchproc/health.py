"""Health: memory, queue growth, stuck batches and workers, checked periodically.

``HealthMonitor.check()`` builds a report a service can serve from its health endpoint,
with readiness and liveness for probes; ``HealthMonitor.check_and_act()`` (run by the
processor's supervisor thread every ``health_check_interval``) also logs and feeds memory
pressure to the controller: warning caps batches at half the optimal size, critical
shrinks them to the minimum and runs a full garbage collection there, off the request
path.

Memory is graded against the container's limit where there is one (``CgroupMemory``: the
cgroup v2 or v1 files), else against the machine's memory.
"""

from __future__ import annotations

import gc
import logging
import os
import pathlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psutil

from .config import BatchProcessorConfig
from .controller import MEMORY_CRITICAL, MEMORY_OK, MEMORY_WARNING, Controller
from .metrics import MetricsSink

logger = logging.getLogger(__name__)

OK, WARNING, CRITICAL, UNKNOWN = "ok", "warning", "critical", "unknown"
_SEVERITY = {OK: 0, UNKNOWN: 1, WARNING: 1, CRITICAL: 2}
_OVERALL = {0: "healthy", 1: "degraded", 2: "unhealthy"}

# A processor's state, as the report names it.
NEW, RUNNING, PAUSED, STOPPING, STOPPED, FORKED = (
    "new", "running", "paused", "stopping", "stopped", "forked")
_NOT_SERVING = (NEW, STOPPING, STOPPED, FORKED)
_FORKED_DETAIL = "inherited by a forked process: the queue and workers are the parent's"

# cgroup v1 writes "no limit" as a huge number (a page counter's maximum), not as "max".
_V1_UNLIMITED = 1 << 60


class CgroupMemory:
    """The memory limit of this process's container (its cgroup) and the memory counted
    against it, read from the cgroup filesystem under ``root``: v2 (``memory.max``,
    ``memory.current``) or else v1 (``memory.limit_in_bytes``, ``memory.usage_in_bytes``).

    Usage is the working set, as the kubelet counts it: usage less the inactive file
    cache (``inactive_file`` in ``memory.stat``), which the kernel reclaims before it
    kills anything. The process's cgroup comes from ``proc_cgroup``; its directory and
    each ancestor with a limit are read, and the limit nearest to being reached counts.
    In a container whose own cgroup is mounted as the root, ``root`` itself is read.
    Both paths are parameters so that a test can use a fake cgroup directory.
    """

    def __init__(self, root: str | os.PathLike[str] = "/sys/fs/cgroup",
                 proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup") -> None:
        self.root = pathlib.Path(root)
        self.proc_cgroup = pathlib.Path(proc_cgroup)

    def read(self) -> dict[str, Any] | None:
        """``{"usage_bytes", "limit_bytes", "percent", "source"}`` of the limit nearest to
        being reached (``source``: "cgroup v2" or "cgroup v1"), or None when no limit is
        set or there is no cgroup filesystem to read. Never raises."""
        levels = self._levels()
        if not levels:
            return None
        limit, working, source = max(levels, key=lambda level: level[1] / level[0])
        return {"usage_bytes": working, "limit_bytes": limit,
                "percent": 100.0 * working / limit, "source": source}

    def headroom(self) -> int | None:
        """The fewest bytes left under any limit of this process's cgroup and its
        ancestors (a level nearer its limit in percent may have more room in bytes), or
        None as for ``read``. Never raises."""
        levels = self._levels()
        if not levels:
            return None
        return max(0, min(limit - working for limit, working, _ in levels))

    def _levels(self) -> list[tuple[int, int, str]]:
        """``(limit, working set, source)`` in bytes of each level with a limit, nearest
        first; empty when there is none or nothing to read."""
        try:
            if (self.root / "cgroup.controllers").is_file():
                return self._read(self.root, self._own_path(v1=False), "cgroup v2",
                                  "memory.max", "memory.current", ("inactive_file",))
            base = self.root / "memory"
            if (base / "memory.limit_in_bytes").is_file():
                return self._read(base, self._own_path(v1=True), "cgroup v1",
                                  "memory.limit_in_bytes", "memory.usage_in_bytes",
                                  ("total_inactive_file", "inactive_file"))
        except (OSError, ValueError):
            logger.debug("could not read the cgroup memory files", exc_info=True)
        return []

    def _own_path(self, v1: bool) -> str:
        return cgroup_path(self.proc_cgroup, "memory" if v1 else None)

    def _read(self, base: pathlib.Path, path: str, source: str, limit_file: str,
              usage_file: str, inactive_keys: tuple[str, ...]) -> list[tuple[int, int, str]]:
        levels = []
        for directory in cgroup_dirs(base, path):
            limit = _limit(directory / limit_file)
            if limit is not None:
                usage = int((directory / usage_file).read_text())
                working = max(0, usage - _stat(directory / "memory.stat", inactive_keys))
                levels.append((limit, working, source))
        return levels


def cgroup_path(proc_cgroup: pathlib.Path, v1_controller: str | None) -> str:
    """This process's cgroup path from ``proc_cgroup`` (``/proc/self/cgroup``): v2's
    (the "0::" line) for ``None``, else that v1 controller's; "/" when not found."""
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return "/"
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if v1_controller is not None and v1_controller in controllers.split(","):
            return path
        if v1_controller is None and hierarchy == "0" and not controllers:
            return path
    return "/"


def cgroup_dirs(base: pathlib.Path, path: str) -> list[pathlib.Path]:
    """The directories of the cgroup at ``path`` under the mount ``base`` and of each
    ancestor up to ``base``, nearest first (a limit set on any of them applies)."""
    own = base / path.strip("/")
    if not own.is_dir() or base not in (own, *own.parents):
        own = base  # a container's cgroup namespace: its cgroup is the mount's root
    dirs = [own]
    while dirs[-1] != base:
        dirs.append(dirs[-1].parent)
    return dirs


def _limit(path: pathlib.Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None  # the root cgroup has no limit file
    if text == "max":
        return None
    limit = int(text)
    return limit if 0 < limit < _V1_UNLIMITED else None


def _stat(path: pathlib.Path, keys: tuple[str, ...]) -> int:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    values = dict(line.split(maxsplit=1) for line in text.splitlines() if " " in line)
    for key in keys:
        if key in values:
            return int(values[key])
    return 0


class MemoryProbe:
    """Reads memory for the health check: this process's resident memory through
    psutil, graded against the container's limit (``CgroupMemory``) where there is one,
    else against the machine's memory. A failing psutil reads as None (unknown).

    ``cgroup_root`` and ``proc_cgroup`` locate the cgroup files (tests pass a fake
    directory).
    """

    def __init__(self, cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
                 proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup") -> None:
        self._process: psutil.Process | None = None
        self.cgroup = CgroupMemory(cgroup_root, proc_cgroup)

    def read(self) -> dict[str, Any] | None:
        """``percent`` (of the container's limit, else of the machine's memory),
        ``rss_bytes``, ``system_percent``, ``source`` ("cgroup v2", "cgroup v1" or
        "system") and, under a cgroup limit, ``usage_bytes`` and ``limit_bytes``."""
        try:
            # A forked child must not read its parent's process.
            if self._process is None or self._process.pid != os.getpid():
                self._process = psutil.Process()
            info = self._process.memory_info()
            system = psutil.virtual_memory()
        except Exception:
            logger.warning("psutil could not read memory; memory check is unknown",
                           exc_info=True)
            self._process = None
            return None
        reading: dict[str, Any] = {
            "rss_bytes": float(info.rss),
            "percent": 100.0 * info.rss / system.total if system.total else 0.0,
            "system_percent": float(system.percent),
            "source": "system",
        }
        container = self.cgroup.read()
        if container is not None:
            reading.update(container)
        return reading


def _grade(value: float, warning: float, critical: float) -> str:
    if value >= critical:
        return CRITICAL
    if value >= warning:
        return WARNING
    return OK


class HealthMonitor:
    """Builds health reports and acts on them. Thread-safe enough: one supervisor calls
    ``check_and_act``; ``check`` may be called from any thread at the same time."""

    def __init__(
        self,
        config: BatchProcessorConfig,
        controller: Controller,
        metrics: MetricsSink,
        *,
        queue_size: Callable[[], int],
        stuck_batches: Callable[[], list[dict[str, Any]]],
        workers: Callable[[], tuple[int, int]],
        stuck_callbacks: Callable[[], list[dict[str, Any]]] = lambda: [],
        returned_call_began: Callable[[], float] = lambda: 0.0,
        memory_probe: MemoryProbe | None = None,
        state: Callable[[], str] = lambda: RUNNING,
    ) -> None:
        self._config = config
        self._controller = controller
        self._metrics = metrics
        self._queue_size = queue_size
        self._stuck_batches = stuck_batches
        self._stuck_callbacks = stuck_callbacks
        self._returned_call_began = returned_call_began
        self._workers = workers
        self._state = state
        self.memory_probe = memory_probe or MemoryProbe()
        # Queue sizes at recent checks, to tell a queue that keeps growing.
        self._queue_history: deque[int] = deque(maxlen=4)
        self._last_status: dict[str, str] = {}

    def check(self) -> dict[str, Any]:
        """The report ``BatchProcessor.health()`` returns (its docstring has the keys)."""
        cfg = self._config
        state = self._state()
        checks: dict[str, dict[str, Any]] = {}

        memory = self.memory_probe.read()
        if memory is None:
            checks["memory"] = {"status": UNKNOWN, "value": None,
                                "detail": "psutil could not read process memory"}
        else:
            checks["memory"] = {
                "status": _grade(memory["percent"], cfg.memory_warning_threshold,
                                 cfg.memory_critical_threshold),
                "value": round(memory["percent"], 3),
                "rss_bytes": int(memory["rss_bytes"]),
                "system_percent": memory["system_percent"],
                "source": memory.get("source", "system"),
                "warning": cfg.memory_warning_threshold,
                "critical": cfg.memory_critical_threshold,
            }
            if "limit_bytes" in memory:
                checks["memory"]["usage_bytes"] = int(memory["usage_bytes"])
                checks["memory"]["limit_bytes"] = int(memory["limit_bytes"])

        if state == FORKED:
            # Behind locks that a thread of the parent may have held at the fork: unread.
            checks["queue"] = {"status": UNKNOWN, "value": None, "detail": _FORKED_DETAIL}
            checks["stuck_batches"] = {"status": UNKNOWN, "value": None,
                                       "detail": _FORKED_DETAIL}
            checks["workers"] = {"status": CRITICAL, "value": 0,
                                 "expected": cfg.max_workers, "detail": _FORKED_DETAIL}
        else:
            self._check_work(checks)

        worst = max(_SEVERITY[c["status"]] for c in checks.values())
        if state in _NOT_SERVING:
            worst = 2
        elif state == PAUSED:
            worst = max(worst, 1)
        # Live: this processor can still serve (or recover) in this process. Not when
        # forked, when workers are missing, or when the stuck batches are critical (see
        # _check_work: the model answers nothing, a wedged device).
        live = state != FORKED and (
            state not in (RUNNING, PAUSED)
            or (checks["workers"]["status"] == OK
                and checks["stuck_batches"]["status"] != CRITICAL))
        ready = state == RUNNING and live and worst < 2
        return {"status": _OVERALL[worst], "ready": ready, "live": live, "state": state,
                "timestamp": time.time(), "checks": checks}

    def _check_work(self, checks: dict[str, dict[str, Any]]) -> None:
        cfg = self._config
        size = self._queue_size()
        history = [*self._queue_history, size]
        growing = len(history) >= 3 and all(b > a for a, b in zip(history, history[1:]))
        queue_status = _grade(size, cfg.queue_warning_threshold, cfg.queue_critical_threshold)
        if growing and queue_status == OK and size > cfg.queue_warning_threshold // 2:
            queue_status = WARNING
        checks["queue"] = {"status": queue_status, "value": size, "growing": growing,
                           "warning": cfg.queue_warning_threshold,
                           "critical": cfg.queue_critical_threshold}

        stuck = self._stuck_batches()
        # Asked after the stuck batches: a call that returned in between is not missed.
        began = self._returned_call_began()
        newest = time.monotonic() - min((b["running_for"] for b in stuck), default=0.0)
        returned = bool(stuck) and began > newest
        # Critical only when it cannot serve: as many stuck as workers and no call begun
        # after the newest of them has returned. Requests that hang alone leave the
        # others served (each stuck call's worker is replaced): a warning, still ready.
        status = OK
        if stuck:
            status = WARNING if len(stuck) < cfg.max_workers or returned else CRITICAL
        # Done-callbacks of requests the supervisor failed, blocking on the callbacks
        # thread (engine/callbacks.py): shown as a delivery is, a warning only, as they
        # hold no worker.
        aside = self._stuck_callbacks()
        if aside and status == OK:
            status = WARNING
        checks["stuck_batches"] = {"status": status, "value": len(stuck) + len(aside),
                                   "batches": stuck + aside,
                                   "item_timeout": cfg.item_timeout,
                                   "calls_returned_since": returned}

        alive, expected = self._workers()
        checks["workers"] = {"status": OK if alive >= expected else CRITICAL,
                             "value": alive, "expected": expected}

    def check_and_act(self) -> dict[str, Any]:
        report = self.check()
        checks = report["checks"]
        self._queue_history.append(checks["queue"]["value"])

        memory_status = checks["memory"]["status"]
        if memory_status != UNKNOWN:
            level = {OK: MEMORY_OK, WARNING: MEMORY_WARNING, CRITICAL: MEMORY_CRITICAL}
            self._controller.set_memory_level(level[memory_status])
            if memory_status == CRITICAL and self._config.enable_memory_optimization:
                gc.collect()
        for name, check in checks.items():
            self._log_transition(name, check)
        self._metrics.health(report)
        return report

    def _log_transition(self, name: str, check: dict[str, Any]) -> None:
        status = check["status"]
        previous = self._last_status.get(name, OK)
        self._last_status[name] = status
        if status == previous:
            return
        detail = {k: v for k, v in check.items() if k not in ("status", "batches")}
        if status == CRITICAL:
            logger.error("health %s is critical: %s", name, detail)
        elif status in (WARNING, UNKNOWN):
            logger.warning("health %s is %s: %s", name, status, detail)
        else:
            logger.info("health %s is back to ok: %s", name, detail)

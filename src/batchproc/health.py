"""Health: process memory, queue growth, stuck batches and workers, checked periodically.

``HealthMonitor.check()`` builds a report a service can serve from its health endpoint;
``HealthMonitor.check_and_act()`` (run by the processor's supervisor thread every
``health_check_interval``) also logs and feeds memory pressure to the controller:
warning caps batches at half the optimal size, critical shrinks them to the minimum and
runs a full garbage collection there, off the request path.
"""

from __future__ import annotations

import gc
import logging
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


class MemoryProbe:
    """Reads this process's memory through psutil; a failing psutil reads as None."""

    def __init__(self) -> None:
        self._process: psutil.Process | None = None

    def read(self) -> dict[str, float] | None:
        try:
            if self._process is None:
                self._process = psutil.Process()
            info = self._process.memory_info()
            total = psutil.virtual_memory().total
            system_percent = psutil.virtual_memory().percent
        except Exception:
            logger.warning("psutil could not read memory; memory check is unknown",
                           exc_info=True)
            self._process = None
            return None
        return {
            "rss_bytes": float(info.rss),
            "percent": 100.0 * info.rss / total if total else 0.0,
            "system_percent": float(system_percent),
        }


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
        memory_probe: MemoryProbe | None = None,
    ) -> None:
        self._config = config
        self._controller = controller
        self._metrics = metrics
        self._queue_size = queue_size
        self._stuck_batches = stuck_batches
        self._workers = workers
        self.memory_probe = memory_probe or MemoryProbe()
        # Queue sizes at recent checks, to tell a queue that keeps growing.
        self._queue_history: deque[int] = deque(maxlen=4)
        self._last_status: dict[str, str] = {}

    def check(self) -> dict[str, Any]:
        cfg = self._config
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
                "warning": cfg.memory_warning_threshold,
                "critical": cfg.memory_critical_threshold,
            }

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
        checks["stuck_batches"] = {"status": CRITICAL if stuck else OK, "value": len(stuck),
                                   "batches": stuck, "item_timeout": cfg.item_timeout}

        alive, expected = self._workers()
        checks["workers"] = {"status": OK if alive >= expected else CRITICAL,
                             "value": alive, "expected": expected}

        worst = max(_SEVERITY[c["status"]] for c in checks.values())
        return {"status": _OVERALL[worst], "timestamp": time.time(), "checks": checks}

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

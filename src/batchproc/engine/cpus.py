"""How many CPUs this process may use: its CPU affinity, capped by its container's CPU
quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; the
tightest of its cgroup and their ancestors). A pod limited to one CPU sees every CPU of
its node in its affinity, but runs one CPU's worth of time."""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Iterable

from ..health import cgroup_dirs, cgroup_path

logger = logging.getLogger(__name__)

# A thread busy-waits for another (a worker for requests, a caller for its result) only
# where that one can run meanwhile: with less than two CPUs' worth of time, the spin
# holds back what it waits for, or its quota pays for it.
SPIN_MIN_CPUS = 2.0


def spinning_pays(cpus: float) -> bool:
    """Whether busy-waiting may pay with ``cpus`` CPUs' worth of time (``usable_cpus``)."""
    return cpus >= SPIN_MIN_CPUS


def usable_cpus(root: str | os.PathLike[str] = "/sys/fs/cgroup",
                proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup") -> float:
    """CPUs' worth of time this process may use (a quota may be fractional: 1.5). Never
    raises; without a readable cgroup quota, the affinity (or the CPU count) alone."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        cpus = float(os.cpu_count() or 1)
    try:
        quota = _cgroup_quota(pathlib.Path(root), pathlib.Path(proc_cgroup))
    except (OSError, ValueError):
        logger.debug("could not read the cgroup CPU quota", exc_info=True)
        quota = None
    return cpus if quota is None else min(cpus, quota)


def _cgroup_quota(root: pathlib.Path, proc_cgroup: pathlib.Path) -> float | None:
    if (root / "cgroup.controllers").is_file():  # v2
        dirs = cgroup_dirs(root, cgroup_path(proc_cgroup, None))
        return _tightest(_v2_quota(d / "cpu.max") for d in dirs)
    for name in ("cpu", "cpu,cpuacct"):  # v1
        base = root / name
        if (base / "cpu.cfs_quota_us").is_file():
            dirs = cgroup_dirs(base, cgroup_path(proc_cgroup, "cpu"))
            return _tightest(_v1_quota(d) for d in dirs)
    return None


def _tightest(quotas: Iterable[float | None]) -> float | None:
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _v2_quota(path: pathlib.Path) -> float | None:
    try:
        quota, _, period = path.read_text().strip().partition(" ")
    except FileNotFoundError:
        return None  # the root cgroup has no cpu.max
    if quota == "max":
        return None
    return int(quota) / int(period or 100000)


def _v1_quota(directory: pathlib.Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except FileNotFoundError:
        return None
    return None if quota <= 0 or period <= 0 else quota / period

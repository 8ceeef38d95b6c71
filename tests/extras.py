"""Optional extras in the tests.

Without an extra, its tests are skipped; BATCHPROC_REQUIRE_EXTRAS=1 (CI sets it, having
installed them all) makes a missing one a failure, so a broken install cannot pass as
skipped tests.
"""

import contextlib
import fcntl
import importlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator

import pytest

REQUIRED = os.environ.get("BATCHPROC_REQUIRE_EXTRAS") == "1"

# The modules each extra of pyproject.toml brings, as the tests import them.
EXTRAS = {
    "prometheus": ["prometheus_client"],
    "service": ["fastapi", "uvicorn", "prometheus_client"],
    "ray": ["ray", "ray.serve"],
    "test": ["httpx", "mypy", "matplotlib", "rich", "threadpoolctl"],
}


def require(module, extra):
    """Import ``module`` (from ``extra``), or skip the calling test module without it."""
    if REQUIRED:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"needs the {extra} extra ({module})")


def missing(extra):
    """The first module of ``extra`` that is not installed, or None."""
    for module in EXTRAS[extra]:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return module
    return None


def skip_without(*extras):
    """Skip the calling test when an extra is missing (a failure under REQUIRED)."""
    for extra in extras:
        module = missing(extra)
        if module is not None:
            if REQUIRED:
                pytest.fail(f"BATCHPROC_REQUIRE_EXTRAS=1 but {module} ({extra}) is missing")
            pytest.skip(f"needs the {extra} extra ({module})")


@contextlib.contextmanager
def one_ray_cluster_at_a_time() -> Iterator[None]:
    """Hold the machine's lock for starting a local Ray cluster: two at once (tests in
    two pytest-xdist workers, or two test sessions) share its cores, and a Serve
    example's HTTP port, with each other. A lock on a file, so it holds across
    processes; the kernel drops it with the process that held it."""
    path = os.path.join(tempfile.gettempdir(), f"batchproc-tests-ray-{os.getuid()}.lock")
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield

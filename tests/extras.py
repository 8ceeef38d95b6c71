"""Optional extras in the tests.

Without an extra, its tests are skipped; BATCHPROC_REQUIRE_EXTRAS=1 (CI sets it, having
installed them all) makes a missing one a failure, so a broken install cannot pass as
skipped tests.
"""

import importlib
import importlib.util
import os

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

"""Shared test settings. Tests import the installed package, never src/."""

import os

from hypothesis import HealthCheck, settings

# Deterministic by default: the same examples on every run, no wall-clock deadlines
# (CI shares 2 cores with other work). BATCHPROC_HYPOTHESIS=explore searches afresh.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("BATCHPROC_HYPOTHESIS", "ci"))

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


import threading  # noqa: E402

import pytest  # noqa: E402

from batchproc import shielded  # noqa: E402

# The thread a process keeps parked for the exit hook (CPython 3.12+), started by the
# first processor: started here, so that the tests that look for threads a processor
# leaves behind see it as there before.
shielded.keep_standby()


@pytest.fixture
def make_processor():
    """Build processors that are always stopped at teardown, and check that no thread
    they started outlives them (a stuck test model is released by its own test)."""
    from batchproc import BatchProcessor, BatchProcessorConfig

    before = set(threading.enumerate())
    made = []

    def factory(process_func=None, metrics_collector=None, **config):
        processor = BatchProcessor(BatchProcessorConfig(**config), metrics_collector)
        made.append(processor)
        if process_func is not None:
            processor.start(process_func)
        return processor

    yield factory
    for processor in made:
        processor.stop(timeout=5.0)
    for processor in made:
        for thread in processor._threads():
            thread.join(timeout=5.0)
    leaked = [t for t in threading.enumerate()
              if t not in before and t.name.startswith("batchproc") and t.is_alive()]
    assert not leaked, f"threads left behind: {leaked}"


class Recorder:
    """A model wrapper that records every batch it is called with (copies)."""

    def __init__(self, func=lambda batch: batch):
        self.func = func
        self.batches = []
        self.lock = threading.Lock()

    def __call__(self, batch):
        import numpy as np

        with self.lock:
            self.batches.append(batch.copy() if isinstance(batch, np.ndarray) else list(batch))
        return self.func(batch)

    @property
    def sizes(self):
        with self.lock:
            return [len(b) for b in self.batches]


@pytest.fixture
def recorder():
    return Recorder

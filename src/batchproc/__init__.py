"""batchproc: a dynamic batching engine for ML inference with a compiled hot path.

Call ``enqueue_predict(item, priority=...)`` from any thread and get a
``concurrent.futures.Future``; requests are grouped into batches, your model runs once
per batch and each caller gets its own slice of the output.
"""

import logging

from .config import (
    BatchPriority,
    BatchProcessingStrategy,
    BatchProcessorConfig,
    PrioritizedItem,
)
from .errors import (
    BatchOutputError,
    BatchProcessorError,
    BatchTimeoutError,
    ConfigTypeError,
    ItemChangedError,
    ProcessorForkedError,
    ProcessorStoppedError,
    QueueFullError,
    QueueTimeoutError,
)
from .integrations.decorator import BatchedFunction, BatchedMethod, batch
from .metrics import MetricsCollector
from .processor import BatchProcessor
from .stats import BatchStats

# The one place the version is written: the build reads it from here for the package's
# metadata (pyproject.toml, tool.scikit-build.metadata.version).
__version__ = "0.1.0"

# The library logs to "batchproc.*" and never configures logging. Without this handler,
# an application that has not configured logging would get batchproc's warnings printed
# to stderr by logging's last-resort handler.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "BatchOutputError",
    "BatchPriority",
    "BatchProcessingStrategy",
    "BatchProcessor",
    "BatchProcessorConfig",
    "BatchProcessorError",
    "BatchStats",
    "BatchTimeoutError",
    "BatchedFunction",
    "BatchedMethod",
    "ConfigTypeError",
    "ItemChangedError",
    "MetricsCollector",
    "PrioritizedItem",
    "ProcessorForkedError",
    "ProcessorStoppedError",
    "QueueFullError",
    "QueueTimeoutError",
    "__version__",
    "batch",
]


def __getattr__(name: str) -> object:
    # Optional dependencies are imported on first use, never by ``import batchproc``.
    if name == "PrometheusMetrics":
        from .observe.prometheus import PrometheusMetrics

        return PrometheusMetrics
    raise AttributeError(f"module 'batchproc' has no attribute {name!r}")

"""One BLAS thread per call for the built-in ``mlp`` model while a command runs.

numpy's BLAS starts as many threads per matrix product as there are cores. A batcher
calls the model from several workers at once, so each call's threads compete with the
other calls' for the same cores: throughput then swings by an order of magnitude from
run to run. One thread per call lets the workers be the parallelism, as a service with
several model workers should be configured (docs/tuning.md).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

PINNED_MODELS = ("mlp",)

MISSING_NOTE = (
    "note: threadpoolctl is not installed, so numpy's BLAS runs each mlp call on every "
    "core and the figures may vary from run to run; pip install threadpoolctl, or run "
    "with OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1"
)


@contextlib.contextmanager
def one_blas_thread(model_name: str, prog: str) -> Iterator[None]:
    """Within the block, BLAS libraries run one thread per call if ``model_name`` is a
    built-in numpy model (threadpoolctl sets it for the process and restores it after).
    Without threadpoolctl, say once on stderr (prefixed with ``prog``) that figures may
    vary and how to pin the threads by hand. Other models are left as they are."""
    if model_name not in PINNED_MODELS:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(f"{prog}: {MISSING_NOTE}", file=sys.stderr)
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield

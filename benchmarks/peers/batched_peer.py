"""`batched` (PyPI): ``batched.BatchProcessor``, thread-based, used through its sync API.

``batched`` hands the batch function a list of items and expects a list back, so the
adapter concatenates the rows, calls the model once and slices the output — the same
work batchproc and the minimal batcher do. Closed-loop clients use the public blocking
call (``processor(item)``); the burst needs a future per request without blocking, and
``batched`` offers that only through ``BatchProcessor._schedule`` (what its own
``__call__`` and ``acall`` use), so the adapter calls it.

Its batch generator sleeps ``timeout_ms`` whenever fewer than ``batch_size`` requests
are queued, so a lone request always waits the full delay.
"""

from __future__ import annotations

import numpy as np

from batchproc.bench.targets import SyncTarget

from . import PeerUnavailable, split_rows

NAME = "batched"


class BatchedTarget(SyncTarget):
    name = NAME

    def __init__(self, max_batch: int, max_delay: float):
        self.max_batch = max_batch
        self.max_delay = max_delay

    def start(self, model):
        import batched

        def batch_fn(items):
            x = items[0] if len(items) == 1 else np.concatenate(items)
            return split_rows(model(x), items)

        self._p = batched.BatchProcessor(
            batch_fn, batch_size=self.max_batch, timeout_ms=self.max_delay * 1000.0
        )
        self._p.start()
        self._schedule = self._p._schedule

    def submit(self, item, priority):
        return self._schedule([item])[0].future

    def call(self, item, priority):
        return self._p(item)

    def stop(self):
        self._p.shutdown()


def make_target(max_batch: int, max_delay: float) -> BatchedTarget:
    try:
        import batched  # noqa: F401
    except ImportError as exc:
        raise PeerUnavailable(f"batched is not installed ({exc}); pip install batched") from None
    return BatchedTarget(max_batch, max_delay)

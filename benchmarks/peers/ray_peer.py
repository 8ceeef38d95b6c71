"""Ray Serve's ``@serve.batch`` decorator, used standalone in asyncio (no Ray cluster).

``serve.batch`` wraps an ``async def`` taking a list; callers ``await`` it with one item
each. The load generators drive it from one asyncio loop: closed-loop clients are
coroutines, a burst is one coroutine creating a task per request (see
``batchproc.bench.loads``) — its natural use, with no thread hop.

Standalone use: ``ray.serve.batch`` needs no ``ray.init()`` nor ``serve.start()`` (its
metrics are no-ops without a cluster), but Ray 2.4x+ looks up the replica's
``max_ongoing_requests`` when the batch queue is created, only to log a configuration
warning, and that lookup raises ``RayServeException`` outside a deployment. The adapter
replaces that one warning check (``_BatchQueue._warn_if_max_batch_size_exceeds_
max_ongoing_requests``) with a no-op; nothing on the request path is changed.

The model is called synchronously inside the async handler, as in a Serve replica whose
model is plain numpy: while it runs, the loop (and so every client) waits.
"""

from __future__ import annotations

import logging

import numpy as np

from . import PeerUnavailable, split_rows

NAME = "ray serve.batch"
log = logging.getLogger(__name__)


def _standalone_patch() -> str | None:
    """Disable the replica-context-only warning check; return what was done, if anything."""
    from ray.serve import batching

    cls = getattr(batching, "_BatchQueue", None)
    meth = "_warn_if_max_batch_size_exceeds_max_ongoing_requests"
    if cls is not None and hasattr(cls, meth):
        setattr(cls, meth, lambda self: None)
        return f"ray.serve.batching._BatchQueue.{meth} replaced by a no-op (needs a replica)"
    return None


class RayServeBatchTarget:
    name = NAME
    is_async = True

    def __init__(self, max_batch: int, max_delay: float):
        self.max_batch = max_batch
        self.max_delay = max_delay

    def start(self, model):
        from ray import serve

        # A fresh handler per run: its queue binds to the event loop of its first call.
        @serve.batch(max_batch_size=self.max_batch, batch_wait_timeout_s=self.max_delay)
        async def handle(items):
            x = items[0] if len(items) == 1 else np.concatenate(items)
            return split_rows(model(x), items)

        self._handle = handle

    async def acall(self, item, priority):
        return await self._handle(item)

    def stop(self):
        self._handle = None

    def stats(self):
        return {}


def make_target(max_batch: int, max_delay: float) -> RayServeBatchTarget:
    try:
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise PeerUnavailable(
            f"ray[serve] is not installed ({exc}); pip install 'ray[serve]'"
        ) from None
    note = _standalone_patch()
    if note:
        log.info("ray serve.batch standalone: %s", note)
    return RayServeBatchTarget(max_batch, max_delay)

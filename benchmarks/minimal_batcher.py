"""The minimal pure-Python batcher the peer comparison measures batchproc against.

It lives in the package, as :class:`batchproc.bench.minimal.MinimalBatcher`, so that
``batchproc bench`` and ``benchmarks/compare_peers.py`` use one copy; this module only
re-exports it. A deque and a ``threading.Condition``, one worker thread; a batch goes
when it is full or when its oldest request has waited ``max_delay`` seconds; ``submit``
returns a ``concurrent.futures.Future``.

    >>> import numpy as np
    >>> from minimal_batcher import MinimalBatcher
    >>> with MinimalBatcher(lambda x: x * 2, max_batch=64, max_delay=0.005) as b:
    ...     b.submit(np.ones((1, 4), np.float32)).result().tolist()
    [[2.0, 2.0, 2.0, 2.0]]
"""

from batchproc.bench.minimal import MinimalBatcher

__all__ = ["MinimalBatcher"]

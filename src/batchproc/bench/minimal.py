"""The minimal pure-Python dynamic batcher: the bar any serious library must clear.

A deque and a ``threading.Condition``, one worker thread. A batch is dispatched when it
is full (``max_batch`` rows) or when its oldest request has waited ``max_delay`` seconds.
Items are numpy arrays with a leading row axis; a batch is their concatenation and each
future gets its own rows of the output. About forty lines of logic, written the way a
competent engineer would write it in an afternoon — it is what ``batchproc`` is measured
against, so it is kept honest: no busy waiting, one notify per state change that matters.

``benchmarks/minimal_batcher.py`` re-exports this class; it is not written twice.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np


class MinimalBatcher:
    """``submit(item) -> Future``; one worker thread calls ``func(batch)`` per batch."""

    def __init__(
        self, func: Callable[[np.ndarray], Any], max_batch: int = 64, max_delay: float = 0.005
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_delay < 0:
            raise ValueError("max_delay must be >= 0")
        self.func = func
        self.max_batch = max_batch
        self.max_delay = max_delay
        self._queue: deque[tuple[np.ndarray, Future[Any], float]] = deque()
        self._rows = 0  # rows queued
        self._cond = threading.Condition(threading.Lock())
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> MinimalBatcher:
        self._thread = threading.Thread(target=self._run, name="minimal-batcher", daemon=True)
        self._thread.start()
        return self

    def submit(self, item: np.ndarray) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("batcher is stopped")
            was_empty = not self._queue
            self._queue.append((item, fut, time.monotonic()))
            self._rows += len(item)
            # The worker waits either for a first request or for the batch to fill.
            if was_empty or self._rows >= self.max_batch:
                self._cond.notify()
        return fut

    def stop(self, timeout: float | None = 5.0) -> None:
        """Serve what is queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> MinimalBatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _take_batch(self) -> list[tuple[np.ndarray, Future[Any], float]] | None:
        q = self._queue
        with self._cond:
            while not q:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = q[0][2] + self.max_delay
            while self._rows < self.max_batch and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[tuple[np.ndarray, Future[Any], float]] = []
            rows = 0
            while q and (not batch or rows + len(q[0][0]) <= self.max_batch):
                entry = q.popleft()
                rows += len(entry[0])
                batch.append(entry)
            self._rows -= rows
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [e for e in batch if e[1].set_running_or_notify_cancel()]
            if not live:
                continue
            items = [e[0] for e in live]
            try:
                out = self.func(items[0] if len(items) == 1 else np.concatenate(items))
            except BaseException as exc:
                for e in live:
                    e[1].set_exception(exc)
                continue
            start = 0
            for item, fut, _ in live:
                end = start + len(item)
                fut.set_result(out[start:end])
                start = end

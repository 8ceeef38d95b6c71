"""Chunks of ``BatchProcessor.map``: many items queued as one request (bulk.py).

A chunk request's item is the list of its items' own requests, each described at
``map`` time by the processor's describer, so all of one inner format (a chunk holds
items of one kind only). Its format delegates everything to that inner format: a batch
of chunks is built from all their items, in order, exactly as the same items queued one
by one would be; the output is split per item by the inner format and each chunk gets
the list of its items' results. So every kind of item (arrays, stacked samples, tensors,
named inputs, padded sequences, generic objects) batches in a chunk as it would alone,
while the queue, the workers and the futures see one request per chunk.
"""

from __future__ import annotations

import logging
from typing import Any

from .._native.future_state import Request
from ..errors import ProcessorStoppedError, QueueTimeoutError, interrupts
from .base import BatchFormat, Built, Limits, Workspace

logger = logging.getLogger(__name__)


def items_queued_again(error: BaseException, count: int) -> bool:
    """Whether a chunk of ``count`` items that failed with ``error`` has its items queued
    again one by one: a processing failure of several items (one of them may be the
    cause); it is never retried whole (engine/execution.py): its items are, each as it
    would be alone. Expired and stopped ones are not: their time or their processor is
    gone. Such a chunk has no outcome of its own in the counts; its items each have
    theirs."""
    return (count > 1 and not interrupts(error)
            and not isinstance(error, (ProcessorStoppedError, QueueTimeoutError)))


def handed_back(request: Request, error: BaseException) -> bool:
    """``items_queued_again`` for a request that failed: whether it is such a chunk."""
    return isinstance(request.format, ChunkFormat) and items_queued_again(
        error, len(request.item))


def queued_again(request: Request, error: BaseException) -> bool:
    """Queue the items of a chunk failing with ``error`` (``handed_back``) again one by
    one, now, by what its map set on its future (``bulk.Window.queue_again``): True once
    they are queued (the chunk then has no outcome of its own); False when its map no
    longer wants them (closed) or stop refused them, and the chunk counts as the failure
    it was."""
    again = getattr(request.future, "_bp_again", None)
    if again is None:  # pragma: no cover - every map chunk has one
        return False
    try:
        return bool(again(error))
    except Exception:  # pragma: no cover - would be a batchproc bug: never lose the chunk
        logger.exception("could not queue the items of a failed map chunk again")
        return False


def _inner(requests: list[Request]) -> list[Request]:
    """The items' requests of a batch of chunks, in order."""
    if len(requests) == 1:
        return requests[0].item  # type: ignore[no-any-return]
    inner: list[Request] = []
    for chunk in requests:
        inner.extend(chunk.item)
    return inner


class ChunkFormat(BatchFormat):
    """Chunks of items of one ``inner`` format."""

    def __init__(self, inner: BatchFormat) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return f"<chunks of {self.inner!r}>"

    def build(self, requests: list[Request], workspace: Workspace) -> Built:
        return self.inner.build(_inner(requests), workspace)

    def split(self, out: Any, requests: list[Request], built: Built) -> list[Any]:
        parts = self.inner.split(out, _inner(requests), built)
        if len(requests) == 1:
            return [parts]
        per_chunk = []
        start = 0
        for chunk in requests:
            end = start + len(chunk.item)
            per_chunk.append(parts[start:end])
            start = end
        return per_chunk

    def chunks(self, request: Request, limits: Limits) -> list[Request] | None:
        # map puts an item larger than a batch in a chunk of its own: it is cut as it
        # would be when queued alone (its pieces are requests of the inner format).
        items = request.item
        if len(items) != 1:
            return None
        return self.inner.chunks(items[0], limits)

    def join(self, parts: list[Any]) -> Any:
        return [self.inner.join(parts)]

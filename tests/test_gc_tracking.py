"""Queued requests are off the cyclic garbage collector's lists once the queue has a
consumer, and back on them as soon as they leave it, by every path: nothing is freed
early, no cycle is missed.

What is checked: ``gc.is_tracked`` of a queued entry before and after each way out (pop,
drain, cancel, expiry, a parked retry, a push undone, the queue's own end); that a queue
nobody has consumed keeps its entries tracked (a cycle through it stays visible); and,
since an untracked object hides the cycles it is part of, that such cycles are collected
once the entry has left (weak references to what the cycle holds).
"""

import gc
import time
import weakref

import numpy as np
import pytest

from batchproc import BatchProcessor, BatchProcessorConfig
from batchproc._native.future_state import Request
from batchproc._native.request_queue import RequestQueue


class Node:
    """A GC-tracked object that can be put in a cycle and watched through a weakref."""

    def __init__(self):
        self.other = None


def cycle():
    """Two nodes referring to each other (only a collection can free them): the head,
    and a weak reference to the tail."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a, weakref.ref(b)


def collected(ref):
    gc.collect()
    return ref() is None


def consumed_queue(capacity=8):
    """A queue a consumer has popped from (nothing there yet)."""
    q = RequestQueue(capacity)
    assert q.pop_batch(8, timeout=0) == []
    return q


ROW = np.ones((1, 4), dtype=np.float32)


class TestQueueEntries:
    def test_an_entry_is_untracked_while_queued_and_tracked_once_popped(self):
        q = consumed_queue()
        item = Node()
        assert gc.is_tracked(item)
        q.push(item)
        assert not gc.is_tracked(item)
        assert q.pop_batch(8) == [item]
        assert gc.is_tracked(item)

    @pytest.mark.parametrize("way_out", ["drain", "cancel", "expiry", "parked then popped",
                                         "dropped with its queue"])
    def test_every_way_out_tracks_the_entry_again(self, way_out):
        q = consumed_queue()
        item = Node()
        if way_out == "drain":
            q.push(item)
            assert not gc.is_tracked(item)
            assert q.drain() == [item]
        elif way_out == "cancel":
            token = q.push(item)
            assert not gc.is_tracked(item)
            assert q.cancel(token)
        elif way_out == "expiry":
            q.push(item, deadline=time.monotonic() - 1.0)
            assert not gc.is_tracked(item)
            assert q.take_expired() == [item]
        elif way_out == "parked then popped":
            q.park(item, 0, 1, 0, 0, 0, time.monotonic() - 1.0)
            assert not gc.is_tracked(item)
            assert q.pop_batch(8) == [item]
        else:
            q.push(item)
            assert not gc.is_tracked(item)
            del q
        assert gc.is_tracked(item)

    def test_a_queue_nobody_consumed_keeps_its_entries_tracked(self):
        q = RequestQueue(8)
        item = Node()
        q.push(item)
        assert gc.is_tracked(item)
        q.pop_batch(8)  # the first pop: later pushes are hidden, this one is out already
        assert gc.is_tracked(item)
        q.push(item)
        assert not gc.is_tracked(item)

    def test_objects_the_collector_does_not_manage_pass_through(self):
        q = consumed_queue()
        array = np.ones(3)
        for item in (7, "text", 1.5, array):
            q.push(item)
        assert q.pop_batch(8) == [7, "text", 1.5, array]

    def test_one_object_queued_twice_is_tracked_once_either_leaves(self):
        q = consumed_queue()
        item = Node()
        first = q.push(item)
        q.push(item)
        assert q.cancel(first)
        assert gc.is_tracked(item)  # tracked while still queued once: always safe
        assert q.pop_batch(8) == [item]
        assert gc.is_tracked(item)

    def test_a_queued_cycle_survives_collections(self):
        # Untracked, the entry is a root for the collector: what it refers to stays alive.
        q = consumed_queue()
        head, tail = cycle()
        q.push(head)
        del head
        gc.collect()
        assert tail() is not None
        (head,) = q.pop_batch(8)
        assert head.other is tail() and tail().other is head

    @pytest.mark.parametrize("way_out", ["pop", "cancel", "drain", "dropped queue"])
    def test_a_cycle_through_an_entry_is_collected_once_it_left(self, way_out):
        q = consumed_queue()
        head, tail = cycle()
        token = q.push(head)
        del head
        if way_out == "pop":
            q.pop_batch(8)
        elif way_out == "cancel":
            assert q.cancel(token)
        elif way_out == "drain":
            q.drain()
        else:
            del q
        assert collected(tail)


class TestProcessorRequests:
    @staticmethod
    def tracked_requests_of(futures):
        """The ``Request`` objects of ``futures`` the collector tracks."""
        ids = {id(f) for f in futures}
        return [o for o in gc.get_objects() if type(o) is Request and id(o.future) in ids]

    def test_requests_waiting_in_a_running_processor_are_untracked(self, make_processor):
        p = make_processor(lambda batch: batch, max_batch_size=8, batch_timeout=0.001,
                           max_workers=1)
        p.enqueue_predict(ROW).result(timeout=5)  # the workers have popped
        p.pause()
        futures = [p.enqueue_predict(ROW) for _ in range(20)]
        assert len(p._queue) == 20
        assert self.tracked_requests_of(futures) == []
        assert all(gc.is_tracked(f) for f in futures)  # the caller's: always tracked
        p.resume()
        for f in futures:
            assert np.array_equal(f.result(timeout=5), ROW)

    def test_a_processor_dropped_before_start_frees_its_queued_requests(self):
        # Nobody consumed its queue: the cycle processor -> queue -> request -> future
        # -> callback -> processor stays visible to the collector.
        p = BatchProcessor(BatchProcessorConfig(max_batch_size=8))
        f = p.enqueue_predict(ROW)  # queued until start(), which never comes
        head, tail = cycle()
        head.processor = p
        f.add_done_callback(lambda _fut, head=head: None)
        watched = weakref.ref(p)
        del f, head, p
        assert collected(tail)
        assert watched() is None

    def test_requests_failed_by_stop_hold_no_hidden_cycle(self, make_processor):
        p = make_processor(lambda batch: batch, max_batch_size=8, batch_timeout=0.001,
                           max_workers=1)
        p.enqueue_predict(ROW).result(timeout=5)
        p.pause()
        f = p.enqueue_predict(ROW)
        head, tail = cycle()
        head.future = f
        f.add_done_callback(lambda _fut, head=head: None)
        p.stop(timeout=5)
        assert f.done()
        del f, head
        assert collected(tail)

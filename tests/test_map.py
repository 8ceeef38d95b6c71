"""BatchProcessor.map and amap: results in order, a request per chunk, failures at their
own position, bounded read-ahead, priorities, deadlines, stop, pause and early close."""

import asyncio
import contextlib
import itertools
import os
import threading
import time
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from waiting import collected_holding
from waiting import wait_for as _wait_for

from batchproc import (
    BatchPriority,
    BatchProcessingStrategy,
    BatchTimeoutError,
    ConfigTypeError,
    ProcessorStoppedError,
    QueueTimeoutError,
    bulk,
)
from batchproc.errors import BatchOutputError


def rows(n, features=3, start=0):
    """n items of one row each; row k holds k + start everywhere."""
    return [np.full((1, features), float(k + start), dtype=np.float32) for k in range(n)]


class Calls:
    """A model that doubles its batch and records how many rows each call saw."""

    def __init__(self, func=lambda batch: batch * 2):
        self.func = func
        self.sizes = []
        self.lock = threading.Lock()

    def __call__(self, batch):
        with self.lock:
            self.sizes.append(len(batch))
        return self.func(batch)


# ----------------------------------------------------------------------- results and order


def test_results_in_order_one_request_per_chunk(make_processor):
    model = Calls()
    p = make_processor(model, max_batch_size=16)
    items = rows(100)
    out = list(p.map(items))
    assert len(out) == 100
    for k, (x, y) in enumerate(zip(items, out)):
        assert y.shape == (1, 3) and (y == 2 * x).all(), k
    stats = p.get_stats()
    # 100 items in chunks of 16 rows: 7 requests, not 100 futures.
    assert stats["total_accepted"] == 7
    assert stats["total_processed"] == 7
    assert sum(model.sizes) == 100 and max(model.sizes) <= 16


def test_chunksize_sets_the_rows_per_request(make_processor):
    p = make_processor(lambda b: b, max_batch_size=16)
    assert len(list(p.map(rows(20), chunksize=5))) == 20
    assert p.get_stats()["total_accepted"] == 4


@pytest.mark.parametrize("method", ["map", "amap"])
def test_chunks_follow_the_processors_target_rows(make_processor, method):
    # Requests one by one never give the model more rows than the target (FIXED's as
    # set, a memory level's cap, a failure's halving): a map's chunks do not either.
    model = Calls()
    p = make_processor(model, max_batch_size=64, initial_batch_size=8, batch_timeout=0.001,
                       processing_strategy=BatchProcessingStrategy.FIXED)
    call = getattr(p, method)
    out = _run(call(rows(100)))
    assert [float(y[0, 0]) for y in out] == [2.0 * k for k in range(100)]
    assert max(model.sizes) == 8 and p.get_stats()["total_accepted"] == 13
    for target, chunksize, chunks in [(5, None, 26), (5, 3, 43), (64, None, 2)]:
        p.update_batch_size(target)
        model.sizes.clear()
        accepted = p.get_stats()["total_accepted"]
        out = _run(call(rows(128), chunksize=chunksize))
        assert [float(y[0, 0]) for y in out] == [2.0 * k for k in range(128)]
        # Chunks of the target's rows fill calls of exactly that; chunks of 3 under a
        # target of 5 share a call only with the last chunk (of 2 rows), if it comes while
        # one waits: never more than the target either way.
        assert max(model.sizes) <= target, (target, chunksize)
        if chunksize is None:
            assert max(model.sizes) == target
        assert p.get_stats()["total_accepted"] - accepted == chunks, (target, chunksize)


def test_a_chunk_takes_the_target_of_when_it_opens(make_processor):
    # The source lowers the target just before it yields the first item of the second
    # chunk: that chunk, and those after it, hold the new target's rows.
    model = Calls()
    p = make_processor(model, max_batch_size=8, initial_batch_size=8, max_workers=1,
                       processing_strategy=BatchProcessingStrategy.FIXED)

    def items():
        for k in range(16):
            if k == 8:
                p.update_batch_size(2)
            yield rows(1, start=k)[0]

    out = list(p.map(items(), buffersize=1))
    assert [float(y[0, 0]) for y in out] == [2.0 * k for k in range(16)]
    assert model.sizes == [8, 2, 2, 2, 2]


@pytest.mark.parametrize("method", ["map", "amap"])
def test_chunks_follow_a_target_lowered_by_memory_pressure(make_processor, method):
    model = Calls()
    p = make_processor(model, max_batch_size=64)
    p._controller.set_memory_level("critical")  # as the health monitor sets it
    out = _run(getattr(p, method)(rows(40)))
    assert [float(y[0, 0]) for y in out] == [2.0 * k for k in range(40)]
    assert set(model.sizes) == {1}


def test_items_of_several_rows_get_their_rows(make_processor):
    p = make_processor(lambda b: b + 1, max_batch_size=8)
    items = [np.full((r, 2), float(k)) for k, r in enumerate([1, 3, 2, 5, 1, 8, 2])]
    out = list(p.map(items))
    for x, y in zip(items, out, strict=True):
        assert y.shape == x.shape and (y == x + 1).all()


def test_an_item_larger_than_a_batch_is_cut_and_joined(make_processor):
    model = Calls(lambda b: b * 3)
    p = make_processor(model, max_batch_size=8)
    items = [np.ones((2, 2)), np.arange(40.0).reshape(20, 2), np.ones((1, 2))]
    out = list(p.map(items))
    assert [y.shape for y in out] == [(2, 2), (20, 2), (1, 2)]
    assert (out[1] == items[1] * 3).all()
    assert max(model.sizes) <= 8


def test_stacked_samples(make_processor):
    p = make_processor(lambda b: b.sum(axis=1), max_batch_size=8, stack_items=True)
    items = [np.full(4, float(k)) for k in range(20)]
    assert [float(y) for y in p.map(items)] == [4.0 * k for k in range(20)]


def test_named_and_tuple_inputs(make_processor):
    def model(batch):
        if isinstance(batch, dict):
            return {"sum": batch["a"] + batch["b"]}
        return batch[0] - batch[1]

    p = make_processor(model, max_batch_size=8)
    dicts = [{"a": np.full((1, 2), k), "b": np.ones((1, 2))} for k in range(10)]
    tuples = [(np.full((1, 2), k), np.ones((1, 2))) for k in range(10)]
    out = list(p.map(dicts + tuples))
    for k in range(10):
        assert (out[k]["sum"] == k + 1).all()
        assert (out[10 + k] == k - 1).all()


def test_generic_objects(make_processor):
    p = make_processor(lambda texts: [t.upper() for t in texts], max_batch_size=8)
    words = [f"w{k}" for k in range(30)]
    assert list(p.map(words)) == [w.upper() for w in words]
    assert p.get_stats()["total_accepted"] == 4


def test_torch_tensors(make_processor):
    if os.environ.get("BATCHPROC_REQUIRE_TORCH") == "1":
        import torch
    else:
        torch = pytest.importorskip("torch")
    p = make_processor(lambda b: b * 2, max_batch_size=8)
    items = [torch.full((1, 3), float(k)) for k in range(20)]
    out = list(p.map(items))
    assert all(isinstance(y, torch.Tensor) and torch.equal(y, x * 2)
               for x, y in zip(items, out, strict=True))


def test_padded_sequences(make_processor):
    def model(ids):
        return ids.sum(axis=1, keepdims=True)

    p = make_processor(model, max_batch_size=8, pad_value=0)
    items = [np.arange(1, 2 + k % 5)[None] for k in range(20)]
    out = list(p.map(items))
    assert [int(y[0, 0]) for y in out] == [int(x.sum()) for x in items]


def test_mixed_kinds_give_what_enqueue_predict_gives(make_processor):
    def model(batch):
        if isinstance(batch, list):
            return [len(x) for x in batch]
        if isinstance(batch, dict):
            return {"y": batch["x"] * 10}
        return batch + 1

    p = make_processor(model, max_batch_size=4)
    items = []
    for k in range(12):
        items += [np.full((1, 2), k), f"text{k}", {"x": np.full((1, 1), k)},
                  np.full((1, 2), k, dtype=np.int8), np.full((2, 2), float(k))]
    items += rows(9)
    got = list(p.map(items))
    want = [p.enqueue_predict(x).result() for x in items]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, dict):
            assert (g["y"] == w["y"]).all()
        elif isinstance(w, np.ndarray):
            assert g.dtype == w.dtype and (g == w).all()
        else:
            assert g == w


def test_result_is_not_changed_by_later_batches(make_processor):
    p = make_processor(lambda b: b, max_batch_size=8)  # aliases the reused buffer
    results = p.map(rows(64))
    first = next(results)
    rest = list(results)
    assert (first == 0).all() and (rest[-1] == 63).all()


# ----------------------------------------------------------------------- arguments


def _run(results):
    """Everything a map (an iterator) or an amap (an async iterator) gives."""
    if hasattr(results, "__anext__"):
        async def consume():
            return [y async for y in results]

        return asyncio.run(consume())
    return list(results)


def _outcome(call):
    """None if ``call()`` returned, else the type of what it raised."""
    try:
        call()
    except Exception as exc:
        return type(exc)
    return None


# Integers as the config reads them (config.as_int): numpy integers yes, bools and floats
# (even whole) no.
NUMPY_THREES = [t(3) for t in (np.int8, np.int16, np.int32, np.int64, np.intc, np.uint8,
                               np.uint16, np.uint32, np.uint64)]
NOT_INTEGERS = [True, False, np.True_, np.False_, 3.0, 2.5, np.float64(3.0), "3", [3]]


@pytest.mark.parametrize("method", ["map", "amap"])
@pytest.mark.parametrize(("name", "value", "error"), [
    *[("chunksize", v, None) for v in (None, 1, 16, *NUMPY_THREES)],
    *[("chunksize", v, TypeError) for v in NOT_INTEGERS],
    *[("chunksize", v, ValueError) for v in (0, -1, 17, np.int64(0), np.uint8(17), 2**80)],
    *[("buffersize", v, None) for v in (None, 1, 2**20, *NUMPY_THREES)],
    *[("buffersize", v, TypeError) for v in NOT_INTEGERS],
    *[("buffersize", v, ValueError) for v in (0, -1, np.int64(0), -(2**80))],
], ids=repr)
def test_chunksize_and_buffersize_are_integers_as_the_config_reads_them(
        make_processor, method, name, value, error):
    p = make_processor(lambda b: b * 2, max_batch_size=16)
    call = getattr(p, method)
    if error is not None:
        with pytest.raises(error, match=name) as refused:
            call(rows(3), **{name: value})
        assert refused.type is error  # exactly: not a ValueError for a wrong type
        if error is ValueError:
            assert "from 1" in str(refused.value) or ">= 1" in str(refused.value)
        return
    out = _run(call(rows(7), **{name: value}))
    assert [float(y[0, 0]) for y in out] == [2.0 * k for k in range(7)]
    if name == "chunksize":
        rows_per_chunk = 16 if value is None else int(value)
        assert p.get_stats()["total_accepted"] == -(-7 // rows_per_chunk)


@pytest.mark.parametrize("method", ["map", "amap"])
@pytest.mark.parametrize(("name", "value", "error"), [
    # What enqueue_predict's queue takes as a priority: any integer in [0, 2**31-1].
    *[("priority", v, None) for v in (BatchPriority.LOW, 0, 2**31 - 1, True, *NUMPY_THREES)],
    *[("priority", v, TypeError) for v in ("high", 1.5, 1.0, np.float64(1.0), None,
                                             np.True_)],
    *[("priority", v, ValueError) for v in (-1, 2**31, np.int64(-1), 2**80)],
    # And enqueue_predict's rule for max_queue_time: the config field's.
    *[("max_queue_time", v, None) for v in (None, 0.5, 10, np.float64(0.5), 1e9,
                                            np.int64(10), np.float32(0.5), Fraction(1, 2),
                                            Decimal("0.5"))],
    *[("max_queue_time", v, ValueError) for v in (0, -1, float("nan"), float("inf"),
                                                   np.float64("inf"), 10**400)],
    *[("max_queue_time", v, ConfigTypeError) for v in ("1", True, np.True_, b"1",
                                                        np.timedelta64(1, "s"))],
], ids=repr)
def test_priority_and_max_queue_time_are_checked_as_enqueue_predict_checks_them(
        make_processor, method, name, value, error):
    p = make_processor(lambda b: b * 2, max_batch_size=16)
    item = rows(1)[0]
    assert _outcome(lambda: p.enqueue_predict(item, **{name: value}).result(10)) is error
    call = getattr(p, method)
    if error is not None:
        with pytest.raises(error, match=name) as refused:
            call(rows(3), **{name: value})  # at the call, not at the first next()
        assert refused.type is error
        return
    out = _run(call(rows(7), **{name: value}))
    assert [float(y[0, 0]) for y in out] == [2.0 * k for k in range(7)]


def test_nothing_is_read_before_the_first_next(make_processor):
    p = make_processor(lambda b: b)
    read = []

    def source():
        for x in rows(5):
            read.append(x)
            yield x

    results = p.map(source())
    assert read == []
    assert len(list(results)) == 5


# ----------------------------------------------------------------------- bounded read-ahead


def test_an_infinite_input_is_read_only_as_results_are_consumed(make_processor):
    p = make_processor(lambda b: b, max_batch_size=8, max_workers=2)
    read = itertools.count()

    def source():
        for k in read:
            yield np.full((1, 1), float(k))

    results = p.map(source(), chunksize=8, buffersize=3)
    taken = list(itertools.islice(results, 100))
    assert [float(y[0, 0]) for y in taken] == list(range(100))
    # Read so far: the items handed out, up to 3 chunks in flight and the one being filled.
    assert next(read) <= 100 + 3 * 8 + 8
    results.close()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_items_of_no_rows_are_read_ahead_within_the_bound(make_processor, asynchronous):
    # An item of shape (0, n) adds no rows: a chunk is bounded by its items as well, so
    # the read-ahead stays within (buffersize + 1) * chunksize items.
    p = make_processor(lambda b: b * 2, max_batch_size=16)
    read = itertools.count()

    def source():
        for k in read:
            assert k < 1000, "read without bound"
            yield np.empty((0, 4)) if k % 2 else np.full((1, 4), float(k))

    async def asource():
        for item in source():
            yield item

    if asynchronous:
        async def first():
            results = p.amap(asource(), chunksize=4, buffersize=1)
            try:
                return await results.__anext__()
            finally:
                await results.aclose()

        first_result = asyncio.run(first())
    else:
        results = p.map(source(), chunksize=4, buffersize=1)
        first_result = next(results)
        results.close()
    assert (first_result == 0).all() and first_result.shape == (1, 4)
    assert next(read) <= (1 + 1) * 4
    items = [np.empty((0, 4)) if k % 3 else np.full((1, 4), float(k)) for k in range(20)]
    out = list(p.map(items, chunksize=4))
    assert [y.shape for y in out] == [x.shape for x in items]
    assert all((y == 2 * x).all() for x, y in zip(items, out))
    assert p.get_stats()["total_accepted"] == 1 + 5  # the first chunk, then 20 items by 4


# ----------------------------------------------------------------------- slow sources

# How long a slow source makes map wait before each item after a pause: past the
# processor's batch_timeout, set to bulk.READ_WAIT_MIN below, so each such read is slow.
PAUSE = bulk.READ_WAIT_MIN


def _all_queued_delivered(p):
    """Every request queued so far has its result set: each counted processed (before its
    futures are set) and no batch still in flight (its delivery over). Stats are read
    processed first, accepted last, so a chunk queued meanwhile is waited for."""
    stats = p.get_stats()
    return (stats["total_processed"] >= stats["total_accepted"]
            and stats["active_batches"] == 0)


def _paused(pause_before, k):
    return k in pause_before if pause_before is not None else k > 0


class SlowSource:
    """Items from a source that pauses before some of them (``pause_before``; None:
    every item after the first) for ``pause`` seconds from when it is asked for the
    item, then until every request queued so far has its result, so that a map that
    hands out ready results before reading on can. ``handed`` records, for each result
    handed out, how many items the source had given by then."""

    def __init__(self, p, items, pause_before=None, pause=PAUSE):
        self.p = p
        self.items = items
        self.pause_before = pause_before
        self.pause = pause
        self.given = 0
        self.handed = []

    def __iter__(self):
        for k, item in enumerate(self.items):
            if _paused(self.pause_before, k):
                asked = time.monotonic()
                while time.monotonic() < asked + self.pause:
                    time.sleep(self.pause / 4)
                _wait_for(lambda: _all_queued_delivered(self.p), "the queued chunks' results")
            self.given += 1
            yield item

    async def __aiter__(self):
        channel = self.p._channel_for(asyncio.get_running_loop())
        for k, item in enumerate(self.items):
            if _paused(self.pause_before, k):
                asked = time.monotonic()
                while time.monotonic() < asked + self.pause:
                    await asyncio.sleep(self.pause / 4)
                # ... and those results set on this loop.
                while not (_all_queued_delivered(self.p) and not channel._scheduled):
                    await asyncio.sleep(0.001)
            self.given += 1
            yield item

    def consume(self, results):
        out = []
        for y in results:
            self.handed.append(self.given)
            out.append(y)
        return out

    async def aconsume(self, results):
        out = []
        async for y in results:
            self.handed.append(self.given)
            out.append(y)
        return out


SLOW_KINDS = {
    # Arrays of one shape: read by the native taker (take_like) after the first.
    "arrays": lambda n: rows(n),
    # Objects of no known format: each read and described by Python.
    "objects": lambda n: [Fraction(k) for k in range(n)],
}


def _slow_model(batch):
    return batch * 2 if isinstance(batch, np.ndarray) else [x * 2 for x in batch]


def _value(y):
    return float(y[0, 0]) if isinstance(y, np.ndarray) else float(y)


@pytest.mark.parametrize("kind", sorted(SLOW_KINDS))
@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_slow_source_gets_each_result_one_item_later(make_processor, kind, asynchronous):
    # Before: nothing was handed out until buffersize chunks were queued (here all 8
    # items were read first). Now a read that goes past batch_timeout queues what it
    # has, and what is ready is handed out before the source is asked for more.
    p = make_processor(_slow_model, max_batch_size=4, max_workers=2, batch_timeout=PAUSE)
    source = SlowSource(p, SLOW_KINDS[kind](8))
    if asynchronous:
        out = asyncio.run(source.aconsume(p.amap(source)))
    else:
        out = source.consume(p.map(iter(source)))
    assert [_value(y) for y in out] == [2.0 * k for k in range(8)]
    # Item 0 comes at once and shares a chunk with item 1; from then on each item's
    # result is out once the next one or two items are read.
    assert source.handed[0] <= 3, source.handed
    assert all(h <= k + 2 for k, h in enumerate(source.handed) if k), source.handed


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_source_pausing_between_bursts_gets_a_bursts_results_before_the_next(
        make_processor, asynchronous):
    # Bursts of a chunk each (4 items at once), a pause before each next burst: a full
    # chunk does not keep map reading past a pause while results are ready.
    p = make_processor(_slow_model, max_batch_size=4, max_workers=2, batch_timeout=PAUSE)
    source = SlowSource(p, rows(16), pause_before={4, 8, 12})
    if asynchronous:
        out = asyncio.run(source.aconsume(p.amap(source)))
    else:
        out = source.consume(p.map(iter(source)))
    assert [_value(y) for y in out] == [2.0 * k for k in range(16)]
    # The first burst's results are out once the second burst's first item is read (a
    # stall of the reading thread may close a chunk early and delay a result by a
    # chunk); each result within two chunks and an item of its own.
    assert all(h <= k + 2 * 4 + 1 for k, h in enumerate(source.handed)), source.handed


@pytest.mark.parametrize("asynchronous", [False, True])
def test_after_a_slow_read_map_waits_a_moment_for_the_oldest_result(
        make_processor, monkeypatch, asynchronous):
    # A read that went past batch_timeout queued its chunk; the source keeps map waiting
    # again, so map first waits for the oldest result, up to GROUP_WAIT_S (here long
    # enough for any machine): each result is out before the next item is read. amap
    # reads an async source in a task of its own: its open chunk goes at batch_timeout
    # while the source pauses, and each result as it is ready (the source, once the
    # result is set, may give its next item first).
    monkeypatch.setattr(bulk, "GROUP_WAIT_S", 10.0)
    p = make_processor(_slow_model, max_batch_size=4, max_workers=2, batch_timeout=PAUSE)
    source = SlowSource(p, rows(6))
    if asynchronous:
        out = asyncio.run(source.aconsume(p.amap(source)))
    else:
        out = source.consume(p.map(iter(source)))
    assert [_value(y) for y in out] == [2.0 * k for k in range(6)]
    if asynchronous:
        assert all(h <= k + 2 for k, h in enumerate(source.handed)), source.handed
    else:
        assert source.handed == [2, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_stream_the_model_keeps_up_with_gets_results_before_the_window_is_refilled(
        make_processor, asynchronous):
    # No read here is slow: the source only waits, before each chunk's first item, until
    # the chunks queued before have their results. Before, map read 4 chunks (the whole
    # window, all 16 items) before it handed out the first result.
    p = make_processor(_slow_model, max_batch_size=4, max_workers=2, batch_timeout=PAUSE)
    source = SlowSource(p, rows(16), pause_before={4, 8, 12}, pause=0.0)
    if asynchronous:
        out = asyncio.run(source.aconsume(p.amap(source, buffersize=4)))
    else:
        out = source.consume(p.map(iter(source), buffersize=4))
    assert [_value(y) for y in out] == [2.0 * k for k in range(16)]
    # Each chunk's results are out once the next chunk is read.
    assert all(h <= (k // 4 + 2) * 4 for k, h in enumerate(source.handed)), source.handed


@pytest.mark.parametrize("burst", [4, 5])
def test_amap_hands_out_results_while_its_async_source_is_quiet(make_processor, burst):
    # A burst, then the source waits for something that only comes once the burst's
    # results are out (a client answering them): amap reads its async source in a task
    # of its own and hands out results while that read waits. A burst of 4 fills a
    # chunk; of 5, the fifth item waits in the open chunk, queued at batch_timeout.
    p = make_processor(_slow_model, max_batch_size=4, batch_timeout=PAUSE)
    out = asyncio.run(_answered_after(p, burst))
    assert [_value(y) for y in out] == [2.0 * k for k in range(burst + 2)]


async def _answered_after(p, burst):
    """amap over a source that gives ``burst`` items, then 2 more once ``burst`` results
    were handed out (or raises after 10 s, which amap raises)."""
    answered = asyncio.Event()

    async def source():
        for x in rows(burst):
            await asyncio.sleep(0.001)  # awaits between items, as a real source does
            yield x
        await asyncio.wait_for(answered.wait(), 10)
        for x in rows(2, start=burst):
            yield x

    out = []
    async for y in p.amap(source()):
        out.append(y)
        if len(out) == burst:
            answered.set()
    return out


def test_amap_reads_its_async_source_from_one_task(make_processor):
    # A source holding a task-bound context across its yields sees one task throughout
    # (amap's reading task), not a task per read.
    p = make_processor(_slow_model, max_batch_size=4)
    seen = set()

    async def source():
        for x in rows(20):
            seen.add(asyncio.current_task())
            yield x
            await asyncio.sleep(0)

    async def main():
        return [y async for y in p.amap(source(), buffersize=2)]

    out = asyncio.run(main())
    assert [_value(y) for y in out] == [2.0 * k for k in range(20)]
    assert len(seen) == 1


def test_closing_amap_while_its_source_is_read_stops_the_reading(make_processor):
    p = make_processor(_slow_model, max_batch_size=4)
    closed = []

    async def source():
        try:
            for x in rows(4):
                yield x
            await asyncio.Event().wait()  # quiet for ever
        finally:
            closed.append(True)

    async def main():
        results = p.amap(source())
        first = await results.__anext__()
        await results.aclose()
        for _ in range(10):  # the reading task's cancellation runs on the loop
            if closed:
                break
            await asyncio.sleep(0)
        return first, list(closed)  # before asyncio.run cancels what is left

    first, closed_then = asyncio.run(main())
    assert _value(first) == 0.0 and closed_then == [True]


class SourceInterrupt(BaseException):
    """Neither an Exception nor a cancellation: ends the iteration as it is."""


@pytest.mark.parametrize("after", [0, 6])
def test_amap_gives_a_base_exception_of_its_async_source_as_it_is(make_processor, after):
    # The build that read the source in the iterating task raised it there; read in a
    # task of its own, it must not come out as that task's cancellation.
    p = make_processor(_slow_model, max_batch_size=4)

    async def source():
        for x in rows(after):
            yield x
        raise SourceInterrupt("from the source")

    async def main():
        return [y async for y in p.amap(source(), buffersize=2)]

    with pytest.raises(SourceInterrupt, match="from the source"):
        asyncio.run(main())


def test_amap_fails_clearly_when_its_reading_task_is_cancelled_from_elsewhere(
        make_processor):
    # What asyncio.timeout or a task group held by the source across its yields does when
    # it fires while the source waits at a yield: it cancels the task that entered it,
    # amap's reading task, outside the source. Here the test cancels that task itself,
    # once the window is full and the reader waits to be asked for the next chunk.
    gate = threading.Event()

    def model(batch):
        gate.wait(10)
        return batch * 2

    p = make_processor(model, max_batch_size=4, max_workers=1)

    async def source():
        for x in rows(40):
            yield x

    async def main():
        results = p.amap(source(), buffersize=2)
        first = asyncio.ensure_future(results.__anext__())
        me = asyncio.current_task()
        while len(asyncio.all_tasks()) < 3:  # this one, the iteration, the reader
            await asyncio.sleep(0)
        deadline = time.monotonic() + 10
        while p.get_stats()["queue_size"] + p.get_stats()["active_batches"] < 2:
            assert time.monotonic() < deadline, "the window never filled"
            await asyncio.sleep(0.001)
        reader = [t for t in asyncio.all_tasks() if t is not me and t is not first]
        assert len(reader) == 1
        reader[0].cancel()
        await asyncio.sleep(0)
        gate.set()
        got = [await first]
        with pytest.raises(RuntimeError, match="was cancelled while the source") as info:
            async for y in results:
                got.append(y)
        assert isinstance(info.value.__cause__, asyncio.CancelledError)
        return got

    got = asyncio.run(main())
    # The results of the chunks queued before come first.
    assert [_value(y) for y in got] == [2.0 * k for k in range(len(got))]
    assert len(got) == 8


def test_map_waits_a_moment_for_a_chunk_its_source_was_slow_to_fill(
        make_processor, monkeypatch):
    # The chunk fills before batch_timeout, but its read waited READ_WAIT_MIN or more on
    # the source: map waits up to GROUP_WAIT_S (here long enough for any machine) for its
    # results before reading on, instead of holding them for the whole next read.
    monkeypatch.setattr(bulk, "GROUP_WAIT_S", 10.0)
    p = make_processor(_slow_model, max_batch_size=4, max_workers=2, batch_timeout=10.0)
    given = [0]

    def source():
        start = time.monotonic()
        for k, x in enumerate(rows(8)):
            if k == 3:  # the first chunk's read takes READ_WAIT_MIN
                while time.monotonic() < start + bulk.READ_WAIT_MIN:
                    time.sleep(bulk.READ_WAIT_MIN / 4)
            given[0] += 1
            yield x

    handed = [given[0] for _ in p.map(source())]
    assert handed[:4] == [4] * 4, handed


def test_a_fast_source_fills_its_chunks(make_processor):
    # The slow-source rule never cuts a chunk of items in memory: read_wait is at least
    # READ_WAIT_MIN, however short batch_timeout is.
    model = Calls()
    p = make_processor(model, max_batch_size=16, batch_timeout=0.0)
    assert len(list(p.map(rows(100)))) == 100
    assert p.get_stats()["total_accepted"] == 7
    assert bulk.Settings(p, None, None, 0, None, False).read_wait == bulk.READ_WAIT_MIN


def _first_read_five_chunks_queued(make_processor, sizes=None):
    """A paused processor whose map of 40 rows has handed out its first row, with its
    five other chunks (4 rows each) still queued; the map and the processor."""
    started, gate = threading.Event(), threading.Event()

    def model(batch):
        started.set()
        gate.wait(10)
        if sizes is not None:
            sizes.append(len(batch))
        return batch

    p = make_processor(model, max_batch_size=4, max_workers=1)
    results = p.map(rows(40), chunksize=4, buffersize=6)
    first = []
    # (The map as an argument: a thread drops its arguments when it ends.)
    consumer = threading.Thread(target=lambda it: first.append(next(it)), args=(results,))
    consumer.start()  # queues 6 chunks, waits for the first, held in the model
    assert started.wait(10)
    _wait_for(lambda: p.get_stats()["queue_size"] == 5, "five chunks queued")
    p.pause()
    gate.set()
    consumer.join(timeout=10)
    assert not consumer.is_alive() and (first[0] == 0).all()
    return results, p


def test_closing_early_withdraws_queued_chunks(make_processor):
    sizes = []
    results, p = _first_read_five_chunks_queued(make_processor, sizes)
    results.close()  # the five queued chunks leave the queue at once
    stats = p.get_stats()
    assert stats["queue_size"] == 0 and stats["total_cancelled"] == 5
    p.resume()
    p.enqueue_predict(np.zeros((1, 3), np.float32)).result()  # a batch after the close
    assert sizes == [4, 1]


def test_closing_a_map_while_another_thread_collects_garbage_withdraws_at_once(
        make_processor):
    import gc

    results, p = _first_read_five_chunks_queued(make_processor)
    in_collection, let_go = threading.Event(), threading.Event()

    class HeldInItsFinalizer:
        def __del__(self):
            in_collection.set()
            let_go.wait(10)

    def collect_a_cycle():
        held = HeldInItsFinalizer()
        held.cycle = held
        del held
        gc.collect()

    collector = threading.Thread(target=collect_a_cycle)
    collector.start()
    try:
        assert in_collection.wait(10)
        results.close()  # on this thread, which runs no collection: withdrawn now
        assert p.get_stats()["queue_size"] == 0
    finally:
        let_go.set()
        collector.join(10)
    assert p.get_stats()["total_cancelled"] == 5


def test_a_map_collected_in_a_cycle_withdraws_its_chunks_without_taking_a_lock_there(
        make_processor):
    # A garbage collection starts at any allocation, on any thread, maybe one holding a
    # lock the withdrawal takes (here the apredict line's, which a withdrawn request's
    # room goes through): the map's finalizer must not take it there.
    import gc

    results, p = _first_read_five_chunks_queued(make_processor)
    line = p._room_waiters()
    gc.disable()  # the collection below is the one that finds the map
    try:
        cycle = [results]
        cycle.append(cycle)
        del results, cycle
        assert collected_holding(line._lock), "the collection deadlocked in the map's finalizer"
    finally:
        gc.enable()
    # Withdrawn all the same, by the supervisor.
    _wait_for(lambda: p.get_stats()["queue_size"] == 0, "the five chunks withdrawn")
    assert p.get_stats()["total_cancelled"] == 5


def check_all_withdrawn_and_running(p, model, chunks, monkeypatch):
    """After an interrupted map on paused ``p``: its ``chunks`` chunks left the queue,
    and ``p``, its future class put back and resumed, still runs a request."""
    stats = p.get_stats()
    assert stats["queue_size"] == 0 and stats["total_cancelled"] == chunks
    monkeypatch.undo()
    p.resume()
    p.enqueue_predict(np.zeros((1, 3), np.float32)).result()
    assert model.sizes == [1]


@pytest.mark.parametrize("return_exceptions", [False, True])
def test_interrupted_waiting_for_a_chunk_withdraws_it(make_processor, monkeypatch,
                                                      return_exceptions):
    import batchproc.processor

    base = batchproc.processor._RequestFuture

    class Interrupted(base):
        def result(self, timeout=None):
            if not self.done():
                raise KeyboardInterrupt
            return super().result(timeout)

    model = Calls()
    p = make_processor(model, max_batch_size=4)
    # After the processor is made: its own requests' futures (enqueue_predict) stay
    # plain; map makes its chunks' futures as it goes.
    monkeypatch.setattr(batchproc.processor, "_RequestFuture", Interrupted)
    p.pause()
    results = p.map(rows(32), buffersize=8, return_exceptions=return_exceptions)
    # The interruption is not the chunk's outcome: it is raised, never yielded, and the
    # chunk it waited for leaves the queue with the others.
    with pytest.raises(KeyboardInterrupt):
        next(results)
    check_all_withdrawn_and_running(p, model, 8, monkeypatch)


def pausing_on_a_failed_chunk(make_processor):
    """A processor whose model fails every chunk of several rows and pauses it, so the
    chunk's items, queued again one by one, stay queued: (processor, the counting model
    that sees what runs alone)."""
    model = Calls()

    def failing(batch):
        if len(batch) > 1:
            p.pause()
            raise ValueError("a chunk")
        return model(batch)

    p = make_processor(failing, max_batch_size=4, max_retries=0)
    return p, model


def test_interrupted_waiting_for_a_failed_chunks_item_withdraws_it(make_processor,
                                                                    monkeypatch):
    import batchproc.processor

    class ItemInterrupted(batchproc.processor._RequestFuture):
        """The future of a failed chunk's item (a chunk's own queues its items again):
        its waiter gets KeyboardInterrupt."""

        def result(self, timeout=None):
            if not self.done() and self._bp_again is None:
                raise KeyboardInterrupt
            return super().result(timeout)

    p, model = pausing_on_a_failed_chunk(make_processor)
    # After the processor is made, as above.
    monkeypatch.setattr(batchproc.processor, "_RequestFuture", ItemInterrupted)
    results = p.map(rows(4), buffersize=1)
    with pytest.raises(KeyboardInterrupt):
        next(results)
    stats = p.get_stats()
    assert stats["queue_size"] == 0 and stats["total_cancelled"] == 4
    monkeypatch.undo()
    p.resume()
    p.enqueue_predict(np.zeros((1, 3), np.float32)).result()
    assert model.sizes == [1]


def test_a_full_queue_is_waited_for(make_processor):
    p = make_processor(lambda b: b, max_batch_size=2, max_queue_size=2)
    assert len(list(p.map(rows(50), buffersize=8))) == 50


# ----------------------------------------------------------------------- failures


def _failing_on(bad):
    def model(batch):
        if (batch == bad).any():
            raise ValueError(f"bad row {bad}")
        return batch * 2
    return model


def test_a_bad_item_raises_at_its_position_only(make_processor):
    model = Calls(_failing_on(37))
    p = make_processor(model, max_batch_size=8, max_retries=1, retry_delay=0.001)
    results = p.map(rows(60))
    for k in range(37):
        assert (next(results) == 2 * k).all()
    with pytest.raises(ValueError, match="bad row 37"):
        next(results)
    with pytest.raises(StopIteration):  # as Executor.map: the iteration ends there
        next(results)


def test_return_exceptions_yields_the_error_in_place(make_processor):
    p = make_processor(_failing_on(37), max_batch_size=8, max_retries=1, retry_delay=0.001)
    out = list(p.map(rows(60), return_exceptions=True))
    assert isinstance(out[37], ValueError)
    for k, y in enumerate(out):
        if k != 37:
            assert (y == 2 * k).all(), k  # the bad item's chunk-mates too


def test_a_failed_chunk_is_not_retried_whole(make_processor):
    # A chunk of several items that fails is handled as its items queued one by one
    # would be (a failing batch of them is searched at once): its items are queued again
    # at once and the good ones get their results without waiting for a backoff. Parked
    # whole for its retry (60 s), the chunk would hold them all (and, with a shorter
    # max_queue_time, expire them all).
    p = make_processor(_failing_on(2), max_batch_size=4, max_retries=1, retry_delay=60.0)
    results = p.map(rows(4), return_exceptions=True)
    got = []
    consumer = threading.Thread(target=lambda: got.extend(itertools.islice(results, 2)))
    consumer.start()
    consumer.join(timeout=10)
    assert not consumer.is_alive(), "the good items waited for the chunk's backoff"
    assert [float(y[0, 0]) for y in got] == [0.0, 2.0]
    # Only the bad item is parked for its retry; the fourth has its result already.
    _wait_for(lambda: p.get_stats()["total_processed"] == 3, "the three good items")


def test_two_bad_items_in_one_chunk(make_processor):
    def model(batch):
        if (batch == 3).any() or (batch == 5).any():
            raise KeyError("bad")
        return batch

    p = make_processor(model, max_batch_size=8, max_retries=0)
    out = list(p.map(rows(16), return_exceptions=True))
    assert [k for k, y in enumerate(out) if isinstance(y, KeyError)] == [3, 5]


def test_a_hanging_item_times_out_at_its_position_only(make_processor):
    # The chunk holding item 5 runs past item_timeout: its items are queued again one by
    # one (as for a chunk that raised); their call hangs too, so each is queued again
    # alone, and only item 5 times out.
    release = threading.Event()
    hung = []

    def model(batch):
        if (batch == 5).any():
            hung.append(len(batch))
            release.wait()
        return batch * 2

    p = make_processor(model, max_batch_size=8, max_retries=0, item_timeout=0.1)
    try:
        out = list(p.map(rows(16), return_exceptions=True))
    finally:
        release.set()
    assert isinstance(out[5], BatchTimeoutError)
    for k, y in enumerate(out):
        if k != 5:
            assert (y == 2 * k).all(), k
    # The chunk, its items together (in one call, or more as they arrive), then item 5
    # alone: one stuck call per step.
    assert hung[0] == 8 and hung[-1] == 1 and len(hung) <= 3
    assert _counts(p) == (9, 8, 1)  # the two chunks, less the one handed back, + 8 items
    assert p.get_stats()["total_timed_out"] == 1


class Outcomes:
    """A metrics collector that counts the requests reported per outcome."""

    def __init__(self):
        self.counts = {}
        self.lock = threading.Lock()

    def record_requests(self, latencies, queue_times, outcome):
        with self.lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + len(latencies)


def _counts(p):
    stats = p.get_stats()
    names = ("total_accepted", "total_processed", "total_errors", "total_expired",
             "total_cancelled", "queue_size")
    accepted, processed, errors, expired, cancelled, queued = (stats[n] for n in names)
    assert accepted == processed + errors + expired + cancelled + queued
    return accepted, processed, errors


def test_a_failed_chunk_is_counted_as_its_items_once_queued_again(make_processor):
    outcomes = Outcomes()
    p = make_processor(_failing_on(1), metrics_collector=outcomes, max_retries=0)
    out = list(p.map(rows(3), return_exceptions=True))
    assert isinstance(out[1], ValueError)
    # Three items, three requests, one failed: the chunk is not a failure of its own.
    assert _counts(p) == (3, 2, 1)
    assert p.get_stats()["error_rate"] == pytest.approx(1 / 3)
    assert outcomes.counts == {"ok": 2, "error": 1}


def test_counts_with_a_bad_item_and_a_good_chunk(make_processor):
    outcomes = Outcomes()
    p = make_processor(_failing_on(3), metrics_collector=outcomes, max_batch_size=8,
                       max_retries=0)
    out = list(p.map(rows(9), return_exceptions=True))  # chunks of 8 and 1
    assert [k for k, y in enumerate(out) if isinstance(y, ValueError)] == [3]
    # The first chunk's 8 items (7 results, 1 failure), the second chunk (1 result).
    assert _counts(p) == (9, 8, 1)
    assert outcomes.counts == {"ok": 8, "error": 1}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_chunk_failing_after_the_map_was_closed_is_one_failure(make_processor,
                                                                 asynchronous):
    # The second chunk is being called when the map is closed, then fails: nobody wants
    # its items any more, so they are not queued again, and the chunk counts as the one
    # failed request it was (not as nothing).
    running, closed = threading.Event(), threading.Event()
    model = Calls()

    def failing(batch):
        if (batch == 5).any():
            running.set()
            assert closed.wait(10)
            raise ValueError("bad row 5")
        return model(batch)

    p = make_processor(failing, max_batch_size=4, max_workers=1, max_retries=0)
    if asynchronous:
        async def main():
            results = p.amap(rows(8), buffersize=2)
            assert (await results.__anext__() == 0).all()
            assert running.wait(10)
            await results.aclose()

        asyncio.run(main())
    else:
        results = p.map(rows(8), buffersize=2)
        assert (next(results) == 0).all()
        assert running.wait(10)
        results.close()
    closed.set()
    _wait_for(lambda: p.get_stats()["total_errors"] == 1, "the chunk's failure")
    assert _counts(p) == (2, 1, 1)
    assert p.get_stats()["total_cancelled"] == 0
    assert model.sizes == [4]  # its items never ran alone


def pausing_when_chunk_fails(make_processor, bad, release=None):
    """A processor (one worker) whose model fails a chunk of several rows holding the row
    ``bad`` and pauses the processor as it does, after waiting for ``release`` (an
    event) if given; ``bad`` alone fails too. (processor, an event set as the chunk
    fails, the counting model that sees the calls that succeed)."""
    failing = threading.Event()
    model = Calls()

    def func(batch):
        if (batch == bad).any():
            if len(batch) > 1:
                if release is not None:
                    assert release.wait(10)
                p.pause()  # its items, queued again, stay queued until stop resumes
                failing.set()
            raise ValueError(f"bad row {bad}")
        return model(batch)

    p = make_processor(func, max_batch_size=4, max_workers=1, max_retries=0)
    return p, failing, model


@pytest.mark.parametrize("asynchronous", [False, True])
def test_closing_the_map_withdraws_a_failed_chunks_items(make_processor, asynchronous):
    # The second chunk failed while the iteration was at the first: its items were queued
    # again as it failed (and held there: the model paused the processor). Closing the
    # map withdraws them, as it withdraws its queued chunks.
    p, failing, model = pausing_when_chunk_fails(make_processor, 5)

    def after_the_failure():
        assert failing.wait(10)
        _wait_for(lambda: not p.get_stats()["active_batches"], "the chunk's failure")

    if asynchronous:
        async def main():
            results = p.amap(rows(8))
            assert (await results.__anext__() == 0).all()
            after_the_failure()
            await results.aclose()

        asyncio.run(main())
    else:
        results = p.map(rows(8))
        assert (next(results) == 0).all()
        after_the_failure()
        results.close()
    assert p.get_stats()["total_cancelled"] == 4
    assert _counts(p) == (5, 1, 0)  # the first chunk, and the four items withdrawn
    p.resume()
    p.enqueue_predict(np.zeros((1, 3), np.float32)).result()
    assert model.sizes == [4, 1]


def _after_the_first(p, asynchronous, between):
    """Iterate ``p.map``/``amap`` over 8 rows (chunks of 4) with ``return_exceptions``:
    the first result, then ``between()``, then the rest: (all results, the stats)."""
    if asynchronous:
        async def main():
            results = p.amap(rows(8), return_exceptions=True)
            first = await results.__anext__()
            between()
            return [first] + [y async for y in results]

        return asyncio.run(main())
    results = p.map(rows(8), return_exceptions=True)
    first = next(results)
    between()
    return [first, *results]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_chunk_failed_before_stop_has_its_items_drained_by_it(make_processor,
                                                                asynchronous):
    # The second chunk fails (one bad item) while the iteration is still at the first,
    # then stop() comes. The chunk was accepted before the stop and so are its items,
    # queued again one by one as it failed: stop drains them as it drains every request
    # accepted before it, and the iteration hands out their results after it.
    p, failing, model = pausing_when_chunk_fails(make_processor, 5)

    def stop_after_the_failure():
        assert failing.wait(10)
        _wait_for(lambda: not p.get_stats()["active_batches"], "the chunk's failure")
        p.stop()

    out = _after_the_first(p, asynchronous, stop_after_the_failure)
    assert len(out) == 8 and isinstance(out[5], ValueError), out
    assert [float(y[0, 0]) for k, y in enumerate(out) if k != 5] == [
        2.0 * k for k in range(8) if k != 5]
    # The first chunk, and the second's four items (three results, one error).
    assert _counts(p) == (5, 4, 1)
    assert sum(model.sizes) == 4 + 3  # each healthy item run once, after the stop began


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_chunk_failing_while_stop_drains_has_its_items_drained_too(make_processor,
                                                                     asynchronous):
    # The second chunk fails after stop() has closed the queue, while stop waits for the
    # call: its items are queued again all the same (accepted before the stop), and run.
    release = threading.Event()
    p, failing, model = pausing_when_chunk_fails(make_processor, 5, release)

    def stop_while_the_chunk_runs():
        stopper = threading.Thread(target=p.stop, kwargs={"timeout": 30})
        stopper.start()
        _wait_for(p.shutdown_event.is_set, "stop to close the queue")
        release.set()  # the chunk fails now, while stop waits for its call
        stopper.join(30)
        assert not stopper.is_alive() and failing.is_set()

    out = _after_the_first(p, asynchronous, stop_while_the_chunk_runs)
    assert len(out) == 8 and isinstance(out[5], ValueError), out
    assert [float(y[0, 0]) for k, y in enumerate(out) if k != 5] == [
        2.0 * k for k in range(8) if k != 5]
    assert _counts(p) == (5, 4, 1)
    assert sum(model.sizes) == 4 + 3


def test_a_failed_chunk_of_one_item_is_one_failure(make_processor):
    p = make_processor(_failing_on(0), max_retries=0)
    out = list(p.map(rows(1), return_exceptions=True))
    assert isinstance(out[0], ValueError)
    assert _counts(p) == (1, 0, 1)


def test_a_wrong_output_fails_its_chunk_items_alone(make_processor):
    p = make_processor(lambda b: b[:1], max_batch_size=8, max_retries=0)
    out = list(p.map(rows(5), return_exceptions=True))
    # Each item alone has one row, so the model's first row is right for it.
    assert [float(y[0, 0]) for y in out] == [0, 1, 2, 3, 4]
    p2 = make_processor(lambda b: b[:0], max_batch_size=8, max_retries=0)
    out = list(p2.map(rows(3), return_exceptions=True))
    assert all(isinstance(e, BatchOutputError) for e in out)


def test_bad_input_fails_its_own_position(make_processor):
    p = make_processor(lambda b: b, max_batch_size=8)
    items = [*rows(3), np.array(1.0, np.float32), *rows(3, start=3)]
    out = list(p.map(items, return_exceptions=True))
    assert isinstance(out[3], ValueError) and "0-d" in str(out[3])
    assert [float(y[0, 0]) for k, y in enumerate(out) if k != 3] == [0, 1, 2, 3, 4, 5]
    results = p.map(items)
    assert len([next(results) for _ in range(3)]) == 3
    with pytest.raises(ValueError, match="0-d"):
        next(results)


@pytest.mark.parametrize("method", ["map", "amap"])
def test_an_item_the_queue_refuses_fails_its_own_position(make_processor, method):
    p = make_processor(lambda b: b * 2, max_batch_size=8)
    huge = np.empty((2**40, 0), np.float32)  # more rows than the queue counts, no memory
    with pytest.raises(ValueError) as alone:
        p.enqueue_predict(huge)
    items = [*rows(3), huge, *rows(3, start=3)]
    out = _run(getattr(p, method)(items, return_exceptions=True))
    assert type(out[3]) is ValueError and str(out[3]) == str(alone.value)
    assert [float(y[0, 0]) for k, y in enumerate(out) if k != 3] == [0, 2, 4, 6, 8, 10]
    results = p.map(items)
    assert [float(next(results)[0, 0]) for _ in range(3)] == [0, 2, 4]
    with pytest.raises(ValueError, match="rows must be in"):
        next(results)


def test_a_chunk_stays_within_what_the_queue_takes_one_by_one(make_processor):
    # Items the queue takes alone are never refused together: a chunk closes before its
    # bytes pass the queue's range (views of 2**38 bytes each, no memory behind them).
    p = make_processor(max_batch_size=8)  # never started: nothing runs
    wide = np.broadcast_to(np.zeros((1, 1), np.float64), (1, 2**35))
    chunker = bulk.Chunker(p, 8)
    for _ in range(3):
        chunker.add(wide)
    chunker.flush()
    assert [(len(c.items), c.nbytes) for c in chunker.ready] == [(1, 2**38)] * 3
    p.enqueue_predict(wide).cancel()  # which the queue takes alone


def _raising_on_minus_one(raised):
    """A model of generic items: each times 10, or ``raised`` for a batch holding -1."""
    def model(batch):
        if -1 in batch:
            raise raised("the model's own")
        return [x * 10 for x in batch]
    return model


@pytest.mark.parametrize("method", ["map", "amap"])
@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
def test_a_models_interrupt_is_raised_whatever_return_exceptions_says(make_processor,
                                                                       method, raised):
    p = make_processor(_raising_on_minus_one(raised), max_batch_size=2, max_retries=0)
    got = []

    async def consume_async():
        async for y in p.amap([1, 2, -1, 3, 4], return_exceptions=True):
            got.append(y)

    with pytest.raises(raised, match="the model's own"):
        if method == "map":
            for y in p.map([1, 2, -1, 3, 4], return_exceptions=True):
                got.append(y)
        else:
            asyncio.run(consume_async())
    assert got == [10, 20]  # the chunk before it; nothing after, nothing in its place


@pytest.mark.parametrize("method", ["map", "amap"])
def test_items_and_return_exceptions_are_checked_at_the_call(make_processor, method):
    p = make_processor(lambda b: b, max_batch_size=8)
    call = getattr(p, method)
    with pytest.raises(TypeError, match="not iterable"):
        call(5)
    for bad in ("no", 1, None, np.array([True, False])):
        with pytest.raises(TypeError, match="return_exceptions must be a bool"):
            call(rows(2), return_exceptions=bad)
    assert len(_run(call(rows(2), return_exceptions=np.True_))) == 2


@pytest.mark.parametrize("method", ["map", "amap"])
@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
def test_an_input_that_raises_an_interrupt_raises_it_at_once(make_processor, method,
                                                             raised):
    # Unlike an Exception, which ends the input at its position after the results of
    # the items read before it, a Ctrl-C landing in the input is raised at once, and
    # the chunks of those items leave the queue.
    model = Calls()
    p = make_processor(model, max_batch_size=4)

    def source():
        yield from rows(6)
        raise raised("from the input")

    async def consume_async():
        async for _ in p.amap(source(), chunksize=2):
            pass

    p.pause()  # nothing read can finish before the input raises
    # Were the interrupt held back for the results read before it, they would come once
    # this resumes the processor, and the first would be handed out instead.
    hold_back_bound = threading.Timer(10.0, p.resume)
    hold_back_bound.start()
    try:
        with pytest.raises(raised, match="from the input"):
            if method == "map":
                next(p.map(source(), chunksize=2))
            else:
                asyncio.run(consume_async())
    finally:
        hold_back_bound.cancel()
    stats = p.get_stats()
    assert stats["queue_size"] == 0 and stats["total_cancelled"] == 3
    assert model.sizes == []
    p.resume()
    assert [float(y[0, 0]) for y in _run(p.map(rows(2)))] == [0.0, 2.0]
    assert model.sizes == [2]


@pytest.mark.parametrize("return_exceptions", [False, True])
def test_an_input_that_raises_ends_after_the_items_read_before(make_processor,
                                                                return_exceptions):
    p = make_processor(lambda b: b, max_batch_size=8)

    def source():
        yield from rows(21)
        raise RuntimeError("source broke")

    results = p.map(source(), return_exceptions=return_exceptions)
    got = [float(next(results)[0, 0]) for _ in range(21)]
    assert got == list(range(21))
    with pytest.raises(RuntimeError, match="source broke"):
        next(results)


# ----------------------------------------------------------------------- scheduling


def test_priority_reaches_the_queue(make_processor):
    seen = []

    def model(batch):
        seen.append(float(batch[0, 0]))
        return batch

    p = make_processor(model, max_batch_size=4, max_workers=1, enable_priority_queue=True)
    p.pause()
    out = []
    consumer = threading.Thread(target=lambda: out.extend(
        p.map(rows(8, start=100), chunksize=4, priority=BatchPriority.LOW)))
    consumer.start()
    _wait_for(lambda: p.get_stats()["queue_size"] == 2, "the map's two chunks queued")
    urgent = p.enqueue_predict(np.full((1, 3), -1.0, np.float32), priority=BatchPriority.HIGH)
    p.resume()
    urgent.result(timeout=10)
    consumer.join(timeout=10)
    assert not consumer.is_alive()
    assert seen[0] == -1.0 and len(out) == 8


def test_max_queue_time_expires_whole_chunks(make_processor):
    model = Calls()
    p = make_processor(model, max_batch_size=4)
    p.pause()  # nothing is dispatched: the chunks run out of queue time
    out = list(p.map(rows(10), max_queue_time=0.05, return_exceptions=True))
    assert len(out) == 10 and all(isinstance(e, QueueTimeoutError) for e in out)
    assert p.get_stats()["total_expired"] == 3
    assert model.sizes == []
    with pytest.raises(QueueTimeoutError):
        next(p.map(rows(2), max_queue_time=0.05))


@pytest.mark.parametrize("api", ["map", "amap"])
def test_an_expired_chunk_counts_its_max_queue_time_from_its_enqueue(make_processor, api):
    # The error says how long the chunk was allowed, as given: not its deadline less its
    # enqueue time (read from two clock readings, "-0.000 s"; from one, still rounded to
    # the clock's magnitude: 9.97e-10 s after hours of uptime).
    p = make_processor(Calls(), max_batch_size=4)
    p.pause()
    if api == "map":
        out = list(p.map(rows(6), max_queue_time=1e-9, return_exceptions=True))
    else:
        async def consume():
            return [y async for y in p.amap(rows(6), max_queue_time=1e-9,
                                            return_exceptions=True)]
        out = asyncio.run(consume())
    assert len(out) == 6 and all(isinstance(e, QueueTimeoutError) for e in out)
    assert all("past its max_queue_time of 1e-09 s in the queue" in str(e) for e in out), out


def consume_in_a_thread(p, items, **kwargs):
    """``list(p.map(items, **kwargs))`` on a thread of its own: (the thread, the list
    its results go to)."""
    out = []
    consumer = threading.Thread(target=lambda: out.extend(p.map(items, **kwargs)))
    consumer.start()
    return consumer, out


def resume_and_check_doubled(p, consumer, out, n):
    """Resume ``p`` and check that the map ``consume_in_a_thread`` runs ends with the n
    doubled rows of ``rows(n)``, in order."""
    p.resume()
    consumer.join(timeout=10)
    assert not consumer.is_alive()
    assert [float(y[0, 0]) for y in out] == [2.0 * k for k in range(n)]


def test_pause_holds_the_map_and_resume_finishes_it(make_processor):
    model = Calls()
    p = make_processor(model, max_batch_size=4)
    p.pause()
    consumer, out = consume_in_a_thread(p, rows(40), buffersize=3)
    _wait_for(lambda: p.get_stats()["queue_size"] == 3, "three chunks queued while paused")
    assert model.sizes == [] and out == []
    resume_and_check_doubled(p, consumer, out, 40)


class RecordingFuture:
    """Replaces map's future class: records the futures made, in order, and every wait
    on one (future, timeout) before it waits (or is interrupted, with ``interrupt``).
    Made after the processor: its own requests' futures (enqueue_predict) stay plain."""

    def __init__(self, monkeypatch, interrupt=False):
        import batchproc.processor

        made, waits = self.made, self.waits = [], []
        base = batchproc.processor._RequestFuture

        class Recorded(base):
            def __init__(self):
                super().__init__()
                made.append(self)

            def _wait(self, timeout):
                waits.append((self, timeout))
                if interrupt:
                    raise KeyboardInterrupt
                return super()._wait(timeout)

        monkeypatch.setattr(batchproc.processor, "_RequestFuture", Recorded)


def test_the_iterating_thread_waits_for_chunks_in_groups_of_half_the_window(
        make_processor, monkeypatch):
    # Woken once per chunk, the iterating thread would take the GIL from the model once
    # per chunk: while the oldest chunk is pending it waits for the one half a window
    # after it, within GROUP_WAIT_S, and hands out the chunks up to it together.
    monkeypatch.setattr(bulk, "GROUP_WAIT_S", 30.0)
    model = Calls()
    p = make_processor(model, max_batch_size=4)
    futures = RecordingFuture(monkeypatch)
    p.pause()
    consumer, out = consume_in_a_thread(p, rows(32), buffersize=8)
    _wait_for(lambda: futures.waits, "the iterating thread waiting")
    assert futures.waits[0] == (futures.made[4], 30.0)  # chunk 4 of 0..7
    resume_and_check_doubled(p, consumer, out, 32)


def test_a_group_that_does_not_complete_in_time_is_followed_by_waits_for_one_chunk(
        make_processor, monkeypatch):
    # Chunks slower than GROUP_WAIT_S gain nothing from a group: after one that missed,
    # the iterating thread waits for the oldest chunk alone.
    monkeypatch.setattr(bulk, "GROUP_WAIT_S", 0.0)  # every group misses
    p = make_processor(Calls(), max_batch_size=4)
    futures = RecordingFuture(monkeypatch)
    p.pause()
    consumer, out = consume_in_a_thread(p, rows(32), buffersize=8)
    _wait_for(lambda: len(futures.waits) >= 2, "the iterating thread waiting")
    assert futures.waits[:2] == [(futures.made[4], 0.0), (futures.made[0], None)]
    resume_and_check_doubled(p, consumer, out, 32)


def test_a_slow_later_chunk_does_not_hold_up_the_results_before_it(make_processor,
                                                                   monkeypatch):
    # Chunk 2 fails once and waits a minute for its retry: the group the iterating
    # thread waits for (chunks 0-2) does not complete, and chunks 0 and 1 are handed out
    # once GROUP_WAIT_S has passed, not when chunk 2 is done.
    monkeypatch.setattr(bulk, "GROUP_WAIT_S", 0.5)
    failed = []

    def model(batch):
        if (batch == 2).any() and not failed:
            failed.append(True)
            raise ValueError("fails once")
        return batch * 2

    p = make_processor(model, max_batch_size=1, retry_delay=60.0)
    p.pause()
    results = p.map(rows(8), buffersize=4)
    got = []
    consumer = threading.Thread(target=lambda: got.extend(itertools.islice(results, 2)))
    consumer.start()
    _wait_for(lambda: p.get_stats()["queue_size"] == 4, "four chunks queued while paused")
    p.resume()
    consumer.join(timeout=20)
    assert not consumer.is_alive(), "results held up by the chunk after them"
    assert [float(y[0, 0]) for y in got] == [0.0, 2.0] and failed
    results.close()  # withdraws chunk 2 from its retry


def test_interrupted_waiting_for_a_group_of_chunks_withdraws_them(make_processor,
                                                                 monkeypatch):
    model = Calls()
    p = make_processor(model, max_batch_size=4)
    futures = RecordingFuture(monkeypatch, interrupt=True)
    p.pause()
    results = p.map(rows(32), buffersize=8)
    with pytest.raises(KeyboardInterrupt):
        next(results)
    assert futures.waits == [(futures.made[4], bulk.GROUP_WAIT_S)]
    check_all_withdrawn_and_running(p, model, 8, monkeypatch)


def test_stop_mid_map_raises_processor_stopped(make_processor):
    p = make_processor(lambda b: b, max_batch_size=4)
    read = itertools.count()

    def endless():
        for k in read:
            yield np.full((1, 1), float(k))

    results = p.map(endless(), buffersize=2)
    got = [next(results) for _ in range(5)]
    p.stop()  # finishes what is queued; the next chunk is refused
    with pytest.raises(ProcessorStoppedError):
        for y in results:
            got.append(y)
    assert 5 < len(got) <= 5 + 3 * 4
    assert [float(y[0, 0]) for y in got] == list(range(len(got)))
    assert next(read) == len(got) + 4  # one refused chunk read, nothing after it


def test_stop_with_a_stuck_model_fails_the_map_without_hanging(make_processor):
    started, gate = threading.Event(), threading.Event()

    def model(batch):
        started.set()
        gate.wait(10)
        return batch

    p = make_processor(model, max_batch_size=4)
    outcome = []

    def consume():
        try:
            list(p.map(rows(40), return_exceptions=True))
        except BaseException as exc:
            outcome.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert started.wait(10)
    p.stop(timeout=0.2)
    gate.set()
    consumer.join(timeout=10)
    assert not consumer.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ProcessorStoppedError)


def test_map_on_a_stopped_processor(make_processor):
    p = make_processor(lambda b: b)
    p.stop()
    with pytest.raises(ProcessorStoppedError):
        next(p.map(rows(3)))


# ----------------------------------------------------------------------- asyncio


def test_amap_sync_and_async_inputs(make_processor):
    p = make_processor(lambda b: b * 2, max_batch_size=8)

    async def source():
        for x in rows(30):
            yield x

    async def main():
        a = [y async for y in p.amap(source())]
        b = [y async for y in p.amap(rows(30))]
        return a, b

    a, b = asyncio.run(main())
    assert [float(y[0, 0]) for y in a] == [2.0 * k for k in range(30)]
    assert [float(y[0, 0]) for y in b] == [2.0 * k for k in range(30)]
    assert p.get_stats()["total_accepted"] == 8


def test_amap_failures_at_their_position(make_processor):
    p = make_processor(_failing_on(11), max_batch_size=8, max_retries=0)

    async def main():
        out = [y async for y in p.amap(rows(20), return_exceptions=True)]
        results = p.amap(rows(20))
        first = [await results.__anext__() for _ in range(11)]
        with pytest.raises(ValueError, match="bad row 11"):
            await results.__anext__()
        return out, first

    out, first = asyncio.run(main())
    assert [k for k, y in enumerate(out) if isinstance(y, ValueError)] == [11]
    assert [float(y[0, 0]) for y in first] == [2.0 * k for k in range(11)]


def test_amap_input_error_and_bad_item(make_processor):
    p = make_processor(lambda b: b, max_batch_size=8)
    two = rows(2)

    async def source():
        yield two[0]
        yield np.ones(())  # 0-d: refused at its position
        yield two[1]
        raise RuntimeError("source broke")

    async def main():
        out = []
        with pytest.raises(RuntimeError, match="source broke"):
            async for y in p.amap(source(), return_exceptions=True):
                out.append(y)
        return out

    out = asyncio.run(main())
    assert len(out) == 3 and isinstance(out[1], ValueError)


def test_amap_does_not_block_the_loop_and_aclose_withdraws(make_processor):
    model = Calls()
    p = make_processor(model, max_batch_size=4, max_queue_size=2)
    p.pause()

    async def main():
        results = p.amap(rows(40), buffersize=6)
        consumer = asyncio.ensure_future(results.__anext__())
        # The queue holds 2 chunks and the map waits for room: the loop keeps running.
        while p.get_stats()["queue_size"] < 2:
            await asyncio.sleep(0)
        for _ in range(10):
            await asyncio.sleep(0)
        assert not consumer.done()
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await results.aclose()

    asyncio.run(main())
    assert p.get_stats()["queue_size"] == 0
    assert model.sizes == []


def _cancel_when_queued(p, consumer, queued):
    """Once ``queued`` requests wait in the (paused) processor's queue: cancel the task
    ``consumer`` and return the queue size right after it finished."""

    async def main():
        task = asyncio.ensure_future(consumer())
        while p.get_stats()["queue_size"] < queued:
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return p.get_stats()["queue_size"]

    return asyncio.run(main())


def test_cancelling_the_amap_task_withdraws_the_awaited_chunk_too(make_processor):
    model = Calls()
    p = make_processor(model, max_batch_size=4)
    p.pause()

    async def consume():
        async for _ in p.amap(rows(32), buffersize=8):
            pass

    # The task waits for the first chunk's result: cancelling it cancels that chunk's
    # future, and the chunk leaves the queue with the seven others.
    assert _cancel_when_queued(p, consume, 8) == 0
    assert p.get_stats()["total_cancelled"] == 8
    p.resume()
    p.enqueue_predict(np.zeros((1, 3), np.float32)).result()
    assert model.sizes == [1]


def test_cancelling_the_amap_task_withdraws_a_failed_chunks_items(make_processor):
    p, model = pausing_on_a_failed_chunk(make_processor)

    async def consume():
        async for _ in p.amap(rows(4), buffersize=1):
            pass

    assert _cancel_when_queued(p, consume, 4) == 0
    assert p.get_stats()["total_cancelled"] == 4
    p.resume()
    p.enqueue_predict(np.zeros((1, 3), np.float32)).result()
    assert model.sizes == [1]


def test_amap_aclose_after_a_result_withdraws_queued_chunks(make_processor):
    started, gate = threading.Event(), threading.Event()
    model = Calls(lambda batch: (started.set(), gate.wait(10), batch)[2])
    p = make_processor(model, max_batch_size=4, max_workers=1)

    async def main():
        results = p.amap(rows(40), chunksize=4, buffersize=6)
        first = asyncio.ensure_future(results.__anext__())
        while not started.is_set() or p.get_stats()["queue_size"] < 5:
            await asyncio.sleep(0)
        p.pause()
        gate.set()
        assert (await first == 0).all()
        await results.aclose()  # suspended at a result: the five queued chunks leave
        return p.get_stats()

    stats = asyncio.run(main())
    assert stats["queue_size"] == 0 and stats["total_cancelled"] == 5
    p.resume()
    p.enqueue_predict(np.zeros((1, 3), np.float32)).result()
    assert model.sizes == [4, 1]


def test_amap_stop_raises_processor_stopped(make_processor):
    p = make_processor(lambda b: b, max_batch_size=4)

    async def main():
        got = []
        with pytest.raises(ProcessorStoppedError):
            async for y in p.amap(rows(100), buffersize=2):
                got.append(y)
                if len(got) == 5:
                    p.stop()
        return got

    got = asyncio.run(main())
    assert 5 <= len(got) < 100
    assert [float(y[0, 0]) for y in got] == list(range(len(got)))


# ----------------------------------------------------------------------- the native taker


def test_take_like_takes_a_run_of_arrays_exactly_like_the_template(make_processor):
    from batchproc._native.future_state import DUE, ENDED, TOOK_ALL, take_like

    p = make_processor()
    template = p._describer.describe(np.zeros((1, 3), np.float32), None, 0.0)[0]
    same = rows(5)
    other_shape = np.zeros((2, 3), np.float32)
    requests, items = [], []
    taken, stop = take_like(iter([*same, other_shape, *same]), template, 10, requests, items)
    assert taken == 5 and stop is other_shape
    assert items == same and [r.item for r in requests] == same
    assert all(r.rows == 1 and r.format is template.format for r in requests)
    assert take_like(iter(same), template, 3, [], []) == (3, TOOK_ALL)
    assert take_like(iter(same[:2]), template, 3, [], []) == (2, ENDED)
    other_dtype = np.zeros((1, 3), np.float64)
    assert take_like(iter([other_dtype]), template, 3, [], [])[1] is other_dtype

    # An item taken at or after `due` (a time.monotonic() time) ends the run with DUE.
    requests, items = [], []
    assert take_like(iter(same), template, 10, requests, items, 0.0) == (1, DUE)
    assert items == same[:1] and len(requests) == 1
    later = time.monotonic() + 3600
    assert take_like(iter(same), template, 3, [], [], later) == (3, TOOK_ALL)

    def broken():
        yield from same[:2]
        raise RuntimeError("source broke")

    requests, items = [], []
    with pytest.raises(RuntimeError, match="source broke"):
        take_like(broken(), template, 10, requests, items)
    assert len(requests) == len(items) == 2  # what was taken before stays


@pytest.mark.parametrize("raised", [asyncio.CancelledError, StopIteration])
def test_a_chunk_failing_with_a_models_control_flow_exception_fails_only_its_item(
        make_processor, raised):
    # asyncio's CancelledError is a BaseException, but a model's own is a failure like
    # any other: the chunk's items are queued again one by one, and only the one that
    # causes it fails (as a RuntimeError, its cause the model's), as a StopIteration's.
    p = make_processor(_raising_on_minus_one(raised), max_batch_size=4, max_retries=0)
    out = list(p.map([1, 2, -1, 3, 4], return_exceptions=True))
    assert out[:2] + out[3:] == [10, 20, 30, 40]
    assert isinstance(out[2], RuntimeError) and isinstance(out[2].__cause__, raised)

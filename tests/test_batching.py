"""Batching semantics: rows vs stacked samples vs generic items, compatibility, caps,
splitting, buffer aliasing, odd arrays, many clients, low-load latency."""

import statistics
import threading
import time

import numpy as np
import pytest

from batchproc import BatchOutputError, BatchProcessorConfig


def rows(n, start=0, features=3, dtype=np.float64):
    return (np.arange(start, start + n * features, dtype=dtype)).reshape(n, features)


def test_items_are_concatenated_rows_and_each_gets_its_slice(make_processor, recorder):
    model = recorder(lambda b: b * 2)
    p = make_processor(model, max_batch_size=64)
    p.pause()
    items = [rows(1, 0), rows(2, 100), rows(3, 200)]
    futures = [p.enqueue_predict(x) for x in items]
    p.resume()
    for item, future in zip(items, futures):
        np.testing.assert_array_equal(future.result(timeout=10), item * 2)
    assert model.sizes == [6]  # one batch of 6 rows


def test_one_dimensional_items_count_elements_as_rows(make_processor):
    p = make_processor(lambda b: b * 2)
    np.testing.assert_array_equal(p.enqueue_predict(np.array([1, 2, 3])).result(timeout=10),
                                  [2, 4, 6])


def test_stack_items_treats_each_item_as_one_sample(make_processor, recorder):
    model = recorder(lambda b: b.sum(axis=1, keepdims=True))
    p = make_processor(model, stack_items=True)
    p.pause()
    samples = [np.full(4, i, dtype=np.float32) for i in range(5)]
    futures = [p.enqueue_predict(s) for s in samples]
    p.resume()
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(future.result(timeout=10), [4.0 * i])
    assert model.batches[0].shape == (5, 4)


def test_stack_items_accepts_0d_samples(make_processor):
    p = make_processor(lambda b: b + 1, stack_items=True)
    assert p.enqueue_predict(np.array(2.0)).result(timeout=10) == 3.0


def test_0d_arrays_are_rejected_at_enqueue_without_stack_items(make_processor):
    p = make_processor(lambda b: b)
    with pytest.raises(ValueError, match="0-d"):
        p.enqueue_predict(np.array(5.0))


def test_generic_items_are_batched_as_lists(make_processor, recorder):
    model = recorder(lambda batch: [repr(x) for x in batch])
    p = make_processor(model)
    p.pause()
    items = ["text", {"k": 1}, [1, 2], 7]
    futures = [p.enqueue_predict(x) for x in items]
    p.resume()
    assert [f.result(timeout=10) for f in futures] == [repr(x) for x in items]
    assert model.batches == [items]


def test_only_compatible_items_share_a_batch(make_processor, recorder):
    model = recorder(lambda b: b + 1)
    p = make_processor(model, max_batch_size=64)
    p.pause()
    kinds = [rows(1, dtype=np.float32), rows(1, dtype=np.float64),
             rows(1, features=4, dtype=np.float32), "generic"]
    items = [kinds[i % 4] if i % 4 != 3 else f"g{i}" for i in range(12)]
    model.func = lambda b: [x + "!" for x in b] if isinstance(b, list) else b + 1
    futures = [p.enqueue_predict(x) for x in items]
    p.resume()
    for item, future in zip(items, futures):
        if isinstance(item, str):
            assert future.result(timeout=10) == item + "!"
        else:
            result = future.result(timeout=10)
            assert result.dtype == item.dtype
            np.testing.assert_array_equal(result, item + 1)
    for batch in model.batches:
        if isinstance(batch, np.ndarray):
            assert batch.shape[0] == 3  # never mixed: 3 of each array kind
    assert len(model.batches) == 4


def test_no_batch_exceeds_max_batch_size_rows(make_processor, recorder):
    model = recorder()
    p = make_processor(model, max_batch_size=4, initial_batch_size=4)
    p.pause()
    futures = [p.enqueue_predict(rows(1 + i % 3, start=i)) for i in range(30)]
    p.resume()
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(future.result(timeout=10), rows(1 + i % 3, start=i))
    assert max(model.sizes) <= 4


def test_no_batch_exceeds_the_byte_cap(make_processor, recorder):
    model = recorder()
    row_bytes = rows(1).nbytes  # 24 bytes
    p = make_processor(model, max_batch_memory_mb=(2.5 * row_bytes) / 2**20)
    p.pause()
    futures = [p.enqueue_predict(rows(1, start=i)) for i in range(9)]
    p.resume()
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(future.result(timeout=10), rows(1, start=i))
    assert max(b.nbytes for b in model.batches) <= 2.5 * row_bytes
    assert max(model.sizes) == 2


def test_an_item_larger_than_max_rows_is_split_and_rejoined(make_processor, recorder):
    model = recorder(lambda b: b[:, :1] * 3)
    p = make_processor(model, max_batch_size=4)
    big = rows(10)
    result = p.enqueue_predict(big).result(timeout=10)
    np.testing.assert_array_equal(result, big[:, :1] * 3)
    assert model.sizes == [4, 4, 2]
    stats = p.get_stats()
    assert stats["total_processed"] == 1  # a split item counts once


def test_each_call_of_a_split_item_counts_as_the_call_it_was(make_processor, recorder):
    # Counted as one call of all its rows, a split item showed batches above
    # max_batch_size (metrics, statistics) and fed the controller's fit one "call" of
    # 10 rows taking three calls' time.
    class Calls:
        def __init__(self):
            self.batches = []  # (requests, rows) per record_batch
            self.outcomes = []  # (requests, outcome) per record_requests

        def record_batch(self, size, rows, queue_time, processing_time, outcome):
            self.batches.append((size, rows))

        def record_requests(self, latencies, queue_times, outcome):
            self.outcomes.append((len(latencies), outcome))

    calls = Calls()
    model = recorder(lambda b: b[:, :1] * 3)
    p = make_processor(metrics_collector=calls, max_batch_size=4)
    observed = []
    observe_batch = p._controller.observe_batch
    p._controller.observe_batch = lambda rows, *rest: (observed.append(rows),
                                                       observe_batch(rows, *rest))
    p.start(model)
    big = rows(10)
    np.testing.assert_array_equal(p.enqueue_predict(big).result(timeout=10), big[:, :1] * 3)
    assert model.sizes == [4, 4, 2]
    assert calls.batches == [(1, 4), (1, 4), (1, 2)]
    assert calls.outcomes == [(1, "ok")]
    assert observed == [4, 4, 2]
    stats = p.get_stats()
    assert (stats["total_batches"], stats["total_processed"]) == (3, 1)
    assert stats["avg_batch_size"] == pytest.approx(10 / 3)


def test_a_failing_call_of_a_split_item_counts_as_a_failed_call(make_processor):
    # As any failed call is recorded (its rows, outcome "error"): it was left out.
    calls = []

    class Outcomes:
        def record_batch(self, size, rows, queue_time, processing_time, outcome):
            calls.append((size, rows, outcome))

    def model(batch):
        if batch[0, 0] == 12:  # the second chunk: rows 4-7, three values a row
            raise ValueError("bad chunk")
        return batch

    p = make_processor(model, metrics_collector=Outcomes(), max_batch_size=4,
                       max_retries=0)
    with pytest.raises(ValueError, match="bad chunk"):
        p.enqueue_predict(rows(10)).result(timeout=10)
    assert calls == [(1, 4, "ok"), (1, 4, "error")]
    stats = p.get_stats()
    assert (stats["total_batches"], stats["total_errors"]) == (1, 1)


def test_a_row_larger_than_the_byte_cap_goes_alone(make_processor, recorder):
    model = recorder(lambda b: b * 2)
    p = make_processor(model, max_batch_memory_mb=10 / 2**20)  # 10 bytes
    big = rows(3)  # 24-byte rows
    np.testing.assert_array_equal(p.enqueue_predict(big).result(timeout=10), big * 2)
    assert model.sizes == [1, 1, 1]


def test_an_item_of_0_rows_gets_0_rows_beside_others_and_alone_calls_the_model_on_0(
        make_processor, recorder):
    model = recorder(lambda b: b[:, :2] * 2)
    p = make_processor(model, max_batch_size=8)
    p.pause()
    items = [rows(2), rows(0), rows(1, 10)]
    futures = [p.enqueue_predict(x) for x in items]
    p.resume()
    for item, future in zip(items, futures):
        np.testing.assert_array_equal(future.result(timeout=10), item[:, :2] * 2)
    assert model.sizes == [3]
    alone = p.enqueue_predict(rows(0)).result(timeout=10)
    assert alone.shape == (0, 2) and model.sizes == [3, 0]


def test_results_never_change_after_delivery_when_output_aliases_the_buffer(make_processor):
    # lambda x: x returns the reused input buffer itself; thousands of batches later every
    # delivered result must still hold its own values.
    p = make_processor(lambda x: x, max_batch_size=2, initial_batch_size=2, max_workers=2,
                       processing_strategy="greedy", max_queue_size=10000)
    futures = [p.enqueue_predict(rows(1, start=i)) for i in range(4000)]
    results = [f.result(timeout=30) for f in futures]
    p.stop(timeout=10)
    assert p.get_stats()["total_batches"] >= 2000
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, rows(1, start=i))


def test_in_place_models_do_not_touch_the_callers_array(make_processor):
    def in_place(batch):
        batch *= 2
        return batch

    p = make_processor(in_place)
    item = rows(2)
    original = item.copy()
    np.testing.assert_array_equal(p.enqueue_predict(item).result(timeout=10), original * 2)
    np.testing.assert_array_equal(item, original)


def test_wrong_output_length_fails_with_a_value_error_naming_both(make_processor):
    p = make_processor(lambda b: b[:-1], max_retries=0, retry_delay=0.0)
    with pytest.raises(ValueError, match=r"2 results for a batch of 3") as info:
        p.enqueue_predict(rows(3)).result(timeout=10)
    assert isinstance(info.value, BatchOutputError)


@pytest.mark.parametrize("item", [np.ones(8, np.float32), np.ones(100, np.float32)])
def test_a_wrong_count_behind_a_1d_item_says_how_it_was_counted(make_processor, item):
    # One sample of 8 features given as shape (8,) is 8 rows: a model that reduces its
    # input gives fewer results, and the error says why the batch had 8 rows. (100 values
    # run in pieces of at most max_batch_size rows.)
    p = make_processor(lambda b: b[:1], max_retries=0, retry_delay=0.0)
    with pytest.raises(BatchOutputError, match=r"a 1-D item, which counts one row per "
                                               r"value: one sample of N values is an item "
                                               r"of shape \(1, N\), not \(N,\)"):
        p.enqueue_predict(item).result(timeout=10)


class _Shaped:
    """An item of no array kind with a ``shape`` of its own (counted by ``item_size``)."""

    def __init__(self, shape):
        self._shape = shape

    @property
    def shape(self):
        if self._shape is None:
            raise RuntimeError("no shape yet")
        return self._shape


@pytest.mark.parametrize("shape", [(5,), 7, None], ids=["1-D", "an int", "raises"])
def test_items_of_no_array_kind_get_their_count_not_a_hint(make_processor, shape):
    # One result per item, the item weighing 5 rows (item_size) toward max_batch_size,
    # whatever its shape says or does.
    p = make_processor(lambda b: np.zeros(3), item_size=lambda x: 5, max_retries=0,
                       retry_delay=0.0)
    with pytest.raises(BatchOutputError) as info:
        p.enqueue_predict(_Shaped(shape)).result(timeout=10)
    assert str(info.value) == "process_func returned 3 results for a batch of 1"


def test_a_wrong_count_of_2d_items_gives_no_such_hint(make_processor):
    p = make_processor(lambda b: b[:-1], max_retries=0, retry_delay=0.0)
    with pytest.raises(BatchOutputError) as info:
        p.enqueue_predict(rows(3)).result(timeout=10)
    assert str(info.value) == "process_func returned 2 results for a batch of 3"


def test_output_without_length_is_a_failure(make_processor):
    p = make_processor(lambda b: 42, max_retries=0, retry_delay=0.0)
    with pytest.raises(ValueError, match="int, which the output rule cannot split"):
        p.enqueue_predict(rows(1)).result(timeout=10)


@pytest.mark.parametrize("make", [
    lambda: np.arange(24.0).reshape(4, 6)[:, ::2],                 # non-contiguous
    lambda: np.asfortranarray(np.arange(12.0).reshape(4, 3)),      # Fortran order
    lambda: np.arange(12.0).reshape(4, 3).astype(">f8"),           # byte-swapped
    lambda: np.arange(12.0).reshape(4, 3)[::-1],                   # negative stride
])
def test_odd_arrays_are_accepted(make_processor, make):
    p = make_processor(lambda b: b + 0.5)
    item = make()
    result = p.enqueue_predict(item).result(timeout=10)
    np.testing.assert_array_equal(result, np.asarray(item, dtype=np.float64) + 0.5)


def test_object_arrays_go_through_numpy_concatenation(make_processor):
    p = make_processor(lambda b: np.array([str(x) for x in b[:, 0]], dtype=object))
    p.pause()
    a = np.array([[1], [2]], dtype=object)
    b = np.array([["x"]], dtype=object)
    fa, fb = p.enqueue_predict(a), p.enqueue_predict(b)
    p.resume()
    assert list(fa.result(timeout=10)) == ["1", "2"]
    assert list(fb.result(timeout=10)) == ["x"]


def test_many_client_threads_get_exactly_their_results(make_processor):
    p = make_processor(lambda b: b * 3 + 1, max_queue_size=10000)
    clients, per_client = 16, 150
    errors = []
    barrier = threading.Barrier(clients)

    def client(cid):
        barrier.wait()
        for j in range(per_client):
            x = np.array([[cid, j]], dtype=np.int64)
            got = p.enqueue_predict(x).result(timeout=30)
            if not np.array_equal(got, x * 3 + 1):
                errors.append((cid, j, got))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert p.get_stats()["total_processed"] == clients * per_client


def test_low_load_requests_do_not_wait_for_batch_timeout(make_processor):
    # batch_timeout is a ceiling, not a delay: one client at a time must not wait for it.
    p = make_processor(lambda b: b, batch_timeout=2.0)
    latencies = []
    for i in range(40):
        started = time.monotonic()
        p.enqueue_predict(rows(1, start=i)).result(timeout=10)
        latencies.append(time.monotonic() - started)
    assert statistics.median(latencies) < 0.2


def test_fixed_strategy_waits_up_to_batch_timeout_to_fill(make_processor):
    p = make_processor(lambda b: b, processing_strategy="fixed", batch_timeout=0.3,
                       initial_batch_size=8)
    started = time.monotonic()
    p.enqueue_predict(rows(1)).result(timeout=10)
    assert time.monotonic() - started >= 0.29


def test_fixed_strategy_dispatches_as_soon_as_the_batch_is_full(make_processor, recorder):
    model = recorder()
    p = make_processor(model, processing_strategy="fixed", batch_timeout=30.0,
                       initial_batch_size=4, max_batch_size=4)
    futures = [p.enqueue_predict(rows(1, start=i)) for i in range(4)]
    for f in futures:
        f.result(timeout=10)  # would take 30 s if it waited for the time-out
    assert model.sizes == [4]


@pytest.mark.parametrize("out", [
    np.arange(6.0),                                   # 1-D
    np.arange(12.0).reshape(6, 2),                    # 2-D
    np.arange(24.0).reshape(6, 2, 2),                 # 3-D
    np.arange(12.0).reshape(2, 6).T,                  # not contiguous
    np.ma.masked_array(np.arange(6.0)),               # a subclass: the generic path
    list(range(6)),                                   # not an array
], ids=["1d", "2d", "3d", "transposed", "subclass", "list"])
@pytest.mark.parametrize("rows", [[1] * 6, [2, 1, 0, 3], [6]],
                         ids=["one-row-each", "mixed", "one-request"])
def test_split_gives_each_request_exactly_its_rows(out, rows):
    from batchproc.formats import Workspace, make_describer

    describe = make_describer(BatchProcessorConfig()).describe
    requests = [describe(np.zeros((r, 2)), None, 0.0)[0] for r in rows]
    fmt = requests[0].format
    parts = fmt.split(out, requests, fmt.build(requests, Workspace()))
    start = 0
    for part, r in zip(parts, rows, strict=True):
        expected = out[start:start + r]
        start += r
        assert type(part) is type(expected)
        assert np.shape(part) == np.shape(expected)
        assert np.array_equal(part, expected)


def test_a_worker_back_from_a_batch_spins_for_a_client_waiting_on_each_answer(
        make_processor, monkeypatch):
    # The next request of a client that waits on each answer comes within microseconds:
    # the worker busy-waits for it (RequestQueue.spin) instead of parking, which would
    # cost the round trip a thread wake-up.
    from batchproc.engine import workers

    monkeypatch.setattr(workers, "usable_cpus", lambda: 2.0)
    p = make_processor(lambda batch: batch, max_workers=1)
    assert p._queue.spin == workers.POP_SPIN > 0.0
    p._queue.spin = 10.0  # long enough for any scheduling delay: the request ends it
    for i in range(20):
        assert p.enqueue_predict(np.full((1, 2), i)).result(10)[0, 0] == i
    assert p._queue._spins()[1] > 0


@pytest.mark.parametrize("cpus", [1.0, 1.5])
def test_on_less_than_two_cpus_the_workers_do_not_spin(make_processor, monkeypatch, cpus):
    # There the request a spinning worker waits for cannot be sent while it spins, or a
    # container's CPU quota pays for the spin (engine.cpus.usable_cpus).
    from batchproc.engine import workers

    monkeypatch.setattr(workers, "usable_cpus", lambda: cpus)
    p = make_processor(lambda batch: batch)
    assert p._queue.spin == 0.0
    for i in range(5):
        p.enqueue_predict(np.full((1, 2), i)).result(10)
    assert p._queue._spins() == (0, 0)

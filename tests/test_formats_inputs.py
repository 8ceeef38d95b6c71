"""Input formats (docs/formats.md): named and tuple inputs, ragged sequences with padding,
generic items with item_size, and bad input refused at enqueue at no cost to others."""

import threading

import numpy as np
import pytest

from batchproc import BatchOutputError


def one_batch(p, items, **kwargs):
    p.pause()
    futures = [p.enqueue_predict(x, **kwargs) for x in items]
    p.resume()
    return futures


def tokens(length, start=1, rows=1):
    ids = np.arange(start, start + rows * length, dtype=np.int64).reshape(rows, length)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


# ------------------------------------------------------------------ named and tuple inputs


def test_named_inputs_are_batched_key_by_key(make_processor):
    seen = []

    def model(batch):
        seen.append({k: v.copy() for k, v in batch.items()})
        return {"score": batch["input_ids"].sum(axis=1) * batch["attention_mask"][:, 0]}

    p = make_processor(model, max_batch_size=64)
    items = [tokens(4, start=10 * i, rows=1 + i % 2) for i in range(3)]
    futures = one_batch(p, items)
    for item, future in zip(items, futures):
        np.testing.assert_array_equal(future.result(timeout=10)["score"],
                                      item["input_ids"].sum(axis=1))
    assert len(seen) == 1 and seen[0]["input_ids"].shape == (4, 4)
    np.testing.assert_array_equal(seen[0]["input_ids"],
                                  np.concatenate([x["input_ids"] for x in items]))


def test_key_order_does_not_matter_and_other_keys_wait_for_their_own_batch(make_processor,
                                                                           recorder):
    calls = []

    def model(batch):
        calls.append(sorted(batch))
        return batch["a"] * 2

    p = make_processor(model)
    a = np.ones((1, 2))
    items = [{"a": a, "b": a}, {"b": a, "a": a * 3}, {"a": a, "c": a}]
    futures = one_batch(p, items)
    for item, future in zip(items, futures):
        np.testing.assert_array_equal(future.result(timeout=10), item["a"] * 2)
    assert sorted(calls) == [["a", "b"], ["a", "c"]]


def test_tuple_inputs_are_batched_by_position(make_processor):
    p = make_processor(lambda batch: batch[0] @ np.ones((2, 1)) + batch[1])
    items = [(np.full((1, 2), float(i)), np.full((1, 1), 100.0 * i)) for i in range(3)]
    for i, future in enumerate(one_batch(p, items)):
        np.testing.assert_array_equal(future.result(timeout=10), [[2.0 * i + 100.0 * i]])


def test_stacked_named_inputs(make_processor):
    p = make_processor(lambda b: b["x"].sum(axis=1) + b["y"], stack_items=True)
    items = [{"x": np.full(3, float(i)), "y": np.asarray(float(i))} for i in range(3)]
    for i, future in enumerate(one_batch(p, items)):
        assert future.result(timeout=10) == 4.0 * i


def test_mappings_and_tuples_without_arrays_are_generic_items(make_processor, recorder):
    model = recorder(lambda batch: [repr(x) for x in batch])
    p = make_processor(model)
    items = [{"text": "hi"}, ("a", 1)]
    assert [f.result(timeout=10) for f in one_batch(p, items)] == [repr(x) for x in items]


@pytest.mark.parametrize("bad, match", [
    ({"input_ids": np.ones((1, 3)), "attention_mask": np.ones((2, 3))},
     r"item\['input_ids'\] has 1 rows but item\['attention_mask'\] has 2"),
    ({"input_ids": np.ones((1, 3)), "meta": "x"}, r"item\['meta'\] is str"),
    ((np.ones((1, 3)), 7), r"item\[1\] is int"),
    ({"x": np.zeros(())}, r"item\['x'\]: 0-d arrays"),
    (np.array([[1, 2, 3], [4, 5]], dtype=object), "ragged rows.*set pad_value"),
], ids=["unequal rows", "mixed mapping", "mixed tuple", "0-d input", "ragged object array"])
def test_bad_input_is_refused_at_enqueue_and_costs_others_nothing(make_processor, bad, match):
    p = make_processor(lambda b: b * 2 if isinstance(b, np.ndarray) else b)
    p.pause()
    good = [p.enqueue_predict(np.full((1, 2), float(i))) for i in range(3)]
    with pytest.raises((ValueError, TypeError), match=match):
        p.enqueue_predict(bad)
    p.resume()
    for i, future in enumerate(good):
        np.testing.assert_array_equal(future.result(timeout=10), np.full((1, 2), 2.0 * i))
    assert p.get_stats()["total_accepted"] == 3


# ------------------------------------------------------------------ ragged sequences


def test_sequences_of_different_lengths_share_a_padded_batch(make_processor):
    seen = []

    def model(batch):
        seen.append(batch.copy())
        return batch.sum(axis=1)

    p = make_processor(model, pad_value=-1, max_batch_size=64)
    items = [np.arange(1, 1 + n)[None] for n in (3, 7, 5)]
    for item, future in zip(items, one_batch(p, items)):
        assert future.result(timeout=10) == [item.sum() - (7 - item.shape[1])]
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0][0], [1, 2, 3, -1, -1, -1, -1])
    assert seen[0].shape == (3, 7)


def test_pad_to_multiple_of_rounds_the_padded_length_up(make_processor):
    shapes = []
    p = make_processor(lambda b: shapes.append(b.shape) or b, pad_value=0,
                       pad_to_multiple_of=8, per_token_outputs=True, max_batch_size=64)
    items = [np.ones((1, n), dtype=np.int32) for n in (3, 9)]
    for item, future in zip(items, one_batch(p, items)):
        np.testing.assert_array_equal(future.result(timeout=10), item)  # cut back
    assert shapes == [(2, 16)]


def test_named_padding_pads_only_the_inputs_it_names(make_processor):
    seen = []

    def model(batch):
        seen.append({k: v.copy() for k, v in batch.items()})
        return {"ids": batch["input_ids"] + 1, "pooled": batch["pixel"].sum(axis=(1, 2))}

    p = make_processor(model, pad_value={"input_ids": 0}, per_token_outputs={"ids"},
                       max_batch_size=64)
    items = [{"input_ids": np.arange(1, n + 1)[None], "pixel": np.ones((1, 2, 2))}
             for n in (2, 4)]
    for item, future in zip(items, one_batch(p, items)):
        got = future.result(timeout=10)
        np.testing.assert_array_equal(got["ids"], item["input_ids"] + 1)
        np.testing.assert_array_equal(got["pooled"], [4.0])
    assert len(seen) == 1 and seen[0]["input_ids"].tolist() == [[1, 2, 0, 0], [1, 2, 3, 4]]


def test_tokenizer_style_requests_with_per_token_outputs(make_processor):
    def model(batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = np.stack([ids * 1.0, ids * 2.0], axis=-1)           # (rows, L, 2)
        return {"last_hidden_state": hidden, "pooled": (ids * mask).sum(axis=1)}

    p = make_processor(model, pad_value={"input_ids": 0, "attention_mask": 0},
                       per_token_outputs={"last_hidden_state"}, max_batch_size=64)
    items = [tokens(n, start=n) for n in (5, 2, 8)]
    for item, future in zip(items, one_batch(p, items)):
        got = future.result(timeout=10)
        alone = model(item)
        np.testing.assert_array_equal(got["last_hidden_state"], alone["last_hidden_state"])
        np.testing.assert_array_equal(got["pooled"], alone["pooled"])


def test_max_batch_tokens_caps_rows_times_padded_length(make_processor, recorder):
    model = recorder(lambda b: b[:, :1])
    p = make_processor(model, pad_value=0, max_batch_tokens=64, max_batch_size=64,
                       processing_strategy="fixed", initial_batch_size=64)
    lengths = [4, 4, 4, 30, 4, 4]
    items = [np.ones((1, n)) for n in lengths]
    for future in one_batch(p, items):
        future.result(timeout=10)
    # 3 x 4 tokens, then 4 x 30 > 64 ends the batch; 2 x 30 fits, 3 x 30 does not.
    assert sorted(b.shape for b in model.batches) == [(1, 4), (2, 30), (3, 4)]
    assert all(b.shape[0] * b.shape[1] <= 64 for b in model.batches)


def test_a_request_over_the_token_cap_is_cut_by_rows_and_joined(make_processor, recorder):
    model = recorder(lambda b: b * 2)
    p = make_processor(model, pad_value=0, max_batch_tokens=20, per_token_outputs=True)
    item = np.arange(50.0).reshape(5, 10)
    np.testing.assert_array_equal(p.enqueue_predict(item).result(timeout=10), item * 2)
    assert [b.shape for b in model.batches] == [(2, 10), (2, 10), (1, 10)]


def test_ragged_requests_fill_batches_that_exact_shapes_cannot(make_processor, recorder):
    # 256 requests of lengths 8..128: exact shapes give mostly tiny batches; padding gives
    # full ones.
    rng = np.random.default_rng(7)
    lengths = rng.integers(8, 129, size=256)
    items = [np.ones((1, n), dtype=np.int64) for n in lengths]
    counts = {}
    for pad in (None, 0):
        model = recorder(lambda b: b.sum(axis=1))
        p = make_processor(model, pad_value=pad, max_batch_size=32, max_queue_size=1000,
                           processing_strategy="fixed", initial_batch_size=32)
        for item, future in zip(items, one_batch(p, items)):
            assert future.result(timeout=30) == [item.shape[1]]
        counts[pad] = len(model.batches)
    assert counts[0] == 8                  # 256 / 32
    assert counts[None] >= 90              # one batch per distinct length


def test_per_token_outputs_are_never_guessed(make_processor):
    # Without per_token_outputs a padded output reaches callers padded.
    p = make_processor(lambda b: b, pad_value=0, max_batch_size=64)
    items = [np.ones((1, 2)), np.ones((1, 5))]
    got = [f.result(timeout=10) for f in one_batch(p, items)]
    assert [g.shape for g in got] == [(1, 5), (1, 5)]


@pytest.mark.parametrize("model, match", [
    (lambda b: {"x": b.sum(axis=1)}, r"per-token output\['x'\] has no axis 1"),
    (lambda b: {"x": b[:, :-1]}, r"output\['x'\] has 3 on axis 1, but the batch was padded"),
    (lambda b: {"y": b}, r"names \['x'\], which the output does not have"),
])
def test_a_per_token_output_without_the_padded_axis_fails_the_batch(make_processor, model,
                                                                    match):
    p = make_processor(model, pad_value=0, per_token_outputs={"x"}, max_retries=0,
                       retry_delay=0.0)
    with pytest.raises(BatchOutputError, match=match):
        p.enqueue_predict(np.ones((1, 4))).result(timeout=10)


@pytest.mark.parametrize("pad, dtype", [(-1, np.uint8), (0.5, np.int64), (1e9, np.float16),
                                        (300, np.int8)])
def test_a_pad_value_the_dtype_cannot_hold_is_refused_at_enqueue(make_processor, pad, dtype):
    p = make_processor(lambda b: b, pad_value=pad)
    with pytest.raises(ValueError, match="cannot be stored"):
        p.enqueue_predict(np.ones((1, 3), dtype=dtype))
    p.enqueue_predict(np.ones(3, dtype=dtype)).result(timeout=10)  # 1-D: nothing to pad


def test_ragged_object_array_with_pad_value_is_refused_with_advice(make_processor):
    p = make_processor(lambda b: b, pad_value=0)
    with pytest.raises(ValueError, match="as an array of its own"):
        p.enqueue_predict(np.array([np.ones(2), np.ones(3)], dtype=object))


# ------------------------------------------------------------------ generic items


def test_item_size_counts_samples_toward_max_batch_size(make_processor, recorder):
    model = recorder(lambda batch: [len(x) for x in batch])
    p = make_processor(model, max_batch_size=8, item_size=len, processing_strategy="fixed",
                       initial_batch_size=8)
    items = [["s"] * n for n in (3, 4, 2, 32, 1)]
    for item, future in zip(items, one_batch(p, items)):
        assert future.result(timeout=10) == len(item)
    # 3 + 4 fit, + 2 would not; 2 (+ 32 would not); 32 alone; then 1.
    assert sorted(sum(map(len, b)) for b in model.batches) == [1, 2, 7, 32]


@pytest.mark.parametrize("size, error, match", [
    (lambda x: 1 // 0, ValueError, "item_size raised ZeroDivisionError"),
    (lambda x: 0, ValueError, "positive number of samples, got 0"),
    (lambda x: -3, ValueError, "got -3"),
    (lambda x: 2.5, TypeError, "must return an int"),
    (lambda x: True, TypeError, "must return an int"),
])
def test_a_bad_item_size_is_an_error_at_enqueue(make_processor, size, error, match):
    p = make_processor(lambda batch: batch, item_size=size)
    with pytest.raises(error, match=match):
        p.enqueue_predict("text")
    assert p.get_stats()["total_accepted"] == 0


def test_many_threads_with_mixed_formats_each_get_their_own_result(make_processor):
    def model(batch):
        if isinstance(batch, dict):
            return {"y": batch["x"] * 2}
        if isinstance(batch, tuple):
            return (batch[0] + batch[1],)
        if isinstance(batch, list):
            return [s * 2 for s in batch]
        return batch * 2

    p = make_processor(model, max_queue_size=10000, pad_value=0, per_token_outputs=True)
    errors = []
    barrier = threading.Barrier(8)

    def client(cid):
        barrier.wait()
        for j in range(60):
            kind = (cid + j) % 4
            n = 1 + (cid * 7 + j) % 5
            x = np.full((1, n), cid * 1000 + j, dtype=np.int64)
            item = [x, {"x": x}, (x, x), f"{cid}-{j}"][kind]
            got = p.enqueue_predict(item).result(timeout=30)
            want = [x * 2, {"y": x * 2}, (x + x,), f"{cid}-{j}" * 2][kind]
            ok = (got == want if kind == 3 else
                  all(np.array_equal(a, b) for a, b in zip(_leaves(got), _leaves(want))))
            if not ok:
                errors.append((cid, j, got, want))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors


def _leaves(x):
    if isinstance(x, dict):
        return list(x.values())
    if isinstance(x, tuple):
        return list(x)
    return [x]


@pytest.mark.parametrize("config", [{}, {"stack_items": True}, {"pad_value": 0},
                                    {"pad_value": 0, "stack_items": True,
                                     "pad_to_multiple_of": 4}])
def test_a_described_array_shape_is_described_the_same_the_second_time(config):
    # Plain arrays skip the families once their (dtype, shape) is known: the shortcut
    # must answer exactly as a fresh describer does, whatever the array.
    from batchproc import BatchProcessorConfig
    from batchproc.formats import make_describer

    arrays = [np.ones((2, 3), np.float32), np.ones((2, 3), ">f4"), np.ones((1, 5), np.int64),
              np.ones((2, 3), np.float32)[:, ::2], np.ones(4, np.uint8)]
    if "pad_value" not in config:  # object arrays cannot be padded
        arrays.append(np.array([[1, "a"]], dtype=object))
    memoised = make_describer(BatchProcessorConfig(**config)).describe
    for x in arrays + arrays:
        got = memoised(x, None, 0.0)
        fresh = make_describer(BatchProcessorConfig(**config)).describe(x, None, 0.0)
        r, f = got[0], fresh[0]
        assert (r.rows, r.nbytes, r.length, repr(r.format)) == (
            f.rows, f.nbytes, f.length, repr(f.format))
        assert got[1:3] == fresh[1:3] and got[4] == fresh[4]
        np.testing.assert_array_equal(r.item, f.item)
        assert r.item.dtype.isnative
    if not config:
        ragged = np.empty(1, dtype=object)
        ragged[0] = [1, 2]
        plain = np.empty(1, dtype=object)
        plain[0] = 3
        memoised(plain, None, 0.0)
        with pytest.raises(ValueError, match="ragged"):
            memoised(ragged, None, 0.0)  # same dtype and shape: still looked into


def test_masked_arrays_keep_their_masks_and_batch_only_with_their_kind(make_processor):
    seen = []

    def model(batch):
        seen.append(type(batch).__name__)
        return np.ma.filled(batch, 0).sum(axis=1)

    p = make_processor(model, max_batch_size=64)
    masked = [np.ma.array([[1.0, 1e9, float(i)]], mask=[[False, True, False]])
              for i in range(2)]
    plain = np.array([[1.0, 2.0, 3.0]])
    futures = one_batch(p, [*masked, plain])
    assert [f.result(timeout=10).tolist() for f in futures] == [[1.0], [2.0], [6.0]]
    assert sorted(seen) == ["MaskedArray", "ndarray"]


def test_padded_batches_hold_the_memory_cap(make_processor, recorder):
    model = recorder(lambda b: b[:, :1])
    row = np.ones((1, 1024), np.float32).nbytes          # a padded row: 4 KiB
    p = make_processor(model, pad_value=0, max_batch_memory_mb=2.5 * row / 2**20,
                       max_batch_size=64, processing_strategy="fixed", initial_batch_size=64)
    items = [np.ones((1, 1024), np.float32)] + [np.ones((1, 1), np.float32)] * 5
    for future in one_batch(p, items):
        future.result(timeout=10)
    assert max(b.nbytes for b in model.batches) <= 2.5 * row
    assert sorted(b.shape for b in model.batches) == [(2, 1024), (4, 1)]


def test_a_masked_array_cannot_be_padded(make_processor):
    p = make_processor(lambda b: b, pad_value=0)
    with pytest.raises(ValueError, match="MaskedArray items cannot be padded"):
        p.enqueue_predict(np.ma.array([[1.0, 2.0]]))

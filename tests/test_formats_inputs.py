"""Input formats (docs/formats.md): named and tuple inputs, ragged sequences with padding,
generic items with item_size, and bad input refused at enqueue at no cost to others."""

import collections
import collections.abc
import re
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
from waiting import wait_for

from batchproc import BatchOutputError, ItemChangedError
from batchproc._native.future_state import AT_MOST_LENGTH, QUEUED_LENGTH, QUEUED_ROWS

STRING_DTYPE = getattr(np.dtypes, "StringDType", lambda: None)()  # numpy >= 2


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


class Inputs(tuple):
    """A tuple class optree does not know (it knows namedtuples only)."""


class Layers(list):
    """A list class optree does not know."""


@pytest.mark.parametrize("wrap", [
    lambda x: (x, collections.UserDict(x=x * 10)),
    lambda x: {"enc": collections.UserDict(ids=x), "dec": (x * 10,)},
    lambda x: collections.UserDict(enc=collections.UserDict(ids=x)),
    lambda x: Inputs((x, x * 10)),
    lambda x: {"enc": Layers([x, x * 10]), "dec": Inputs((x,))},
], ids=["in a tuple", "in a dict", "in itself", "tuple class", "list and tuple classes"])
def test_a_container_class_is_batched_as_its_plain_kind_at_any_depth(make_processor, wrap):
    seen = []

    def model(batch):
        seen.append(batch)
        return batch

    p = make_processor(model, max_batch_size=64)
    items = [wrap(np.full((1 + i, 2), float(i))) for i in range(3)]
    for item, future in zip(items, one_batch(p, items)):
        got = future.result(timeout=10)
        assert _as_dicts(got) == _as_dicts(item) and _plain_containers(got)
    assert len(seen) == 1 and _plain_containers(seen[0])


def _as_dicts(tree):
    if isinstance(tree, collections.abc.Mapping):
        return {k: _as_dicts(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(map(_as_dicts, tree))
    return tree.tolist()


def _plain_containers(tree):
    """Every container in ``tree`` a dict, tuple or list: what the model and callers get."""
    if isinstance(tree, collections.abc.Mapping):
        return type(tree) is dict and all(map(_plain_containers, tree.values()))
    if isinstance(tree, (tuple, list)):
        return type(tree) in (tuple, list) and all(map(_plain_containers, tree))
    return True


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


@pytest.mark.parametrize("fields, bad", [
    ({}, np.ones((1,) * 64)),
    ({"pad_value": 0.0}, np.ones((2,) + (1,) * 63)),
    ({}, {"x": np.ones(2), "y": np.ones((1,) * 64)}),
], ids=["stacked", "stacked and padded", "an input of a dict"])
def test_a_sample_with_no_room_for_the_stacked_axis_is_refused_at_enqueue(
        make_processor, fields, bad):
    # numpy arrays have at most 64 dimensions: stacking samples of 64 makes none. Refused
    # as the item comes, not failed (and retried) when its batch is built.
    calls = []
    p = make_processor(lambda b: calls.append(b) or b, stack_items=True, **fields)
    with pytest.raises(ValueError, match="stack_items adds a sample axis: an array of 64 "
                                         "dimensions would make a batch of 65"):
        p.enqueue_predict(bad)
    assert p.get_stats()["total_accepted"] == 0 and calls == []


@pytest.mark.parametrize("fields, item", [
    ({"stack_items": True}, np.ones((1,) * 63)),
    ({}, np.ones((1,) * 64)),
], ids=["63 dimensions stacked", "64 dimensions concatenated"])
def test_arrays_of_as_many_dimensions_as_a_batch_may_have_are_batched(
        make_processor, fields, item):
    p = make_processor(lambda b: b * 2, **fields)
    got = p.enqueue_predict(item).result(timeout=10)
    assert got.shape == item.shape and (got == 2).all()


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


_IDS = np.ones((1, 3), np.int64)


@pytest.mark.parametrize("config, item, match", [
    ({"pad_value": {"input_ids": 0}}, {"ids": _IDS},
     r"^pad_value names 'input_ids', which this item does not have \(its inputs are 'ids'\): "
     "pad_value names the item's top-level keys$"),
    ({"pad_value": {"input_ids": 0, "attention_mask": 0}}, {"input_ids": _IDS, "mask": _IDS},
     r"pad_value names 'attention_mask', which .* \(its inputs are 'input_ids', 'mask'\)"),
    ({"pad_value": {"input_ids": 0}}, {"encoder": {"input_ids": _IDS}},
     r"pad_value names 'input_ids', .* \(its inputs are 'encoder'\)"),
    ({"pad_value": {"input_ids": 0}}, (_IDS, _IDS),
     r"^pad_value names inputs \('input_ids'\), but a tuple item has no input names: give "
     "pad_value as one number to pad every input, or send a mapping of input names to "
     "arrays or tensors$"),
    ({"pad_value": {"input_ids": 0}}, _IDS,
     r"pad_value names inputs \('input_ids'\), but an array or tensor item has no input "
     "names"),
    ({"pad_value": {"input_ids": 0}}, {"input_ids": np.ones(3)},
     r"^item\['input_ids'\]: pad_value names 'input_ids', but it has no axis 1 to pad: a 1-d "
     r"input is rows of one value each; send a sequence as shape \(rows, length\)$"),
    ({"pad_value": 0, "per_token_outputs": True}, np.ones(3, np.int64),
     r"^per_token_outputs is set, but nothing in this item is padded \(arrays of int64, "
     r"trailing shape \(\)\): per-token outputs are cut to each request's sequence length"),
    ({"pad_value": 0, "per_token_outputs": True}, {"a": np.ones(3), "b": np.ones(3)},
     "per_token_outputs is set, but nothing in this item is padded"),
    ({"pad_value": {"input_ids": 0}, "per_token_outputs": True},
     {"input_ids": np.ones(3), "x": _IDS}, "has no axis 1 to pad"),
], ids=["typo", "one of two names", "nested one level down", "tuple", "array", "1-d named",
        "per-token 1-d array", "per-token dict of 1-d", "per-token named 1-d"])
def test_padding_that_would_pad_nothing_is_refused_at_enqueue(make_processor, config, item,
                                                              match):
    # A name matching nothing used to be ignored: nothing padded, and every length in a
    # batch of its own. Refused, it costs the other requests nothing.
    def model(batch):
        return batch

    p = make_processor(model, max_batch_size=64, **config)
    names = config["pad_value"] if isinstance(config["pad_value"], dict) else ["input_ids"]
    p.pause()
    good = [p.enqueue_predict({name: np.full((1, n), n) for name in names}) for n in (1, 2, 3)]
    with pytest.raises(ValueError, match=match):
        p.enqueue_predict(item)
    with pytest.raises(ValueError, match=match):
        p.enqueue_predict(item)  # every time, not only the first
    p.resume()
    for n, future in zip((1, 2, 3), good):
        got = future.result(timeout=10)["input_ids"]
        assert got[0, :n].tolist() == [n] * n
    assert p.get_stats()["total_accepted"] == 3


@pytest.mark.parametrize("config, item", [
    ({"pad_value": {"input_ids": 0}},
     {"input_ids": np.ones((1, 3)), "pixel_values": np.ones((1, 3, 2, 2))}),
    ({"pad_value": {"input_ids": 0}}, "text"),
    ({"pad_value": {"input_ids": 0}}, {"input_ids": "text"}),
    ({"pad_value": 0}, np.ones(3)),
    ({"pad_value": 0}, (np.ones(1), np.ones((1, 3)))),
    ({"pad_value": 0, "per_token_outputs": True}, "text"),
    ({"pad_value": 0, "per_token_outputs": True}, {"ids": np.ones((1, 3)), "n": np.ones(1)}),
], ids=["unnamed extra input", "generic", "mapping without arrays", "scalar pad, 1-d",
        "scalar pad, tuple", "per-token generic", "per-token with something padded"])
def test_padding_settings_that_apply_to_part_of_an_item_are_accepted(make_processor, config,
                                                                     item):
    def model(batch):  # the identity, with per-token outputs only
        return {"ids": batch["ids"]} if isinstance(batch, dict) and "n" in batch else batch

    p = make_processor(model, **config)
    p.enqueue_predict(item).result(timeout=10)


def test_a_pad_value_name_that_matches_batches_every_length_together(make_processor, recorder):
    model = recorder(lambda b: {"tokens": b["ids"] * 10})
    p = make_processor(model, max_batch_size=64, pad_value={"ids": 0},
                       per_token_outputs={"tokens"})
    items = [{"ids": np.full((1, n), n)} for n in range(1, 9)]
    for n, future in enumerate(one_batch(p, items), 1):
        assert future.result(timeout=10)["tokens"].tolist() == [[n * 10] * n]
    assert len(model.batches) == 1


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


@pytest.mark.parametrize("pad, dtype, match", [
    (-1, np.uint8, "pad_value -1 cannot be stored exactly as uint8"),
    (0.5, np.int64, "pad_value 0.5 cannot be stored exactly as int64"),
    (1e9, np.float16, "pad_value 1000000000.0 cannot be stored exactly as float16"),
    (300, np.int8, "pad_value 300 cannot be stored"),
    (1 + 2j, np.float32, r"pad_value \(1\+2j\) is complex; it cannot be stored as float32"),
    (0, [("a", "i4")], r"pad_value 0 cannot pad arrays of dtype \[\('a', '<i4'\)\]: padding "
                       "needs a bool, int, float or complex dtype"),
    (0, "U3", "pad_value 0 cannot pad arrays of dtype <U3"),
    (0, "datetime64[s]", r"pad_value 0 cannot pad arrays of dtype datetime64\[s\]"),
])
def test_a_pad_value_the_dtype_cannot_hold_is_refused_at_enqueue(make_processor, pad, dtype,
                                                                 match):
    p = make_processor(lambda b: b, pad_value=pad)
    with pytest.raises(ValueError, match=match):
        p.enqueue_predict(np.zeros((1, 3), dtype=dtype))
    p.enqueue_predict(np.zeros(3, dtype=dtype)).result(timeout=10)  # 1-D: nothing to pad


@pytest.mark.parametrize("pad, dtype", [(2**64 - 1, np.uint64), (-(2**63), np.int64),
                                        (1 + 2j, np.complex64), (True, np.bool_),
                                        (np.float16(0.5), np.float32)])
def test_a_pad_value_at_the_dtype_s_limits_pads_with_that_value(make_processor, pad, dtype):
    p = make_processor(lambda b: b, pad_value=pad)
    short, long_ = np.zeros((1, 1), dtype), np.zeros((1, 3), dtype)
    got = [f.result(timeout=10) for f in one_batch(p, [short, long_])]
    assert got[0].tolist() == [[0, pad, pad]] and got[1].tolist() == long_.tolist()


NAN, INF = float("nan"), float("inf")
# One table for arrays and tensors (test_formats_torch.py runs it on tensors): (dtype, a
# pad_value, None where a batch is padded with it, else what refusing it at enqueue
# says, "{dtype}" standing for the dtype: float16, torch.float16). A float is rounded
# as any cast rounds it (0.1 in float32; 3e-8 in float16, to its smallest subnormal),
# but a value that would become zero (either part of a complex too), or that lies past
# the dtype's largest, is refused: arrays once padded with 0.0 for 1e-8 in float16.
PAD_VALUE_CASES = [
    ("float16", 1e-8, "pad_value 1e-08 cannot be stored exactly as {dtype} "
                      "(it would become 0.0)"),
    ("float16", -1e-8, "pad_value -1e-08 cannot be stored exactly as {dtype} "
                       "(it would become -0.0)"),
    ("float32", 1e-50, "pad_value 1e-50 cannot be stored exactly as {dtype} "
                       "(it would become 0.0)"),
    ("float32", 7e-46, "pad_value 7e-46 cannot be stored exactly as {dtype} "
                       "(it would become 0.0)"),
    ("float16", 65519.0, "pad_value 65519.0 cannot be stored exactly as {dtype}, past its "
                         "largest, 65504.0 (it would become 65504.0)"),
    ("float16", 1e9, "pad_value 1000000000.0 cannot be stored exactly as {dtype}, past its "
                     "largest, 65504.0 (it would become inf)"),
    ("complex64", 1e-50, "pad_value 1e-50 cannot be stored exactly as {dtype} "
                         "(it would become 0j)"),
    ("complex64", 1 + 1e-50j, "pad_value (1+1e-50j) cannot be stored exactly as {dtype} "
                              "(it would become (1+0j))"),
    ("uint8", -1, "pad_value -1 cannot be stored exactly as {dtype} (it would become 255)"),
    ("int64", 0.5, "pad_value 0.5 cannot be stored exactly as {dtype} (it would become 0)"),
    ("bool", 2, "pad_value 2 cannot be stored exactly as {dtype} (it would become True)"),
    ("float16", 0, None),
    ("float16", -1, None),
    ("float16", 1.5, None),
    ("float16", -0.0, None),
    ("float16", 65504.0, None),
    ("float16", 6e-8, None),        # a subnormal
    ("float16", 3e-8, None),        # rounded to the smallest subnormal, not to zero
    ("float32", 1e-40, None),
    ("float32", 0.1, None),
    ("float64", 5e-324, None),
    ("float16", NAN, None),
    ("float16", INF, None),
    ("float32", -INF, None),
    ("float16", True, None),
    ("complex64", 1 + 2j, None),
    ("complex64", complex(INF, 1.0), None),
    ("complex64", complex(NAN, 0.0), None),
    ("int64", 2**63 - 1, None),
    ("int64", -(2**63), None),
    ("uint64", 2**64 - 1, None),
    ("int8", 1.0, None),
    ("bool", True, None),
]
PAD_VALUE_IDS = [f"{dtype}-{pad!r}" for dtype, pad, _ in PAD_VALUE_CASES]


@pytest.mark.parametrize("dtype, pad, refused", PAD_VALUE_CASES, ids=PAD_VALUE_IDS)
def test_a_pad_value_is_padded_with_or_refused_by_the_rule_tensors_follow(make_processor,
                                                                          dtype, pad, refused):
    seen = []
    p = make_processor(lambda b: seen.append(b.copy()) or b, pad_value=pad, max_batch_size=8)
    if refused is not None:
        with pytest.raises(ValueError, match=re.escape(refused.format(dtype=dtype))):
            p.enqueue_predict(np.zeros((1, 2), dtype))
        assert p.get_stats()["total_accepted"] == 0
        return
    short, long_ = np.zeros((1, 1), dtype), np.zeros((1, 2), dtype)
    got = [f.result(timeout=10) for f in one_batch(p, [short, long_])]
    assert got[0].shape == (1, 2) and len(seen) == 1 and seen[0].dtype == dtype
    want = np.asarray(pad).astype(dtype)
    np.testing.assert_array_equal(seen[0][0, 1], want)  # NaN pads compare equal here
    assert np.signbit(seen[0][0, 1].real) == np.signbit(want.real)


def test_ragged_object_array_with_pad_value_is_refused_with_advice(make_processor):
    p = make_processor(lambda b: b, pad_value=0)
    with pytest.raises(ValueError, match="as an array of its own"):
        p.enqueue_predict(np.array([np.ones(2), np.ones(3)], dtype=object))


def test_an_array_subclass_whose_dtype_changed_while_queued_fails_alone(make_processor):
    # numpy joins subclasses itself, promoting the batch to a changed item's dtype: every
    # other caller's result would come back float64. (Plain arrays are copied natively
    # as queued.)
    from batchproc import ItemChangedError

    class Tagged(np.ndarray):
        pass

    p = make_processor(lambda batch: batch * 2, max_batch_size=8, retry_delay=30.0)
    items = [np.full((1, 4), float(k), np.float32).view(Tagged) for k in range(3)]
    p.pause()
    futures = [p.enqueue_predict(x) for x in items]
    with warnings.catch_warnings():  # numpy 2.5 deprecates setting it, but still does it
        warnings.simplefilter("ignore", DeprecationWarning)
        items[1].dtype = np.int32  # breaks the rule: same shape, another dtype
    p.resume()
    with pytest.raises(ItemChangedError, match="an array is int32 where float32 was queued"):
        futures[1].result(timeout=10)
    for k in (0, 2):
        got = futures[k].result(timeout=10)
        assert got.dtype == np.float32 and (got == 2.0 * k).all()


# Every path a plain array takes into a batch: (config, the queued shape, the item
# around the array). A dtype changed in place with the same itemsize keeps the shape.
# (numpy refuses to change an object array's dtype; a subclass's: above.)
DTYPE_CHANGE_PATHS = {
    "rows": ({}, (1, 4), "array"),
    "rows cut into pieces": ({"max_batch_size": 2}, (3, 4), "array"),
    "stacked sample": ({"stack_items": True}, (4,), "array"),
    "stacked 0-d sample": ({"stack_items": True}, (), "array"),
    "padded": ({"pad_value": 0}, (1, 3), "array"),
    "stacked padded sample": ({"stack_items": True, "pad_value": 0}, (3,), "array"),
    "named": ({}, (1, 4), "named"),
    "named padded": ({"pad_value": {"x": 0}}, (1, 3), "named"),
    "named stacked": ({"stack_items": True}, (4,), "named"),
    "tuple": ({}, (1, 4), "tuple"),
    "tuple padded": ({"pad_value": 0}, (1, 3), "tuple"),
}


@pytest.mark.parametrize("position", [0, 1])
@pytest.mark.parametrize("path", list(DTYPE_CHANGE_PATHS))
def test_an_array_whose_dtype_changed_while_queued_fails_alone(make_processor, path,
                                                               position):
    # Before, only the shape was checked: the assembler copied the changed array's bytes
    # as its new dtype (the whole batch, when it came first: a float64 format's model
    # was called with an int64 batch, the changed caller got garbage without an error),
    # or refused the batch for a mix of dtypes, counted as a batch-only failure.
    config, shape, wrap = DTYPE_CHANGE_PATHS[path]
    seen = []

    def model(batch):
        leaves = (list(batch.values()) if isinstance(batch, dict)
                  else list(batch) if isinstance(batch, tuple) else [batch])
        seen.extend(leaf.dtype for leaf in leaves)
        doubled = [leaf * 2 for leaf in leaves]
        return ({"x": doubled[0]} if isinstance(batch, dict)
                else tuple(doubled) if isinstance(batch, tuple) else doubled[0])

    config = {"max_batch_size": 16, "retry_delay": 30.0, **config}
    p = make_processor(model, **config)
    dtype = np.float64
    bad = np.full(shape, 7.0, dtype)
    healthy = [np.full(shape, float(i), dtype) for i in range(3)]
    arrays = [*healthy[:position], bad, *healthy[position:]]

    def item(x):
        return {"x": x} if wrap == "named" else (x,) if wrap == "tuple" else x

    p.pause()
    futures = [p.enqueue_predict(item(x)) for x in arrays]
    with warnings.catch_warnings():  # numpy 2.5 deprecates setting it, but still does it
        warnings.simplefilter("ignore", DeprecationWarning)
        bad.dtype = np.int64  # breaks the rule: same itemsize, so the same shape
    p.resume()
    with pytest.raises(ItemChangedError, match="an array is int64 where float64 was queued"):
        futures[position].result(timeout=10)
    for k, x in enumerate(healthy):
        got = futures[k + (k >= position)].result(timeout=10)
        got = got["x"] if wrap == "named" else got[0] if wrap == "tuple" else got
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, x * 2)
    assert set(seen) == {np.dtype(dtype)}  # the model never saw the changed dtype
    assert p.get_stats()["total_batch_only_failures"] == 0


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_a_matrix_stacked_as_a_sample_is_refused_with_advice(make_processor):
    # np.stack cannot add an axis to a matrix (always 2-D): the batch would lose its
    # sample axis. Unstacked, a matrix batches by rows as any subclass does.
    p = make_processor(lambda b: b * 2, stack_items=True)
    with pytest.raises(ValueError, match=r"np.matrix items cannot be stacked.*np.asarray"):
        p.enqueue_predict(np.matrix([[1.0, 2.0, 3.0]]))
    assert p.get_stats()["total_accepted"] == 0
    assert p.enqueue_predict(np.ones((1, 3))).result(timeout=10).shape == (1, 3)
    rows = make_processor(lambda b: b * 2)
    got = rows.enqueue_predict(np.matrix([[1.0, 2.0, 3.0]])).result(timeout=10)
    assert type(got) is np.matrix and got.tolist() == [[2.0, 4.0, 6.0]]


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
    (lambda x: np.True_, TypeError, "must return an int"),
    # The queue counts at most 2**39 - 1 rows per request: said in item_size's terms.
    (lambda x: 2**39, ValueError, "item_size returned 549755813888 samples for a str item; "
                                  "one request counts for at most 549755813887"),
    (lambda x: 2**100, ValueError, "item_size returned 1267650600228229401496703205376 "),
])
def test_a_bad_item_size_is_an_error_at_enqueue(make_processor, size, error, match):
    p = make_processor(lambda batch: batch, item_size=size)
    with pytest.raises(error, match=match):
        p.enqueue_predict("text")
    assert p.get_stats()["total_accepted"] == 0


def test_the_largest_item_size_is_accepted_and_runs_alone(make_processor, recorder):
    model = recorder(lambda batch: batch)
    p = make_processor(model, max_batch_size=8, item_size=lambda x: 2**39 - 1 if x else 1)
    assert [f.result(timeout=10) for f in one_batch(p, ["big", ""])] == ["big", ""]
    assert sorted(model.sizes) == [1, 1]


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
    if "pad_value" not in config:  # object, string and structured arrays cannot be padded
        arrays.append(np.array([[1, "a"]], dtype=object))
        arrays.append(np.zeros((2, 1), [("a", "i4"), ("b", "O")]))
        if STRING_DTYPE is not None:
            arrays.append(np.array([["ab"], ["c"]], dtype=STRING_DTYPE))
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


class BytesSeen:
    """A model that answers each row with its tag (first token of ``ids``) and records
    each batch's bytes."""

    def __init__(self):
        self.built = []

    def __call__(self, batch):
        self.built.append(sum(x.nbytes for x in batch.values()))
        return batch["ids"][:, :1]


def _ids_and(length, rows=1, **others):
    """A mapping item: ``ids`` of ``length`` (each row's first token is its tag), and
    int64 inputs of the shapes ``others`` gives (rows first)."""
    ids = np.zeros((rows, length), np.int64)
    ids[:, 0] = np.arange(rows) + 10 * length
    return {"ids": ids, **{name: np.ones((rows, *shape), np.int64)
                           for name, shape in others.items()}}


CAP = 10_000  # bytes; 8-byte tokens


@pytest.mark.parametrize("pad_value, items", [
    # A one-token input beside a long one: the batch pads both to its length.
    ({"ids": 0, "dec": 0}, [_ids_and(400, dec=(1,))] + [_ids_and(100, dec=(1,))] * 3),
    # A number pads every input with an axis 1, a 3-channel one too.
    (0, [_ids_and(64, pixels=(3, 4))] + [_ids_and(8, pixels=(3, 4))] * 3),
    # Inputs of one length each, but items of different lengths.
    ({"ids": 0, "mask": 0}, [_ids_and(300, mask=(300,))] + [_ids_and(50, mask=(50,))] * 3),
])
@pytest.mark.parametrize("submit", ["enqueue_predict", "map"])
def test_padded_mapping_batches_hold_the_memory_cap(make_processor, pad_value, items, submit):
    # Every padded input of an item is padded to the batch's length, its short ones too:
    # an item's bytes grow with the batch's length input by input, not in proportion to
    # its longest input's.
    model = BytesSeen()
    p = make_processor(model, pad_value=pad_value, max_batch_memory_mb=CAP / 2**20,
                       max_batch_size=64, processing_strategy="fixed", initial_batch_size=64)
    results = (list(p.map(items)) if submit == "map"
               else [f.result(timeout=10) for f in one_batch(p, items)])
    assert [r.tolist() for r in results] == [[[x["ids"][0, 0]]] for x in items]
    assert max(model.built) <= CAP, model.built
    assert len(model.built) < len(items)  # the cap still lets batches hold several


@pytest.mark.parametrize("item", [
    _ids_and(300, rows=3, dec=(1,)),          # 4,800 bytes a row once dec is padded
    _ids_and(200, rows=5, pixels=(3, 2)),     # 3,200
])
def test_a_padded_mapping_request_over_the_memory_cap_is_cut_by_rows(make_processor, item):
    pad_value = {"ids": 0, "dec": 0} if "dec" in item else 0
    model = BytesSeen()
    p = make_processor(model, pad_value=pad_value, max_batch_memory_mb=CAP / 2**20)
    result = p.enqueue_predict(item).result(timeout=10)
    assert result[:, 0].tolist() == item["ids"][:, 0].tolist()
    assert len(model.built) > 1 and max(model.built) <= CAP, model.built


_LUT = np.arange(5000)
_LUT_B = _LUT.copy()
_LUT_B[2500] = -1  # printed alike: numpy elides the middle of a long array's repr


@pytest.mark.parametrize("wrap", [lambda x: x, lambda x: {"x": x}], ids=["array", "mapping"])
@pytest.mark.parametrize("metadata", [[{"tenant": "A"}, {"tenant": "B"}],
                                      [{"lut": _LUT}, {"lut": _LUT_B}]],
                         ids=["tags", "printed alike"])
def test_dtype_metadata_keeps_to_its_own_caller(make_processor, recorder, wrap, metadata):
    # Dtypes that differ only in metadata compare equal, and a batch carries its first
    # item's dtype: sharing one, a caller would get another's metadata.
    tagged = [np.dtype("f8", metadata=m) for m in metadata]
    model = recorder(lambda b: b)
    p = make_processor(model, max_batch_size=64)
    items = [np.zeros((1, 2)), np.zeros((1, 2), tagged[0]), np.zeros((1, 2), tagged[1]),
             np.zeros((1, 2))]  # a plain array first: the describer remembers its dtype
    results = [f.result(timeout=10) for f in one_batch(p, [wrap(x) for x in items])]
    for item, got in zip(items, results):
        got = got["x"] if isinstance(got, dict) else got
        assert (got.dtype.metadata or {}).keys() == (item.dtype.metadata or {}).keys()
        for key, value in (item.dtype.metadata or {}).items():
            assert got.dtype.metadata[key] is value
    assert len(model.batches) == 3


@pytest.mark.parametrize("config", [{"max_batch_size": 4}, {"max_batch_memory_mb": 32 / 2**20}],
                         ids=["rows", "bytes"])
def test_dtype_metadata_survives_a_request_cut_into_chunks(make_processor, config):
    tagged = np.dtype("f8", metadata={"unit": "m"})
    p = make_processor(lambda b: b, **config)
    got = p.enqueue_predict(np.arange(20.0).reshape(10, 2).astype(tagged)).result(timeout=10)
    assert got.dtype.metadata == {"unit": "m"} and got.tolist() == np.arange(20.0).reshape(
        10, 2).tolist()


def test_the_describer_remembers_plain_arrays_by_equal_dtype_not_one_with_metadata():
    # An unpickled array (a Ray Serve handle's, multiprocessing's) has an equal copy of
    # its dtype: it takes the remembered description; one with metadata, equal too, never.
    import pickle

    from batchproc import BatchProcessorConfig
    from batchproc.formats import make_describer

    describer = make_describer(BatchProcessorConfig())
    a = np.ones((1, 64), np.float32)
    describer.describe(a, None, 0.0)
    asked = []
    for family in describer._families:
        family.describe = lambda item, ask=family.describe: asked.append(item) or ask(item)
    copy = pickle.loads(pickle.dumps(a))
    assert copy.dtype is not a.dtype and copy.dtype == a.dtype
    describer.describe(copy, None, 0.0)
    assert asked == []
    tagged = np.ones((1, 64), np.dtype("f4", metadata={"x": 1}))
    describer.describe(tagged, None, 0.0)
    assert asked == [tagged]


def test_a_masked_array_cannot_be_padded(make_processor):
    p = make_processor(lambda b: b, pad_value=0)
    with pytest.raises(ValueError, match="MaskedArray items cannot be padded"):
        p.enqueue_predict(np.ma.array([[1.0, 2.0]]))


# ------------------------------------------------------------------ torch being imported


def _torch_being_imported():
    """What sys.modules holds while another thread runs ``import torch``: a module whose
    spec says it is initialising, without ``Tensor`` yet."""
    import importlib.machinery
    import types

    module = types.ModuleType("torch")
    module.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    module.__spec__._initializing = True
    return module


def test_items_are_described_while_another_thread_is_importing_torch(make_processor,
                                                                     monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", _torch_being_imported())

    def model(batch):
        if isinstance(batch, list):
            return [s.upper() for s in batch]
        return {"y": batch["x"] * 2} if isinstance(batch, dict) else (batch[0] + batch[1],)

    p = make_processor(model, max_batch_size=4)
    x = np.arange(6.0).reshape(3, 2)
    items = ["text", {"x": x}, (x, x), {"x": np.ones((9, 2))}]  # the last is chunked
    got = [f.result(timeout=10) for f in one_batch(p, items)]
    assert got[0] == "TEXT"
    np.testing.assert_array_equal(got[1]["y"], x * 2)
    np.testing.assert_array_equal(got[2][0], x * 2)
    np.testing.assert_array_equal(got[3]["y"], np.full((9, 2), 2.0))


def test_torch_counts_as_present_once_its_import_has_finished(monkeypatch):
    import sys

    from batchproc.formats.outputs import is_tensor, tensor_type

    module = _torch_being_imported()
    monkeypatch.setitem(sys.modules, "torch", module)
    assert tensor_type() is None and not is_tensor("text")

    class Tensor:
        pass

    module.Tensor = Tensor
    assert tensor_type() is None  # still initialising: not trusted yet
    module.__spec__._initializing = False
    assert tensor_type() is Tensor and is_tensor(Tensor())
    monkeypatch.delitem(sys.modules, "torch")
    assert tensor_type() is None


# ------------------------------------------------------------------ object and string arrays


def _python_calls(func, *args):
    """How many Python functions (generator steps included) ``func(*args)`` runs. With
    the collector off: a collection the call's allocations set off would run the
    finalizers of earlier tests' garbage, counted as the call's."""
    import gc
    import sys

    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    sys.setprofile(profile)
    try:
        func(*args)
    finally:
        sys.setprofile(None)
        if enabled:
            gc.enable()
    return calls


@pytest.mark.parametrize("dtype", [
    object,
    pytest.param(STRING_DTYPE, marks=pytest.mark.skipif(STRING_DTYPE is None,
                                                        reason="numpy < 2")),
    [("a", "i4"), ("b", "O")],
], ids=["object", "StringDType", "structured with objects"])
def test_describing_a_large_object_or_string_array_runs_no_python_per_element(dtype):
    from batchproc import BatchProcessorConfig
    from batchproc.formats import make_describer

    def calls(item):  # a fresh describer: the family's whole path each time
        return _python_calls(make_describer(BatchProcessorConfig()).describe, item, None, 0.0)

    small = np.zeros((10, 1), dtype) if isinstance(dtype, list) else np.array(
        [[f"s{i}"] for i in range(10)], dtype=dtype)
    assert calls(small) == calls(np.resize(small, (100_000, 1)))


@pytest.mark.parametrize("where", [0, 500, 999], ids=["first", "middle", "last"])
@pytest.mark.parametrize("sequence", [[1, 2], np.ones(2)], ids=["list", "array"])
def test_an_object_array_with_a_sequence_anywhere_is_refused(make_processor, where, sequence):
    p = make_processor(lambda b: b)
    x = np.empty((100, 10), dtype=object)
    x[:] = "text"
    x.flat[where] = sequence
    with pytest.raises(ValueError, match="ragged rows"):
        p.enqueue_predict(x)
    with pytest.raises(ValueError, match=r"item\['x'\]: an object array of sequences"):
        p.enqueue_predict({"x": x[:, ::-1]})  # non-contiguous too
    x.flat[where] = (1, 2)  # a tuple is one value, as are str and None
    x.flat[0] = None
    np.testing.assert_array_equal(p.enqueue_predict(x).result(timeout=10), x)


@pytest.mark.skipif(STRING_DTYPE is None, reason="numpy < 2")
def test_string_dtype_arrays_are_batched_by_rows(make_processor, recorder):
    model = recorder(np.strings.upper)
    p = make_processor(model, max_batch_size=8)
    items = [np.array([["ab"], ["c"]], dtype=STRING_DTYPE), np.array([["de"]], STRING_DTYPE)]
    got = [f.result(timeout=10) for f in one_batch(p, items)]
    assert [g.tolist() for g in got] == [[["AB"], ["C"]], [["DE"]]]
    assert model.sizes == [3]


def test_plain_arrays_never_import_numpy_ma():
    # numpy imports numpy.ma on first use (milliseconds): a caller's first request paid it.
    code = ("import numpy as np, sys, batchproc\n"
            "config = batchproc.BatchProcessorConfig(max_batch_size=2)\n"
            "with batchproc.BatchProcessor(config) as p:\n"
            "    p.start(lambda b: b)\n"
            "    p.enqueue_predict(np.ones((1, 2))).result(10)\n"
            "    p.enqueue_predict({'a': np.ones((1, 2))}).result(10)\n"
            "    p.enqueue_predict(np.ones((3, 2))).result(10)  # in chunks, joined\n"
            "assert 'numpy.ma' not in sys.modules, 'numpy.ma was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------ an item changed while queued


def _resized(rows_before, rows_after):
    """An owned array of ``rows_before`` rows, and how to resize it in place (a caller
    breaking the rule that an item must not change until its result has come)."""
    item = np.full((rows_before, 3), 7.0)

    def resize():
        item.resize((rows_after, 3), refcheck=False)
        item[:] = 7.0
    return item, resize


@pytest.mark.parametrize("rows_before,rows_after", [(1, 2), (2, 1), (2, 0)])
@pytest.mark.parametrize("wrap", ["array", "named", "padded"])
def test_an_item_resized_while_queued_fails_alone_and_shifts_no_caller_s_rows(
        make_processor, rows_before, rows_after, wrap):
    config = {"pad_value": 0} if wrap == "padded" else {}
    p = make_processor(lambda batch: batch, max_batch_size=16, retry_delay=0.01, **config)
    bad, resize = _resized(rows_before, rows_after)
    healthy = [np.full((1, 3), float(i)) for i in range(3)]
    items = [healthy[0], bad, *healthy[1:]]
    if wrap == "named":
        items = [{"x": x} for x in items]
    futures = one_batch_after(p, items, resize)
    with pytest.raises(ValueError, match="changed after it was queued"):
        futures[1].result(timeout=10)
    for i, future in zip(range(3), [futures[0], *futures[2:]]):
        result = future.result(timeout=10)
        np.testing.assert_array_equal(result["x"] if wrap == "named" else result,
                                      healthy[i])


@pytest.mark.parametrize("wrap", ["array", "named", "padded"])
def test_items_resized_both_ways_in_one_batch_fail_alone_though_the_total_holds(
        make_processor, wrap):
    # One grows by a row, one shrinks by one: the batch holds the rows it was queued
    # with, yet the callers between them would get their neighbours' rows.
    config = {"pad_value": 0} if wrap == "padded" else {}
    p = make_processor(lambda batch: batch, max_batch_size=16, retry_delay=0.01, **config)
    grows, grow = _resized(1, 2)
    shrinks, shrink = _resized(2, 1)
    healthy = [np.full((1, 3), float(i)) for i in range(3)]
    items = [healthy[0], grows, healthy[1], shrinks, healthy[2]]
    if wrap == "named":
        items = [{"x": x} for x in items]
    futures = one_batch_after(p, items, lambda: (grow(), shrink()))
    for bad in (futures[1], futures[3]):
        with pytest.raises(ValueError, match="changed after it was queued"):
            bad.result(timeout=10)
    for x, future in zip(healthy, [futures[0], futures[2], futures[4]]):
        result = future.result(timeout=10)
        np.testing.assert_array_equal(result["x"] if wrap == "named" else result, x)


def _changed_in_place(item, shape):
    """Give ``item`` ``shape`` in place, resized or its sizes regrouped (a caller breaking
    the rule that an item must not change until its result has come). Not by setting
    ``shape``, which NumPy 2.5 deprecates."""
    item.resize(shape, refcheck=False)
    item[...] = 7.0


# Changes other than to the rows: (config, the item's shape queued, its shape after).
SHAPE_CHANGES = {
    "trailing shape shrunk": ({}, (1, 4), (1, 2)),
    "trailing shape grown": ({}, (1, 4), (1, 6)),
    "trailing shape regrouped": ({}, (1, 4), (1, 2, 2)),
    "padded length grown past the batch's": ({"pad_value": 0}, (1, 3), (1, 6)),
    "padded length shrunk": ({"pad_value": 0}, (1, 3), (1, 2)),
    "stacked sample grown": ({"stack_items": True}, (4,), (5,)),
    "stacked sample regrouped": ({"stack_items": True}, (4,), (2, 2)),
    # Queued as the caller's sample itself, not a view with a rows axis (which kept the
    # shape it had, while the sample it viewed was resized under it).
    "stacked padded sample grown": ({"stack_items": True, "pad_value": 0}, (4,), (6,)),
    "stacked padded sample shrunk": ({"stack_items": True, "pad_value": 0}, (4,), (2,)),
}
# A padded input of a named item may shrink: its own length is not kept, only the
# item's longest (the unit test of AT_MOST_LENGTH below).
NAMED_MAY_SHRINK = {"padded length shrunk", "stacked padded sample shrunk"}


@pytest.mark.parametrize(("change", "wrap"), [
    (change, wrap) for change in SHAPE_CHANGES for wrap in ("array", "named")
    if wrap == "array" or change not in NAMED_MAY_SHRINK])
def test_an_item_whose_shape_changed_while_queued_fails_alone(make_processor, change, wrap):
    # Before, each ran on its new data after the batch failed (or with its batch, cut
    # back to the length queued), or failed as a transient error retried with backoff.
    config, queued, now = SHAPE_CHANGES[change]
    p = make_processor(lambda batch: batch, max_batch_size=16, retry_delay=30.0, **config)
    bad = np.full(queued, 7.0)
    healthy = [np.full(queued, float(i)) for i in range(3)]
    items = [healthy[0], bad, *healthy[1:]]
    if wrap == "named":
        items = [{"x": x} for x in items]
    futures = one_batch_after(p, items, lambda: _changed_in_place(bad, now))
    with pytest.raises(ItemChangedError, match=re.escape(f"has shape {now} where")):
        futures[1].result(timeout=10)
    for x, future in zip(healthy, [futures[0], *futures[2:]]):
        result = future.result(timeout=10)
        np.testing.assert_array_equal(result["x"] if wrap == "named" else result, x)


@pytest.mark.parametrize(("queued_shape", "queued_rows", "now", "says"), [
    ((QUEUED_ROWS, 3), 1, (2, 3), "has shape (2, 3) where (1, 3) was queued"),
    ((QUEUED_ROWS, 3), 2, (1, 3), "has shape (1, 3) where (2, 3) was queued"),
    ((QUEUED_ROWS, 3), 1, (), "has shape () where (1, 3) was queued"),
    ((QUEUED_ROWS, 3), 1, (1, 2), "has shape (1, 2) where (1, 3) was queued"),
    ((QUEUED_ROWS, 3), 1, (1, 3, 1), "has shape (1, 3, 1) where (1, 3) was queued"),
    ((QUEUED_ROWS, QUEUED_LENGTH), 1, (1, 6), "has shape (1, 6) where (1, 5) was queued"),
    ((QUEUED_ROWS, QUEUED_LENGTH), 1, (1, 4), "has shape (1, 4) where (1, 5) was queued"),
    ((QUEUED_ROWS, AT_MOST_LENGTH), 1, (1, 6),
     "has shape (1, 6) where (1, at most 5) was queued"),
    ((3,), 1, (4,), "has shape (4,) where (3,) was queued"),
    ((3,), 1, (1, 3), "has shape (1, 3) where (3,) was queued"),
])
def test_the_changed_item_error_says_its_shape_now_and_as_queued(queued_shape, queued_rows,
                                                                 now, says):
    from batchproc._native.future_state import Request
    from batchproc.formats.base import check_queued_shapes

    # Both queued with length 5 (a padded axis's; ignored where no axis is padded).
    def queued(item, rows):
        return Request(None, item, None, rows, 8, 5, 0.0)

    same = np.zeros(tuple(queued_rows if size == QUEUED_ROWS else 5 if size < 0 else size
                          for size in queued_shape))
    changed = np.zeros(now)
    requests = [queued(same, queued_rows), queued(changed, queued_rows)]
    check_queued_shapes(requests[:1], [same], queued_shape)
    with pytest.raises(ItemChangedError) as info:
        check_queued_shapes(requests, [same, changed], queued_shape)
    assert str(info.value) == (f"an item (or the piece of it cut for this batch) {says}: it "
                               "changed after it was queued (an item must not change until "
                               "its result has come)")


def test_the_changed_item_error_says_so_of_an_item_with_no_shape():
    from batchproc._native.future_state import Request
    from batchproc.formats.base import check_queued_shapes

    with pytest.raises(ItemChangedError, match="has no shape where"):
        check_queued_shapes([Request(None, [1.0], None, 1, 8, 0, 0.0)], [[1.0]],
                            (QUEUED_ROWS,))


@pytest.mark.parametrize(("length", "changed"), [(3, -1), (1, -1), (0, -1), (4, 0)])
def test_a_padded_input_of_a_named_item_may_have_any_length_up_to_its_request_s(
        length, changed):
    # A named item's length is its longest input's: a shorter padded input beside it
    # was queued with a length of its own the request does not keep (up to the item's).
    from batchproc._native.future_state import Request, changed_item

    request = Request(None, None, None, 1, 8, 3, 0.0)
    assert changed_item([request], [np.zeros((1, length))],
                        (QUEUED_ROWS, AT_MOST_LENGTH)) == changed


@pytest.mark.parametrize("rows_after", [14, 6, 0])
@pytest.mark.parametrize("wrap", ["array", "named"])
@pytest.mark.parametrize("api", ["enqueue", "map"])
def test_an_item_cut_into_pieces_that_changed_its_rows_fails_with_its_own_rows(
        make_processor, caplog, rows_after, wrap, api):
    # Checked whole before it is cut by the rows it was queued with: grown, its last rows
    # were left out of its result, silently; shrunk, the error gave a piece's rows.
    p = make_processor(lambda batch: batch, max_batch_size=4, retry_delay=30.0)
    bad, resize = _resized(10, rows_after)
    healthy = np.full((1, 3), 1.0)
    items = [bad, healthy] if wrap == "array" else [{"x": bad}, {"x": healthy}]
    if api == "enqueue":
        futures = one_batch_after(p, items, resize)
        outcomes = [f.exception(timeout=10) or f.result() for f in futures]
    else:
        p.pause()

        def resize_once_queued():
            wait_for(lambda: p.get_stats()["queue_size"] == 2, "both chunks queued")
            resize()
            p.resume()

        changer = threading.Thread(target=resize_once_queued)
        changer.start()
        outcomes = list(p.map(items, chunksize=1, return_exceptions=True))
        changer.join(10)
    error, fine = outcomes
    assert isinstance(error, ItemChangedError), error
    assert f"has shape ({rows_after}, 3) where (10, 3) was queued" in str(error)
    assert "outside the retry logic" not in caplog.text  # the caller's fault, not ours
    np.testing.assert_array_equal(fine["x"] if wrap == "named" else fine, healthy)


def one_batch_after(p, items, change):
    """Queue ``items`` while paused, then ``change()`` before the batch is built."""
    p.pause()
    futures = [p.enqueue_predict(x) for x in items]
    change()
    p.resume()
    return futures


def test_an_item_resized_while_queued_is_not_retried_unless_retry_on_names_it(
        make_processor):
    # It would come back the same on every try: failed at once, not after a backoff
    # (30 s here: past the result's timeout), as a broken output is.
    from batchproc import ItemChangedError

    p = make_processor(lambda batch: batch, max_batch_size=16, retry_delay=30.0)
    bad, resize = _resized(1, 2)
    healthy = np.full((1, 3), 1.0)
    futures = one_batch_after(p, [bad, healthy], resize)
    with pytest.raises(ItemChangedError):
        futures[0].result(timeout=10)
    np.testing.assert_array_equal(futures[1].result(timeout=10), healthy)


@pytest.mark.parametrize("items", [0, 1, 3])
def test_changed_item_refuses_a_column_of_another_length_than_its_requests(items):
    # Read without bounds checks, a shorter column read past its end: a segfault.
    from batchproc._native.future_state import Request, changed_item

    requests = [Request(None, None, None, 1, 8, 0, 0.0) for _ in range(2)]
    with pytest.raises(ValueError, match=f"^2 requests but {items} items$"):
        changed_item(requests, [np.zeros((1, 2))] * items, (QUEUED_ROWS, 2))
    assert changed_item(requests, [np.zeros((1, 2))] * 2, (QUEUED_ROWS, 2)) == -1

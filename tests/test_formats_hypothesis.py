"""Formats against their pure-Python references (tests/reference_formats.py), and mixed
formats from concurrent callers: every caller gets what the model gives for its item
alone."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_formats import reference_batch, reference_parts, sequence_length

from batchproc import BatchProcessor, BatchProcessorConfig
from batchproc.formats import Workspace, make_describer

try:
    import torch
except ImportError:  # torch is optional: its kinds are left out
    torch = None

KINDS = ["array", "stacked array", "dict", "tuple", "generic"] + (
    ["tensor", "stacked tensor", "tensor dict"] if torch is not None else [])
DTYPES = [np.float32, np.float64, np.int64, np.int16, np.uint8]


@st.composite
def groups(draw):
    """Items of one format (so they share a batch), with the config that makes them so."""
    kind = draw(st.sampled_from(KINDS))
    stacked = kind.startswith("stacked")
    padded = kind != "generic" and draw(st.booleans())
    pad = None
    if padded:
        named = kind in ("dict", "tensor dict")
        pad = draw(st.sampled_from([0, 7, {"ids": 0, "mask": 0}, {"ids": 3}] if named
                                   else [0, 7]))
    ids_only = pad == {"ids": 3}  # "mask" is not padded: it keeps one length
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    trailing = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    items = []
    for i in range(draw(st.integers(1, 6))):
        rows = 1 if stacked else draw(st.integers(0 if i else 1, 3))
        length = draw(st.integers(0, 6)) if padded else 2

        def make(n, i=i, rows=rows):
            shape = (n, *trailing) if stacked else (rows, n, *trailing)
            x = (np.arange(int(np.prod(shape))) % 50 + 10 * i).astype(dtype).reshape(shape)
            return torch.from_numpy(x.copy()) if "tensor" in kind else x

        x = make(length)
        if kind in ("dict", "tensor dict"):
            items.append({"ids": x, "mask": make(2 if ids_only else length) * 0 + 1})
        elif kind == "tuple":
            items.append((x, x[..., :1]))
        elif kind == "generic":
            items.append(f"item-{i}-{rows}")
        else:
            items.append(x)
    multiple = draw(st.sampled_from([1, 4])) if padded else None
    return kind, items, stacked, pad, multiple


def _config(stacked, pad, multiple, per_token=False):
    return BatchProcessorConfig(stack_items=stacked, pad_value=pad, pad_to_multiple_of=multiple,
                                per_token_outputs=per_token if pad is not None else False)


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_equal(x, y) for x, y in zip(a, b)))
    if torch is not None and isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and np.array_equal(a, b))
    return a == b


def _describe(config, items):
    describe = make_describer(config).describe
    described = [describe(x, None, 0.0) for x in items]
    return [d[0] for d in described], {d[3] for d in described}


@settings(max_examples=150)
@given(groups())
def test_a_batch_is_built_as_the_reference_builds_it(group):
    _, items, stacked, pad, multiple = group
    requests, keys = _describe(_config(stacked, pad, multiple), items)
    assert len(keys) == 1, "items of one format must share a batch"
    built = requests[0].format.build(requests, Workspace())
    expected = reference_batch(items, stacked, pad, multiple or 1)
    assert _equal(built.inputs, expected)


def _row_model(batch):
    """A row-wise model for any input kind: element-wise on every input."""
    if isinstance(batch, list):
        return [s + "!" for s in batch]
    if isinstance(batch, dict):
        return {"a": batch["ids"] * 2, "b": batch["mask"] * 3}
    if isinstance(batch, tuple):
        return (batch[0] + 1, batch[1] * 3)
    return batch * 2


@settings(max_examples=150)
@given(groups(), st.booleans())
def test_an_output_is_split_as_the_reference_splits_it(group, per_token):
    _, items, stacked, pad, multiple = group
    if per_token and pad == {"ids": 3}:
        per_token = {"a"}  # output "b" comes from "mask", which is not padded
    config = _config(stacked, pad, multiple, per_token)
    requests, _ = _describe(config, items)
    fmt = requests[0].format
    built = fmt.build(requests, Workspace())
    out = _row_model(built.inputs)
    trimmed = per_token if fmt.per_token else False
    parts = fmt.split(out, requests, built)
    expected = reference_parts(out, items, stacked, pad, trimmed)
    assert len(parts) == len(items)
    for got, want in zip(parts, expected):
        assert _equal(got, want), (got, want)


@st.composite
def mixes(draw):
    """Items of several formats, all of them ragged on axis 1 (length 1..5)."""
    items = []
    for i in range(draw(st.integers(1, 24))):
        kind = draw(st.sampled_from(["array", "dict", "tuple", "generic"]
                                    + (["tensor"] if torch is not None else [])))
        rows = draw(st.integers(1, 3))
        length = draw(st.integers(1, 5))
        x = np.arange(rows * length, dtype=np.int64).reshape(rows, length) + 100 * i
        items.append({"array": x, "dict": {"ids": x, "mask": x % 2},
                      "tuple": (x, x + 1), "generic": f"g{i}",
                      "tensor": None if torch is None else torch.from_numpy(x.copy())}[kind])
    return items, draw(st.integers(1, 4)), draw(st.integers(1, 16))


@settings(max_examples=40)
@given(mixes())
def test_concurrent_callers_of_mixed_formats_each_get_the_model_of_their_item(mix):
    items, threads, max_batch = mix
    config = BatchProcessorConfig(pad_value=0, per_token_outputs=True, max_batch_size=max_batch,
                                  max_queue_size=1000)
    with BatchProcessor(config) as p:
        p.start(_row_model)
        _run_mix(p, items, threads)


def _run_mix(p, items, threads):
    p.pause()
    futures = [None] * len(items)
    barrier = threading.Barrier(threads)

    def client(offset):
        barrier.wait()
        for k in range(offset, len(items), threads):
            futures[k] = p.enqueue_predict(items[k])

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    p.resume()
    for item, future in zip(items, futures):
        got = future.result(timeout=30)
        alone = _row_model([item])[0] if isinstance(item, str) else _row_model(item)
        assert _equal(got, alone), (item, got, alone)


@pytest.mark.parametrize("stacked", [False, True])
def test_sequence_length_reference_matches_the_describer(stacked):
    config = _config(stacked, 0, None)
    item = np.ones((5,) if stacked else (2, 5))
    request = make_describer(config).describe(item, None, 0.0)[0]
    assert request.length == sequence_length(item, stacked, 0) == 5

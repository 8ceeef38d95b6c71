"""torch tensors as items, against real torch on the CPU.

torch is an optional extra: without it these tests are skipped, unless
BATCHPROC_REQUIRE_TORCH=1 (CI sets it) makes its absence a failure.
"""

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

if os.environ.get("BATCHPROC_REQUIRE_TORCH") == "1":
    import torch
else:
    torch = pytest.importorskip("torch")

from test_formats_inputs import PAD_VALUE_CASES, PAD_VALUE_IDS

from batchproc import BatchOutputError


def one_batch(p, items, **kwargs):
    p.pause()
    futures = [p.enqueue_predict(x, **kwargs) for x in items]
    p.resume()
    return futures


class Recorder:
    def __init__(self, func):
        self.func = func
        self.batches = []

    def __call__(self, batch):
        self.batches.append(batch)
        return self.func(batch)


def test_batchproc_never_imports_torch_itself():
    code = ("import numpy as np, sys, batchproc\n"
            "with batchproc.BatchProcessor() as p:\n"
            "    p.start(lambda b: b)\n"
            "    p.enqueue_predict(np.ones((1, 2))).result(10)\n"
            "    p.enqueue_predict({'a': np.ones((1, 2))}).result(10)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_an_nn_module_gets_a_tensor_and_each_caller_its_rows(make_processor, n):
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)

    @torch.no_grad()
    def model(batch):
        assert isinstance(batch, torch.Tensor)
        return module(batch)

    recorded = Recorder(model)
    p = make_processor(recorded, max_batch_size=64)
    items = [torch.randn(1 + i % 2, 4) for i in range(n)]
    for item, future in zip(items, one_batch(p, items)):
        got = future.result(timeout=10)
        assert isinstance(got, torch.Tensor) and got.shape == (item.shape[0], 3)
        with torch.no_grad():
            torch.testing.assert_close(got, module(item))
    assert len(recorded.batches) == 1


def test_a_tensor_of_0_rows_gets_0_rows_beside_others_and_alone_calls_the_model_on_0(
        make_processor):
    recorded = Recorder(lambda b: b[:, :2] * 2)
    p = make_processor(recorded, max_batch_size=8)
    items = [torch.ones(2, 4), torch.empty(0, 4), torch.full((1, 4), 3.0)]
    for item, future in zip(items, one_batch(p, items)):
        torch.testing.assert_close(future.result(timeout=10), item[:, :2] * 2)
    alone = p.enqueue_predict(torch.empty(0, 4)).result(timeout=10)
    assert isinstance(alone, torch.Tensor) and alone.shape == (0, 2)
    assert [tuple(b.shape) for b in recorded.batches] == [(3, 4), (0, 4)]


def test_stacked_tensors(make_processor):
    p = make_processor(lambda b: b.sum(dim=1), stack_items=True)
    items = [torch.full((3,), float(i)) for i in range(3)]
    for i, future in enumerate(one_batch(p, items)):
        assert future.result(timeout=10).item() == 3.0 * i


def test_tensors_are_grouped_by_dtype_and_device(make_processor):
    model = Recorder(lambda b: b * 2)
    p = make_processor(model, max_batch_size=64)
    items = [torch.ones(1, 2), torch.ones(1, 2, dtype=torch.float64),
             torch.ones(1, 2, device="meta"), torch.ones(1, 2), torch.ones(1, 3)]
    futures = one_batch(p, items)
    for item, future in zip(items, futures):
        got = future.result(timeout=10)
        assert got.dtype == item.dtype and got.device == item.device
        if item.device.type == "cpu":
            torch.testing.assert_close(got, item * 2)
    kinds = sorted((b.device.type, str(b.dtype), tuple(b.shape)) for b in model.batches)
    assert kinds == [("cpu", "torch.float32", (1, 3)), ("cpu", "torch.float32", (2, 2)),
                     ("cpu", "torch.float64", (1, 2)), ("meta", "torch.float32", (1, 2))]


def test_named_inputs_on_different_devices_are_refused_at_enqueue(make_processor):
    p = make_processor(lambda b: b["a"])
    with pytest.raises(ValueError, match="different devices"):
        p.enqueue_predict({"a": torch.ones(1, 2), "b": torch.ones(1, 2, device="meta")})


def test_tokenizer_tensors_padded_with_per_token_outputs(make_processor):
    seen = []

    def model(batch):
        seen.append(batch["input_ids"].clone())
        hidden = batch["input_ids"].unsqueeze(-1).float() * torch.tensor([1.0, -1.0])
        return {"hidden": hidden, "n_tokens": batch["attention_mask"].sum(dim=1)}

    p = make_processor(model, pad_value={"input_ids": 0, "attention_mask": 0},
                       pad_to_multiple_of=4, per_token_outputs={"hidden"}, max_batch_size=64)
    items = []
    for n in (3, 6, 1):
        ids = torch.arange(1, n + 1).unsqueeze(0)
        items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    for item, future in zip(items, one_batch(p, items)):
        got = future.result(timeout=10)
        alone = model(item)
        torch.testing.assert_close(got["hidden"], alone["hidden"])
        assert got["n_tokens"].tolist() == [item["input_ids"].shape[1]]
    assert seen[0].shape == (3, 8) and seen[0][2].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("pad, dtype, match", [
    (-1, torch.uint8, r"pad_value -1 cannot be stored exactly as torch.uint8"),
    (0.5, torch.int64, r"pad_value 0.5 cannot be stored exactly as torch.int64"),
    (1e9, torch.float16, r"pad_value 1000000000.0 cannot be stored exactly as torch.float16, "
                        r"past its largest, 65504.0 \(it would become inf\)"),
    (2**64 - 1, torch.int64, r"pad_value 18446744073709551615 cannot be stored as torch.int64"),
    (2, torch.bool, r"pad_value 2 cannot be stored exactly as torch.bool"),
    (1 + 2j, torch.float32, r"pad_value \(1\+2j\) is complex; it cannot be stored as "
                            r"torch.float32"),
    (1 + 0j, torch.int64, r"pad_value \(1\+0j\) is complex; it cannot be stored as torch.int64"),
    # Past the largest value: saturated where the dtype has no inf, and refused by torch's
    # fill of a batch where it rounds to the largest.
    (1e6, torch.float8_e4m3fn, r"float8_e4m3fn, past its largest, 448.0 \(it would become 448.0"),
    (1e6, torch.float8_e5m2, r"float8_e5m2, past its largest, 57344.0 \(it would become inf"),
    (65519.0, torch.float16, r"float16, past its largest, 65504.0 \(it would become 65504.0"),
    # An inf where the dtype has none becomes NaN (the fnuz dtypes); a dtype of powers of
    # two has no zero and no sign (float8_e8m0fnu); a value too small becomes zero.
    (float("inf"), torch.float8_e4m3fnuz, r"float8_e4m3fnuz \(it would become nan"),
    (-float("inf"), torch.float8_e5m2fnuz, r"float8_e5m2fnuz \(it would become nan"),
    (0, torch.float8_e8m0fnu, r"float8_e8m0fnu \(it would become 5.87"),
    (-1.0, torch.float8_e8m0fnu, r"float8_e8m0fnu \(it would become 1.0"),
    (1e-50, torch.float32, r"torch.float32 \(it would become 0.0"),
])
def test_a_pad_value_the_tensor_dtype_cannot_hold_is_refused_at_enqueue(make_processor, pad,
                                                                        dtype, match):
    # As for arrays: refused at enqueue, never accepted and then failing every batch.
    p = make_processor(lambda b: b, pad_value=pad)
    with pytest.raises(ValueError, match=match):
        p.enqueue_predict(torch.ones(1, 3, dtype=dtype))
    assert p.get_stats()["total_accepted"] == 0


@pytest.mark.parametrize("pad, dtype", [
    (2**64 - 1, torch.uint64), (-(2**63), torch.int64), (1 + 2j, torch.complex64),
    (0.1, torch.float32), (True, torch.bool), (float("inf"), torch.float32),
    (np.float32(0.5), torch.float64), (0.5, torch.float8_e4m3fn), (448.0, torch.float8_e4m3fn),
    (float("nan"), torch.float8_e4m3fn), (65504.0, torch.float16), (0.1, torch.bfloat16),
    (1e-40, torch.float32), (-0.0, torch.float32), (4.0, torch.float8_e8m0fnu),
])
def test_a_pad_value_the_tensor_dtype_holds_pads_with_that_value(make_processor, pad, dtype):
    seen = []
    p = make_processor(lambda b: seen.append(b.clone()) or b, pad_value=pad, max_batch_size=8)
    short, long_ = torch.zeros(1, 1, dtype=dtype), torch.zeros(1, 3, dtype=dtype)
    got = [f.result(timeout=10) for f in one_batch(p, [short, long_])]
    assert got[0].shape == (1, 3)  # no per_token_outputs: the padded row comes back
    want = torch.full((), pad, dtype=dtype)
    assert seen[0].dtype == dtype
    wide = torch.complex128 if dtype.is_complex else torch.float64  # float8 has no ==
    padded, want = seen[0][0, 1:].to(wide), want.to(wide)
    assert torch.equal(padded, want.expand(2)) or bool(want.isnan() and padded.isnan().all())


@pytest.mark.parametrize("dtype, pad, refused", PAD_VALUE_CASES, ids=PAD_VALUE_IDS)
def test_a_pad_value_is_padded_with_or_refused_by_the_rule_arrays_follow(make_processor,
                                                                         dtype, pad, refused):
    # The table arrays run (test_formats_inputs.py): one rule, one message, at enqueue.
    seen = []
    p = make_processor(lambda b: seen.append(b.clone()) or b, pad_value=pad, max_batch_size=8)
    tensor_dtype = getattr(torch, dtype)
    if refused is not None:
        with pytest.raises(ValueError, match=re.escape(refused.format(dtype=tensor_dtype))):
            p.enqueue_predict(torch.zeros(1, 2, dtype=tensor_dtype))
        assert p.get_stats()["total_accepted"] == 0
        return
    short, long_ = torch.zeros(1, 1, dtype=tensor_dtype), torch.zeros(1, 2, dtype=tensor_dtype)
    got = [f.result(timeout=10) for f in one_batch(p, [short, long_])]
    assert got[0].shape == (1, 2) and len(seen) == 1 and seen[0].dtype == tensor_dtype
    padded = seen[0][0, 1].numpy()
    want = np.asarray(pad).astype(dtype)  # what an array of this dtype is padded with
    np.testing.assert_array_equal(padded, want)
    assert np.signbit(padded.real) == np.signbit(want.real)


@pytest.mark.parametrize("make, match", [
    (lambda: torch.ones(10, 3).to_sparse(), "layout torch.sparse_coo"),
    (lambda: torch.ones(2, 2).to_sparse_csr(), "layout torch.sparse_csr"),
    (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged),
     "nested tensors"),
    (lambda: torch.quantize_per_tensor(torch.ones(2, 2), 0.1, 0, torch.qint8),
     "quantized tensors"),
    (lambda: torch.quantize_per_tensor(torch.ones(2, 2), 1.0, 0, torch.quint4x2),
     "quantized tensors"),
], ids=["COO", "CSR", "nested", "qint8", "quint4x2"])
@pytest.mark.parametrize("config", [{}, {"max_batch_size": 4}, {"pad_value": 0},
                                    {"stack_items": True}],
                         ids=["plain", "chunked", "padded", "stacked"])
def test_tensors_torch_cannot_batch_are_refused_at_enqueue(make_processor, make, match,
                                                            config):
    p = make_processor(lambda b: b, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "sparse CSR support is in beta"
        item = make()
    match = f"tensors with {match} cannot be batched" if "layout" in match else match
    with pytest.raises(ValueError, match=match):
        p.enqueue_predict(item)
    with pytest.raises(ValueError, match=r"item\['x'\]: " + match):
        p.enqueue_predict({"x": item})
    assert p.get_stats()["total_accepted"] == 0


def test_multi_output_tensors_are_split_per_caller(make_processor):
    p = make_processor(lambda b: (b.sum(dim=1), b * 2), max_batch_size=64)
    items = [torch.full((2, 2), 1.0), torch.full((1, 2), 5.0)]
    (s0, d0), (s1, d1) = [f.result(timeout=10) for f in one_batch(p, items)]
    assert s0.tolist() == [2.0, 2.0] and s1.tolist() == [10.0]
    torch.testing.assert_close(d0, items[0] * 2)
    torch.testing.assert_close(d1, items[1] * 2)


def test_an_oversized_tensor_is_cut_and_joined_with_torch(make_processor):
    model = Recorder(lambda b: b + 1)
    p = make_processor(model, max_batch_size=4)
    item = torch.arange(20.0).reshape(10, 2)
    got = p.enqueue_predict(item).result(timeout=10)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, item + 1)
    assert [b.shape[0] for b in model.batches] == [4, 4, 2]


def test_a_tensor_view_of_a_numpy_batch_never_changes_after_delivery(make_processor):
    # torch.from_numpy shares the reused input buffer; the results must survive it.
    p = make_processor(lambda b: torch.from_numpy(b), max_batch_size=2,
                       initial_batch_size=2, processing_strategy="greedy",
                       max_queue_size=5000)
    items = [np.full((1, 3), float(i)) for i in range(2000)]
    results = [f.result(timeout=60) for f in [p.enqueue_predict(x) for x in items]]
    for item, got in zip(items, results):
        assert got.tolist() == item.tolist()


def test_wrong_rows_in_a_tensor_output_name_the_leaf(make_processor):
    p = make_processor(lambda b: {"y": b[:-1]}, max_retries=0, retry_delay=0.0)
    with pytest.raises(BatchOutputError, match=r"1 results in output\['y'\] for a batch of 2"):
        p.enqueue_predict(torch.ones(2, 3)).result(timeout=10)


def test_a_batch_of_tensors_that_require_grad_links_no_caller_to_another(make_processor):
    p = make_processor(lambda b: b * 2, max_batch_size=64)
    alice = torch.full((1, 3), 7.0, requires_grad=True)
    bob = torch.full((1, 3), 42.0, requires_grad=True)
    a, b = [f.result(timeout=10) for f in one_batch(p, [alice, bob])]
    assert a.grad_fn is None and not a.requires_grad      # no graph back to any input
    assert a.tolist() == [[14.0] * 3] and b.tolist() == [[84.0] * 3]


def test_a_tensor_result_is_a_view_whose_writes_reach_only_its_own_rows(make_processor):
    outputs = []
    p = make_processor(lambda b: outputs.append(b * 2) or outputs[-1], max_batch_size=64)
    items = [torch.full((1 + i % 2, 3), float(i)) for i in range(3)]
    results = [f.result(timeout=10) for f in one_batch(p, items)]
    (out,) = outputs
    for item, got in zip(items, results):
        assert got.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
        torch.testing.assert_close(got, item * 2)
    results[1][...] = -1.0
    torch.testing.assert_close(results[0], items[0] * 2)
    torch.testing.assert_close(results[2], items[2] * 2)


def test_tensors_resized_both_ways_in_one_batch_fail_alone_though_the_total_holds(
        make_processor):
    p = make_processor(lambda batch: batch * 10, max_batch_size=16, retry_delay=0.01)
    grows, shrinks = torch.full((1, 3), 7.0), torch.full((2, 3), 8.0)
    healthy = [torch.full((1, 3), float(i)) for i in range(3)]
    p.pause()
    futures = [p.enqueue_predict(x) for x in [healthy[0], grows, healthy[1], shrinks,
                                              healthy[2]]]
    grows.resize_(2, 3).fill_(7.0)  # both break the rule; the batch's total still holds
    shrinks.resize_(1, 3)
    p.resume()
    for bad in (futures[1], futures[3]):
        with pytest.raises(ValueError, match="changed after it was queued"):
            bad.result(timeout=10)
    for x, future in zip(healthy, [futures[0], futures[2], futures[4]]):
        assert torch.equal(future.result(timeout=10), x * 10)


@pytest.mark.parametrize("rows_before,rows_after", [(1, 2), (2, 1)])
def test_a_tensor_resized_while_queued_fails_alone_and_shifts_no_caller_s_rows(
        make_processor, rows_before, rows_after):
    p = make_processor(lambda batch: batch * 10, max_batch_size=16, retry_delay=0.01)
    bad = torch.full((rows_before, 3), 7.0)
    healthy = [torch.full((1, 3), float(i)) for i in range(3)]
    p.pause()
    futures = [p.enqueue_predict(x) for x in [healthy[0], bad, *healthy[1:]]]
    bad.resize_(rows_after, 3).fill_(7.0)  # breaks the rule: it changed while queued
    p.resume()
    with pytest.raises(ValueError, match="changed after it was queued"):
        futures[1].result(timeout=10)
    for x, future in zip(healthy, [futures[0], *futures[2:]]):
        assert torch.equal(future.result(timeout=10), x * 10)


# Changes other than to the rows: (config, the tensor's shape queued, its shape after).
TENSOR_SHAPE_CHANGES = {
    "trailing shape shrunk": ({}, (1, 4), (1, 2)),
    "trailing shape regrouped": ({}, (1, 4), (1, 2, 2)),
    "padded length grown past the batch's": ({"pad_value": 0}, (1, 3), (1, 6)),
    "padded length shrunk": ({"pad_value": 0}, (1, 3), (1, 2)),
    "stacked sample grown": ({"stack_items": True}, (4,), (5,)),
    "stacked padded sample grown": ({"stack_items": True, "pad_value": 0}, (4,), (6,)),
    "stacked padded sample shrunk": ({"stack_items": True, "pad_value": 0}, (4,), (2,)),
}


@pytest.mark.parametrize("config", [{}, {"pad_value": 0}, {"stack_items": True}, "named"])
def test_a_tensor_whose_dtype_changed_while_queued_fails_alone(make_processor, config):
    # Its shape is the same, but torch.cat would promote the whole batch to float64, and
    # every other caller's result with it.
    from batchproc import ItemChangedError

    named = config == "named"
    def model(batch):
        return {"x": batch["x"] * 10} if named else batch * 10

    p = make_processor(model, max_batch_size=16, retry_delay=30.0,
                       **({} if named else config))
    shape = (4,) if config == {"stack_items": True} else (1, 4)
    bad = torch.full(shape, 7.0)
    healthy = [torch.full(shape, float(i)) for i in range(3)]

    def item(x):
        return {"x": x} if named else x

    p.pause()
    futures = [p.enqueue_predict(item(x)) for x in [healthy[0], bad, *healthy[1:]]]
    bad.data = bad.data.double()  # breaks the rule: it changed while queued
    p.resume()
    with pytest.raises(ItemChangedError,
                       match=re.escape("a tensor is torch.float64 on cpu where torch.float32")):
        futures[1].result(timeout=10)
    for x, future in zip(healthy, [futures[0], *futures[2:]]):
        got = future.result(timeout=10)
        got = got["x"] if named else got
        assert got.dtype == torch.float32 and torch.equal(got, x * 10)


def test_a_tensor_subclass_shares_a_batch_only_with_its_own_class(make_processor):
    class Scaled(torch.Tensor):
        pass

    model = Recorder(lambda batch: batch * 10)
    p = make_processor(model, max_batch_size=16)
    items = [torch.ones(1, 3), torch.ones(1, 3).as_subclass(Scaled), torch.ones(1, 3)]
    results = [f.result(timeout=10) for f in one_batch(p, items)]
    assert sorted((type(b).__name__, len(b)) for b in model.batches) == [
        ("Scaled", 1), ("Tensor", 2)]
    assert [type(r) for r in results] == [torch.Tensor, Scaled, torch.Tensor]
    assert all(torch.equal(r.as_subclass(torch.Tensor), torch.full((1, 3), 10.0))
               for r in results)


@pytest.mark.parametrize("change", list(TENSOR_SHAPE_CHANGES))
def test_a_tensor_whose_shape_changed_while_queued_fails_alone(make_processor, change):
    from batchproc import ItemChangedError

    config, queued, now = TENSOR_SHAPE_CHANGES[change]
    p = make_processor(lambda batch: batch * 10, max_batch_size=16, retry_delay=30.0,
                       **config)
    bad = torch.full(queued, 7.0)
    healthy = [torch.full(queued, float(i)) for i in range(3)]
    p.pause()
    futures = [p.enqueue_predict(x) for x in [healthy[0], bad, *healthy[1:]]]
    bad.resize_(now).fill_(7.0)  # breaks the rule: it changed while queued
    p.resume()
    with pytest.raises(ItemChangedError, match=re.escape(f"has shape {now} where")):
        futures[1].result(timeout=10)
    for x, future in zip(healthy, [futures[0], *futures[2:]]):
        assert torch.equal(future.result(timeout=10), x * 10)

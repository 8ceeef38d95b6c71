"""`--input`: what `batchproc bench` and `tune` send a user's model.

Each kind of spec (dtype and shape, ragged lengths, named inputs, an .npz in each of its
layouts) gives the requests it says, and every bad one is a one-line BenchError.
"""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest

from batchproc.__main__ import main
from batchproc.bench import BenchError
from batchproc.bench.inputs import (
    MAX_DIMS,
    MAX_REQUEST_BYTES,
    FeatureRows,
    NpzSource,
    RequestSource,
    SpecSource,
    format_bytes,
    make_batch,
    parse_inputs,
    parse_tensor_spec,
    rows_of,
)
from batchproc.bench.models import check_model, identity

TINY = ["--requests", "30", "--duration", "5", "--quiet"]


def test_dtype_and_shape() -> None:
    source = parse_inputs(["uint8:2x3x4"], None)
    assert isinstance(source, SpecSource) and not source.padded
    pool = source.requests(seed=0)
    assert all(r.shape == (2, 3, 4) and r.dtype == np.uint8 for r in pool)
    assert source.requests(seed=0)[0].tolist() == pool[0].tolist()  # same seed, same data
    batch, n = source.limit_batch(8, seed=0)
    assert batch.shape == (8, 3, 4) and n == 4
    assert source.description == "uint8:2x3x4/request"


def test_ragged_lengths_are_drawn_in_range_and_padded_in_a_batch() -> None:
    source = parse_inputs(["int64:1x4..9"], None)
    assert source.padded
    pool = source.requests(seed=1)
    lengths = {r.shape[1] for r in pool}
    assert lengths <= set(range(4, 10)) and len(lengths) > 1
    batch = make_batch(pool[:5])
    longest = max(r.shape[1] for r in pool[:5])
    assert batch.shape == (5, longest)
    first = pool[0]
    assert (batch[0, : first.shape[1]] == first[0]).all()
    assert (batch[0, first.shape[1]:] == 0).all()


def test_ragged_rows_need_no_padding() -> None:
    source = parse_inputs(["float32:1..3x8"], None)
    assert not source.padded
    assert {r.shape[0] for r in source.requests(seed=0)} == {1, 2, 3}
    batch, n = source.limit_batch(16, seed=0)
    assert 14 <= len(batch) <= 16 and n >= 5


def test_named_inputs_share_one_length_per_request() -> None:
    source = parse_inputs(["input_ids=int64:1x8..32", "attention_mask=bool:1x8..32"], None)
    assert source.padded
    for r in source.requests(seed=0):
        assert list(r) == ["input_ids", "attention_mask"]
        assert r["input_ids"].shape == r["attention_mask"].shape
        assert r["attention_mask"].dtype == np.bool_
    batch = make_batch(source.requests(seed=0)[:3])
    assert rows_of(batch) == 3 and batch["input_ids"].shape == batch["attention_mask"].shape


@pytest.mark.parametrize(
    ("spec", "mentions"),
    [
        ("float32", "DTYPE:SHAPE"),
        ("float32:", "DTYPE:SHAPE"),
        ("floaty:1x4", "unknown dtype 'floaty'"),
        ("U8:1x4", "not numeric"),
        ("float32:1x0", "has shape (1, 0): a request needs a length of at least 1"),
        ("float32:0..0x4", "has shape (0, 4): a request needs at least one row"),
        ("float32:1x0..3", "1 <= LO <= HI"),
        ("float32:1x9..3", "1 <= LO <= HI"),
        ("float32:1xfour", "'four' is not N or LO..HI"),
        ("float32:1x4x2..3", "not axis 2"),
        ("9lives=float32:1x4", "not an input name"),
        # Digits of other scripts are no dimension (int() would read them).
        ("float32:1x\u0661\u0662", "'\u0661\u0662' is not N or LO..HI"),
        ("float32:1x4..\uff19", "is not N or LO..HI"),
        ("float32:" + "x".join(["1"] * (MAX_DIMS + 1)),
         f"has {MAX_DIMS + 1} dimensions; a numpy array has at most {MAX_DIMS}"),
    ],
)
def test_bad_specs(spec: str, mentions: str) -> None:
    with pytest.raises(BenchError, match="--input") as info:
        parse_tensor_spec(spec)
    assert mentions in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("specs", "mentions"),
    [
        (["float32:1x4", "int64:1x4"], "need a name each"),
        (["a=float32:1x4", "a=int64:1x4"], "'a' given twice"),
        (["a=int64:1x4..8", "b=int64:1x4..9"], "agree on axis 1"),
        (["a=int64:1x4", "b=int64:2x4"], "agree on axis 0"),
        (["x.npz", "float32:1x4"], "give it alone"),
    ],
)
def test_bad_combinations(specs: list[str], mentions: str) -> None:
    with pytest.raises(BenchError, match=mentions):
        parse_inputs(specs, None)


def test_features_and_input_do_not_go_together() -> None:
    with pytest.raises(BenchError, match="--features and --input"):
        parse_inputs(["float32:1x4"], 16)
    assert isinstance(parse_inputs(None, 16), FeatureRows)


def test_npz_one_array_per_request(tmp_path) -> None:
    path = tmp_path / "reqs.npz"
    requests = [np.arange(n, dtype=np.int32).reshape(1, n) for n in (3, 5, 4)]
    np.savez(path, *requests)
    source = parse_inputs([str(path)], None)
    assert isinstance(source, NpzSource) and source.padded
    assert [r.tolist() for r in source.requests(seed=0)] == [r.tolist() for r in requests]
    assert "3 sample requests from" in source.description
    np.savez(path, requests[0])
    assert "1 sample request from" in parse_inputs([str(path)], None).description


def test_npz_named_requests(tmp_path) -> None:
    path = tmp_path / "named.npz"
    np.savez(path, **{
        f"{i}/{name}": np.ones((1, n), np.int64)
        for i, n in enumerate((4, 6)) for name in ("input_ids", "attention_mask")
    })
    pool = parse_inputs([str(path)], None).requests(seed=0)
    # The inputs in the order saved (the first request's), as the stacked layout keeps
    # them: a model may read them by position.
    assert [list(r) for r in pool] == [["input_ids", "attention_mask"]] * 2
    assert [r["input_ids"].shape for r in pool] == [(1, 4), (1, 6)]
    np.savez(path, **{"0/b": np.ones((1, 2)), "0/a": np.ones((1, 2)),
                      "1/a": np.ones((1, 2)), "1/b": np.ones((1, 2))})
    assert [list(r) for r in parse_inputs([str(path)], None).requests(seed=0)] == [
        ["b", "a"]] * 2


def test_npz_stacked_rows(tmp_path) -> None:
    one = tmp_path / "one.npz"
    np.savez(one, x=np.arange(12, dtype=np.float32).reshape(6, 2))
    pool = parse_inputs([str(one)], None).requests(seed=0)
    assert len(pool) == 6 and all(list(r) == ["x"] for r in pool)
    assert pool[2]["x"].tolist() == [[4.0, 5.0]]
    two = tmp_path / "two.npz"
    np.savez(two, ids=np.zeros((3, 5), np.int64), mask=np.ones((3, 5), np.int64))
    source = parse_inputs([str(two)], None)
    assert not source.padded
    assert [{k: v.shape for k, v in r.items()} for r in source.requests(0)] == [
        {"ids": (1, 5), "mask": (1, 5)}] * 3


def test_npz_names_given_by_the_user_give_named_requests(tmp_path) -> None:
    # One stacked array under a name of the user's is a named input, as several are
    # and as --input NAME=DTYPE:SHAPE and the 0/name layout are: the name is kept.
    ids = np.arange(360, dtype=np.int64).reshape(30, 12)
    named = {
        "one": {"input_ids": ids},
        "two": {"input_ids": ids, "attention_mask": np.ones_like(ids)},
        "per-request": {f"{i}/input_ids": ids[i:i + 1] for i in range(30)},
    }
    for layout, arrays in named.items():
        path = tmp_path / f"{layout}.npz"
        np.savez(path, **arrays)
        source = parse_inputs([str(path)], None)
        pool = source.requests(seed=0)
        assert len(pool) == 30, layout
        assert all(isinstance(r, dict) and "input_ids" in r for r in pool), layout
        assert pool[3]["input_ids"].tolist() == ids[3:4].tolist(), layout
        assert "(named: " in source.description, layout
        batch = make_batch(pool[:2])
        assert isinstance(batch, dict) and batch["input_ids"].shape == (2, 12), layout
    # A name numpy would not make up, however close: still the user's.
    near = tmp_path / "near.npz"
    np.savez(near, arr_x=ids, **{"arr_0a": ids})
    assert all(sorted(r) == ["arr_0a", "arr_x"]
               for r in parse_inputs([str(near)], None).requests(seed=0))


def test_npz_names_numpy_made_up_give_array_requests(tmp_path) -> None:
    # np.savez(path, *arrays) names them arr_0, arr_1, ...: one array request each; a
    # lone one is one request of all its rows.
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    several = tmp_path / "several.npz"
    np.savez(several, *np.split(rows, 6))
    pool = parse_inputs([str(several)], None).requests(seed=0)
    assert len(pool) == 6 and all(isinstance(r, np.ndarray) for r in pool)
    assert pool[2].tolist() == rows[2:3].tolist()
    lone = tmp_path / "lone.npz"
    np.savez(lone, rows)
    source = parse_inputs([str(lone)], None)
    (request,) = source.requests(seed=0)
    assert isinstance(request, np.ndarray) and request.tolist() == rows.tolist()
    assert source.description.endswith("(arrays)")


def test_npz_errors(tmp_path) -> None:
    def error(path) -> str:
        with pytest.raises(BenchError) as info:
            parse_inputs([str(path)], None)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "no such file" in error(tmp_path / "missing.npz")
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    assert "is a directory" in error(folder)
    # Not an .npz: said so, and never a word of pickles (numpy's own message for any
    # file that is not a zip or an .npy suggests loading it with allow_pickle).
    text = tmp_path / "text.npz"
    text.write_text("hello\n")
    npy = tmp_path / "array.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros((2, 3)))
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    damaged = tmp_path / "damaged.npz"
    np.savez(damaged, a=np.zeros((3, 2)))
    damaged.write_bytes(damaged.read_bytes()[:40])
    for path in (text, npy, empty, damaged):
        message = error(path)
        assert f"--input {path}: not a readable .npz file" in message, message
        assert "pickle" not in message.lower(), message
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, a=np.zeros((3, 2)), b=np.zeros((4, 2)))
    assert "same number of requests" in error(uneven)
    mixed = tmp_path / "mixed.npz"
    np.savez(mixed, arr_0=np.zeros((1, 2)), other=np.zeros((1, 2)))
    assert "mixes per-request keys" in error(mixed)
    objects = tmp_path / "objects.npz"
    np.savez(objects, a=np.array([{"x": 1}], dtype=object))
    message = error(objects)
    assert "array 'a' holds Python objects (dtype object)" in message
    assert "pickle" not in message.lower()
    scalar = tmp_path / "scalar.npz"
    np.savez(scalar, arr_0=np.float32(1.0))
    assert "0-d" in error(scalar)
    names = tmp_path / "names.npz"
    np.savez(names, **{"0/a": np.zeros((1, 2)), "1/b": np.zeros((1, 2))})
    assert "request 1 has inputs ['b']" in error(names)


def test_check_model_names_the_batch_it_failed_on() -> None:
    source = parse_inputs(["ids=int64:1x8", "mask=int64:1x8"], None)
    check_model(identity, source)

    def wants_an_array(batch):
        return batch.shape

    with pytest.raises(BenchError, match=r"ids: int64 \(1, 8\), mask: int64 \(1, 8\)"):
        check_model(wants_an_array, source, name="--model m:f")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_sends_ragged_named_requests(tmp_path, capsys) -> None:
    path = tmp_path / "b.json"
    code, out, err = run_cli(
        capsys, "--model", "identity", "--clients", "4", *TINY, "--json", str(path),
        "--input", "input_ids=int64:1x4..16", "--input", "attention_mask=int64:1x4..16",
    )
    assert code == 0, err
    assert "input_ids=int64:1x4..16" in out
    doc = json.loads(path.read_text())
    assert doc["settings"]["input"]["padded"] is True
    assert doc["settings"]["input"]["inputs"] == [
        "input_ids=int64:1x4..16", "attention_mask=int64:1x4..16"]
    assert doc["settings"]["features"] is None
    runs = {r["system"]: r for r in doc["runs"]}
    assert runs["batchproc"]["completed"] == 30 and runs["batchproc"]["errors"] == 0


def test_bench_sends_npz_requests(tmp_path, capsys) -> None:
    npz = tmp_path / "reqs.npz"
    np.savez(npz, *[np.ones((2, 3), np.float32) for _ in range(5)])
    path = tmp_path / "b.json"
    code, _, err = run_cli(capsys, "--model", "identity", "--rate", "500", *TINY,
                           "--input", str(npz), "--json", str(path))
    assert code == 0, err
    runs = {r["system"]: r for r in json.loads(path.read_text())["runs"]}
    assert runs["no batching"]["mean_batch"] == 2.0  # two rows per request
    # The limit stops at --requests 30 as well: one call of 30 two-row requests.
    assert runs["limit"]["completed"] == 30 and runs["limit"]["mean_batch"] == 60.0


WHAT_IT_GOT = """\
def what_it_got(batch):
    got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise LookupError(f"got {got}")
"""


@pytest.mark.parametrize("command", [["bench"], ["bench", "--sweep"], ["tune", "--rate", "50"]])
def test_every_command_sends_a_one_array_npz_as_named_requests(
    tmp_path, monkeypatch, capsys, command: list[str]
) -> None:
    # bench, bench --sweep and tune load an .npz alike: the model's first call (the
    # check before any run, which fails here on purpose) gets the named input.
    (tmp_path / "got_mod.py").write_text(WHAT_IT_GOT)
    monkeypatch.syspath_prepend(str(tmp_path))
    npz = tmp_path / "req.npz"
    np.savez(npz, input_ids=np.ones((30, 12), np.int64))
    code = main([*command, "--model", "got_mod:what_it_got", "--input", str(npz), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "(input_ids: int64 (1, 12)): LookupError: got ['input_ids']" in err, err


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--input", "float32:1x0"], "--input"),
        (["--input", "nope.npz"], "no such file"),
        (["--input", "float32:1x4", "--features", "4"], "--features and --input"),
        (["--model", "mlp", "--input", "int64:1x5"], "--model mlp takes float32 rows"),
    ],
)
def test_bad_input_flags_are_one_line(capsys, argv: list[str], mentions: str) -> None:
    code, out, err = run_cli(capsys, *argv, *TINY)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and mentions in err, err


def test_a_file_that_is_not_an_npz_is_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "notnpz.npz"
    path.write_text("hello\n")
    code, out, err = run_cli(capsys, "--input", str(path), *TINY)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "not a readable .npz file" in err and "pickle" not in err, err


def test_a_request_at_the_size_limit_is_accepted() -> None:
    assert MAX_REQUEST_BYTES == 256 << 20
    source = parse_inputs([f"uint8:1x{MAX_REQUEST_BYTES}"], None)
    assert source.description == f"uint8:1x{MAX_REQUEST_BYTES}/request"
    parse_inputs(None, MAX_REQUEST_BYTES // 4)  # --features: float32 values


@pytest.mark.parametrize(
    ("specs", "features", "size", "values"),
    [
        (["uint8:1x268435457"], None, "256 MiB", "268,435,457"),  # one byte over
        (["float32:1000000x1000000"], None, "3.64 TiB", "1,000,000,000,000"),
        # Ragged: the largest request counts.
        (["float32:1..2x33554433"], None, "256 MiB", "67,108,866"),
        # Named inputs: one request holds all of them.
        (["a=float32:1x40000000", "b=float32:1x40000000"], None, "305 MiB", "80,000,000"),
        # Too large for int64: never wraps around to a small size.
        (["uint8:99999999999999999999x99999999999999999999"], None,
         "8,881,784,197,001,252,323,211,417 PiB",
         "9,999,999,999,999,999,999,800,000,000,000,000,000,001"),
        (None, 100_000_000, "381 MiB", "100,000,000"),
    ],
)
def test_a_request_over_the_size_limit_is_refused_with_its_size(
    specs: list[str] | None, features: int | None, size: str, values: str
) -> None:
    with pytest.raises(BenchError) as info:
        parse_inputs(specs, features)
    message = str(info.value)
    assert f"one request would take {size} ({values} values)" in message
    assert message.endswith("over the limit of 256 MiB per request")
    assert "\n" not in message


def test_bench_refuses_a_huge_input_in_one_line_before_allocating(capsys) -> None:
    code, out, err = run_cli(capsys, "--input", "float32:1000000x1000000", *TINY)
    assert code == 2 and out == ""
    assert err.strip() == (
        "batchproc bench: error: --input float32:1000000x1000000: one request would take "
        "3.64 TiB (1,000,000,000,000 values), over the limit of 256 MiB per request")


@pytest.mark.parametrize(("argv", "said"), [
    (["bench", "--max-batch", "100000000"],
     "--max-batch 100000000: a full batch of 100,000,000 rows of 256 B would take 23.8 GiB"),
    (["bench", "--input", "float32:1x50000000"],
     "--max-batch 64: a full batch of 64 rows of 191 MiB would take 11.9 GiB"),
    # Ragged: the top of the length's range; named inputs: a row holds all of them.
    (["bench", "--input", "a=float32:1x1..8000000", "--input", "b=uint8:1x1..8000000",
      "--max-batch", "256"],
     "--max-batch 256: a full batch of 256 rows of 38.1 MiB would take 9.54 GiB"),
    (["bench", "--sweep", "--max-batch", "100000000"], "--max-batch 100000000: "),
    (["tune", "--rate", "100", "--sizes", "8,100000000"],
     "--sizes 100000000: a full batch of 100,000,000 rows of 256 B would take 23.8 GiB"),
])
def test_a_full_batch_too_large_is_refused_before_anything_is_allocated(
        capsys, monkeypatch, argv: list[str], said: str) -> None:
    from batchproc.bench import cli, inputs

    monkeypatch.setattr(inputs, "memory_available", lambda: 1 << 40)

    def allocates(*args: object, **kwargs: object) -> None:
        raise AssertionError("a batch was built")

    monkeypatch.setattr(inputs.RequestSource, "limit_plan", allocates)
    monkeypatch.setattr(cli, "check_model", allocates)
    code = main([*argv, "--model", "identity", "--duration", "0.2", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1, err
    assert said in err, err
    flag = said.split()[0]
    assert err.rstrip().endswith(f"over the limit of 4 GiB: lower {flag} or the size of a "
                                 "request"), err


def test_a_full_batch_past_half_the_memory_available_is_refused(capsys, monkeypatch) -> None:
    from batchproc.bench import inputs

    monkeypatch.setattr(inputs, "memory_available", lambda: 1 << 30)
    source = parse_inputs(["float32:1x1000000"], None)
    inputs.check_full_batch(source, 128, "--max-batch")  # 488 MiB: under 512 MiB
    with pytest.raises(BenchError) as info:
        inputs.check_full_batch(source, 256, "--max-batch")
    assert str(info.value) == (
        "--max-batch 256: a full batch of 256 rows of 3.81 MiB would take 977 MiB, over "
        "half the memory available (1 GiB): lower --max-batch or the size of a request")


def test_the_memory_available_is_the_containers_under_a_cgroup_limit(monkeypatch) -> None:
    from batchproc import health
    from batchproc.bench import inputs

    machine = inputs.memory_available()
    assert machine is not None and machine > 0
    monkeypatch.setattr(health.CgroupMemory, "headroom", lambda self: 1 << 30)
    assert inputs.memory_available() == min(machine, 1 << 30)
    monkeypatch.setattr(health.CgroupMemory, "headroom", lambda self: None)
    assert inputs.memory_available() is not None  # no limit: the machine's


def test_an_npz_full_batch_counts_its_widest_row_padded(tmp_path) -> None:
    path = tmp_path / "r.npz"
    np.savez(path, np.zeros((3, 10), np.float32), np.zeros((1, 50), np.float32))
    assert NpzSource(str(path)).row_bytes() == 200
    np.savez(path, **{"0/ids": np.zeros((1, 8), np.int64), "0/mask": np.zeros((1, 8), np.int8),
                      "1/ids": np.zeros((2, 4), np.int64), "1/mask": np.zeros((2, 4), np.int8)})
    assert NpzSource(str(path)).row_bytes() == 8 * 8 + 8


# Request sets one batch cannot join: each refused at load, naming what differs.
UNBATCHABLE = [
    # A 2-D request and a 1-D one, either way round.
    ({"arr_0": np.zeros((1, 5), np.float32), "arr_1": np.zeros(3, np.float32)},
     "arr_1 has shape (3,), arr_0 has (1, 5): requests must have the same number of "
     "dimensions to share a batch"),
    ({"arr_0": np.zeros(3, np.float32), "arr_1": np.zeros((1, 5), np.float32)},
     "arr_1 has shape (1, 5), arr_0 has (3,): requests must have the same number of "
     "dimensions"),
    # Lengths differ past axis 1: axis 1 alone is padded.
    ({"arr_0": np.zeros((1, 4, 5), np.float32), "arr_1": np.zeros((1, 4, 6), np.float32)},
     "arr_1 has shape (1, 4, 6), arr_0 has (1, 4, 5): requests may differ in rows (axis 0) "
     "and length (axis 1, padded), not on axis 2"),
    ({"arr_0": np.zeros((1, 64), np.float32), "arr_1": np.zeros((1, 64), np.float64)},
     "arr_1 is float64, arr_0 is float32: requests must share a dtype"),
    # Sorted by index, not by name: arr_10 comes after arr_2.
    ({"arr_2": np.zeros((1, 2), np.int64), "arr_10": np.zeros((1, 2), np.int32)},
     "arr_10 is int32, arr_2 is int64"),
    # Named requests: per input.
    ({"0/ids": np.zeros((1, 4), np.int64), "0/mask": np.zeros((1, 4), np.int64),
      "1/ids": np.zeros((1, 4), np.int64), "1/mask": np.zeros((1, 4, 2), np.int64)},
     "1/mask has shape (1, 4, 2), 0/mask has (1, 4): requests must have the same number "
     "of dimensions"),
]


@pytest.mark.parametrize(("arrays", "mentions"), UNBATCHABLE)
def test_npz_requests_that_cannot_share_a_batch_are_refused_at_load(
    tmp_path, arrays: dict[str, np.ndarray], mentions: str
) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(BenchError) as info:
        parse_inputs([str(path)], None)
    message = str(info.value)
    assert message.startswith(f"--input {path}: ") and mentions in message, message
    assert "\n" not in message


@pytest.mark.parametrize(("arrays", "mentions"), UNBATCHABLE[:3])
def test_bench_refuses_an_npz_that_cannot_be_batched_in_one_line(
    tmp_path, capsys, arrays: dict[str, np.ndarray], mentions: str
) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    code, out, err = run_cli(capsys, "--model", "identity", "--input", str(path), *TINY)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and mentions in err, err


def test_npz_requests_differing_in_rows_and_length_share_a_batch(tmp_path) -> None:
    path = tmp_path / "ok.npz"
    np.savez(path, np.ones((1, 4, 3), np.float32), np.ones((2, 6, 3), np.float32))
    source = parse_inputs([str(path)], None)
    assert source.padded
    assert make_batch(source.requests(seed=0)).shape == (3, 6, 3)


# -- the limit's batches ---------------------------------------------------------------------


def npz_source(tmp_path, *requests: np.ndarray) -> NpzSource:
    path = tmp_path / "reqs.npz"
    np.savez(path, *requests)
    return NpzSource(str(path))


def test_the_limit_skips_a_request_too_large_for_its_batch_and_goes_on_filling(tmp_path) -> None:
    # Three one-row requests, then one of 500 rows: batches of the one-row requests.
    ones = [np.full((1, 2), i, np.float32) for i in range(3)]
    source = npz_source(tmp_path, *ones, np.zeros((500, 2), np.float32))
    plan = source.limit_plan(64, seed=0)
    assert [sum(len(r) for r in batch) for batch in plan] == [64]
    assert all(len(r) == 1 for r in plan[0])
    batch, n = source.limit_batch(64, seed=0)
    assert batch.shape == (64, 2) and n == 64


def test_the_limit_fills_the_room_left_with_a_later_request_that_fits(tmp_path) -> None:
    sizes = (3, 3, 1, 2)
    source = npz_source(tmp_path, *[np.full((n, 2), n, np.float32) for n in sizes])
    plan = source.limit_plan(4, seed=0)
    # 3 then 1 (the second 3 does not fit); the second 3 then 1 again; the 2, then
    # (the 3s do not fit beside it) the 1 twice. Each batch starts at a request not sent.
    assert [[len(r) for r in batch] for batch in plan] == [[3, 1], [3, 1], [2, 1, 1]]


def test_the_limits_batches_hold_every_request_of_the_pool() -> None:
    source = parse_inputs(["float32:1..3x2"], None)
    pool = source.requests(seed=0)
    plan = source.limit_plan(8, seed=0)
    assert all(sum(len(r) for r in batch) <= 8 for batch in plan)
    sent = {r.tobytes() for batch in plan for r in batch}
    assert sent == {r.tobytes() for r in pool}


def test_when_no_request_fits_each_batch_is_one_request(tmp_path) -> None:
    source = npz_source(tmp_path, np.zeros((9, 2)), np.ones((10, 2)))
    assert [[len(r) for r in batch] for batch in source.limit_plan(8, seed=0)] == [[9], [10]]


class Given(RequestSource):
    """A request source of the requests given (the command line refuses requests of no
    rows; a source of the API may still hold them)."""

    def __init__(self, *requests: np.ndarray) -> None:
        self._requests = list(requests)

    def requests(self, seed: int) -> list[np.ndarray]:
        return self._requests


def test_requests_of_no_rows_do_not_fill_a_batch_for_ever() -> None:
    source = Given(np.zeros((0, 2)), np.zeros((0, 2)))
    assert [len(batch) for batch in source.limit_plan(8, seed=0)] == [2]
    source = Given(np.zeros((0, 2)), np.ones((1, 2)))
    (batch,) = source.limit_plan(3, seed=0)
    assert sum(len(r) for r in batch) == 3


@pytest.mark.parametrize("arrays", [
    {"arr_0": np.zeros((1, 4), np.float32), "arr_1": np.zeros((0, 4), np.float32)},
    {"arr_0": np.zeros(0, np.float32)},
    {"0/ids": np.zeros((1, 4), np.int64), "1/ids": np.zeros((0, 4), np.int64)},
])
def test_an_npz_request_of_no_rows_is_refused_as_the_spec_form_is(tmp_path, capsys,
                                                                  arrays) -> None:
    path = tmp_path / "zero.npz"
    np.savez(path, **arrays)
    key = next(k for k, a in arrays.items() if not len(a))
    code, out, err = run_cli(capsys, "--input", str(path), "--model", "identity", *TINY)
    assert code == 2 and out == "", err
    assert err.strip() == (f"batchproc bench: error: --input {path}: array {key!r} has "
                           f"shape {arrays[key].shape}: a request needs at least one row "
                           "(axis 0)"), err
    code, _, err = run_cli(capsys, "--input", "float32:0x4", "--model", "identity", *TINY)
    assert code == 2 and err.strip() == (
        "batchproc bench: error: --input 'float32:0x4' has shape (0, 4): a request needs at "
        "least one row (axis 0)"), err


def _zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


@pytest.mark.parametrize(("members", "key"), [
    ({"a.txt": b"hello"}, "a.txt"),
    # Pickle bytes under an .npy name: never unpickled.
    ({"arr_0.npy": pickle.dumps(np.zeros((1, 4)))}, "arr_0"),
    ({"arr_0.npy": b"", "arr_1.npy": b""}, "arr_0"),
])
def test_an_npz_member_that_is_no_npy_is_one_line(tmp_path, capsys, members, key) -> None:
    path = tmp_path / "junk.npz"
    _zip(path, members)
    code, out, err = run_cli(capsys, "--input", str(path), "--model", "identity", *TINY)
    assert code == 2 and out == "", err
    assert err.strip() == (f"batchproc bench: error: --input {path}: member {key!r} is not "
                           "a .npy array (numpy.savez writes one per array)"), err


def _npy_header_only(shape: tuple[int, ...], dtype: str,
                     version: tuple[int, int] = (1, 0)) -> bytes:
    """An .npy member declaring ``shape`` and ``dtype`` followed by 16 bytes of data: what
    a small file may claim (zeros compress to almost nothing, a header may lie). Version
    3.0 is 2.0's layout, its text utf-8."""
    import io

    buf = io.BytesIO()
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buf, header)
    else:
        np.lib.format.write_array_header_2_0(buf, header)
    data = bytearray(buf.getvalue())
    data[6:8] = bytes(version)
    return bytes(data) + bytes(16)


@pytest.fixture
def plenty_of_memory(monkeypatch) -> None:
    """Half the memory available is far past any file here: only the request limit."""
    from batchproc.bench import inputs

    monkeypatch.setattr(inputs, "memory_available", lambda: 1 << 50)


@pytest.mark.usefixtures("plenty_of_memory")
@pytest.mark.parametrize(("members", "values"), [
    ({"arr_0.npy": (1, 1), "arr_1.npy": (1, 70_000_000)}, 70_000_000),
    ({"0/ids.npy": (1, 40_000_000), "0/mask.npy": (1, 40_000_000)}, 80_000_000),
    # One request to numpy, which reads "00" as request 0 too.
    ({"0/ids.npy": (1, 40_000_000), "00/mask.npy": (1, 40_000_000),
      "1/ids.npy": (1, 1), "1/mask.npy": (1, 1)}, 80_000_000),
    ({"ids.npy": (4, 70_000_000)}, 70_000_000),  # stacked: a request is a row
    # An array to numpy whatever its name: the .npy magic makes it one.
    ({"arr_0": (1, 70_000_000)}, 70_000_000),
    ({"ids.NPY": (4, 70_000_000)}, 70_000_000),
    ({"arr_0.npy": ((1, 70_000_000), (3, 0))}, 70_000_000),  # a version 3.0 header
    # A member whose header is unreadable hides no other's size.
    ({"arr_0.npy": (1, 70_000_000), "arr_1.npy": ((1, 4), "<U1000000000")}, 70_000_000),
], ids=["per request", "named", "named 00", "stacked", "no .npy", ".NPY", "version 3",
        "beside an unreadable header"])
def test_an_npz_request_past_the_limit_is_refused_from_its_header(tmp_path, capsys,
                                                                   members, values) -> None:
    # As the DTYPE:SHAPE form is: before anything is decompressed, whatever the layout.
    path = tmp_path / "big.npz"
    def member(spec) -> bytes:
        if isinstance(spec[1], tuple):
            return _npy_header_only(spec[0], "float32", spec[1])  # a header version
        if isinstance(spec[1], str):  # a dtype numpy's header reader refuses
            return _npy_header_only(spec[0], "float32").replace(b"'<f4'", f"'{spec[1]}'".encode())
        return _npy_header_only(spec, "float32")

    _zip(path, {k: member(spec) for k, spec in members.items()})
    code, out, err = run_cli(capsys, "--input", str(path), "--model", "identity", *TINY)
    assert code == 2 and out == "", err
    nbytes = values * 4
    assert nbytes > MAX_REQUEST_BYTES
    assert err.strip() == (
        f"batchproc bench: error: --input {path}: one request would take "
        f"{format_bytes(nbytes)} ({values:,} values), over the limit of 256 MiB per "
        "request"), err


@pytest.mark.usefixtures("plenty_of_memory")
def test_a_request_of_one_value_past_the_limit_says_one_value(tmp_path, capsys) -> None:
    path = tmp_path / "wide.npz"
    _zip(path, {"arr_0.npy": _npy_header_only((1,), "V300000000")})
    code, out, err = run_cli(capsys, "--input", str(path), "--model", "identity", *TINY)
    assert code == 2 and out == "", err
    assert err.strip().endswith(
        "one request would take 286 MiB (1 value), over the limit of 256 MiB per request"), err


@pytest.mark.usefixtures("plenty_of_memory")
@pytest.mark.parametrize(("member", "says"), [
    (_npy_header_only((10**200, 10**200), "float32"),
     "array 'arr_0' declares shape (10**200, 10**200), which no array can have"),
    (_npy_header_only((-1, 10), "float32"),
     "array 'arr_0' declares shape (-1, 10), which no array can have"),
    (_npy_header_only((1, 4), "float32", (9, 9)),
     "array 'arr_0' has a .npy header of version (9, 9), which this cannot read"),
    # Sized as a pointer per value, but never loaded: the load refuses objects first.
    (_npy_header_only((1, 10**9), "O"),
     "array 'arr_0' holds Python objects (dtype object); save numeric arrays"),
], ids=["huge", "negative", "version", "objects"])
def test_an_npz_header_no_array_can_have_is_refused_in_one_line(tmp_path, capsys, member,
                                                                says) -> None:
    path = tmp_path / "odd.npz"
    _zip(path, {"arr_0.npy": member})
    code, out, err = run_cli(capsys, "--input", str(path), "--model", "identity", *TINY)
    assert code == 2 and out == "", err
    says = says.replace("10**200", str(10**200))
    assert err.strip() == f"batchproc bench: error: --input {path}: {says}", err


def test_an_npz_with_one_named_input_twice_for_a_request_is_refused(tmp_path,
                                                                     capsys) -> None:
    # "0/a" and "00/a" are both request 0's input "a": one would be dropped unsaid.
    path = tmp_path / "twice.npz"
    np.savez(path, **{"0/a": np.ones((1, 4)), "00/a": np.ones((1, 8)),
                      "1/a": np.ones((1, 4))})
    code, out, err = run_cli(capsys, "--input", str(path), "--model", "identity", *TINY)
    assert code == 2 and out == "", err
    assert err.strip() == (f"batchproc bench: error: --input {path}: request 0 has input "
                           "'a' twice (keys differing in their number's zeros)"), err


def test_an_npz_compressed_in_a_way_zipfile_cannot_read_is_one_line(tmp_path,
                                                                     capsys) -> None:
    # Method 99 (AES encryption): zipfile raises NotImplementedError on opening it.
    path = tmp_path / "aes.npz"
    np.savez(path, np.ones((1, 4), np.float32))
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = data.index(signature) + offset
        data[at:at + 2] = (99).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "--input", str(path), "--model", "identity", *TINY)
    assert code == 2 and out == "", err
    assert err.strip() == (f"batchproc bench: error: --input {path}: not a readable .npz "
                           "file (a zip numpy cannot read: NotImplementedError)"), err


def test_an_npz_whose_arrays_would_not_fit_in_memory_is_refused_from_its_headers(
        tmp_path, capsys, monkeypatch) -> None:
    # Small requests, too many of them: a header may claim a shape no data backs.
    from batchproc.bench import inputs

    monkeypatch.setattr(inputs, "memory_available", lambda: 1 << 30)
    path = tmp_path / "lie.npz"
    _zip(path, {"rows.npy": _npy_header_only((100_000_000_000, 64), "float32")})
    code, out, err = run_cli(capsys, "--input", str(path), "--model", "identity", *TINY)
    assert code == 2 and out == "", err
    assert err.strip() == (
        f"batchproc bench: error: --input {path}: its arrays would take 23.3 TiB in "
        "memory, over half the memory available (1 GiB)"), err


def test_the_default_requests_are_different_rows() -> None:
    # A model that fails on some rows fails under every system: each is sent all of them.
    pool = FeatureRows(4).requests(seed=0)
    assert len(pool) == 256 and len({r.tobytes() for r in pool}) == 256
    assert all(r.shape == (1, 4) and r.dtype == np.float32 for r in pool)
    assert [r.tolist() for r in FeatureRows(4).requests(seed=0)] == [r.tolist() for r in pool]
    assert FeatureRows(4).requests(seed=1)[0].tolist() != pool[0].tolist()
    # Fewer rows when 256 would take more than the pool's memory.
    assert len(FeatureRows(1 << 20).requests(seed=0)) == 16


# -- one shape rule for a request, from a spec or an .npz ----------------------------------


@pytest.mark.parametrize(("spec", "shape", "needs"), [
    ("float32:0x4", (0, 4), "at least one row (axis 0)"),
    ("float32:1x0", (1, 0), "a length of at least 1 (axis 1)"),
    ("float32:1..3x0", (1, 0), "a length of at least 1 (axis 1)"),
    ("float32:1x4x0", (1, 4, 0), "at least 1 on every axis, not 0 on axis 2"),
    ("float32:1x4x3x0", (1, 4, 3, 0), "at least 1 on every axis, not 0 on axis 3"),
])
def test_a_spec_with_a_dimension_of_0_is_refused(capsys, spec, shape, needs) -> None:
    code, out, err = run_cli(capsys, "--input", spec, "--model", "identity", *TINY)
    assert code == 2 and out == "", err
    assert err.strip() == (f"batchproc bench: error: --input {spec!r} has shape {shape}: "
                           f"a request needs {needs}"), err


@pytest.mark.parametrize(("arrays", "key", "needs"), [
    ({"arr_0": np.zeros((1, 0), np.float32)}, "arr_0", "a length of at least 1 (axis 1)"),
    ({"arr_0": np.zeros((1, 4), np.float32), "arr_1": np.zeros((1, 0), np.float32)},
     "arr_1", "a length of at least 1 (axis 1)"),
    ({"arr_0": np.zeros((1, 4, 0), np.float32)}, "arr_0",
     "at least 1 on every axis, not 0 on axis 2"),
    ({"0/ids": np.zeros((1, 0), np.int64)}, "0/ids", "a length of at least 1 (axis 1)"),
    ({"0/ids": np.zeros((1, 4), np.int64), "0/mask": np.zeros((1, 4, 0), np.int64)},
     "0/mask", "at least 1 on every axis, not 0 on axis 2"),
    # Stacked: each row of the array is a request.
    ({"input_ids": np.zeros((4, 0), np.int64)}, "input_ids",
     "a length of at least 1 (axis 1)"),
    ({"input_ids": np.zeros((4, 3), np.int64), "pixels": np.zeros((4, 3, 2, 0), np.uint8)},
     "pixels", "at least 1 on every axis, not 0 on axis 3"),
])
def test_an_npz_request_with_a_dimension_of_0_is_refused_as_the_spec_form_is(
    tmp_path, capsys, arrays, key, needs
) -> None:
    path = tmp_path / "empty-axis.npz"
    np.savez(path, **arrays)
    code, out, err = run_cli(capsys, "--input", str(path), "--model", "identity", *TINY)
    assert code == 2 and out == "", err
    assert err.strip() == (f"batchproc bench: error: --input {path}: array {key!r} has "
                           f"shape {arrays[key].shape}: a request needs {needs}"), err


@pytest.mark.parametrize("arrays", [
    {"arr_0": np.zeros((1, 1), np.float32)},
    {"arr_0": np.zeros((1, 4, 1), np.float32), "arr_1": np.zeros((2, 3, 1), np.float32)},
    {"0/ids": np.zeros((1, 1), np.int64), "1/ids": np.zeros((1, 2), np.int64)},
    {"input_ids": np.zeros((4, 1), np.int64)},
    {"input_ids": np.zeros((4, 3, 1), np.int64)},
])
def test_an_npz_request_of_1_on_each_axis_is_accepted(tmp_path, capsys, arrays) -> None:
    path = tmp_path / "ones.npz"
    np.savez(path, **arrays)
    code, _, err = run_cli(capsys, "--input", str(path), "--model", "identity", *TINY)
    assert code == 0, err


@pytest.mark.parametrize("spec", ["float32:1x1", "float32:1x4x1", "float32:1x1..3x1"])
def test_a_spec_of_1_on_each_axis_is_accepted(capsys, spec) -> None:
    code, _, err = run_cli(capsys, "--input", spec, "--model", "identity", *TINY)
    assert code == 0, err


# -- the most dimensions a request may have: numpy's -----------------------------------


def spec_of(ndim: int) -> str:
    return "float32:" + "x".join(["1"] * ndim)


def test_a_spec_of_numpy_s_most_dimensions_runs_end_to_end(capsys) -> None:
    # batchproc cuts a batch's output of one-row requests through an axis more than
    # theirs: at numpy's most dimensions it slices them instead.
    code, _, err = run_cli(capsys, "--input", spec_of(MAX_DIMS), "--model", "identity",
                           *TINY)
    assert code == 0, err


def test_a_spec_of_one_dimension_more_is_refused_in_one_line(capsys) -> None:
    ndim = MAX_DIMS + 1
    code, out, err = run_cli(capsys, "--input", spec_of(ndim), "--model", "identity", *TINY)
    assert code == 2 and out == "", err
    assert err.strip() == (
        f"batchproc bench: error: --input {spec_of(ndim)!r} has {ndim} dimensions; a numpy "
        f"array has at most {MAX_DIMS}"), err


@pytest.mark.parametrize("key", ["arr_0", "0/ids", "ids"])
def test_an_npz_request_of_numpy_s_most_dimensions_runs_end_to_end(tmp_path, capsys,
                                                                   key) -> None:
    path = tmp_path / "deep.npz"
    np.savez(path, **{key: np.ones((1,) * MAX_DIMS, np.float32)})
    code, _, err = run_cli(capsys, "--input", str(path), "--model", "identity", *TINY)
    assert code == 0, err


# -- input names: what the message says -------------------------------------------------


@pytest.mark.parametrize("name", ["ok.npz", "a.b", "a:b", "a-b", "9lives", "ids\u00e9",
                                  "\u0661", "a b", ""])
def test_an_input_name_is_letters_digits_and_underscores(capsys, name) -> None:
    spec = f"{name}=float32:1x4"
    code, out, err = run_cli(capsys, "--input", spec, "--model", "identity", *TINY)
    assert code == 2 and out == "", err
    assert err.strip() == (f"batchproc bench: error: --input {spec!r}: {name!r} is not an "
                           "input name (letters, digits and _, not starting with a "
                           "digit)"), err


@pytest.mark.parametrize("name", ["input_ids", "_x", "A9", "x", "attention_mask2"])
def test_names_of_letters_digits_and_underscores_are_accepted(name) -> None:
    assert parse_tensor_spec(f"{name}=float32:1x4").name == name

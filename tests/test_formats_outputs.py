"""The output rule (docs/formats.md, "Outputs"): multi-output models, per-row lists, the
cases the rule refuses, and that no caller ever gets another caller's data.

Batches of 1, 2 and 3 requests are made with pause/resume: those are the sizes where a
wrong split can look right (a 2-output model with 2 rows, a list of 1 output with 1 row).
"""

import collections
import collections.abc
import dataclasses

import numpy as np
import optree
import pytest

from batchproc import BatchOutputError

SIZES = [1, 2, 3]


def one_batch(p, items, **kwargs):
    """Enqueue ``items`` while paused, so that they form one batch; their futures."""
    p.pause()
    futures = [p.enqueue_predict(x, **kwargs) for x in items]
    p.resume()
    return futures


def rows_of(i, n=1, features=4):
    return np.arange(i * 100, i * 100 + n * features, dtype=np.float64).reshape(n, features)


Pair = collections.namedtuple("Pair", "logits embeddings")


def _logits(b):
    return b.sum(axis=1, keepdims=True)


def _embeddings(b):
    return b * 2


MULTI_OUTPUTS = {
    "tuple": lambda b: (_logits(b), _embeddings(b)),
    "namedtuple": lambda b: Pair(_logits(b), _embeddings(b)),
    "dict": lambda b: {"logits": _logits(b), "embeddings": _embeddings(b)},
    "nested": lambda b: {"heads": (_logits(b), [_embeddings(b), None]), "extra": {"x": b}},
    # Batches here hold 1, 3 or 4 rows: never 2, where a list of 2 is undecidable.
    "list of outputs (ONNX)": lambda b: [_logits(b), _embeddings(b)],
}


@pytest.mark.parametrize("kind", MULTI_OUTPUTS)
@pytest.mark.parametrize("n", SIZES)
def test_each_caller_gets_its_own_rows_of_every_output(make_processor, recorder, kind, n):
    model = recorder(MULTI_OUTPUTS[kind])
    p = make_processor(model, max_batch_size=64)
    items = [rows_of(i, n=1 + i % 2) for i in range(n)]
    futures = one_batch(p, items)
    for item, future in zip(items, futures):
        got = future.result(timeout=10)
        expected = MULTI_OUTPUTS[kind](item)  # the model on this caller's item alone
        assert type(got) is type(expected)
        assert _tree_equal(got, expected), (got, expected)
    assert len(model.batches) == 1


# The most dimensions a numpy array may have.
NUMPY_MAX_DIMS = 64 if int(np.__version__.split(".")[0]) >= 2 else 32


@pytest.mark.parametrize("ndim", [NUMPY_MAX_DIMS - 1, NUMPY_MAX_DIMS])
def test_requests_of_numpy_s_most_dimensions_get_their_own_rows(make_processor, recorder,
                                                                 ndim):
    # A batch of one-row requests is cut through a (requests, 1, ...) view: an axis more
    # than numpy allows for requests of its most dimensions, which are sliced instead.
    model = recorder(lambda b: b * 2)
    p = make_processor(model, max_batch_size=8)
    items = [np.full((1,) * ndim, float(i)) for i in range(3)]
    futures = one_batch(p, items)
    for i, future in enumerate(futures):
        got = future.result(timeout=10)
        assert got.shape == (1,) * ndim and got.ravel()[0] == 2.0 * i
    assert len(model.batches) == 1


def _tree_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_tree_equal(x, y) for x, y in zip(a, b))
    if a is None:
        return b is None
    return np.array_equal(a, b) and np.shape(a) == np.shape(b)


@pytest.mark.parametrize("n", SIZES)
def test_a_stacked_sample_gets_element_i_of_every_output(make_processor, n):
    p = make_processor(lambda b: (b.sum(axis=1), {"twice": b * 2}), stack_items=True)
    items = [np.full(3, float(i)) for i in range(n)]
    for i, future in enumerate(one_batch(p, items)):
        total, rest = future.result(timeout=10)
        assert total == 3.0 * i
        np.testing.assert_array_equal(rest["twice"], np.full(3, 2.0 * i))


@pytest.mark.parametrize("n", SIZES)
def test_a_generic_item_gets_element_i_of_every_output(make_processor, n):
    model = lambda batch: (np.array([len(s) for s in batch]), [s.upper() for s in batch])  # noqa: E731
    p = make_processor(lambda batch: {"len": model(batch)[0]})
    words = ["a", "bb", "ccc"][:n]
    for word, future in zip(words, one_batch(p, words)):
        assert future.result(timeout=10) == {"len": len(word)}


@pytest.mark.parametrize("n", SIZES)
def test_a_per_row_list_gives_each_caller_its_rows_results(make_processor, n):
    # A list of per-row dicts: element k belongs to row k of the batch.
    p = make_processor(lambda b: [{"row": float(r[0])} for r in b])
    items = [rows_of(i, n=1 + i % 2) for i in range(n)]
    for item, future in zip(items, one_batch(p, items)):
        assert future.result(timeout=10) == [{"row": float(r[0])} for r in item]


@pytest.mark.parametrize("n", [2, 3])
def test_a_leaf_with_the_wrong_rows_fails_the_batch_naming_it(make_processor, n):
    model = lambda b: {"logits": b.sum(axis=1), "embeddings": b[:-1]}  # noqa: E731
    p = make_processor(model, max_retries=0, retry_delay=0.0, max_batch_size=64)
    # One request of n rows: it cannot be bisected, so its caller gets the batch's error.
    future = p.enqueue_predict(rows_of(0, n=n))
    with pytest.raises(BatchOutputError) as info:
        future.result(timeout=10)
    message = str(info.value)
    assert "output['embeddings']" in message and f"{n - 1} results" in message
    assert f"batch of {n}" in message


def test_a_non_array_leaf_fails_the_batch_naming_it(make_processor):
    p = make_processor(lambda b: (b, "metadata"), max_retries=0, retry_delay=0.0)
    with pytest.raises(BatchOutputError, match=r"output\[1\] is str"):
        p.enqueue_predict(rows_of(0)).result(timeout=10)


@pytest.mark.parametrize("out", ["text", {1, 2}, 3.5, (x for x in [1])],
                         ids=["str", "set", "float", "generator"])
def test_outputs_the_rule_does_not_cover_fail_the_batch(make_processor, out):
    p = make_processor(lambda b: out, max_retries=0, retry_delay=0.0)
    with pytest.raises(BatchOutputError, match="which the output rule cannot split"):
        p.enqueue_predict(rows_of(0)).result(timeout=10)


def test_an_undecidable_list_fails_until_a_batch_shows_what_it_means(make_processor):
    # Two outputs, given as a list, for a batch of 2 rows: as one result per row, the
    # first caller would get all the logits. The rule cannot tell; the batch fails.
    model = lambda b: [b * 10, b * 20]  # noqa: E731
    p = make_processor(model, max_retries=0, retry_delay=0.0, max_batch_size=64)
    with pytest.raises(BatchOutputError, match="no earlier batch has shown"):
        p.enqueue_predict(rows_of(0, n=2)).result(timeout=10)
    # Three rows show it: the list is two outputs.
    got = p.enqueue_predict(rows_of(1, n=3)).result(timeout=10)
    assert isinstance(got, list) and len(got) == 2
    np.testing.assert_array_equal(got[0], rows_of(1, n=3) * 10)
    # From now on a batch of 2 rows reads the same way, for every caller.
    items = [rows_of(2), rows_of(3)]
    for item, future in zip(items, one_batch(p, items)):
        a, b = future.result(timeout=10)
        np.testing.assert_array_equal(a, item * 10)
        np.testing.assert_array_equal(b, item * 20)


@pytest.mark.parametrize("later", [
    lambda k: rows_of(k, n=2, features=5),                       # another trailing shape
    lambda k: rows_of(k, n=2).astype(np.float32),                # another dtype
    lambda k: {"x": rows_of(k, n=2)},                            # another structure
], ids=["shape", "dtype", "mapping"])
def test_what_a_list_means_is_remembered_for_every_input_kind(make_processor, later):
    # One model answers every kind of input: a batch of one kind shows what its lists
    # mean for the batches of every other (docs/formats.md, "the same model").
    calls = []

    def model(b):
        x = b["x"] if isinstance(b, dict) else b
        calls.append(x.shape)
        return [x * 10, x.sum(axis=1)]

    p = make_processor(model, max_retries=0, retry_delay=0.0, max_batch_size=64)
    p.enqueue_predict(rows_of(0, n=3)).result(timeout=10)          # shows: two outputs
    item = later(1)
    a, b = p.enqueue_predict(item).result(timeout=10)
    x = item["x"] if isinstance(item, dict) else item
    np.testing.assert_array_equal(a, x * 10)
    np.testing.assert_array_equal(b, x.sum(axis=1))
    assert len(calls) == 2  # no failed call, no search


def test_a_per_row_list_of_arrays_stays_per_row_when_rows_equal_features(make_processor):
    # [f(row) for row in batch] where each row's result has 2 elements: in a batch of 2
    # rows it looks like 2 outputs of 2 rows, but an earlier batch showed per-row results.
    p = make_processor(lambda b: [r[:2] * 1.0 for r in b], max_batch_size=64)
    first = p.enqueue_predict(rows_of(0, n=3)).result(timeout=10)
    assert [list(x) for x in first] == [list(r[:2]) for r in rows_of(0, n=3)]
    items = [rows_of(1), rows_of(2)]
    for item, future in zip(items, one_batch(p, items)):
        got = future.result(timeout=10)
        assert len(got) == 1
        np.testing.assert_array_equal(got[0], item[0, :2])


def test_a_model_that_changes_its_list_structure_fails_the_batch(make_processor):
    calls = []

    def model(b):
        calls.append(len(b))
        return [b, b] if len(calls) == 1 else [r for r in b]

    p = make_processor(model, max_retries=0, retry_delay=0.0, max_batch_size=64)
    p.enqueue_predict(rows_of(0, n=3)).result(timeout=10)        # two outputs
    with pytest.raises(BatchOutputError, match="must not change"):
        p.enqueue_predict(rows_of(1, n=3)).result(timeout=10)    # now per row


def test_a_one_sample_list_is_one_result_per_item_with_a_hint(make_processor):
    p = make_processor(lambda batch: [np.ones((len(batch), 2)), np.ones((len(batch), 3))],
                       max_retries=0, retry_delay=0.0)
    with pytest.raises(BatchOutputError, match="return a tuple or dict"):
        one_batch(p, ["a", "b", "c"])[0].result(timeout=10)


class ModelOutput(collections.UserDict):
    """A mapping class optree does not know (as transformers' outputs are)."""


class FrozenMapping(collections.abc.Mapping):
    """A read-only mapping that is no dict at all."""

    def __init__(self, **values):
        self._values = values

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)


class Outputs(tuple):
    """A tuple class optree does not know (it knows namedtuples only)."""


class Layers(list):
    """A list class optree does not know."""


def _dicts(tree):
    """``tree`` with every mapping a dict and every tuple or list class but a namedtuple
    a tuple or list: what a caller receives."""
    if isinstance(tree, collections.abc.Mapping):
        return {k: _dicts(v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*map(_dicts, tree))
    if isinstance(tree, tuple):
        return tuple(map(_dicts, tree))
    if isinstance(tree, list):
        return list(map(_dicts, tree))
    return tree


CONTAINER_CLASS_OUTPUTS = {
    "top level": lambda b: ModelOutput(logits=_logits(b)),
    "in a tuple": lambda b: (ModelOutput(logits=_logits(b)), _embeddings(b)),
    "in a dict": lambda b: {"enc": ModelOutput(logits=_logits(b)), "x": b},
    "in a namedtuple": lambda b: Pair(ModelOutput(logits=_logits(b)), _embeddings(b)),
    "deep": lambda b: {"a": [(FrozenMapping(h=ModelOutput(e=_embeddings(b)), n=None),)]},
    "no dict at all": lambda b: FrozenMapping(logits=_logits(b)),
    "tuple class": lambda b: Outputs((_logits(b), _embeddings(b))),
    "list class in a dict": lambda b: {"h": Layers([_embeddings(b), b]), "n": None},
    "tuple class in a list class": lambda b: {"h": Layers([Outputs((b, _logits(b)))])},
}


@pytest.mark.parametrize("kind", CONTAINER_CLASS_OUTPUTS)
@pytest.mark.parametrize("n", SIZES)
def test_a_container_class_is_split_as_its_plain_kind_at_any_depth(make_processor, kind, n):
    model = CONTAINER_CLASS_OUTPUTS[kind]
    p = make_processor(model, max_batch_size=64)
    items = [rows_of(i, n=1 + i % 2) for i in range(n)]
    for item, future in zip(items, one_batch(p, items)):
        got = future.result(timeout=10)
        expected = _dicts(model(item))
        assert _types(got) == _types(expected)
        assert _tree_equal(got, expected), (got, expected)


def _types(tree):
    """The container types of ``tree``, at every depth."""
    if isinstance(tree, collections.abc.Mapping):
        return type(tree), {k: _types(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree), [_types(x) for x in tree]
    return None


def test_a_chunked_request_joins_container_class_outputs(make_processor):
    p = make_processor(lambda b: Outputs((ModelOutput(y=b * 2), Layers([b]))),
                       max_batch_size=2)
    item = rows_of(0, n=5)
    got = p.enqueue_predict(item).result(timeout=10)
    assert type(got) is tuple and type(got[1]) is list
    assert _tree_equal(got, ({"y": item * 2}, [item]))


def test_a_list_class_of_results_per_row_is_a_list_however_its_request_ran(make_processor):
    p = make_processor(lambda b: Layers([float(row[0]) for row in b]), max_batch_size=2)
    alone = p.enqueue_predict(rows_of(0, n=2)).result(timeout=10)  # handed over whole
    chunked = p.enqueue_predict(rows_of(1, n=5)).result(timeout=10)  # joined from chunks
    batched = [f.result(timeout=10) for f in one_batch(p, [rows_of(2), rows_of(3)])]
    assert [type(x) for x in (alone, chunked, *batched)] == [list] * 4
    assert alone == [0.0, 4.0] and chunked == [100.0, 104.0, 108.0, 112.0, 116.0]
    assert batched == [[200.0], [300.0]]


def test_a_list_class_of_outputs_is_read_as_a_list(make_processor):
    # ONNX Runtime's reading of a list: two outputs of a batch of 3 rows each.
    p = make_processor(lambda b: Layers([b * 2, b[:, :1]]), max_batch_size=64)
    items = [rows_of(i, n=3) for i in range(2)]
    for item, future in zip(items, one_batch(p, items)):
        got = future.result(timeout=10)
        assert type(got) is list and _tree_equal(got, [item * 2, item[:, :1]])


def test_none_leaves_stay_none_and_a_model_output_mapping_arrives_as_a_dict(make_processor):
    class ModelOutput(collections.OrderedDict):
        pass

    p = make_processor(lambda b: ModelOutput(logits=b * 3, past=None))
    items = [rows_of(0), rows_of(1, n=2)]
    for item, future in zip(items, one_batch(p, items)):
        got = future.result(timeout=10)
        assert type(got) is dict and got["past"] is None
        np.testing.assert_array_equal(got["logits"], item * 3)


@dataclasses.dataclass
class Holder:
    view: np.ndarray


@pytest.mark.parametrize("shape", ["dict per row", "dataclass per row", "nested object",
                                   "view of a view", "identity"])
def test_a_delivered_result_never_changes_whatever_holds_a_view(make_processor, shape):
    # Every model below returns (something holding) views of its input batch, which lives
    # in a worker's reused buffer; thousands of later batches must not change them.
    models = {
        "dict per row": lambda b: [{"emb": row} for row in b],
        "dataclass per row": lambda b: [Holder(row) for row in b],
        "nested object": lambda b: [[(Holder(row[1:]),)] for row in b],
        "view of a view": lambda b: (b[:, ::-1][:, 1:],),
        "identity": lambda b: b,
    }
    p = make_processor(models[shape], max_batch_size=2, initial_batch_size=2, max_workers=2,
                       processing_strategy="greedy", max_queue_size=10000)
    items = [rows_of(i) for i in range(3000)]
    results = [f.result(timeout=60) for f in [p.enqueue_predict(x) for x in items]]
    p.stop(timeout=10)
    assert p.get_stats()["total_batches"] >= 1500
    for item, got in zip(items, results):
        expected = models[shape](item.copy())
        assert _deep_equal(got, expected), (got, expected)


@pytest.mark.parametrize("model", [
    lambda b: b * 2, lambda b: b, lambda b: {"y": b[:, :2], "z": (b + 1,)},
], ids=["fresh output", "a view of the input buffer", "tree"])
def test_a_result_is_a_view_whose_writes_reach_only_its_own_rows(make_processor, model):
    # docs/formats.md, "A delivered result never changes": a view of the batch output,
    # no copy per request; writing into it reaches its own rows and nothing else.
    outputs = []
    p = make_processor(lambda b: outputs.append(model(b)) or outputs[-1], max_batch_size=64)
    items = [rows_of(i, n=1 + i % 2) for i in range(3)]
    results = [f.result(timeout=10) for f in one_batch(p, items)]
    (out,) = outputs
    for item, got in zip(items, results):
        assert _tree_equal(got, model(item))
        for leaf, whole in zip(_flat(got), _flat(out)):
            assert np.shares_memory(leaf, whole)  # a view, not a copy
    before = [[leaf.copy() for leaf in _flat(r)] for r in results]
    for leaf in _flat(results[1]):
        leaf[...] = -1.0
    for k in (0, 2):
        assert all(np.array_equal(a, b) for a, b in zip(_flat(results[k]), before[k]))


MAX_BUFFERS = 16  # the most buffers a worker's assembler rotates over


@pytest.mark.parametrize("model", [lambda b: b, lambda b: b[:, ::-1], lambda b: (b[:, 1:],)],
                         ids=["identity", "a view of the input", "a tuple of a view"])
def test_nothing_a_result_reaches_through_base_holds_an_earlier_batch(make_processor,
                                                                       model):
    # docs/formats.md: through ``result.base`` a caller reaches the rows of its own
    # batch. The worker's buffer, reused for a later, smaller batch, still holds an
    # earlier batch's rows past it: they must not be reachable.
    p = make_processor(model, max_batch_size=64, max_workers=1)
    secrets = [np.full((1, 4), 1000.0 + k) for k in range(16)]
    assert len([f.result(timeout=10) for f in one_batch(p, secrets)]) == 16  # all dropped
    # Batches of two, enough to come round every buffer of the worker's rotation.
    mine = [f.result(timeout=10) for _ in range(MAX_BUFFERS)
            for f in one_batch(p, [np.full((1, 4), -1.0)] * 2)]
    patterns = [s.tobytes()[:8] for s in secrets]
    for got in mine:
        for leaf in _flat(got):
            reached = leaf
            while isinstance(reached, np.ndarray):  # the raw bytes, whatever the dtype
                assert not any(pattern in reached.tobytes() for pattern in patterns)
                reached = reached.base


def _flat(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _flat(v)]
    if isinstance(tree, tuple):
        return [x for v in tree for x in _flat(v)]
    return [tree]


def _deep_equal(a, b):
    if dataclasses.is_dataclass(a):
        return _deep_equal(a.view, b.view)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_deep_equal(x, y) for x, y in zip(a, b))
    return np.array_equal(a, b)


def test_a_chunked_request_joins_a_list_of_outputs_output_by_output(make_processor):
    model = lambda b: [b[:, :3] * 1.0, b * 2.0]  # noqa: E731  (ONNX Runtime style)
    p = make_processor(model, max_batch_size=4)
    x = np.arange(50.0).reshape(10, 5)
    got = p.enqueue_predict(x).result(timeout=10)       # chunks of 4, 4 and 2 rows
    assert isinstance(got, list) and len(got) == 2
    np.testing.assert_array_equal(got[0], x[:, :3])
    np.testing.assert_array_equal(got[1], x * 2)


@pytest.mark.parametrize("out", [{}, {"info": {}}, (None, {}), [{}]],
                         ids=["empty dict", "nested", "tuple", "list"])
def test_callers_never_share_the_containers_of_an_output_without_arrays(make_processor, out):
    import copy

    p = make_processor(lambda b: copy.deepcopy(out) if not isinstance(out, list)
                       else [copy.deepcopy(out[0]) for _ in range(len(b))])
    got = [f.result(timeout=10) for f in one_batch(p, [rows_of(i) for i in range(3)])]
    assert len({id(g) for g in got}) == 3
    first = got[0][0] if isinstance(out, list) else got[0]
    if isinstance(first, dict):
        first["mine"] = 1
    elif isinstance(first, tuple):
        first[1]["mine"] = 1
    assert all("mine" not in repr(g) for g in got[1:])


def test_a_list_whose_length_is_the_rows_with_a_batch_sized_element_is_not_guessed(
        make_processor):
    # An LSTM-style [y (n, T), h (layers, n, hidden)] list for a batch of n == 2 rows
    # whose layers (3) differ from n: as "one result per row" caller 0 would get every
    # caller's y. Before any batch has shown the model's lists, the batch fails.
    model = lambda b: [b * 1.0, np.zeros((3, len(b), 4))]  # noqa: E731
    p = make_processor(model, max_retries=0, retry_delay=0.0, max_batch_size=64)
    with pytest.raises(BatchOutputError, match="no earlier batch has shown"):
        p.enqueue_predict(rows_of(0, n=2)).result(timeout=10)
    # A list of 2 for 4 rows is read as outputs: the error names h, the one without them.
    with pytest.raises(BatchOutputError, match=r"3 results in output\[1\] for a batch of 4"):
        p.enqueue_predict(rows_of(0, n=4)).result(timeout=10)


class Results(list):
    pass


OFF_AXIS_OUTPUTS = {
    # An LSTM's state, (num_layers=2, batch, hidden), beside a per-row output.
    "tuple": lambda b: (b * 10, np.stack([b, b + 0.5])),
    "dict": lambda b: {"y": b * 10, "h": np.stack([b, b + 0.5])},
    "nested": lambda b: {"y": b * 10, "state": (np.stack([b, b + 0.5]),)},
    # The state alone, as a list of outputs: nothing in it has the batch's rows.
    "list of states": lambda b: [np.stack([b, b + 0.5]), np.stack([b, b - 0.5])],
    # The batch on axis 1 of the only output: (features=2, batch).
    "transposed": lambda b: b[:, :2].T.copy(),
    # Two results whatever the batch, in a list and in a list's subclass.
    "list": lambda b: [repr(b.tolist())] * 2,
    "list subclass": lambda b: Results([repr(b.tolist())] * 2),
}


@pytest.mark.parametrize("kind", OFF_AXIS_OUTPUTS)
def test_a_failed_batch_s_search_never_cuts_an_output_along_another_axis(make_processor,
                                                                         kind):
    # Three requests: the output's axis 0 has 2 entries, not 3, and the batch fails. Its
    # search ran two of them together: 2 rows, and the 2 entries passed the length
    # check, so each caller got a slice of the layers, holding another caller's values.
    # Once an output could not be cut, the batch's requests run alone: every caller
    # gets the error (alone, its 1 row is not the 2 entries either), none another's data.
    model = OFF_AXIS_OUTPUTS[kind]
    calls = []
    p = make_processor(lambda b: (calls.append(len(b)), model(b))[1], max_workers=1,
                       max_batch_size=8, max_retries=0)
    futures = one_batch(p, [rows_of(i) for i in range(3)])
    for future in futures:
        assert isinstance(future.exception(timeout=10), BatchOutputError)
    assert p.get_stats()["total_processed"] == 0
    assert calls == [3, 1, 1, 1]
    if kind == "list of states":
        return  # alone, 2 rows read as 2 outputs or 2 results: not told (its own test)
    # The rule is the batch's own: a lone request of 2 rows later gets the output
    # whole, as it always did (its own data, whatever its axis 0 holds).
    got = p.enqueue_predict(rows_of(0, n=2)).result(timeout=10)
    expected = _dicts(model(rows_of(0, n=2)))  # a list subclass arrives as a list
    assert optree.tree_structure(got) == optree.tree_structure(expected)
    for a, b in zip(optree.tree_leaves(got), optree.tree_leaves(expected)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("items", [["alice", "bob", "carol", "dave"],
                                   [rows_of(i) for i in range(4)]],
                         ids=["one result per item", "one result per row"])
def test_a_list_of_results_of_a_constant_length_is_refused_in_the_search(make_processor,
                                                                         items):
    # Two results whatever the batch, each made of every item: the batch of 4 fails, and
    # the search's call of 2 passed the count and handed two callers each other's data.
    def two_results(batch):
        return [repr(list(batch))] * 2

    p = make_processor(two_results, max_workers=1, max_batch_size=8, max_retries=0)
    for future in one_batch(p, items):
        error = future.exception(timeout=10)
        assert isinstance(error, BatchOutputError)
    assert p.get_stats()["total_processed"] == 0


def test_a_time_major_output_of_padded_inputs_is_never_cut_in_the_search(make_processor):
    # (T, batch), as torch's LSTM gives by default: T follows the padded length, so a
    # smaller call of shorter items had T equal to its rows and was cut along time.
    calls = []

    def time_major(batch):
        calls.append(batch.shape)
        return batch.T.copy()

    p = make_processor(time_major, max_workers=1, max_batch_size=8, max_retries=0,
                       pad_value=0)
    items = [np.full((1, 2), 1.0), np.full((1, 2), 2.0), np.full((1, 5), 3.0),
             np.full((1, 5), 4.0)]
    for future in one_batch(p, items):
        assert isinstance(future.exception(timeout=10), BatchOutputError)
    assert calls[0] == (4, 5) and all(shape[0] == 1 for shape in calls[1:])


def test_an_output_that_follows_the_batch_is_still_served_by_the_search(make_processor):
    # A model that drops a row it cannot handle: its output is one row short for every
    # batch holding one, so lengths that a failed call showed come back in calls of
    # other sizes. The search may then refuse a good call, never a caller: each is
    # served (alone if need be), and only the bad one fails.
    def drops_bad_rows(b):
        return b[b[:, 0] != 100] * 10

    p = make_processor(drops_bad_rows, max_workers=1, max_batch_size=8, max_retries=0)
    futures = one_batch(p, [rows_of(i) for i in range(6)])
    with pytest.raises(BatchOutputError):
        futures[1].result(timeout=10)
    for i in (0, 2, 3, 4, 5):
        assert (futures[i].result(timeout=10) == rows_of(i) * 10).all()


def test_a_per_row_model_keeps_its_reading_when_one_row_result_has_the_batch_length(
        make_processor):
    # Per-row results of varying length: one of them happens to have as many elements
    # as the batch has rows. An earlier batch showed per-row results, so that decides.
    model = lambda b: [np.zeros(int(r[0])) for r in b]  # noqa: E731
    p = make_processor(model, max_batch_size=64)
    p.enqueue_predict(np.array([[5.0], [7.0]])).result(timeout=10)    # shows: per row
    got = p.enqueue_predict(np.array([[2.0], [9.0]])).result(timeout=10)
    assert [len(g) for g in got] == [2, 9]


# The rule does not depend on how many rows or requests a batch has: a batch of one row,
# a lone request and a request cut into one-row chunks read an output as any batch does.

def _onnx_logits(b):
    return [np.stack([b, -b], axis=-1)]  # [logits (rows, length, 2)], session.run style


@pytest.mark.parametrize("per_token", [True, {0}], ids=["all", "by position"])
def test_a_one_row_list_of_one_output_is_cut_per_token(make_processor, per_token):
    # A list of one array holding the batch's one row: with per_token_outputs only
    # outputs can be meant. Before, a batch of one row read it as one result per row and
    # failed, before and after a batch of two rows had shown the list holds outputs.
    p = make_processor(_onnx_logits, pad_value=0, pad_to_multiple_of=8,
                       per_token_outputs=per_token, max_retries=0, retry_delay=0.0)
    for rows in (1, 2, 1):
        x = np.arange(1, rows * 5 + 1).reshape(rows, 5)
        got = p.enqueue_predict(x).result(timeout=10)     # padded to 8, cut back to 5
        assert isinstance(got, list) and len(got) == 1
        np.testing.assert_array_equal(got[0], np.stack([x, -x], axis=-1))
    # Two outputs for two rows, the list's length: undecidable before a batch has shown
    # what the model's lists are, but per_token_outputs leaves only outputs to mean.
    p = make_processor(lambda b: [b * 1, b * 2], pad_value=0, pad_to_multiple_of=8,
                       per_token_outputs=per_token, max_retries=0, retry_delay=0.0)
    x = np.arange(1, 11).reshape(2, 5)
    got = p.enqueue_predict(x).result(timeout=10)
    np.testing.assert_array_equal(got[0], x)
    assert got[1].shape == ((2, 5) if per_token is True else (2, 8))


@pytest.mark.parametrize("config", [{"max_batch_size": 1},
                                    {"pad_value": 0, "max_batch_tokens": 4}],
                         ids=["max_batch_size", "max_batch_tokens"])
def test_one_row_chunks_join_a_list_as_the_whole_request_would_get_it(make_processor,
                                                                       config):
    x = np.arange(12.0).reshape(3, 4)
    # A list of one output: one-row chunks cannot show it, and were chained per row.
    p = make_processor(lambda b: [b * 2], **config)
    got = p.enqueue_predict(x).result(timeout=10)
    assert isinstance(got, list) and len(got) == 1
    np.testing.assert_array_equal(got[0], x * 2)
    # One result per row (each of 4 values, not one row): still chained per row.
    p = make_processor(lambda b: [r * 2 for r in b], **config)
    got = p.enqueue_predict(x).result(timeout=10)
    assert isinstance(got, list) and len(got) == 3
    for g, r in zip(got, x):
        np.testing.assert_array_equal(g, r * 2)


def test_a_list_of_outputs_with_an_output_missing_rows_fails_naming_it(make_processor):
    # As a tuple's error does (docs/formats.md): the output by its path, both lengths.
    # Before, the list was read as per-row results: "returned 2 results for a batch of 4".
    p = make_processor(lambda b: [b * 2, b[:-1]], max_retries=0, retry_delay=0.0,
                       max_batch_size=64, max_workers=1)
    futures = one_batch(p, [rows_of(i) for i in range(4)])
    message = str(futures[0].exception(timeout=10))
    assert "3 results in output[1] for a batch of 4" in message, message
    assert "0 results in output[1] for a batch of 1" in message, message
    # Once a batch has shown the list holds outputs, a list of the batch's length too.
    p = make_processor(lambda b: [b * 2, b[:1]], max_retries=0, retry_delay=0.0)
    assert len(p.enqueue_predict(rows_of(0)).result(timeout=10)) == 2
    for n in (2, 3):
        with pytest.raises(BatchOutputError,
                           match=rf"^process_func returned 1 results in output\[1\] "
                                 rf"for a batch of {n}$"):
            p.enqueue_predict(rows_of(0, n=n)).result(timeout=10)


class IndexOnly:
    """A length and integer indexing, but no slices (like a deque)."""

    def __init__(self, rows):
        self.rows = list(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if not isinstance(i, int):
            raise TypeError("integer indices only")
        return self.rows[i]


@pytest.mark.parametrize("model", [lambda b: collections.deque(b * 2),
                                   lambda b: (b * 2, IndexOnly(b))],
                         ids=["deque", "in a tuple"])
def test_an_output_that_does_not_slice_fails_alone_as_in_a_batch(make_processor, recorder,
                                                                  model):
    # Alone, the output was handed over uncut: its request passed alone and failed in a
    # batch, so every batch failed, was bisected and halved the target size, silently.
    model = recorder(model)
    p = make_processor(model, max_retries=0, retry_delay=0.0, max_batch_size=8,
                       max_workers=1)
    with pytest.raises(BatchOutputError, match="could not be cut"):
        p.enqueue_predict(rows_of(0)).result(timeout=10)
    for _ in range(2):
        first = len(model.sizes)
        futures = one_batch(p, [rows_of(i) for i in range(4)])
        for future in futures:
            assert isinstance(future.exception(timeout=10), BatchOutputError)
        assert model.sizes[first] == 4  # each fails alone: the target size is not halved

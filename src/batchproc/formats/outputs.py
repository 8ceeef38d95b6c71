"""The output rule: how ``process_func``'s output for a batch is checked and split back.

The rule goes by the output's type first; shapes are checked (docs/formats.md):

* An **array or tensor** (or any other object with a length that slices by rows: a masked
  array, a DataFrame) is split by rows: the caller of a request holding rows
  ``[start:end]`` of the batch gets ``out[start:end]``; with a one-sample format (stacked
  samples, generic objects) caller ``i`` gets ``out[i]``.
* A **tuple** (namedtuple included) or a **mapping** is a multi-output: each caller gets
  the same structure, every leaf cut as above. Containers nested inside (tuples, lists,
  dicts) are part of the structure; ``None`` stays ``None``. Every leaf must be an array
  or tensor with the batch's leading length on axis 0. A container class optree does not
  know (a ``UserDict``, a subclass of tuple or list) is its plain kind (``flatten``).
* A **list**, with a one-sample format, holds one result per item (Ray Serve's rule).
  With a format of rows it is either one result per row (``[f(row) for row in batch]``)
  or several outputs, like a tuple (ONNX Runtime's ``run`` returns a list of outputs):
  it is several outputs when every element is an array or tensor with the batch's rows
  on axis 0 and the list's own length differs from them; one result per row when its
  length is the batch's rows and no element is such an array. When its length is the
  batch's rows and some element is such an array, the reading this format's model
  showed on an earlier batch decides (a model's output structure does not change with
  the batch size); before any has, the batch fails. But with ``per_token_outputs`` only
  several outputs can be meant (per-row results have no padded axis), and with one row a
  list of one array holding it (ONNX Runtime's ``[logits]``) is read as one output: a
  lone caller gets the same data either way, and a request cut into one-row chunks is
  joined as one output. Neither is recorded as the reading.

No part of the rule depends on how many rows or requests a batch has: a lone request's
output is handed over uncut, but its leaves are checked as a batch's would be cut (an
object with a length that does not slice, a ``deque``, fails alone too).

Any output the rule does not cover (a string, a set, a generator, a scalar) is an error.
Every error is a ``BatchOutputError`` naming the offending leaf by its path and both
lengths: the batch fails, as if the model raised.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TypeAlias

import numpy as np
import optree

from .._native.future_state import Request
from ..errors import BatchOutputError
from ..log_limits import plural

# Which outputs have the padded axis on axis 1 and are cut back to each caller's length:
# True for every output, else the top-level names (mapping outputs) or positions (tuple
# outputs) of those that do; the empty set for none.
PerToken: TypeAlias = "bool | frozenset[str | int]"
NO_TRIM: frozenset[str | int] = frozenset()

_ndarray = np.ndarray


_torch: tuple[Any, type | None] = (None, None)  # (the torch module seen, its Tensor)


def tensor_type() -> type | None:
    """``torch.Tensor`` once torch is fully imported, else None (never imports it).

    An item can only be a tensor once some thread's ``import torch`` has finished; while
    another thread is still running it, ``sys.modules`` already holds the partly
    initialised module, which may not have ``Tensor`` yet, and nothing can be a tensor.
    """
    global _torch
    torch = sys.modules.get("torch")
    seen, tensor = _torch
    if torch is seen:
        return tensor
    if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", False):
        return None  # not imported, or still importing (what the import machinery sets)
    tensor = getattr(torch, "Tensor", None)
    if not isinstance(tensor, type):
        return None
    _torch = (torch, tensor)  # one tuple: other threads see both or neither
    return tensor


def is_tensor(obj: object) -> bool:
    """Whether ``obj`` is a torch tensor (without importing torch if nobody has)."""
    tensor = tensor_type()
    return tensor is not None and isinstance(obj, tensor)


# Containers optree keeps whole, as leaves, when it does not know their class: a mapping
# (a ``UserDict``, a model-output class) or a subclass of tuple or list (namedtuples and
# structseqs, such as torch's ``return_types``, it knows).
_UNKNOWN_CONTAINERS = (tuple, list, Mapping)


def flatten(tree: Any) -> tuple[Any, list[Any], list[Any], Any]:
    """``(tree, paths, leaves, spec)``: ``tree`` flattened by optree (``None`` is no
    leaf), with every container optree does not know made its plain kind first, at any
    depth (a mapping a ``dict``, a tuple or list subclass a ``tuple`` or ``list``): optree
    would keep it whole, as a leaf. A tree holding none is flattened once."""
    paths, leaves, spec = optree.tree_flatten_with_path(tree, none_is_leaf=False)
    for leaf in leaves:
        if type(leaf) is not _ndarray and isinstance(leaf, _UNKNOWN_CONTAINERS):
            tree = _plain(tree)
            paths, leaves, spec = optree.tree_flatten_with_path(tree, none_is_leaf=False)
            break
    return tree, paths, leaves, spec


def _plain(tree: Any) -> Any:
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=False)
    return spec.unflatten([_plain(_plain_kind(leaf)) if isinstance(leaf, _UNKNOWN_CONTAINERS)
                           else leaf for leaf in leaves])


def _plain_kind(container: Any) -> Any:
    if isinstance(container, Mapping):
        return dict(container)
    return tuple(container) if isinstance(container, tuple) else list(container)


def _is_leaf(obj: object) -> bool:
    """An array-like leaf: an ndarray, a tensor, or another object with a length that is
    not one of the rule's containers nor text."""
    if isinstance(obj, _ndarray):
        return True
    if isinstance(obj, (list, tuple, Mapping, str, bytes, bytearray)):
        return False
    return hasattr(obj, "__len__") and hasattr(obj, "__getitem__")


def _leading(obj: Any) -> int | None:
    """The length of axis 0, or None when there is none (0-d, no length)."""
    if isinstance(obj, _ndarray):
        return obj.shape[0] if obj.ndim else None
    try:
        return len(obj)
    except TypeError:  # a 0-d tensor, or an object whose __len__ refuses
        return None


def _path_str(path: tuple[Any, ...]) -> str:
    return "output" + "".join(f"[{p!r}]" for p in path)


class ListReading:
    """What a format's model means by a list output, once a batch has shown it."""

    __slots__ = ("outputs",)

    def __init__(self) -> None:
        self.outputs: bool | None = None  # True: several outputs; False: one per row


def split(out: Any, requests: list[Request], built: Any, one_sample: bool,
          per_token: PerToken, reading: ListReading) -> list[Any]:
    """Each request's part of ``out``, in request order (the module's rule).

    ``built`` is the batch as built (``formats.base.Built``): ``built.length`` is the
    leading length every output must have, ``built.padded_length`` the length that
    per-token outputs must have on axis 1. ``reading`` is the format's memory of what its
    model means by a list.
    """
    n = built.length
    if type(out) is _ndarray and not per_token:
        # The common case first: one array.
        if not out.ndim or out.shape[0] != n:
            raise _wrong_rows((), out, n, _rows_hint(requests))
        return _cut_rows(out, requests, one_sample)
    if isinstance(out, list):
        if type(out) is not list:  # a subclass is a list, cut or whole (see flatten)
            out = list(out)
        if _list_of_outputs(out, n, one_sample, bool(per_token), reading):
            return _split_tree(out, requests, n, built.padded_length, one_sample, per_token)
        if per_token:
            raise BatchOutputError(
                "per_token_outputs needs an array, tuple or dict output; process_func "
                "returned a list with one result per row, which has no padded axis to cut")
        return _cut_rows(out, requests, one_sample)
    if _is_leaf(out):
        if _leading(out) != n:
            raise _wrong_rows((), out, n, _rows_hint(requests))
        if per_token:
            if per_token is not True:
                raise BatchOutputError(
                    f"per_token_outputs names {sorted(per_token, key=repr)} but process_func "
                    f"returned one {type(out).__name__}, not a tuple or dict of outputs")
            _check_per_token((), out, built.padded_length)
            return _cut_tokens(out, requests, one_sample)
        return _cut_rows(out, requests, one_sample)
    if isinstance(out, (tuple, Mapping)):
        return _split_tree(out, requests, n, built.padded_length, one_sample, per_token)
    raise BatchOutputError(
        f"process_func returned {type(out).__name__}, which the output rule cannot split: "
        f"return an array or tensor with the batch's {plural(n, 'row')} on axis 0, a tuple "
        "or dict of them (several outputs), or a list with one result per row")


def _wrong_rows(path: tuple[Any, ...], leaf: Any, n: int, hint: str = "") -> BatchOutputError:
    got = _leading(leaf)
    where = "" if not path else f" in {_path_str(path)}"
    if got is None:
        return BatchOutputError(
            f"process_func returned {type(leaf).__name__}{where} with no axis 0 "
            f"for a batch of {n}{hint}", path=path)
    return BatchOutputError(
        f"process_func returned {got} results{where} for a batch of {n}{hint}",
        path=path, rows=got)


def _rows_hint(requests: list[Request]) -> str:
    """For a wrong count of results: how a 1-D array or tensor item of the batch was
    counted, the usual mistake behind one (one sample of N values given as shape (N,),
    not (1, N)). Other items count as their format (or ``item_size``) says."""
    tensor = tensor_type()
    kinds: tuple[type, ...] = (_ndarray,) if tensor is None else (_ndarray, tensor)
    for request in requests:
        item = request.item
        if isinstance(item, kinds) and getattr(item, "ndim", None) == 1 and request.rows > 1:
            return (" (this batch has a 1-D item, which counts one row per value: one "
                    "sample of N values is an item of shape (1, N), not (N,))")
    return ""


def _list_of_outputs(out: list[Any], n: int, one_sample: bool, per_token: bool,
                     reading: ListReading) -> bool:
    """Whether a list output is several outputs (True) or one result per row (False), by
    the module's rule; ``BatchOutputError`` when it is neither or cannot be told. The rule
    is the same for every batch size: one row and one request included."""
    k = len(out)
    with_rows = [_is_leaf(x) and _leading(x) == n for x in out]
    all_rows = k > 0 and all(with_rows)
    if one_sample:
        if k != n:
            hint = (f" (a list of {k} outputs with {plural(n, 'row')} each? With these "
                    "inputs a list is one result per item: return a tuple or dict for "
                    "several outputs)"
                    if all_rows else "")
            raise BatchOutputError(
                f"process_func returned {k} results for a batch of {n}{hint}", path=(),
                rows=k)
        return False
    known = reading.outputs
    if k != n:
        if not all_rows:
            # Outputs (a model known to return them, or some element has the batch's
            # rows as an output would): name the one that has not, as a tuple's error.
            if known or (known is None and (per_token or any(with_rows))):
                raise _wrong_output(out, n, with_rows)
            raise BatchOutputError(f"process_func returned {k} results for a batch of {n}",
                                   path=(), rows=k)
        decided = True  # several outputs, each with the batch's rows
    elif not any(with_rows):
        decided = False  # one result per row: no element looks like a batch's output
    else:
        # Some element has the batch's rows, as an output would; the list's length is
        # the batch's too, as per-row results would be. An earlier batch decides. Before
        # one has: with per_token_outputs only outputs can be meant (per-row results have
        # no padded axis); with one row (a list of one array holding it, ONNX Runtime's
        # [logits]) a lone caller gets the same data either way, and outputs is what the
        # one-row chunks of a larger request are joined as. Neither shows what the model
        # means, so neither is recorded.
        if known is False:
            return False
        if known or per_token or n == 1:
            if not all_rows:
                raise _wrong_output(out, n, with_rows)
            return True
        what = (f"a list of {k} arrays with {plural(n, 'row')} each" if all_rows else
                f"a list of {k} results, some of them arrays with the batch's "
                f"{plural(n, 'row')}")
        raise BatchOutputError(
            f"process_func returned {what} for a batch of {n}: that is one result per row "
            f"or {k} outputs split by rows, and no earlier batch has shown which "
            "(several outputs must all have the batch's rows on axis 0). Return a tuple or "
            "dict for several outputs, or one stacked array for one result per row")
    if known is None:
        reading.outputs = decided
    elif known != decided:
        raise BatchOutputError(
            f"process_func returned a list of {k} for a batch of {n}, read as "
            f"{'several outputs' if decided else 'one result per row'}, but earlier "
            f"batches returned {'one result per row' if decided else 'several outputs'}:"
            " a model's output structure must not change with the batch")
    return decided


def _wrong_output(out: list[Any], n: int, with_rows: list[bool]) -> BatchOutputError:
    """The error for a list read as several outputs: its first element without the
    batch's rows, named by its path (``output[1]``) with both lengths, as in a tuple."""
    i = with_rows.index(False)
    if _is_leaf(out[i]):
        return _wrong_rows((i,), out[i], n)
    return BatchOutputError(
        f"{_path_str((i,))} is {type(out[i]).__name__}: every output of a list of outputs "
        f"must be an array or tensor with the batch's {plural(n, 'row')} on axis 0")


# Leaf types seen to slice by rows. A lone request's leaf is handed over uncut, so a type
# not seen yet is cut once to no rows: a leaf that a batch could not cut fails alone too.
# Bounded: a type forgotten is only checked again.
_SLICED: set[type] = set()


def _check_slices(leaf: Any) -> None:
    """Raise what cutting ``leaf`` by rows would (once per type; an ndarray slices)."""
    kind = type(leaf)
    if kind is _ndarray or kind in _SLICED:
        return
    iloc = getattr(leaf, "iloc", None)
    (iloc if iloc is not None else leaf)[0:0]
    if len(_SLICED) >= 256:
        _SLICED.clear()
    _SLICED.add(kind)


def _cut_rows(leaf: Any, requests: list[Request], one_sample: bool) -> list[Any]:
    """Cut a checked leaf (or per-row list) into each request's part."""
    count = len(requests)
    iloc = getattr(leaf, "iloc", None)  # pandas: positional rows, not labels or columns
    if one_sample:
        if type(leaf) is _ndarray or type(leaf) is list:
            return list(leaf)
        if iloc is not None:
            return [iloc[i] for i in range(count)]
        return [leaf[i] for i in range(count)]
    if count == 1:
        _check_slices(leaf)  # one request (every batch at low load): its part, if it slices
        return [leaf]
    if type(leaf) is _ndarray and leaf.shape[0] == count:
        for request in requests:
            if request.rows != 1:
                break
        else:
            # One row each (the usual case): numpy makes the (1, ...) views in C, but
            # through an axis more than the leaf's, which numpy may not allow (a leaf of
            # its most dimensions): those are sliced below.
            try:
                return list(leaf.reshape((count, 1, *leaf.shape[1:])))
            except ValueError:
                pass
    cut = iloc if iloc is not None else leaf
    parts = []
    start = 0
    for request in requests:
        end = start + request.rows
        parts.append(cut[start:end])
        start = end
    return parts


def _check_per_token(path: tuple[Any, ...], leaf: Any, padded_length: int) -> None:
    shape = getattr(leaf, "shape", None)
    if shape is None or len(shape) < 2 or shape[1] != padded_length:
        got = "no axis 1" if shape is None or len(shape) < 2 else f"{shape[1]} on axis 1"
        raise BatchOutputError(
            f"per-token {_path_str(path)} has {got}, but the batch was padded to "
            f"{padded_length}: per_token_outputs must name outputs whose axis 1 is the "
            "padded axis")


def _cut_tokens(leaf: Any, requests: list[Request], one_sample: bool) -> list[Any]:
    """Cut a per-token leaf into each request's rows, each cut back to its own length."""
    if one_sample:
        return [leaf[i, :r.length] for i, r in enumerate(requests)]
    parts = []
    start = 0
    for request in requests:
        end = start + request.rows
        parts.append(leaf[start:end, :request.length])
        start = end
    return parts


def _split_tree(out: Any, requests: list[Request], n: int, padded_length: int,
                one_sample: bool, per_token: PerToken) -> list[Any]:
    out, paths, leaves, spec = flatten(out)
    if per_token is not True and per_token:
        _check_names(out, per_token)
    tokens = []
    for path, leaf in zip(paths, leaves):
        if not _is_leaf(leaf):
            raise BatchOutputError(
                f"{_path_str(path)} is {type(leaf).__name__}: every leaf of a tuple or dict "
                f"output must be an array or tensor with the batch's {plural(n, 'row')} on "
                "axis 0")
        if _leading(leaf) != n:
            raise _wrong_rows(path, leaf, n)
        trim = per_token is True or (bool(path) and path[0] in per_token)  # type: ignore[operator]
        if trim:
            _check_per_token(path, leaf, padded_length)
        tokens.append(trim)
    if len(requests) == 1 and not one_sample and not any(tokens):
        for leaf in leaves:
            _check_slices(leaf)
        return [out]
    if not leaves:  # containers only: each caller gets its own copy of them
        return [spec.unflatten([]) for _ in requests]
    columns = [(_cut_tokens if trim else _cut_rows)(leaf, requests, one_sample)
               for leaf, trim in zip(leaves, tokens)]
    return [spec.unflatten(list(parts)) for parts in zip(*columns)]


def _check_names(out: Any, names: frozenset[str | int]) -> None:
    have = list(out.keys()) if isinstance(out, Mapping) else list(range(len(out)))
    missing = [name for name in names if name not in have]
    if missing:
        raise BatchOutputError(
            f"per_token_outputs names {sorted(missing, key=repr)}, which the output does "
            f"not have (it has {have})")


def join(parts: list[Any], list_of_outputs: bool = False) -> Any:
    """One result from the results of a request's chunks (in order): arrays and tensors
    concatenated on axis 0, per-row lists chained, tuples, dicts and lists of outputs
    (``list_of_outputs``) joined output by output."""
    first = parts[0]
    if isinstance(first, list) and not list_of_outputs:
        joined: list[Any] = []
        for part in parts:
            joined.extend(part)
        return joined
    if isinstance(first, (tuple, list, Mapping)):
        flat = [optree.tree_flatten(p, none_is_leaf=False) for p in parts]
        spec = flat[0][1]
        if any(s != spec for _, s in flat):
            raise BatchOutputError("the chunks of one request got outputs of different "
                                   "structures; they cannot be joined")
        return spec.unflatten([_join_leaves(list(column)) for column in
                               zip(*(leaves for leaves, _ in flat))])
    return _join_leaves(parts)


def _join_leaves(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, _ndarray):
        if type(first) is not _ndarray and isinstance(first, np.ma.MaskedArray):
            return np.ma.concatenate(parts)  # type: ignore[no-untyped-call]
        dtype = first.dtype
        if dtype.metadata is not None and all(p.dtype == dtype for p in parts):
            return np.concatenate(parts, dtype=dtype)  # keeps the metadata numpy drops
        return np.concatenate(parts)
    if is_tensor(first):
        import torch

        return torch.cat(parts)
    module = type(first).__module__.partition(".")[0]
    if module == "pandas":
        import pandas

        return pandas.concat(parts)
    raise BatchOutputError(
        f"the chunks of one request returned {type(first).__name__}, which batchproc "
        "cannot join; return arrays, tensors or lists")

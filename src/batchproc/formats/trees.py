"""Named and positional inputs: a mapping or tuple of arrays/tensors, batched leaf by leaf.

A tokenizer's ``{"input_ids": (1, L), "attention_mask": (1, L)}`` or a multi-input model's
``(image, text)`` is one request; a batch holds the same structure with each leaf batched
across requests (the model gets ``{"input_ids": (rows, L), ...}``). Structures nest (tuples,
lists and mappings inside, walked by ``optree``; ``None`` stays ``None``; a container class
optree does not know is made its plain kind at any depth: a mapping a ``dict``, a tuple or
list subclass but a namedtuple a ``tuple`` or ``list``). Every leaf of one
request must have the same rows on axis 0 (with ``stack_items`` each leaf is one sample).
Requests share a batch only with the same structure (keys, positions) and, leaf by leaf,
the same kind (array or tensor), dtype, device and trailing shape. Padding is by input
name (``padding.py``): the top-level key of the leaf.

A mapping or tuple none of whose leaves is an array or tensor is a generic object; one
that mixes them with other values is refused at enqueue (which one was meant cannot be
told).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._native.future_state import Request, items_of, longest, total_rows
from .arrays import ArrayLeaf, describe_array
from .base import (
    BatchFormat,
    Built,
    Description,
    Family,
    Limits,
    Workspace,
    check_queued_shapes,
    queued_shape,
    row_chunks,
)
from .outputs import flatten, tensor_type
from .padding import Padding
from .tensors import TensorLeaf, describe_tensor

_ndarray = np.ndarray


def _name(path: tuple[Any, ...]) -> str:
    return "item" + "".join(f"[{p!r}]" for p in path)


def _cut_rows(item: tuple[Any, ...], start: int, stop: int) -> Any:
    return tuple(leaf[start:stop] for leaf in item)


def _padded_nbytes(leaves: list[tuple[int, int]], length: int) -> int:
    """The bytes of an item whose inputs are ``(bytes, length)`` pairs (length 0: not
    padded) once every padded input is padded to ``length``, the item's longest: a batch
    pads each padded input to the batch's length, the short ones too (a one-token
    ``decoder_input_ids`` beside a 400-token ``input_ids`` takes 400 tokens)."""
    return sum(-(-nbytes * length // leaf_length) if leaf_length else nbytes
               for nbytes, leaf_length in leaves)


class TreeFormat(BatchFormat):
    """A batch of mapping/tuple items of one structure; leaf ``j`` is built by the
    worker's assembler ``j`` (arrays) or by torch (tensors), from inputs queued with
    shape ``queued_shapes[j]`` (``queued_shape``)."""

    def __init__(self, spec: Any, leaves: list[Any], queued_shapes: list[tuple[int, ...]],
                 stacked: bool, padding: Padding | None) -> None:
        padded = any(leaf.padded for leaf in leaves)
        if padding is not None:
            root = spec.type
            padding.check_names(list(spec.entries()) if issubclass(root, Mapping) else None,
                                f"a {root.__name__} item")
            padding.check_padded(padded, f"inputs {spec}")
        self._spec = spec
        self._leaves = leaves
        self._queued_shapes = queued_shapes
        self.one_sample = stacked
        self._padding = padding if padded else None
        if self._padding is not None:
            self.per_token = self._padding.per_token

    def __repr__(self) -> str:
        return f"<inputs {self._spec}>"

    def build(self, requests: list[Request], workspace: Workspace) -> Built:
        padding = self._padding
        padded_length = 0 if padding is None else padding.padded_length(longest(requests))
        columns = list(zip(*items_of(requests)))
        rows = len(requests) if self.one_sample else total_rows(requests)
        for column, queued in zip(columns, self._queued_shapes):
            check_queued_shapes(requests, column, queued)
        built = [leaf.build(column, workspace, position, padded_length)
                 for position, (leaf, column) in enumerate(zip(self._leaves, columns))]
        return Built(self._spec.unflatten(built), rows, rows, padded_length)

    def chunks(self, request: Request, limits: Limits) -> list[Request] | None:
        if self.one_sample:
            return None
        # Before its pieces are cut by the rows it was queued with.
        for leaf, queued in zip(request.item, self._queued_shapes):
            check_queued_shapes([request], [leaf], queued)
        padding = self._padding
        tokens_per_row = 0 if padding is None else padding.padded_length(request.length)
        return row_chunks(request, limits, tokens_per_row, _cut_rows)


class TreeFamily(Family):
    """Mappings and tuples whose leaves are all arrays or tensors."""

    def __init__(self, stacked: bool, padding: Padding | None) -> None:
        self._stacked = stacked
        self._padding = padding

    def describe(self, item: Any) -> Description | None:
        if not isinstance(item, (tuple, Mapping)):
            return None
        _, paths, leaves, spec = flatten(item)  # a tokenizer's output class: a dict
        tensor = tensor_type()
        data = [isinstance(leaf, _ndarray) or (tensor is not None and isinstance(leaf, tensor))
                for leaf in leaves]
        if not any(data):
            return None  # no arrays in it: a generic object
        if not all(data):
            path, leaf = next((p, x) for p, x, d in zip(paths, leaves, data) if not d)
            raise TypeError(
                f"{_name(path)} is {type(leaf).__name__}, but other inputs of this item are "
                "arrays or tensors: a mapping or tuple is batched input by input only when "
                "every input is an array or tensor (put other values in a separate object)")
        signatures = []
        kept = []
        rows = length = 0
        sizes = []
        first_path: tuple[Any, ...] = ()
        for i, (path, leaf) in enumerate(zip(paths, leaves)):
            name = path[0] if path else None
            describe = describe_array if isinstance(leaf, _ndarray) else describe_tensor
            try:
                signature, leaf, leaf_rows, leaf_bytes, leaf_length = describe(
                    leaf, self._stacked, self._padding, name)
            except ValueError as exc:
                raise ValueError(f"{_name(path)}: {exc}") from None
            if i == 0:
                rows, first_path = leaf_rows, path
            elif leaf_rows != rows:
                raise ValueError(
                    f"{_name(path)} has {leaf_rows} rows but {_name(first_path)} has {rows}: "
                    "every input of one request must have the same rows on axis 0")
            signatures.append(signature)
            kept.append(leaf)
            sizes.append((leaf_bytes, leaf_length))
            length = max(length, leaf_length)
        devices = {s[1] for s in signatures if s[0] == "tensor"}
        if len(devices) > 1:
            raise ValueError(
                f"the inputs of one request are on different devices "
                f"({', '.join(sorted(map(str, devices)))}): move them to one device")
        return (("tree", spec, tuple(signatures)), tuple(kept), rows,
                _padded_nbytes(sizes, length), length)

    def make_format(self, signature: Any) -> BatchFormat:
        _, spec, signatures = signature
        leaves: list[Any] = []
        shapes = []
        for s in signatures:
            if s[0] == "array":
                _, dtype, trailing, stacked, pad, cls, _ = s
                leaves.append(ArrayLeaf(dtype, stacked, pad, cls))
            else:
                _, device, dtype, trailing, stacked, pad, _ = s
                leaves.append(TensorLeaf(dtype, device, stacked, pad))
            shapes.append(queued_shape(trailing, stacked, exact_length=False))
        return TreeFormat(spec, leaves, shapes, self._stacked, self._padding)

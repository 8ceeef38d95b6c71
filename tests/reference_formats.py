"""Pure-Python references of the batch formats, used only by the tests.

Each says, with plain numpy/torch calls and no buffers, what a model must receive for a
group of compatible items (``reference_batch``) and what each caller must get back from an
output (``reference_parts``): docs/formats.md written as code.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _pad_for(pad: Any, name: Any) -> Any:
    if isinstance(pad, dict):
        return pad.get(name) if isinstance(name, str) else None
    return pad


def _padded_length(longest: int, multiple: int) -> int:
    return -(-longest // multiple) * multiple


def sequence_length(item: Any, stacked: bool, pad: Any) -> int:
    """A request's length on the padded axis (0 when nothing in it is padded)."""
    leaves = _named_leaves(item)
    lengths = [leaf.shape[0 if stacked else 1] for name, leaf in leaves
               if _pad_for(pad, name) is not None and leaf.ndim >= (1 if stacked else 2)]
    return max(lengths, default=0)


def _named_leaves(item: Any) -> list[tuple[Any, Any]]:
    if isinstance(item, dict):
        return [(k, item[k]) for k in sorted(item)]
    if isinstance(item, tuple):
        return list(enumerate(item))
    return [(None, item)]


def _leaf_batch(leaves: list[Any], stacked: bool, pad: Any, length: int) -> Any:
    if _is_tensor(leaves[0]):
        import torch

        if pad is not None and leaves[0].dim() >= (1 if stacked else 2):
            rows = [x.unsqueeze(0) if stacked else x for x in leaves]
            padded = [torch.nn.functional.pad(
                x.movedim(1, -1), (0, length - x.shape[1]), value=pad).movedim(-1, 1)
                for x in rows]
            return torch.cat(padded)
        return torch.stack(leaves) if stacked else torch.cat(leaves)
    if pad is not None and leaves[0].ndim >= (1 if stacked else 2):
        rows = [x[None] if stacked else x for x in leaves]
        widths = [[(0, 0)] * x.ndim for x in rows]
        for w, x in zip(widths, rows):
            w[1] = (0, length - x.shape[1])
        return np.concatenate([np.pad(x, w, constant_values=pad) for x, w in zip(rows, widths)])
    return np.stack(leaves) if stacked else np.concatenate(leaves)


def reference_batch(items: list[Any], stacked: bool = False, pad: Any = None,
                    multiple: int = 1) -> Any:
    """What ``process_func`` must receive for ``items`` (all of one format)."""
    first = items[0]
    if not (isinstance(first, (np.ndarray, dict, tuple)) or _is_tensor(first)):
        return list(items)
    longest = max(sequence_length(x, stacked, pad) for x in items)
    length = _padded_length(longest, multiple)
    columns = {name: [dict(_named_leaves(x))[name] for x in items]
               for name, _ in _named_leaves(first)}
    built = {name: _leaf_batch(col, stacked, _pad_for(pad, name), length)
             for name, col in columns.items()}
    if isinstance(first, dict):
        return {k: built[k] for k in first}
    if isinstance(first, tuple):
        return tuple(built[i] for i in range(len(first)))
    return built[None]


def reference_parts(out: Any, items: list[Any], stacked: bool = False, pad: Any = None,
                    per_token: Any = False) -> list[Any]:
    """Each item's part of ``out`` for an output that is an array/tensor, a flat tuple or
    a dict of them, or a per-row list (docs/formats.md, "Outputs")."""
    one_sample = stacked or not (isinstance(items[0], (np.ndarray, dict, tuple))
                                 or _is_tensor(items[0]))
    spans = []
    start = 0
    for x in items:
        rows = 1 if one_sample else _named_leaves(x)[0][1].shape[0]
        spans.append((start, start + rows))
        start += rows

    def cut(leaf: Any, name: Any, i: int) -> Any:
        s, e = spans[i]
        part = leaf[s] if one_sample else leaf[s:e]
        if per_token is True or (per_token and name in per_token):
            n = sequence_length(items[i], stacked, pad)
            part = part[:n] if one_sample else part[:, :n]
        return part

    if isinstance(out, dict):
        return [{k: cut(v, k, i) for k, v in out.items()} for i in range(len(items))]
    if isinstance(out, tuple):
        return [tuple(cut(v, j, i) for j, v in enumerate(out)) for i in range(len(items))]
    return [cut(out, None, i) for i in range(len(items))]

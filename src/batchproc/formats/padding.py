"""Ragged sequences: which inputs are padded on axis 1, with what, and to what length.

With ``pad_value`` set, arrays and tensors that differ only in axis 1 share a batch: the
axis is left out of their compatibility key, and the batch pads every such input on
axis 1 to the longest in the batch, rounded up to a multiple of ``pad_to_multiple_of``
(as Hugging Face tokenizers do). ``pad_value`` is a number for every input, or a mapping
from input names (the keys of a mapping item) to numbers: unnamed inputs are then not
padded. Inputs without an axis 1 (one row of scalars) are never padded.

A request's sequence length is the longest axis 1 of its padded inputs; it counts as
``rows x length`` tokens toward ``max_batch_tokens``, and per-token outputs are cut back to
it (``per_token_outputs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .outputs import NO_TRIM, PerToken


class Padding:
    """The padding settings of one processor (None of them when ``pad_value`` is unset)."""

    __slots__ = ("_by_name", "_value", "multiple", "per_token")

    def __init__(self, pad_value: Any, multiple: int | None, per_token: Any) -> None:
        if isinstance(pad_value, Mapping):
            self._by_name: dict[str, Any] | None = dict(pad_value)
            self._value = None
        else:
            self._by_name = None
            self._value = pad_value
        self.multiple = multiple or 1
        self.per_token: PerToken = (True if per_token is True
                                    else frozenset(per_token) if per_token else NO_TRIM)

    @classmethod
    def from_config(cls, config: Any) -> Padding | None:
        if config.pad_value is None:
            return None
        return cls(config.pad_value, config.pad_to_multiple_of, config.per_token_outputs)

    def value_for(self, name: object) -> Any:
        """The pad value of the input called ``name`` (None for an unnamed input: the
        item itself or a tuple position), or None when it is not padded."""
        if self._by_name is None:
            return self._value
        if isinstance(name, str):
            return self._by_name.get(name)
        return None

    def padded_length(self, longest: int) -> int:
        """The length a batch whose longest sequence is ``longest`` is padded to."""
        multiple = self.multiple
        return -(-longest // multiple) * multiple


def pad_bytes(value: Any, dtype: np.dtype[Any]) -> bytes:
    """``value`` encoded in ``dtype`` (the pattern the native padder writes).

    ``ValueError`` if the dtype cannot hold it (0.5 or -1 in a uint8 array, 1e9 in
    float16): padding with another value than the one asked for would silently corrupt
    every padded position. Floating dtypes round as numpy does (0.1 in float32).
    """
    if dtype.hasobject:
        raise ValueError("object arrays cannot be padded; pad_value needs a numeric dtype")
    if dtype.kind not in "biufc":
        raise ValueError(f"pad_value {value!r} cannot pad arrays of dtype {dtype}: padding "
                         "needs a bool, int, float or complex dtype")
    if np.iscomplexobj(value) and dtype.kind != "c":
        raise ValueError(f"pad_value {value!r} is complex; it cannot be stored as {dtype}")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # judged below, not warned
            encoded = np.asarray(value).astype(dtype, casting="unsafe")
    except (OverflowError, ValueError, TypeError) as exc:
        raise ValueError(f"pad_value {value!r} cannot be stored as {dtype}: {exc}") from None
    if encoded.dtype.kind in "fc":
        held = np.isfinite(encoded) == np.isfinite(np.asarray(value))  # no overflow
    else:
        held = encoded == value
    if not held:
        raise ValueError(f"pad_value {value!r} cannot be stored exactly as {dtype} "
                         f"(it would become {encoded.item()!r})")
    return encoded.tobytes()

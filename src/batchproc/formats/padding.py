"""Ragged sequences: which inputs are padded on axis 1, with what, and to what length.

With ``pad_value`` set, arrays and tensors that differ only in axis 1 share a batch: the
axis is left out of their compatibility key, and the batch pads every such input on
axis 1 to the longest in the batch, rounded up to a multiple of ``pad_to_multiple_of``
(as Hugging Face tokenizers do). ``pad_value`` is a number for every input, or a mapping
from input names (the top-level keys of a mapping item) to numbers: inputs it does not
name are then not padded, and an array, tensor or tuple item (no names) or a mapping item
lacking one of the names is refused at enqueue (a name that matched nothing would leave
every length in a batch of its own). Inputs without an axis 1 (one row of scalars) are
never padded; naming one is an error. ``per_token_outputs`` needs something padded: an
array, tensor or mapping/tuple item with nothing to pad is refused (generic objects pass).

A request's sequence length is the longest axis 1 of its padded inputs; it counts as
``rows x length`` tokens toward ``max_batch_tokens``, and per-token outputs are cut back to
it (``per_token_outputs``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

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

    def value_for(self, name: object, trailing: tuple[int, ...]) -> Any:
        """The pad value of the input called ``name`` (None for an unnamed input: the
        item itself or a tuple position) whose shape after axis 0 is ``trailing``, or
        None when it is not padded. ``ValueError`` when ``pad_value`` names an input
        without an axis 1 (a sequence sent without its row axis)."""
        by_name = self._by_name
        if by_name is None:
            return self._value if trailing else None
        value = by_name.get(name) if isinstance(name, str) else None
        if value is not None and not trailing:
            raise ValueError(
                f"pad_value names {name!r}, but it has no axis 1 to pad: a 1-d input is "
                "rows of one value each; send a sequence as shape (rows, length)")
        return value

    def check_names(self, names: list[Any] | None, what: str) -> None:
        """``ValueError`` unless every input ``pad_value`` names is among ``names``, the
        top-level names of an item (None: an item whose inputs have no names, which a
        mapping of names cannot pad). A name that matches nothing is a typo or an item
        of another shape; ignored, it would leave those inputs unpadded, and each
        length in a batch of its own."""
        by_name = self._by_name
        if by_name is None:
            return
        wanted = ", ".join(map(repr, by_name))
        if names is None:
            raise ValueError(
                f"pad_value names inputs ({wanted}), but {what} has no input names: give "
                "pad_value as one number to pad every input, or send a mapping of input "
                "names to arrays or tensors")
        missing = [name for name in by_name if name not in names]
        if missing:
            raise ValueError(
                f"pad_value names {', '.join(map(repr, missing))}, which this item does not "
                f"have (its inputs are {', '.join(map(repr, names))}): pad_value names "
                "the item's top-level keys")

    def check_padded(self, padded: bool, label: str) -> None:
        """``ValueError`` when ``per_token_outputs`` is set and the format of an item
        (``label``) pads nothing: its outputs would have no padded axis to cut, and
        ignoring the setting would hand callers outputs of a length they did not ask
        for."""
        if self.per_token and not padded:
            raise ValueError(
                f"per_token_outputs is set, but nothing in this item is padded ({label}): "
                "per-token outputs are cut to each request's sequence length, which only "
                "padded inputs have (an input pad_value covers, with its length on axis 1)")

    def padded_length(self, longest: int) -> int:
        """The length a batch whose longest sequence is ``longest`` is padded to."""
        multiple = self.multiple
        return -(-longest // multiple) * multiple


class FloatLimits(NamedTuple):
    """What ``float_pad_refused`` needs of a float dtype (``np.finfo``, ``torch.finfo``;
    a complex dtype's are its parts'), as Python floats: numpy's ``finfo`` gives them
    in the dtype itself, where arithmetic on them would round as the dtype does."""

    largest: float
    eps: float
    tiny: float

    @classmethod
    def of(cls, info: Any) -> FloatLimits:
        with np.errstate(over="ignore", under="ignore"):  # longdouble's, past float64's
            return cls(float(info.max), float(info.eps), float(info.tiny))


def float_pad_refused(value: Any, held: Any, is_complex: bool, dtype: object,
                      limits: FloatLimits, became: Any) -> ValueError | None:
    """The error for ``value`` as a pad of a float or complex ``dtype`` that stores it
    as ``held`` (shown as ``became``), or None when ``held`` is ``value`` rounded as any
    float cast rounds (``_float_held``; each part of a complex). One rule for arrays and
    tensors: a value that becomes zero (1e-8 in float16, 1e-50 in float32, either part
    of a complex), a saturation or an overflow past the largest value, an inf that
    becomes NaN, is refused at enqueue; NaN, inf and a subnormal the dtype holds are
    padded with."""
    if is_complex:
        wanted, got = complex(value), complex(held)
        parts = [(wanted.real, got.real), (wanted.imag, got.imag)]
    else:
        parts = [(float(value), float(held))]
    if all(_float_held(v, h, limits) for v, h in parts):
        return None
    past = any(math.isfinite(v) and abs(v) > limits.largest for v, _ in parts)
    largest = f", past its largest, {limits.largest!r}" if past else ""
    return ValueError(f"pad_value {value!r} cannot be stored exactly as {dtype}{largest} "
                      f"(it would become {became!r})")


def _float_held(value: float, held: float, limits: FloatLimits) -> bool:
    """Whether ``held`` (read back in float64: torch has no isfinite for some float8
    dtypes) is ``value`` stored in a float dtype of ``limits``: the value itself, or it
    rounded to the nearest the dtype holds, as any float cast. Not an overflow past the
    largest value (torch then refuses to fill a batch with it), a saturation
    (float8_e4m3fn has no inf), a NaN for an inf (the fnuz dtypes), the opposite sign,
    or zero for a value or a value for zero (float8_e8m0fnu has no zero; a value too
    small for the dtype). A zero's own sign may be lost (-0.0 in the fnuz dtypes pads
    with 0.0, which compares equal)."""
    if math.isnan(value):
        return math.isnan(held)
    if held == value:
        return True
    return (math.isfinite(value) and math.isfinite(held) and value != 0.0 and held != 0.0
            and (held > 0.0) == (value > 0.0) and abs(value) <= limits.largest
            and abs(held - value) <= max(abs(value) * limits.eps, limits.tiny * limits.eps))


def pad_bytes(value: Any, dtype: np.dtype[Any]) -> bytes:
    """``value`` encoded in ``dtype`` (the pattern the native padder writes).

    ``ValueError`` if the dtype cannot hold it (0.5 or -1 in a uint8 array, 1e9 or 1e-8
    in float16): padding with another value than the one asked for would silently
    corrupt every padded position. Floating dtypes round as numpy does (0.1 in float32),
    but never to zero (``float_pad_refused``: the rule tensors follow too).
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
    if dtype.kind in "fc":
        # As for tensors (``tensors._check_pad``): rounded, but never to zero, past the
        # largest value or to inf.
        refused = float_pad_refused(value, encoded.item(), dtype.kind == "c", dtype,
                                    FloatLimits.of(np.finfo(dtype)), encoded.item())
        if refused is not None:
            raise refused
    elif encoded != value:
        raise ValueError(f"pad_value {value!r} cannot be stored exactly as {dtype} "
                         f"(it would become {encoded.item()!r})")
    return encoded.tobytes()

"""torch tensors: the same row semantics as arrays, built with torch's own operations.

torch is optional: this family recognises a tensor only once torch has been imported (an
item cannot be a tensor otherwise), so batchproc never imports it itself; while another
thread is still importing it, items are described as if it were absent. A batch is
built on the tensors' device with ``torch.cat`` (rows) or ``torch.stack`` (samples, with
``stack_items``); padded batches are filled on that device. Tensors share a batch when
their class, device, dtype and trailing shape are equal (axis 1 excepted when it is
padded): torch's operations make a batch of the first one's subclass and promote it to
the widest dtype, which every caller's result would take.
Each caller gets its rows as a tensor (a view of the output). batchproc never reuses a
tensor it built, so it never changes a result after it is delivered. Batches are built
without autograd, so no graph links one caller's tensors to another's (use
``torch.inference_mode()`` in the model for the rest).
"""

from __future__ import annotations

import numbers
from typing import Any

from ..errors import ItemChangedError
from .base import BatchFormat, Description, Family, LeafFormat, Workspace
from .outputs import tensor_type
from .padding import FloatLimits, Padding, float_pad_refused


class TensorLeaf:
    """Builds one input position of a batch from torch tensors."""

    __slots__ = ("_device", "_dtype", "_pad", "_stacked")

    def __init__(self, dtype: Any, device: Any, stacked: bool, pad: Any) -> None:
        self._dtype = dtype
        self._device = device
        self._stacked = stacked
        self._pad = None if pad is None else _check_pad(pad, dtype)

    @property
    def padded(self) -> bool:
        return self._pad is not None

    def build(self, items: list[Any] | tuple[Any, ...], workspace: Workspace, position: int,
              padded_length: int) -> Any:
        import torch

        _check_unchanged(items, self._dtype, self._device)
        # Without autograd: a batch built from tensors that require grad would join every
        # caller's tensors in one graph, reachable from every caller's result.
        with torch.no_grad():
            if self._pad is None:
                return torch.stack(items) if self._stacked else torch.cat(items)
            if self._stacked:  # each sample is one row of a padded batch
                items = [item.unsqueeze(0) for item in items]
            first = items[0]
            rows = sum(item.shape[0] for item in items)
            batch = first.new_full((rows, padded_length, *first.shape[2:]), self._pad)
            start = 0
            for item in items:
                end = start + item.shape[0]
                batch[start:end, :item.shape[1]] = item
                start = end
            return batch


def _check_unchanged(items: list[Any] | tuple[Any, ...], dtype: Any, device: Any) -> None:
    """``ItemChangedError`` unless every tensor still has the dtype and device it was
    queued with (``x.data = x.data.double()`` changes both in place): torch would promote
    the whole batch to a changed one's dtype, every caller's results with it. Failing the
    batch lets the failure search find the item and fail it alone, as a resized one."""
    for item in items:
        if item.dtype != dtype or item.device != device:
            raise ItemChangedError(
                f"a tensor is {item.dtype} on {item.device} where {dtype} on {device} was "
                "queued: it changed after it was queued (an item must not change until "
                "its result has come)")


def _check_pad(value: Any, dtype: Any) -> Any:
    """``value`` if a tensor of ``dtype`` can hold it, else ``ValueError`` (as for arrays,
    by the same rule for floats, ``float_pad_refused``: a pad silently changed by the
    cast would corrupt every padded position)."""
    import torch

    if (not dtype.is_complex and isinstance(value, numbers.Complex)
            and not isinstance(value, numbers.Real)):
        raise ValueError(f"pad_value {value!r} is complex; it cannot be stored as {dtype}")
    try:
        held = torch.full((), value, dtype=dtype)  # what the padded batch is filled with
    except (RuntimeError, TypeError, OverflowError) as exc:
        raise ValueError(f"pad_value {value!r} cannot be stored as {dtype}: {exc}") from None
    if dtype.is_floating_point or dtype.is_complex:
        # Read back in float64 (complex128): torch has no isfinite for some float8 dtypes.
        wide = held.to(torch.complex128).item() if dtype.is_complex else float(held.double())
        refused = float_pad_refused(value, wide, dtype.is_complex, dtype,
                                    FloatLimits.of(torch.finfo(dtype)), held.item())
        if refused is not None:
            raise refused
    elif held.item() != value:
        raise ValueError(f"pad_value {value!r} cannot be stored exactly as {dtype} "
                         f"(it would become {held.item()!r})")
    return value


def describe_tensor(item: Any, stacked: bool, padding: Padding | None, name: object,
                    ) -> tuple[tuple[Any, ...], Any, int, int, int]:
    """``(signature, item, rows, nbytes, length)`` of one tensor (see ``describe_array``).
    ``ValueError`` for a tensor that torch cannot cut by rows, join or pad (nested,
    sparse and other non-strided layouts), one it would join wrongly (quantized: to the
    first one's scale), or a 0-d one that needs a sample axis."""
    import torch  # imported already: the item is a tensor

    if item.is_nested:
        raise ValueError(
            "nested tensors cannot be batched: send each sequence as a tensor of its own"
            + ("" if padding is not None else
               " and set pad_value to batch sequences of different lengths together"))
    if item.is_quantized:
        raise ValueError(
            "quantized tensors cannot be batched: joining them requantizes every caller's "
            "values to the first one's scale and zero point; send x.dequantize(), and "
            "quantize inside the model")
    layout = item.layout
    if layout is not torch.strided:
        raise ValueError(
            f"tensors with layout {layout} cannot be batched (only dense, strided tensors "
            "are): send x.to_dense()")
    shape = tuple(item.shape)
    if stacked:
        rows, trailing = 1, shape
    else:
        if not shape:
            raise ValueError(
                "0-d tensors have no sample axis to batch along; pass x.reshape(1) "
                "or use stack_items=True")
        rows, trailing = shape[0], shape[1:]
    length = 0
    pad = None if padding is None else padding.value_for(name, trailing)
    if pad is not None:
        length = trailing[0]
        trailing = (-1, *trailing[1:])
    nbytes = item.element_size() * item.nelement()
    return (("tensor", item.device, item.dtype, trailing, stacked, pad, type(item)), item, rows,
            nbytes, length)


def _cut_rows(item: Any, start: int, stop: int) -> Any:
    return item[start:stop]


class TensorFamily(Family):
    """torch tensors (subclasses included), once torch is imported."""

    def __init__(self, stacked: bool, padding: Padding | None) -> None:
        self._stacked = stacked
        self._padding = padding

    def describe(self, item: Any) -> Description | None:
        tensor = tensor_type()
        if tensor is None or not isinstance(item, tensor):
            return None
        return describe_tensor(item, self._stacked, self._padding, None)

    def make_format(self, signature: Any) -> BatchFormat:
        _, device, dtype, trailing, stacked, pad, cls = signature
        kind = "tensors" if cls is tensor_type() else cls.__name__
        label = (f"{'stacked ' if stacked else ''}{kind} of {dtype} on {device}, "
                 f"trailing shape {trailing}" + ("" if pad is None else f", padded with {pad!r}"))
        return LeafFormat(TensorLeaf(dtype, device, stacked, pad), stacked, self._padding,
                          _cut_rows, label, trailing)

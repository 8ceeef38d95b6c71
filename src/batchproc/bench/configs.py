"""Configurations as text: ``--config`` in, ``BatchProcessorConfig(...)`` out.

``bench --sweep --config`` takes what ``tune`` prints, so a tuned configuration can be
swept against the default as it was pasted: ``config = BatchProcessorConfig(
max_batch_size=32, ...)`` (its import line too), ``BatchProcessorConfig(...)``, or only
its arguments ``max_batch_size=32, batch_timeout=0.002``. The text is
parsed, never executed: values are literals, and ``processing_strategy`` is also
accepted as ``BatchProcessingStrategy.FIXED``, ``FIXED`` or ``"fixed"``.

Strategy names, here and in the ``--strategy``/``--strategies`` flags, are read by
``BatchProcessorConfig`` itself (:func:`parse_strategy`), so the command line accepts
exactly what the library does.
"""

from __future__ import annotations

import ast
import enum
import re
from collections.abc import Mapping
from typing import Any

from . import BenchError


def parse_config(text: str, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``BatchProcessorConfig`` keyword arguments from ``text``, checked by building one
    over ``base``: the fields the caller gives every configuration, which ``text``'s own
    override (the bench's ``pad_value`` for ragged requests, which ``max_batch_tokens``
    needs).

    Raises:
        BenchError: not a call of keyword arguments, a value that is not a literal, an
            unknown field, a field given twice, or a value ``BatchProcessorConfig``
            rejects.
    """
    from batchproc import BatchProcessorConfig
    from batchproc.config import check_keywords

    where = f"--config {text!r}"
    src = _pasted_call(text)
    if not src:
        raise BenchError(f"{where}: empty; give field=value, ... (BatchProcessorConfig's "
                         "fields), or the BatchProcessorConfig(...) that tune prints")
    wrapped = not src.startswith("BatchProcessorConfig(")
    if wrapped:
        src = f"BatchProcessorConfig({src})"
    try:
        call = ast.parse(src, mode="eval").body
    except SyntaxError as error:
        # A dashed name (max-batch-size=8) is no Python keyword: name the field it meant.
        dashed = re.findall(r"([A-Za-z_][\w-]*-[\w-]*)\s*=", src)
        if dashed:
            try:
                check_keywords(BatchProcessorConfig.__name__, dashed)
            except TypeError as exc:
                raise BenchError(f"{where}: {exc}") from None
        # Where Python found it wrong, in the text as given (batch_timeout=5ms, a ";").
        rest = src[max((error.offset or 1) - 1, 0):]
        if wrapped and rest.endswith(")"):
            rest = rest[:-1]
        at = f"at {rest[:24]!r}" if rest.strip() else "at the end"
        raise BenchError(
            f"{where}: {error.msg} {at} (give field=value, ... separated by commas; each "
            "value a Python literal: a number, times in seconds as in batch_timeout=0.005; "
            "a quoted string; True, False or None)") from None
    if not isinstance(call, ast.Call) or call.args or not isinstance(call.func, ast.Name):
        raise BenchError(f"{where}: expected field=value, ... (keyword arguments only)")
    fields: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise BenchError(f"{where}: ** is not accepted; write each field")
        if kw.arg in fields:  # a SyntaxError in Python: never a silent last-one-wins
            raise BenchError(f"{where}: {kw.arg} is given twice")
        if kw.arg == "processing_strategy":
            fields[kw.arg] = _strategy(kw.value, where)
            continue
        try:
            fields[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise BenchError(
                f"{where}: {kw.arg}={ast.unparse(kw.value)} is not a literal value"
            ) from None
    try:
        BatchProcessorConfig(**{**(base or {}), **fields})
    except TypeError as exc:
        raise BenchError(f"{where}: {exc}") from None
    except ValueError as exc:
        raise BenchError(f"{where}: batchproc rejects it: {exc}") from None
    return fields


_IMPORT = re.compile(r"^\s*from\s+batchproc\s+import\s+[\w\s,()]*?$", re.MULTILINE)
_ASSIGNED = re.compile(r"^\s*[A-Za-z_]\w*\s*=\s*(?=BatchProcessorConfig\s*\()")


def _pasted_call(text: str) -> str:
    """``text`` without what a paste of tune's output adds around the call: its import
    line (``from batchproc import ...``) and the assignment (``config = ``)."""
    src = _IMPORT.sub("", text).strip()
    return _ASSIGNED.sub("", src, count=1).strip()


def parse_strategy(text: Any) -> Any:
    """The ``BatchProcessingStrategy`` that ``text`` names, read as
    ``BatchProcessorConfig(processing_strategy=text)`` reads it (a member's name or value,
    any case).

    Raises:
        ValueError: the library's message, listing the valid values.
    """
    from batchproc import BatchProcessorConfig

    return BatchProcessorConfig(processing_strategy=text).processing_strategy


def _strategy(node: ast.expr, where: str) -> Any:
    if isinstance(node, ast.Attribute):
        name: Any = node.attr
    elif isinstance(node, ast.Name):
        name = node.id
    elif isinstance(node, ast.Constant):
        name = node.value
    else:
        name = ast.unparse(node)
    try:
        return parse_strategy(name)
    except ValueError as exc:
        raise BenchError(f"{where}: {exc}") from None


def format_config(fields: Mapping[str, Any]) -> str:
    """Python that builds the configuration: the imports it uses, then ``config =
    BatchProcessorConfig(...)`` with one field per line, ready to paste."""
    texts = {}
    for name, value in fields.items():
        if isinstance(value, enum.Enum):
            texts[name] = f"BatchProcessingStrategy.{value.name}"
        elif isinstance(value, str) and name == "processing_strategy":
            texts[name] = f"BatchProcessingStrategy.{parse_strategy(value).name}"
        else:
            texts[name] = repr(value)
    uses_strategy = any(t.startswith("BatchProcessingStrategy.") for t in texts.values())
    names = "BatchProcessingStrategy, BatchProcessorConfig" if uses_strategy else (
        "BatchProcessorConfig")
    lines = [f"from batchproc import {names}", ""]
    if not texts:
        return "\n".join([*lines, "config = BatchProcessorConfig()"])
    lines.append("config = BatchProcessorConfig(")
    lines.extend(f"    {name}={text}," for name, text in texts.items())
    lines.append(")")
    return "\n".join(lines)


def describe_fields(fields: Mapping[str, Any]) -> str:
    """``name=value, ...`` on one line (strategies by name), for labels and notes."""
    def text(v: Any) -> str:
        return v.name if isinstance(v, enum.Enum) else repr(v)

    return ", ".join(f"{k}={text(v)}" for k, v in fields.items())

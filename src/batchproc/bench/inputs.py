"""What a benchmark sends: the ``--input`` specification and sample requests from an ``.npz``.

A *request source* makes the requests a load sends and the batches the limit and the
model check call the model with. Requests are numpy arrays with a leading row axis, or
mappings ``{input name: array}`` of them (a tokenizer's output); a batch is requests
concatenated on axis 0 — padded with 0 on axis 1 to the longest when their lengths
differ there, as batchproc does with ``pad_value=0``. Batches are built by batchproc's
own batch formats, and the model's output for one is checked by batchproc's own output
rule (:meth:`Batch.check`): the limit and the model check send what the processor
sends, and refuse what it refuses.

``--input`` takes, once per named input or once for a plain array::

    DTYPE:SHAPE            float32:1x64, uint8:1x3x224x224
    NAME=DTYPE:SHAPE       input_ids=int64:1x8..128 (repeat the flag for each name)
    FILE.npz               sample requests, layouts below

``NAME`` is ASCII letters, digits and ``_``, not starting with a digit. ``SHAPE`` is one
request's shape, dimensions joined by ``x``, each at least 1, at most
:data:`MAX_DIMS` of them (:func:`check_request_shape`, which an ``.npz``'s
requests pass too); the first is its rows. A dimension ``LO..HI`` is ragged, drawn
uniformly per request: on axis 0 (rows per request) or axis 1 (sequence length, padded
in a batch). Named inputs draw one length per request, shared by all of them, so their
ranges must agree. One request may take at most
:data:`MAX_REQUEST_BYTES` (256 MiB), an ``.npz`` request too (from its arrays' headers,
which also may not declare more than half the memory available), and a full batch
(:func:`check_full_batch`) at most :data:`MAX_BATCH_BYTES` (4 GiB) or half the memory
available, whichever is less.

An ``.npz`` holds sample requests in one of three layouts:

- ``np.savez(path, *requests)``: keys ``arr_0``, ``arr_1``, ...: one array per request,
  shapes free (ragged lengths, varied rows); a lone ``np.savez(path, rows)`` is one
  request of all its rows (``np.savez(path, *np.split(rows, len(rows)))`` makes one
  request of each row);
- ``np.savez(path, **{f"{i}/{name}": ...})``: keys ``0/input_ids``, ``0/attention_mask``,
  ``1/input_ids``, ...: one named request per index, the same names in each;
- ``np.savez(path, **inputs)``: any other keys: each array holds one row per request
  along axis 0, the same count in all.

The names decide what a request is: arrays under the names numpy makes up (``arr_0``,
...) give array requests; arrays under names the user gave (keywords of ``np.savez``)
give named requests ``{name: array}``, whether one name or several, as ``--input
NAME=DTYPE:SHAPE`` does.

Every request of a file must be able to share a batch with every other: the same dtype
and number of dimensions, and the same shape past axis 1 (axis 0 is its rows, axis 1 a
length, padded when it differs); per input for named requests.

Every error is a :class:`~batchproc.bench.BenchError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..log_limits import plural
from . import BenchError

Request = Any  # np.ndarray | dict[str, np.ndarray]

POOL_SIZE = 256  # distinct sample requests a generated load cycles through
POOL_BYTES = 64 << 20  # ... unless they would take more memory than this
# The largest request a generated load may send: a shape past it is a typo (a missing
# "x", an extra digit) far more often than a model's real input, and would be allocated
# many times over (the pool, the limit's batches) before anything reported it.
MAX_REQUEST_BYTES = 256 << 20
# The largest full batch (max batch rows of the widest row) the check before the runs and
# the limit may build, several of which the runs hold at once: past it, or past half the
# memory available, a typo in --max-batch or --sizes would end in a MemoryError after
# minutes of allocating.
MAX_BATCH_BYTES = 4 << 30
# ASCII digits only: ``\d`` takes any script's digits, which int() reads.
_DIM = re.compile(r"^([0-9]+)(?:\.\.([0-9]+))?$")
# ASCII letters, digits and _, not starting with a digit: what the refusal says.
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The most dimensions a numpy array may have (64 from numpy 2, 32 before).
MAX_DIMS = 64 if int(np.__version__.split(".")[0]) >= 2 else 32
_PER_REQUEST = re.compile(r"^arr_([0-9]+)$")
_PER_REQUEST_NAMED = re.compile(r"^([0-9]+)/(.+)$")


def rows_of(x: Any) -> int:
    """Rows of a batch or output: ``len`` of an array, of a mapping's or tuple's first
    entry for named or multiple outputs, of anything else with a length.

    Raises:
        TypeError: ``x`` has no length.
    """
    if isinstance(x, Mapping):
        if not x:
            raise TypeError("an empty mapping has no rows")
        return rows_of(next(iter(x.values())))
    if isinstance(x, tuple) and x and not isinstance(x[0], (int, float)):
        return rows_of(x[0])
    return len(x)


def make_batch(requests: Sequence[Request]) -> Request:
    """Requests concatenated on axis 0 (per name for named requests), padded with 0 on
    axis 1 to the longest when lengths differ there: what the model receives."""
    return _Batcher(_needs_padding(list(requests)))(requests).inputs


class Batch:
    """A batch of whole requests as batchproc builds it, and batchproc's own check of the
    model's output for it.

    Attributes:
        inputs: What the model is called with.
        requests: How many requests it holds.
        rows: Its leading length, which every output must have.
    """

    def __init__(self, inputs: Any, requests: int, rows: int, check: Any) -> None:
        self.inputs = inputs
        self.requests = requests
        self.rows = rows
        self._check = check

    def check(self, out: Any) -> None:
        """Raise what batchproc raises (``BatchOutputError``) for ``out``, the model's
        output for this batch, when it cannot give each request its part: the processor's
        own output rule (``batchproc.formats.outputs``), not a copy of it."""
        self._check(out)

    def describe(self) -> str:
        """``a batch of 2 rows (float32 (2, 64))``."""
        return (f"a batch of {self.rows} row{'s' if self.rows != 1 else ''} "
                f"({describe_batch(self.inputs)})")


def describe_batch(batch: Any) -> str:
    """A batch's dtype and shape, per input for named ones: ``ids: int64 (2, 8), ...``."""
    if isinstance(batch, Mapping):
        return ", ".join(f"{k}: {describe_batch(v)}" for k, v in batch.items())
    return f"{batch.dtype} {tuple(batch.shape)}"


class _Batcher:
    """Builds batches of requests with batchproc's batch formats, as a processor with
    ``pad_value=0`` (``padded``) or without builds them; its formats remember what the
    model's outputs showed (a list's reading), as a processor's do."""

    def __init__(self, padded: bool) -> None:
        from batchproc import BatchProcessorConfig
        from batchproc.formats import Workspace, make_describer

        config = BatchProcessorConfig(pad_value=0) if padded else BatchProcessorConfig()
        self._describe = make_describer(config).describe
        self._workspace = Workspace

    def __call__(self, requests: Sequence[Request]) -> Batch:
        described = [self._describe(r, None, 0.0)[0] for r in requests]
        fmt = described[0].format
        if any(d.format is not fmt for d in described):
            raise BenchError("these requests cannot share a batch: "
                             + "; ".join(describe_batch(r) for r in requests[:4]))
        # A workspace of its own: a batch's arrays are never a buffer another reuses.
        built = fmt.build(described, self._workspace())

        def check(out: Any) -> None:
            fmt.split(out, described, built)

        return Batch(built.inputs, len(described), built.length, check)


def _signature(request: Request, padded: bool) -> Any:
    """What must match for two requests to share a batch: dtype and trailing shape
    (but for axis 1 when padding)."""
    def sig(a: np.ndarray) -> Any:
        trailing = a.shape[2:] if padded and a.ndim >= 2 else a.shape[1:]
        return a.dtype.str, trailing

    if isinstance(request, Mapping):
        return tuple((k, sig(v)) for k, v in request.items())
    return sig(request)


class RequestSource:
    """Sample requests for a load, and full batches of them for the limit.

    Attributes:
        description: One line saying what a request is, for titles and JSON.
        padded: Requests differ in length on axis 1, so batchproc needs ``pad_value``.
    """

    description: str = ""
    padded: bool = False

    def requests(self, seed: int) -> list[Request]:
        """The sample requests a load cycles through (at least one), the same for the
        same ``seed``."""
        raise NotImplementedError

    def batch(self, requests: Sequence[Request]) -> Batch:
        """A batch of ``requests`` (of this source), built as batchproc builds it."""
        batcher = self.__dict__.get("_batcher")
        if batcher is None:
            batcher = self.__dict__["_batcher"] = _Batcher(self.padded)
        return batcher(requests)

    def limit_plan(self, max_rows: int, seed: int) -> list[list[Request]]:
        """The limit's batches, sent in turn, as lists of whole requests.

        Each batch starts at the first request not sent yet and is filled in pool
        order (cycling) up to ``max_rows`` rows: a request that does not fit the room
        left is skipped and filling goes on with the next. Batches are added until every
        request that fits a batch has been in one, so the limit sends what the loads
        send. A request of more than ``max_rows`` rows is left out (batchproc cuts it
        into chunks), unless none fits: each batch is then one request. Requests that
        cannot share a batch with the first are left out.
        """
        pool = self.requests(seed)
        key = _signature(pool[0], self.padded)
        usable = [r for r in pool if _signature(r, self.padded) == key]
        sizes = [rows_of(r) for r in usable]
        fits = [i for i, n in enumerate(sizes) if n <= max_rows]
        if not fits:
            return [[r] for r in usable]
        plan: list[list[Request]] = []
        unsent = set(fits)
        while unsent:  # each batch sends at least the first unsent request
            start = next(p for p, i in enumerate(fits) if i in unsent)
            chosen = _fill(fits, sizes, start, max_rows)
            unsent.difference_update(chosen)
            plan.append([usable[i] for i in chosen])
        return plan

    def limit_batch(self, max_rows: int, seed: int,
                    max_requests: int | None = None) -> tuple[Request, int]:
        """The limit's first batch (:meth:`limit_plan`), of at most ``max_requests``
        requests. Returns (batch, requests in it)."""
        chosen = self.limit_plan(max_rows, seed)[0][:max_requests]
        return make_batch(chosen), len(chosen)

    def row_bytes(self) -> int:
        """The bytes of one row of a batch at most: its widest request's, padded to the
        longest on axis 1, all inputs of a named request together."""
        return _row_bytes(self.requests(0))

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "padded": self.padded}


def _row_bytes(requests: Sequence[Request]) -> int:
    """One row of a batch of ``requests`` at most, in bytes (see ``row_bytes``)."""
    widest: dict[Any, int] = {}
    for r in requests:
        for name, a in _arrays_of(r):
            widest[name] = max(widest.get(name, 0),
                               a.dtype.itemsize * math.prod(a.shape[1:]))
    return sum(widest.values())


def _arrays_of(request: Request) -> list[tuple[Any, np.ndarray]]:
    """``(name, array)`` of each input of ``request`` (one unnamed for a plain array)."""
    return list(request.items()) if isinstance(request, Mapping) else [(None, request)]


def check_full_batch(source: RequestSource, max_rows: int, flag: str) -> None:
    """Refuse, before anything is allocated, a full batch of ``max_rows`` rows of
    ``source`` (``flag`` set it) past :data:`MAX_BATCH_BYTES` or half the memory
    available now: ``BenchError`` (exit 2) on one line, naming both and what to lower."""
    row = source.row_bytes()
    nbytes = max_rows * row
    bound, which = MAX_BATCH_BYTES, f"the limit of {format_bytes(MAX_BATCH_BYTES)}"
    available = memory_available()
    if available is not None and available // 2 < bound:
        bound, which = available // 2, f"half the memory available ({format_bytes(available)})"
    if nbytes > bound:
        raise BenchError(
            f"{flag} {max_rows}: a full batch of {max_rows:,} rows of "
            f"{format_bytes(row)} would take {format_bytes(nbytes)}, over {which}: lower "
            f"{flag} or the size of a request")


def memory_available() -> int | None:
    """The memory available to this process now, in bytes: the machine's (psutil), or
    less under a container's limit (its cgroup, read as ``health()`` reads it); None if
    unknown."""
    from ..health import CgroupMemory

    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except Exception:  # an unsupported platform: the fixed limit alone
        return None
    headroom = CgroupMemory().headroom()
    return available if headroom is None else min(available, headroom)


def _fill(fits: list[int], sizes: list[int], start: int, max_rows: int) -> list[int]:
    """One batch of the limit: the indices it takes, scanning ``fits`` (cycling) from
    position ``start`` and taking each request that fits the room left, until the batch
    is full or a whole turn adds no rows."""
    chosen: list[int] = []
    rows = 0
    pos = start
    idle = 0  # requests scanned since the last one that added rows
    while rows < max_rows and idle < len(fits):
        i = fits[pos % len(fits)]
        pos += 1
        if rows + sizes[i] <= max_rows:
            chosen.append(i)
            rows += sizes[i]
            idle = 0 if sizes[i] else idle + 1
        else:
            idle += 1
    return chosen


class FeatureRows(RequestSource):
    """One float32 row of ``features`` values per request (``--features``): a pool of
    ``pool`` different rows (by default :data:`POOL_SIZE`, fewer if they would take more
    than :data:`POOL_BYTES`), the same for the same seed."""

    def __init__(self, features: int = 64, pool: int | None = None):
        if features < 1:
            raise BenchError(f"--features must be >= 1, got {features}")
        self.features = features
        self.pool = pool if pool is not None else max(
            1, min(POOL_SIZE, POOL_BYTES // (4 * features)))
        self.description = f"{features} float32 features/request"

    def row_bytes(self) -> int:
        return 4 * self.features

    def requests(self, seed: int) -> list[Request]:
        rows = np.random.default_rng(seed + 100).standard_normal(
            (self.pool, self.features), dtype=np.float32)
        return [rows[k:k + 1] for k in range(self.pool)]


# -- DTYPE:SHAPE specs --------------------------------------------------------------------


@dataclass(frozen=True)
class Dim:
    lo: int
    hi: int

    @property
    def ragged(self) -> bool:
        return self.lo != self.hi

    def __str__(self) -> str:
        return f"{self.lo}..{self.hi}" if self.ragged else str(self.lo)


@dataclass(frozen=True)
class TensorSpec:
    """One input of a request: its dtype and shape, dimensions possibly ragged."""

    name: str | None
    dtype: np.dtype[Any]
    dims: tuple[Dim, ...]

    def __str__(self) -> str:
        s = f"{self.dtype.name}:{'x'.join(map(str, self.dims))}"
        return f"{self.name}={s}" if self.name else s


def parse_tensor_spec(text: str) -> TensorSpec:
    """Parse ``[NAME=]DTYPE:SHAPE`` (``int64:1x8..128``).

    Raises:
        BenchError: not of that form, a name that is not letters, digits and ``_``, an
            unknown or non-numeric dtype, a dimension that is not a positive whole number
            or ``LO..HI`` with ``1 <= LO <= HI``, a ragged dimension past axis 1, or more
            dimensions than numpy allows (:data:`MAX_DIMS`).
    """
    where = f"--input {text!r}"
    name: str | None = None
    body = text
    if "=" in text:
        name, _, body = text.partition("=")
        if not _NAME.match(name):
            raise BenchError(f"{where}: {name!r} is not an input name (letters, digits and "
                             "_, not starting with a digit)")
    dtype_text, sep, shape_text = body.partition(":")
    if not sep or not dtype_text or not shape_text:
        raise BenchError(
            f"{where}: expected [NAME=]DTYPE:SHAPE (float32:1x64, int64:1x8..128) or FILE.npz"
        )
    try:
        dtype = np.dtype(dtype_text)
    except TypeError:
        raise BenchError(f"{where}: unknown dtype {dtype_text!r}") from None
    if dtype.kind not in "biufc":
        raise BenchError(f"{where}: dtype {dtype_text!r} is not numeric or bool")
    dims = []
    for axis, part in enumerate(shape_text.split("x")):
        m = _DIM.match(part.strip())
        if not m:
            raise BenchError(f"{where}: dimension {part!r} is not N or LO..HI")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo != hi and (lo < 1 or hi < lo):
            raise BenchError(f"{where}: dimension {part!r} needs 1 <= LO <= HI")
        if lo != hi and axis > 1:
            raise BenchError(
                f"{where}: only axis 0 (rows) and axis 1 (length) may be ragged, not axis {axis}"
            )
        dims.append(Dim(lo, hi))
    check_request_shape(where, tuple(d.lo for d in dims))
    return TensorSpec(name, dtype, tuple(dims))


class SpecSource(RequestSource):
    """Random requests described by one unnamed spec or several named ones."""

    def __init__(self, specs: Sequence[TensorSpec]):
        if not specs:
            raise BenchError("--input: nothing given")
        names = [s.name for s in specs]
        if len(specs) > 1 and None in names:
            raise BenchError(
                "--input: several inputs need a name each (NAME=DTYPE:SHAPE), got "
                + " ".join(map(str, specs))
            )
        if len(set(names)) != len(names):
            raise BenchError(f"--input: input {_first_duplicate(names)!r} given twice")
        for axis in (0, 1):
            ranges = {(s.dims[axis].lo, s.dims[axis].hi) for s in specs if len(s.dims) > axis
                      and (s.dims[axis].ragged or axis == 0)}
            if len(ranges) > 1:
                raise BenchError(
                    f"--input: named inputs must agree on axis {axis} (one "
                    f"{'row count' if axis == 0 else 'length'} per request), got "
                    + " ".join(map(str, specs))
                )
        self.specs = tuple(specs)
        self.named = specs[0].name is not None
        self.padded = any(len(s.dims) > 1 and s.dims[1].ragged for s in specs)
        self._ragged = _ragged_axes(specs)
        self.description = " ".join(map(str, specs)) + "/request"
        # The largest request, in Python ints: a huge shape must not wrap around.
        values = [math.prod(d.hi for d in s.dims) for s in specs]
        self._bytes = sum(s.dtype.itemsize * v for s, v in zip(specs, values))
        _check_request_size(f"--input {' '.join(map(str, specs))}", self._bytes, sum(values))

    def requests(self, seed: int) -> list[Request]:
        n = max(1, min(POOL_SIZE, POOL_BYTES // max(self._bytes, 1)))
        rng = np.random.default_rng(seed + 100)
        out: list[Request] = []
        for _ in range(n):
            # One draw per ragged axis, shared by every named input.
            drawn = [int(rng.integers(d.lo, d.hi + 1)) for d in self._ragged]
            arrays = {s.name: _random(rng, s, drawn) for s in self.specs}
            out.append(arrays if self.named else arrays[None])
        return out

    def row_bytes(self) -> int:
        # At the top of the ragged ranges, in Python ints: drawing requests to see is the
        # allocation this refuses.
        return sum(s.dtype.itemsize * math.prod(d.hi for d in s.dims[1:]) for s in self.specs)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "inputs": [str(s) for s in self.specs]}


def check_request_shape(where: str, shape: tuple[int, ...], first_axis: int = 0) -> None:
    """Refuse a request's shape (the smallest, for ragged ones) that batchproc cannot
    batch: no row axis, more dimensions than numpy allows (:data:`MAX_DIMS`), or 0 on any axis
    from ``first_axis`` on (1 for an array stacking requests on axis 0, whose length is
    their count). ``where`` names what has it: ``--input 'float32:1x0'``, or an ``.npz``
    and its member. The one rule of ``--input DTYPE:SHAPE`` and ``--input FILE.npz``."""
    if not shape:
        raise BenchError(f"{where} is 0-d; a request needs a row axis")
    if len(shape) > MAX_DIMS:
        raise BenchError(f"{where} has {len(shape)} dimensions; a numpy array has at most "
                         f"{MAX_DIMS}")
    axis = next((i for i in range(first_axis, len(shape)) if shape[i] < 1), None)
    if axis is not None:
        needs = ("at least one row (axis 0)" if axis == 0 else
                 "a length of at least 1 (axis 1)" if axis == 1 else
                 f"at least 1 on every axis, not 0 on axis {axis}")
        raise BenchError(f"{where} has shape {shape}: a request needs {needs}")


def _check_request_size(where: str, nbytes: int, values: int) -> None:
    """Refuse a request of more than :data:`MAX_REQUEST_BYTES` (the largest one, for
    ragged shapes)."""
    if nbytes > MAX_REQUEST_BYTES:
        raise BenchError(
            f"{where}: one request would take {format_bytes(nbytes)} "
            f"({plural(values, 'value')}), "
            f"over the limit of {format_bytes(MAX_REQUEST_BYTES)} per request")


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units, three digits: ``256 MiB``, ``3.64 TiB``."""
    if n < 1024:
        return f"{n} B"
    for shift, unit in ((10, "KiB"), (20, "MiB"), (30, "GiB"), (40, "TiB")):
        if n < 1024 << shift:
            return f"{n / (1 << shift):.3g} {unit}"
    pib = n >> 50  # an int: a header may declare more bytes than a float holds
    return f"{n / (1 << 50):.3g} PiB" if pib < 1000 else f"{pib:,} PiB"


def _first_duplicate(names: Sequence[Any]) -> Any:
    seen = set()
    for n in names:
        if n in seen:
            return n
        seen.add(n)
    return None


def _ragged_axes(specs: Sequence[TensorSpec]) -> list[Dim]:
    """Axes 0 and 1: the range drawn per request (1..1 where no input is ragged there)."""
    out = []
    for axis in (0, 1):
        ragged = [s.dims[axis] for s in specs if len(s.dims) > axis and s.dims[axis].ragged]
        out.append(ragged[0] if ragged else Dim(1, 1))
    return out


def _random(rng: np.random.Generator, spec: TensorSpec, drawn: list[int]) -> np.ndarray:
    shape = tuple(
        (drawn[i] if i < len(drawn) and d.ragged else d.lo) for i, d in enumerate(spec.dims)
    )
    kind = spec.dtype.kind
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(spec.dtype)
    if kind in "iu":
        hi = min(1000, int(np.iinfo(spec.dtype).max) + 1)
        return rng.integers(0, hi, size=shape).astype(spec.dtype)
    if kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(spec.dtype)
    return rng.standard_normal(shape).astype(spec.dtype)


# -- .npz ---------------------------------------------------------------------------------


class NpzSource(RequestSource):
    """Sample requests loaded from an ``.npz`` (layouts in the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self._requests = load_npz(path)
        first = self._requests[0]
        self.padded = _needs_padding(self._requests)
        kind = ("named: " + ", ".join(first)) if isinstance(first, Mapping) else "arrays"
        self.description = (f"{plural(len(self._requests), 'sample request')} from {path} "
                            f"({kind})")
        self.sha256 = _digest(self._requests)

    def requests(self, seed: int) -> list[Request]:
        return self._requests

    def to_dict(self) -> dict[str, Any]:
        # The digest tells a file rewritten under the same name and count from the one
        # that a tune results file's runs were measured on.
        return {**super().to_dict(), "npz": self.path, "count": len(self._requests),
                "sha256": self.sha256}


def _digest(requests: Sequence[Request]) -> str:
    """SHA-256 of ``requests`` as sent: each one's names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for r in requests:
        h.update(b"request")
        for name, a in _arrays_of(r):
            h.update(repr((name, a.dtype.str, a.shape)).encode())
            h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _needs_padding(requests: list[Request]) -> bool:
    def lengths(a: np.ndarray) -> int:
        return a.shape[1] if a.ndim >= 2 else -1

    seen = set()
    for r in requests:
        arrays = r.values() if isinstance(r, Mapping) else [r]
        seen.add(tuple(lengths(a) for a in arrays))
    return len(seen) > 1


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive; an empty one


def _npz_arrays(f: Any, where: str) -> dict[str, np.ndarray]:
    """The arrays of the open file ``f``, which must be an ``.npz``."""
    # Not a zip: numpy would try it as a pickle, and its refusal reads as if the file
    # held objects that allow_pickle would load; it holds no .npz at all.
    if f.read(4) not in _ZIP_MAGIC:
        raise BenchError(f"{where}: not a readable .npz file (numpy.savez writes one)")
    f.seek(0)
    headers = _npz_headers(f, where)
    _check_npz_sizes(headers, where)
    f.seek(0)
    try:
        with np.load(f, allow_pickle=False) as npz:
            return {k: _npz_array(npz, k, where, headers) for k in npz.files}
    except BenchError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, RuntimeError,
            NotImplementedError, OverflowError) as exc:
        raise BenchError(f"{where}: not a readable .npz file (a zip numpy cannot read: "
                         f"{type(exc).__name__})") from None
    except MemoryError:  # what the headers declare fit, but not once allocated
        raise BenchError(f"{where}: its arrays do not fit in memory") from None


# The largest element count a header may declare and numpy allocate (an intp).
_MAX_ELEMENTS = 2**63 - 1

# The shape and dtype each array of an .npz declares, by the key numpy.load gives it.
NpyHeaders = dict[str, tuple[tuple[int, ...], np.dtype[Any]]]


def _npz_headers(f: Any, where: str) -> NpyHeaders:
    """The shape and dtype each array member of the zip ``f`` declares, read from its
    header alone (nothing decompressed past it), by the key ``numpy.load`` gives it (its
    name less ``.npy``). Any member with the ``.npy`` magic is an array to numpy, whatever
    its name; one without is left for the load to refuse, as is a zip this cannot read.
    Raises ``BenchError`` for a header numpy would read but this cannot size: a version
    it does not know, a shape no array can have."""
    headers = {}
    try:
        z = zipfile.ZipFile(f)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return {}  # the load refuses the file, saying why
    with z:
        for name in z.namelist():
            key = name[:-len(".npy")] if name.endswith(".npy") else name
            # A member this cannot read is refused by the load; the others' sizes are
            # still checked first (the load decompresses the members before it).
            try:
                header = _npy_header(z, name, key, where)
            except BenchError:
                raise
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError,
                    NotImplementedError):
                continue
            if header is not None:
                headers[key] = header
    return headers


def _npy_header(z: zipfile.ZipFile, name: str, key: str,
                where: str) -> tuple[tuple[int, ...], np.dtype[Any]] | None:
    """The shape and dtype member ``name`` of ``z`` declares, None if it has no ``.npy``
    magic; ``BenchError`` for a header numpy reads but this cannot size."""
    fmt = np.lib.format
    with z.open(name) as member:
        if member.read(len(fmt.MAGIC_PREFIX)) != fmt.MAGIC_PREFIX:
            return None
        major, minor = member.read(2).ljust(2, b"\0")
        version = (major, minor)
        # 3.0's header differs from 2.0's in its text's encoding (utf-8).
        read = {(1, 0): fmt.read_array_header_1_0,
                (2, 0): fmt.read_array_header_2_0,
                (3, 0): fmt.read_array_header_2_0}.get(version)
        if read is None:
            raise BenchError(f"{where}: array {key!r} has a .npy header of version "
                             f"{version}, which this cannot read")
        shape, _, dtype = read(member)
    if any(d < 0 for d in shape) or math.prod(d for d in shape if d) > _MAX_ELEMENTS:
        raise BenchError(f"{where}: array {key!r} declares shape {shape}, which no array "
                         "can have")
    return shape, dtype


def _check_npz_sizes(headers: NpyHeaders, where: str) -> None:
    """Refuse, from their headers and before anything is decompressed, an ``.npz`` whose
    arrays would take more than half the memory available, or holding a request past
    :data:`MAX_REQUEST_BYTES` (as ``--input DTYPE:SHAPE`` is refused): a small file may
    declare any size (zeros compress to almost nothing, a header may lie). Object arrays
    are left to the load, which refuses them."""
    headers = {k: h for k, h in headers.items() if not h[1].hasobject}
    nbytes = {k: math.prod(shape) * dtype.itemsize for k, (shape, dtype) in headers.items()}
    total = sum(nbytes.values())
    available = memory_available()
    if available is not None and total > available // 2:
        raise BenchError(
            f"{where}: its arrays would take {format_bytes(total)} in memory, over half "
            f"the memory available ({format_bytes(available)})")
    # One request's bytes and values, by load_npz's layouts: an array per request, the
    # named arrays of one request (by its number, as load_npz groups them), or a row of
    # every stacked array.
    requests: dict[object, tuple[int, int]] = {}  # request: (bytes, values)
    for k, (shape, _) in headers.items():
        named = _PER_REQUEST_NAMED.match(k)
        key: object
        if _PER_REQUEST.match(k) or named:
            key, part = int(named.group(1)) if named else k, (nbytes[k], math.prod(shape))
        elif shape and shape[0]:  # a stacked request: a row of each array
            key, part = None, (nbytes[k] // shape[0], math.prod(shape[1:]))
        else:
            continue
        before = requests.get(key, (0, 0))
        requests[key] = (before[0] + part[0], before[1] + part[1])
    if requests:
        largest, values = max(requests.values())
        _check_request_size(where, largest, values)


def _npz_array(npz: Any, key: str, where: str, headers: NpyHeaders) -> np.ndarray:
    """One array of an open ``.npz`` (``headers``: :func:`_npz_headers`'); its refusal as
    a one-line ``BenchError``."""
    try:
        array = npz[key]
    except ValueError:
        if key in headers and headers[key][1].hasobject:  # its data a pickle, never loaded
            raise BenchError(f"{where}: array {key!r} holds Python objects (dtype object); "
                             "save numeric arrays") from None
        raise BenchError(f"{where}: array {key!r} is not a readable .npy array") from None
    # numpy gives the raw bytes of a member that is no .npy (another file zipped in, or
    # a pickle under an .npy name), never unpickled.
    if not isinstance(array, np.ndarray):
        raise BenchError(f"{where}: member {key!r} is not a .npy array (numpy.savez "
                         "writes one per array)")
    return array


def load_npz(path: str) -> list[Request]:
    """Sample requests from ``path`` (one of the three layouts of the module docstring).

    Raises:
        BenchError: the file is missing, not an ``.npz``, empty, mixes layouts, holds a
            member that is no ``.npy``, object arrays, requests of a shape
            :func:`check_request_shape` refuses (0-d, 0 on an axis, too many dimensions),
            or its arrays (stacked layout) or named requests do not line up.
    """
    where = f"--input {path}"
    try:
        # Opened here, not by np.load, which leaves its file open when the zip is damaged.
        with open(path, "rb") as f:
            arrays = _npz_arrays(f, where)
    except FileNotFoundError:
        raise BenchError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise BenchError(f"{where}: is a directory") from None
    except OSError as exc:  # opening or reading it
        raise BenchError(f"{where}: cannot read it ({exc.strerror})") from None
    if not isinstance(arrays, dict) or not arrays:
        raise BenchError(f"{where}: holds no arrays")
    for k, a in arrays.items():
        if a.dtype.kind not in "biufc":
            raise BenchError(f"{where}: array {k!r} has dtype {a.dtype}, not numeric or bool")
    keys = list(arrays)
    if all(_PER_REQUEST.match(k) for k in keys):
        keys.sort(key=lambda k: int(k[4:]))
        _check_shapes(where, keys, arrays)
        _check_batchable(where, [(k, arrays[k]) for k in keys])
        return [arrays[k] for k in keys]
    named = [_PER_REQUEST_NAMED.match(k) for k in keys]
    if all(named):
        _check_shapes(where, keys, arrays)
        groups: dict[int, dict[str, np.ndarray]] = {}
        for m in named:
            assert m is not None
            group = groups.setdefault(int(m.group(1)), {})
            if m.group(2) in group:  # "0/a" and "00/a": one request's input, twice
                raise BenchError(f"{where}: request {int(m.group(1))} has input "
                                 f"{m.group(2)!r} twice (keys differing in their number's "
                                 "zeros)")
            group[m.group(2)] = arrays[m.group(0)]
        ordered = [groups[i] for i in sorted(groups)]
        names = list(ordered[0])  # as saved, as the stacked layout keeps them
        expected = sorted(names)
        for i, g in zip(sorted(groups), ordered):
            if sorted(g) != expected:
                raise BenchError(
                    f"{where}: request {i} has inputs {sorted(g)}, request "
                    f"{min(groups)} has {expected}"
                )
            if len({len(a) for a in g.values()}) > 1:
                raise BenchError(f"{where}: request {i}'s inputs differ in rows")
        for name in names:
            _check_batchable(where, [(f"{i}/{name}", g[name])
                                     for i, g in zip(sorted(groups), ordered)])
        return [{k: g[k] for k in names} for g in ordered]
    if any(_PER_REQUEST.match(k) or m for k, m in zip(keys, named)):
        raise BenchError(
            f"{where}: mixes per-request keys (arr_0, 0/name) with other keys: {keys[:4]}"
        )
    _check_shapes(where, keys, arrays, first_axis=1)  # axis 0: the count, below
    counts = {k: len(a) for k, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise BenchError(
            f"{where}: stacked arrays need the same number of requests on axis 0, got "
            + ", ".join(f"{k} {n}" for k, n in counts.items())
        )
    n = next(iter(counts.values()))
    if n == 0:
        raise BenchError(f"{where}: holds no requests (axis 0 is empty)")
    # Named by the user, so named requests, even for one array: the model is sent the
    # mapping the other ways of naming an input send.
    return [{k: a[i:i + 1] for k, a in arrays.items()} for i in range(n)]


def _check_shapes(where: str, keys: list[str], arrays: dict[str, np.ndarray],
                  first_axis: int = 0) -> None:
    """Refuse, as ``--input DTYPE:SHAPE`` refuses its shape, an array whose requests
    batchproc cannot batch (:func:`check_request_shape`): a request of no rows would be
    sent, counted and batched as one the model never sees, and one empty on another
    axis benchmarks nothing."""
    for k in keys:
        check_request_shape(f"{where}: array {k!r}", arrays[k].shape, first_axis)


def _check_batchable(where: str, arrays: list[tuple[str, np.ndarray]]) -> None:
    """Refuse, naming the first that differs and how, arrays (one per request, by its key)
    that one batch cannot join: a batch concatenates them on axis 0, padding axis 1 to
    the longest, so everything else must match the first."""
    key0, first = arrays[0]
    for key, a in arrays[1:]:
        if a.dtype != first.dtype:
            raise BenchError(
                f"{where}: {key} is {a.dtype}, {key0} is {first.dtype}: requests must share "
                "a dtype to share a batch")
        if a.ndim != first.ndim:
            raise BenchError(
                f"{where}: {key} has shape {a.shape}, {key0} has {first.shape}: requests "
                "must have the same number of dimensions to share a batch")
        if a.shape[2:] != first.shape[2:]:
            axis = next(i for i in range(2, a.ndim) if a.shape[i] != first.shape[i])
            raise BenchError(
                f"{where}: {key} has shape {a.shape}, {key0} has {first.shape}: requests "
                f"may differ in rows (axis 0) and length (axis 1, padded), not on axis {axis}")


# -- from the command line -----------------------------------------------------------------


def parse_inputs(specs: Sequence[str] | None, features: int | None) -> RequestSource:
    """The request source of ``--input`` (repeatable) or ``--features``.

    Raises:
        BenchError: both given, an ``.npz`` with other specs, or a bad spec or file.
    """
    if not specs:
        features = features if features is not None else 64
        _check_request_size(f"--features {features}", 4 * features, features)
        return FeatureRows(features)
    if features is not None:
        raise BenchError("--features and --input do not go together (give the shape in --input)")
    npz = [s for s in specs if s.endswith(".npz")]
    if npz:
        if len(specs) > 1:
            raise BenchError("--input FILE.npz holds every input; give it alone")
        return NpzSource(npz[0])
    return SpecSource([parse_tensor_spec(s) for s in specs])

"""Built-in batch functions for benchmarks, and loading the user's own.

A model is a callable taking a batch (by default a float32 array of shape
``(rows, features)``; what ``--input`` describes otherwise, see :mod:`.inputs`) and
returning an output whose leading length is ``rows``. The three built-ins span the cases
that matter:

- ``identity`` returns its input: all the time measured is the batcher's own overhead.
- ``mlp`` is a small float32 numpy MLP (features -> 256 -> 256 -> 16, ReLU, fixed seed):
  its cost grows with the batch, but far slower than linearly.
- ``fixed`` costs a fixed time per call, whatever the batch, behind one lock — the shape
  of one GPU: calls are serialized and a full batch costs what a single row does.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import BenchError
from .inputs import RequestSource

Model = Callable[[np.ndarray], Any]

BUILTIN_MODELS = ("identity", "mlp", "fixed")
DEFAULT_FIXED_MS = 5.0


def identity(batch: np.ndarray) -> np.ndarray:
    """Return the batch unchanged: measures pure batching overhead."""
    return batch


class MLP:
    """A small float32 MLP with ReLU, ``features -> 256 -> 256 -> 16``, fixed seed."""

    def __init__(self, features: int = 64, hidden: int = 256, out: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)

        def layer(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
            w = rng.standard_normal((n_in, n_out), dtype=np.float32) / np.float32(np.sqrt(n_in))
            return w, np.zeros(n_out, dtype=np.float32)

        self.w1, self.b1 = layer(features, hidden)
        self.w2, self.b2 = layer(hidden, hidden)
        self.w3, self.b3 = layer(hidden, out)
        self.features = features

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        h = np.maximum(batch @ self.w1 + self.b1, 0.0)
        h = np.maximum(h @ self.w2 + self.b2, 0.0)
        out: np.ndarray = h @ self.w3 + self.b3
        return out

    def __repr__(self) -> str:
        return f"MLP({self.features}->256->256->16)"


class FixedCost:
    """A fixed cost per call behind one lock, like one GPU: ``with lock: sleep(cost)``."""

    def __init__(self, cost_s: float = DEFAULT_FIXED_MS / 1000.0):
        self.cost_s = cost_s
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            time.sleep(self.cost_s)
        return batch

    def __repr__(self) -> str:
        return f"FixedCost({self.cost_s * 1000:g} ms)"


def load_user_model(spec: str) -> Model:
    """Import ``package.module:callable`` (the attribute may be dotted) and return it.

    Raises :class:`BenchError` with a one-line reason when it cannot be imported or is
    not callable. The current directory is importable, as it is under ``python -m``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BenchError(
            f"--model {spec!r}: expected one of {', '.join(BUILTIN_MODELS)} "
            "or package.module:callable"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of the user's module
        raise BenchError(
            f"--model {spec!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BenchError(
                f"--model {spec!r}: {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise BenchError(f"--model {spec!r}: {attr!r} is {_a(type(obj).__name__)}, not callable")
    return obj  # type: ignore[no-any-return]


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: ``a list``, ``an int``."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def make_model(name: str, *, features: int = 64, model_ms: float = DEFAULT_FIXED_MS) -> Model:
    """A built-in model by name, or the user's ``package.module:callable``."""
    if name == "identity":
        return identity
    if name == "mlp":
        return MLP(features)
    if name == "fixed":
        return FixedCost(model_ms / 1000.0)
    return load_user_model(name)


def check_model(model: Model, source: RequestSource, name: str = "model", seed: int = 0,
                max_batch: int | None = None) -> None:
    """Call ``model`` on batches of one and two sample requests of ``source`` and, given
    ``max_batch``, on the limit's first full batch of up to ``max_batch`` rows; raise
    BenchError (one line) if it fails on the first two, or returns what batchproc would
    refuse (its own output rule: :meth:`~.inputs.Batch.check`) for any. A failure on the
    full batch is left to the runs, which report it (batchproc isolates it; the limit
    fails)."""
    from batchproc.errors import BatchOutputError

    pool = source.requests(seed)
    checks = [(pool[:1], True), (pool[:2] if len(pool) >= 2 else pool * 2, True)]
    if max_batch is not None:
        full = source.limit_plan(max_batch, seed)[0]
        if len(full) > 2:
            checks.append((full, False))
    for requests, must_run in checks:
        batch = source.batch(requests)
        what = batch.describe()
        try:
            out = model(batch.inputs)
        except Exception as exc:
            if not must_run:
                continue
            raise BenchError(
                f"{name} failed on {what}: {type(exc).__name__}: {exc}"
            ) from None
        try:
            batch.check(out)
        except BatchOutputError as exc:
            raise BenchError(
                f"{name} returned an output batchproc refuses for {what}: "
                f"{type(exc).__name__}: {exc}"
            ) from None

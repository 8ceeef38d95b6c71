"""Batch assembly: native BatchAssembler vs numpy, measured side by side.

    pytest benchmarks/bench_native_assembler.py --benchmark-only

Each native benchmark also times numpy on the same input in the same run (interleaved,
best of several rounds) and records the speed-up in extra_info; the target is asserted.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from batchproc._native.batch_assembler import BatchAssembler

ROWS, FEATURES = 64, 64
CONCAT_TARGET = 1.5


def _items_2d() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random((1, FEATURES), dtype=np.float32) for _ in range(ROWS)]


def _items_1d() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.random(FEATURES, dtype=np.float32) for _ in range(ROWS)]


def _speedup(native: Callable[[], Any], baseline: Callable[[], Any]) -> float:
    best_native = best_base = float("inf")
    for _ in range(7):
        best_native = min(best_native, min(timeit.repeat(native, number=2000, repeat=3)))
        best_base = min(best_base, min(timeit.repeat(baseline, number=2000, repeat=3)))
    return best_base / best_native


@pytest.mark.benchmark(group="assemble-concat-64x(1,64)-f32")
def test_bench_concat_native(benchmark: Any) -> None:
    items = _items_2d()
    asm = BatchAssembler()
    out = benchmark(asm.concat, items)
    np.testing.assert_array_equal(out, np.concatenate(items))
    ratio = _speedup(lambda: asm.concat(items), lambda: np.concatenate(items))
    benchmark.extra_info["speedup_vs_np_concatenate"] = round(ratio, 2)
    assert ratio >= CONCAT_TARGET, f"native concat only {ratio:.2f}x np.concatenate"


@pytest.mark.benchmark(group="assemble-concat-64x(1,64)-f32")
def test_bench_concat_numpy(benchmark: Any) -> None:
    items = _items_2d()
    benchmark(np.concatenate, items)


@pytest.mark.benchmark(group="assemble-stack-64x(64,)-f32")
def test_bench_stack_native(benchmark: Any) -> None:
    items = _items_1d()
    asm = BatchAssembler()
    out = benchmark(asm.stack, items)
    np.testing.assert_array_equal(out, np.stack(items))
    ratio = _speedup(lambda: asm.stack(items), lambda: np.stack(items))
    benchmark.extra_info["speedup_vs_np_stack"] = round(ratio, 2)
    assert ratio >= CONCAT_TARGET, f"native stack only {ratio:.2f}x np.stack"


@pytest.mark.benchmark(group="assemble-stack-64x(64,)-f32")
def test_bench_stack_numpy(benchmark: Any) -> None:
    items = _items_1d()
    benchmark(np.stack, items)


@pytest.mark.benchmark(group="assemble-concat-8x(512,256)-f32")
def test_bench_concat_large_native(benchmark: Any) -> None:
    """Large batch (4 MiB): bandwidth-bound; the copy runs without the GIL. With the
    default two rotating buffers the destination working set is twice numpy's (which
    reuses one freed block), so expect parity or a little slower here, not a gain."""
    rng = np.random.default_rng(2)
    items = [rng.random((512, 256), dtype=np.float32) for _ in range(8)]
    asm = BatchAssembler()
    benchmark(asm.concat, items)


@pytest.mark.benchmark(group="assemble-concat-8x(512,256)-f32")
def test_bench_concat_large_numpy(benchmark: Any) -> None:
    rng = np.random.default_rng(2)
    items = [rng.random((512, 256), dtype=np.float32) for _ in range(8)]
    benchmark(np.concatenate, items)

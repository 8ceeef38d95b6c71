"""What each of ``map``'s mechanisms gains: ``map`` as it is against ``map`` with one of
them switched off, on one processor, alternating within each round.

    python benchmarks/ablate_map.py                 # ~40 s on 2 cores
    python benchmarks/ablate_map.py --rounds 2      # a smoke run

Variants:

- ``map``: as shipped;
- ``chunk by chunk``: results taken one chunk at a time (``bulk.GROUP_WAIT_S = 0``), not
  a group of chunks at a time (docs/bulk.md);
- ``slot handed over``: the call slot handed to another worker during each delivery
  while a full batch waits, even once the model's calls were seen to take turns on the
  GIL (``Controller.calls_serialize`` read as False): each batch then moves to another
  worker thread.

All variants run on the same processor in a rotated order within each round, so they
see the same machine and the controller's state; each figure is the median over rounds
of ``map``'s items/s divided by the variant's within the round.

Models: the ``mlp`` of ``batchproc bench`` (numpy, 64 -> 256 -> 256 -> 16; it holds the
GIL between its matrix products, where both mechanisms pay), on 50,000 items of one row
of 64 float32; and, on the same items in half the rounds, a model that sleeps 2 ms per
call (the GIL released throughout: chunks slower than the group wait, calls that
overlap, where neither should cost anything). Max batch 64, max delay 5 ms, the default
workers and buffersize (compare_map.py's processor).

Writes benchmarks/results/map-ablation.md and map-ablation.json; a run smaller than the defaults
writes map-ablation-small.md and .json, marked not for quoting.
"""

from __future__ import annotations

# compare_map's workload; imported first, it sets single-threaded BLAS before numpy loads.
from compare_map import FEATURES, MAX_BATCH, MAX_DELAY, _processor  # isort: skip

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from batchproc import bulk
from batchproc.bench import report
from batchproc.bench.models import MLP
from batchproc.controller import Controller

HERE = os.path.dirname(os.path.abspath(__file__))
SLEEP_S = 0.002
MAP, ONE_BY_ONE, HANDED_OVER = "map", "chunk by chunk", "slot handed over"
VARIANTS = (MAP, ONE_BY_ONE, HANDED_OVER)


@contextlib.contextmanager
def _variant(name: str) -> Iterator[None]:
    """Run ``map`` with the mechanism that variant ``name`` names switched off."""
    group_wait, serialize = bulk.GROUP_WAIT_S, Controller.calls_serialize
    if name == ONE_BY_ONE:
        bulk.GROUP_WAIT_S = 0.0
    elif name == HANDED_OVER:
        Controller.calls_serialize = property(lambda self: False)  # type: ignore[assignment]
    try:
        yield
    finally:
        bulk.GROUP_WAIT_S = group_wait
        Controller.calls_serialize = serialize  # type: ignore[method-assign]


def _sleeping(batch: np.ndarray) -> np.ndarray:
    time.sleep(SLEEP_S)
    return batch[:, :16] * 2


def _rounds(model: Callable[[np.ndarray], Any], items: list[np.ndarray],
            rounds: int) -> dict[str, list[float]]:
    """Items/s of each variant in each round, run in turn on one processor."""
    p = _processor(model, len(items))
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        list(p.map(items[:max(1, len(items) // 10)]))  # warm up
        for k in range(rounds):
            for variant in VARIANTS[k % 3:] + VARIANTS[:k % 3]:
                with _variant(variant):
                    gc.collect()
                    t0 = time.perf_counter()
                    n = len(list(p.map(items)))
                    rates[variant].append(n / (time.perf_counter() - t0))
            print(f"  round {k + 1}/{rounds}: " + ", ".join(
                f"map / {v} {rates[MAP][-1] / rates[v][-1]:.2f}" for v in VARIANTS[1:]),
                file=sys.stderr, flush=True)
    finally:
        p.stop()
    return rates


def _summary(rates: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"items_per_s": {v: statistics.median(r) for v, r in rates.items()},
                           "rates": rates, "versus": {}}
    for v in VARIANTS[1:]:
        ratios = [a / b for a, b in zip(rates[MAP], rates[v])]
        out["versus"][v] = {"ratio": statistics.median(ratios),
                            "map_faster": sum(r > 1.0 for r in ratios),
                            "rounds": len(ratios), "ratios": ratios}
    return out


def to_markdown(doc: dict[str, Any]) -> str:
    rows = []
    for model, r in doc["results"].items():
        for v in VARIANTS[1:]:
            x = r["versus"][v]
            rows.append([model, v, report.fmt_rate(r["items_per_s"][MAP]),
                         report.fmt_rate(r["items_per_s"][v]), f"{x['ratio']:.2f}x",
                         f"{x['map_faster']} of {x['rounds']}",
                         f"{min(x['ratios']):.2f}-{max(x['ratios']):.2f}"])
    return "\n".join([
        *report.doc_header_lines("`map`: each mechanism switched off in turn", doc),
        f"- group wait: {doc['group_wait_s'] * 1e3:g} ms; max batch {MAX_BATCH}, max delay "
        f"{MAX_DELAY * 1e3:g} ms, default workers and buffersize",
        "",
        "Items/s (medians over rounds); each round runs every variant on the same "
        "processor, in a rotated order, and each ratio is taken within the round.",
        "",
        report.markdown_table(["model", "switched off", "map items/s", "variant items/s",
                               "map ÷ variant", "map faster", "ratio range"], rows),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ablate_map.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="rounds on mlp (default 15)")
    ap.add_argument("--items", type=int, default=50_000, help="items per map (default 50000)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", help="output stem (default map-ablation; map-ablation-small for a "
                    "run smaller than the defaults)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.items < 10:
        ap.error("--rounds must be >= 1 and --items >= 10")
    smaller = report.smaller_than_defaults(ap, args, ("rounds", "items"))
    name = args.name or ("map-ablation-small" if smaller else "map-ablation")
    rng = np.random.default_rng(0)
    items = list(rng.standard_normal((args.items, 1, FEATURES), dtype=np.float32))
    t0 = time.perf_counter()
    results = {
        "mlp": _summary(_rounds(MLP(FEATURES), items, args.rounds)),
        f"sleeps {SLEEP_S * 1e3:g} ms": _summary(
            _rounds(_sleeping, items, max(1, args.rounds // 2))),
    }
    doc = {"date": report.now_iso(),
           "command": "python benchmarks/ablate_map.py " + " ".join(sys.argv[1:]),
           "machine": report.machine_info(), "versions": report.versions(),
           "smaller": smaller,
           "group_wait_s": bulk.GROUP_WAIT_S, "wall_s": time.perf_counter() - t0,
           "results": results}
    report.write_results(args.out_dir, name, to_markdown(doc), doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

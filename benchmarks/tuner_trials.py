"""The ADAPTIVE controller's choice of concurrent calls, part by part: a long stream
through ``map`` with the tuner as shipped, with one of its parts switched off, and with
the number of calls held at the best one for the model, alternating within each round.

    python benchmarks/tuner_trials.py              # ~1 min on 2 cores
    python benchmarks/tuner_trials.py --rounds 1   # a smoke run

The tuner tries another number of concurrent calls (two after one, one more or one
fewer while busy, one after a quiet spell) and keeps it or goes back on rows per second
measured in windows of at least 16 batches and 50 ms. Variants:

- ``as shipped``: each try a side-by-side trial (windows alternate between the limit
  tried and the one before, ``ConcurrencyTuner.TRIAL_WINDOWS`` of each, pooled; a first
  window ``CLEAR`` times beyond what the try needs decides it), and a step up that did
  not pay followed by a step down;
- ``one window``: ``TRIAL_WINDOWS = 1``: each try decided by its first window against
  the window before it. On a shared machine one window against the next swings widely;
- ``no step down``: no try of fewer calls while busy (a limit kept on a lucky window is
  kept until a quiet spell: on ``map``, for good);
- ``held``: the tuner off, the number of calls held at the best for the model (one, with
  the calls known to take turns, for ``mlp``; ``max_workers`` for the sleeping model):
  what the tuner would reach if it knew.

Each variant streams ``--maps`` maps of ``--items`` items, one after another, through one
fresh processor (one that lives long, as in a service or a pipeline). Figures: items/s
over the stream, and the share of its time spent at each number of calls (from the
tuner's changes). Variants run in a rotated order within each round; each ratio is the
median of the within-round ratios.

Models: the ``mlp`` of ``batchproc bench`` (numpy; it holds the GIL between its matrix
products, so two calls only take turns and carry fewer rows than one); and, in half as
many rounds (at least one) and on a quarter of the items, a model that sleeps 2 ms per
call (the GIL released: calls overlap, and the tuner must find that more calls carry
more).
compare_map.py's processor: max batch 64, max delay 5 ms, the default workers and
buffersize.

Writes benchmarks/results/tuner-trials.md and tuner-trials.json; a run smaller than the defaults
writes tuner-trials-small.md and .json, marked not for quoting.
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
from ablate_map import SLEEP_S, _sleeping

from batchproc import BatchProcessorConfig
from batchproc.bench import report
from batchproc.bench.models import MLP
from batchproc.controller import _FEWER, _MORE, ConcurrencyTuner

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED, ONE_WINDOW, NO_STEP_DOWN, HELD = "as shipped", "one window", "no step down", "held"
VARIANTS = (SHIPPED, ONE_WINDOW, NO_STEP_DOWN, HELD)


@contextlib.contextmanager
def _variant(variant: str, changes: list[tuple[float, int]]) -> Iterator[None]:
    """Run processors made inside with ``variant``'s tuner, appending (time, new limit)
    to ``changes`` at each change of the number of calls."""
    observe, try_, windows = (ConcurrencyTuner.observe, ConcurrencyTuner._try,
                              ConcurrencyTuner.TRIAL_WINDOWS)

    def recording_observe(self: ConcurrencyTuner, rows: int, backlog: bool,
                          full: bool = False) -> tuple[int, int] | None:
        change = None if variant == HELD else observe(self, rows, backlog, full)
        if change is not None:
            changes.append((time.monotonic(), change[1]))
        return change

    def no_step_down(self: ConcurrencyTuner, kind: str, tried: int, rows: int,
                     seconds: float) -> tuple[int, int] | None:
        if kind is not _FEWER:
            return try_(self, kind, tried, rows, seconds)
        limit = self.slots.limit  # a step up instead, where one is left
        return try_(self, _MORE, limit + 1, rows, seconds) if limit < self._max else None

    ConcurrencyTuner.observe = recording_observe  # type: ignore[method-assign]
    if variant == ONE_WINDOW:
        ConcurrencyTuner.TRIAL_WINDOWS = 1
    elif variant == NO_STEP_DOWN:
        ConcurrencyTuner._try = no_step_down  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        ConcurrencyTuner.observe = observe  # type: ignore[method-assign]
        ConcurrencyTuner._try = try_  # type: ignore[method-assign]
        ConcurrencyTuner.TRIAL_WINDOWS = windows


def _time_at_limits(changes: list[tuple[float, int]], start: float, end: float,
                    first: int) -> dict[int, float]:
    """Share of [start, end] spent at each call limit (``first`` at the start)."""
    shares: dict[int, float] = {}
    limit, since = first, start
    for at, new in [*changes, (end, 0)]:
        shares[limit] = shares.get(limit, 0.0) + (at - since) / (end - start)
        limit, since = new, at
    return shares


def _stream(model: Callable[[np.ndarray], Any], items: list[np.ndarray], maps: int,
            variant: str, held: int) -> tuple[float, dict[int, float]]:
    """Items/s of ``maps`` maps in a row on a fresh processor, and the time shares."""
    changes: list[tuple[float, int]] = []
    with _variant(variant, changes):
        p = _processor(model, len(items))
        if variant == HELD:
            tuner = p._controller._tuner
            tuner.serialized = held == 1
            tuner.slots.set_limit(held)
        try:
            gc.collect()
            start = time.monotonic()
            n = sum(len(list(p.map(items))) for _ in range(maps))
            end = time.monotonic()
        finally:
            p.stop()
    first = held if variant == HELD else 1
    return n / (end - start), _time_at_limits(changes, start, end, first)


def _rounds(model: Callable[[np.ndarray], Any], items: list[np.ndarray], maps: int,
            rounds: int, held: int) -> dict[str, Any]:
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    shares: dict[str, list[dict[int, float]]] = {v: [] for v in VARIANTS}
    for k in range(rounds):
        turn = k % len(VARIANTS)
        for variant in VARIANTS[turn:] + VARIANTS[:turn]:
            rate, share = _stream(model, items, maps, variant, held)
            rates[variant].append(rate)
            shares[variant].append(share)
        print(f"  round {k + 1}/{rounds}: " + ", ".join(
            f"{v} {rates[v][-1]:,.0f}" for v in VARIANTS) + " items/s",
            file=sys.stderr, flush=True)
    limits = sorted({limit for v in VARIANTS for s in shares[v] for limit in s})
    versus = {}
    for v in VARIANTS[1:]:
        ratios = [a / b for a, b in zip(rates[SHIPPED], rates[v])]
        versus[v] = {"ratio": statistics.median(ratios),
                     "shipped_faster": sum(r > 1.0 for r in ratios), "ratios": ratios}
    return {
        "held_calls": held,
        "items_per_s": {v: statistics.median(r) for v, r in rates.items()},
        "time_at_limit": {v: {str(limit): statistics.mean(s.get(limit, 0.0)
                                                          for s in shares[v])
                              for limit in limits} for v in VARIANTS},
        "versus": versus, "rates": rates, "shares": shares,
    }


def to_markdown(doc: dict[str, Any]) -> str:
    rows = []
    for model, r in doc["results"].items():
        for v in VARIANTS:
            at = ", ".join(f"{limit}: {share:.0%}" for limit, share
                           in r["time_at_limit"][v].items() if share >= 0.005)
            x = r["versus"].get(v)
            versus = ([f"{x['ratio']:.2f}x", f"{x['shipped_faster']} of {len(x['ratios'])}",
                       f"{min(x['ratios']):.2f}-{max(x['ratios']):.2f}"]
                      if x else ["", "", ""])
            name = f"held at {r['held_calls']}" if v == HELD else v
            rows.append([model, name, report.fmt_rate(r["items_per_s"][v]), at, *versus])
    return "\n".join([
        *report.doc_header_lines("Concurrent calls: the tuner part by part", doc),
        f"- each stream: {doc['maps']} map(s) of {doc['items']:,} items (the sleeping model: "
        f"{doc['items'] // 4:,}) of one row of {FEATURES} float32 on a fresh processor; "
        f"max batch {MAX_BATCH}, max delay {MAX_DELAY * 1e3:g} ms, default workers and "
        f"buffersize; trials of {doc['trial_windows']} windows at each limit",
        "",
        "Items/s over each stream (medians over rounds) and the mean share of its time "
        "at each number of concurrent calls; as shipped ÷ variant is the median of the "
        "within-round ratios.",
        "",
        report.markdown_table(["model", "tuner", "items/s", "time at calls: share",
                               "as shipped ÷ variant", "as shipped faster",
                               "ratio range"], rows),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tuner_trials.py",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds on mlp (default 6)")
    ap.add_argument("--items", type=int, default=50_000, help="items per map (default 50000)")
    ap.add_argument("--maps", type=int, default=8, help="maps per stream (default 8)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", help="output stem (default tuner-trials; tuner-trials-small for a "
                    "run smaller than the defaults)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.items < 10 or args.maps < 1:
        ap.error("--rounds and --maps must be >= 1 and --items >= 10")
    smaller = report.smaller_than_defaults(ap, args, ("rounds", "items", "maps"))
    name = args.name or ("tuner-trials-small" if smaller else "tuner-trials")
    rng = np.random.default_rng(0)
    items = list(rng.standard_normal((args.items, 1, FEATURES), dtype=np.float32))
    t0 = time.perf_counter()
    results = {
        "mlp": _rounds(MLP(FEATURES), items, args.maps, args.rounds, held=1),
        f"sleeps {SLEEP_S * 1e3:g} ms": _rounds(
            _sleeping, items[:args.items // 4], args.maps, max(1, args.rounds // 2),
            held=BatchProcessorConfig().max_workers),
    }
    doc = {"date": report.now_iso(),
           "command": "python benchmarks/tuner_trials.py " + " ".join(sys.argv[1:]),
           "machine": report.machine_info(), "versions": report.versions(),
           "smaller": smaller,
           "items": args.items, "maps": args.maps,
           "trial_windows": ConcurrencyTuner.TRIAL_WINDOWS,
           "wall_s": time.perf_counter() - t0, "results": results}
    report.write_results(args.out_dir, name, to_markdown(doc), doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

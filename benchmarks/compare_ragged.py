"""Ragged sequences: batchproc padding against exact-shape grouping and `batched`'s
padding, side by side in one run.

    python benchmarks/compare_ragged.py              # median of 3 (~30 s on 2 cores)
    python benchmarks/compare_ragged.py --quick      # 1 repetition, 1,000 requests (~5 s)
    python benchmarks/compare_ragged.py --repeat 5 --requests 8000 --loads burst

Workload: N requests (default 4,000) of int64 token ids, lengths uniform in 8..128
(fixed seed), each its own row. The model stands for a text model on one accelerator:
one call at a time (a lock), the GIL released while it "computes"
(``time.sleep(1 ms + 0.5 us x rows x padded length)``), so its cost grows with padded
tokens. A sequence alone costs about 1.03 ms, a full padded batch of 64 about 5 ms
(0.08 ms a row): batching pays about 13x, and padding to the longest of 64 random
lengths spends about 45% of the per-token time on padding. It returns two numbers per
row that padding does not change (the token count and a position-weighted sum of the
ids), so every caller's result is checked against the model on its own sequence.

Systems, all with max batch 64 and max delay 5 ms:

- batchproc padded: items ``(1, L)`` arrays, ``pad_value=0``;
- batchproc padded, max_batch_tokens 4096: the same, at most 4096 rows x padded length
  per batch;
- batchproc exact shapes: the same items without ``pad_value``, so only sequences of equal
  length share a batch (the behaviour for ragged arrays before padding existed);
- batched: ``batched.inference.ModelBatchProcessor`` with ``pad_tokens={"input_ids": 0}``
  (dict items of 1-D sequences, padded to the longest, outputs unstacked per row).

Loads: a burst of N from one thread, and 64 closed-loop clients sending N in all. The
load generators and measurement are batchproc.bench's; a target ignores the item a
generator hands it and sends the next sequence of the workload instead. Systems run in a
rotated order in each repetition; figures are medians.

Writes benchmarks/results/ragged.md and ragged.json (every repetition's figures).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from batchproc.bench import report
from batchproc.bench.loads import Bounds, Load
from batchproc.bench.runner import RunResult, run_target
from batchproc.bench.targets import Batchproc, SyncTarget

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_BATCH = 64
MAX_DELAY = 0.005
MIN_LEN, MAX_LEN = 8, 128
VOCAB = 30_000
FIXED_S = 0.001  # per model call
PER_TOKEN_S = 0.5e-6  # per padded token
MAX_TOKENS = 4096
PADDED = "batchproc padded"
CAPPED = f"batchproc padded, max_batch_tokens {MAX_TOKENS}"
EXACT = "batchproc exact shapes"
BATCHED = "batched"
SYSTEMS = {"padded": PADDED, "tokens": CAPPED, "exact": EXACT, "batched": BATCHED}
LOADS = ("burst", "64")


def pooled(ids: np.ndarray) -> np.ndarray:
    """Per row: the token count and the position-weighted sum of the ids. Padding (id 0
    at the end) adds nothing to either, so a row's result does not depend on its batch."""
    weights = np.arange(1, ids.shape[1] + 1, dtype=np.int64)
    return np.stack([np.count_nonzero(ids, axis=1), ids @ weights], axis=1)


class Workload:
    """The N sequences, shape (1, L) each, and what the model gives each on its own."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        lengths = rng.integers(MIN_LEN, MAX_LEN + 1, size=n)
        self.seqs = [rng.integers(1, VOCAB, size=(1, int(k)), dtype=np.int64) for k in lengths]
        self.expected = [pooled(s) for s in self.seqs]
        self.n = n
        self.mean_length = float(lengths.mean())


class TokenModel:
    """One call at a time, cost fixed + per padded token, the GIL released meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.padded = 0
        self.real = 0

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        rows, length = ids.shape
        with self._lock:
            time.sleep(FIXED_S + PER_TOKEN_S * rows * length)
            out = pooled(ids)
            self.padded += rows * length
            self.real += int(out[:, 0].sum())
        return out


class Sender:
    """What a target adds: the next sequence of the workload for each request, and every
    outcome kept (a future or a result) to check afterwards."""

    def __init__(self, work: Workload):
        self.work = work
        self._tickets = itertools.count()
        self.outcomes: list[tuple[int, Any]] = []

    def take(self) -> tuple[int, np.ndarray]:
        k = next(self._tickets) % self.work.n
        return k, self.work.seqs[k]

    def check(self) -> tuple[int, int]:
        """(results checked, results wrong); failed requests are counted by the runner."""
        checked = wrong = 0
        for k, got in self.outcomes:
            if isinstance(got, Future):
                if not got.done() or got.exception() is not None:
                    continue
                got = got.result()
            checked += 1
            if not np.array_equal(np.asarray(got).reshape(-1), self.work.expected[k][0]):
                wrong += 1
        return checked, wrong


class RaggedBatchproc(Batchproc):
    def __init__(self, name: str, work: Workload, **settings: Any):
        super().__init__(MAX_BATCH, MAX_DELAY, queue_size=max(1000, work.n))
        self.name = name
        self.settings.update(settings)
        self.sender = Sender(work)

    def submit(self, item: np.ndarray, priority: int) -> Future[Any]:
        k, seq = self.sender.take()
        fut: Future[Any] = self._enqueue(seq)
        self.sender.outcomes.append((k, fut))
        return fut

    def call(self, item: np.ndarray, priority: int) -> Any:
        return self.submit(item, priority).result()


class BatchedPadded(SyncTarget):
    """`batched`'s padding processor. Closed-loop clients use its public call on a batch
    of one (``processor({"input_ids": (1, L)})``); the burst needs a future per request
    without blocking, which it offers only through ``_schedule`` (what its own call uses)."""

    name = BATCHED

    def __init__(self, work: Workload):
        self.sender = Sender(work)

    def start(self, model: Callable[[np.ndarray], Any]) -> None:
        from batched.inference import ModelBatchProcessor  # type: ignore[import-untyped]

        self._p = ModelBatchProcessor(
            lambda batch: model(batch["input_ids"]), batch_size=MAX_BATCH,
            timeout_ms=MAX_DELAY * 1000, pad_tokens={"input_ids": 0},
        )
        self._p.start()

    def submit(self, item: np.ndarray, priority: int) -> Future[Any]:
        k, seq = self.sender.take()
        fut: Future[Any] = self._p._schedule([{"input_ids": seq[0]}])[0].future
        self.sender.outcomes.append((k, fut))
        return fut

    def call(self, item: np.ndarray, priority: int) -> Any:
        k, seq = self.sender.take()
        out = self._p({"input_ids": seq})
        self.sender.outcomes.append((k, out))
        return out

    def stop(self) -> None:
        self._p.shutdown()


def make_target(name: str, work: Workload) -> Any:
    if name == PADDED:
        return RaggedBatchproc(name, work, pad_value=0)
    if name == CAPPED:
        return RaggedBatchproc(name, work, pad_value=0, max_batch_tokens=MAX_TOKENS)
    if name == EXACT:
        return RaggedBatchproc(name, work)
    return BatchedPadded(work)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="compare_ragged.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="1 repetition of 1,000 requests: a smoke run, not for quoting")
    p.add_argument("--repeat", type=int, default=None, help="repetitions (default 3)")
    p.add_argument("--requests", type=int, default=None, help="N (default 4000)")
    p.add_argument("--loads", default=",".join(LOADS), help="comma list of burst, 64")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma list (default: all): "
                   + ", ".join(f"{k} ({v})" for k, v in SYSTEMS.items()))
    p.add_argument("--cap", type=float, default=60.0, help="time cap per run, s (default 60)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default=None,
                   help="output file stem (default: ragged; ragged-quick with --quick)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    a = p.parse_args(argv)
    a.repeat = a.repeat or (1 if a.quick else 3)
    a.requests = a.requests or (1_000 if a.quick else 4_000)
    a.name = a.name or ("ragged-quick" if a.quick else "ragged")
    a.loads = [x for x in a.loads.split(",") if x]
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    for name, got, allowed in (("--loads", a.loads, LOADS), ("--systems", a.systems, SYSTEMS)):
        bad = [x for x in got if x not in allowed]
        if bad:
            p.error(f"{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    a.systems = [SYSTEMS[k] for k in a.systems]
    if BATCHED in a.systems:
        try:
            import batched.inference  # type: ignore[import-untyped]  # noqa: F401
        except ImportError as exc:
            print(f"skipping {BATCHED}: {exc} (pip install batched)", file=sys.stderr)
            a.systems.remove(BATCHED)
    if a.repeat < 1 or a.requests < 1 or a.cap <= 0:
        p.error("--repeat, --requests and --cap must be positive")
    return a


def run_one(name: str, work: Workload, key: str, cap: float, progress: Any) -> dict[str, Any]:
    if key == "burst":
        load, bounds = Load("burst", burst=work.n), Bounds(None, cap)
    else:
        load, bounds = Load("closed", clients=int(key)), Bounds(work.n, cap)
    target = make_target(name, work)
    model = TokenModel()
    r: RunResult = run_target(target, model, "tokens", load, bounds, progress)
    checked, wrong = target.sender.check()
    out = r.to_dict()
    out.update(padding_efficiency=model.real / model.padded if model.padded else float("nan"),
               padded_tokens=model.padded, checked=checked, wrong=wrong)
    return out


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    fields = ("throughput", "p50_ms", "p99_ms", "mean_batch", "batches", "padding_efficiency")
    out: dict[str, Any] = {f: statistics.median(r[f] for r in runs) for f in fields}
    for f in ("completed", "errors", "unfinished", "checked", "wrong"):
        out[f] = sum(r[f] for r in runs)
    out["stopped_by_cap"] = sum(r["stopped_by"] == "duration" for r in runs)
    return out


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    work = Workload(args.requests)
    progress = report.make_progress(args.quiet)
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        for key in args.loads:
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems}
            names = list(args.systems)
            for rep in range(args.repeat):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for s in order:
                    runs[s].append(run_one(s, work, key, args.cap, progress))
            for s in names:
                results.append({"load_key": key, "load": runs[s][0]["load"], "system": s,
                                "median": median_of(runs[s]), "runs": runs[s]})
    finally:
        progress.close()
    return {
        "date": report.now_iso(),
        "command": "python benchmarks/compare_ragged.py " + " ".join(sys.argv[1:]),
        "machine": report.machine_info(),
        "versions": report.versions(extra=("batched",)),
        "settings": {
            "requests": args.requests, "lengths": [MIN_LEN, MAX_LEN],
            "mean_length": work.mean_length, "max_batch": MAX_BATCH,
            "max_delay_ms": MAX_DELAY * 1000, "max_batch_tokens": MAX_TOKENS,
            "model_fixed_ms": FIXED_S * 1000, "model_per_token_us": PER_TOKEN_S * 1e6,
            "repeat": args.repeat, "cap_s": args.cap, "quick": args.quick,
        },
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }


def spread(runs: list[dict[str, Any]]) -> str:
    rates = [r["throughput"] for r in runs]
    return f"{report.fmt_rate(min(rates))}-{report.fmt_rate(max(rates))}"


def to_markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        *report.doc_header_lines(
            "Ragged sequences: batchproc padding vs exact-shape grouping vs `batched`", doc),
        f"- workload: {s['requests']:,} int64 sequences, lengths uniform in "
        f"{s['lengths'][0]}..{s['lengths'][1]} (mean {s['mean_length']:.1f}), one row each; "
        f"model: one call at a time, sleeps {s['model_fixed_ms']:g} ms + "
        f"{s['model_per_token_us']:g} µs per padded token (GIL released); max batch "
        f"{s['max_batch']}, max delay {s['max_delay_ms']:g} ms; median of {s['repeat']} "
        "repetition(s), systems in rotated order"
        + ("; **--quick smoke run: not for quoting**" if s["quick"] else ""),
        "",
        "Rows/call and calls are counted at the model; padding efficiency is real tokens / "
        "padded tokens over the run; *checked* is how many results were compared with the "
        "model on the caller's own sequence (all repetitions), and how many differed.",
        "",
    ]
    notes = []
    for key in dict.fromkeys(r["load_key"] for r in doc["results"]):
        rows = [r for r in doc["results"] if r["load_key"] == key]
        ref = next((r["median"] for r in rows if r["system"] == PADDED), None)
        table = []
        for r in rows:
            m = r["median"]
            thr = ref["throughput"] / m["throughput"] if ref and m["throughput"] else None
            p50 = ref["p50_ms"] / m["p50_ms"] if ref and m["p50_ms"] else None
            table.append([
                r["system"], f"{report.fmt_rate(m['throughput'])} ({spread(r['runs'])})",
                report.fmt_ms(m["p50_ms"]),
                report.fmt_ms(m["p99_ms"]), f"{m['mean_batch']:.1f}", f"{m['batches']:,.0f}",
                f"{m['padding_efficiency']:.0%}",
                f"{m['checked']:,}, {m['wrong']} wrong" if not m["wrong"]
                else f"{m['checked']:,}, **{m['wrong']} wrong**",
                "-" if r["system"] == PADDED else report.fmt_ratio(thr),
                "-" if r["system"] == PADDED else report.fmt_ratio(p50),
            ])
            if m["errors"] or m["unfinished"] or m["stopped_by_cap"]:
                notes.append(f"- {r['system']}, {r['load']}: {m['errors']} failed, "
                             f"{m['unfinished']} unfinished, {m['stopped_by_cap']} run(s) "
                             "stopped by the time cap")
        lines += [f"## {rows[0]['load']}", "", report.markdown_table(
            ["system", "req/s (range)", "p50 ms", "p99 ms", "rows/call", "calls", "padding eff.",
             "checked", "padded req/s ÷ this", "padded p50 ÷ this"], table), ""]
    lines += notes
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    doc = run_all(args)
    report.write_results(args.out_dir, args.name, to_markdown(doc), doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

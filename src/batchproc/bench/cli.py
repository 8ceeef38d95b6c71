"""``batchproc bench``: run one load three ways and print what batching buys.

Through batchproc, with no batching (the model called per request) and the limit (the
model called back to back on full batches). Bad flags end with one line on stderr and
exit status 2; a failure while running ends with one line and status 1.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import BenchError
from .inputs import FeatureRows
from .loads import Bounds, Load
from .models import BUILTIN_MODELS, DEFAULT_FIXED_MS, check_model, make_model
from .targets import STRATEGIES, Batchproc, BatchprocAsync, NoBatching

log = logging.getLogger(__name__)

PROG = "batchproc"
DEFAULT_CLIENTS = 64
DEFAULT_REQUESTS = 20_000
DEFAULT_DURATION_S = 5.0

DESCRIPTION = """\
Run the same load three ways -- through batchproc, with no batching (the model called
on each request) and the limit (the model called back to back on full batches) -- and
print throughput, latency percentiles, mean batch size and batchproc's ratios.

With no flags: the `fixed` model (5 ms per call behind one lock, like one GPU),
64 closed-loop clients, each run bounded by 20000 requests or 5 s.
"""

EPILOG = """\
examples:
  batchproc bench
  batchproc bench --model mlp --burst 50000
  batchproc bench --model identity --clients 1 --requests 2000
  batchproc bench --model fixed --rate 5000 --priorities --duration 10
  batchproc bench --model mypkg.serving:predict_batch --clients 32 --json out.json
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line on stderr (not the usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _float(s: str, *, allow_zero: bool) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(
            f"must be {'>= 0' if allow_zero else '> 0'} and finite, got {s}"
        )
    return v


def _positive_float(s: str) -> float:
    return _float(s, allow_zero=False)


def _nonneg_float(s: str) -> float:
    return _float(s, allow_zero=True)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Dynamic batching engine for ML inference.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    b = sub.add_parser(
        "bench",
        help="benchmark batchproc against no batching and the limit",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    m = b.add_argument_group("model")
    m.add_argument(
        "--model", default="fixed", metavar="NAME",
        help=f"{', '.join(BUILTIN_MODELS)} or package.module:callable, a batch function "
        "taking a (rows, features) float32 array (default: fixed)",
    )
    m.add_argument(
        "--model-ms", type=_nonneg_float, default=DEFAULT_FIXED_MS, metavar="MS",
        help=f"cost per call of the fixed model (default: {DEFAULT_FIXED_MS:g})",
    )
    m.add_argument(
        "--features", type=_positive_int, default=64, metavar="N",
        help="float32 features per request; each request is one row (default: 64)",
    )

    ld = b.add_argument_group("load (one of --clients, --rate, --burst)")
    shape = ld.add_mutually_exclusive_group()
    shape.add_argument(
        "--clients", type=_positive_int, metavar="N",
        help=f"closed loop: N threads, each submits and waits (default: {DEFAULT_CLIENTS})",
    )
    shape.add_argument(
        "--rate", type=_positive_float, metavar="R",
        help="open loop: Poisson arrivals at R requests/s from one thread",
    )
    shape.add_argument(
        "--burst", type=_positive_int, metavar="N",
        help="one thread submits N requests as fast as it can, then waits for all",
    )
    ld.add_argument(
        "--asyncio", action="store_true",
        help="drive batchproc from one asyncio loop (enqueue_predict_async): clients are "
        "coroutines, as in an asyncio service; no batching and the limit run as usual",
    )
    ld.add_argument(
        "--priorities", action="store_true",
        help="random BatchPriority levels; turns on batchproc's priority queue",
    )
    ld.add_argument(
        "--requests", type=_positive_int, default=None, metavar="N",
        help=f"stop each run after N requests (default: {DEFAULT_REQUESTS}; a burst: its size)",
    )
    ld.add_argument(
        "--duration", type=_positive_float, default=DEFAULT_DURATION_S, metavar="S",
        help=f"... or after S seconds, whichever comes first (default: {DEFAULT_DURATION_S:g})",
    )
    ld.add_argument("--seed", type=int, default=0, help="seed for data, arrivals, priorities")

    c = b.add_argument_group("batchproc configuration")
    c.add_argument(
        "--max-batch", type=_positive_int, default=64, metavar="N",
        help="max_batch_size, in rows (default: 64)",
    )
    c.add_argument(
        "--max-delay", type=_nonneg_float, default=5.0, metavar="MS",
        help="batch_timeout: the longest a request waits for its batch (default: 5)",
    )
    c.add_argument(
        "--workers", type=_positive_int, default=None, metavar="N",
        help="max_workers: batches in flight (default: the library's, 4)",
    )
    c.add_argument(
        "--strategy", choices=STRATEGIES, default="adaptive",
        help="processing_strategy (default: adaptive)",
    )

    o = b.add_argument_group("output")
    o.add_argument(
        "--json", metavar="FILE",
        help="write the raw figures as JSON: keys date, machine, versions, settings, "
        "runs (one object per system: system, throughput, p50_ms, p95_ms, p99_ms, "
        "mean_batch, completed, stopped_by, ...) and ratios (vs_no_batching, vs_limit)",
    )
    o.add_argument(
        "--plot", metavar="FILE.png",
        help="draw latency against throughput (needs matplotlib: the plot extra)",
    )
    o.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    o.add_argument("-v", "--verbose", action="store_true", help="log batchproc at INFO")
    return parser


def _version() -> str:
    from batchproc import __version__

    return str(__version__)


def _check_writable(flag: str, path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise BenchError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BenchError(f"{flag} {path}: directory {parent} is not writable")
    if os.path.isdir(path):
        raise BenchError(f"{flag} {path}: is a directory")


def _describe_model(name: str, model_ms: float) -> str:
    if name == "fixed":
        return f"fixed ({model_ms:g} ms per call, one lock)"
    if name == "mlp":
        return "mlp (features->256->256->16, float32)"
    if name == "identity":
        return "identity (pure overhead)"
    return name


def settings_from(args: argparse.Namespace) -> tuple[Load, Bounds, dict[str, Any]]:
    if args.rate is not None:
        load = Load("rate", rate=args.rate, priorities=args.priorities, features=args.features,
                    seed=args.seed)
    elif args.burst is not None:
        load = Load("burst", burst=args.burst, priorities=args.priorities,
                    features=args.features, seed=args.seed)
    else:
        load = Load("closed", clients=args.clients or DEFAULT_CLIENTS,
                    priorities=args.priorities, features=args.features, seed=args.seed)
    requests = args.requests
    if requests is None and load.kind != "burst":
        requests = DEFAULT_REQUESTS
    bounds = Bounds(requests=requests, duration=args.duration)
    expected = requests if requests is not None else load.burst
    if load.kind == "burst" and requests is not None:
        expected = min(requests, load.burst)
    if load.kind == "rate":
        expected = min(expected, int(load.rate * args.duration) + 1)
    queue_size = max(1000, load.n_threads, min(expected, 1_000_000))
    settings = {
        "model": args.model,
        "model_ms": args.model_ms if args.model == "fixed" else None,
        "features": args.features,
        "load": {"kind": load.kind, "clients": load.clients if load.kind == "closed" else None,
                 "rate": load.rate or None, "burst": load.burst or None,
                 "priorities": load.priorities, "seed": load.seed},
        "requests": bounds.requests,
        "duration_s": bounds.duration,
        "max_batch": args.max_batch,
        "max_delay_ms": args.max_delay,
        "workers": args.workers,
        "strategy": args.strategy,
        "asyncio": args.asyncio,
        "queue_size": queue_size,
    }
    return load, bounds, settings


def run_bench(args: argparse.Namespace) -> int:
    from . import report
    from .runner import run_limit, run_target

    if args.plot:
        try:
            report.require_matplotlib()
        except report.PlotUnavailable as exc:
            raise BenchError(str(exc)) from None
        _check_writable("--plot", args.plot)
    if args.json:
        _check_writable("--json", args.json)
    load, bounds, settings = settings_from(args)
    model = make_model(args.model, features=args.features, model_ms=args.model_ms)
    check_model(model, FeatureRows(args.features), name=f"--model {args.model}")
    try:
        import batchproc

        batchproc.BatchProcessor  # noqa: B018
    except (ImportError, AttributeError) as exc:
        raise BenchError(f"batchproc's BatchProcessor is not importable: {exc}") from None

    bp = (BatchprocAsync if args.asyncio else Batchproc)(
        max_batch=args.max_batch,
        max_delay=args.max_delay / 1000.0,
        workers=args.workers,
        strategy=args.strategy,
        priorities=args.priorities,
        queue_size=settings["queue_size"],
    )
    try:
        bp.config()
    except (ValueError, TypeError) as exc:
        raise BenchError(f"batchproc rejects this configuration: {exc}") from None

    bound_desc = (
        f"{bounds.requests:,} requests or {bounds.duration:g} s" if bounds.requests
        else f"{bounds.duration:g} s"
    )
    title = (
        f"{_describe_model(args.model, args.model_ms)} · {load.label} · "
        f"{args.features} float32 features/request · max batch {args.max_batch}, "
        f"max delay {args.max_delay:g} ms, strategy {args.strategy}"
        + (f", {args.workers} workers" if args.workers else "")
        + f" · each run stops at {bound_desc}"
    )
    progress = report.make_progress(args.quiet)
    runs = []
    try:
        for target in (bp, NoBatching()):
            runs.append(run_target(target, model, args.model, load, bounds, progress))
        runs.append(run_limit(model, args.model, load, bounds, args.max_batch, progress))
    finally:
        progress.close()
    ratios = report.bench_ratios(runs, subject=bp.name)
    report.print_bench_table(title, runs, ratios)
    failed = [r for r in runs if r.errors]
    if args.json:
        report.write_json(args.json, {
            "date": report.now_iso(),
            "machine": report.machine_info(),
            "versions": report.versions(),
            "settings": settings,
            "runs": [r.to_dict() for r in runs],
            "ratios": ratios,
        })
    if args.plot:
        report.write_plot(args.plot, runs, title)
    return 1 if failed else 0


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging(verbose: bool) -> None:
    """The CLI owns its process, but configures only batchproc's logger, never the root."""
    logger = logging.getLogger("batchproc")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if not any(getattr(h, "_batchproc_cli", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        handler._batchproc_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad flag (already reported)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _configure_logging(verbose=getattr(args, "verbose", False))
    try:
        return run_bench(args)
    except BenchError as exc:
        print(f"{PROG} bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} bench: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback for the user; the log keeps it
        log.debug("bench failed", exc_info=True)
        print(f"{PROG} bench: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

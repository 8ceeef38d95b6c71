"""The ``batchproc`` command line: ``bench`` (one load, or ``--sweep`` for the curve) and
``tune``.

``bench`` runs one load through batchproc, with no batching (the model called per
request) and the limit (the model called back to back on full batches); ``bench
--sweep`` runs open-loop loads at fractions of the capacity (:mod:`.sweep`); ``tune``
searches static configurations (:mod:`.tune`). Bad flags (an unwritable --json, a
--plot format matplotlib cannot write, a tune --budget too small for one run) end with
one line on stderr and exit status 2, before anything runs. A run that raises is shown
as failed, the other runs are kept, and the status is 1; so it is when the model failed
in a run, when a run completed no request (a model that hung, a duration too short for
any), and when an output fails to be written after the runs (the figures are printed
all the same); any other failure while running ends with one line and status 1.
``tune``'s status is 1 when no configuration met the goal. Ctrl-C ends the run in
progress and keeps the runs that finished (:mod:`.interrupts`): ``bench`` prints and
writes them as usual, marked interrupted, and ``tune``'s results file holds them; then
the command says it was interrupted on stderr and exits with status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from ..log_limits import plural
from . import BenchError, interrupts, tune
from .blas import one_blas_thread
from .configs import describe_fields, parse_config, parse_strategy
from .inputs import RequestSource, check_full_batch, parse_inputs
from .loads import MAX_CLIENTS, Bounds, Load, check_arrivals, drain_window, schedule_of
from .models import (
    BUILTIN_MODELS,
    DEFAULT_FIXED_MS,
    Model,
    check_model,
    error_text,
    make_model,
)
from .outputs import check_distinct, check_writable
from .sweep import CAPACITY_CLIENTS, DEFAULT_FRACTIONS, capacity_clients
from .targets import Batchproc, BatchprocAsync, NoBatching

log = logging.getLogger(__name__)

PROG = "batchproc"
DEFAULT_CLIENTS = 64
DEFAULT_REQUESTS = 20_000
DEFAULT_DURATION_S = 5.0
DEFAULT_SWEEP_S = 2.0
DEFAULT_TUNE_S = 1.0
DEFAULT_BUDGET_S = 120.0

DESCRIPTION = """\
Run the same load three ways -- through batchproc, with no batching (the model called
on each request) and the limit (the model called back to back on full batches) -- and
print throughput, latency percentiles, mean batch size and batchproc's ratios.

With no flags: the `fixed` model (5 ms per call behind one lock, like one GPU),
64 closed-loop clients, each run bounded by 20000 requests or 5 s.
"""

EPILOG = """\
With --sweep: open-loop Poisson loads at fractions of the measured capacity
(--loads), each system's latency against its achieved throughput (--plot draws
the curve).

examples:
  batchproc bench
  batchproc bench --sweep --plot curve.png
  batchproc bench --sweep --model mypkg.serving:predict --input int64:1x8..128
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


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
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


def _list_of(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(s: str) -> list[Any]:
        parts = [p.strip() for p in s.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}")
        return [item(p) for p in parts]

    return parse


def _strategy_name(s: str) -> str:
    """A strategy as the library reads it (name or value, any case), kept as its value."""
    try:
        return str(parse_strategy(s).value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _strategy_values() -> list[str]:
    from batchproc import BatchProcessingStrategy

    return [str(s.value) for s in BatchProcessingStrategy]


def _nonneg_float(s: str) -> float:
    return _float(s, allow_zero=True)


MAX_MODEL_MS = 3_600_000.0  # an hour per call: past it, a typo (and past time_t's range)


def _model_ms(s: str) -> float:
    v = _nonneg_float(s)
    if v > MAX_MODEL_MS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_MODEL_MS:,.0f} (an hour), "
                                         f"got {s}")
    return v


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model and requests")
    m.add_argument(
        "--model", default="fixed", metavar="NAME",
        help=f"{', '.join(BUILTIN_MODELS)} or package.module:callable, a batch function "
        "taking what --input describes (default: fixed); mlp takes float32 rows of one "
        "width, --features or --input's",
    )
    m.add_argument(
        "--model-ms", type=_model_ms, default=DEFAULT_FIXED_MS, metavar="MS",
        help=f"cost per call of the fixed model (default: {DEFAULT_FIXED_MS:g})",
    )
    m.add_argument(
        "--features", type=_positive_int, default=None, metavar="N",
        help="requests are one row of N float32 features (default: 64, unless --input)",
    )
    m.add_argument(
        "--input", action="append", metavar="SPEC",
        help="what a request is: DTYPE:SHAPE (float32:1x3x224x224; a dimension LO..HI is "
        "ragged, on axis 0 or 1: int64:1x8..128), NAME=DTYPE:SHAPE once per named input, "
        "or FILE.npz of sample requests (docs/tuning.md)",
    )


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

    _add_model_arguments(b)

    ld = b.add_argument_group("load (one of --clients, --rate, --burst)")
    shape = ld.add_mutually_exclusive_group()
    shape.add_argument(
        "--clients", type=_positive_int, metavar="N",
        help=f"closed loop: N threads, each submits and waits (default: {DEFAULT_CLIENTS}; "
        f"at most {MAX_CLIENTS:,})",
    )
    shape.add_argument(
        "--rate", type=_positive_float, metavar="R",
        help="open loop: Poisson arrivals at R requests/s from one thread (R x the "
        "duration of them a run, at most 2,000,000)",
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
        "--duration", type=_positive_float, default=None, metavar="S",
        help=f"... or after S seconds, whichever comes first (default: {DEFAULT_DURATION_S:g};"
        f" with --sweep, {DEFAULT_SWEEP_S:g} per load)",
    )
    ld.add_argument("--seed", type=_nonneg_int, default=0,
                    help="seed (>= 0) for data, arrivals, priorities")

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
        "--strategy", type=_strategy_name, default="adaptive",
        help=f"processing_strategy: {', '.join(_strategy_values())}, any case "
        "(default: adaptive)",
    )
    c.add_argument(
        "--config", action="append", metavar="FIELDS",
        help="one more batchproc system: BatchProcessorConfig fields, 'max_batch_size=32, "
        "batch_timeout=0.002', or the BatchProcessorConfig(...) that tune prints "
        "(repeatable)",
    )

    sw = b.add_argument_group("sweep (the latency-throughput curve)")
    sw.add_argument(
        "--sweep", action="store_true",
        help="run open-loop Poisson loads at fractions of the capacity instead of one load",
    )
    sw.add_argument(
        "--loads", type=_list_of(_positive_float), default=None, metavar="F,F,...",
        help="offered loads, fractions of the capacity (default: "
        f"{','.join(f'{f:g}' for f in DEFAULT_FRACTIONS)})",
    )
    sw.add_argument(
        "--capacity", type=_positive_float, default=None, metavar="R",
        help="the capacity in requests/s (default: measured, batchproc under a closed loop "
        f"of 2 x --max-batch clients, at most {CAPACITY_CLIENTS}, for one run's duration)",
    )

    o = b.add_argument_group("output")
    o.add_argument(
        "--json", metavar="FILE",
        help="write the raw figures as JSON: keys date, machine, versions, settings, "
        "runs (one object per system: system, throughput, p50_ms, p95_ms, p99_ms, "
        "mean_batch, completed, unfinished, refused, stopped_by, failed: the error of a "
        "run that raised, model_errors: the model's calls that raised or whose output "
        "batchproc refused, arrival_rate: an open loop's arrivals over their window, "
        "...), ratios (vs_no_batching, vs_limit; null when not given), "
        "ratios_not_compared (why a ratio is not given, by the same keys: a run failed "
        "or had errors, an open loop carried the load it was offered, the limit's "
        "batches were past --max-batch, ...), ratio_bounds (\"at least\" or \"at "
        "most\", by the same keys, where one run carried an open load the other fell "
        "behind on) and interrupted (true when Ctrl-C ended the runs: runs holds those "
        "that finished)",
    )
    o.add_argument(
        "--plot", metavar="FILE.png",
        help="draw p50 and p99 latency against achieved throughput (needs matplotlib: "
        "the plot extra), in the format the extension names (.png, .svg, .pdf, ...); "
        "with --sweep, one curve per system",
    )
    _add_log_arguments(o)
    _add_tune_parser(sub)
    return parser


def _add_log_arguments(o: Any) -> None:
    o.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    o.add_argument("-v", "--verbose", action="store_true", help="log batchproc at INFO")


TUNE_DESCRIPTION = """\
Search static configurations (max batch size, max delay, workers, strategy) of your
model for the best at a target load (--rate) or an SLO (--p99-ms), compare it with the
default configuration (ADAPTIVE), and print it as Python to paste.

Each configuration runs open-loop Poisson arrivals for --duration seconds, all on the
same arrivals at a load. With --rate: the best carries the load (achieves 90% of it, no
errors, the model never raising; p99 within --p99-ms if given) with the lowest p99. With
--p99-ms alone: the best carries the highest load within the SLO (loads are fractions
of a measured capacity). The best few and the default are then rerun on fresh arrivals
and the verdict is taken on medians. The search ends within --budget seconds; --json
FILE keeps every run, and rerunning with the same FILE measures only what is missing.
"""

TUNE_EPILOG = """\
examples:
  batchproc tune --model fixed --p99-ms 20 --budget 60 --json tune.json
  batchproc tune --model mypkg.serving:predict --input float32:1x128 --rate 2000
  batchproc tune --model fixed --rate 3000 --p99-ms 15 --sizes 16,32,64 --strategies fixed
"""


def _add_tune_parser(sub: Any) -> None:
    t = sub.add_parser(
        "tune",
        help="search static configurations of your model for the best at a load or SLO",
        description=TUNE_DESCRIPTION,
        epilog=TUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(t)
    g = t.add_argument_group("goal (one or both)")
    g.add_argument("--rate", type=_positive_float, metavar="R",
                   help="target load: offered requests/s (Poisson) to carry")
    g.add_argument("--p99-ms", type=_positive_float, metavar="MS",
                   help="SLO: the highest p99 latency allowed, in ms")
    sp = t.add_argument_group("search space (comma-separated lists)")
    sp.add_argument("--sizes", type=_list_of(_positive_int), metavar="N,...",
                    default=list(tune.DEFAULT_SIZES),
                    help="max_batch_size values, in rows (default: "
                    f"{','.join(map(str, tune.DEFAULT_SIZES))})")
    sp.add_argument("--delays-ms", type=_list_of(_nonneg_float), metavar="MS,...",
                    default=list(tune.DEFAULT_DELAYS_MS),
                    help="batch_timeout values, in ms (default: "
                    f"{','.join(f'{d:g}' for d in tune.DEFAULT_DELAYS_MS)})")
    sp.add_argument("--workers", type=_list_of(_positive_int), metavar="N,...",
                    default=list(tune.DEFAULT_WORKERS),
                    help="max_workers values (default: "
                    f"{','.join(map(str, tune.DEFAULT_WORKERS))})")
    sp.add_argument("--strategies", type=_list_of(_strategy_name), metavar="S,...",
                    default=list(tune.DEFAULT_STRATEGIES),
                    help="processing_strategy values, any case (default: "
                    f"{','.join(tune.DEFAULT_STRATEGIES)})")
    r = t.add_argument_group("run")
    r.add_argument("--duration", type=_positive_float, default=DEFAULT_TUNE_S, metavar="S",
                   help=f"seconds per run (default: {DEFAULT_TUNE_S:g})")
    r.add_argument("--budget", type=_positive_float, default=DEFAULT_BUDGET_S, metavar="S",
                   help="start no run that could end past S seconds from the search's "
                   "start (the model loaded: loading it is not counted); one too small "
                   "for a run is refused, saying the least (default: "
                   f"{DEFAULT_BUDGET_S:g})")
    r.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seed (>= 0) for requests, arrivals and the search order; "
                   "confirming reruns take fresh arrivals derived from it")
    o = t.add_argument_group("output")
    o.add_argument("--json", metavar="FILE",
                   help="results file, written after every run; rerun with the same FILE "
                   "to resume (runs it holds are not measured again)")
    _add_log_arguments(o)


def _version() -> str:
    from batchproc import __version__

    return str(__version__)


def _describe_model(name: str, model_ms: float) -> str:
    if name == "fixed":
        return f"fixed ({model_ms:g} ms per call, one lock)"
    if name == "mlp":
        return "mlp (features->256->256->16, float32)"
    if name == "identity":
        return "identity (pure overhead)"
    return name


def settings_from(
    args: argparse.Namespace, source: RequestSource | None = None
) -> tuple[Load, Bounds, dict[str, Any]]:
    features = args.features or 64
    common = {"priorities": args.priorities, "features": features, "seed": args.seed,
              "source": source}
    if args.rate is not None:
        load = Load("rate", rate=args.rate, **common)
    elif args.burst is not None:
        load = Load("burst", burst=args.burst, **common)
    else:
        load = Load("closed", clients=args.clients or DEFAULT_CLIENTS, **common)
    duration = args.duration or DEFAULT_DURATION_S
    requests = args.requests
    if requests is None and load.kind != "burst":
        requests = DEFAULT_REQUESTS
    bounds = Bounds(requests=requests, duration=duration)
    plan = schedule_of(load, bounds)  # refuses a schedule past MAX_ARRIVALS
    expected = plan.n if plan is not None else requests
    assert expected is not None
    queue_size = max(1000, load.n_threads, min(expected, 1_000_000))
    settings = {
        "model": args.model,
        "model_ms": args.model_ms if args.model == "fixed" else None,
        "features": features if not args.input else None,
        "input": source.to_dict() if source is not None else None,
        "load": {"kind": load.kind, "clients": load.clients if load.kind == "closed" else None,
                 "rate": load.rate or None, "burst": load.burst or None,
                 "priorities": load.priorities, "seed": load.seed},
        "requests": bounds.requests,
        "duration_s": bounds.duration,
        "max_batch": args.max_batch,
        "max_delay_ms": args.max_delay,
        "workers": args.workers,
        "strategy": args.strategy,
        "configs": [describe_fields(c) for c in _configs(args, source)],
        "asyncio": args.asyncio,
        "queue_size": queue_size,
    }
    return load, bounds, settings


def _configs(args: argparse.Namespace, source: RequestSource | None) -> list[dict[str, Any]]:
    """Each --config's fields, checked over the fields the bench adds for ``source``."""
    base = _source_fields(source)
    return [parse_config(text, base) for text in args.config or ()]


def _source_fields(source: RequestSource | None) -> dict[str, Any]:
    """What every batchproc system is given for ``source``'s requests: ``pad_value=0``
    when they are ragged (batchproc needs one to batch them)."""
    return {"pad_value": 0} if source is not None and source.padded else {}


def _model_and_source(args: argparse.Namespace) -> tuple[Model, RequestSource]:
    """The model and what it is sent, checked on batches of one and two requests."""
    source = parse_inputs(args.input, args.features)
    return _model_for(args, source), source


def _model_for(args: argparse.Namespace, source: RequestSource) -> Model:
    """The model, checked on batches of one and two of ``source``'s requests and on a
    full batch (``--max-batch``; tune: the largest of ``--sizes``), once that batch is
    known to fit (:func:`~.inputs.check_full_batch`: ``BenchError`` if not)."""
    max_batch = args.max_batch if hasattr(args, "max_batch") else max(args.sizes)
    check_full_batch(source, max_batch, "--max-batch" if hasattr(args, "max_batch")
                     else "--sizes")
    model = make_model(args.model, model_ms=args.model_ms, source=source)
    check_model(model, source, name=f"--model {args.model}", seed=args.seed,
                max_batch=max_batch)
    try:
        import batchproc

        batchproc.BatchProcessor  # noqa: B018
    except (ImportError, AttributeError) as exc:
        raise BenchError(f"batchproc's BatchProcessor is not importable: {exc}") from None
    return model


def _check_outputs(args: argparse.Namespace) -> None:
    from . import report

    # Checked when given at all: an empty name is refused, not taken for "none".
    if getattr(args, "plot", None) is not None:
        check_writable("--plot", args.plot)
        try:
            report.check_plot_path("--plot", args.plot)
        except report.PlotUnavailable as exc:
            raise BenchError(str(exc)) from None
    if args.json is not None:
        check_writable("--json", args.json)
    files = [("--input", spec) for spec in args.input or () if spec.endswith(".npz")]
    files += [(flag, path) for flag, path in (("--json", args.json),
                                               ("--plot", getattr(args, "plot", None)))
              if path is not None]
    check_distinct(files)


def _write_output(command: str, flag: str, path: str, write: Callable[[str], None],
                  doc: dict[str, Any] | None = None, *,
                  unwritten: list[dict[str, Any]]) -> bool:
    """Write one output after the runs, before the table is printed. A write that fails
    (a full disk, a plot format whose writer fails) is one line on stderr, and the
    figures are not lost: ``doc``, the JSON the file was to hold, is added to
    ``unwritten``, printed after the table (:func:`_print_unwritten`). False when it
    failed."""
    # A plot's writer may fail its own way (matplotlib, a program it runs); a JSON file's
    # only the file system's: anything else there is a bug of this command, raised.
    failures = (OSError,) if doc is not None else (Exception,)
    try:
        write(path)
    except failures as exc:
        then = "; the JSON follows on stdout" if doc is not None else ""
        why = (exc.strerror or str(exc) if isinstance(exc, OSError)
               else error_text(exc))
        print(f"{PROG} {command}: error: {flag} {path}: could not be written "
              f"({why}), left as it was{then}", file=sys.stderr)
        unwritten.append(doc or {})
        return False
    return True


def _print_unwritten(unwritten: Sequence[dict[str, Any]]) -> None:
    """The JSON of the files that could not be written, after the table on stdout."""
    from . import report

    for doc in unwritten:
        if doc:
            print(report.json_text(doc), end="")


def _bench_targets(
    args: argparse.Namespace, source: RequestSource, queue_size: int
) -> list[Batchproc]:
    """batchproc from the flags, then one per --config (the flags' settings, its own
    fields over them); padded when requests are ragged."""
    pad = _source_fields(source)

    def system(cls: type[Batchproc], fields: dict[str, Any], name: str | None) -> Batchproc:
        fields = {**pad, **fields}
        if "max_batch_size" in fields and "initial_batch_size" not in fields:
            # The flags' initial size is their --max-batch: the config's own max holds.
            fields["initial_batch_size"] = fields["max_batch_size"]
        target = cls(
            max_batch=args.max_batch,
            max_delay=args.max_delay / 1000.0,
            workers=args.workers,
            strategy=args.strategy,
            priorities=args.priorities,
            queue_size=queue_size,
            fields=fields,
            name=name,
        )
        try:
            target.config()
        except (ValueError, TypeError) as exc:
            which = "" if name is None else f" ({name}: its fields over the flags')"
            raise BenchError(f"batchproc rejects this configuration{which}: {exc}"
                             ) from None
        return target

    bp = system(BatchprocAsync if args.asyncio else Batchproc, {}, None)
    configs = [system(Batchproc, c, f"config {i}")
               for i, c in enumerate(_configs(args, source), 1)]
    return [bp, *configs]


def _config_notes(args: argparse.Namespace, source: RequestSource) -> list[str]:
    notes = []
    for i, c in enumerate(_configs(args, source), 1):
        own = describe_fields(c)
        notes.append(f"config {i}: {own}; the rest from the flags" if own
                     else f"config {i}: the flags' settings")
    return notes


def _title(args: argparse.Namespace, source: RequestSource, load_desc: str) -> str:
    return (
        f"{_describe_model(args.model, args.model_ms)} · {load_desc} · {source.description}"
        f" · max batch {args.max_batch}, max delay {args.max_delay:g} ms, strategy "
        f"{args.strategy}" + (f", {args.workers} workers" if args.workers else "")
    )


def run_bench(args: argparse.Namespace) -> int:
    from . import report
    from .runner import run_limit, run_target

    if args.sweep:
        return run_sweep(args)
    for flag in ("loads", "capacity"):
        if getattr(args, flag) is not None:
            raise BenchError(f"--{flag} goes with --sweep")
    _check_outputs(args)
    model, source = _model_and_source(args)
    load, bounds, settings = settings_from(args, source if args.input else None)
    systems = _bench_targets(args, source, settings["queue_size"])
    bound_desc = (
        f"{bounds.requests:,} requests or {bounds.duration:g} s" if bounds.requests
        else f"{bounds.duration:g} s"
    )
    title = _title(args, source, load.label) + f" · each run stops at {bound_desc}"
    runs = []
    settle = drain_window(bounds.duration or 0.0)
    with _progress_display(args.quiet) as progress, interrupts.keep_finished() as stop:
        for target in (*systems, NoBatching()):
            runs.append(run_target(target, model, args.model, load, bounds, progress,
                                   settle_s=settle))
        runs.append(run_limit(model, args.model, load, bounds, args.max_batch, progress))
    if stop.interrupted and not runs:
        return _interrupted(args)
    ratios = report.bench_ratios(runs, subject=systems[0].name)
    not_compared = report.bench_not_compared(runs, subject=systems[0].name)
    ratio_bounds = report.bench_ratio_bounds(runs, subject=systems[0].name)
    failed = [r for r in runs if _run_failed(r)]
    # The files first: the table goes to a stdout that may be closed (`| head`).
    unwritten: list[dict[str, Any]] = []
    if args.plot:
        _write_output("bench", "--plot", args.plot, lambda path: report.write_plot(
            path, {r.system: [r] for r in runs},
            f"{_describe_model(args.model, args.model_ms)} · {load.label}",
            f"{source.description}; max batch {args.max_batch}, max delay "
            f"{args.max_delay:g} ms, {args.strategy}. One load: bench --sweep draws the curve.",
        ), unwritten=unwritten)
    if args.json:
        doc = {
            "date": report.now_iso(),
            "machine": report.machine_info(),
            "versions": report.versions(),
            "settings": settings,
            "runs": [r.to_dict() for r in runs],
            "ratios": ratios,
            "ratios_not_compared": not_compared,
            "ratio_bounds": ratio_bounds,
            "interrupted": stop.interrupted,
        }
        _write_output("bench", "--json", args.json, lambda path: report.write_json(path, doc),
                      doc, unwritten=unwritten)
    with _stdout_may_close():
        report.print_bench_table(title, runs, ratios, not_compared=not_compared,
                                 ratio_bounds=ratio_bounds)
        for line in _config_notes(args, source):
            print(line)
        if stop.interrupted:
            print(interrupts.NOTE)
        _print_unwritten(unwritten)
    _report_failed_runs("bench", runs)
    _report_idle_runs("bench", runs)
    if stop.interrupted:
        return _interrupted(args)
    return 1 if failed or unwritten else 0


def _report_failed_runs(command: str, runs: Sequence[Any], level: str = "error") -> None:
    """Lines on stderr for the runs that raised and the runs in which the model failed
    (the table's notes have them too): the reason should not hide among the figures.
    Runs that failed the same way share a line; so do the runs of one first model error.
    ``runs``: ``RunResult``s, or anything with their ``system``, ``failed``, ``batches``,
    ``model_errors`` and ``first_model_error``."""
    from . import report

    say = f"{PROG} {command}: {level}:"
    for failure, same in _grouped(runs, lambda r: r.failed):
        if len(same) == 1:
            print(f"{say} the {same[0].system} run failed: {failure}", file=sys.stderr)
        else:
            print(f"{say} {len(same)} runs failed, the {same[0].system} run first: "
                  f"{failure}", file=sys.stderr)
    for _, same in _grouped(runs, lambda r: r.first_model_error if r.model_errors else None):
        if len(same) == 1:
            print(f"{say} the {same[0].system} run: {report.model_failed(same[0])}",
                  file=sys.stderr)
        else:
            calls = sum(r.model_errors for r in same)
            print(f"{say} the model failed in {len(same)} runs ({calls:,} calls), first "
                  f"in the {same[0].system} run: {same[0].first_model_error}",
                  file=sys.stderr)


def _run_failed(r: Any) -> bool:
    """A ``RunResult`` that makes the command's status 1: it failed, had errors, its model
    raised, or it completed no request."""
    return bool(r.errors or r.failed or r.model_errors or not r.completed)


def _report_idle_runs(command: str, runs: Sequence[Any]) -> None:
    """The line on stderr for the ``RunResult``s that completed no request, neither
    failed nor with errors (:func:`_report_failed_runs` has those): a model that hung,
    or a duration too short for any request; the command exits with status 1 for them
    too."""
    say = f"{PROG} {command}: error:"
    idle = [r for r in runs
            if not r.completed and not r.failed and not r.errors and not r.model_errors]
    if not idle:
        return
    if len(idle) == 1:
        r = idle[0]
        why = (f"{r.unfinished:,} unfinished when it ended" if r.unfinished
               else "none was sent within its duration")
        print(f"{say} the {r.system} run completed no request ({why})", file=sys.stderr)
        return
    systems = ", ".join(system + (f" ({len(same)})" if len(same) > 1 else "")
                        for system, same in _grouped(idle, lambda r: r.system))
    unfinished = sum(r.unfinished for r in idle)
    why = (f"{plural(unfinished, 'request')} unfinished when they ended" if unfinished
           else "none was sent within their duration")
    print(f"{say} {plural(len(idle), 'run')} completed no request ({systems}; {why})",
          file=sys.stderr)


def _grouped(runs: Sequence[Any], key: Callable[[Any], str | None],
             ) -> list[tuple[str, list[Any]]]:
    """``runs`` grouped by ``key`` (None left out), in the order of each group's first."""
    groups: dict[str, list[Any]] = {}
    for r in runs:
        k = key(r)
        if k is not None:
            groups.setdefault(k, []).append(r)
    return list(groups.items())


@contextlib.contextmanager
def _stdout_may_close() -> Iterator[None]:
    """Printing to a standard output the reader has closed (``| head -1``) ends what is
    printed, not the command: the rest of stdout goes nowhere, and the command ends as it
    would have (its files are written, its errors still on stderr, its exit status)."""
    try:
        yield
    except BrokenPipeError:
        _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    import os

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def run_sweep(args: argparse.Namespace) -> int:
    """``bench --sweep``: capacity, then each system at each offered load."""
    from . import report, sweep

    for flag, value in (("--clients", args.clients), ("--rate", args.rate),
                        ("--burst", args.burst), ("--requests", args.requests)):
        if value is not None:
            raise BenchError(f"--sweep sets the loads itself (--loads); {flag} does not apply")
    for flag, on in (("--asyncio", args.asyncio), ("--priorities", args.priorities)):
        if on:
            raise BenchError(f"{flag} does not go with --sweep")
    _check_outputs(args)
    fractions = sorted(set(args.loads or DEFAULT_FRACTIONS))
    duration = args.duration or DEFAULT_SWEEP_S
    capacity = args.capacity
    if capacity is not None:
        check_arrivals(capacity * fractions[-1], duration,
                       f"--capacity {args.capacity:g} at the highest of --loads "
                       f"({fractions[-1]:g})")
    model, source = _model_and_source(args)
    with _progress_display(args.quiet) as progress:
        capacity_run = None
        if capacity is None:
            probe = _bench_targets(args, source, 1000)[0]
            capacity_run = sweep.measure_capacity(
                probe, model, args.model, source, clients=capacity_clients(args.max_batch),
                duration=duration, seed=args.seed, progress=progress)
            if not capacity_run.completed:
                raise BenchError(sweep.no_capacity(capacity_run, duration))
            capacity = capacity_run.throughput
            check_arrivals(capacity * fractions[-1], duration,
                           f"the measured capacity, {capacity:,.0f} req/s, at the highest "
                           f"of --loads ({fractions[-1]:g})")
        queue_size = sweep.queue_size_for(capacity * fractions[-1], duration)
        systems = [*_bench_targets(args, source, queue_size), NoBatching()]
        result = sweep.run_sweep(
            systems, model, args.model, source, fractions=fractions, capacity=capacity,
            duration=duration, seed=args.seed, capacity_run=capacity_run, progress=progress)
    if result.interrupted and not result.points:
        return _interrupted(args)
    title = _title(args, source, f"Poisson loads, {duration:g} s each")
    unwritten: list[dict[str, Any]] = []
    if args.plot:
        sub = (f"{source.description}; batchproc: max batch {args.max_batch}, max delay "
               f"{args.max_delay:g} ms, {args.strategy}"
               + (f", {args.workers} workers" if args.workers else "")
               + "".join(f"; {n}" for n in _config_notes(args, source))
               + f". Open loop, Poisson, {duration:g} s per load, "
               f"{', '.join(f'{f:g}' for f in fractions)} x capacity "
               f"({report.fmt_rate(capacity)} req/s).")
        plot_title = f"Latency vs throughput: {_describe_model(args.model, args.model_ms)}"
        _write_output("bench", "--plot", args.plot, lambda path: (
            sweep.write_sweep_plot(path, result, plot_title, sub)), unwritten=unwritten)
    if args.json:
        doc = {
            "date": report.now_iso(),
            "machine": report.machine_info(),
            "versions": report.versions(),
            "settings": {
                "model": args.model,
                "model_ms": args.model_ms if args.model == "fixed" else None,
                "input": source.to_dict(),
                "fractions": fractions,
                "duration_s": duration,
                "max_batch": args.max_batch,
                "max_delay_ms": args.max_delay,
                "workers": args.workers,
                "strategy": args.strategy,
                "configs": [describe_fields(c) for c in _configs(args, source)],
                "seed": args.seed,
                "queue_size": queue_size,
            },
            **sweep.to_json(result),
        }
        _write_output("bench", "--json", args.json, lambda path: report.write_json(path, doc),
                      doc, unwritten=unwritten)
    with _stdout_may_close():
        sweep.print_sweep(title, result, _config_notes(args, source))
        _print_unwritten(unwritten)
    runs = [p.run for pts in result.points.values() for p in pts]
    if capacity_run is not None:
        runs.insert(0, capacity_run)
    _report_failed_runs("bench", runs)
    _report_idle_runs("bench", runs)
    if result.interrupted:
        return _interrupted(args)
    return 1 if any(_run_failed(r) for r in runs) or unwritten else 0


def run_tune(args: argparse.Namespace) -> int:
    """``tune``: search the space, print the table, the verdict and the config."""

    goal = tune.Goal(rate=args.rate, p99_ms=args.p99_ms)
    if args.rate is not None:
        check_arrivals(args.rate, args.duration,
                       f"--rate {args.rate:g} for --duration {args.duration:g}")
    _check_outputs(args)
    source = parse_inputs(args.input, args.features)
    results = tune.ResultsFile(args.json, tune_identity(args, source))
    space = tune.candidates(args.sizes, args.delays_ms, args.workers, args.strategies,
                            seed=args.seed)
    # The model and the inputs first (what is wrong with them stays wrong whatever the
    # budget), by the check every command makes before its runs; then the budget.
    model = _model_for(args, source)
    tune.check_budget(goal, args.duration, args.budget, results, len(space) + 1)
    with _progress_display(args.quiet) as progress:
        result = tune.Tuner(
            model, args.model, source, goal, space, duration=args.duration,
            budget=args.budget, results=results, seed=args.seed, progress=progress,
        ).run()
    if result.interrupted:  # the results file holds what finished; a rerun continues
        _report_unwritten_results(args, results, shown=False)
        return _interrupted(args)
    title = (f"batchproc tune: {_describe_model(args.model, args.model_ms)} · "
             f"{source.description} · goal: {goal.describe()} · {args.duration:g} s per run")
    with _stdout_may_close():
        tune.print_result(title, result)
    # Why runs failed, or the model raised: with nothing meeting the goal, the reason.
    _report_failed_runs("tune", tune.failure_reports(result.records),
                        "error" if result.best is None else "warning")
    if _report_unwritten_results(args, results):
        return 1
    return 0 if result.best is not None else 1


def tune_identity(args: argparse.Namespace, source: RequestSource) -> dict[str, Any]:
    """What makes ``tune``'s runs comparable, kept in its results file: a file of other
    settings (an ``.npz`` of other contents, under the same name too) is refused."""
    return {
        "model": args.model,
        "model_ms": args.model_ms if args.model == "fixed" else None,
        "input": source.to_dict(),
        "duration_s": args.duration,
        "seed": args.seed,
    }


def _report_unwritten_results(args: argparse.Namespace, results: tune.ResultsFile,
                              shown: bool = True) -> bool:
    """The line on stderr for a ``tune`` results file whose last write failed (``shown``:
    the search's result was printed); whether there was one."""
    if results.write_error is None:
        return False
    print(f"{PROG} tune: error: --json {args.json}: could not be written "
          f"({results.write_error}); it holds {plural(results.saved_runs, 'run')}, from its last "
          "write that succeeded" + ("; the search's result is above" if shown else ""),
          file=sys.stderr)
    return True


def _interrupted(args: argparse.Namespace) -> int:
    """The line on stderr of a command Ctrl-C ended (``tune``: how to continue its
    search), and its exit status."""
    hint = f"; {tune.how_to_continue(args.json)}" if args.command == "tune" else ""
    print(f"{PROG} {args.command}: interrupted{hint}", file=sys.stderr)
    return interrupts.EXIT_STATUS


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record, around the
    progress display (``display``) while one shows: its line is taken off before the
    record and drawn again after, so neither breaks into the other."""

    display: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        display = self.display
        if display is None:
            super().emit(record)
            return
        with display.paused():
            super().emit(record)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _cli_handler() -> _StderrHandler | None:
    logger = logging.getLogger("batchproc")
    return next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)


def _configure_logging(verbose: bool) -> None:
    """The CLI owns its process, but configures only batchproc's logger, never the root."""
    logger = logging.getLogger("batchproc")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if _cli_handler() is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        logger.addHandler(handler)


@contextlib.contextmanager
def _progress_display(quiet: bool) -> Iterator[Any]:
    """The progress display for the runs, and batchproc's log records written around it
    while it shows."""
    from . import report

    progress = report.make_progress(quiet)
    handler = _cli_handler()
    if handler is not None:
        handler.display = progress
    try:
        yield progress
    finally:
        if handler is not None:
            handler.display = None
        progress.close()


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
    command = f"{PROG} {args.command}"
    try:
        with one_blas_thread(args.model, command):
            return run_tune(args) if args.command == "tune" else run_bench(args)
    except BenchError as exc:
        # One line, whatever a message quoted (a user's exception, a path).
        print(f"{command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the runs or after them (the runs keep theirs)
        return _interrupted(args)
    except Exception as exc:  # never a traceback for the user; the log keeps it
        log.debug("%s failed", args.command, exc_info=True)
        print(f"{command}: error: {error_text(exc)}", file=sys.stderr)
        return 1

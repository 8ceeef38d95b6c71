"""Output of a benchmark: the table (rich or plain text), markdown, JSON, the plot, and
the progress display. Only the CLI and the peer-comparison script call these.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import math
import os
import platform
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TextIO

from ..log_limits import plural
from .outputs import replace_file
from .runner import LIMIT, RunResult

COLUMNS = ("system", "req/s", "p50 ms", "p95 ms", "p99 ms", "mean batch", "requests")


# -- environment -------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
    }


def versions(extra: Sequence[str] = ()) -> dict[str, str | None]:
    """Python, numpy, batchproc and the named distributions (None when not installed)."""
    from importlib import metadata

    import numpy

    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
    }
    for dist in ("batchproc", *extra):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def results_header(title: str, command: str) -> str:
    """A results file's head (markdown): its title, the date, the machine and the
    ``command`` that made it."""
    m = machine_info()
    return (f"# {title}\n\n- date: {now_iso()}\n"
            f"- machine: {m['cpu']}, {m['cores']} cores, {m['platform']}\n"
            f"- command: `{command}`")


def doc_header_lines(title: str, doc: dict[str, Any]) -> list[str]:
    """A results file's head (markdown lines) from its JSON document: the title, then
    ``doc``'s date, machine, versions, command and wall time (``wall_s``, seconds), and
    a warning where ``doc["smaller"]`` is true (a run smaller than the script's
    defaults)."""
    mach = doc["machine"]
    wall = doc["wall_s"]
    took = (f"{wall:.1f} s" if wall < 10 else f"{wall:.0f} s" if wall < 120
            else f"{wall / 60:.1f} min")
    return [
        f"# {title}",
        "",
        f"- date: {doc['date']}",
        f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['platform']}",
        "- versions: " + ", ".join(f"{k} {v or 'not installed'}"
                                   for k, v in doc["versions"].items()),
        f"- command: `{doc['command'].strip()}` (wall time {took})",
        *(["- **a run smaller than the script's defaults: not for quoting**"]
          if doc.get("smaller") else []),
    ]


# -- numbers ------------------------------------------------------------------------------


def fmt_ms(v: float) -> str:
    if v is None or math.isnan(v):
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_rate(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:,.0f}"


def fmt_ratio(v: float | None) -> str:
    if v is None or math.isnan(v) or math.isinf(v):
        return "-"
    if v < 0.1:
        return f"{v:.2g}x"
    if v < 10:
        return f"{v:.2f}x"
    return f"{v:.1f}x" if v < 100 else f"{v:,.0f}x"


def fmt_requests(r: RunResult) -> str:
    """Completed requests, ``+ N late`` for those left unfinished; ``*`` marks a run
    ended by its time bound (see run_notes)."""
    s = fmt_completed(r)
    if r.stopped_by == "duration":
        s += " *"
    return s


def fmt_completed(r: RunResult) -> str:
    """Completed requests, ``+ N late`` for those left unfinished and ``+ N refused``
    for those the system refused."""
    return (f"{r.completed:,}" + (f" + {r.unfinished:,} late" if r.unfinished else "")
            + (f" + {r.refused:,} refused" if r.refused else ""))


def run_notes(runs: Sequence[RunResult], time_bound: bool = True) -> list[str]:
    """Footnotes for the table: failed runs, runs their time bound ended (unless not
    ``time_bound``: a sweep's table marks none), errors, unfinished and refused requests,
    and what the limit's latencies are."""
    notes = []
    for r in runs:
        who = f"{r.system} ({r.model}, {r.load})"
        if r.failed:
            notes.append(f"! {who}: the run failed: {r.failed}")
        if time_bound and r.stopped_by == "duration":
            notes.append(f"* {who}: stopped by the time bound; it took {r.elapsed_s:.1f} s, "
                         "the requests in flight at the bound included")
        if r.errors:
            notes.append(f"! {who}: {plural(r.errors, 'request')} failed, first: "
                         f"{r.first_error}")
        if r.unfinished:
            notes.append(
                f"! {who}: {plural(r.unfinished, 'request')} (late) unfinished when the run "
                "ended, not counted as completed; their wait until the end of the drain "
                "counts in its latencies")
        if r.refused:
            notes.append(
                f"! {who}: {plural(r.refused, 'request')} refused at submit, not counted as "
                f"completed nor in its latencies; first: {r.first_refusal}")
        if r.model_errors:
            notes.append(f"! {who}: {model_failed(r)}")
        if r.too_short:
            notes.append(
                f"! {who}: its arrivals all came within its quickest request's time: too "
                "short a run to show a rate (its req/s tells nothing of what it sustains); "
                "not compared")
        span = window_stretched(r)
        if span is not None:
            notes.append(
                f"* {who}: req/s counts its completed arrivals over {span:.3g} s, its "
                "window stretched to its completions (its last requests waited longer "
                "than its first: it fell behind)")
        if r.started_beside:
            notes.append(
                f"! {who}: started while {_calls_left(r.started_beside)} still running; its "
                "throughput is not compared")
        if r.left_running:
            notes.append(
                f"! {who}: {plural(r.left_running, 'model call')} still running at the end "
                "of the run; a run after it waits for them first, while they keep ending")
    if any(r.system == LIMIT and not r.failed for r in runs):
        notes.append(f"{LIMIT}: the model called back to back on full batches, no queue: "
                     "its latencies are one call's, not a request's wait")
    for r in runs:
        over = r.extra.get("rows_over_max_batch") if r.system == LIMIT else None
        if over:
            notes.append(
                f"! {LIMIT}: no request fits a batch of --max-batch rows, so its batches "
                f"are whole requests, of up to {over:,} rows; batchproc cuts such requests "
                "into chunks of --max-batch rows: the two are not compared at one batch size")
    return notes


def model_failed(r: Any) -> str:
    """How often the model failed in run ``r`` (a ``RunResult``): raised, or returned an
    output the system refused; and the first error."""
    calls = (f"{r.model_errors:,} of {r.batches:,} calls" if r.batches
             else plural(r.model_errors, "call"))
    return f"the model failed in {calls}, first: {r.first_model_error}"


def offered_note(r: RunResult) -> str | None:
    """What an open loop offered: its arrivals over their window, and what its
    throughput counts."""
    if r.scheduled is None or not r.window_s or r.arrival_rate is None:
        return None
    return (f"offered: {plural(r.scheduled, 'arrival')} over {r.window_s:.3g} s = "
            f"{fmt_rate(r.arrival_rate)} req/s; req/s: completed arrivals over that window")


def stretched_span(r: RunResult) -> float | None:
    """The seconds an open loop's req/s counts over where that is longer than its
    arrivals' window (:func:`.loads.open_span`: it fell behind); None otherwise."""
    if not r.window_s or r.throughput <= 0 or r.failed:
        return None
    span = r.completed / r.throughput
    return span if span > r.window_s * (1 + 1e-9) else None


def window_stretched(r: RunResult) -> float | None:
    """:func:`stretched_span` where its note is given (not for a run too short to show
    a rate, which has a note of its own)."""
    return None if r.too_short else stretched_span(r)


def fmt_throughput(r: RunResult) -> str:
    """req/s; ``*`` marks one counted over a stretched window (see run_notes)."""
    return fmt_rate(r.throughput) + (" *" if window_stretched(r) is not None else "")


def row_cells(r: RunResult) -> list[str]:
    if r.failed:
        return [r.system, "failed", "-", "-", "-", "-", "-"]
    return [
        r.system,
        fmt_throughput(r),
        fmt_ms(r.p50_ms),
        fmt_ms(r.p95_ms),
        fmt_ms(r.p99_ms),
        f"{r.mean_batch:.1f}",
        fmt_requests(r),
    ]


def not_compared(a: RunResult | None, b: RunResult | None) -> str | None:
    """Why the throughputs of runs ``a`` and ``b`` are not compared (None: they are, or
    a run is missing). A run that failed has no throughput, nor has one that completed
    no request. A run with errors (requests that failed, calls of the model that
    failed) did other work than a run without, and each system does its own with a
    failure: batchproc retries the call after a backoff and searches its batch, no
    batching fails the request at once, the limit fails its run. So a ratio is given
    only between two runs without errors. A run that started while calls of the model
    an earlier run left were still running shared the machine with them. An open loop
    whose arrivals all came within one request's time shows no rate it sustains, fast
    system or slow (``RunResult.too_short``). A limit whose batches were whole requests
    larger than ``--max-batch`` (none fitted) ran at another batch size than batchproc.
    An open loop that kept up with its arrivals (its completions within their window:
    :func:`stretched_span`) ran at the load's pace,
    not its own: against a run at its own pace (the limit, a closed loop) the ratio
    would be the load's share of that run's throughput, and against another that kept up
    it would be 1 (both carried the load). One that fell behind ran at its own, and is
    compared (:func:`ratio_bound` says where the ratio is a bound)."""
    if a is None or b is None:
        return None
    failed = [r.system for r in (a, b) if r.failed]
    if failed:
        return f"the {' and the '.join(failed)} run failed"
    idle = [r.system for r in (a, b) if not (r.completed and r.throughput > 0)]
    if idle:
        return f"the {' and the '.join(idle)} run completed no request"
    over = next((r.extra["rows_over_max_batch"] for r in (a, b)
                 if r.system == LIMIT and r.extra.get("rows_over_max_batch")), None)
    if over:
        return (f"the {LIMIT}'s batches were whole requests of up to {over:,} rows, past "
                "--max-batch, where batchproc runs chunks of --max-batch rows")
    short = [r.system for r in (a, b) if r.too_short]
    if short:
        whose = "runs'" if len(short) == 2 else "run's"
        return (f"the {' and the '.join(short)} {whose} arrivals all came within one "
                "request's time: too short a run to show a rate")
    paced = [r.system for r in (a, b) if r.arrival_rate is None]
    carried = [(r.system, rate) for r in (a, b) if (rate := carried_load(r)) is not None]
    if paced and carried:
        system, rate = carried[0]
        return (f"the {system} run carried the {fmt_rate(rate)} req/s offered (its "
                f"throughput is the load's), the {paced[0]} run went at its own pace")
    if len(carried) == 2:
        return (f"both runs carried the {fmt_rate(carried[0][1])} req/s offered (their "
                "throughput is the load's)")
    beside = [r for r in (a, b) if r.started_beside]
    if beside:
        return "; ".join(
            f"the {r.system} run started while {_calls_left(r.started_beside)} still running"
            for r in beside)
    erred = [r.system for r in (a, b) if r.errors or r.model_errors]
    if not erred:
        return None
    which = "both runs" if len(erred) == 2 else f"the {erred[0]} run"
    return (f"errors in {which} (a ratio compares only runs without failed requests or "
            "model calls)")


def carried_load(r: RunResult) -> float | None:
    """The req/s an open loop offered where the run kept up with it (its completions
    within their window), so that its throughput is the load's and its own pace is that
    or more; None for a run at its own pace, or an open loop that fell behind."""
    if r.arrival_rate is None or stretched_span(r) is not None:
        return None
    return r.arrival_rate


def ratio_bound(a: RunResult | None, b: RunResult | None) -> str | None:
    """Where ``a``'s throughput over ``b``'s (:func:`ratio`) bounds the ratio of their
    own paces rather than measuring it: "at least" when ``a`` carried an open load that
    ``b`` fell behind on (``a``'s own pace is the load's or more), "at most" the other
    way round; None where the ratio is the paces' (or not given)."""
    if ratio(a, b) is None:
        return None
    assert a is not None and b is not None
    kept_up = carried_load(a) is not None, carried_load(b) is not None
    if kept_up == (True, False):
        return "at least"
    if kept_up == (False, True):
        return "at most"
    return None


def _calls_left(count: int) -> str:
    """``3 model calls an earlier run left running were``."""
    return (f"{plural(count, 'model call')} an earlier run left running "
            f"{'was' if count == 1 else 'were'}")


def ratio(a: RunResult | None, b: RunResult | None) -> float | None:
    """``a``'s throughput over ``b``'s; None where it means nothing: a run missing, or
    the two not compared (:func:`not_compared` says why)."""
    if a is None or b is None or not_compared(a, b):
        return None
    return a.throughput / b.throughput


# The ratios `batchproc bench` gives, by key: the subject's throughput over this system's.
BENCH_RATIOS = {"vs_no_batching": "no batching", "vs_limit": LIMIT}


def bench_ratios(runs: Sequence[RunResult], subject: str = "batchproc") -> dict[str, float | None]:
    """``subject``'s throughput over no batching's and over the limit's (:func:`ratio`)."""
    by = {r.system: r for r in runs}
    return {key: ratio(by.get(subject), by.get(other)) for key, other in BENCH_RATIOS.items()}


def bench_ratio_bounds(runs: Sequence[RunResult], subject: str = "batchproc") -> dict[str, str]:
    """Which ratios of :func:`bench_ratios` are bounds (:func:`ratio_bound`), by the same
    keys: "at least" or "at most"."""
    by = {r.system: r for r in runs}
    bounds = {}
    for key, other in BENCH_RATIOS.items():
        bound = ratio_bound(by.get(subject), by.get(other))
        if bound is not None:
            bounds[key] = bound
    return bounds


def bench_not_compared(runs: Sequence[RunResult], subject: str = "batchproc") -> dict[str, str]:
    """Why a ratio of :func:`bench_ratios` is not given, by the same keys: a run not
    measured (Ctrl-C ended the command before it), or :func:`not_compared`'s reason."""
    by = {r.system: r for r in runs}
    reasons = {}
    for key, other in BENCH_RATIOS.items():
        missing = [name for name in (subject, other) if name not in by]
        why = (f"the {' and the '.join(missing)} run not measured" if missing
               else not_compared(by[subject], by[other]))
        if why is not None:
            reasons[key] = why
    return reasons


# -- text table ---------------------------------------------------------------------------


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1
) -> str:
    """A markdown table; the first ``text_columns`` columns align left, numbers right."""

    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    out = ["| " + " | ".join(map(esc, headers)) + " |"]
    out.append("|" + "|".join("---" if i < text_columns else "---:" for i in range(len(headers)))
               + "|")
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(out)


def have_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def print_table(
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    notes: Sequence[str] = (),
    out: TextIO | None = None,
    use_rich: bool | None = None,
) -> None:
    """A title, a table (rich when installed, else plain text) and lines of notes. The
    first and last columns align left, the others (numbers) right. Nothing when there is
    no standard output (closed at the start, ``>&-``: ``sys.stdout`` is None)."""
    out = out if out is not None else sys.stdout
    if out is None:
        return
    if use_rich is None:
        use_rich = have_rich()
    if use_rich:
        from rich.console import Console
        from rich.table import Table

        table = Table()
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i in (0, len(headers) - 1) else "right")
        for cells in rows:
            table.add_row(*cells)
        class _Console(Console):
            def on_broken_pipe(self) -> None:
                # rich would exit (status 1); the caller decides (cli._stdout_may_close).
                self.quiet = True
                raise BrokenPipeError

        console = _Console(file=out, width=None if out.isatty() else 120)
        # Lines of text are not wrapped at the console's width: a log or a file keeps them
        # whole; only the table is fitted to it.
        console.print(title, highlight=False, soft_wrap=True)
        console.print(table)
        for s in notes:
            console.print(s, highlight=False, soft_wrap=True)
    else:
        print(title, file=out)
        print(plain_table(headers, rows), file=out)
        for s in notes:
            print(s, file=out)


def print_bench_table(
    title: str,
    runs: Sequence[RunResult],
    ratios: dict[str, float | None],
    out: TextIO | None = None,
    use_rich: bool | None = None,
    not_compared: Mapping[str, str] | None = None,
    ratio_bounds: Mapping[str, str] | None = None,
) -> None:
    """The ``batchproc bench`` table and the two ratios below it; a ratio
    ``not_compared`` has a reason (:func:`bench_not_compared`) says it instead, and one
    that is a bound (``ratio_bounds``: :func:`bench_ratio_bounds`) says so and why."""
    rows = [row_cells(r) for r in runs]
    lines = [n.replace(f" ({runs[0].model}, {runs[0].load})", "") for n in run_notes(runs)]
    for r in runs:
        if r.by_priority:
            lines.append(f"{r.system} latency by priority (p50 / p99 ms): " + ", ".join(
                f"{k} {fmt_ms(v['p50_ms'])} / {fmt_ms(v['p99_ms'])}"
                for k, v in r.by_priority.items()))
    offered = next((n for r in runs if (n := offered_note(r)) is not None), None)
    if offered is not None:
        lines.insert(0, offered)
    subject = runs[0].system if runs else "batchproc"
    why = not_compared or {}
    by = {r.system: r for r in runs}

    def compared(key: str) -> str:
        if key in why:
            return f"not compared: {why[key]}"
        text = f"{fmt_ratio(ratios.get(key))} throughput"
        bound = (ratio_bounds or {}).get(key)
        if bound is None:
            return text
        carrier = subject if bound == "at least" else BENCH_RATIOS[key]
        return (f"{bound} {text} (the {carrier} run carried the "
                f"{fmt_rate(carried_load(by[carrier]) or 0.0)} req/s offered: its own pace "
                "is that or more)")

    lines += [
        f"{subject} vs no batching: {compared('vs_no_batching')}",
        f"{subject} vs the limit:   {compared('vs_limit')}",
    ]
    print_table(title, COLUMNS, rows, lines, out, use_rich)


# -- JSON and plot ------------------------------------------------------------------------


def _clean(v: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def json_text(doc: dict[str, Any]) -> str:
    """``doc`` as the JSON files hold it: NaN and infinities as null, indented."""
    return json.dumps(_clean(doc), indent=2, allow_nan=False) + "\n"


def write_json(path: str, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` whole or not at all (``OSError`` if it cannot be)."""
    text = json_text(doc)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    replace_file(path, write)


def smaller_than_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace,
                          sizes: Sequence[str]) -> bool:
    """Whether any of the ``sizes`` arguments (dest names) is below its default."""
    return any(getattr(args, size) < parser.get_default(size) for size in sizes)


def write_results(out_dir: str, name: str, markdown: str, doc: dict[str, Any]) -> None:
    """Write ``<name>.md`` and ``<name>.json`` into ``out_dir`` (made if missing), print the
    table, and say on stderr where both went: the end of every comparison script."""
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"{name}.md")
    json_path = os.path.join(out_dir, f"{name}.json")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown)
    write_json(json_path, doc)
    print(markdown)
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)


class PlotUnavailable(RuntimeError):
    pass


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install matplotlib (the plot extra)"
        ) from None


def plot_formats() -> dict[str, str]:
    """The file formats matplotlib can write: extension (no dot) to description."""
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    return dict(FigureCanvasBase.get_supported_filetypes())


def check_plot_path(flag: str, path: str) -> None:
    """Raise :class:`PlotUnavailable` (one line) unless matplotlib is installed and
    writes ``path``'s format on this machine: checked before any run, so a typo costs
    nothing. A format matplotlib knows may need a program it runs for text (``.pgf``: a
    TeX system), so a figure holding a word is written in it, in memory."""
    formats = plot_formats()
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext not in formats:
        what = f"format {ext!r} is not supported" if ext else "it has no extension"
        raise PlotUnavailable(
            f"{flag} {path}: {what}; end it in one of "
            + ", ".join(f".{e}" for e in sorted(formats))
        )
    from matplotlib.figure import Figure

    probe = Figure(figsize=(1, 1))
    probe.text(0.5, 0.5, "probe")
    try:
        probe.savefig(io.BytesIO(), format=ext)
    except Exception as exc:
        raise PlotUnavailable(
            f"{flag} {path}: matplotlib cannot write .{ext} here ({type(exc).__name__}: "
            f"{exc}); .png, .svg and .pdf need nothing beyond matplotlib") from None


def write_plot(
    path: str,
    curves: Mapping[str, Sequence[RunResult]],
    title: str,
    subtitle: str = "",
) -> None:
    """Latency against achieved throughput: for each system, p99 (solid) and p50
    (dashed) through its runs in the order given (one run: one point of each).

    Both axes are logarithmic, throughput in requests/s and latency in ms. The title is
    wrapped to the figure's width and ``subtitle`` (settings) printed small below it.
    Raises :class:`PlotUnavailable` before drawing if ``path``'s format is not one
    matplotlib writes here (:func:`check_plot_path`); ``OSError`` if the file cannot be
    written (``path`` is then left as it was).
    """
    check_plot_path("plot", path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    drawn = False
    for i, (system, runs) in enumerate(curves.items()):
        pts = [r for r in runs if r.completed and r.throughput > 0 and r.p99_ms > 0]
        if not pts:
            continue
        drawn = True
        color = f"C{i % 10}"
        x = [r.throughput for r in pts]
        ax.plot(x, [r.p99_ms for r in pts], "-o", color=color, ms=5, label=f"{system} p99")
        ax.plot(x, [r.p50_ms for r in pts], "--s", color=color, ms=3.5, alpha=0.8,
                label=f"{system} p50")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("achieved throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    fig.suptitle("\n".join(textwrap.wrap(title, 70)), fontsize=11, fontweight="bold",
                 x=0.02, ha="left")
    if subtitle:
        ax.set_title("\n".join(textwrap.wrap(subtitle, 110)), fontsize=8, loc="left")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, ncols=2 if len(curves) > 2 else 1)
    else:  # nothing to draw (every run failed or completed nothing): say so
        ax.text(0.5, 0.5, "no run completed a request", transform=ax.transAxes,
                ha="center", va="center")
    fig.tight_layout()
    try:
        data = _rendered(fig, path)
    finally:
        plt.close(fig)
    replace_file(path, lambda tmp: _write_bytes(tmp, data))


def _rendered(fig: Any, path: str) -> bytes:
    """``fig`` in ``path``'s format, drawn in memory under ``path``'s base name: formats
    that record their file's name (gzip's header in ``.svgz``, PostScript's title) then
    never see the temporary file it is written to (``.svgz`` names ``path``)."""
    buf = io.BytesIO()
    buf.name = os.path.basename(path)
    fig.savefig(buf, dpi=120, format=os.path.splitext(path)[1].lstrip(".").lower())
    return buf.getvalue()


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


# -- progress -----------------------------------------------------------------------------


class PlainProgress:
    """One line per run on stderr: what runs, then how it ended.

    The line stays open while its run does; :meth:`paused` ends it (on a terminal,
    clears it) for whatever else must write to the stream, and draws it again after.
    """

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stderr
        self._t0 = 0.0
        self._line: str | None = None  # the open line: a run started, not finished
        # Runs report from the main thread, log records come from any thread.
        self._lock = threading.RLock()

    def start(self, label: str, total: int | None, duration: float | None) -> None:
        with self._lock:
            self._t0 = time.perf_counter()
            self._line = f"  {label} ..."
            print(self._line, end="", file=self.out, flush=True)

    def update(self, done: int) -> None:
        pass

    def finish(self, summary: str) -> None:
        with self._lock:
            self._line = None
            print(f" {summary} ({time.perf_counter() - self._t0:.1f} s)", file=self.out,
                  flush=True)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Take the open line off the stream for the block, then draw it again."""
        with self._lock:
            line = self._line
            if line is not None:
                tty = getattr(self.out, "isatty", lambda: False)()
                self.out.write("\r\x1b[2K" if tty else "\n")
                self.out.flush()
            try:
                yield
            finally:
                if line is not None:
                    self.out.write(line)
                    self.out.flush()

    def close(self) -> None:
        pass


class RichProgress:
    """A rich progress bar per run; a run bounded by time fills with the clock too."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._p = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._p.start()
        self._task: Any = None
        self._total: int | None = None
        self._dur: float | None = None
        self._t0 = 0.0

    def start(self, label: str, total: int | None, duration: float | None) -> None:
        self._total, self._dur, self._t0 = total, duration, time.perf_counter()
        self._task = self._p.add_task(label, total=1000, info="")

    def update(self, done: int) -> None:
        frac = done / self._total if self._total else 0.0
        if self._dur:
            frac = max(frac, (time.perf_counter() - self._t0) / self._dur)
        self._p.update(self._task, completed=min(frac, 1.0) * 1000, info=f"{done:,} done")

    def finish(self, summary: str) -> None:
        self._p.update(self._task, completed=1000, info=summary)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """rich's live display redirects ``sys.stderr`` while it runs: what is written
        there is printed above the bars, which are drawn again below it."""
        yield

    def close(self) -> None:
        self._p.stop()


def make_progress(quiet: bool = False) -> Any:
    from .runner import NullProgress

    if quiet:
        return NullProgress()
    if have_rich() and sys.stderr is not None and sys.stderr.isatty():
        return RichProgress()
    return PlainProgress()

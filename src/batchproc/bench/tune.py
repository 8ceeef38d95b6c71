"""``batchproc tune``: search static configurations of the user's model for the best one.

A *candidate* is a static configuration: ``max_batch_size`` (rows), ``batch_timeout``
(the longest wait, ms), ``max_workers`` and ``processing_strategy``. The search measures
candidates in a fixed shuffled order (random search covers a grid best when the budget
ends early), the library's default configuration (ADAPTIVE) first, as the reference.

Two goals:

- **a target load** (``rate``, optionally with ``p99_ms``): every candidate runs one
  open loop of Poisson arrivals at ``rate`` requests/s, on the same arrivals (one seed);
  it *meets* the target when it achieves at least :data:`SUSTAINED` of the load its run
  was offered (its arrivals over their window: ``rate``, to rounding; achieved: its
  completed arrivals over that window) without errors, nor the model raising (and,
  with an SLO, a p99 at or under it). The best meets it with the lowest p99.
- **an SLO alone** (``p99_ms``): the best carries the highest offered load with p99 at
  or under the SLO. Loads are steps of a ladder, fractions of a measured capacity
  (:data:`LADDER`); a candidate starts at the step the best so far reached and climbs
  while it meets the SLO, so one that cannot beat the best costs one run. A climb the
  budget cuts short still counts at the highest load met so far: it can only rise.

One ranking (:func:`_rank`) picks the best and orders the table, so the table's first
row that meets the goal is the verdict's.

Single short runs are noisy (one unlucky p99 can pick the wrong winner), so the search
ends by confirming its *finalists*, the :data:`FINALISTS` best and the default: each is
rerun at its deciding load until it has :data:`CONFIRM_RUNS` runs, each rerun on fresh
arrivals (draw 1, 2, ... of the seed: the same draw for every finalist), and the
verdict is taken on their medians. The search keeps room for this: the reruns of every
finalist it could have after its next run (those so far and one more, at most
:data:`FINALISTS`, and the default), at most :data:`CONFIRM_SHARE` of the budget. A
run is counted at its bound (duration, drain and stop), so the search does not overrun
its budget. A budget too small for one run is refused before anything runs
(:func:`check_budget`); the output says how far confirming went when the budget ended
it.

Results are written to the results file after every run, with the settings that make
them comparable (model, input, run duration, seed, capacity). Rerunning with the same
file reuses every run it holds, by candidate and offered load, and only measures what is
missing: a search cut short by its budget continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import random
import reprlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchproc import BatchProcessingStrategy, BatchProcessorConfig
from batchproc.config import _require_int, require_number

from ..log_limits import plural
from . import BenchError, report
from .configs import describe_fields, format_config, parse_strategy
from .inputs import RequestSource
from .interrupts import keep_finished
from .loads import MAX_ARRIVALS, Bounds, Load, drain_window
from .models import Model
from .runner import (
    NullProgress,
    Progress,
    RunResult,
    calls_left_behind,
    let_calls_end,
    run_target,
)
from .sweep import arrival_rate, capacity_clients, measure_capacity, no_capacity
from .targets import STOP_TIMEOUT_S, Batchproc

SUSTAINED = 0.9  # achieved at least this share of the offered load: it keeps up
LADDER = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5)
LADDER_GROWTH = 1.25  # past the last step: each step this much above the one before
LADDER_STEPS = 30  # ... up to this many steps in all
DEFAULT_SIZES = (8, 16, 32, 64, 128)
DEFAULT_DELAYS_MS = (1.0, 2.0, 5.0, 10.0)
DEFAULT_WORKERS = (1, 2, 4)
DEFAULT_STRATEGIES = ("adaptive", "fixed", "greedy")
FILE_KIND = "batchproc tune results"
# 2: an open loop's offered load is its arrivals over their window (the rate, to
# rounding), its throughput the completed arrivals over that window, and each run says
# how often the model raised; version 1's figures do not compare with these.
FILE_VERSION = 2
DEFAULT_KEY = "default"
DEFAULT_STRATEGY = "adaptive"  # the library's default processing_strategy
FINALISTS = 3  # the best configurations the search confirms, with the default
CONFIRM_RUNS = 3  # runs per finalist the verdict takes medians of
CONFIRM_SHARE = 1 / 3  # the most of the budget kept for confirming
# The queue holds this many seconds of the offered load. A configuration that falls
# further behind fails the goal anyway; a longer queue would only make its run drain
# for seconds of the budget. (Latency counts from each request's scheduled arrival, so
# a generator held up by a full queue is still charged for the wait.)
QUEUE_S = 0.25
# Time a search may take from the start of its budget to its first run (loading the
# results file, making the first target): the least budget leaves it.
START_S = 0.01


@dataclass(frozen=True)
class Candidate:
    """One static configuration. ``None`` fields keep the library's default."""

    strategy: str
    max_batch_size: int | None = None
    delay_ms: float | None = None
    max_workers: int | None = None

    def __post_init__(self) -> None:
        """Refuse what is no configuration, by the rules ``BatchProcessorConfig`` applies
        to the fields a candidate sets, under the candidate's own names.

        Raises:
            ValueError: naming the field (``ConfigTypeError``, a ``ValueError`` too, for
                a wrong type): ``strategy`` not a strategy's value (``"fixed"``); some
                but not all of the other fields set (only the default leaves them
                ``None``); a value the config refuses.
        """
        values = [str(s.value) for s in BatchProcessingStrategy]
        if not isinstance(self.strategy, str) or self.strategy not in values:
            raise ValueError(f"strategy must be one of {', '.join(map(repr, values))}, "
                             f"got {self.strategy!r}")
        settings = ("max_batch_size", "delay_ms", "max_workers")
        unset = [name for name in settings if getattr(self, name) is None]
        if len(unset) == len(settings):
            if self.strategy != DEFAULT_STRATEGY:
                raise ValueError(f"the default (no {', '.join(settings)}) is "
                                 f"{DEFAULT_STRATEGY!r}, got strategy {self.strategy!r}")
            return
        if unset:
            given = ", ".join(f"{name}={getattr(self, name)!r}" for name in settings
                              if name not in unset)
            raise ValueError(f"{given} without {', '.join(unset)}: a candidate sets all of "
                             f"{', '.join(settings)}, or none of them (the default)")
        _require_int("max_batch_size", self.max_batch_size, minimum=1)
        require_number("delay_ms", self.delay_ms, minimum=0.0)
        _require_int("max_workers", self.max_workers, minimum=1)
        BatchProcessorConfig(**self.fields())  # the config's other rules (upper bounds)

    @property
    def key(self) -> str:
        if self.max_batch_size is None:
            return DEFAULT_KEY
        return (f"{self.strategy}/size={self.max_batch_size}/delay_ms={self.delay_ms:g}"
                f"/workers={self.max_workers}")

    @property
    def label(self) -> str:
        if self.max_batch_size is None:
            return "default (ADAPTIVE)"
        wait = "no wait" if self.strategy == "greedy" else f"{self.delay_ms:g} ms"
        return (f"{self.strategy.upper()} {self.max_batch_size} rows, {wait}, "
                f"{self.max_workers} worker{'s' if self.max_workers != 1 else ''}")

    def fields(self) -> dict[str, Any]:
        """The ``BatchProcessorConfig`` fields this candidate sets (none for the default)."""
        if self.max_batch_size is None:
            return {}
        assert self.delay_ms is not None
        return {
            "max_batch_size": self.max_batch_size,
            "initial_batch_size": self.max_batch_size,
            "batch_timeout": round(self.delay_ms / 1000.0, 9),
            "max_workers": self.max_workers,
            "processing_strategy": parse_strategy(self.strategy),
        }


DEFAULT = Candidate(DEFAULT_STRATEGY)


def candidates(
    sizes: Sequence[int],
    delays_ms: Sequence[float],
    workers: Sequence[int],
    strategies: Sequence[str],
    seed: int = 0,
) -> list[Candidate]:
    """The grid, shuffled with ``seed``; GREEDY never waits, so only once per size and
    workers (with the first delay as its ``batch_timeout``).

    Raises:
        BenchError: one line, for a value no configuration takes (`Candidate`'s checks).
    """
    grid: dict[str, Candidate] = {}
    for strategy, size, delay, w in itertools.product(strategies, sizes, delays_ms, workers):
        if strategy == "greedy":
            delay = delays_ms[0]
        try:
            c = Candidate(strategy, size, float(delay), w)
        except ValueError as exc:
            raise BenchError(f"the search space holds what is no configuration: {exc}"
                             ) from None
        grid.setdefault(c.key, c)
    out = list(grid.values())
    random.Random(seed).shuffle(out)
    return out


@dataclass(frozen=True)
class Goal:
    """``rate``: the offered load to carry (requests/s); ``p99_ms``: the SLO."""

    rate: float | None = None
    p99_ms: float | None = None

    def __post_init__(self) -> None:
        if self.rate is None and self.p99_ms is None:
            raise BenchError("give a target load (--rate R), an SLO (--p99-ms MS), or both")

    def meets(self, m: dict[str, Any]) -> bool:
        """Whether a measurement (a results-file record) meets this goal: every request
        it was offered completed (none failed, late or refused), the model never raised
        (a retried call hides it), it achieved :data:`SUSTAINED` of the load its run was
        offered (its arrivals over their window), and its p99 is within the SLO."""
        if (m["errors"] or m["unfinished"] or m.get("refused") or m.get("model_errors")
                or m.get("started_beside") or not m["completed"]):
            return False
        if m["throughput"] < SUSTAINED * (m.get("arrival_rate") or m["offered"]):
            return False
        return self.p99_ms is None or (m["p99_ms"] is not None and m["p99_ms"] <= self.p99_ms)

    def describe(self) -> str:
        parts = []
        if self.rate is not None:
            parts.append(f"carry {report.fmt_rate(self.rate)} req/s offered (Poisson)")
        if self.p99_ms is not None:
            parts.append(f"p99 <= {self.p99_ms:g} ms")
        if self.rate is None:
            parts.append("at the highest load")
        return ", ".join(parts)



# -- the results file, read back -----------------------------------------------------------
# Everything a resumed search reads from the file is checked here, before anything runs:
# a damaged file is refused on one line naming the field, never a KeyError or a
# TypeError halfway through the search, nor a run it would measure again.


def _number(v: Any, *, minimum: float, allow_zero: bool = True,
            allow_null: bool = False) -> str | None:
    """What is wrong with a figure read back (a finite number, never a bool), if
    anything."""
    bound = f">= {minimum:g}" if allow_zero else f"> {minimum:g}"
    wanted = f"must be a finite number {bound}" + (", or null" if allow_null else "")
    if v is None and allow_null:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return wanted
    try:
        v = float(v)  # JSON's integers have no bound: one past a float's is no figure
    except OverflowError:
        return wanted
    if not math.isfinite(v) or v < minimum or (v == minimum and not allow_zero):
        return wanted
    return None


def _count(v: Any, minimum: int = 0) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        return f"must be a whole number >= {minimum}"
    return None


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def _line(v: Any) -> str | None:
    """A note the search wrote (an error, why a run failed): one line, as the report
    prints it, or null."""
    if v is None or (isinstance(v, str) and v.splitlines() in ([], [v])):
        return None
    return "must be one line of text, or null"


def _record(v: Any, allow_null: bool = False) -> str | None:
    if isinstance(v, dict) or (v is None and allow_null):
        return None
    return "must be a record" + (", or null" if allow_null else "")


_Check = Callable[[Any], "str | None"]
_FIGURE: _Check = functools.partial(_number, minimum=0.0, allow_null=True)

# Every field of a saved run (what ``Tuner._record`` writes) and what it must hold; a
# run that failed outright has no figures (null). ``candidate`` is a `Candidate`'s fields.
_SAVED_RUN_FIELDS: dict[str, _Check] = {
    "key": _text, "label": _text, "candidate": _record,
    "offered": functools.partial(_number, minimum=0.0, allow_zero=False),
    "arrival_rate": _FIGURE, "throughput": _FIGURE, "p50_ms": _FIGURE, "p95_ms": _FIGURE,
    "p99_ms": _FIGURE, "mean_ms": _FIGURE, "mean_batch": _FIGURE,
    "completed": _count, "errors": _count, "unfinished": _count, "refused": _count,
    "first_error": _line, "elapsed_s": _FIGURE, "failed": _line, "model_errors": _count,
    "first_model_error": _line,
}
# ... and what only a confirming rerun holds: which rerun it is; and what files written
# before it was recorded lack: the calls of the model earlier runs left running that were
# still running when the run started (it shared the machine with them).
_SAVED_RERUN_FIELDS: dict[str, _Check] = {"repeat": functools.partial(_count, minimum=1)}
_SAVED_LATER_FIELDS: dict[str, _Check] = {"started_beside": _count}
# Figures a run that completed requests has (the search compares and prints them).
_FIGURES_OF_COMPLETED = ("throughput", "mean_batch", "arrival_rate", "p50_ms", "p95_ms",
                         "p99_ms", "mean_ms", "elapsed_s")
# Slack for rounding and timing only, over a bound a real run sits at 1.00 of.
_SLACK = 1.5
# The share of a run's requests that took at least each percentile: latencies are never
# negative, so the mean is at least that share of the percentile.
_SHARE_AT_OR_ABOVE = {"p50_ms": 0.5, "p95_ms": 0.05, "p99_ms": 0.01}


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _goal(v: Any) -> str | None:
    if not isinstance(v, dict) or set(v) != {"rate", "p99_ms"}:
        return "must be a record of 'rate' and 'p99_ms'"
    if v["rate"] is None and v["p99_ms"] is None:
        return "must give 'rate', 'p99_ms' or both"
    for name in ("rate", "p99_ms"):
        wrong = _number(v[name], minimum=0.0, allow_zero=False, allow_null=True)
        if wrong is not None:
            return f"its {name!r} {wrong}"
    return None


# The fields of the summary of the file's last search and of where it ran (what
# ``ResultsFile.save`` writes beside the runs). They are not read back, but a file that
# holds them of another type was not written by the search.
_SAVED_SUMMARY_FIELDS: dict[str, _Check] = {
    "date": _text, "machine": _record, "versions": _record, "goal": _goal,
    "best": functools.partial(_record, allow_null=True),
    "default": functools.partial(_record, allow_null=True), "budget_spent": _flag,
    "interrupted": _flag,
}


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 100


def _shown(v: Any) -> str:
    """A value read back, for a one-line message (long ones cut short)."""
    return _SHOWN.repr(v)


def _damaged(path: str, what: str) -> BenchError:
    return BenchError(f"--json {path}: damaged: {what}; give another file to start afresh")


def _check_consistent(path: str, i: int, run: dict[str, Any], duration: float) -> None:
    """``BenchError`` for figures of one run of ``duration`` seconds that no run could
    have measured together: percentiles out of order, a mean below what they allow; a
    load no run offers (more than :data:`MAX_ARRIVALS` arrivals), arrivals far from the
    load asked; more requests completed, failed, left unfinished or refused than
    arrived; a throughput above its arrivals (an open loop's throughput is the completed
    arrivals of its window over that window), or not of its completed requests (more of
    them than it carries in its elapsed time, or none); an elapsed time or a latency
    longer than the run lasts; fewer than one row per call of the model in a run that
    completed requests."""
    latencies = [(name, run[name]) for name in ("p50_ms", "p95_ms", "p99_ms")
                 if run[name] is not None]
    for (low, a), (high, b) in zip(latencies, latencies[1:]):
        if a > b:
            raise _damaged(path, f"run {i} has {low!r} = {_shown(a)} above "
                           f"{high!r} = {_shown(b)}")
    offered = run["offered"]
    if offered * duration > MAX_ARRIVALS:
        raise _damaged(path, f"run {i} has 'offered' = {_shown(offered)}: a run of "
                       f"{duration:g} s at that load would offer more than "
                       f"{MAX_ARRIVALS:,} arrivals, and none is run")
    arrivals = run["arrival_rate"]
    if arrivals is not None and not (
            offered / _SLACK - 1 / duration <= arrivals <= offered * _SLACK + 1 / duration):
        raise _damaged(path, f"run {i} has 'arrival_rate' = {_shown(arrivals)}: its "
                       f"arrivals are the load asked ({_shown(offered)}/s), to rounding")
    bound = run_bound_s(duration)
    if run["elapsed_s"] is not None and run["elapsed_s"] > bound * _SLACK:
        raise _damaged(path, f"run {i} has 'elapsed_s' = {_shown(run['elapsed_s'])}, longer "
                       f"than a run of {duration:g} s lasts ({bound:.6g} s)")
    longest = max(bound, run["elapsed_s"] or 0.0) * 1000.0
    for name in ("p99_ms", "mean_ms"):
        if run[name] is not None and run[name] > longest * _SLACK:
            raise _damaged(path, f"run {i} has {name!r} = {_shown(run[name])}, longer than "
                           f"the run lasts ({longest:.6g} ms)")
    mean_ms = run["mean_ms"]
    if mean_ms is not None:
        for name, value in latencies:
            share = _SHARE_AT_OR_ABOVE[name]
            if mean_ms * _SLACK < value * share:
                raise _damaged(path, f"run {i} has 'mean_ms' = {_shown(mean_ms)}, below "
                               f"{share:.0%} of {name!r} = {_shown(value)}: {share:.0%} of "
                               "its requests took that long or longer")
    throughput, elapsed, completed = run["throughput"], run["elapsed_s"], run["completed"]
    if throughput is not None and elapsed and completed > throughput * elapsed * _SLACK + 1:
        raise _damaged(path, f"run {i} completed {plural(completed, 'request')}, more than "
                       f"its throughput ({_shown(throughput)}/s) carries in its "
                       f"{_shown(elapsed)} s")
    if throughput is not None and arrivals is not None and throughput > arrivals * _SLACK + 1:
        raise _damaged(path, f"run {i} has a throughput of {_shown(throughput)}/s, above "
                       f"the {_shown(arrivals)}/s that arrived")
    if throughput and not completed:  # completed requests over the seconds counted
        raise _damaged(path, f"run {i} has a throughput of {_shown(throughput)}/s, but "
                       "completed no request")
    rate = offered if arrivals is None else arrivals
    counted = sum(run[name] for name in ("completed", "errors", "unfinished", "refused"))
    if counted > rate * duration * _SLACK + 1:
        raise _damaged(path, f"run {i} counts {plural(counted, 'request')} completed, "
                       f"failed, unfinished or refused, more than the {_shown(rate)}/s "
                       f"that arrived in its {duration:g} s")
    mean = run["mean_batch"]
    if completed and mean is not None and mean < 1:
        raise _damaged(path, f"run {i} has 'mean_batch' = {_shown(mean)}, below one row "
                       f"per call, as it completed {plural(completed, 'request')}")


def _check_saved_run(path: str, i: int, run: Any, duration: float) -> None:
    """``BenchError`` naming what is wrong with run ``i`` of a results file, if anything:
    a field missing, of the wrong type or out of range, a candidate that is no
    configuration (`Candidate`'s own checks) or not the run's ``key`` and ``label``."""
    if not isinstance(run, dict):
        raise _damaged(path, f"run {i} is not a record: {_shown(run)}")
    for name, check in (*_SAVED_RUN_FIELDS.items(), *_SAVED_RERUN_FIELDS.items(),
                        *_SAVED_LATER_FIELDS.items()):
        if name not in run:
            if name in _SAVED_RERUN_FIELDS or name in _SAVED_LATER_FIELDS:
                continue
            raise _damaged(path, f"run {i} lacks {name!r}")
        wrong = check(run[name])
        if wrong is not None:
            raise _damaged(path, f"run {i} has {name!r} = {_shown(run[name])}: {wrong}")
    if run["completed"]:
        for name in _FIGURES_OF_COMPLETED:
            if run[name] is None:
                raise _damaged(path, f"run {i} has {name!r} = None: must be a number, "
                               f"as it completed {plural(run['completed'], 'request')}")
    if run.get("repeat", 0) >= CONFIRM_RUNS:
        raise _damaged(path, f"run {i} has 'repeat' = {_shown(run['repeat'])}: a finalist "
                       f"is rerun at most {CONFIRM_RUNS - 1} times")
    _check_consistent(path, i, run, duration)
    candidate = _saved_candidate(path, i, run["candidate"])
    size, mean = candidate.max_batch_size, run["mean_batch"]
    if size is None:  # the default: the library's
        size = BatchProcessorConfig().max_batch_size
    if mean is not None and mean > size:
        # A request larger than a batch is cut into chunks: no call holds more rows.
        raise _damaged(path, f"run {i} has 'mean_batch' = {_shown(mean)}, above its "
                       f"candidate's max_batch_size {size}")
    for name, own in (("key", candidate.key), ("label", candidate.label)):
        if run[name] != own:
            raise _damaged(path, f"run {i} has {name!r} = {_shown(run[name])}: its "
                           f"candidate's is {own!r}")


def _saved_candidate(path: str, i: int, fields: dict[str, Any]) -> Candidate:
    """The `Candidate` of run ``i``, by its own checks; ``BenchError`` naming the field."""
    names = [f.name for f in dataclasses.fields(Candidate)]
    for name in names:
        if name not in fields:
            raise _damaged(path, f"run {i} has a 'candidate' that lacks {name!r}")
    unknown = sorted(str(name) for name in fields if name not in names)
    if unknown:
        raise _damaged(path, f"run {i} has a 'candidate' with {unknown[0]!r}, a field "
                       "this version does not know")
    try:
        return Candidate(**fields)
    except ValueError as exc:
        raise _damaged(path, f"run {i} has a 'candidate' that is no configuration: "
                       f"{exc}") from None


def _saved_runs(path: str, doc: Any, identity: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A results file's runs by their `_run_key`, once the whole file is checked:
    ``BenchError`` naming what is wrong, if anything: its own fields (``kind``,
    ``version``, ``identity``, ``capacity``, ``runs``), a capacity no capacity run of the
    file's duration measures, a summary field of the wrong type, then each run
    (:func:`_check_saved_run`), a run saved twice; or saying which settings differ from
    ``identity`` (the search's, as JSON holds it). The summary of its last search is not
    read back."""
    if not isinstance(doc, dict):
        raise BenchError(f"--json {path}: not a file written by batchproc tune (it holds "
                         f"{_shown(doc)}, not a record)")
    if doc.get("kind") != FILE_KIND:
        got = (f"its 'kind' is {_shown(doc['kind'])}, not {FILE_KIND!r}" if "kind" in doc
               else "it has no 'kind'")
        raise BenchError(f"--json {path}: not a file written by batchproc tune ({got})")
    for name in ("version", "identity", "capacity", "runs"):
        if name not in doc:
            raise _damaged(path, f"the file lacks {name!r}")
    if type(doc["version"]) is not int or doc["version"] != FILE_VERSION:
        raise BenchError(f"--json {path}: written by another version of batchproc tune "
                         f"(its 'version' is {_shown(doc['version'])}; this one reads "
                         f"{FILE_VERSION}); give another file to start afresh")
    checks: dict[str, _Check] = {
        "identity": _record,
        "capacity": functools.partial(_number, minimum=0.0, allow_zero=False,
                                      allow_null=True),
        "runs": lambda v: None if isinstance(v, list) else "must be a list",
    }
    for name, check in checks.items():
        wrong = check(doc[name])
        if wrong is not None:
            raise _damaged(path, f"the file has {name!r} = {_shown(doc[name])}: {wrong}")
    saved = doc["identity"]
    for name in identity:
        if name not in saved:
            raise _damaged(path, f"'identity' lacks {name!r}")
    if _strict(saved) != _strict(identity):
        changed = sorted(k for k in set(identity) | set(saved)
                         if _strict(identity.get(k)) != _strict(saved.get(k)))
        raise BenchError(f"--json {path}: holds runs of other settings "
                         f"({', '.join(changed)}); give another file to start afresh")
    duration = float(identity["duration_s"])
    capacity = doc["capacity"]
    if capacity is not None and (_ladder_rate(capacity, 0) * duration > MAX_ARRIVALS
                                 or capacity * duration * _SLACK < 1):
        # What the capacity run measures, or the search refuses (Tuner._measure_capacity):
        # at least one request completed in its duration, and a lowest load a run offers.
        raise _damaged(path, f"the file has 'capacity' = {_shown(capacity)}: no capacity "
                       f"run of {duration:g} s measures it")
    for name, check in _SAVED_SUMMARY_FIELDS.items():
        if name in doc and (wrong := check(doc[name])) is not None:
            raise _damaged(path, f"the file has {name!r} = {_shown(doc[name])}: {wrong}")
    runs: dict[str, dict[str, Any]] = {}
    index: dict[str, int] = {}
    for i, run in enumerate(doc["runs"]):
        _check_saved_run(path, i, run, duration)
        # Looked up by float loads (``get``): an offered load saved as 300 is 300.0.
        key = _run_key(run["key"], float(run["offered"]), run.get("repeat", 0))
        if key in runs:
            raise _damaged(path, f"run {i} is run {index[key]} again (the same "
                           "configuration, load and repeat): which one was measured?")
        runs[key], index[key] = run, i
    return runs


def _strict(v: Any) -> str:
    """A value read back as JSON writes it: ``true``, ``1`` and ``1.0`` differ."""
    return json.dumps(v, sort_keys=True)


class ResultsFile:
    """The results file: written after every run, read back to resume.

    ``identity`` holds what makes runs comparable; a file written under another identity
    is refused rather than mixed in.
    """

    def __init__(self, path: str | None, identity: dict[str, Any]):
        self.path = path
        self.identity = identity
        self.capacity: float | None = None
        self.runs: dict[str, dict[str, Any]] = {}
        self.reused = 0
        self.doc: dict[str, Any] = {}
        self.write_error: str | None = None
        # An existing empty file (made by mktemp) is a new one: nothing to resume.
        if path and os.path.exists(path) and not _empty_file(path):
            self._load(path)
        self.saved_runs = len(self.runs)

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError, RecursionError) as exc:
            raise BenchError(f"--json {path}: cannot read it to resume: {exc}") from None
        self.runs = _saved_runs(path, doc, _jsonable(self.identity))
        self.capacity = doc["capacity"]

    def get(self, key: str, offered: float, repeat: int = 0) -> dict[str, Any] | None:
        return self.runs.get(_run_key(key, offered, repeat))

    def add(self, record: dict[str, Any]) -> None:
        self.runs[_run_key(record["key"], record["offered"], record.get("repeat", 0))] = record

    def save(self, summary: dict[str, Any]) -> None:
        """Write everything so far (atomically: a run cut short leaves the last file).
        A write that fails is kept in ``write_error`` (None after one that succeeds)."""
        if not self.path:
            return
        self.doc = {
            "kind": FILE_KIND,
            "version": FILE_VERSION,
            "date": report.now_iso(),
            "machine": report.machine_info(),
            "versions": report.versions(),
            "identity": self.identity,
            "capacity": self.capacity,
            **summary,
            "runs": list(self.runs.values()),
        }
        try:
            report.write_json(self.path, self.doc)
        except OSError as exc:
            # The search goes on: its result is printed at the end, and the file keeps
            # the runs of its last good write for a resume.
            self.write_error = f"{exc.strerror or exc}"
        else:
            self.write_error = None
            self.saved_runs = len(self.runs)


def _empty_file(path: str) -> bool:
    try:
        return os.path.isfile(path) and os.path.getsize(path) == 0
    except OSError:
        return False


def _run_key(key: str, offered: float, repeat: int) -> str:
    """A run's key in the results file: a confirming rerun (``repeat`` > 0) has its own."""
    return f"{key}@{offered!r}" + (f"#{repeat}" if repeat else "")


def run_bound_s(duration: float) -> float:
    """The longest one run of ``duration`` seconds takes: its duration, the drain of a
    configuration far behind its load, and stopping the processor."""
    return duration + drain_window(duration) + STOP_TIMEOUT_S


def least_budget(goal: Goal, duration: float, capacity_known: bool = False,
                 configurations: int = 1) -> tuple[float, float]:
    """The least ``--budget`` (s) with room for one configuration's run, rounded up to a
    tenth of a second (a whole second from 10 s), and about what measures each of
    ``configurations`` once. A run is counted at its bound (:func:`run_bound_s`), an SLO
    alone measures the capacity first (unless it is known), the search may use what the
    share kept for confirming finalists leaves, and it starts :data:`START_S` after the
    budget does."""
    run = run_bound_s(duration)
    first = run * (2 if goal.rate is None and not capacity_known else 1)
    every = first + run * (configurations - 1)
    share = 1 - CONFIRM_SHARE
    # The search keeps at most a third of the budget, and never more than every
    # finalist's reruns (Tuner._kept_for_confirming).
    confirming = _reruns_s(FINALISTS + 1, duration)
    return (_round_up(first / share + START_S),
            _round_up(min(every / share, every + confirming) + START_S))


def _reruns_s(finalists: int, duration: float) -> float:
    """The longest confirming ``finalists`` finalists takes: their reruns, each counted
    at its bound."""
    return finalists * (CONFIRM_RUNS - 1) * run_bound_s(duration)


def check_budget(goal: Goal, duration: float, budget: float, results: ResultsFile,
                 configurations: int) -> None:
    """Refuse a budget with room for no run, before anything runs, unless the results
    file holds the run the search starts with (a resumed search shows what it holds).

    Raises:
        BenchError: one line, with the least budget that measures a configuration.
    """
    capacity = results.capacity
    least, every = least_budget(goal, duration, capacity is not None, configurations)
    if budget >= least:
        return
    if goal.rate is not None:
        first = results.get(DEFAULT_KEY, float(goal.rate))
    else:
        first = None if capacity is None else results.get(
            DEFAULT_KEY, _ladder_rate(capacity, 0))
    if first is not None:
        return
    capacity_first = " (an SLO alone measures the capacity first)" if (
        goal.rate is None and capacity is None) else ""
    raise BenchError(
        f"--budget {budget:g} s is too small for one run{capacity_first}: a run is counted "
        f"as {run_bound_s(duration):.3g} s (--duration, its drain and stop) and up to a "
        f"third of the budget is kept for rerunning the finalists; give --budget {least:g} or "
        f"more (about {every:g} s measures each of the {configurations} configurations "
        "once)")


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(report._clean(v)))


@dataclass
class TuneResult:
    goal: Goal
    best: dict[str, Any] | None  # the best candidate's deciding run (a record)
    default: dict[str, Any] | None  # the default's deciding run
    records: list[dict[str, Any]]  # every run this search looked at, in order
    measured: int  # runs measured now (the rest came from the results file)
    reused: int
    candidates_done: int
    candidates_total: int
    budget_spent: bool
    capacity: float | None
    padded: bool = False  # the requests are ragged: the config needs pad_value
    cut_short: str | None = None  # the key of the candidate whose climb the budget ended
    budget: float = math.inf  # the search's budget, in seconds
    run_s: float = 0.0  # what one run is counted as: its duration, drain and stop
    results_path: str | None = None  # the --json results file, None when not given
    duration: float = 0.0  # seconds per run (--duration)
    # The finalists' medians over their runs (``runs``: how many), by key.
    confirmed: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Ctrl-C ended the search: the results file holds every run that finished.
    interrupted: bool = False


class Tuner:
    """Runs the search; ``measure(candidate, offered)`` is one run (or a reused one)."""

    def __init__(
        self,
        model: Model,
        model_name: str,
        source: RequestSource,
        goal: Goal,
        space: Sequence[Candidate],
        *,
        duration: float,
        budget: float,
        results: ResultsFile,
        seed: int = 0,
        progress: Progress | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.model, self.model_name, self.source = model, model_name, source
        self.goal, self.space = goal, list(space)
        self.duration, self.budget = duration, budget
        self.results, self.seed, self.progress = results, seed, progress
        self.clock = clock
        self.measured = 0
        self.reused = 0
        self.records: list[dict[str, Any]] = []
        self._end = clock() + budget
        self._confirming = False
        self._done = 0
        self._total = len(self.space) + 1
        self.capacity: float | None = results.capacity

    # -- one run -------------------------------------------------------------------------

    def _target(self, c: Candidate, offered: float) -> Batchproc:
        from batchproc import BatchProcessorConfig

        base = BatchProcessorConfig()
        fields = c.fields()
        if not fields:  # the library's defaults, all of them
            fields = {"max_batch_size": base.max_batch_size,
                      "initial_batch_size": base.initial_batch_size,
                      "batch_timeout": base.batch_timeout,
                      "max_workers": base.max_workers,
                      "processing_strategy": base.processing_strategy}
        if self.source.padded:
            fields["pad_value"] = 0
        queue_size = max(1000, int(offered * QUEUE_S))
        return Batchproc(queue_size=queue_size, fields=fields, name=c.label)

    def _room(self) -> float:
        """Seconds of the budget left after the next run, counted at its bound, and the
        time kept for confirming (while searching)."""
        kept = 0.0 if self._confirming else self._kept_for_confirming()
        return self._end - self.clock() - run_bound_s(self.duration) - kept

    def _room_for_a_run(self) -> bool:
        """Whether the budget has room for the next run. The calls of the model an earlier
        run left running (the run would wait for them first: ``runner.let_calls_end``)
        are waited for here, only as long as the room lasts."""
        room = self._room()
        if room >= 0.0 and calls_left_behind():
            let_calls_end(self.progress or NullProgress(), time.perf_counter() + room)
            room = self._room()
        return room >= 0.0

    def _kept_for_confirming(self) -> float:
        """Seconds the search leaves for confirming: the reruns of every finalist it could
        have after one more run (the configurations that met the goal so far, one more,
        up to FINALISTS, and the default), at most CONFIRM_SHARE of the budget: sized by
        what was found, so that a search in which only the default meets the goal goes
        on measuring instead of keeping time for finalists it has not found."""
        met = {r["key"] for r in _deciding_of(self.goal, self.records)
               if self.goal.meets(r)} - {DEFAULT_KEY}
        finalists = min(FINALISTS, len(met) + 1) + 1
        return min(_reruns_s(finalists, self.duration), self.budget * CONFIRM_SHARE)

    def measure(self, c: Candidate, offered: float, repeat: int = 0) -> dict[str, Any] | None:
        """The run of ``c`` at ``offered`` requests/s (``repeat`` > 0: a confirming
        rerun): from the results file, else measured now; None when the budget has no
        room for it."""
        offered = float(offered)
        old = self.results.get(c.key, offered, repeat)
        if old is not None:
            self.reused += 1
            self.records.append(old)
            return old
        if not self._room_for_a_run():
            return None
        # Candidates at one load share its arrivals (draw 0); a confirming rerun gets
        # fresh ones, the same for every finalist (draw ``repeat``).
        load = Load("rate", rate=offered, source=self.source, seed=self.seed, draw=repeat)
        run = run_target(
            self._target(c, offered), self.model, self.model_name, load,
            Bounds(duration=self.duration), self.progress,
            label=(f"[{self._done + 1}/{self._total}] {c.label} @ {offered:,.0f} req/s"
                   if not repeat else f"[rerun {repeat}] {c.label} @ {offered:,.0f} req/s"),
        )
        record = self._record(c, offered, run)
        if repeat:
            record["repeat"] = repeat
        self.measured += 1
        self.results.add(record)
        self.records.append(record)
        self.results.save(self.summary())
        return record

    def _record(self, c: Candidate, offered: float, run: RunResult) -> dict[str, Any]:
        r = run.to_dict()
        record = {
            "key": c.key,
            "label": c.label,
            "candidate": dataclasses.asdict(c),
            "offered": offered,
            "arrival_rate": arrival_rate(run, self.duration, offered),
            **{k: r[k] for k in ("throughput", "p50_ms", "p95_ms", "p99_ms", "mean_ms",
                                 "mean_batch", "completed", "errors", "unfinished", "refused",
                                 "first_error", "elapsed_s", "failed", "model_errors",
                                 "first_model_error", "started_beside")},
        }
        return report._clean(record)  # type: ignore[no-any-return]

    # -- the search ----------------------------------------------------------------------

    def run(self) -> TuneResult:
        """Measure the default, then candidates in order until done or out of budget,
        then confirm the finalists. Ctrl-C ends the search (:mod:`.interrupts`): the
        result holds what was measured, ``interrupted`` set, and the results file every
        run that finished (it is saved once more: the interrupt may have cut a save
        short), so that a rerun with it continues."""
        best: tuple[Candidate, dict[str, Any], int] | None = None
        default: dict[str, Any] | None = None
        spent = False
        cut_short: str | None = None
        confirmed: dict[str, dict[str, Any]] = {}
        with keep_finished() as stop:
            if self.goal.rate is None and self.capacity is None:
                self._measure_capacity()
            for c in [DEFAULT, *self.space]:
                start = 0 if best is None or c is DEFAULT else best[2]
                outcome = self._evaluate(c, start)
                if outcome is None:
                    spent = True
                    break
                record, step, finished = outcome
                if c is DEFAULT:
                    default = record
                if record is not None and self.goal.meets(record) and (
                        best is None or _rank(self.goal, record) < _rank(self.goal, best[1])):
                    best = (c, record, step)
                if not finished:
                    spent, cut_short = True, c.key
                    break
                self._done += 1
            confirmed = self._confirm(default)
        if confirmed:
            finals = sorted(confirmed.values(), key=lambda r: _rank(self.goal, r))
            met = [r for r in finals if self.goal.meets(r)]
            pick = met[0] if met else None
            best = None if pick is None else (
                Candidate(**pick["candidate"]), pick, best[2] if best else 0)
            default = confirmed.get(DEFAULT_KEY, default)
        self.results.save(self.summary(best, default, spent, stop.interrupted))
        return TuneResult(
            self.goal, best[1] if best else None, default, self.records, self.measured,
            self.reused, self._done, self._total, spent, self.capacity, self.source.padded,
            cut_short, self.budget, run_bound_s(self.duration), self.results.path,
            self.duration, confirmed, stop.interrupted,
        )

    def _confirm(self, default: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        """Rerun the finalists (the FINALISTS best deciding runs that meet the goal, and
        the default's) at their deciding loads, up to CONFIRM_RUNS runs each, as far as
        the budget goes; their medians, by key."""
        self._confirming = True
        ranked = sorted((r for r in _deciding_of(self.goal, self.records)
                         if self.goal.meets(r)), key=lambda r: _rank(self.goal, r))
        finalists = ranked[:FINALISTS]
        if not finalists:
            return {}
        if default is not None and default["key"] not in {r["key"] for r in finalists}:
            finalists.append(default)
        runs = {r["key"]: [r] for r in finalists}
        for repeat in range(1, CONFIRM_RUNS):
            for r in finalists:
                # None: no room left for it. The finalists after it go on: their reruns
                # may be in the results file (a resumed search that found a new one).
                again = self.measure(Candidate(**r["candidate"]), r["offered"], repeat)
                if again is not None:
                    runs[r["key"]].append(again)
        return {k: _median_record(v) for k, v in runs.items()}

    def _measure_capacity(self) -> None:
        biggest = max(c.max_batch_size or 0 for c in self.space) if self.space else 32
        run = measure_capacity(
            self._target(DEFAULT, 0.0), self.model, self.model_name, self.source,
            clients=capacity_clients(biggest, least=16), duration=self.duration, seed=self.seed,
            progress=self.progress, settle_s=STOP_TIMEOUT_S,
        )
        if not run.completed:
            raise BenchError(no_capacity(run, self.duration))
        if run.errors:
            raise BenchError(f"the model failed while measuring capacity: {run.first_error}")
        if _ladder_rate(run.throughput, 0) * self.duration > MAX_ARRIVALS:
            raise BenchError(
                f"the measured capacity, {report.fmt_rate(run.throughput)} req/s, would "
                f"offer more than {MAX_ARRIVALS:,} arrivals in a run at its lowest load: "
                "lower --duration")
        self.capacity = self.results.capacity = run.throughput
        self.results.save(self.summary())

    def _evaluate(self, c: Candidate, start: int,
                  ) -> tuple[dict[str, Any] | None, int, bool] | None:
        """(deciding record, ladder step, finished) of ``c``; None when out of budget
        before its first run. Not finished: the budget ended its climb after a run that
        met the SLO, which decides for now."""
        if self.goal.rate is not None:
            record = self.measure(c, self.goal.rate)
            return None if record is None else (record, 0, True)
        assert self.capacity is not None
        good: dict[str, Any] | None = None
        step = start
        last: dict[str, Any] | None = None
        finished = True
        while step < LADDER_STEPS:
            rate = _ladder_rate(self.capacity, step)
            if rate * self.duration > MAX_ARRIVALS:
                break  # the ladder ends where a run would offer too many arrivals
            record = self.measure(c, rate)
            if record is None:
                if good is None:
                    return None
                finished = False
                break
            last = record
            if not self.goal.meets(record):
                break
            good = record
            step += 1
        # Its deciding run: the highest load it met the SLO at (else the first it missed).
        return (good, step - 1, finished) if good is not None else (last, -1, finished)

    def summary(
        self,
        best: tuple[Candidate, dict[str, Any], int] | None = None,
        default: dict[str, Any] | None = None,
        spent: bool = False,
        interrupted: bool = False,
    ) -> dict[str, Any]:
        return {
            "goal": dataclasses.asdict(self.goal),
            "best": None if best is None else {
                "key": best[0].key,
                "config": describe_fields(config_fields(best[0], self.source.padded)),
                "run": best[1],
            },
            "default": default,
            "budget_spent": spent,
            "interrupted": interrupted,
        }


def config_fields(c: Candidate, padded: bool) -> dict[str, Any]:
    """The fields of the configuration ``tune`` prints for ``c``: its own, and
    ``pad_value=0`` when the requests are ragged."""
    fields = c.fields()
    if padded:
        fields["pad_value"] = 0
    return fields


def ladder_fraction(step: int) -> float:
    """The offered load of ladder step ``step``, as a fraction of the capacity: the
    measured capacity can be low (a closed loop of threads is CPU-bound before the
    model is), so the ladder goes on past it while a candidate keeps meeting the SLO."""
    if step < len(LADDER):
        return LADDER[step]
    return LADDER[-1] * LADDER_GROWTH ** (step - len(LADDER) + 1)


def _ladder_rate(capacity: float, step: int) -> float:
    # Rounded so that the same capacity gives the same keys in the results file.
    return float(f"{capacity * ladder_fraction(step):.6g}")


# -- output --------------------------------------------------------------------------------

COLUMNS = ("config", "offered req/s", "achieved req/s", "p50 ms", "p99 ms", "mean batch",
           "meets")


def print_result(title: str, result: TuneResult, top: int = 10) -> None:
    """The table of the best runs, the verdict against the default, and the chosen
    configuration as Python (last, so it can be copied from the end of the output)."""
    goal = result.goal
    deciding = _deciding(result)
    # Confirmed finalists first: the verdict is the first of them that meets the goal.
    ranked = sorted(deciding, key=lambda r: (r["key"] not in result.confirmed,
                                             *_rank(goal, r)))
    shown = ranked[:top]
    if result.default is not None and result.default not in shown:
        shown.append(result.default)
    rows = [[
        r["label"], report.fmt_rate(_arrival_rate(r)), report.fmt_rate(r["throughput"]),
        report.fmt_ms(_nan(r["p50_ms"])), report.fmt_ms(_nan(r["p99_ms"])),
        _fmt_batch(r["mean_batch"]), "yes" if goal.meets(r) else "no",
    ] for r in shown]
    for row, r in zip(rows, shown):
        if r["key"] == result.cut_short:
            row[0] += " (cut short)"
        if r.get("runs", 1) > 1:
            row[0] += f" (median of {r['runs']})"
    notes = [
        f"runs: {result.measured} measured now, {result.reused} reused from the results "
        f"file; {result.candidates_done} of {result.candidates_total} configurations done"
        + (" (and 1 cut short)" if result.cut_short is not None else "")
        + (f" (budget spent: {_how_to_continue(result)})" if result.budget_spent else ""),
    ]
    if result.confirmed:
        notes.append(_confirmation_note(result))
    if result.cut_short is not None:
        notes.append("(cut short): the budget ended its climb; it met the goal up to the "
                     "load shown and may carry more")
    if result.capacity is not None and goal.rate is None:
        notes.append(f"capacity (default config, closed loop): "
                     f"{report.fmt_rate(result.capacity)} req/s; loads: "
                     + ", ".join(f"{f:g}" for f in LADDER) + f", then x{LADDER_GROWTH:g} a "
                     "step, x capacity")
    report.print_table(title, COLUMNS, rows, notes)
    print()
    best, default = result.best, result.default
    if best is None and not result.records:
        print(_nothing_measured(result))
        return
    if best is None:
        print(f"no configuration tried meets the goal ({goal.describe()})")
        return
    cut = " (cut short)" if best["key"] == result.cut_short else ""
    print(f"best: {best['label']}{cut}: {_verdict(best)}")
    if best["key"] == DEFAULT_KEY and all(r["key"] == DEFAULT_KEY for r in result.records):
        print("  only the default was measured: the budget ended before the search's "
              f"first run ({_how_to_continue(result)})")
    elif best["key"] == DEFAULT_KEY:
        print("  the default is the best configuration tried")
    elif default is not None:
        d = f"default (ADAPTIVE): {_verdict(default)}"
        if not goal.meets(default):
            d += " (misses the goal)"
        print(d)
        if goal.meets(default):
            print("  " + _compare(best, default, by_load=goal.rate is None))
    print()
    print(format_config(config_fields(Candidate(**best["candidate"]), result.padded)))


@dataclass(frozen=True)
class FailureReport:
    """What the CLI's failed-run report reads of a run (a record of the search)."""

    system: str
    failed: str | None
    model_errors: int
    first_model_error: str | None
    batches: int = 0


def failure_reports(records: Sequence[dict[str, Any]]) -> list[FailureReport]:
    """The runs of ``records`` that failed outright or in which the model raised, for
    the report on stderr (its system: the configuration's label)."""
    return [FailureReport(r["label"] + (f" (rerun {r['repeat']})" if r.get("repeat") else ""),
                          r.get("failed"), r.get("model_errors") or 0,
                          r.get("first_model_error"))
            for r in records if r.get("failed") or r.get("model_errors")]


def _how_to_continue(result: TuneResult) -> str:
    return how_to_continue(result.results_path)


def how_to_continue(results_path: str | None) -> str:
    """How a search cut short (by its budget, or Ctrl-C) is continued: with the results
    file ``results_path`` (None: not given)."""
    if results_path:
        return "rerun with the same --json to continue"
    return "pass --json FILE to keep the results and continue in a later run"


def _nothing_measured(result: TuneResult) -> str:
    """The verdict of a search whose budget had room for no run (``check_budget``
    refuses most such budgets up front; a capacity run that took longer than its bound
    leaves this): not that nothing meets the goal (nothing was measured), but what budget
    would measure something."""
    total = result.candidates_total
    first, every = least_budget(result.goal, result.duration, configurations=total)
    return (f"no configuration could be measured within the budget (--budget "
            f"{result.budget:g} s): one run is counted as {result.run_s:.3g} s (--duration, "
            f"its drain and stop); give --budget {first:g} or more to measure one "
            f"configuration (about {every:g} s to measure each of the {total} once)")


def _confirmation_note(result: TuneResult) -> str:
    """What confirming the finalists did: every rerun, some (the budget ended them), or
    none, in which case the verdict is on single runs."""
    finalists = (f"{plural(len(result.confirmed), 'finalist')} (the best that met the "
                 f"goal, at most {FINALISTS}, and the default)")
    if result.default is not None and list(result.confirmed) == [result.default["key"]]:
        finalists = "1 finalist (the default)"
    runs = sum(r.get("runs", 1) for r in result.confirmed.values())
    planned = len(result.confirmed) * CONFIRM_RUNS
    one = len(result.confirmed) == 1
    their, each = ("its", "") if one else ("their", " each")
    verdict = "the verdict is on" if one else "they are ranked first, on"
    if runs == planned:
        return (f"{finalists} rerun at {their} deciding load, {CONFIRM_RUNS} runs{each}; "
                f"{verdict} {their} medians")
    if runs == len(result.confirmed):
        return (f"{finalists} not rerun: the budget had no room left for a rerun; the "
                f"verdict is on single runs ({_how_to_continue(result)})")
    return (f"{finalists} rerun at {their} deciding load until the budget ended the reruns: "
            f"{runs} of {planned} runs; {verdict} the medians of {their} runs "
            f"({_how_to_continue(result)})")


def _round_up(seconds: float) -> float:
    """Seconds rounded up to a tenth below 10 s, to a whole second above."""
    return math.ceil(seconds * 10) / 10 if seconds < 10 else float(math.ceil(seconds))


def _compare(best: dict[str, Any], default: dict[str, Any], by_load: bool) -> str:
    """How the best beats the default: by the load carried (an SLO alone), else by p99."""
    p99 = (f"p99 {default['p99_ms'] / best['p99_ms']:.2f}x lower"
           if best["p99_ms"] else "")
    if by_load and best["offered"] != default["offered"]:
        return f"{best['offered'] / default['offered']:.2f}x the load within the SLO"
    if by_load:
        return f"the same load within the SLO, {p99}"
    return p99


def _deciding(result: TuneResult) -> list[dict[str, Any]]:
    """Per configuration, what decides: a finalist's medians, else its run at the highest
    load meeting the goal, else its last run."""
    return [result.confirmed.get(r["key"], r) for r in _deciding_of(result.goal, result.records)]


def _deciding_of(goal: Goal, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration, its search run that decides: the highest load meeting the goal,
    else its last run (confirming reruns left out)."""
    by: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("repeat"):
            continue
        cur = by.get(r["key"])
        if cur is None or (goal.meets(r) and (
                not goal.meets(cur) or r["offered"] > cur["offered"])):
            by[r["key"]] = r
    return list(by.values())


_MEDIANS = ("throughput", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "mean_batch",
            "arrival_rate", "completed", "elapsed_s")
_ANY_RUN = ("errors", "unfinished", "refused", "model_errors", "started_beside")


def _median_record(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One record for a finalist's runs at one load: the medians of its figures, and the
    worst of its errors, unfinished and refused requests and the model's errors (one
    failing run fails it)."""
    out = dict(runs[0])
    for k in _MEDIANS:
        values = [r[k] for r in runs if r.get(k) is not None]
        out[k] = statistics.median(values) if values else runs[0].get(k)
    for k in _ANY_RUN:
        out[k] = max(r.get(k) or 0 for r in runs)
    out["runs"] = len(runs)
    return out


def _rank(goal: Goal, r: dict[str, Any]) -> tuple[Any, ...]:
    p99 = _nan(r["p99_ms"])
    """The order of the best first: meets the goal, then (an SLO alone) the higher
    load, then the lower p99."""
    return (not goal.meets(r), -r["offered"] if goal.rate is None else 0,
            p99 if not math.isnan(p99) else math.inf)


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def _verdict(r: dict[str, Any]) -> str:
    return (f"p50 {report.fmt_ms(_nan(r['p50_ms']))} ms, p99 {report.fmt_ms(_nan(r['p99_ms']))}"
            f" ms at {report.fmt_rate(r['throughput'])} req/s achieved of "
            f"{report.fmt_rate(_arrival_rate(r))} offered, {_fmt_batch(r['mean_batch'])} rows "
            "per call")


def _arrival_rate(r: dict[str, Any]) -> float:
    """The load a run was offered, as shown: its arrivals over their window (the rate
    asked, to rounding), or the rate asked for a run that has none (it failed)."""
    return float(r.get("arrival_rate") or r["offered"])


def _fmt_batch(v: float | None) -> str:
    """Rows per model call; a run that failed outright has none (null)."""
    return "-" if v is None else f"{v:.1f}"

"""Benchmark machinery behind ``batchproc bench``, ``batchproc tune`` and
``benchmarks/compare_peers.py``.

One module, one job:

- :mod:`.models`  — the built-in batch functions (identity, mlp, fixed) and user models
- :mod:`.minimal` — the minimal pure-Python batcher, the bar any serious library must clear
- :mod:`.targets` — the systems a load runs against (batchproc, no batching, minimal)
- :mod:`.inputs`  — what a request is: ``--input`` specs and sample requests from an .npz
- :mod:`.loads`   — load generators (closed loop, Poisson open loop, burst)
- :mod:`.runner`  — runs one load against one system, or the limit, and measures it
- :mod:`.sweep`   — offered loads at fractions of the capacity: the latency-throughput curve
- :mod:`.tune`    — the search of static configurations, resumable from its results file
- :mod:`.configs` — configurations as text: ``--config`` in, ``BatchProcessorConfig(...)`` out
- :mod:`.report`  — tables, JSON and plot
- :mod:`.outputs` — output files: checked before any run, written whole or not at all
- :mod:`.cli`     — the ``batchproc`` command line (``bench``, ``bench --sweep``, ``tune``)

Nothing here prints except :mod:`.cli` and :mod:`.report` (when the CLI asks it to).
"""

from __future__ import annotations


class BenchError(ValueError):
    """A bad benchmark setting: the CLI prints its message on one line and exits 2."""

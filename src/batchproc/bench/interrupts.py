"""Ctrl-C during a command's runs: the run in progress ends, the runs that finished are
kept.

``bench`` runs its systems (or a sweep's loads), and ``tune`` its search, inside
:func:`keep_finished`. Ctrl-C raises ``KeyboardInterrupt`` in the main thread, wherever
it waits; the run in progress unwinds on the way out, as for any error: its load's
threads submit nothing more and end after their call in progress (:mod:`.loads`), its
system is stopped and its progress line ends with "interrupted"
(:func:`.runner.run_target`; the limit gives up on its calls,
:func:`.runner.run_limit`). :func:`keep_finished` ends the loop there, and what the loop
had collected, the runs that finished, is the command's result, marked ``interrupted``.
``bench`` prints and writes it as usual (nothing, when no run had finished), ``tune``
saves it in its results file; then the command ends with its interrupted line on stderr
(``tune``'s says how to continue) and :data:`EXIT_STATUS`.

A second Ctrl-C while the run in progress unwinds cuts that short (a processor's stop
gives up at once and raises it once) and is caught the same way; one after the loop,
while the outputs are written, ends the command at once (each file is written whole or
not at all).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

# The exit status of a command Ctrl-C ended: 128 + SIGINT, as a shell reports it.
EXIT_STATUS = 130
# Under the table of an interrupted bench or sweep.
NOTE = ("interrupted (Ctrl-C): only the runs that finished are shown; the run in "
        "progress and those after it were not measured")


@dataclass
class Interruption:
    """Whether Ctrl-C ended the runs of a :func:`keep_finished` block."""

    interrupted: bool = False


@contextlib.contextmanager
def keep_finished() -> Iterator[Interruption]:
    """Run a loop of runs until it ends or Ctrl-C ends it: a ``KeyboardInterrupt`` out
    of the block is taken (the run in progress has unwound by then), and the yielded
    :class:`Interruption` says so. What the block collected before it stays collected."""
    outcome = Interruption()
    try:
        yield outcome
    except KeyboardInterrupt:
        outcome.interrupted = True

"""Running work to its end however often the calling thread is interrupted.

A signal handler's exception (``KeyboardInterrupt`` at Ctrl-C, or whatever a handler
raises) lands in the main thread between almost any two bytecodes: inside a ``finally``,
between taking a list of requests and failing them, inside a Python-level ``__enter__``
that has just taken its lock. Work interrupted there leaves futures that never complete,
and a ``Thread.join`` interrupted so can leave that thread looking finished. Handlers run
only on the main thread, so there ``run`` hands the work to a helper thread and only
waits, with a plain lock and attribute assignments that no interrupt can leave half done.

The wait is not endless, though: once interrupted, or once past the time its caller
gave, it lasts at most ``GRACE`` more seconds. The work gives up its own waits at once
then, so only code it calls that blocks (a user's done-callback) can keep it longer; it
goes on finishing on the helper thread, and the caller gets its interrupt back.

CPython 3.12 and later start no thread once the interpreter is exiting, ``atexit`` hooks
included (``RuntimeError``), which is where the exit hook needs one most. A process that
will need one then keeps a thread parked from before (``keep_standby``): the helper
work runs there when no new thread can be had.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Shield", "run"]

T = TypeVar("T")

_local = threading.local()

# How soon a signal delivered to another thread reaches the waiting main thread (seconds).
SIGNAL_POLL = 0.05

# How long the caller still waits for the work once interrupted, or once past its
# ``wait_until``, before leaving it to finish on its helper thread (seconds).
GRACE = 2.0


# Whether a thread can be started while the interpreter exits (atexit hooks): not from
# CPython 3.12 on.
THREADS_AT_EXIT = sys.version_info < (3, 12)


class _Standby:
    """A daemon thread parked until work is handed to it, one per process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="batchproc-standby", daemon=True).start()

    def _serve(self) -> None:
        while True:
            self.work.get()()


_standby: _Standby | None = None
_standby_lock = threading.Lock()


def keep_standby() -> None:
    """Keep a thread parked for ``run`` to use where no new thread can be started (at
    exit, from CPython 3.12 on); a no-op where one could be, or once one is kept in this
    process (a forked child keeps its own). Where no thread can be started now (already
    exiting, a thread limit) there is none, and ``run`` does without."""
    global _standby
    if THREADS_AT_EXIT:
        return
    with _standby_lock:
        if _standby is None or _standby.pid != os.getpid():
            try:
                _standby = _Standby()
            except RuntimeError:
                _standby = None


def _forget_standby_after_fork() -> None:
    # The parent's standby thread is not in the child, and a thread of the parent may
    # have held the lock at the fork.
    global _standby, _standby_lock
    _standby = None
    _standby_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_standby_after_fork)


def _run_on_standby(work: Callable[[], None]) -> bool:
    """Hand ``work`` to this process's standby thread; False if it has none."""
    standby = _standby
    if standby is None or standby.pid != os.getpid():
        return False
    standby.work.put(work)
    return True


class Shield:
    """What the shielded work looks at: ``interrupted`` is True once the waiting thread
    got an exception. The work should then stop waiting for anything, and still finish
    what it must (completing futures, stopping threads)."""

    __slots__ = ("interrupted",)

    def __init__(self) -> None:
        self.interrupted = False


class _Helper(Generic[T]):
    """The work and its outcome, shared by the waiting thread and the helper thread."""

    def __init__(self, work: Callable[[Shield], T], shield: Shield) -> None:
        self.work = work
        self.shield = shield
        # Taken by the one thread that runs the work: a start() that was interrupted may
        # or may not have started its thread, so the waiting thread may start another.
        self.claim = threading.Lock()
        self.done = threading.Lock()
        self.done.acquire()
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        if not self.claim.acquire(blocking=False):
            return
        _local.shield = self.shield  # work nested in this one shares its shield
        try:
            self.result = self.work(self.shield)
        except BaseException as exc:
            self.error = exc
        finally:
            _local.shield = None
            self.finished = True  # before the release: the waiter reads it after
            self.done.release()


class _Wait:
    """The waiting thread's side of ``run``."""

    def __init__(self, wait_until: float) -> None:
        self.helper: _Helper[Any] | None = None
        self.started = False
        self.interrupt: BaseException | None = None
        self.wait_until = wait_until
        self.interrupted_at = math.inf
        self.waited_enough = False  # past the grace: leave the work to its helper
        self.threads: list[threading.Thread] = []  # every helper thread started
        self.joined = False  # the work finished, and every helper thread has ended

    def step(self, work: Callable[[Shield], Any], name: str) -> None:
        if self.helper is None:
            self.helper = _Helper(work, Shield())
        helper = self.helper
        if self.interrupt is not None:
            helper.shield.interrupted = True
        # A start() interrupted may not have started its thread: start another (the
        # first to claim the work runs it, the others return at once).
        if not helper.claim.locked() and (not self.started or self.interrupt is not None):
            thread = threading.Thread(target=helper.run, name=name, daemon=True)
            self.threads.append(thread)
            try:
                thread.start()
            except Exception:
                # No new thread to be had (exiting, CPython 3.12+): the standby, if this
                # process keeps one, else here (unless a thread began it).
                if not _run_on_standby(helper.run):
                    helper.run()
            self.started = True
        # In slices: a signal the system delivers to another thread only sets a flag, and
        # its handler runs here at the next instruction, not in a wait that never ends.
        if not helper.finished:
            helper.done.acquire(timeout=SIGNAL_POLL)
        if helper.finished:
            # Let the helper threads end too, so that they outlive nothing (one that found
            # the work taken returns at once); a step, so an interrupt cannot skip it.
            for thread in self.threads:
                if thread.is_alive():  # one whose start failed never ran
                    thread.join()
            self.joined = True
            return
        now = time.monotonic()
        if self.interrupt is not None and self.interrupted_at == math.inf:
            self.interrupted_at = now
        if now >= min(self.wait_until, self.interrupted_at) + GRACE:
            self.waited_enough = True


def run(work: Callable[[Shield], T], name: str = "batchproc-shielded",
        wait_until: float = math.inf) -> T | None:
    """Call ``work(shield)`` and return its result (or raise its exception) once it has
    finished, whatever exceptions the calling thread gets meanwhile.

    The caller waits at most ``GRACE`` seconds past its first interrupt or past
    ``wait_until`` (``time.monotonic()`` time); then it returns None (or raises the
    interrupt) and the work finishes on its own.

    On the main thread ``work`` runs on a helper thread named ``name``: the first
    exception raised into the wait (``KeyboardInterrupt``...) sets ``shield.interrupted``
    and is raised once ``work`` has finished, instead of its outcome; later ones are
    dropped. On any other thread (no signal handler runs there) ``work`` runs on the
    caller's thread, with the shield of the shielded work it is nested in, if any. If no
    thread can be started, ``work`` runs on the standby thread (``keep_standby``), or
    without one on the caller's thread, unshielded.
    """
    if threading.get_ident() != threading.main_thread().ident or sys.is_finalizing():
        # Finalizing (an object's __del__ as the interpreter exits): a new thread would
        # never start, and Thread.start waits for it for ever; no signal handler runs.
        return work(getattr(_local, "shield", None) or Shield())
    # Everything below may be interrupted at any instruction: each step is either done
    # (an assignment made) or done again by the next turn of the loop. The outer loop
    # catches what lands between the inner handler and the inner loop's next turn; the
    # handlers tell the work first, so that it gives up even if a further interrupt,
    # landing right after the outer handler, ends this wait early.
    state = _Wait(wait_until)
    # (The loops test attributes, not a call: a call's entry may be interrupted too.)
    while not (state.joined or state.waited_enough):
        try:
            while not (state.joined or state.waited_enough):
                try:
                    state.step(work, name)
                except BaseException as exc:
                    if state.helper is not None:
                        state.helper.shield.interrupted = True
                    if state.interrupt is None:
                        state.interrupt = exc
        except BaseException as exc:
            if state.helper is not None:
                state.helper.shield.interrupted = True
            if state.interrupt is None:
                state.interrupt = exc
    helper = state.helper
    assert helper is not None
    interrupt = state.interrupt
    if not helper.finished:  # waited long enough: the work finishes on its own
        if interrupt is not None:
            raise interrupt
        return None
    if interrupt is not None:
        raise interrupt
    if helper.error is not None:
        raise helper.error
    result: T = helper.result
    return result

"""The done-callbacks of the requests the supervisor fails, run on a thread of their own.

Why: ``concurrent.futures`` runs a done-callback on the thread that completes its future,
and the supervisor completes some: requests whose ``max_queue_time`` ran out
(``Engine.expire_queued``) and the requests of a call abandoned past ``item_timeout``
(``TimeLimits.expire_stuck``). That thread also enforces every time limit and runs the
health checks, so a callback that blocked there held up all of them: behind one of 3 s,
a 0.1 s ``max_queue_time`` expired after 3 s and a call past ``item_timeout`` was not
abandoned until the callback returned.

So the supervisor sets the errors itself, at once, and hands the futures to
``CallbackThread.run``: one daemon thread per processor, started on first need, runs
their callbacks, a group at a time (the requests failed together, each of which has its
error before any of their callbacks runs) in the order handed over. What a callback
raises is logged as on completion (``futures.invoke_callbacks``). A callback that
blocks holds up the callbacks after it, never a time limit; past ``item_timeout`` it
shows in ``health()`` (``TimeLimits.stuck_callbacks``).

``stop`` ``close``s it after the supervisor has ended and waits for what was handed
over to run (``join``, bounded as its wait for deliveries is); from then on, and where
no thread can start (at interpreter exit on CPython 3.12+, a thread limit), callbacks
run on the thread that hands them over. The callbacks of the requests ``stop`` fails
itself run on its own thread, as ever.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from ..futures import RequestFuture, invoke_callbacks

logger = logging.getLogger(__name__)

_monotonic = time.monotonic

NAME = "batchproc-callbacks"


class CallbackThread:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # The groups handed over and not begun, oldest first.
        self._groups: collections.deque[list[RequestFuture]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        # The group running now: its futures, and when it began (0.0: none runs).
        self._running = 0
        self._started = 0.0

    def run(self, futures: list[RequestFuture]) -> None:
        """Run the done-callbacks of ``futures``, completed with their callbacks held
        back (``futures.fail`` with ``deferred``), on the thread, after every group
        handed over before; on the calling thread once closed, or when no thread
        starts."""
        if not futures:
            return
        with self._lock:
            if not self._closed and self._start_locked():
                self._groups.append(futures)
                self._changed.notify()
                return
        invoke_callbacks(futures)

    def _start_locked(self) -> bool:
        """Whether the thread runs, started now if it was not."""
        if self._thread is None:
            thread = threading.Thread(target=self._main, name=NAME, daemon=True)
            try:
                thread.start()
            except Exception:  # "can't start new thread"; at exit on CPython 3.12+
                return False
            self._thread = thread
        return True

    def _main(self) -> None:
        changed = self._changed
        while True:
            with changed:
                while not self._groups:
                    if self._closed:
                        return
                    changed.wait()
                group = self._groups.popleft()
                self._running, self._started = len(group), _monotonic()
            try:
                invoke_callbacks(group)  # logs what each callback raises
            except BaseException:  # pragma: no cover - a bug in batchproc
                logger.critical("running done-callbacks failed; going on", exc_info=True)
            finally:
                with changed:
                    self._running, self._started = 0, 0.0
            del group  # nothing of it is kept while waiting for the next

    def running(self) -> tuple[int, float]:
        """(futures of the group whose callbacks run now, when it began); (0, 0.0) when
        none runs."""
        with self._lock:
            return self._running, self._started

    def close(self) -> None:
        """Stop: the thread ends once what was handed over has run; from now on ``run``
        runs callbacks on the calling thread."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def join(self, timeout: float | None) -> bool:
        """After ``close``: wait up to ``timeout`` seconds for the thread to run what it
        was handed and end. True if it has (or never started); never on the thread
        itself (a callback that called ``stop``), which ends after that callback."""
        thread = self._thread
        if thread is None:
            return True
        if thread is threading.current_thread():
            return False
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def forked_in_child(self) -> None:
        """In a forked child (``BatchProcessor._forked_in_child``), with only the
        forking thread alive: the thread, and its lock, which it may have held, are the
        parent's; what was handed over is the parent's to run. Nothing starts here."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._groups = collections.deque()
        self._thread = None
        self._closed = True
        self._running, self._started = 0, 0.0

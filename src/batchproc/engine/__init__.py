"""The engine: what happens to requests between the queue and their futures.

One module per job, each with a narrow interface:

- ``batch``: a popped batch's state (one field, named transitions) and the board of
  batches held by workers;
- ``workers``: the worker threads, their loop, and the hand-over at stop;
- ``execution``: one batch's calls: build, call, check and split, bisection, retries;
- ``delivery``: completing futures (results, failures, expired deadlines), counted first;
- ``limits``: ``item_timeout``;
- ``callbacks``: the thread that runs the done-callbacks of what the supervisor fails.

``Engine`` wires them together for the processor.
"""

from __future__ import annotations

import queue as _stdlib_queue
import threading
from collections.abc import Callable
from typing import Any

from .._native.future_state import Request
from ..config import BatchProcessorConfig
from ..controller import Controller
from ..futures import RequestFuture
from ..metrics import MetricsSink
from ..stats import BatchStats
from .batch import ABANDONED, Board
from .callbacks import CallbackThread
from .delivery import Delivery
from .execution import Executor
from .limits import TimeLimits
from .workers import WorkerPool

__all__ = ["Engine"]


class Engine:
    def __init__(self, config: BatchProcessorConfig, queue: Any, controller: Controller,
                 stats: BatchStats, metrics: MetricsSink, resume: threading.Event,
                 count_cancelled: Callable[[int], None]) -> None:
        self._board = Board()
        self._queue = queue
        self.delivery = Delivery(config, self._board, queue, controller, stats, metrics,
                                 count_cancelled)
        self._executor = Executor(config, self._board, queue, controller, self.delivery,
                                  metrics)
        self._pool = WorkerPool(config, queue, controller, self._board, self._executor,
                                self.delivery, resume, count_cancelled)
        # Runs the done-callbacks of the requests the supervisor fails (engine/callbacks).
        self.callbacks = CallbackThread()
        self._limits = TimeLimits(config, self._board, queue, self._pool, controller,
                                  self.delivery, metrics, self.callbacks)
        self.join = self._pool.join
        self.abandon_all = self._pool.abandon_all
        self.wait_for_pops = self._pool.wait_for_pops
        self.alive_workers = self._pool.alive_workers
        self.threads = self._pool.threads
        self.expire_stuck = self._limits.expire_stuck
        self.fill_vacancies = self._pool.fill_vacancies
        self.stuck_batches = self._limits.stuck_batches
        self.stuck_callbacks = self._limits.stuck_callbacks

    def returned_call_began(self) -> float:
        """When the latest call that returned (not abandoned) had begun
        (``time.monotonic()``; 0.0: none yet)."""
        return self._board.returned_call_began

    def start(self, process_func: Callable[[Any], Any]) -> None:
        self._executor.process_func = process_func
        self._pool.start()

    def flush_logs(self, final: bool = False) -> None:
        """Summaries of the log lines the engine's limits held back (``log_limits``)."""
        self._limits.flush_log(final)
        self._executor.flush_log(final)

    @property
    def room(self) -> Any:
        """The coroutines awaiting room in the queue (``backpressure.RoomWaiters``), told
        whenever requests leave it; ``None`` until one awaits."""
        return self._pool.room

    @room.setter
    def room(self, waiters: Any) -> None:
        self._pool.room = waiters

    def push_accepted(self, requests: list[Request]) -> list[int | BaseException] | None:
        """Queue requests accepted already (``BatchProcessor._push_accepted``), each with
        ``RequestQueue.push_again``: per request its token, or the ``queue.Full`` or
        ``MemoryError`` that refused it; None, queueing none, once ``seal``ed. Under the
        board's lock, as ``seal`` is: either they are queued before stop's last look at
        the queue, which then fails those no worker ran, or they are refused."""
        queue = self._queue
        out: list[int | BaseException] = []
        with self._board.lock:
            if self._board.sealed:
                return None
            for r in requests:
                try:
                    out.append(queue.push_again(
                        r, r.priority, r.rows, r.nbytes, r.key, r.queue_length,
                        r.deadline))
                except (_stdlib_queue.Full, MemoryError) as exc:
                    out.append(exc)
        return out

    def seal(self) -> None:
        """Stop is about to take what is left in the queue for the last time (its
        workers have exited or been given up on): ``push_accepted`` queues nothing any
        more, as nobody would run it or fail it."""
        with self._board.lock:
            self._board.sealed = True

    def expire_queued(self, requests: list[Request], aside: bool = False) -> int:
        """Fail requests whose ``max_queue_time`` ran out in the queue. Their
        done-callbacks run on the callbacks thread with ``aside`` (the supervisor's
        calls: it enforces every time limit), else on this one (stop's)."""
        room = self._pool.room
        if room is not None and requests:
            room.release(len(requests))
        if not aside:
            return self.delivery.expire(requests)
        callbacks: list[RequestFuture] = []
        expired = self.delivery.expire(requests, callbacks)
        self.callbacks.run(callbacks)
        return expired

    @property
    def expired(self) -> int:
        return self.delivery.expired

    @property
    def timed_out(self) -> int:
        return self.delivery.timed_out

    @property
    def handed_back(self) -> int:
        return self.delivery.handed_back

    @property
    def batch_only_failures(self) -> int:
        return self._executor.batch_only_failures

    def active_batches(self) -> int:
        board = self._board
        with board.lock:
            return sum(1 for b in board.active if b.state is not ABANDONED)

"""The worker threads: their loop, their replacement, and the hand-over at stop.

Each of the ``max_workers`` threads runs the whole loop itself (no hand-off to a pool,
so no extra thread wake-up per batch): take a call slot, ask the controller for a plan,
pop a batch from the native queue (waiting without the GIL), and run it (``Executor``).
An idle worker blocked in the queue is woken by the push itself, which is what keeps
latency low at low load.

Stop: ``join`` waits for the workers to drain the closed queue; if time runs out,
``abandon_all`` takes every batch still held (``Board.give_up``) and fails its requests.
A pop still in progress then fails what it took itself, and stop waits for it
(``wait_for_pops``, counted in ``_popping``), so that no popped request escapes stop.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .._native.future_state import Request, start_all, total_rows
from ..config import BatchProcessorConfig
from ..controller import Controller
from ..errors import ProcessorStoppedError
from ..formats import Workspace
from .batch import CALLING, DELIVERING, Batch, Board
from .cpus import spinning_pays, usable_cpus
from .delivery import Delivery
from .execution import Executor

logger = logging.getLogger(__name__)

_monotonic = time.monotonic

# How long a blocked pop waits before the worker looks at its own state again. Pushes,
# close() and pause changes do not need it; it only bounds how long an abandoned or
# surplus worker can linger.
POP_POLL = 1.0
# How long a worker's pop busy-waits on an empty queue before parking, when requests
# came a moment ago (RequestQueue.spin): a client waiting on each answer sends its next
# request within microseconds, and a parked worker costs it a thread wake-up, tens of
# microseconds on an idle core (benchmarks/bench_round_trip.py).
POP_SPIN = 30e-6


def pop_spin() -> float:
    """POP_SPIN where spinning pays for this process (``cpus.spinning_pays`` of its
    affinity and its container's CPU quota), else 0.0."""
    return POP_SPIN if spinning_pays(usable_cpus()) else 0.0


# The worker watching for requests past batch_timeout looks again when the next may be
# late; at most every half batch_timeout for calls that start meanwhile, and (as a slot
# is held while idle, by a worker blocked in its pop) no more often than this.
WATCH_PERIOD_MIN = 0.005
# Nothing queued or pushed for this long and no batch running: the watcher dozes (waits
# up to POP_POLL) until a batch begins, instead of waking every watch period.
IDLE_AFTER = 0.1
# A delivery that keeps its call slot this long has stalled (a done-callback blocking):
# requests waiting past batch_timeout behind it are taken by another worker.
DELIVERY_STALL = 0.005
# How often stop's wait for a worker looks whether a time limit abandoned it meanwhile.
JOIN_SLICE = 0.05
# How long stop, giving up on in-flight work, lets deliveries in progress finish, and
# waits for pops in progress to end.
DELIVERY_GRACE = 0.2
POP_GRACE = 0.2


class Worker:
    __slots__ = ("abandoned", "name", "replaced", "thread")

    def __init__(self, name: str) -> None:
        self.name = name
        self.abandoned = False
        self.replaced = False  # a worker was started (or its place left) in its place
        self.thread: threading.Thread | None = None


class _LateRequests:
    """The watcher's wait between looks (``CallSlots.watch_with``): the queue's
    ``await_late``, until a request has waited ``batch_timeout`` (any, once the queue is
    closed: nothing waits to fill a batch then, as in ``_until_overdue``)."""

    __slots__ = ("_batch_timeout", "_queue")

    def __init__(self, queue: Any, batch_timeout: float) -> None:
        self._queue = queue
        self._batch_timeout = batch_timeout

    def wakes(self) -> int:
        return int(self._queue.watch_wakes)

    def wait(self, first_look: float, timeout: float, since: int) -> None:
        queue = self._queue
        age = 0.0 if queue.closed else self._batch_timeout
        # Back after IDLE_AFTER (or the first look, if later) to ask whether an idle
        # spell began (a doze).
        timeout = min(timeout, max(first_look, IDLE_AFTER))
        queue.await_late(age, first_look, timeout, since, max(age, WATCH_PERIOD_MIN))

    def wake(self) -> None:
        self._queue.wake_watch()


class WorkerPool:
    # Told how many requests each pop took out of the queue, once something awaits room in
    # it (backpressure.RoomWaiters); until then the workers pay one attribute read.
    room: Any = None

    def __init__(self, config: BatchProcessorConfig, queue: Any, controller: Controller,
                 board: Board, executor: Executor, delivery: Delivery,
                 resume: threading.Event, count_cancelled: Callable[[int], None]) -> None:
        self._config = config
        self._queue = queue
        queue.spin = pop_spin()
        self._controller = controller
        controller.slots.watch_with(_LateRequests(queue, config.batch_timeout))
        self._board = board
        self._executor = executor
        self._delivery = delivery
        self._resume = resume
        self._count_cancelled = count_cancelled
        self._workers: list[Worker] = []
        self._worker_ids = 0
        self._started = False
        # Places of abandoned workers whose replacement the system refused (replace).
        self._vacancies = 0
        # Workers between entering pop_batch and registering what they popped: stop
        # waits for them, so no popped request escapes it.
        self._popping = 0
        self._gave_up = False
        # Set when stop gives up on in-flight work: pacing waits end at once.
        self._abandon_all = threading.Event()
        self._pace_lock = threading.Lock()
        self._next_start = 0.0
        self._last_gc = 0.0
        # The queue's push count when the watcher last saw it change, and when (_idle).
        self._pushed_seen = -1
        self._quiet_since = 0.0

    # ----------------------------------------------------------------- threads

    def start(self) -> None:
        """Start ``max_workers`` threads. ``RuntimeError`` naming how many started when
        the system refuses one (chained to its error); those that did start are left
        running for the caller to stop (the processor stops at once, see its ``start``)."""
        self._started = True
        wanted = self._config.max_workers
        for _ in range(wanted):
            try:
                self.spawn()
            except Exception as exc:  # "can't start new thread", out of memory
                raise RuntimeError(
                    f"could start only {len(self._workers)} of {wanted} worker threads "
                    f"(max_workers): {exc}") from exc

    def spawn(self) -> None:
        with self._board.lock:
            # While stop drains the queue a worker abandoned in a hung call is still
            # replaced (with max_workers=1 no other would drain it); once stop gives up
            # on in-flight work, none is.
            if self._gave_up:
                return
            self._worker_ids += 1
            worker = Worker(f"batchproc-worker-{self._worker_ids}")
            # Daemon: a worker stuck in process_func must never keep the interpreter alive.
            thread = threading.Thread(target=self._main, args=(worker,),
                                      name=worker.name, daemon=True)
            # Started under the lock: join() (stop) must never see a thread it cannot join
            # yet (the supervisor replacing a stuck worker while stop() began).
            thread.start()
            worker.thread = thread
            self._workers.append(worker)

    def replace(self, worker: Worker) -> None:
        """Start a worker in ``worker``'s place, then mark ``worker`` abandoned (stuck past
        ``item_timeout``, or crashed). In this order ``join``, which waits for workers not
        abandoned, never sees none between the two: it would fail the queue undrained.
        Never raises: the caller's clean-up of the batch ``worker`` held must go on. A
        thread the system refuses is logged, and its place left for ``fill_vacancies``.
        A worker is replaced once: one abandoned in a hung call that then crashes (a bug
        in batchproc) is not replaced again."""
        with self._board.lock:
            if worker.replaced:
                return
            worker.replaced = True
        try:
            self.spawn()
        except Exception:  # "can't start new thread", out of memory
            with self._board.lock:
                self._vacancies += 1
            logger.error("could not start a worker in place of %s; trying again until "
                         "one starts", worker.name, exc_info=True)
        finally:
            worker.abandoned = True

    def fill_vacancies(self) -> None:
        """Start the workers ``replace`` could not (the supervisor calls this every tick;
        one refused again is tried at the next). None once stop has begun: it drains the
        queue with the workers it has, or fails what is left."""
        while self._vacancies and not self._board.closing:
            try:
                self.spawn()
            except Exception:
                return
            with self._board.lock:
                self._vacancies -= 1
            logger.warning("started a worker in a place left empty by a refused thread")

    def join(self, deadline: float) -> bool:
        """Wait until ``deadline`` for the workers to drain the closed queue and exit.
        False if one is still running, the calling thread included (stop called on a
        worker, which never waits for itself)."""
        me = threading.current_thread()
        with self._board.lock:
            self._board.closing = True

        def running() -> list[threading.Thread]:
            # An abandoned worker is stuck in a call past item_timeout whose requests
            # have failed already: it is left to finish alone, never waited for. Its
            # replacement (the time limit may abandon one during this wait, hence the
            # slices) is waited for.
            with self._board.lock:
                return [w.thread for w in self._workers if w.thread is not None
                        and w.thread is not me and w.thread.is_alive()
                        and not w.abandoned]

        while threads := running():
            remaining = deadline - _monotonic()
            if remaining <= 0.0:
                return False
            threads[0].join(min(remaining, JOIN_SLICE))
        # The calling thread is a worker (stop from a done-callback): never waited for.
        return not any(w.thread is me and not w.abandoned for w in self._workers)

    def abandon_all(self, error_factory: Callable[[], BaseException]) -> int:
        """Fail every request still held by a worker (stop ran out of time, or was called
        on a worker). From here on no worker pops, calls the model, delivers or parks a
        retry: a batch it still holds is abandoned, even one being delivered (whose
        delivery completes the requests it began on, nothing more). A pop in progress
        fails what it takes itself (see ``wait_for_pops``)."""
        board = self._board
        me = threading.current_thread()
        with board.lock:
            board.closing = True
            self._gave_up = True
            self._abandon_all.set()
            # Deliveries in progress complete their futures right now: let them finish
            # (a bounded grace) before taking their batches. The calling thread's own
            # delivery (stop called from a done-callback) ends only after stop returns.
            wait_until = _monotonic() + DELIVERY_GRACE
            while (any(b.state is DELIVERING and b.worker.thread is not me
                       for b in board.active)
                   and _monotonic() < wait_until):
                board.settled.wait(max(0.0, wait_until - _monotonic()))
        failed = 0
        for batch, holds_slot, in_flight, requests in board.give_up():
            batch.worker.abandoned = True
            if holds_slot:
                self._controller.slots.release()
            if in_flight:
                self._controller.batch_ended()
            failed += self._delivery.fail_pending(requests, error_factory(),
                                                  dispatched_at=batch.dispatched_at)
            self._delivery.run_deferred(batch)  # its search's delivered parts
        return failed

    def wait_for_pops(self) -> bool:
        """After ``abandon_all``, once stop took what was left in the queue and woke its
        waiters: wait (a bounded grace) for the pops in progress to end, each failing
        what it took. A pop on a closed queue waits only for parked retries, so with the
        queue drained it returns at once. True if none is left."""
        board = self._board
        deadline = _monotonic() + POP_GRACE
        with board.lock:
            while self._popping and _monotonic() < deadline:
                board.settled.wait(max(0.0, deadline - _monotonic()))
            return not self._popping

    def alive_workers(self) -> tuple[int, int]:
        with self._board.lock:
            alive = sum(1 for w in self._workers
                        if not w.abandoned and w.thread is not None and w.thread.is_alive())
        return alive, (0 if self._board.closing or not self._started
                       else self._config.max_workers)

    def threads(self) -> list[threading.Thread]:
        with self._board.lock:
            return [w.thread for w in self._workers if w.thread is not None]

    # ----------------------------------------------------------------- the loop

    def _main(self, worker: Worker) -> None:
        workspace = Workspace()
        queue = self._queue
        controller = self._controller
        resume = self._resume
        byte_cap = self._config.max_batch_bytes
        token_cap = self._config.max_batch_tokens or 0
        slots = controller.slots
        board = self._board
        idle = self._idle
        try:
            while not worker.abandoned:
                # A worker pops only once it may also run the batch: the others wait here
                # instead of each taking a few requests to queue them at a busy model.
                if not slots.try_acquire():
                    look_again = self._until_overdue()
                    if look_again > 0.0:
                        if not slots.acquire(POP_POLL, min(look_again, POP_POLL), idle):
                            if queue.exhausted:
                                return
                            continue
                    elif self._take_over_stalled():
                        # batch_timeout is a ceiling on waiting while a worker is free:
                        # a call or delivery runs long, so this worker takes its slot.
                        slots.took_over()
                    else:
                        continue  # it ended meanwhile: its slot is free again
                try:
                    # Read before the plan: a target set after it (update_batch_size)
                    # makes the pop return empty, to plan again.
                    retargets = queue.retargets
                    plan = controller.plan(queue.rows)
                    with board.lock:
                        # Once stop() has given up on in-flight work it fails what is
                        # still queued itself: a pop now would race it for those requests.
                        gave_up = self._gave_up
                        if not gave_up:
                            self._popping += 1
                    if gave_up:
                        slots.release(wake=True)
                        return
                    try:
                        requests = queue.pop_batch(
                            plan.target_rows, byte_cap, max_tokens=token_cap,
                            fill_rows=plan.target_rows,
                            max_wait=plan.max_wait, idle_gap=plan.idle_gap,
                            fill_time=plan.fill_time, timeout=POP_POLL,
                            retargets=retargets)
                    except BaseException:
                        self._register([], worker)  # only to end the pop
                        raise
                    batch = self._register(requests, worker)
                    room = self.room
                    if room is not None:
                        room.release(len(requests))
                except BaseException:
                    slots.release()
                    raise
                if not requests:
                    slots.release(wake=queue.closed)
                    if queue.exhausted:
                        return  # closed, and nothing more will come out of it
                    continue
                if batch is not None:  # None: all cancelled, or stop() gave up on them
                    if queue.paused:
                        # Popped just as pause began (the queue holds pops while paused):
                        # hold the batch until resume; stop resumes. (pause() clears the
                        # event before it pauses the queue, resume() sets it after.)
                        resume.wait()
                        batch.dispatched_at = _monotonic()
                    self._dispatch(batch, workspace, plan.target_rows)
                # Keep nothing of a finished batch while waiting for the next: its futures
                # may hold what their callers keep alive only while pending (decorator.py).
                del requests, batch
        except BaseException:
            # Only a bug in batchproc itself gets here: make it loud, and keep serving.
            logger.critical("worker %s crashed; starting a replacement", worker.name,
                            exc_info=True)
            self.replace(worker)
        finally:
            if worker.abandoned:
                # Its place went to another: nothing is kept of it once its call returned
                # (a long-lived processor whose calls now and then overrun item_timeout
                # would keep a worker and its thread per such call).
                with self._board.lock:
                    if worker in self._workers:
                        self._workers.remove(worker)

    def _until_overdue(self) -> float:
        """Seconds until requests may be overdue (0.0: they are): waiting past
        ``batch_timeout`` behind a call that holds its call slot and overruns its usual
        time, or behind a delivery that kept its call slot running longer than
        ``DELIVERY_STALL`` (a done-callback that blocks). Then a worker without a call
        slot takes that one over (``_take_over_stalled``); the one watching for a slot
        (``CallSlots.acquire``) looks again after this long.
        Behind calls of normal length they wait for them: a model that runs one call at
        a time (a lock, the GIL, one GPU) would only queue a second call, and split one
        full batch into two alternating halves."""
        queue = self._queue
        # Once the queue is closed (stop draining it) nothing waits to fill a batch.
        timeout = 0.0 if queue.closed else self._config.batch_timeout
        if queue.rows == 0:
            # A request pushed from now on is overdue batch_timeout after its push.
            return max(timeout, WATCH_PERIOD_MIN)
        until_late: float = timeout - queue.oldest_age()
        if until_late > 0.0:
            return until_late
        with self._board.lock:
            stalls = self._stalls_locked(_monotonic())
        # A call that starts later (or none in progress: the slot holders are popping,
        # and the next pop takes the late requests) is looked at within a period.
        period = max(timeout / 2, WATCH_PERIOD_MIN)
        return max(0.0, min(min((due for due, _ in stalls), default=period), period))

    def _idle(self) -> bool:
        """Whether the watcher may doze (``CallSlots.acquire``): nothing queued or pushed
        for ``IDLE_AFTER`` and no batch on the board. Then any request to come is popped
        by a worker waiting in its pop, and a call that could hold one up begins by
        registering its batch, which wakes the watcher. Or the queue is paused: nothing
        is popped, so no request is held up by a call, until ``resume()``, which wakes
        the watcher. Asked by the watcher alone, under the call slots' lock (lock order:
        the slots', then the board's)."""
        queue = self._queue
        if queue.paused and not queue.closed:
            return True
        now = _monotonic()
        pushed = queue.pushed
        if pushed != self._pushed_seen or queue.rows or queue.closed:
            self._pushed_seen, self._quiet_since = pushed, now
            return False
        if now - self._quiet_since < IDLE_AFTER:
            return False
        with self._board.lock:
            return not self._board.active

    def _stalls_locked(self, now: float) -> list[tuple[float, Batch]]:
        """(seconds until it stalls, batch) for each batch that holds a call slot and is
        being called or delivered; under the board's lock."""
        overrun_after = self._controller.overrun_after
        stalls = []
        for b in self._board.active:
            if not b.holds_slot:
                continue  # its slot was taken over: it holds nothing up any more
            if b.state is CALLING:
                rows = total_rows(b.calling if b.calling is not None else b.requests)
                stalls.append((overrun_after(rows) - (now - b.call_started), b))
            elif b.state is DELIVERING:
                stalls.append((DELIVERY_STALL - (now - b.delivery_started), b))
        return stalls

    def _take_over_stalled(self) -> bool:
        """Take the call slot of a batch that stalls (see ``_until_overdue``): it no
        longer counts against the limit, nor as a batch in flight for the queue's fill
        rule, so the batches after it go as usual while it hangs; it frees nothing when
        it ends. False if none stalls any more."""
        with self._board.lock:
            stalled = [b for due, b in self._stalls_locked(_monotonic()) if due <= 0.0]
            if not stalled:
                return False
            batch = stalled[0]
            batch.holds_slot = False
            in_flight, batch.in_flight = batch.in_flight, False
        if in_flight:
            self._controller.batch_ended()
        return True

    def _register(self, requests: list[Request], worker: Worker) -> Batch | None:
        """End a pop: make what it took a held batch at once, so that stop() always sees
        popped requests (in the queue, on the board, or being failed by this pop), never
        between them."""
        # From here on a request can no longer be cancelled; one already cancelled (or
        # completed by its caller, which the Future API allows) is dropped unprocessed
        # and counted as cancelled.
        live = start_all(requests)
        batch = Batch(live, worker) if live else None
        board = self._board
        with board.lock:
            late = self._gave_up
            if not late:
                self._popping -= 1
                if batch is not None:
                    board.active.add(batch)
        try:
            if len(live) != len(requests):
                self._count_cancelled(len(requests) - len(live))
                if not live:
                    self._controller.slots.release(wake=self._queue.closed)
                    return None
            if batch is not None and late:
                # stop() gave up on in-flight work while this pop ran: fail what it took
                # before stop's wait for pops (wait_for_pops) ends.
                self._controller.slots.release()
                self._delivery.fail_pending(live, ProcessorStoppedError(
                    "processor stopped before this request was dispatched"),
                    dispatched_at=batch.dispatched_at)
                return None
        finally:
            if late:
                with board.lock:
                    self._popping -= 1
                    if not self._popping:
                        board.settled.notify_all()
        if batch is not None:
            self._controller.batch_started()
            self._controller.slots.wake_dozer()
        return batch

    def _dispatch(self, batch: Batch, workspace: Workspace, target: int) -> None:
        if self._config.min_batch_interval > 0.0:
            self._pace()  # on the board meanwhile: stop() can abandon it
            batch.dispatched_at = _monotonic()
        try:
            self._executor.run(batch, workspace, target)
        finally:
            in_flight, holds_slot = self._board.finish(batch)
            if in_flight:
                self._controller.batch_ended()
            if holds_slot:
                self._controller.slots.release(wake=self._queue.closed)
        cfg = self._config
        if cfg.enable_memory_optimization and len(batch.requests) >= cfg.gc_batch_threshold:
            self._collect_young()

    def _pace(self) -> None:
        """Keep batch starts at least ``min_batch_interval`` apart, across workers. A
        start is taken once its time has come, and the next one counts from when it was
        taken: a worker woken late does not bring the start after it closer."""
        interval = self._config.min_batch_interval
        while True:
            with self._pace_lock:
                now = _monotonic()
                wait = self._next_start - now
                if wait <= 0.0:
                    self._next_start = now + interval
                    return
            if self._abandon_all.wait(wait):
                return  # stop() gave up on in-flight work

    def _collect_young(self) -> None:
        # Large batches leave many temporaries; a young-generation collection frees them
        # in microseconds (a full collection would stall this worker for milliseconds).
        # At most ten a second, whatever the batch rate.
        now = _monotonic()
        if now - self._last_gc >= 0.1:
            self._last_gc = now
            gc.collect(0)

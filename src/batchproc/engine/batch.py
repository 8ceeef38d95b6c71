"""A popped batch while a worker holds it: one state field with named transitions.

States::

    HELD ──begin_call──▶ CALLING ──end_call──▶ HELD ──begin_delivery──▶ DELIVERING
      ▲                                          │                         │
      └──────────────── end_delivery ◀───────────┴─────────────────────────┘
    HELD ──finish──▶ DONE          HELD or CALLING ──abandon──▶ ABANDONED
                                   any of the three ──give_up──▶ ABANDONED

A batch is HELD from its pop until its worker is done with it (bisection and delivery
move it between HELD, CALLING and DELIVERING any number of times). Exactly-once rests on
one rule: a batch's futures are completed by its worker only while it is DELIVERING, and
by whoever abandoned it (a time limit, or stop giving up) only after moving it to
ABANDONED. Stop may take a batch during a delivery: the requests of that delivery stay
the worker's to complete, the others are the abandoner's; once ABANDONED the worker
starts nothing more with it (no call, delivery or retry). Every transition runs under the
board's one lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .._native.future_state import Request
from ..errors import BatchOutputError

_monotonic = time.monotonic

HELD, CALLING, DELIVERING, DONE, ABANDONED = (
    "held", "calling", "delivering", "done", "abandoned")


class Batch:
    """The requests one worker popped together."""

    __slots__ = ("answered", "call_started", "callbacks_started", "calling", "deferred",
                 "delivering", "delivery_started", "dispatched_at", "holds_slot",
                 "in_flight", "requests", "state", "uncut", "worker")

    def __init__(self, requests: list[Request], worker: Any) -> None:
        self.requests = requests
        self.worker = worker
        self.state = HELD
        self.dispatched_at = _monotonic()
        self.call_started = 0.0  # when the current call began (state CALLING)
        # The requests of the current (or last) call: a search runs parts of the batch.
        self.calling: list[Request] | None = None
        # The requests of the current delivery (state DELIVERING): its worker completes
        # them even if stop takes the batch meanwhile.
        self.delivering: list[Request] = []
        self.delivery_started = 0.0  # when the current delivery began (state DELIVERING)
        # A resource, not a state: one of the controller's call slots, held from the pop
        # until the model is free again (delivery, the end, or abandonment).
        self.holds_slot = True
        # Counted by the queue's fill rule as a batch in flight (Controller.batch_started)
        # until the delivery of all its requests begins, it ends, or its stalled call's
        # slot is taken over: exactly one batch_ended() each.
        self.in_flight = True
        # Requests of it its calls answered with results (Executor._try): after its first
        # call failed, those of its failure search.
        self.answered = 0
        # The error of its first call whose output could not be cut into its requests'
        # parts: from then on its requests run alone (Executor._try).
        self.uncut: BatchOutputError | None = None
        # During a failure search, the futures it completed whose done-callbacks wait
        # for the end of its calls (a callback of one part must not hold up the next
        # part's call, nor wait for its result); None: callbacks run at delivery.
        # Taken once, under the board's lock (take_deferred), by its worker at the end
        # or by whoever abandons it.
        self.deferred: list[Any] | None = None
        # When the thread that took them began running those callbacks (0.0: not now).
        self.callbacks_started = 0.0


class Board:
    """The batches held by workers, and the lock every transition takes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: set[Batch] = set()
        # Notified when a delivery ends while stop is waiting for deliveries.
        self.settled = threading.Condition(self.lock)
        self.closing = False
        # Set by stop just before it takes what is left in the queue for the last time:
        # nothing accepted already may be queued again after that (Engine.push_accepted).
        self.sealed = False
        # When the latest call that returned (not abandoned) had begun (time.monotonic();
        # 0.0: none yet): whether the model still answers while calls are stuck (health).
        self.returned_call_began = 0.0

    def begin_call(self, batch: Batch, requests: list[Request]) -> bool:
        with self.lock:
            if batch.state is not HELD:
                return False
            batch.state = CALLING
            batch.calling = requests
            batch.call_started = _monotonic()
            return True

    def end_call(self, batch: Batch) -> bool:
        """False if the batch was abandoned during the call: its result is discarded."""
        with self.lock:
            if batch.state is not CALLING:
                return False
            batch.state = HELD
            if batch.call_started > self.returned_call_began:
                self.returned_call_began = batch.call_started
            return True

    def other_calling(self, batch: Batch) -> bool:
        """Whether a batch other than ``batch`` is in its model call."""
        if len(self.active) < 2:
            return False  # ``batch`` alone (a read that races only a batch's arrival)
        with self.lock:
            return any(b.state is CALLING for b in self.active if b is not batch)

    def begin_delivery(self, batch: Batch, requests: list[Request],
                       keep_slot: bool) -> tuple[bool, bool, bool]:
        """Complete ``requests`` (of ``batch``) next: (may deliver, held a call slot that
        the caller must now release, still counted as in flight: the caller must now end
        that). With ``keep_slot`` the batch keeps its slot until ``finish`` (see
        ``Delivery.deliver``). Delivering the whole batch ends its flight: its calls are
        over, so a pop from now on (another worker's, during this delivery, or this
        worker's after it) judges the requests carried across them alike."""
        with self.lock:
            if batch.state is not HELD:
                return False, False, False
            batch.state = DELIVERING
            batch.delivering = requests
            batch.delivery_started = _monotonic()
            in_flight = False
            if len(requests) == len(batch.requests):
                in_flight, batch.in_flight = batch.in_flight, False
            if keep_slot:
                return True, False, in_flight
            holds, batch.holds_slot = batch.holds_slot, False
            return True, holds, in_flight

    def end_delivery(self, batch: Batch, deferred: list[Any] | None = None,
                     ) -> list[Any] | None:
        """The delivery is over; its ``deferred`` callbacks join the batch's, or, when the
        batch's were taken already (abandoned meanwhile), are returned to run now."""
        with self.lock:
            if batch.state is DELIVERING:  # else stop gave up on it during the delivery
                batch.state = HELD
            batch.delivering = []
            if deferred and batch.deferred is not None:
                batch.deferred.extend(deferred)
                deferred = None
            if self.closing:
                self.settled.notify_all()  # stop may be waiting for this delivery
        return deferred

    def take_deferred(self, batch: Batch) -> list[Any]:
        """The batch's deferred callbacks, to run now; from here on its deliveries run
        their own."""
        with self.lock:
            deferred, batch.deferred = batch.deferred, None
        return deferred or []

    def finish(self, batch: Batch) -> tuple[bool, bool]:
        """The worker is done: (it still counted as in flight, it held a call slot)."""
        with self.lock:
            self.active.discard(batch)
            holds, batch.holds_slot = batch.holds_slot, False
            in_flight, batch.in_flight = batch.in_flight, False
            if batch.state is not ABANDONED:
                batch.state = DONE
            return in_flight, holds

    def abandon(self, which: Callable[[Batch], bool]) -> list[tuple[Batch, bool, bool]]:
        """Take every HELD or CALLING batch ``which`` picks: [(batch, held a slot, still
        counted as in flight)]."""
        taken = []
        with self.lock:
            for batch in self.active:
                if batch.state in (HELD, CALLING) and which(batch):
                    batch.state = ABANDONED
                    holds, batch.holds_slot = batch.holds_slot, False
                    in_flight, batch.in_flight = batch.in_flight, False
                    taken.append((batch, holds, in_flight))
        return taken

    def give_up(self) -> list[tuple[Batch, bool, bool, list[Request]]]:
        """Stop gives up on in-flight work: take every batch still held, being called or
        being delivered: [(batch, held a call slot, still counted as in flight, its
        requests the taker must fail)].
        The requests of a delivery in progress are left out: their worker completes them
        (it is doing so now); it starts nothing more with the batch."""
        taken = []
        with self.lock:
            for batch in self.active:
                if batch.state in (HELD, CALLING, DELIVERING):
                    delivering = {id(r) for r in batch.delivering}
                    batch.state = ABANDONED
                    holds, batch.holds_slot = batch.holds_slot, False
                    in_flight, batch.in_flight = batch.in_flight, False
                    taken.append((batch, holds, in_flight,
                                  [r for r in batch.requests if id(r) not in delivering]))
        return taken

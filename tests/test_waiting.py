"""A caller blocked in ``result()``: its short busy wait (native, without the GIL), the
one-spinner rule, and the lock it parks on after. Orderings are made to happen: a spin
of up to a second, observed through the module's counts, stands in for "the result
came while the caller spun"."""

import concurrent.futures as cf
import decimal
import math
import os
import random
import signal
import sys
import threading
import time

import pytest
from waiting import collection_runs, wait_for

from batchproc import futures
from batchproc._native import waiting as native
from batchproc._native.request_queue import RequestQueue
from batchproc.futures import RESULT_SPIN, RequestFuture, result_spin, set_result_spin

LONG_SPIN = 1.0  # longer than any step of a test: the caller is still spinning


@pytest.fixture
def spin():
    """Set the result spin for one test; put the one in force back after it."""
    before = native.get_spin()
    wait_for(lambda: native.spin_counts()[0] == 0, "no thread spinning")
    native._reset_spin_score()
    park_cost = native.park_cost()
    native._set_park_cost(0.0)  # none measured: each wait spins for the setting
    yield set_result_spin
    set_result_spin(before)
    native._reset_spin_score()
    native._set_park_cost(park_cost)
    native._set_stretch_limit(native.SPIN_STRETCH_LIMIT)
    native._set_linger_max(native.LINGER_MAX)
    native._set_main_spin_max(native.MAIN_SPIN_MAX)


def _counts():
    spinning, spun, caught, crowded = native.spin_counts()
    return {"spinning": spinning, "spun": spun, "caught": caught, "crowded": crowded}


def _worker_lets_go():
    """What a worker does after a delivery: wait for requests, the GIL dropped (a caught
    spin waits for this before it takes the GIL back)."""
    assert RequestQueue(4).pop_batch(1, timeout=1e-3) == []


def _waiter(future, out, timeout=None):
    def run():
        try:
            out.append(("result", future.result(timeout)))
        except BaseException as exc:  # the test looks at which
            out.append(("raised", type(exc)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _answered_while_spinning(value):
    """A caller waits on a new future; its result is set while the caller spins (under
    a long spin), then a worker lets go of the GIL: what the caller got."""
    future, out = RequestFuture(), []
    thread = _waiter(future, out)
    wait_for(lambda: _counts()["spinning"] == 1, "the caller spinning")
    future.set_result(value)
    _worker_lets_go()
    thread.join(10)
    return out


def test_a_result_set_while_the_caller_spins_reaches_it_without_parking(spin):
    spin(LONG_SPIN)
    before = _counts()
    assert _answered_while_spinning(7) == [("result", 7)]
    after = _counts()
    assert after["spun"] - before["spun"] == 1
    assert after["caught"] - before["caught"] == 1
    assert after["spinning"] == 0


def test_a_cancel_while_the_caller_spins_ends_its_wait(spin):
    spin(LONG_SPIN)
    future, out = RequestFuture(), []
    thread = _waiter(future, out)
    wait_for(lambda: _counts()["spinning"] == 1, "the caller spinning")
    assert future.cancel()
    _worker_lets_go()
    thread.join(10)
    assert out == [("raised", cf.CancelledError)]


def test_a_second_caller_parks_at_once_while_another_spins(spin):
    spin(LONG_SPIN)
    before = _counts()
    first, second = RequestFuture(), RequestFuture()
    out_first, out_second = [], []
    spinning = _waiter(first, out_first)
    wait_for(lambda: _counts()["spinning"] == 1, "the first caller spinning")
    parked = _waiter(second, out_second)
    wait_for(lambda: _counts()["crowded"] > before["crowded"], "the second caller parking")
    second.set_result("b")
    parked.join(10)
    # Answered through its lock while the first still spins: it never waited its turn.
    assert out_second == [("result", "b")]
    assert out_first == []
    first.set_result("a")
    _worker_lets_go()
    spinning.join(10)
    assert out_first == [("result", "a")]
    after = _counts()
    assert after["spun"] - before["spun"] == 1
    assert after["crowded"] - before["crowded"] == 1


def test_a_spin_that_ends_without_the_result_parks_until_it_comes(spin):
    spin(1e-3)
    before = _counts()
    future, out = RequestFuture(), []
    thread = _waiter(future, out)
    wait_for(lambda: _counts()["spun"] > before["spun"] and _counts()["spinning"] == 0,
             "the spin over")
    assert out == []
    future.set_exception(KeyError("k"))
    thread.join(10)
    assert out == [("raised", KeyError)]
    assert _counts()["caught"] == before["caught"]


def test_a_timeout_shorter_than_the_spin_ends_the_wait_at_the_timeout(spin):
    spin(LONG_SPIN)
    future = RequestFuture()
    started = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.02)
    # A spin of a whole second would have run past this bound.
    assert time.monotonic() - started < 0.5 * LONG_SPIN
    assert _counts()["spinning"] == 0


@pytest.mark.parametrize("timeout", [0, -1.0, 0.0, math.nan])
def test_a_timeout_of_zero_or_less_neither_spins_nor_blocks(spin, timeout):
    spin(LONG_SPIN)
    before = _counts()
    with pytest.raises(cf.TimeoutError):
        RequestFuture().result(timeout=timeout)
    assert _counts()["spun"] == before["spun"]


def test_no_spin_means_no_spin(spin):
    spin(0.0)
    before = _counts()
    future, out = RequestFuture(), []
    thread = _waiter(future, out)
    future.set_result(1)
    thread.join(10)
    assert out == [("result", 1)]
    assert _counts()["spun"] == before["spun"]


class Interrupted(Exception):
    pass


def _interrupted_in_result(when, what, future=None):
    """The main thread blocks in ``future.result()`` (a new future by default; timeout
    30 s); once ``when()`` holds, another thread sends it a signal whose handler raises
    ``Interrupted`` (as Ctrl-C's raises KeyboardInterrupt). Seconds until result()
    raised it."""

    def handler(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, handler)
    main = threading.main_thread().ident

    def interrupt():
        wait_for(when, what)
        signal.pthread_kill(main, signal.SIGUSR1)

    helper = threading.Thread(target=interrupt, daemon=True)
    started = time.monotonic()
    try:
        helper.start()
        with pytest.raises(Interrupted):
            (future or RequestFuture()).result(timeout=30)
        return time.monotonic() - started
    finally:
        helper.join(10)
        signal.signal(signal.SIGUSR1, previous)


def test_a_parked_result_stays_interruptible(spin):
    """A signal handler that raises ends a blocked result() on the main thread, as it
    ends a blocked lock acquire."""
    spin(1e-3)
    before = _counts()
    _interrupted_in_result(
        lambda: _counts()["spun"] > before["spun"] and _counts()["spinning"] == 0,
        "the main thread's spin over")


def test_an_interrupted_result_leaves_no_sleeper_on_its_future(spin):
    """Each interrupted wait made a sleeper (and its lock), held by the future until
    it completed."""
    spin(0.0)
    future = RequestFuture()
    for _ in range(3):
        _interrupted_in_result(lambda: future._sleepers and future._sleepers[0].parked,
                               "the main thread parked", future)
    assert not future._sleepers
    future.set_result(1)
    assert future.result(timeout=0) == 1


@pytest.mark.parametrize(("cpus", "expected"), [
    (1.0, 0.0), (1.5, 0.0), (1.999, 0.0), (2.0, RESULT_SPIN), (64.0, RESULT_SPIN)])
def test_callers_spin_only_with_two_cpus_or_more(cpus, expected):
    assert result_spin(cpus) == expected


@pytest.mark.parametrize("bad", [-1e-6, 1.5, math.nan, math.inf, -math.inf])
def test_a_spin_out_of_range_is_refused(spin, bad):
    spin(2e-5)
    with pytest.raises(ValueError, match="spin"):
        set_result_spin(bad)
    assert native.get_spin() == 2e-5


def test_a_spin_that_is_no_number_is_refused(spin):
    with pytest.raises(TypeError):
        set_result_spin("fast")


def test_the_first_wait_sets_the_spin_from_the_cpus(monkeypatch, spin):
    monkeypatch.setattr(futures, "_spin_unset", True)
    monkeypatch.setattr("batchproc.engine.cpus.usable_cpus", lambda: 1.0)
    native.set_spin(LONG_SPIN)
    future = RequestFuture()
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=1e-3)
    assert native.get_spin() == 0.0 and futures._spin_unset is False


@pytest.mark.parametrize(("cpus", "expected"), [(1.0, 0.0), (2.0, RESULT_SPIN)])
def test_reading_the_spin_before_any_wait_gives_the_default(monkeypatch, spin, cpus,
                                                             expected):
    monkeypatch.setattr(futures, "_spin_unset", True)
    monkeypatch.setattr("batchproc.engine.cpus.usable_cpus", lambda: cpus)
    native.set_spin(LONG_SPIN)
    assert futures.get_result_spin() == expected


def test_reading_the_spin_gives_the_setting(spin):
    spin(2e-5)
    assert futures.get_result_spin() == 2e-5
    spin(0.0)
    assert futures.get_result_spin() == 0.0


class TestSleeper:
    def test_released_before_the_wait(self):
        s = native.Sleeper()
        assert s.wait(0) is False and not s.released
        s.release()
        assert s.released
        assert s.wait() is True and s.wait(0) is True and s.wait(5) is True

    def test_a_second_release_raises_as_a_lock_does(self):
        s = native.Sleeper()
        s.release()
        with pytest.raises(RuntimeError):
            s.release()

    def test_a_wait_that_times_out_answers_false(self, spin):
        spin(1e-4)
        assert native.Sleeper().wait(0.01) is False

    @pytest.mark.parametrize("spin_s", [0.0, 1e-4])
    def test_a_release_from_another_thread_wakes_a_parked_wait(self, spin, spin_s):
        spin(spin_s)
        s, woken = native.Sleeper(), []
        before = _counts()

        def wait():
            woken.append(s.wait(30))

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        if spin_s:
            wait_for(lambda: _counts()["spun"] > before["spun"]
                     and _counts()["spinning"] == 0, "the spin over")
        s.release()
        thread.join(10)
        assert woken == [True]

    @pytest.mark.parametrize("timeout", [math.inf, 1e300])
    def test_a_timeout_past_what_a_thread_can_wait_waits_for_the_release(self, spin, timeout):
        spin(0.0)
        s, woken = native.Sleeper(), []
        thread = threading.Thread(target=lambda: woken.append(s.wait(timeout)), daemon=True)
        thread.start()
        s.release()
        thread.join(10)
        assert woken == [True]


def _let_go():
    count, lingering, handed = native.let_go_counts()
    return {"count": count, "lingering": lingering, "handed": handed}


def test_a_caught_spin_takes_the_gil_back_once_a_worker_lets_go_of_it(spin):
    """The release is seen while the releasing thread still holds the GIL; the caller
    goes on spinning until a consumer drops the GIL to wait for requests, instead of
    blocking on the GIL and being woken when it is dropped."""
    spin(LONG_SPIN)
    native._set_linger_max(LONG_SPIN)  # long enough to be seen waiting
    before = _let_go()
    future, out = RequestFuture(), []
    thread = _waiter(future, out)
    wait_for(lambda: _counts()["spinning"] == 1, "the caller spinning")
    future.set_result(3)
    wait_for(lambda: _let_go()["lingering"] == 1, "the caller waiting for a let-go")
    _worker_lets_go()
    thread.join(10)
    assert out == [("result", 3)]
    after = _let_go()
    assert after["handed"] - before["handed"] == 1
    assert after["count"] > before["count"] and after["lingering"] == 0


def test_a_caught_spin_with_no_let_go_takes_the_gil_at_its_limit(spin):
    spin(LONG_SPIN)  # caught for sure: the release comes while it spins
    before = _counts()
    future, out = RequestFuture(), []
    thread = _waiter(future, out)
    wait_for(lambda: _counts()["spinning"] == 1, "the caller spinning")
    future.set_result(4)
    # Unless a thread lets go of the GIL meanwhile, the caller takes it at its linger
    # limit (30 us).
    thread.join(10)
    assert out == [("result", 4)]
    assert _let_go()["lingering"] == 0 and _counts()["spinning"] == 0
    assert _counts()["spun"] - before["spun"] == 1
    assert _counts()["caught"] - before["caught"] == 1


@pytest.mark.parametrize("spin_s", [0.0, 1e-3])
def test_a_consumer_waiting_for_items_counts_as_a_let_go(spin_s):
    queue = RequestQueue(4)
    queue.spin = spin_s
    queue.push("x")
    assert queue.pop_batch(1) == ["x"]  # a push a moment ago: the next pop may spin
    before = _let_go()["count"]
    assert queue.pop_batch(1, timeout=2e-3) == []
    assert _let_go()["count"] > before


def test_a_caller_beginning_to_spin_counts_as_a_let_go(spin):
    """A worker whose spin caught a caller's push waits for this before it takes the GIL
    back (RequestQueue's linger_for_let_go): the caller is about to let go of it."""
    spin(LONG_SPIN)
    future, out = RequestFuture(), []
    before = _let_go()["count"]
    thread = _waiter(future, out)
    # Its place as the spinner is claimed just before it lets go of the GIL.
    wait_for(lambda: _let_go()["count"] > before, "the caller letting go as it spins")
    assert _counts()["spinning"] == 1
    future.set_result(5)
    _worker_lets_go()
    thread.join(10)
    assert out == [("result", 5)]


def test_a_caller_beginning_to_spin_ends_a_pops_wait_for_its_let_go(spin):
    """A pop that a spin caught waits, the GIL released, for the thread that pushed to
    let go of the GIL; a caller does as it begins to wait for its result."""
    from batchproc._native import request_queue

    spin(LONG_SPIN)
    request_queue._set_pop_linger(LONG_SPIN * 10)  # only a let-go ends it in the test
    try:
        queue = RequestQueue(4)
        queue.spin, queue.spin_window = LONG_SPIN * 10, 1e9
        popped = []
        pop = threading.Thread(target=lambda: popped.append(queue.pop_batch(1, timeout=10)))
        pop.start()
        wait_for(lambda: queue._spins()[0] == 1, "the pop spinning")
        future = RequestFuture()
        queue.push(future)
        wait_for(lambda: queue._lingers()[0] == 1, "the pop waiting for a let-go")
        assert pop.is_alive()
        out = []
        caller = _waiter(future, out)  # its spin begins: a let-go
        pop.join(10)
        assert popped == [[future]] and queue._lingers() == (1, 1, 1.0)
        future.set_result(6)
        _worker_lets_go()
        caller.join(10)
        assert out == [("result", 6)]
    finally:
        request_queue._set_pop_linger(request_queue.POP_LINGER)


def test_a_wait_parks_without_making_an_object_the_collector_tracks(spin):
    """A collection runs Python code, and other threads with it: one started by making
    the park lock, between the wait's look at its flag and the lock's publication, could
    release the sleeper unseen. The park lock is a C lock, so no collection can start
    there (with an object in its place, the release runs inside the wait, and the wait
    sees it)."""
    spin(0.0)
    sleeper = native.Sleeper()
    wait = sleeper.wait
    with collection_runs(sleeper.release) as collection:
        woken = wait(0.05)
        ran = collection.ran
    assert (woken, ran) == (False, False)
    assert sleeper.parked


def _miss():
    """A wait whose spin ends without its result (a short timeout after the spin)."""
    with pytest.raises(cf.TimeoutError):
        RequestFuture().result(timeout=3e-4)


def test_waits_stop_spinning_once_spins_do_not_pay_but_for_a_probe(spin):
    spin(1e-4)
    misses = 0
    while native.spin_score()[0] >= 0.5:
        _miss()
        misses += 1
        assert misses < 50, "the score never fell"
    # An average over about eight spins: a few misses are not enough, many are.
    assert 3 <= misses <= 8
    before, declined = _counts(), native.spin_score()[1]
    for _ in range(2 * native.PROBE_EVERY):
        _miss()
    # One wait in PROBE_EVERY spins to find out whether spinning pays again.
    assert _counts()["spun"] - before["spun"] == 2
    assert native.spin_score()[1] - declined == 2 * native.PROBE_EVERY - 2


def test_a_spin_that_sees_its_result_raises_the_score(spin):
    spin(LONG_SPIN)
    for _ in range(3):
        with pytest.raises(cf.TimeoutError):
            RequestFuture().result(timeout=1e-3)  # the spin cut to the timeout: a miss
    low = native.spin_score()[0]
    assert 0.5 <= low < 1.0
    assert _answered_while_spinning(1) == [("result", 1)]
    assert native.spin_score()[0] > low


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_child_forked_while_a_caller_spins_may_spin(spin):
    """The spinning thread is not in the child: its place must not stay taken there."""
    spin(LONG_SPIN)
    future, out = RequestFuture(), []
    thread = _waiter(future, out)
    wait_for(lambda: _counts()["spinning"] == 1, "the caller spinning")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its spinning count, then leave at once
        try:
            os.write(write, str(native.spin_counts()[0]).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 16) == b"0"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
        future.set_result(None)
        _worker_lets_go()
        thread.join(10)


def test_a_signal_during_the_spin_is_handled_when_it_ends(spin):
    """Ctrl-C while the main thread spins in result(): the spin ends, the handler runs,
    instead of the signal being left for a wait that nothing may end."""
    spin(0.2)
    native._set_main_spin_max(0.2)  # long enough to be seen spinning
    waited = _interrupted_in_result(lambda: _counts()["spinning"] == 1,
                                    "the main thread spinning")
    assert waited < 15  # not the 30 s timeout


def test_a_result_set_by_another_thread_is_not_held_for_a_let_go(spin):
    """A future completed by a thread that never drops the GIL to wait for requests:
    the caught spin waits for a let-go LINGER_MAX at most, not the whole spin again."""
    spin(LONG_SPIN)
    future, out = RequestFuture(), []
    thread = _waiter(future, out)
    wait_for(lambda: _counts()["spinning"] == 1, "the caller spinning")
    set_at = time.monotonic()
    future.set_result(2)
    thread.join(10)
    assert out == [("result", 2)]
    assert time.monotonic() - set_at < 0.5 * LONG_SPIN


@pytest.mark.parametrize("timeout", ["0.01", b"1", decimal.Decimal("0.01"), [1]])
def test_a_timeout_that_is_no_number_is_refused_as_a_lock_refuses_it(timeout):
    with pytest.raises(TypeError):
        RequestFuture().result(timeout=timeout)


def test_the_main_thread_spins_no_longer_than_main_spin_max(spin):
    """Signal handlers run on the main thread once its spin ends: a long spin setting is
    cut there, so Ctrl-C is handled within MAIN_SPIN_MAX of a wait's start."""
    spin(LONG_SPIN)
    before = _counts()
    waited = _interrupted_in_result(
        lambda: _counts()["spun"] > before["spun"] and _counts()["spinning"] == 0,
        "the main thread's spin over")
    assert waited < 0.5 * LONG_SPIN


def test_a_spin_of_true_is_refused(spin):
    with pytest.raises(TypeError):
        set_result_spin(True)


# How long a spin lasts: the setting, stretched to two parks' cost (see the module).

def _parked_waiter(sleeper, out, timeout=None):
    thread = threading.Thread(target=lambda: out.append(sleeper.wait(timeout)), daemon=True)
    thread.start()
    wait_for(lambda: sleeper.parked, "the waiter parked")
    return thread


def test_a_park_costs_the_time_from_its_release_to_its_resumption(spin):
    spin(0.0)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # the GIL stays with this thread while it holds it below
    try:
        s, out = native.Sleeper(), []
        thread = _parked_waiter(s, out)
        s.release()
        # The waiter is woken and asks for the GIL, which this thread keeps 2 ms more.
        until = time.perf_counter() + 2e-3
        while time.perf_counter() < until:
            pass
        thread.join(10)
    finally:
        sys.setswitchinterval(switch)
    assert out == [True]
    assert 2e-3 <= native.park_cost() < 1.0


def test_a_park_that_times_out_costs_nothing(spin):
    spin(0.0)
    assert native.Sleeper().wait(1e-3) is False
    assert native.park_cost() == 0.0


def test_a_wait_released_before_it_parks_costs_nothing(spin):
    spin(0.0)
    s = native.Sleeper()
    s.release()
    assert s.wait() is True and not s.parked
    assert native.park_cost() == 0.0


@pytest.mark.parametrize(("setting", "park_cost", "length"), [
    (30e-6, 0.0, 30e-6),       # none measured: the setting
    (30e-6, 10e-6, 30e-6),     # parks cheaper than half the setting: the setting
    (30e-6, 40e-6, 80e-6),     # twice a park's cost
    (30e-6, 1.0, 30e-6 * 4),   # never more than SPIN_STRETCH_MAX times the setting
    (0.0, 1e-3, 0.0),          # spins off stay off
    (0.5e-3, 10.0, 1e-3),      # nor past SPIN_STRETCH_LIMIT
    (0.4e-3, 0.6e-3, 1e-3),
    (0.4e-3, 0.45e-3, 0.9e-3),
    (2e-3, 10.0, 2e-3),        # a setting past that limit stays as set
    (1.0, 10.0, 1.0),
])
def test_a_wait_spins_for_the_setting_or_twice_a_parks_cost(spin, setting, park_cost,
                                                              length):
    assert native.SPIN_STRETCH_MAX == 4 and native.SPIN_STRETCH_LIMIT == 1e-3
    spin(setting)
    native._set_park_cost(park_cost)
    assert native.spin_length() == pytest.approx(length)
    assert native.get_spin() == setting  # the setting itself unchanged


def test_a_spin_stretched_by_the_park_cost_catches_a_result_past_the_setting(spin):
    # Generous margins: a 0.2 s setting stretched to 0.8 s (the stretch's limit lifted
    # for the test); the result comes 0.4 s after the wait began, when a spin of the
    # setting alone would be over.
    spin(0.2)
    native._set_stretch_limit(1.0)  # put back by the fixture
    native._set_park_cost(1.0)
    before = _counts()
    future, out, began = RequestFuture(), [], []

    def wait():
        began.append(time.monotonic())
        out.append(future.result())

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    wait_for(lambda: _counts()["spinning"] == 1, "the caller spinning")
    wait_for(lambda: time.monotonic() >= began[0] + 0.4, "0.4 s into the wait")
    future.set_result("late")
    _worker_lets_go()
    thread.join(10)
    assert out == ["late"]
    assert _counts()["caught"] - before["caught"] == 1


def test_the_park_cost_settles_at_a_low_quantile_of_the_parks(spin):
    rng = random.Random(7)
    costs = [rng.uniform(10e-6, 110e-6) for _ in range(2000)]
    for cost in costs:
        native._record_park_cost(cost)
    # About the quarter below (PARK_COST_UP / (PARK_COST_UP + PARK_COST_DOWN)).
    assert native.PARK_COST_UP / (native.PARK_COST_UP + native.PARK_COST_DOWN) == 0.25
    ranked = sorted(costs)
    assert ranked[len(costs) // 10] < native.park_cost() < ranked[len(costs) // 2]


def test_a_park_held_up_by_the_gil_now_and_then_does_not_stretch_the_spin(spin):
    # One park in five kept 1 ms from the GIL (a worker delivering a long batch after the
    # release): the cost stays near the others' 40 us, not the mean (232 us).
    native._record_park_cost(40e-6)
    for k in range(500):
        native._record_park_cost(1e-3 if k % 5 == 0 else 40e-6)
    assert 30e-6 < native.park_cost() < 60e-6


def test_the_first_park_sets_the_cost(spin):
    native._record_park_cost(75e-6)
    assert native.park_cost() == 75e-6


def test_a_wait_after_one_that_timed_out_parks_on_the_same_lock_until_released(spin):
    spin(0.0)
    s, out = native.Sleeper(), []
    assert s.wait(1e-3) is False and s.parked
    assert s.wait(1e-3) is False  # still held: it blocked for its timeout
    thread = threading.Thread(target=lambda: out.append(s.wait(30)), daemon=True)
    thread.start()
    wait_for(lambda: thread.is_alive(), "the third wait")
    s.release()
    thread.join(10)
    assert out == [True]
    assert s.wait(1e-3) is True


# release_all: a worker wakes the parked callers of a batch together, the GIL released.

def test_release_all_wakes_the_parked_and_marks_the_rest_released(spin):
    spin(0.0)
    parked = [native.Sleeper() for _ in range(3)]
    later = native.Sleeper()  # its waiter has not come yet
    out = []
    threads = [_parked_waiter(s, out, timeout=30) for s in parked]
    lets_go = native.let_go_counts()[0]
    native.release_all([*parked, later])
    for thread in threads:
        thread.join(10)
    assert out == [True, True, True]
    assert later.released and not later.parked
    assert later.wait(30) is True and not later.parked
    # The GIL was let go once for the wake-ups (a caught spin waits for that).
    assert native.let_go_counts()[0] == lets_go + 1


def test_release_all_keeping_the_gil_wakes_the_parked_once_it_lets_go(spin):
    # For a worker whose next call waits for it: the callers it wakes run only once it
    # lets go of the GIL, not while it wakes the others.
    spin(0.0)
    parked = [native.Sleeper() for _ in range(3)]
    out = []
    threads = [_parked_waiter(s, out, timeout=30) for s in parked]
    lets_go = native.let_go_counts()[0]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # the GIL stays with this thread while it holds it below
    try:
        native.release_all(parked, keep_gil=True)
        resumed_before = list(out)
        let_go = native.let_go_counts()[0] - lets_go
    finally:
        sys.setswitchinterval(switch)
    for thread in threads:
        thread.join(10)
    assert resumed_before == [] and let_go == 0
    assert out == [True, True, True]
    assert all(s.released and s.parked for s in parked)


def test_release_all_with_no_parked_waiter_keeps_the_gil(spin):
    spin(0.0)
    sleepers = [native.Sleeper() for _ in range(4)]
    lets_go = native.let_go_counts()[0]
    native.release_all(sleepers)
    native.release_all([])
    assert all(s.released for s in sleepers)
    assert native.let_go_counts()[0] == lets_go


@pytest.mark.parametrize(("bad", "error"), [("released", RuntimeError), ("lock", TypeError)])
def test_release_all_wakes_the_others_before_it_raises(spin, bad, error):
    spin(0.0)
    first, last, out = native.Sleeper(), native.Sleeper(), []
    threads = [_parked_waiter(s, out, timeout=30) for s in (first, last)]
    if bad == "released":
        wrong = native.Sleeper()
        wrong.release()
    else:
        wrong = threading.Lock()
    with pytest.raises(error):
        native.release_all([first, wrong, last])
    for thread in threads:
        thread.join(10)
    assert out == [True, True]

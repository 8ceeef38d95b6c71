"""shielded.run: the work runs to its end, on a helper thread when called on the main
thread, and an interrupt of the wait is raised once, after it."""

import signal
import threading

import pytest

from batchproc import shielded

on_main = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                             reason="signal handlers run on the main thread")


@pytest.fixture
def sigint_raises():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@on_main
def test_on_the_main_thread_the_work_runs_on_a_named_helper_that_has_ended():
    seen = {}

    def work(shield):
        seen["thread"] = threading.current_thread()
        return 42

    assert shielded.run(work, name="batchproc-test") == 42
    assert seen["thread"].name == "batchproc-test"
    assert seen["thread"] is not threading.main_thread()
    assert not seen["thread"].is_alive()


@on_main
def test_an_exception_of_the_work_is_raised_by_run():
    def work(shield):
        raise ValueError("from the work")

    with pytest.raises(ValueError, match="from the work"):
        shielded.run(work)


def test_off_the_main_thread_the_work_runs_on_the_callers_thread():
    seen = {}

    def work(shield):
        seen["thread"] = threading.current_thread()
        seen["interrupted"] = shield.interrupted
        return "done"

    def caller():
        seen["result"] = shielded.run(work)

    thread = threading.Thread(target=caller)
    thread.start()
    thread.join(10)
    assert seen == {"thread": thread, "interrupted": False, "result": "done"}


@on_main
@pytest.mark.parametrize("times", [1, 3])
@pytest.mark.parametrize("to", ["main", "helper"])
def test_interrupts_of_the_wait_reach_nested_work_and_are_raised_once_after_it(
        sigint_raises, times, to):
    # The work signals the main thread (or itself: a signal the system hands to another
    # thread) and waits until its shield, shared by the nested run, says so.
    main = threading.main_thread().ident
    outcome = []

    def nested(shield):
        for _ in range(times):
            signal.pthread_kill(main if to == "main" else threading.get_ident(),
                                signal.SIGINT)
        outcome.append(shield.interrupted)
        for _ in range(1000):  # a bound, in case it never comes
            if shield.interrupted:
                break
            threading.Event().wait(0.01)
        outcome.append(shield.interrupted)
        return "finished"

    def work(shield):
        outcome.append(shielded.run(nested))

    with pytest.raises(KeyboardInterrupt):
        shielded.run(work)
    assert outcome[1:] == [True, "finished"]


@on_main
def test_the_work_runs_on_the_calling_thread_when_no_thread_can_be_started(monkeypatch):
    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(shielded, "_standby", None)  # a process that keeps none
    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert shielded.run(lambda shield: threading.current_thread()) is threading.main_thread()


def test_the_work_runs_on_the_standby_thread_when_no_new_thread_can_be_started(monkeypatch):
    # As at exit on CPython 3.12+: the thread kept parked from before runs it, shielded.
    monkeypatch.setattr(shielded, "THREADS_AT_EXIT", False)
    monkeypatch.setattr(shielded, "_standby", None)
    shielded.keep_standby()
    standby = shielded._standby
    assert standby is not None
    shielded.keep_standby()
    assert shielded._standby is standby  # one per process
    real_start = threading.Thread.start

    def refuse(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    ran_on = shielded.run(lambda shield: threading.current_thread())
    assert ran_on.name == "batchproc-standby" and ran_on is not threading.main_thread()
    monkeypatch.setattr(threading.Thread, "start", real_start)
    # It stays parked for the next one (a process's exit hook may run it twice).
    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert shielded.run(lambda shield: threading.current_thread()) is ran_on


def test_no_standby_is_kept_where_no_thread_can_be_started(monkeypatch):
    # Already exiting (a first processor started by an exit hook), or a thread limit:
    # keep_standby does without, and raises nothing.
    monkeypatch.setattr(shielded, "THREADS_AT_EXIT", False)
    monkeypatch.setattr(shielded, "_standby", None)

    def refuse(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    shielded.keep_standby()
    assert shielded._standby is None

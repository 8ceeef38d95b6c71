"""awaiters.complete: a batch's asyncio futures completed on their loop and their
awaiters woken in the same pass, as asyncio would wake them one handle each."""

import asyncio
import contextvars
import functools
import inspect
import subprocess
import sys
import threading

import pytest

from batchproc.aio import LoopChannel
from batchproc.awaiters import _take_all, complete

whose = contextvars.ContextVar("whose")


def _in_complete():
    """Whether this code runs inside ``awaiters.complete`` (woken in the flush's pass)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is complete.__code__:
            return True
        frame = frame.f_back
    return False


def _post_from_a_thread(channel, outcomes):
    thread = threading.Thread(target=channel.post_many, args=(outcomes,))
    thread.start()
    thread.join(10)


@pytest.mark.parametrize("debug", [False, True])
def test_awaiters_wake_in_their_own_context_in_the_flush_unless_debugging(debug):
    async def main():
        loop = asyncio.get_running_loop()
        loop.set_debug(debug)
        channel = LoopChannel(loop)
        futures = [loop.create_future() for _ in range(5)]

        async def awaiter(i):
            whose.set(i)
            value = await futures[i]
            return value, whose.get(), _in_complete()

        tasks = [asyncio.create_task(awaiter(i)) for i in range(5)]
        await asyncio.sleep(0)  # each task now waits on its future
        _post_from_a_thread(channel, [(f, True, i * 10) for i, f in enumerate(futures)])
        return await asyncio.gather(*tasks)

    woken_in_the_flush = not debug  # a debug loop keeps asyncio's own handles
    assert asyncio.run(main()) == [(i * 10, i, woken_in_the_flush) for i in range(5)]


def test_a_failing_callback_is_reported_as_its_handle_would_and_the_batch_goes_on():
    reported, seen = [], []

    def fails(_):
        raise ValueError("from a callback")

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(
            lambda _, context: reported.append((context, whose.get("unset"))))
        channel = LoopChannel(loop)
        futures = [loop.create_future() for _ in range(3)]
        whose.set("the adder")  # the context the callbacks are added in
        futures[0].add_done_callback(fails)
        for f in futures:
            f.add_done_callback(lambda f: seen.append(f.result()))
        done = asyncio.gather(*futures)
        _post_from_a_thread(channel, [(f, True, i) for i, f in enumerate(futures)])
        return await done

    assert asyncio.run(main()) == [0, 1, 2]
    assert seen == [0, 1, 2]
    assert len(reported) == 1
    context, seen_by_handler = reported[0]
    assert isinstance(context["exception"], ValueError)
    assert context["message"].startswith("Exception in callback ")
    assert "fails(" in context["message"]  # named as asyncio names it, with its source
    assert isinstance(context["handle"], asyncio.Handle)
    assert seen_by_handler == "the adder"  # in the callback's context


@pytest.mark.parametrize("escaping", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_from_a_callback_leaves_the_rest_to_asyncio(escaping):
    # As out of any callback, KeyboardInterrupt and SystemExit go on out of the loop;
    # what the flush had not done yet (the rest of this future's callbacks, the rest of
    # the batch) is completed and scheduled first, not lost.
    loop = asyncio.new_event_loop()
    try:
        channel = LoopChannel(loop)
        futures = [loop.create_future() for _ in range(3)]
        called = []

        def interrupts(_):
            called.append("interrupts")
            raise escaping()

        futures[0].add_done_callback(interrupts)
        for i, f in enumerate(futures):
            f.add_done_callback(lambda _, i=i: called.append(i))
        channel.post_many([(f, True, i) for i, f in enumerate(futures)])
        with pytest.raises(escaping):
            loop.run_forever()
        assert [f.done() for f in futures] == [True, True, True]
        assert called == ["interrupts"]
        loop.run_until_complete(asyncio.sleep(0))
        assert called == ["interrupts", 0, 1, 2]
        assert [f.result() for f in futures] == [0, 1, 2]
    finally:
        loop.close()


def test_an_awaiter_finds_every_future_of_its_batch_done():
    # As with set_result: a batch's futures are all done before any awaiter runs, so
    # one woken by the first (a hedged request) cannot cancel a sibling's result.
    calls = []

    async def main():
        loop = asyncio.get_running_loop()
        channel = LoopChannel(loop)
        first, second, third = (loop.create_future() for _ in range(3))

        def on_first(_):
            calls.append(("cancel second", second.cancel(), third.done()))
            third.add_done_callback(lambda f: calls.append(("added", f.result())))

        first.add_done_callback(on_first)
        second.add_done_callback(lambda f: calls.append(("second", f.result())))
        done = asyncio.gather(first, second, third)
        _post_from_a_thread(channel, [(first, True, 1), (second, True, 2), (third, True, 3)])
        return await done

    assert asyncio.run(main()) == [1, 2, 3]
    assert sorted(calls) == [("added", 3), ("cancel second", False, True), ("second", 2)]


NESTED_RUN = """
import asyncio, threading, nest_asyncio
from batchproc.aio import LoopChannel
nest_asyncio.apply()  # patches asyncio for the whole process: hence a child process

async def main():
    loop = asyncio.get_running_loop()
    channel = LoopChannel(loop)
    first, second = loop.create_future(), loop.create_future()

    async def waits_for_second():
        return await second

    async def woken_by_first(other):
        await first
        # A synchronous helper that runs the loop until another task is done: that
        # task's wake-up is a callback of the same batch, not run yet.
        return loop.run_until_complete(other)

    task = asyncio.ensure_future(woken_by_first(asyncio.ensure_future(waits_for_second())))
    await asyncio.sleep(0)
    threading.Thread(target=channel.post_many,
                     args=([(first, True, 1), (second, True, 2)],)).start()
    print(await asyncio.wait_for(task, 10))

asyncio.run(main())
"""


def test_a_loop_run_inside_a_woken_task_runs_the_rest_of_the_batch():
    # nest_asyncio lets a coroutine run its own loop again (Jupyter); the nested run
    # must find the callbacks the flush has not run yet in the loop's queue, or it
    # waits on them for ever.
    child = subprocess.run([sys.executable, "-c", NESTED_RUN], capture_output=True,
                           text=True, timeout=30)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "2"


def test_failures_reach_their_awaiters_as_callers_get_them():
    async def main():
        loop = asyncio.get_running_loop()
        channel = LoopChannel(loop)
        futures = [loop.create_future() for _ in range(3)]
        done = asyncio.gather(*futures, return_exceptions=True)
        _post_from_a_thread(channel, [(futures[0], False, ValueError("bad item")),
                                      (futures[1], False, StopIteration()),
                                      (futures[2], True, "ok")])
        return await done

    bad, stop, ok = asyncio.run(main())
    assert isinstance(bad, ValueError) and str(bad) == "bad item"
    assert type(stop) is RuntimeError  # an asyncio future refuses a StopIteration
    assert ok == "ok"


def test_without_its_loop_the_futures_complete_and_asyncio_schedules_the_callbacks():
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        called = []
        future.add_done_callback(lambda f: called.append(f.result()))
        complete(None, [(future, True, 7)])
        assert future.result() == 7 and called == []  # scheduled, not run
        loop.run_until_complete(asyncio.sleep(0))
        assert called == [7]
    finally:
        loop.close()


def test_called_from_inside_a_task_it_leaves_the_waking_to_asyncio():
    # A task's wake-up cannot run inside another running task (asyncio refuses to enter
    # a task while one runs): from a task, the callbacks are scheduled as usual.
    async def main():
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(3)]

        async def awaiter(f):
            return await f, _in_complete()

        tasks = [asyncio.create_task(awaiter(f)) for f in futures]
        await asyncio.sleep(0)
        complete(loop, [(f, True, i) for i, f in enumerate(futures)])
        await asyncio.wait(tasks, timeout=10)  # a task never woken stays pending
        return [t.result() if t.done() else "never woken" for t in tasks]

    # Not asyncio.run: its shutdown would wait for a task that is never woken.
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(main()) == [(0, False), (1, False), (2, False)]
    finally:
        loop.close()


class _NaiveEquality:
    """A callback object whose ``__eq__`` assumes the other side is one of its own."""

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, future):
        self.calls.append(future.result())

    def __eq__(self, other):
        return self.calls is other.calls  # AttributeError for anything else

    __hash__ = object.__hash__


def test_callbacks_that_define_equality_are_left_to_asyncio():
    # Taking callbacks off a future compares them with ==: a future holding one whose
    # __eq__ raises (or lies) is completed as set_result would, its callbacks scheduled.
    calls = []

    async def main():
        loop = asyncio.get_running_loop()
        channel = LoopChannel(loop)
        odd, plain = loop.create_future(), loop.create_future()
        odd.add_done_callback(_NaiveEquality(calls))
        shielded = asyncio.shield(odd)  # a second callback, compared with the first
        done = asyncio.gather(plain, shielded)
        _post_from_a_thread(channel, [(odd, True, 1), (plain, True, 2)])
        return await asyncio.wait_for(done, 10)

    assert asyncio.run(main()) == [2, 1]
    assert calls == [1]


def _lines_of(function):
    """The lines of ``function`` inside its first ``try:`` if it has one (before it,
    nothing is done: an interrupt there loses the batch, as it would before any
    callback), else all of them (``complete``'s ``try:`` is around its calls)."""
    source, first = inspect.getsourcelines(function)
    start = first + next((i for i, text in enumerate(source) if text.strip() == "try:"), 0)
    return sorted({line for _, _, line in function.__code__.co_lines()
                   if line is not None and line > start})


def _interrupted_batch(line, interrupt, traced=complete, added=None):
    """Four tasks awaiting one batch; ``interrupt(tasks)`` runs at the first time
    ``traced`` reaches ``line`` (as a signal's handler would, between two calls).
    Returns what each task ended with once the loop has run again; nothing may reach
    the loop's exception handler. ``added``: a list the futures' extra done-callbacks
    were added to (``_with_duplicates``), and append to."""
    loop = asyncio.new_event_loop()
    reported = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    previous = sys.gettrace()
    try:
        channel = LoopChannel(loop)
        futures = [loop.create_future() for _ in range(4)]

        async def awaiter(future):
            return await future

        tasks = [loop.create_task(awaiter(f)) for f in futures]
        loop.run_until_complete(asyncio.sleep(0))  # each task now awaits its future
        if added is not None:
            for future in futures:
                _with_duplicates(future, added)
        fired = []

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == line and not fired:
                fired.append(line)
                interrupt(tasks)
            return local

        def trace(frame, event, arg):
            return local if frame.f_code is traced.__code__ else None

        channel.post_many([(f, True, i) for i, f in enumerate(futures)])
        sys.settrace(trace)
        try:
            loop.run_until_complete(asyncio.sleep(0.01))
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(previous)
        loop.run_until_complete(asyncio.wait(tasks, timeout=10))
        assert reported == []  # nothing went wrong in the flush
        return [("cancelled" if t.cancelled() else t.result()) if t.done() else "pending"
                for t in tasks]
    finally:
        sys.settrace(previous)
        loop.close()


def _raise_keyboard_interrupt(tasks):
    raise KeyboardInterrupt


@pytest.mark.parametrize("line", _lines_of(complete))
def test_an_interrupt_anywhere_in_the_flush_leaves_every_awaiter_its_result(line):
    # KeyboardInterrupt out of a signal's handler between any two lines: every task is
    # still resumed with its own result once the loop runs again.
    assert _interrupted_batch(line, _raise_keyboard_interrupt) == [0, 1, 2, 3]


@pytest.mark.parametrize("line", _lines_of(complete))
def test_a_cancellation_anywhere_in_the_flush_still_resumes_its_task(line):
    # asyncio.run's SIGINT handler cancels the main task (and so the future it awaits)
    # between any two calls: the cancelled task must still be resumed to end.
    ended = _interrupted_batch(line, lambda tasks: tasks[0].cancel())
    assert ended[0] in ("cancelled", 0)
    assert ended[1:] == [1, 2, 3]


def _with_duplicates(future, calls):
    """Add two callbacks to ``future``, one of them twice: ``calls`` gets ("a", value),
    ("b", value), ("a", value) when they run, in that order, as asyncio runs them."""
    def a(f):
        calls.append(("a", f.result() if not f.cancelled() else "cancelled"))

    b = functools.partial(lambda tag, f: calls.append(
        (tag, f.result() if not f.cancelled() else "cancelled")), "b")
    for callback in (a, b, a):
        future.add_done_callback(callback)


@pytest.mark.parametrize("debug", [False, True])
def test_a_callback_added_twice_runs_twice_in_its_order(debug):
    # remove_done_callback takes off every copy at once: the flush ran one of them.
    async def main():
        loop = asyncio.get_running_loop()
        loop.set_debug(debug)
        channel = LoopChannel(loop)
        calls, appended = [], []
        futures = [loop.create_future() for _ in range(2)]
        for future in futures:
            _with_duplicates(future, calls)
            for _ in range(2):  # equal, not the same object: a bound method read twice
                future.add_done_callback(appended.append)
        _post_from_a_thread(channel, [(f, True, i) for i, f in enumerate(futures)])
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        await asyncio.sleep(0)  # in debug mode asyncio runs them on its next turn
        return calls, appended, futures

    calls, appended, futures = asyncio.run(main())
    assert calls == [("a", 0), ("b", 0), ("a", 0), ("a", 1), ("b", 1), ("a", 1)]
    assert appended == [futures[0]] * 2 + [futures[1]] * 2


@pytest.mark.parametrize("line", _lines_of(_take_all))
def test_an_interrupt_while_taking_duplicates_runs_each_callback_as_often(line):
    calls = []
    assert _interrupted_batch(line, _raise_keyboard_interrupt, _take_all, calls) == [
        0, 1, 2, 3]
    assert sorted(calls) == sorted([("a", v) for v in range(4)] * 2
                                   + [("b", v) for v in range(4)])


@pytest.mark.parametrize("line", _lines_of(_take_all))
def test_a_cancellation_while_taking_duplicates_runs_each_callback_as_often(line):
    calls = []
    ended = _interrupted_batch(line, lambda tasks: tasks[0].cancel(), _take_all, calls)
    assert ended[0] in ("cancelled", 0)
    assert ended[1:] == [1, 2, 3]
    first = "cancelled" if ended[0] == "cancelled" else 0
    assert sorted(calls, key=repr) == sorted(
        [("a", first)] * 2 + [("b", first)]
        + [("a", v) for v in (1, 2, 3)] * 2 + [("b", v) for v in (1, 2, 3)], key=repr)

"""A thread still inside a native module when the interpreter exits.

A daemon thread that wants the GIL back once the interpreter finalizes is ended there by
the interpreter (``pthread_exit``), whose unwinding passes through the native module's
frames: that must end the thread, never crash the process, whatever C++ runtime the
modules were built with (the manylinux wheel links its own). Each test runs a fresh
interpreter and checks that it exits normally.
"""

import subprocess
import sys
import textwrap

import pytest


def run_child(code, timeout=60):
    """What a fresh interpreter running ``code`` prints; fails unless it exits 0 (a crash
    at exit shows as a negative return code, the signal's number)."""
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stderr}"
    return done.stdout.splitlines()


# The parked thread runs the queue's method itself, so nothing of it holds __main__'s
# globals: they are cleared while the interpreter finalizes, which runs WakeLate.__del__.
# That wakes the thread, which then asks for the GIL too late and is ended; __del__ waits
# (within a generous bound) until the system says the thread is gone.
PARK_AND_WAKE_LATE = """
    import functools, os, sys, threading, time
    from batchproc._native.request_queue import RequestQueue

    WAIT = {wait!r}
    q = RequestQueue(1)
    if WAIT == "items":            # pop_batch waiting for an entry
        call, waiting = functools.partial(q.pop_batch, 1), 0
    elif WAIT == "fill":           # pop_batch waiting for a batch to fill
        q.push("a")
        call, waiting = functools.partial(q.pop_batch, 8, fill_rows=2, max_wait=3600.0), 1
    else:                          # push waiting for room
        q.push("a")
        call, waiting = functools.partial(q.push, "b"), 2
    parked = threading.Thread(target=call, daemon=True)
    parked.start()
    while q._waiters()[waiting] != 1:
        time.sleep(0.001)

    class WakeLate:
        def __del__(self, q=q, tid=parked.native_id, finalizing=sys.is_finalizing, write=os.write,
                    exists=os.path.exists, sleep=time.sleep, now=time.monotonic):
            write(1, b"finalizing %r\\n" % finalizing())
            q.close()
            give_up = now() + 30.0
            while exists(f"/proc/self/task/{{tid}}") and now() < give_up:
                sleep(0.001)
            write(1, b"thread gone %r\\n" % (not exists(f"/proc/self/task/{{tid}}")))

    wake_late = WakeLate()
    print("parked", flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
@pytest.mark.parametrize("wait", ["items", "fill", "room"])
def test_a_thread_woken_in_a_queue_wait_while_the_interpreter_finalizes_ends_cleanly(wait):
    lines = run_child(PARK_AND_WAKE_LATE.format(wait=wait))
    assert lines == ["parked", "finalizing True", "thread gone True"]


# Two daemon threads copying without the GIL in a loop when the main thread returns: at
# exit they are almost always inside the module (in the copy, or waiting there for the
# GIL), so each run nearly always ends one there.
COPY_UNTIL_EXIT = """
    import threading
    import numpy as np
    from batchproc._native.batch_assembler import BatchAssembler
    from batchproc._native.rolling_window import RollingWindow

    rows = np.ones((1 << 15, 8), np.uint8)     # 256 KiB a batch: copied without the GIL
    values = np.ones(1 << 16)                  # likewise for the window

    def assemble():
        assembler = BatchAssembler()
        assembler.concat([rows, rows])
        running.wait()
        while True:
            assembler.concat([rows, rows])

    def extend():
        window = RollingWindow(1 << 17)
        window.extend(values)
        running.wait()
        while True:
            window.extend(values)

    running = threading.Barrier(3)
    for _ in range(2):
        threading.Thread(target={copy}, daemon=True).start()
    running.wait()
    print("exiting", flush=True)
"""


@pytest.mark.parametrize("copy", ["assemble", "extend"])
def test_an_exit_while_threads_copy_without_the_gil_never_crashes(copy):
    children = [subprocess.Popen([sys.executable, "-X", "faulthandler", "-c",
                                  textwrap.dedent(COPY_UNTIL_EXIT.format(copy=copy))],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(6)]
    for child in children:
        out, err = child.communicate(timeout=60)
        assert (child.returncode, out) == (0, "exiting\n"), err


# An object that stops its processor in __del__ (a Ray Serve replica, a service class),
# still referenced by __main__'s globals: __del__ runs as the interpreter finalizes,
# when a thread started would never run and Thread.start would wait for it for ever.
STOP_IN_DEL = """
    import sys
    from batchproc import BatchProcessor, BatchProcessorConfig

    class Service:
        def __init__(self):
            self.processor = BatchProcessor(BatchProcessorConfig(max_batch_size=4))
            self.processor.start(lambda batch: batch)

        def __del__(self, finalizing=sys.is_finalizing):
            print("finalizing", finalizing(), flush=True)
            self.processor.stop(timeout=5.0)
            print("stopped", self.processor.get_stats()["is_running"], flush=True)

    service = Service()
    if {stopped_before!r}:
        service.processor.stop(timeout=5.0)
    print(service.processor.enqueue_predict([1]).result(5) if not {stopped_before!r} else "")
"""


@pytest.mark.parametrize("stopped_before", [True, False], ids=["stopped", "running"])
def test_a_stop_while_the_interpreter_finalizes_returns(stopped_before):
    lines = run_child(STOP_IN_DEL.format(stopped_before=stopped_before), timeout=30)
    assert lines[-2:] == ["finalizing True", "stopped False"], lines

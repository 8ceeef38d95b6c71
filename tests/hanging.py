"""Models that hang, for the tests of what happens around a hang."""

import threading

HANGS_ON = 666


def hangs_on_666(wait=30.0):
    """A model that hangs on a batch starting with 666 until released (at most ``wait``
    seconds), and returns every other batch as it is: (model, release, hanging)."""
    release, hanging = threading.Event(), threading.Event()

    def model(batch):
        if batch[0, 0] == HANGS_ON:
            hanging.set()
            release.wait(wait)
        return batch

    return model, release, hanging


class CallsThatDoNotEnd:
    """An earlier bench run's model (what ``runner._LeftBehind`` holds) with ``running``
    calls still running, none of which ends while the test lasts: ``wait_idle`` waits
    as long as it is asked to."""

    def __init__(self, running: int = 2) -> None:
        self.running = running
        self._never = threading.Event()

    def wait_idle(self, timeout: float) -> int:
        self._never.wait(max(timeout, 0.0))
        return self.running

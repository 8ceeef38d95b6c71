"""A model that hangs on one request, for the tests of what happens around a hang."""

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

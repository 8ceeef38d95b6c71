"""Adapters that put peer batchers behind the ``batchproc.bench.targets`` interface.

Each module offers ``make_target(max_batch, max_delay)``, which returns a target or
raises :class:`PeerUnavailable` with a one-line reason (the peer is not installed, or
cannot run here), so that the comparison skips it and says why.
"""


class PeerUnavailable(RuntimeError):
    pass


def split_rows(out, items):
    """Slice a batch output back into one piece per item (items have a leading row axis)."""
    pieces = []
    start = 0
    for item in items:
        end = start + len(item)
        pieces.append(out[start:end])
        start = end
    return pieces

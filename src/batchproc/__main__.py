"""``python -m batchproc`` and the ``batchproc`` console script."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``batchproc`` command line; returns the exit status."""
    from batchproc.bench.cli import main as _main

    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())

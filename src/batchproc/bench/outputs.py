"""Output files (``--json``, ``--plot``, ``tune``'s results file): checked before any
run, then written whole or not at all.

A file is written beside its destination under a temporary name and renamed over it, so
the destination must be (or become) a regular file in a directory that takes new files.
:func:`check_writable` refuses anything else up front; a write that still fails after a
run (a full disk) leaves the destination as it was and raises ``OSError``.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable

from . import BenchError

_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def check_writable(flag: str, path: str) -> None:
    """``BenchError`` (exit 2) unless ``path`` can be written as a regular file.

    Refused: an empty name; the file this process's standard output or error goes to
    (``/dev/stdout``, or the file the shell redirects it to: renaming over it would lose
    what is printed); a directory, a device, FIFO or socket (``/dev/full``); an existing
    file that does not open for writing (it is only opened, left as it was); a directory
    that is missing or takes no new file (tried for real: permission bits do not tell for
    root, read-only mounts or ``/proc``). A link is followed.
    """
    if not path:
        raise BenchError(f"{flag}: an empty file name")
    target = os.path.realpath(path)
    try:
        # The path itself, not its real path: /dev/stdout's link to a pipe has none.
        st = os.stat(path)
    except OSError:
        st = None
    exists = st is not None
    if st is not None:
        _refuse_standard_stream(flag, path, st)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            raise BenchError(f"{flag} {path}: is a directory")
        for test, kind in _KINDS:
            if test(mode):
                raise BenchError(f"{flag} {path}: is {kind}, not a regular file")
        try:
            # No O_TRUNC: the file is only tried.
            os.close(os.open(target, os.O_WRONLY))
        except OSError as exc:
            raise BenchError(
                f"{flag} {path}: cannot be written ({exc.strerror or exc})") from None
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise BenchError(f"{flag} {path}: {parent} {what}")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".batchproc-check-")
    except OSError as exc:
        # ENOENT from a directory that exists: a file system that makes no files (/proc).
        why = "" if exc.errno == errno.ENOENT else f" ({exc.strerror or exc})"
        what = ("cannot be rewritten: its directory takes no new file" if exists
                else f"directory {parent} is not writable")
        raise BenchError(f"{flag} {path}: {what}{why}") from None
    os.close(fd)
    os.unlink(tmp)


def check_distinct(files: list[tuple[str, str]]) -> None:
    """``BenchError`` (exit 2) if two of ``files`` (flag, path: the input read and the
    outputs written) are one file: the same real path, or the same file by another name
    (a hard link). Writing one would replace the other."""
    for i, (flag, path) in enumerate(files):
        for other_flag, other in files[:i]:
            if _same_file(path, other):
                same = path if path == other else f"{other} and {path}"
                raise BenchError(f"{other_flag} and {flag} name the same file ({same}); "
                                 "give each its own")


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is not there yet: only its name could have matched
        return False


def _refuse_standard_stream(flag: str, path: str, st: os.stat_result) -> None:
    for fd, name in ((1, "standard output"), (2, "standard error")):
        try:
            same = os.path.samestat(st, os.fstat(fd))
        except OSError:  # closed
            continue
        if same:
            raise BenchError(
                f"{flag} {path}: is this command's {name}, where the table goes; "
                "give the output its own file")


def replace_file(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path`` (its extension kept), then
    rename it over ``path``. On any error the temporary file is removed, ``path`` is left
    as it was, and the error propagates (``OSError`` for a full disk)."""
    target = os.path.realpath(path)
    parent, name = os.path.split(target)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name}.",
                               suffix=os.path.splitext(name)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode(target))
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _new_file_mode(target: str) -> int:
    """The mode the file keeps (an existing one's), or that ``open`` would give a new
    one: mkstemp makes it private."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask

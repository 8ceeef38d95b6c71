"""Output files of `batchproc bench`/`tune`: written whole or not at all, beside their
destination, keeping what a plain ``open(path, "w")`` would give the file."""

from __future__ import annotations

import errno
import os

import pytest

from batchproc.bench import BenchError
from batchproc.bench.outputs import check_writable, replace_file


def _write(text: str):
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write


def _fail_midway(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_write_leaves_the_file_as_it_was_and_no_temporary(tmp_path) -> None:
    path = tmp_path / "out.json"
    path.write_text("before")
    with pytest.raises(OSError, match="No space left"):
        replace_file(str(path), _fail_midway)
    assert path.read_text() == "before"
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_a_failed_write_of_a_new_file_leaves_nothing(tmp_path) -> None:
    with pytest.raises(OSError):
        replace_file(str(tmp_path / "out.json"), _fail_midway)
    assert os.listdir(tmp_path) == []


def test_a_new_file_gets_the_mode_open_would_give_it(tmp_path) -> None:
    path = tmp_path / "new.json"
    replace_file(str(path), _write("{}"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "{}"
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_existing_file_keeps_its_mode(tmp_path) -> None:
    path = tmp_path / "old.json"
    path.write_text("old")
    path.chmod(0o640)
    replace_file(str(path), _write("new"))
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o640


def test_a_link_is_written_through(tmp_path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "out.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    check_writable("--json", str(link))
    replace_file(str(link), _write("new"))
    assert link.is_symlink() and target.read_text() == "new"


def test_the_temporary_keeps_the_extension(tmp_path) -> None:
    # matplotlib and other writers may pick the format from the name.
    seen: list[str] = []
    replace_file(str(tmp_path / "plot.svg"), lambda tmp: (seen.append(tmp), _write("x")(tmp)))
    assert seen[0].endswith(".svg") and os.path.dirname(seen[0]) == str(tmp_path)


def test_a_regular_file_and_a_new_one_pass_the_check(tmp_path) -> None:
    (tmp_path / "old.json").write_text("kept")
    check_writable("--json", str(tmp_path / "old.json"))
    check_writable("--json", str(tmp_path / "new.json"))
    assert (tmp_path / "old.json").read_text() == "kept"
    assert sorted(os.listdir(tmp_path)) == ["old.json"]  # the check leaves nothing


def test_a_socket_is_no_regular_file(tmp_path) -> None:
    import socket

    path = tmp_path / "s.json"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(BenchError, match="is a socket, not a regular file"):
            check_writable("--json", str(path))

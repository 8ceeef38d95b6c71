"""Output files of `batchproc bench`/`tune`: written whole or not at all, beside their
destination, keeping what a plain ``open(path, "w")`` would give the file."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

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


def test_an_empty_name_is_refused() -> None:
    with pytest.raises(BenchError, match=r"^--json: an empty file name$"):
        check_writable("--json", "")


# A fresh interpreter whose standard output and error go where the test says.
CHECK = ("import sys\nfrom batchproc.bench import BenchError\n"
         "from batchproc.bench.outputs import check_writable\n"
         "try:\n    check_writable('--json', sys.argv[1])\n"
         "except BenchError as exc:\n    sys.exit(str(exc))\n")


def _check_in(path: str, stdout, stderr) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHECK, path], stdout=stdout, stderr=stderr,
                          timeout=60, check=False)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
@pytest.mark.parametrize("named", ["by its name", "as /dev/fd"])
def test_the_file_a_standard_stream_goes_to_is_refused(tmp_path, stream, named) -> None:
    # Renaming the output over it would replace the file the shell redirected to.
    redirected = tmp_path / "printed.txt"
    fd = 1 if stream == "stdout" else 2
    path = str(redirected) if named == "by its name" else f"/dev/fd/{fd}"
    if named != "by its name" and not os.path.exists("/dev/fd/1"):
        pytest.skip("no /dev/fd here")
    with open(redirected, "w") as f:
        other = subprocess.PIPE
        res = _check_in(path, f if fd == 1 else other, f if fd == 2 else other)
    name = "standard output" if fd == 1 else "standard error"
    assert res.returncode == 1
    said = redirected.read_text() if fd == 2 else res.stderr.decode()
    assert said == (f"--json {path}: is this command's {name}, where the table goes; "
                    "give the output its own file\n")


def test_dev_stdout_through_a_pipe_says_so() -> None:
    if not os.path.exists("/dev/stdout"):
        pytest.skip("no /dev/stdout here")
    res = _check_in("/dev/stdout", subprocess.PIPE, subprocess.PIPE)
    assert res.returncode == 1 and res.stdout == b""
    assert res.stderr.decode() == ("--json /dev/stdout: is this command's standard output, "
                                   "where the table goes; give the output its own file\n")


def test_another_file_passes_with_the_streams_redirected(tmp_path) -> None:
    with open(tmp_path / "printed.txt", "w") as f:
        res = _check_in(str(tmp_path / "out.json"), f, subprocess.PIPE)
    assert res.returncode == 0, res.stderr

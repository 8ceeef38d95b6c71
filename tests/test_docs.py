"""Every example in the documentation runs as written: the README's, each page's under
docs/ (the documentation site), the `batchproc` command lines shown there, and the
examples in the docstrings the API reference is generated from."""

import contextlib
import doctest
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from extras import one_ray_cluster_at_a_time, skip_without

import batchproc.processor
from batchproc._native.waiting import get_spin
from batchproc.bench.cli import build_parser
from batchproc.futures import set_result_spin

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Extras whose examples run in a fresh interpreter: ray.init changes process-wide state
# (logging and signal handlers, threads left after shutdown) that later tests would see.
ISOLATED = {"ray"}

# Examples per page. A page losing its examples (or a block no longer recognised as
# python) fails here instead of passing with nothing run.
PYTHON_BLOCKS = {
    "README.md": 3,
    "architecture.md": 0,
    "asyncio.md": 2,
    "bulk.md": 3,
    "configurations.md": 5,
    "failures.md": 3,
    "formats.md": 2,
    "getting-started.md": 2,
    "index.md": 1,
    "priorities-and-limits.md": 3,
    "reference.md": 0,
    "services.md": 8,
    "tuning.md": 3,
}


def blocks(language):
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for i, block in enumerate(re.findall(rf"```{language}\n(.*?)```", text, re.S)):
            yield path.name, i, block


def python_blocks():
    for name, i, block in blocks("python"):
        # A Ray example starts a Ray cluster: tens of seconds, after waiting for any other
        # test's cluster to end (one_ray_cluster_at_a_time), which may take minutes.
        marks = ([pytest.mark.slow, pytest.mark.timeout(1200)]
                 if re.search(r"^import ray$", block, re.M) else [])
        yield pytest.param(block, id=f"{name}-{i}", marks=marks)


@pytest.fixture
def result_spin_kept():
    """An example may set the process's result spin (docs/tuning.md): the tests after it
    run with the one in force before."""
    spin = get_spin()
    yield
    set_result_spin(spin)


@pytest.mark.parametrize("code", list(python_blocks()))
def test_example_runs(code, result_spin_kept):
    # An example that needs an extra says so on its first line: `# pip install ".[ray]"`.
    needs = re.match(r'# pip install "\.\[([\w,]+)\]"', code)
    extras = needs.group(1).split(",") if needs else []
    skip_without(*extras)
    if ISOLATED.intersection(extras):
        with one_ray_cluster_at_a_time() if "ray" in extras else contextlib.nullcontext():
            subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
        return
    exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})


def test_every_page_has_its_examples():
    counts = {path.name: 0 for path in DOCS}
    for name, _, _ in blocks("python"):
        counts[name] += 1
    assert counts == PYTHON_BLOCKS


def command_lines():
    for name, i, block in blocks("bash"):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("batchproc "):
                yield pytest.param(line, id=f"{name}-{i}-{line[10:40]}")


@pytest.mark.parametrize("line", list(command_lines()))
def test_command_lines_shown_are_accepted(line):
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert args.command in ("bench", "tune")


def test_the_command_lines_are_found():
    assert len(list(command_lines())) >= 8


def test_docstring_examples_run():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(verbose=False)
    tests = [t for t in finder.find(batchproc.processor) if t.examples]
    assert tests, "no docstring examples found"
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_no_page_sends_readers_to_files_they_do_not_have():
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text and "spec/" not in text, path.name


# `batchproc` on PyPI is another project: an install line must name a path (a checkout's
# ".", a built wheel), never the bare name, which a package index would resolve.
PIP_INSTALL = re.compile(r"pip3? install\b([^`\n#&;|)]*)")
BARE_NAME = re.compile(r"batchproc(\[[^\]]*\])?\s*([<>=!~;].*)?", re.IGNORECASE)
INSTALL_TEXTS = [
    *DOCS,
    ROOT / "CONTRIBUTING.md",
    # The installed package's modules (their messages and docstrings): the wheel's in
    # CI, where the suite runs without the source tree.
    *sorted(pathlib.Path(batchproc.__file__).parent.rglob("*.py")),
    *sorted((ROOT / "examples").glob("*.py")),
]


def requirements_from_index(text):
    """The requirements of each ``pip install`` line in ``text`` that name batchproc by
    name alone (with or without extras and a version), not by a path or URL."""
    found = []
    for m in PIP_INSTALL.finditer(text):
        args = m.group(1)
        try:
            words = shlex.split(args)
        except ValueError:  # an unclosed quote: the line goes on in the prose
            words = args.split()
        for word in words:
            word = word.strip("\"'`,.:")
            if word and not word.startswith("-") and BARE_NAME.fullmatch(word):
                found.append(f"pip install{args.rstrip()}")
    return found


@pytest.mark.parametrize(
    ("line", "bare"),
    [
        ("pip install batchproc", True),
        ("pip install batchproc  # the wheel", True),
        ('pip install "batchproc[torch]"', True),
        ("`pip install 'batchproc[cli,plot]'` first", True),
        ("pip install -U batchproc==0.3", True),
        ("pip3 install --no-deps batchproc>=0.2", True),
        ('pip install ".[cli]"', False),
        ("pip install .", False),
        ("pip install dist/batchproc-0.3.0-cp311-cp311-manylinux_2_17_x86_64.whl", False),
        ("pip install dist/batchproc-*.whl", False),
        ('pip install "batchproc[torch] @ file://$PWD/dist/batchproc-1-x.whl"', False),
        ("pip install batchproc-tools", False),
        ("pip install torch==2.13.0", False),
    ],
)
def test_bare_name_install_lines_are_recognised(line, bare):
    assert bool(requirements_from_index(line)) is bare


def _label(path):
    """A path relative to the repository, or to site-packages for the installed package."""
    for base in (ROOT, pathlib.Path(batchproc.__file__).parent.parent):
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return str(path)


@pytest.mark.parametrize("path", INSTALL_TEXTS, ids=_label)
def test_no_install_line_fetches_batchproc_from_an_index(path):
    assert requirements_from_index(path.read_text(encoding="utf-8")) == []


def test_the_docs_say_batchproc_is_not_on_pypi():
    text = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    assert "not published on PyPI" in text

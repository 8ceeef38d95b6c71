"""The README's example and the example configurations run as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "configurations.md", ROOT / "docs" / "formats.md"]


def python_blocks():
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S)):
            yield pytest.param(block, id=f"{path.name}-{i}")


@pytest.mark.parametrize("code", list(python_blocks()))
def test_example_runs(code):
    exec(compile(code, "<doc example>", "exec"), {})


def test_every_doc_has_examples():
    assert len(list(python_blocks())) == 6

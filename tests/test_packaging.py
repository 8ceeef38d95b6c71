"""What a user installs: the package's metadata and the config reference.

With BATCHPROC_EXPECT_WHEEL_TAG set (CI, testing the wheel from dist/), also checks that
the package under test is that wheel, installed, and not a build from the source tree.
"""

import dataclasses
import enum
import importlib.metadata
import inspect
import os
import pathlib
import re
import sysconfig

import pytest

import batchproc
from batchproc import BatchProcessorConfig

# ---------------------------------------------------------------- the installed package


def test_the_package_under_test_is_installed_not_the_source_tree():
    installed = {pathlib.Path(sysconfig.get_paths()[k]).resolve()
                 for k in ("purelib", "platlib")}
    package = pathlib.Path(batchproc.__file__).resolve().parent
    assert package.parent in installed, f"batchproc imported from {package}"


def test_the_version_has_one_source():
    # The build reads __version__ into the metadata, so the two cannot disagree.
    assert importlib.metadata.version("batchproc") == batchproc.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+|\.dev\d+)?", batchproc.__version__)


def test_the_metadata_names_the_license_and_authors():
    meta = importlib.metadata.metadata("batchproc")
    assert meta["License-Expression"] == "MIT"
    assert meta["Author"] or meta["Author-email"]
    files = importlib.metadata.distribution("batchproc").files or []
    assert any(f.name == "LICENSE" for f in files), files


@pytest.mark.skipif(not os.environ.get("BATCHPROC_EXPECT_WHEEL_TAG"),
                    reason="only when testing a built wheel (BATCHPROC_EXPECT_WHEEL_TAG)")
def test_the_installed_wheel_is_the_manylinux_one():
    expected = os.environ["BATCHPROC_EXPECT_WHEEL_TAG"]
    wheel = importlib.metadata.distribution("batchproc").read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines()
            if line.startswith("Tag:")]
    assert any(tag.endswith(expected) for tag in tags), tags


# ---------------------------------------------------------------- the config reference

UNITS = ("rows", "seconds", "requests", "batches", "MiB", "percent", "tokens", "attempts")


def attribute_entries():
    """{field: its text} from the 'Attributes:' section of BatchProcessorConfig's
    docstring, the section the API reference renders."""
    # Dedented as Python 3.13 compiles docstrings, whatever the version.
    doc = inspect.cleandoc(BatchProcessorConfig.__doc__ or "")
    section = doc.split("Attributes:\n", 1)[1]
    entries = {}
    for match in re.finditer(r"^ {4}(\w+): (.*?)(?=^ {4}\w+: |\Z)", section, re.M | re.S):
        entries[match[1]] = " ".join(match[2].split())
    return entries


def shown_default(value):
    if isinstance(value, enum.Enum):
        return f"``{type(value).__name__}.{value.name}``"
    if isinstance(value, tuple) and value and all(isinstance(v, type) for v in value):
        return "``(" + "".join(f"{v.__name__}," for v in value) + ")``"  # as written
    return f"``{value!r}``"


def test_every_config_field_is_documented_with_unit_default_and_effect():
    entries = attribute_entries()
    fields = dataclasses.fields(BatchProcessorConfig)
    assert list(entries) == [f.name for f in fields]
    for f in fields:
        text = entries[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"Default {shown_default(default)}" in text, (f.name, text)
        kind = f.type
        if kind == "bool":
            assert "on or off" in text, (f.name, text)
        elif re.fullmatch(r"(int|float)( \| None)?", kind):
            assert any(f" in {unit}" in text for unit in UNITS), (f.name, text)
        # ...and what it does: more than the unit and the default.
        effect = re.sub(r"Default ``[^`]*``\.?", "", text)
        assert len(effect.split()) >= 6, (f.name, text)

"""What a user installs: the package's metadata.

With BATCHPROC_EXPECT_WHEEL_TAG set (CI, testing the wheel from dist/), also checks that
the package under test is that wheel, installed, and not a build from the source tree.
"""

import importlib.metadata
import os
import pathlib
import re
import sysconfig

import pytest

import batchproc

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

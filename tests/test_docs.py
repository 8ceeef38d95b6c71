"""The README's example and the example configurations run as written."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "configurations.md", ROOT / "docs" / "formats.md",
        ROOT / "docs" / "services.md"]

# An example that needs an extra says so on its first line, `# pip install ".[ray]"`; it
# is skipped where the extra's modules are missing (CI installs them all).
EXTRAS = {"prometheus": ["prometheus_client"],
          "service": ["fastapi", "uvicorn", "prometheus_client", "httpx"],
          "ray": ["ray"]}
# Extras whose examples run in a fresh interpreter: ray.init changes process-wide state
# (logging and signal handlers, threads left after shutdown) that later tests would see.
ISOLATED = {"ray"}


def python_blocks():
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S)):
            yield pytest.param(block, id=f"{path.name}-{i}")


@pytest.mark.parametrize("code", list(python_blocks()))
def test_example_runs(code):
    needs = re.match(r'# pip install "\.\[([\w,]+)\]"', code)
    extras = needs.group(1).split(",") if needs else []
    for extra in extras:
        for module in EXTRAS[extra]:
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"needs the {extra} extra ({module})")
    if ISOLATED.intersection(extras):
        subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
        return
    exec(compile(code, "<doc example>", "exec"), {})


def test_every_doc_has_examples():
    assert len(list(python_blocks())) == 15

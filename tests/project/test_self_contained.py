"""A clone of the repository anywhere runs its detection tests and scripts.compatibility: the real
key layouts they read are vendored under tests/fixtures/model-keys with their license, and no code
reaches outside the checkout for them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import LEAKY, PY, REPO
from tests.helpers.detect_cases import FIXTURES, fixture_path

# Reaching for a folder beside the checkout, spelled as a path or as pathlib parts.
OUTSIDE = re.compile(r"\.\./shared|parent\s*/\s*\"shared\"|\"shared\"\s*/")
CODE_DIRS = ("compiler", "runtime", "bench", "scripts", "tests")


def test_the_layouts_and_their_license_are_in_the_repository():
    assert FIXTURES.is_relative_to(REPO)
    readme = (FIXTURES / "README.md").read_text()
    named = set(re.findall(r"`([\w-]+)\.yaml`", readme))
    assert len(named) == 8, named
    for name in named:
        data = yaml.safe_load(fixture_path(name).read_text())
        assert data["components"], name  # a real layout: components of key -> shape/dtype
    license_text = (FIXTURES / "LICENSE.sd-mecha").read_text()
    assert license_text.startswith("MIT License") and "ljleb" in license_text
    assert "LICENSE.sd-mecha" in readme


def test_no_code_reads_a_folder_beside_the_checkout():
    hits = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for folder in CODE_DIRS
        for path in sorted((REPO / folder).rglob("*.py"))
        if path.resolve() != Path(__file__).resolve()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_compatibility_script_runs_in_a_clone_with_nothing_beside_it(tmp_path: Path):
    """The newcomer's case: the project copied to a folder with no `shared/` next to it."""
    clone = tmp_path / "clone"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("compiler", "runtime", "scripts", "tests", "conf", "recipes"):
        shutil.copytree(REPO / name, clone / name, ignore=ignore)
    (clone / "docs").mkdir()
    assert not (tmp_path / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k not in LEAKY and k != "PYTHONPATH"}
    proc = subprocess.run(
        [PY, "-m", "scripts.compatibility"], cwd=clone, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The same document as the committed one (tests/compiler/test_detect.py holds that one to the render).
    assert (clone / "docs" / "compatibility.md").read_text() == (REPO / "docs" / "compatibility.md").read_text()

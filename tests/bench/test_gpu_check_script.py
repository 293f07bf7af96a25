"""The device check script must keep running: its tiny CPU mode runs here, so a GPU lease is never
spent discovering that it broke."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_gpu_check_quick_mode_runs_on_cpu(home: Path, demo_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--home", str(home), "--out", str(out), "--quick", "--warm", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["precision"] == "fp32"
    assert run["load_s"] > 0 and run["warm_p50_s"] > 0
    assert run["image_std"] > 1, "a flat image means the pipeline produced nothing"

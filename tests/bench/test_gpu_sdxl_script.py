"""The full-size SDXL GPU script must keep running: its --tiny CPU mode (the compiler's tiny SDXL,
eager, in fresh processes as on the device) runs here, so a GPU lease is never spent finding out
that it broke."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_gpu_sdxl_tiny_mode_runs_on_cpu(tmp_path: Path) -> None:
    # What the device image lacks and the script does not carry must not be imported: each is
    # shadowed by a package that refuses to import, in this process's children too.
    blocked = tmp_path / "blocked"
    for name in ("hydra", "omegaconf", "antlr4", "runpod"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the device image')\n")
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/gpu_sdxl.py",
            "--tiny",
            "--out",
            str(out),
            "--warm",
            "1",
            "--work",
            str(tmp_path / "w"),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(blocked)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["installed_from_wheels"] == [], "everything is installed here"
    assert result["weights"]["params"]["unet"] > 0
    assert (tmp_path / "w" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    eager = result["runs"]["eager"]
    assert eager["cold_start_s"] >= eager["load_s"] + eager["first_image_s"] > 0
    assert len(eager["warm_s"]) == 1 and 0 < eager["image_mean"] < 1
    assert set(result["runs"]) == {"eager"}, "no compile unless --compile"


def test_gpu_sdxl_names_the_wheels_the_device_lacks() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_sdxl
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert set(gpu_sdxl.NEEDED) >= {"diffusers", "pydantic"}
    assert any(p.startswith("diffusers==") for p in gpu_sdxl.PINS)
    # the pins are what this checkout is tested with
    from importlib import metadata

    for pin in gpu_sdxl.PINS:
        name, version = pin.split("==")
        assert metadata.version(name) == version, pin
    assert "/wheels/" in (REPO / ".gitignore").read_text().split()

"""Compile caches end to end on this CPU (slow: torch.compile takes minutes here).

A recipe with ``compile: regional`` built with UIW_COMPILE_CACHE_CPU=1 carries
``compile/<key>/cache.bin``; a fresh runtime process that loads it compiles faster than one that
loads the same artifact without it, and draws the same pixels as the eager pipeline. Every process
gets its own empty Inductor cache folder, so the only warm cache in play is the artifact's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEMO_SETTINGS, REPO, child_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

CHILD = r"""
import json, logging, sys, time
logging.basicConfig(level=logging.INFO)
import numpy as np, torch
from pathlib import Path
from runtime.loader import load
loaded = load(Path(sys.argv[1]), device="cpu")
t0 = time.perf_counter()
out = loaded.pipelines["txt2img"]("a red fox", num_inference_steps=2, guidance_scale=7.5,
                                  generator=torch.Generator("cpu").manual_seed(7), output_type="np")
first = time.perf_counter() - t0
np.save(sys.argv[2], out.images[0])
print(json.dumps({"first_call_s": first, "load_s": loaded.load_seconds}))
"""


def _run(artifact: Path, out: Path, inductor: Path, home: Path) -> dict:
    env = child_env(home, {"TORCHINDUCTOR_CACHE_DIR": str(inductor), "UIW_LOG_LEVEL": "INFO"})
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(artifact), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["log"] = proc.stderr
    return result


def test_a_baked_compile_cache_cuts_the_first_call(tmp_path: Path) -> None:
    text = f"base: builtin:tiny-sd15\n{DEMO_SETTINGS}compile:\n  scope: regional\n  shapes: [[64, 64]]\n"
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "c.yaml").write_text(text)
    build_cache = tmp_path / "inductor-build"
    proc = subprocess.run(
        [sys.executable, "-m", "compiler", "recipe=c", f"recipes_dir={recipes}"],
        cwd=REPO,
        env=child_env(tmp_path / "home", {"UIW_COMPILE_CACHE_CPU": "1", "TORCHINDUCTOR_CACHE_DIR": str(build_cache)}),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = Path(proc.stdout.strip())
    (key_dir,) = (artifact / "compile").iterdir()
    info = json.loads((key_dir / "info.json").read_text())
    assert (key_dir / "cache.bin").stat().st_size == info["bytes"] > 0
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["runtime"]["compile"]["scope"] == "regional"
    assert any(f["path"] == f"compile/{key_dir.name}/cache.bin" for f in manifest["files"]), "hashed like the weights"

    bare = tmp_path / "bare"
    shutil.copytree(artifact, bare, ignore=shutil.ignore_patterns("compile"))
    home = tmp_path / "home"
    cold = _run(bare, tmp_path / "cold.npy", tmp_path / "inductor-cold", home)
    cached = _run(artifact, tmp_path / "cached.npy", tmp_path / "inductor-cached", home)
    assert "compile_cache" in cold["log"] and "the artifact has none" in cold["log"]
    assert f"compile_cache ({key_dir.name}" in cached["log"], cached["log"][-2000:]

    eager = tmp_path / "eager"
    shutil.copytree(bare, eager)
    m = json.loads((eager / "manifest.json").read_text())
    m["runtime"]["compile"] = {"scope": "off"}
    (eager / "manifest.json").write_text(json.dumps(m))
    plain = _run(eager, tmp_path / "eager.npy", tmp_path / "inductor-eager", home)

    ref = np.load(tmp_path / "eager.npy")
    for name in ("cold", "cached"):
        got = np.load(tmp_path / f"{name}.npy")
        assert np.abs(got - ref).max() * 255 < 1.0, f"{name}: compiled kernels draw the eager picture"
    print(
        f"\nfirst call (2 steps, 64x64, regional): eager {plain['first_call_s']:.1f} s, "
        f"cold compile {cold['first_call_s']:.1f} s, from the baked cache {cached['first_call_s']:.1f} s; "
        f"cache {info['bytes']} bytes; warm-up at build {info['shapes']}"
    )
    assert cached["first_call_s"] < cold["first_call_s"]

"""Device check of the skeleton: compile with the real CLI, serve with the real service on the
best device, and measure what a RunPod user feels. One short run that fits a 15-minute GPU lease.

    python scripts/gpu_check.py --home DIR --out result.json            # full (GPU)
    python scripts/gpu_check.py --home DIR --out result.json --quick    # tiny CPU mode (tests)

Measures, per precision: compile time (fresh process), artifact load time on the device, first
request (cold kernels), warm latency over N requests at the demo's 64x64/4 steps, and worker-sdxl's
own test_input.json (1024x1024, 25 K_EULER steps). On a GPU it also checks that a seed gives the
same picture on the GPU as on the CPU (noise is drawn on the CPU; kernels differ, so not bit-equal).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SDXL_TEST_INPUT = REPO / "tests" / "data" / "worker_sdxl_test_input.json"


def compile_recipe(home: Path, *overrides: str) -> tuple[Path, float]:
    t0 = time.perf_counter()
    env = {**os.environ, "UIW_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "compiler", "recipe=demo", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"compile failed ({proc.returncode}):\n{proc.stderr}")
    return Path(proc.stdout.strip()), time.perf_counter() - t0


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - t0


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode(uri: str) -> Any:
    import base64
    import io

    import numpy as np
    from PIL import Image

    return np.array(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


REQUEST = {"prompt": "a lighthouse on a cliff at dusk", "seed": 42}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="tiny CPU mode: fp32 only, no 1024x1024 request")
    ap.add_argument("--warm", type=int, default=10)
    return ap.parse_args()


def check_precision(args: argparse.Namespace, precision: str, device: str) -> dict:
    """Compile the demo at one precision, serve it, and measure; the run's record."""
    import torch

    from runtime.service import Service, Settings

    artifact, compile_s = compile_recipe(args.home, f"precision={precision}")
    service, load_s = timed(Service, Settings(artifacts=(str(artifact),), home=args.home))
    reply, first_s = timed(service.run, REQUEST)
    assert "images" in reply, reply
    warm = []
    for _ in range(args.warm):
        again, s = timed(service.run, REQUEST)
        warm.append(s)
    assert again["images"] == reply["images"], "same seed, same device: same bytes"
    img = decode(reply["images"][0])
    run = {
        "precision": precision,
        "compile_s": round(compile_s, 2),
        "load_s": round(load_s, 3),
        "first_request_s": round(first_s, 3),
        "warm_p50_s": round(statistics.median(warm), 4),
        "warm_max_s": round(max(warm), 4),
        "image_std": float(img.std()),
    }
    if not args.quick:
        run.update(worker_sdxl_job(service))
    if device == "cuda" and precision == "fp32":
        run.update(gpu_vs_cpu(artifact, img))
    if device == "cuda":
        run["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return run


def worker_sdxl_job(service: Any) -> dict:
    """worker-sdxl's own test_input.json (1024x1024, 25 steps), twice: cold kernels, then warm."""
    job = json.loads(SDXL_TEST_INPUT.read_text())["input"]
    sdxl, s1 = timed(service.run, job)
    assert "images" in sdxl, sdxl
    _, s2 = timed(service.run, job)
    return {
        "worker_sdxl_1024_25steps_s": [round(s1, 3), round(s2, 3)],
        "worker_sdxl_shape": list(decode(sdxl["images"][0]).shape),
    }


def gpu_vs_cpu(artifact: Path, img: Any) -> dict:
    """The same artifact and seed on the CPU: noise is drawn on the CPU, so the pictures match up
    to kernel rounding."""
    import numpy as np

    from runtime.generate import generate
    from runtime.loader import load
    from runtime.schema import validate

    cpu = load(artifact, device="cpu")
    req, _ = validate(REQUEST, cpu.manifest)
    cpu_img = np.array(generate(cpu.pipeline, req)[0])
    return {
        "gpu_vs_cpu_max_abs_diff": int(abs(cpu_img.astype(int) - img.astype(int)).max()),
        "gpu_vs_cpu_mean_abs_diff": float(abs(cpu_img.astype(float) - img.astype(float)).mean()),
    }


def main() -> int:
    args = parse_args()
    t0 = time.perf_counter()
    import diffusers  # imported up front: load_s below is the artifact's load alone
    import torch
    import transformers

    import_s = time.perf_counter() - t0
    import runtime.service  # noqa: F401  (imported here: load_s times the artifact, not these imports)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "import_s": round(import_s, 2),
        "runs": [],
    }
    for precision in ["fp32"] if args.quick else ["fp32", "fp16", "bf16"]:
        run = check_precision(args, precision, device)
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

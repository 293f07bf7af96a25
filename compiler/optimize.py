"""The target-hardware pass after materialize: weights quantized once, at build time, and stored
as they will be served (safetensors), and torch.compile caches captured for the machine that
builds, so that a load converts nothing and a cold start on the same GPU kind skips compiling.

Imports torch/diffusers (called only when something is built). The compile warm-up runs the
runtime's own load-and-apply code (``python -m runtime.optimize warm``) in a fresh process: the
cache only helps if the graphs it holds are the ones the runtime will trace, and the compiler may
not import the runtime's modules beyond the artifact contract.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from compiler.plan import BuildPlan
from runtime.artifact import COMPILE_DIR, PIPELINE_DIR, TORCH_DTYPES, HypernetworkInfo, compile_cache_key

log = logging.getLogger(__name__)

# quantize: recipe value -> optimum-quanto weights dtype (diffusers' QuantoConfig)
QUANTO_WEIGHTS = {"int8": "int8", "fp8": "float8"}
# Opt-in to capture compile caches without a GPU (minutes on a CPU; the slow test uses it).
CPU_OPT_IN = "UIW_COMPILE_CACHE_CPU"


def denoiser_name(pipeline_dir: Path) -> str:
    return "unet" if (pipeline_dir / "unet").is_dir() else "transformer"


def quantize_denoiser(plan: BuildPlan, out: Path) -> None:
    """Rewrite the saved denoiser with its weights quantized (optimum-quanto through diffusers'
    QuantoConfig: int8 or fp8 weights, per-channel scales), as safetensors with the quantization
    config in its config.json. diffusers then loads it pre-quantized: the layers are built as
    quanto layers and the stored int8/fp8 tensors land in them unchanged."""
    if plan.runtime.quantize == "none":
        return
    import diffusers
    import torch

    folder = out / PIPELINE_DIR
    name = denoiser_name(folder)
    config = json.loads((folder / name / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    t0 = time.perf_counter()
    model = cls.from_pretrained(
        folder,
        subfolder=name,
        dtype=getattr(torch, TORCH_DTYPES[plan.precision]),
        quantization_config=diffusers.QuantoConfig(weights_dtype=QUANTO_WEIGHTS[plan.runtime.quantize]),
        local_files_only=True,
    )
    staged = folder / f".{name}-quantized"
    model.save_pretrained(staged, safe_serialization=True)
    shutil.rmtree(folder / name)
    staged.rename(folder / name)
    log.info("quantized the %s to %s in %.1f s", name, plan.runtime.quantize, time.perf_counter() - t0)


def capture_target() -> str | None:
    """The compile-cache key this build would capture for (None: no GPU and no CPU opt-in)."""
    import torch

    if torch.cuda.is_available() or os.environ.get(CPU_OPT_IN) == "1":
        return compile_cache_key()
    return None


def target_environment(plan: BuildPlan) -> dict[str, str]:
    """A compiling recipe's artifact holds a compile cache for the machine kind that built it, so
    that kind enters its cache key: the same recipe built on another GPU (or first on a CPU,
    without a cache) is another artifact. Torch is imported only for compiling recipes."""
    if plan.runtime.compile.scope == "off":
        return {}
    return {"compile_target": capture_target() or "none"}


def capture_compile_cache(
    plan: BuildPlan, out: Path, hypernetworks: tuple[HypernetworkInfo, ...] = (), timeout: float = 3600
) -> Path | None:
    """Warm the declared shapes in a fresh process and store torch.compiler's cache artifacts
    under ``out/compile/<key>/`` (key: GPU kind + torch/triton versions). Only on a GPU (or with
    UIW_COMPILE_CACHE_CPU=1): a cache is only good for the machine kind that made it."""
    if plan.runtime.compile.scope == "off":
        return None
    if capture_target() is None:
        log.info(
            "compile cache not captured: no GPU here (the runtime compiles on first use; "
            "set %s=1 to capture one for this CPU)",
            CPU_OPT_IN,
        )
        return None
    cmd = [
        sys.executable,
        "-m",
        "runtime.optimize",
        "warm",
        str(out),
        "--pipeline-class",
        plan.pipeline_class,
        "--options",
        plan.runtime.model_dump_json(),
        "--guidance",
        str(plan.defaults.guidance_scale),
        # the artifact's attention processors, as the runtime installs them before compiling
        "--hypernetworks",
        json.dumps([h.model_dump() for h in hypernetworks]),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"compile warm-up failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    written = Path(proc.stdout.strip().splitlines()[-1])
    log.info("compile cache %s captured in %.1f s", written.relative_to(out), time.perf_counter() - t0)
    assert written.is_relative_to(out / COMPILE_DIR)
    return written

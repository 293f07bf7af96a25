"""Full-size SDXL on a GPU: eager against torch.compile against compile-from-a-baked-cache, cold
start and warm latency at 1024x1024. One run that fits a 15-minute device lease.

Nothing is downloaded on the device: the weights are SDXL's real architecture (the configs of
compiler/family_configs.py, the ones the compiler locks for single files) with random values,
built on the GPU and saved as safetensors; the tokenizers are the compiler's tiny offline ones.

The device image has torch, transformers, accelerate, peft and safetensors but not diffusers (nor
pydantic, which runtime.artifact needs). Carry them as wheels in the ignored folder wheels/:

    .venv/bin/python scripts/gpu_sdxl.py --fetch-wheels        # here, once: pip download into wheels/
    # then on the device (run tool: carry=["wheels"]):
    python scripts/gpu_sdxl.py --out $OUT/gpu_sdxl.json --work out/gpu_sdxl   # timeout_s=600
    #   (installs what is missing from wheels/; about 5 minutes on an H100: build ~1, eager ~1,
    #   compiled ~2, cached ~1. If a call runs out, a second call on the still-warm machine with
    #   --modes compiled,cached reuses out/gpu_sdxl/pipeline.)
    python scripts/gpu_sdxl.py --tiny --out r.json               # CPU: tiny SDXL, eager (tests)
    python scripts/gpu_sdxl.py --tiny --compile --out r.json     # CPU: also compile (minutes)

Every mode runs in a fresh process (cold start = process start to first image, imports
included) with its own empty Inductor and Triton cache folders, so the only warm compile cache
in play is the one the "compiled" run baked with torch.compiler.save_cache_artifacts() and the
"cached" run loads with runtime.optimize (the artifact path compile/<gpu kind + versions>/).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "wheels"
# What the device image lacks that this script imports (directly or through runtime.optimize):
# distribution -> (module, the wheels it needs beyond what torch/transformers bring). Installed
# with --no-deps from wheels/: the device's own torch/transformers/huggingface_hub stay as they are.
NEEDED = {
    "diffusers": ("diffusers", ("diffusers==0.42.1", "importlib-metadata", "zipp")),
    "pydantic": (
        "pydantic",
        ("pydantic==2.14.4", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions>=4.16"),
    ),
    "pillow": ("PIL", ("pillow",)),
}
PINS = tuple(r for _, reqs in NEEDED.values() for r in reqs if "==" in r)
DEVICE_PYTHONS = ("3.10", "3.11", "3.12")  # the device's Python is not known in advance
PROMPT = "a lighthouse on a cliff at dusk, detailed, golden light"


def fetch_wheels() -> int:
    """pip download (here, with PyPI) the wheels the device lacks, for each likely Python."""
    WHEELS.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELS)]
    # pure-Python: one wheel for all
    subprocess.run(
        [
            *pip,
            "--no-deps",
            *PINS,
            "annotated-types",
            "typing-inspection",
            "typing-extensions",
            "importlib-metadata",
            "zipp",
        ],
        check=True,
    )
    core = _pydantic_core_pin()
    for py in DEVICE_PYTHONS:
        subprocess.run(
            [
                *pip,
                "--no-deps",
                "--only-binary=:all:",
                "--platform",
                "manylinux2014_x86_64",
                "--platform",
                "manylinux_2_28_x86_64",
                "--python-version",
                py,
                core,
                "pillow",
            ],
            check=True,
        )
    size = sum(p.stat().st_size for p in WHEELS.iterdir()) / 2**20
    print(f'{len(list(WHEELS.iterdir()))} wheels, {size:.1f} MiB in {WHEELS} (carry: ["wheels"])')
    return 0


def _pydantic_core_pin() -> str:
    from importlib import metadata

    return f"pydantic-core=={metadata.version('pydantic-core')}"


def ensure_installed() -> list[str]:
    """Install from wheels/ whatever of NEEDED cannot be imported; return what was installed."""
    missing = [dist for dist, (module, _) in NEEDED.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return []
    if not WHEELS.is_dir():
        raise SystemExit(f"missing {missing} and no {WHEELS}: run `scripts/gpu_sdxl.py --fetch-wheels` and carry it")
    wanted = [r for dist in missing for r in NEEDED[dist][1]]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links", str(WHEELS)]
    subprocess.run([*pip, *wanted], check=True)
    importlib.invalidate_caches()
    broken = [dist for dist, (module, _) in NEEDED.items() if importlib.util.find_spec(module) is None]
    if broken:
        raise SystemExit(f"still missing after installing from {WHEELS}: {broken}")
    return missing


# --- weights ------------------------------------------------------------------------------------


def build_sdxl(folder: Path, dtype_name: str, tiny: bool) -> dict[str, Any]:
    """SDXL base's real architecture with random weights (or the compiler's tiny SDXL), saved as a
    diffusers folder in ``dtype``. Built on the GPU when there is one (seconds, not minutes)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from compiler.family_configs import CONFIGS
    from compiler.tiny_models import BUILTINS, tiny_clip_tokenizer

    t0 = time.perf_counter()
    dtype = getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype_name])
    if tiny:
        pipe = BUILTINS["tiny-sdxl"].build()
    else:
        cfg = CONFIGS["sdxl"]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(cfg["unet/config.json"])
            vae = AutoencoderKL.from_config(cfg["vae/config.json"])
            te = CLIPTextModel(CLIPTextConfig(**_model_fields(cfg["text_encoder/config.json"])))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_model_fields(cfg["text_encoder_2/config.json"])))
        # Random init gives activations of the wrong scale for 30 steps of denoising; that only
        # changes the picture, not the work: the timings are those of the real architecture.
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=te,
            text_encoder_2=te2,
            tokenizer=tiny_clip_tokenizer(),
            tokenizer_2=tiny_clip_tokenizer(pad_token="!"),
            unet=unet,
            scheduler=EulerDiscreteScheduler.from_config(cfg["scheduler/scheduler_config.json"]),
        )
    pipe.to(dtype=dtype)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in pipe.components.items() if hasattr(m, "parameters")}
    pipe.save_pretrained(folder, safe_serialization=True)
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    del pipe
    return {"build_s": round(time.perf_counter() - t0, 1), "params": params, "safetensors_gib": round(size / 2**30, 2)}


def _model_fields(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures",)}


# --- one measured run (child process) ----------------------------------------------------------


def child(args: argparse.Namespace) -> int:
    t_imports = time.perf_counter()
    import diffusers
    import torch

    from runtime.optimize import apply

    imports_s = time.perf_counter() - t_imports
    diffusers.utils.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    t0 = time.perf_counter()
    dtype = getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[args.precision])
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(work / "pipeline", dtype=dtype, local_files_only=True)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    sync(torch)
    load_s = time.perf_counter() - t0
    applied = apply(pipe, runtime_options(args), device, work if args.child == "cached" else None)
    image, first_s, first_done, warm = images(pipe, args)
    result: dict[str, Any] = {
        "mode": args.child,
        "imports_s": round(imports_s, 2),
        "load_s": round(load_s, 2),
        "first_image_s": round(first_s, 2),
        "first_image_done_at": first_done,
        "warm_s": [round(s, 3) for s in warm],
        "warm_p50_s": round(statistics.median(warm), 3) if warm else None,
        "applied": applied.applied,
        "skipped": applied.skipped,
        "image_mean": float(image.mean()),
    }
    if device == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.child == "compiled":
        result.update(save_compile_cache(work))
    Path(args.result).write_text(json.dumps(result))
    return 0


def runtime_options(args: argparse.Namespace) -> Any:
    """What runtime.optimize applies in this mode: nothing for eager; compile (and with --ladder
    channels_last + fused QKV) for the compiled and cached runs."""
    from runtime.artifact import CompileOptions, RuntimeOptions

    compiled = args.child in ("compiled", "cached")
    return RuntimeOptions(
        dtype=args.precision,
        channels_last=compiled and args.ladder,
        fused_qkv=compiled and args.ladder,
        compile=CompileOptions(scope=args.scope, mode=args.mode, shapes=((args.size, args.size),))
        if compiled
        else CompileOptions(),
    )


def images(pipe: Any, args: argparse.Namespace) -> tuple[Any, float, float, list[float]]:
    """The first image (its array, seconds, and the wall-clock time it was done) and the warm
    images' seconds."""
    import torch

    def once(seed: int) -> Any:
        out = pipe(
            PROMPT,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=5.0,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        )
        sync(torch)
        return out.images[0]

    t1 = time.perf_counter()
    image = once(0)
    first_s = time.perf_counter() - t1
    first_done = time.time()
    warm = []
    for i in range(args.warm):
        t2 = time.perf_counter()
        once(i + 1)
        warm.append(time.perf_counter() - t2)
    return image, first_s, first_done, warm


def save_compile_cache(work: Path) -> dict[str, Any]:
    """The compiled run's caches, baked where the artifact keeps them (compile/<gpu kind + versions>/)
    for the cached run to load."""
    import torch

    from runtime.optimize import CACHE_FILE, COMPILE_DIR, compile_cache_key

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return {}
    out = work / COMPILE_DIR / compile_cache_key()
    out.mkdir(parents=True, exist_ok=True)
    (out / CACHE_FILE).write_bytes(saved[0])
    return {"cache_bytes": len(saved[0]), "cache_key": out.name}


def sync(torch: Any) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_child(mode: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    caches = work / f"caches-{mode}"
    shutil.rmtree(caches, ignore_errors=True)
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "TRITON_CACHE_DIR": str(caches / "triton"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    result = work / f"{mode}.json"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--work",
        str(work),
        "--result",
        str(result),
        "--precision",
        args.precision,
        "--size",
        str(args.size),
        "--steps",
        str(args.steps),
        "--warm",
        str(args.warm),
        "--scope",
        args.scope,
        "--mode",
        args.mode,
    ]
    cmd += ["--ladder"] if args.ladder else []
    started = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.child_timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out["cold_start_s"] = round(out.pop("first_image_done_at") - started, 2)
    print(json.dumps(out), flush=True)
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--tiny", action="store_true", help="CPU mode: the compiler's tiny SDXL at 64x64")
    ap.add_argument("--compile", action="store_true", help="with --tiny: also the compiled modes (minutes on a CPU)")
    ap.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--scope", default="regional", choices=("regional", "full"))
    ap.add_argument("--mode", default="default", choices=("default", "max-autotune"))
    ap.add_argument("--ladder", action="store_true", help="compiled modes also use channels_last + fused QKV")
    ap.add_argument("--child-timeout", type=float, default=420)
    ap.add_argument("--modes", default=None, help="comma list of eager,compiled,cached (default: all that apply)")
    ap.add_argument("--fetch-wheels", action="store_true")
    ap.add_argument("--child", choices=("eager", "compiled", "cached"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.precision = args.precision or ("fp32" if args.tiny else "bf16")
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 30)
    if not (args.fetch_wheels or args.child) and args.out is None:
        ap.error("--out is required")
    return args


def main() -> int:
    args = parse_args()
    if args.fetch_wheels:
        return fetch_wheels()
    if args.child:
        sys.path.insert(0, str(REPO))
        return child(args)
    installed = ensure_installed()
    sys.path.insert(0, str(REPO))
    import torch

    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_sdxl-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "installed_from_wheels": installed,
        "settings": {
            k: getattr(args, k) for k in ("tiny", "precision", "size", "steps", "warm", "scope", "mode", "ladder")
        },
        "runs": {},
    }
    import diffusers

    result["diffusers"] = diffusers.__version__
    try:
        result["weights"] = weights(work, args)
        print(json.dumps(result["weights"]), flush=True)
        for mode in modes(args):
            result["runs"][mode] = run_child(mode, args, work)
    finally:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def weights(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    # A kept --work folder (a second call on a warm device) reuses the weights and the cache.
    if (work / "pipeline" / "model_index.json").is_file():
        return {"reused": str(work / "pipeline")}
    return build_sdxl(work / "pipeline", args.precision, args.tiny)


def modes(args: argparse.Namespace) -> list[str]:
    """--modes, else eager, with the compiled modes on a GPU or with --tiny --compile."""
    if args.modes:
        return [m for m in args.modes.split(",") if m]
    return ["eager"] + (["compiled", "cached"] if (not args.tiny or args.compile) else [])


if __name__ == "__main__":
    sys.exit(main())

"""Apply an artifact's runtime options to a loaded pipeline, and capture/load compile caches.

Order (each step assumes the ones before it): channels_last (memory format of conv weights) ->
fused QKV (one matmul for q, k, v) -> attention backend -> offload hooks -> torch.compile (traces
what the steps before left) -> the artifact's compile cache for this machine, loaded before the
first call. Quantization is not here: the artifact's weights are stored quantized.

Every option says, in one log line, whether it was applied or skipped and why.

``python -m runtime.optimize warm ARTIFACT_STAGING ...`` is the compiler's compile warm-up: it
loads the staged pipeline as the runtime does, applies the same options, runs each declared
shape once and writes ``torch.compiler.save_cache_artifacts()`` under ``compile/<key>/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.artifact import (
    COMPILE_DIR,
    CPU_ATTENTION_BACKENDS,
    PIPELINE_DIR,
    TORCH_DTYPES,
    HypernetworkInfo,
    RuntimeOptions,
    absent_components,
    compile_cache_key,
)

log = logging.getLogger(__name__)

CACHE_FILE = "cache.bin"
INFO_FILE = "info.json"


@dataclass
class Applied:
    """What apply() did: option -> detail, and option -> why it was skipped."""

    applied: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        done = ", ".join(f"{k} ({v})" for k, v in self.applied.items()) or "nothing"
        why = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return f"runtime options applied: {done}" + (f"; skipped: {why}" if why else "")


def denoiser(pipe: Any) -> Any:
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def apply(pipe: Any, options: RuntimeOptions, device: str, artifact_dir: Path | None = None) -> Applied:
    """Apply ``options`` to ``pipe`` (already on ``device``) in place; log and return what was done."""
    import torch

    done = Applied()
    model = denoiser(pipe)
    on_cuda = device.startswith("cuda")
    if options.channels_last:
        # Conv layers (the UNet's, the VAE's) run faster in NHWC on GPUs; a transformer has few.
        for name in ("unet", "vae"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(memory_format=torch.channels_last)
        done.applied["channels_last"] = "unet, vae" if getattr(pipe, "unet", None) is not None else "vae"
    if options.fused_qkv:
        fused = []
        for name in ("unet", "transformer", "vae"):
            module = getattr(pipe, name, None)
            if module is not None and hasattr(module, "fuse_qkv_projections"):
                module.fuse_qkv_projections()
                fused.append(name)
        if getattr(pipe, "unet", None) is not None:
            # diffusers' pipeline-level fuse also swaps in the processor that reads to_qkv
            from diffusers.models.attention_processor import FusedAttnProcessor2_0

            for name in ("unet", "vae"):
                if name in fused:
                    getattr(pipe, name).set_attn_processor(FusedAttnProcessor2_0())
        done.applied["fused_qkv"] = ", ".join(fused)
    if options.attention is not None:
        _attention(model, options.attention, on_cuda, done)
    if options.offload != "none":
        _offload(pipe, options.offload, device, done)
    if options.compile.scope != "off":
        _compile(model, options, done)
        if artifact_dir is not None:
            load_compile_cache(artifact_dir, done)
    log.info("%s", done.line())
    return done


def _attention(model: Any, backend: str, on_cuda: bool, done: Applied) -> None:
    if not on_cuda and backend not in CPU_ATTENTION_BACKENDS:
        done.skipped["attention"] = f"{backend} needs CUDA; this runtime is on the CPU (SDPA stays)"
        return
    model.set_attention_backend(backend)
    # UNets' attention processors call SDPA directly; only processors built on diffusers'
    # dispatcher (FLUX, SD3, ... in this diffusers) honour the backend.
    uses = {type(p).__name__ for p in model.attn_processors.values() if hasattr(p, "_attention_backend")}
    if uses:
        done.applied["attention"] = backend
    else:
        names = sorted({type(p).__name__ for p in model.attn_processors.values()})
        done.skipped["attention"] = f"{backend} set, but {', '.join(names)} call SDPA directly and ignore it"


def _offload(pipe: Any, kind: str, device: str, done: Applied) -> None:
    if not device.startswith("cuda"):
        done.skipped["offload"] = f"{kind} offload is moot on {device}: weights already live in CPU memory"
        return
    if kind == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif kind == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.enable_group_offload(
            onload_device=device, offload_device="cpu", offload_type="block_level", num_blocks_per_group=1
        )
    done.applied["offload"] = kind


def _compile(model: Any, options: RuntimeOptions, done: Applied) -> None:
    """nn.Module.compile in place (not torch.compile's wrapper): the component keeps its class,
    so from_pipe, offload hooks and LoRA loading see the module they expect."""
    c = options.compile
    kwargs: dict[str, Any] = {"mode": c.mode, "dynamic": c.dynamic}
    if c.scope == "regional" and getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(**kwargs)
        done.applied["compile"] = f"regional ({', '.join(model._repeated_blocks)}; {c.mode})"
    elif c.scope == "regional":
        model.compile(**kwargs)
        done.applied["compile"] = f"full ({c.mode}): {type(model).__name__} declares no repeated blocks"
    else:
        model.compile(**kwargs)
        done.applied["compile"] = f"full ({c.mode})"


def load_compile_cache(artifact_dir: Path, done: Applied) -> bool:
    """Load the artifact's compile cache for this machine kind into torch's caches (before the
    first call); a cache made on another kind is ignored, with a log line."""
    import torch

    root = Path(artifact_dir) / COMPILE_DIR
    key = compile_cache_key()
    have = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    blob = root / key / CACHE_FILE
    if not blob.is_file():
        why = f"built for {', '.join(have)}" if have else "the artifact has none"
        done.skipped["compile_cache"] = f"no cache for {key} ({why}); compiling on first call"
        return False
    t0 = time.perf_counter()
    torch.compiler.load_cache_artifacts(blob.read_bytes())
    done.applied["compile_cache"] = f"{key} ({time.perf_counter() - t0:.2f} s)"
    return True


def warm(
    staging: Path,
    pipeline_class: str,
    options: RuntimeOptions,
    guidance: float,
    hypernetworks: tuple[HypernetworkInfo, ...] = (),
) -> Path:
    """The compiler's warm-up: load the staged pipeline, apply ``options``, run one step at each
    declared shape, and save torch.compiler's cache artifacts under compile/<key>/."""
    import diffusers
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = getattr(diffusers, pipeline_class).from_pretrained(
        staging / PIPELINE_DIR,
        dtype=getattr(torch, TORCH_DTYPES[options.dtype]),
        local_files_only=True,
        **absent_components(staging / PIPELINE_DIR),
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if hypernetworks:
        from runtime.hypernetworks import install

        install(pipe.unet, staging, hypernetworks)
    apply(pipe, options, device)
    seconds = {}
    for w, h in options.compile.shapes:
        t0 = time.perf_counter()
        # One step, latents out: the denoiser is what is compiled; the VAE is not.
        pipe(
            "warm-up",
            width=w,
            height=h,
            num_inference_steps=1,
            guidance_scale=guidance,
            output_type="latent",
            generator=torch.Generator("cpu").manual_seed(0),
        )
        seconds[f"{w}x{h}"] = round(time.perf_counter() - t0, 2)
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("torch.compiler.save_cache_artifacts() returned nothing: no compile happened")
    data, info = saved
    key = compile_cache_key()
    out = staging / COMPILE_DIR / key
    out.mkdir(parents=True, exist_ok=True)
    (out / CACHE_FILE).write_bytes(data)
    (out / INFO_FILE).write_text(
        json.dumps({"key": key, "shapes": seconds, "scope": options.compile.scope, "bytes": len(data)}, indent=2) + "\n"
    )
    del info
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.optimize")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("warm", help="compile warm-up for a staged artifact (the compiler runs this)")
    w.add_argument("staging", type=Path)
    w.add_argument("--pipeline-class", required=True)
    w.add_argument("--options", required=True, help="RuntimeOptions as JSON")
    w.add_argument("--guidance", type=float, default=7.5)
    w.add_argument("--hypernetworks", default="[]", help="the artifact's HypernetworkInfo list as JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the runtime loader: nothing reaches the Hub
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    hypernetworks = tuple(HypernetworkInfo.model_validate(h) for h in json.loads(args.hypernetworks))
    options = RuntimeOptions.model_validate_json(args.options)
    out = warm(args.staging, args.pipeline_class, options, args.guidance, hypernetworks)
    print(out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

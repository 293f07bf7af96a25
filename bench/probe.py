"""One measurement in a fresh process; prints one JSON object. Run by bench.measure, never imported
by it (its timings start with this interpreter: nothing heavy is imported above ``main``).

    python -m bench.probe artifact DIR  --spawned T [--requests N --width W --height H --steps S]
    python -m bench.probe naive STACK   --spawned T --precision fp32 [...]
    python -m bench.probe floor FILE... --spawned T

- artifact: the runtime's own path: ``runtime.service.Service`` (``runtime.loader.load``), every
  tensor touched, then requests through ``Service.run`` (validation, generation, PNG data URI).
- naive: a plain diffusers worker's start: ``from_single_file`` + ``load_lora_weights`` (each LoRA)
  + ``fuse_lora`` + ``load_textual_inversion``, every tensor touched, then the same requests
  through the pipeline and PIL's PNG encoder.
- floor: ``safetensors.torch.load_file`` of each file, every tensor touched.

Times (seconds): ``imports`` from this interpreter's first line of main to the last import;
``ready`` from after the imports until the pipeline can serve; ``first_image`` = ready + the first
image encoded as PNG; ``cold_start`` from the parent's fork (``--spawned``, a ``time.time()``) to
that PNG. ``touch`` reads one element in every 4 KiB page of every tensor, so an mmap that has not
been read yet cannot pass for a load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

PAGE = 4096


def touch_tensors(tensors: Any) -> int:
    """Read every page of every tensor; returns bytes covered."""
    import torch

    total = 0
    with torch.inference_mode():
        for t in tensors:
            if t.device.type == "meta":
                raise RuntimeError("a tensor on the meta device: the load left weights unmaterialised")
            flat = t.detach().reshape(-1)
            step = max(1, PAGE // t.element_size())
            flat[::step].float().sum().item()
            total += t.numel() * t.element_size()
    return total


def module_tensors(modules: Any) -> list[Any]:
    import torch

    out: list[Any] = []
    for m in modules:
        if isinstance(m, torch.nn.Module):
            out += list(m.parameters()) + list(m.buffers())
    return out


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def gpu_peak() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def import_classes(artifact_dir: Any) -> None:
    """Import the classes the artifact's pipelines are made of (diffusers and transformers import
    lazily, on first attribute access): counted as imports, as the naive worker's
    ``from diffusers import StableDiffusionPipeline`` is, not as loading."""
    import importlib

    from runtime.artifact import PIPELINE_DIR, read_manifest

    manifest = read_manifest(artifact_dir)
    diffusers = importlib.import_module("diffusers")
    for name in {manifest.pipeline_class, *manifest.capabilities.pipelines.values()}:
        getattr(diffusers, name, None)
    index = json.loads((artifact_dir / PIPELINE_DIR / "model_index.json").read_text())
    for value in index.values():
        if isinstance(value, list) and len(value) == 2 and value[0]:
            getattr(importlib.import_module(value[0]), value[1])


def serve(one: Any, args: argparse.Namespace) -> tuple[float, float, list[float]]:
    """The first request (its end time and the cold start to it), then the warm ones' seconds."""
    one()
    first = time.perf_counter()
    cold = time.time() - args.spawned
    warm = []
    for _ in range(args.requests):
        s = time.perf_counter()
        one()
        warm.append(time.perf_counter() - s)
    return first, cold, warm


def artifact(args: argparse.Namespace, t0: float) -> dict[str, Any]:
    from pathlib import Path

    import diffusers  # noqa: F401  (imports counted as imports, as the naive worker's are)
    import torch  # noqa: F401

    from runtime.service import Service, Settings

    import_classes(Path(args.target[0]))
    t1 = time.perf_counter()
    service = Service(Settings(artifacts=(args.target[0],), home=Path(args.target[0]).parent))
    loaded = service.default
    nbytes = touch_tensors(module_tensors([*loaded.pipeline.components.values(), *loaded.controlnets.values()]))
    t2 = time.perf_counter()
    request = {
        "prompt": args.prompt,
        "width": args.width,
        "height": args.height,
        "num_inference_steps": args.steps,
        "seed": 1,
    }

    def one() -> None:
        reply = service.run(request)
        if "images" not in reply:
            raise RuntimeError(f"the bench request failed: {reply}")

    first, cold, warm = serve(one, args)
    return {
        "imports": t1 - t0,
        "load": loaded.load_seconds,
        "ready": t2 - t1,
        "first_image": first - t1,
        "cold_start": cold,
        "warm": warm,
        "bytes": nbytes,
        "device": loaded.device,
        "dtype": loaded.manifest.runtime.dtype,
        "gpu_peak": gpu_peak(),
    }


def naive(args: argparse.Namespace, t0: float) -> dict[str, Any]:
    # Everything the naive worker imports, before t1: the helpers below find it imported, so
    # imports stay counted as imports, not as loading.
    import base64  # noqa: F401
    import io  # noqa: F401
    from pathlib import Path

    import diffusers  # noqa: F401
    import torch
    from diffusers import StableDiffusionPipeline  # noqa: F401

    from bench.stack import Stack

    t1 = time.perf_counter()
    stack = Stack.read(Path(args.target[0]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe, steps = naive_pipeline(stack, args.precision)
    pipe.to(device)
    nbytes = touch_tensors(module_tensors(pipe.components.values()))
    t2 = time.perf_counter()
    first, cold, warm = serve(naive_request(pipe, args), args)
    return {
        "imports": t1 - t0,
        "load": t2 - t1,
        "ready": t2 - t1,
        "first_image": first - t1,
        "cold_start": cold,
        "warm": warm,
        "bytes": nbytes,
        "device": device,
        "dtype": args.precision,
        "gpu_peak": gpu_peak(),
        "steps": steps,
    }


def naive_pipeline(stack: Any, precision: str) -> tuple[Any, dict[str, float]]:
    """The stack as a plain diffusers script loads it each start (single file, LoRAs fused, the
    embedding, the demo's scheduler), with each step's seconds."""
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    steps: dict[str, float] = {}
    s = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(
        stack.checkpoint, config=stack.configs, local_files_only=True, torch_dtype=dtype
    )
    pipe.set_progress_bar_config(disable=True)
    steps["from_single_file"] = time.perf_counter() - s
    s = time.perf_counter()
    names = [f"lora{i}" for i in range(len(stack.loras))]
    for name, lora in zip(names, stack.loras, strict=True):
        pipe.load_lora_weights(lora.path, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[lo.scale for lo in stack.loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    steps["loras_fuse"] = time.perf_counter() - s
    s = time.perf_counter()
    pipe.load_textual_inversion(stack.embedding, token=stack.token)
    steps["embedding"] = time.perf_counter() - s
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe, steps


def naive_request(pipe: Any, args: argparse.Namespace) -> Callable[[], None]:
    """One request as the naive worker serves it: generate, PNG, base64."""
    import base64
    import io

    import torch

    def one() -> None:
        generator = torch.Generator("cpu").manual_seed(1)
        with torch.inference_mode():
            image = pipe(
                args.prompt,
                width=args.width,
                height=args.height,
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                generator=generator,
            ).images[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        base64.b64encode(buf.getvalue())

    return one


def floor(args: argparse.Namespace, t0: float) -> dict[str, Any]:
    from safetensors.torch import load_file

    t1 = time.perf_counter()
    nbytes = 0
    for path in args.target:
        nbytes += touch_tensors(load_file(path).values())
    t2 = time.perf_counter()
    return {"imports": t1 - t0, "load": t2 - t1, "ready": t2 - t1, "bytes": nbytes}


def main(argv: list[str] | None = None) -> None:
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("artifact", "naive", "floor"))
    ap.add_argument("target", nargs="+")
    ap.add_argument("--spawned", type=float, required=True)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--prompt", default="a lighthouse at dusk")
    args = ap.parse_args(argv)
    result = {"artifact": artifact, "naive": naive, "floor": floor}[args.kind](args, t0)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

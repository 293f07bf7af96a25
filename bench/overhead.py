"""Per-request overhead of the runtime over calling the same pipeline directly, and the cost of
encoding the reply's images at 1024x1024 in each format.

    .venv/bin/python -m bench.overhead [--reps 40] [--encode-reps 15] [--artifact DIR]

Part 1 (64x64, 1 step, the demo artifact): the same request through ``Service.run`` (selection,
validation, scheduler per request, generation, PNG data URI, reply, log line, metrics) and as a
plain diffusers call on the same loaded pipeline (same prompt, size, steps, scheduler, CPU
generator, PIL output), interleaved, many repetitions, medians; overhead = runtime - direct. The
runtime's own pieces (validate, encode + data URI) are timed alone too. The clock is the process's
CPU time (every thread), with torch on one thread (--threads): on shared cores the wall clock
mostly measures the neighbours (a few wall-clock samples are reported beside it for context).

Part 2 (1024x1024): what encoding costs at full size, per format and setting, on the tiny model's
own 1024x1024 output (1 step: noise-like, PNG's worst case) and on a smooth synthetic picture
(closer to a photo: PNG compresses it). The pipeline call itself is left out: at 1024 the tiny
model's time varies by more than the overhead being measured, and the overhead there is the encode.

Prints one JSON object. Numbers from this CPU are noisy (shared cores): compare within one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.artifact import DEFAULT_HOME

REQ = {"prompt": "a red fox in the snow", "seed": 7, "num_inference_steps": 1, "width": 64, "height": 64}


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def _timed(fn: Any) -> float:
    """CPU seconds of the whole process (every thread) while fn runs. Not wall time: this machine's
    cores are shared, and a descheduled moment is not the runtime's cost. (Wall: see _wall.)"""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def _wall(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def demo_artifact(home: Path) -> Path:
    env = {**os.environ, "UIW_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-m", "compiler", "recipe=demo"], env=env, capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def part1(artifact: Path, home: Path, reps: int) -> dict[str, Any]:
    import diffusers
    import torch

    from runtime.encode import encode
    from runtime.loader import load
    from runtime.schema import validate
    from runtime.service import Service, Settings

    logging_off()
    service = Service(Settings(artifacts=(str(artifact),), home=home))
    direct = load(artifact)
    pipe, manifest = direct.pipeline, direct.manifest
    d = manifest.serving.defaults
    scheduler_cls = diffusers.EulerDiscreteScheduler  # the demo's K_EULER

    def call_direct() -> Any:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        with torch.inference_mode():
            return pipe(
                REQ["prompt"],
                negative_prompt=d.negative_prompt,
                width=64,
                height=64,
                num_inference_steps=1,
                guidance_scale=d.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(7),
            ).images

    def call_runtime() -> Any:
        reply = service.run(dict(REQ))
        assert "images" in reply, reply
        return reply

    for _ in range(3):  # warm-up: first calls allocate and fill caches
        call_direct()
        call_runtime()
    image = call_direct()[0]
    t = interleaved(
        call_direct,
        call_runtime,
        validate=lambda: validate(dict(REQ), manifest),
        encode=lambda: encode(image, "png").data_uri(),
        reps=reps,
    )
    return part1_report(t, reps)


def interleaved(
    call_direct: Callable[[], Any],
    call_runtime: Callable[[], Any],
    *,
    validate: Callable[[], Any],
    encode: Callable[[], Any],
    reps: int,
) -> dict[str, list[float]]:
    """CPU-time samples of both calls, alternating, with the runtime's pieces timed alone, and a
    few wall-clock samples."""
    t: dict[str, list[float]] = {
        k: [] for k in ("direct", "runtime", "validate", "encode", "wall_direct", "wall_runtime")
    }
    for i in range(reps):
        # alternate the order so neither side always runs on a cache the other just warmed
        if i % 2:
            t["direct"].append(_timed(call_direct))
            t["runtime"].append(_timed(call_runtime))
        else:
            t["runtime"].append(_timed(call_runtime))
            t["direct"].append(_timed(call_direct))
        if i % 4 == 0:  # wall clock too, for context (inflated by whatever else runs)
            t["wall_direct"].append(_wall(call_direct))
            t["wall_runtime"].append(_wall(call_runtime))
        t["validate"].append(_timed(validate))
        t["encode"].append(_timed(encode))
    return t


def part1_report(t: dict[str, list[float]], reps: int) -> dict[str, Any]:
    direct_ms, runtime_ms = _median_ms(t["direct"]), _median_ms(t["runtime"])
    return {
        "size": "64x64",
        "steps": 1,
        "reps": reps,
        "direct_pipeline_ms": direct_ms,
        "runtime_ms": runtime_ms,
        "overhead_ms": round(runtime_ms - direct_ms, 3),
        "overhead_ms_paired_median": _median_ms([r - q for r, q in zip(t["runtime"], t["direct"], strict=True)]),
        "validate_ms": _median_ms(t["validate"]),
        "encode_png_data_uri_ms": _median_ms(t["encode"]),
        "clock": "process CPU time (all threads)",
        "direct_spread_ms": [_median_ms([min(t["direct"])]), _median_ms([max(t["direct"])])],
        "runtime_spread_ms": [_median_ms([min(t["runtime"])]), _median_ms([max(t["runtime"])])],
        "wall_direct_ms": _median_ms(t["wall_direct"]),
        "wall_runtime_ms": _median_ms(t["wall_runtime"]),
        "wall_reps": len(t["wall_direct"]),
    }


def smooth_picture(size: int = 1024) -> Any:
    """A photo-like test picture: smooth shapes and gradients (Mandelbrot + upscaled colour field)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    m = Image.effect_mandelbrot((size, size), (-2.0, -1.2, 0.8, 1.2), 100).convert("L")
    low = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    return Image.merge("RGB", (m, low.getchannel(1), low.getchannel(2)))


def model_picture(artifact: Path) -> Any:
    """The tiny model's own 1024x1024 output, 1 step."""
    import torch

    from runtime.loader import load

    pipe = load(artifact).pipeline
    with torch.inference_mode():
        return pipe(
            "a red fox in the snow",
            width=1024,
            height=1024,
            num_inference_steps=1,
            generator=torch.Generator("cpu").manual_seed(7),
        ).images[0]


def part2(pictures: dict[str, Any], reps: int) -> dict[str, Any]:
    import base64

    from runtime.encode import PNG_OPTIONS, WEBP_METHOD, encode

    def pillow(image: Any, **kw: Any) -> bytes:
        buf = io.BytesIO()
        image.save(buf, **kw)
        return buf.getvalue()

    settings = {
        "png (runtime: level 1, RLE)": lambda im: encode(im, "png").data,
        "png Pillow default (level 6)": lambda im: pillow(im, format="PNG"),
        "png level 1": lambda im: pillow(im, format="PNG", compress_level=1),
        "jpeg q90 (runtime)": lambda im: encode(im, "jpeg", 90).data,
        f"webp q90 method {WEBP_METHOD} (runtime)": lambda im: encode(im, "webp", 90).data,
        "webp q90 method 4 (Pillow default)": lambda im: pillow(im, format="WEBP", quality=90),
    }
    out: dict[str, Any] = {"png_options": PNG_OPTIONS, "webp_method": WEBP_METHOD, "reps": reps}
    for name, image in pictures.items():
        rows = {}
        samples: dict[str, list[float]] = {k: [] for k in settings}
        sizes = {k: len(fn(image)) for k, fn in settings.items()}
        for _ in range(reps):  # interleaved: load changes hit every setting alike
            for k, fn in settings.items():
                samples[k].append(_timed(lambda fn=fn, image=image: fn(image)))
        for k in settings:
            rows[k] = {"ms": _median_ms(samples[k]), "kib": round(sizes[k] / 1024, 1)}
        data = settings["png (runtime: level 1, RLE)"](image)
        rows["base64 of the png (data URI)"] = {"ms": _median_ms([_timed(lambda data=data: base64.b64encode(data))])}
        out[name] = rows
    return out


def logging_off() -> None:
    import logging

    logging.getLogger("runtime").setLevel(logging.WARNING)  # one log line per request is not measured output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--encode-reps", type=int, default=15)
    parser.add_argument("--artifact", type=Path, help="an artifact directory (default: compile recipes/demo.yaml)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on shared cores)")
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("UIW_HOME", DEFAULT_HOME)).expanduser())
    args = parser.parse_args()
    artifact = args.artifact or demo_artifact(args.home)
    import torch

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "clock": "CPU time"}
    result["tiny_64_1step"] = part1(artifact, args.home, args.reps)
    pictures = {"tiny model 1024x1024 (noise-like)": model_picture(artifact), "smooth 1024x1024": smooth_picture()}
    result["encode_1024"] = part2(pictures, args.encode_reps)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

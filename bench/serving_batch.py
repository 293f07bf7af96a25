"""Batched vs one-at-a-time denoise+decode on this machine: is one pipeline call for N compatible
requests faster than N calls? Prints JSON (medians over repeats). Used to choose UIW_MAX_BATCH's
default (docs/operations.md "Progress, concurrency and failures", bench/RESULTS.md "Serving concurrency").

    .venv/bin/python -m bench.serving_batch [--size 64] [--steps 4] [--batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--builtin", default="tiny-sd15")
    return parser.parse_args()


def requests_for(args: argparse.Namespace) -> list[Any]:
    """``--batch`` compatible txt2img requests, each with its own prompt and seed."""
    from runtime.schema import GenerationRequest

    return [
        GenerationRequest(
            task="txt2img",
            prompt=f"a red fox in the snow, take {i}",
            negative_prompt="blurry",
            width=args.size,
            height=args.size,
            steps=args.steps,
            guidance_scale=7.5,
            scheduler="K_EULER",
            seed=100 + i,
            num_images=1,
        )
        for i in range(args.batch)
    ]


def timed(runs: dict[str, Callable[[], list]], repeats: int) -> tuple[dict[str, float], list]:
    """Median wall seconds of each run over ``repeats``, interleaved; and the last run's images."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    images: list = []
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            images = fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, images


def main() -> None:
    args = parse_args()

    import numpy as np
    import torch

    from compiler.tiny_models import BUILTINS
    from runtime.generate import decode, denoise

    pipe = BUILTINS[args.builtin].build()
    pipe.set_progress_bar_config(disable=True)
    requests = requests_for(args)

    def solo() -> list:
        return [decode(pipe, denoise(pipe, [r])[0], r)[0] for r in requests]

    def batched() -> list:
        out = denoise(pipe, requests)
        return [decode(pipe, d, r)[0] for d, r in zip(out, requests, strict=True)]

    solo(), batched()  # warm-up
    med, images = timed({"solo": solo, "batched": batched}, args.repeats)
    a = [np.asarray(im, dtype=int) for im in solo()]
    b = [np.asarray(im, dtype=int) for im in batched()]
    report = {
        "builtin": args.builtin,
        "size": args.size,
        "steps": args.steps,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "solo_s": round(med["solo"], 4),
        "batched_s": round(med["batched"], 4),
        "speedup": round(med["solo"] / med["batched"], 3),
        "max_abs_diff_255": int(max(np.abs(x - y).max() for x, y in zip(a, b, strict=True))),
        "images": len(images),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""Warm latency of one artifact three ways in ONE process, alternating: the runtime's
``Service.run``, a direct call of the pipeline the runtime loaded, and a plain diffusers
``from_pretrained`` of the same folder. On a noisy machine separate processes can land on
different moments of contention; side by side in one process they cannot.

    .venv/bin/python -m bench.warm_ab ARTIFACT_DIR [--prompt TEXT] [--rounds N]

Prints one JSON object: seconds per call for each way, per round.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompt", default="a lighthouse at dusk")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import diffusers
    import torch

    from runtime.artifact import PIPELINE_DIR
    from runtime.service import Service, Settings

    service = Service(Settings(artifacts=(str(args.artifact),), home=args.artifact.parent))
    loaded = service.default
    plain = getattr(diffusers, loaded.manifest.pipeline_class).from_pretrained(
        args.artifact / PIPELINE_DIR, dtype=loaded.pipeline.dtype, local_files_only=True
    )
    plain.set_progress_bar_config(disable=True)
    request = {
        "prompt": args.prompt,
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "seed": 1,
    }

    def direct(pipe: Any) -> None:
        generator = torch.Generator("cpu").manual_seed(1)
        with torch.inference_mode():
            pipe(args.prompt, width=args.size, height=args.size, num_inference_steps=args.steps, generator=generator)

    ways = {
        "service_run": lambda: service.run(request),
        "loaded_pipeline": lambda: direct(loaded.pipeline),
        "plain_from_pretrained": lambda: direct(plain),
    }
    for call in ways.values():  # first calls (allocator, kernels) out of the record
        call()
    out: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, call in ways.items():
            t0 = time.perf_counter()
            call()
            out[name].append(round(time.perf_counter() - t0, 4))
    print(json.dumps({"threads": torch.get_num_threads(), "prompt": args.prompt, "seconds": out}))


if __name__ == "__main__":
    main()

"""GenerationRequest + loaded pipeline -> PIL images. No shared mutable state between requests:
each call gets its own scheduler and generator on a view of the shared components."""

from __future__ import annotations

from typing import Any

from runtime.artifact import SCHEDULERS
from runtime.schema import GenerationRequest


def generate(pipeline: Any, request: GenerationRequest) -> list[Any]:
    import diffusers
    import torch

    scheduler = getattr(diffusers, SCHEDULERS[request.scheduler]).from_config(pipeline.scheduler.config)
    # from_pipe shares every weight-holding component; only the scheduler is this request's own.
    pipe = type(pipeline).from_pipe(pipeline, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    # A CPU generator: the same seed gives the same noise on any device, GPU kind or driver.
    generator = torch.Generator("cpu").manual_seed(request.seed)
    with torch.inference_mode():
        out = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.num_images,
            generator=generator,
        )
    return list(out.images)

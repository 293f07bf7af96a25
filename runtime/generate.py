"""GenerationRequest + loaded pipeline -> PIL images. No shared mutable state between requests:
each call gets its own scheduler and generator on a view of the shared components."""

from __future__ import annotations

import copy
from typing import Any

from runtime.artifact import SCHEDULERS
from runtime.schema import GenerationRequest


def generate(pipeline: Any, request: GenerationRequest) -> list[Any]:
    import diffusers
    import torch

    # Always from the base model's own scheduler config (the artifact keeps it unconverted; the
    # shared pipeline's scheduler is never replaced), so the result does not depend on history.
    scheduler = getattr(diffusers, SCHEDULERS[request.scheduler]).from_config(pipeline.scheduler.config)
    # A shallow copy shares every weight-holding component; only the scheduler (and the per-call
    # attributes __call__ sets) are this request's own. Not from_pipe: it re-runs the pipeline's
    # __init__, which rewrites some schedulers' configs (SD's clip_sample/steps_offset "fixes"), so
    # the result would differ from `pipe.scheduler = X.from_config(...)` in plain diffusers.
    pipe = copy.copy(pipeline)
    pipe.scheduler = scheduler
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

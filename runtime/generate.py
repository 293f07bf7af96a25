"""GenerationRequest + loaded pipeline -> PIL images. No shared mutable state between requests:
each call gets its own scheduler and generator on a view of the shared components.

The pipeline is the one of the request's task (runtime.loader.Loaded.pipelines: txt2img, img2img
and inpaint pipelines share every weight); for img2img and inpaint the request carries its image
(and mask) already decoded and at the output size (runtime.inputs.attach_images)."""

from __future__ import annotations

import copy
import inspect
from typing import Any, Literal

from runtime.artifact import SCHEDULERS
from runtime.schema import GenerationRequest

# What each pipeline class does with worker-sdxl's guidance fields. An explicit table rather than
# signature inspection: FluxPipeline's __call__ accepts `negative_prompt` and silently ignores it
# (it only acts with true_cfg_scale > 1), and its `guidance_scale` means something else.
#   cfg:       classifier-free guidance: guidance_scale with negative_prompt (SD 1.x/2.x, SDXL, SD 3).
#   distilled: guidance_scale is an input of a guidance-distilled transformer, one pass per step
#              (FLUX.1 [dev]); a transformer without a guidance embedder ([schnell]) takes none. A
#              negative prompt needs "true CFG" (true_cfg_scale, two passes per step), which
#              worker-sdxl has no field for: it is dropped, with a warning.
Guidance = Literal["cfg", "distilled"]
GUIDANCE: dict[str, Guidance] = {
    "StableDiffusionPipeline": "cfg",
    "StableDiffusionImg2ImgPipeline": "cfg",
    "StableDiffusionInpaintPipeline": "cfg",
    "StableDiffusionXLPipeline": "cfg",
    "StableDiffusionXLImg2ImgPipeline": "cfg",
    "StableDiffusionXLInpaintPipeline": "cfg",
    "StableDiffusion3Pipeline": "cfg",
    "StableDiffusion3Img2ImgPipeline": "cfg",
    "StableDiffusion3InpaintPipeline": "cfg",
    "StableDiffusionControlNetPipeline": "cfg",
    "StableDiffusionXLControlNetPipeline": "cfg",
    "FluxPipeline": "distilled",
    "FluxImg2ImgPipeline": "distilled",
    "FluxInpaintPipeline": "distilled",
    "FluxFillPipeline": "distilled",
}


def guidance_kind(pipeline: Any) -> Guidance:
    name = type(pipeline).__name__
    if name not in GUIDANCE:
        raise ValueError(f"no guidance rule for {name}. hint: add it to runtime.generate.GUIDANCE")
    return GUIDANCE[name]


def _guidance_embedder(pipeline: Any) -> bool:
    return bool(pipeline.transformer.config.get("guidance_embeds", False))


def request_warnings(pipeline: Any, request: GenerationRequest) -> list[str]:
    """What of the request this model ignores or changes, for the reply's `warnings`."""
    if guidance_kind(pipeline) == "cfg":
        return []
    warnings = []
    if request.negative_prompt:
        warnings.append(
            "negative_prompt: ignored, this model uses distilled guidance (no classifier-free guidance pass)"
        )
    if request.guidance_scale and not _guidance_embedder(pipeline):
        warnings.append("guidance_scale: ignored, this model is not guidance-distilled (it takes no guidance)")
    # FLUX packs 2x2 latent patches: sizes are multiples of 16 (the VAE's 8 x 2), and diffusers
    # rounds other sizes down, where the request schema only asks for multiples of 8.
    step = pipeline.vae_scale_factor * 2
    for field, value in (("width", request.width), ("height", request.height)):
        if value % step:
            warnings.append(f"{field}: {value} rounded down to {value - value % step}, a multiple of {step}")
    return warnings


def _takes_size(cls: type) -> bool:
    # SD and SDXL img2img take no width/height: their output has the input image's size, which
    # attach_images made the requested one. The others take it (and resize to it themselves).
    return "width" in inspect.signature(cls.__call__).parameters


def call_arguments(pipeline: Any, request: GenerationRequest) -> dict[str, Any]:
    """The pipeline's __call__ arguments for the request, less the generator: only those it takes."""
    args: dict[str, Any] = {
        "prompt": request.prompt,
        "num_inference_steps": request.steps,
        "num_images_per_prompt": request.num_images,
    }
    if _takes_size(type(pipeline)):
        args.update(width=request.width, height=request.height)
    if request.task == "controlnet":
        images, scales = list(request.control_images), [scale for _, scale in request.controlnets]
        # One ControlNet: diffusers takes a single image and float; several: lists in order.
        args.update(
            image=images[0] if len(images) == 1 else images,
            controlnet_conditioning_scale=scales[0] if len(scales) == 1 else scales,
        )
    elif request.task != "txt2img":
        if request.image is None:
            raise ValueError(f"a {request.task} request without its decoded image (runtime.inputs.attach_images)")
        args.update(image=request.image, strength=request.strength)
    if request.task == "inpaint":
        args["mask_image"] = request.mask
    if guidance_kind(pipeline) == "cfg":
        args.update(negative_prompt=request.negative_prompt, guidance_scale=request.guidance_scale)
    elif _guidance_embedder(pipeline):
        args["guidance_scale"] = request.guidance_scale
    return args


def generate(pipeline: Any, request: GenerationRequest) -> list[Any]:
    import diffusers
    import torch

    # Always from the base model's own scheduler config (the artifact keeps it unconverted; the
    # shared pipeline's scheduler is never replaced), so the result does not depend on history.
    scheduler = getattr(diffusers, SCHEDULERS[request.scheduler]).from_config(pipeline.scheduler.config)
    # A shallow copy shares every weight-holding component; only the scheduler (and the per-call
    # attributes __call__ sets) are this request's own. Not from_pipe per request: it re-runs the pipeline's
    # __init__, which rewrites some schedulers' configs (SD's clip_sample/steps_offset "fixes"), so
    # the result would differ from `pipe.scheduler = X.from_config(...)` in plain diffusers.
    pipe = copy.copy(pipeline)
    pipe.scheduler = scheduler
    # A CPU generator: the same seed gives the same noise on any device, GPU kind or driver.
    generator = torch.Generator("cpu").manual_seed(request.seed)
    with torch.inference_mode():
        out = pipe(**call_arguments(pipeline, request), generator=generator)
    return list(out.images)

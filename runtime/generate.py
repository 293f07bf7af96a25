"""GenerationRequest + loaded pipeline -> PIL images, in two phases: `denoise` (text encoding and
the denoise loop, to latents; the only phase that must see a request's switchable LoRAs) and
`decode` (VAE and post-processing, free to overlap other requests). No shared mutable state
between requests: each call gets its own scheduler and generators on a view of the shared
components. Several compatible requests (batch_key) can share one denoise call.

The pipeline is the one of the request's task (runtime.loader.Loaded.pipelines: txt2img, img2img
and inpaint pipelines share every weight); for img2img and inpaint the request carries its image
(and mask) already decoded and at the output size (runtime.inputs.attach_images)."""

from __future__ import annotations

import copy
import inspect
import threading
import time
import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

from runtime.artifact import SCHEDULERS
from runtime.pipeline_call import generic_arguments, pipeline_output, takes_step_callback
from runtime.progress import BatchWatch, StepWatch
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
    if request.call is not None or guidance_kind(pipeline) == "cfg":  # generic: only fields it takes
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
    if request.call is not None:
        return generic_arguments(pipeline, request)
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


def batch_key(request: GenerationRequest) -> tuple[Any, ...] | None:
    """What requests must share to run as one pipeline call, or None for a request that runs on
    its own. Text-to-image with one image each: a batch then draws each image's noise from its own
    generator, exactly as its solo call draws it (num_images > 1 shares one generator per request,
    which a batch of generators cannot reproduce). Prompts and negative prompts may differ (they
    are lists); everything that shapes the call must not. Whether there is a negative prompt at
    all shapes it: SDXL reads a missing one as zero embeddings (force_zeros_for_empty_prompt), not
    as the embedding of "", and a list of negative prompts cannot hold None."""
    if request.task != "txt2img" or request.num_images != 1 or request.call is not None:
        return None  # generic artifacts run solo: their own parameters may shape the call
    return (
        request.task,
        request.width,
        request.height,
        request.steps,
        request.scheduler,
        request.guidance_scale,
        request.loras,
        request.negative_prompt is None,
    )


def batch_arguments(pipeline: Any, requests: Sequence[GenerationRequest]) -> dict[str, Any]:
    """One call for several batch_key-compatible requests: prompts (and negative prompts) as lists."""
    args = call_arguments(pipeline, requests[0])
    args["prompt"] = [r.prompt for r in requests]
    if "negative_prompt" in args:
        negatives = [r.negative_prompt for r in requests]
        if all(n is None for n in negatives):
            args["negative_prompt"] = None  # each pipeline's own "no negative prompt", as solo
        elif any(n is None for n in negatives):
            raise ValueError("a batch mixes requests with and without a negative prompt (see batch_key)")
        else:
            args["negative_prompt"] = negatives
    return args


# How each pipeline family turns final latents into images, for decode(); None: the pipeline
# decodes inside its own call (a family we have not checked ours against).
DecodeKind = Literal["sd", "sdxl", "sd3", "flux"]


def decode_kind(pipeline: Any) -> DecodeKind | None:
    name = type(pipeline).__name__
    if type(getattr(pipeline, "vae", None)).__name__ != "AutoencoderKL" or name not in GUIDANCE:
        return None
    if name.startswith("StableDiffusionXL"):
        return "sdxl"
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    return "sd"


@dataclass(frozen=True)
class Denoised:
    """One request's share of a denoise call: its final latents, or its images when the
    pipeline decoded them itself (decode_kind None)."""

    latents: Any = None
    images: tuple[Any, ...] = ()


def denoise(
    pipeline: Any,
    requests: Sequence[GenerationRequest],
    watches: Sequence[StepWatch | None] | None = None,
    exclusive: AbstractContextManager[Any] | None = None,
) -> list[Denoised]:
    """The text encoding and denoise loop of one pipeline call for one request, or for several
    batch_key-compatible ones, stopping at the latents. Only this phase touches the switchable
    LoRA layers, so only it runs inside `exclusive` (runtime.loader.Loaded.loras)."""
    import diffusers
    import torch

    first = requests[0]
    # Always from the base model's own scheduler config (the artifact keeps it unconverted; the
    # shared pipeline's scheduler is never replaced), so the result does not depend on history.
    # A generic artifact's own scheduler may be a class outside SCHEDULERS: named by its class.
    scheduler = getattr(diffusers, SCHEDULERS.get(first.scheduler, first.scheduler)).from_config(
        pipeline.scheduler.config
    )
    # A shallow copy shares every weight-holding component; only the scheduler (and the per-call
    # attributes __call__ sets: _interrupt, _guidance_scale, ...) are this call's own. Not from_pipe
    # per request: it re-runs the pipeline's __init__, which rewrites some schedulers' configs (SD's
    # clip_sample/steps_offset "fixes"), so the result would differ from plain diffusers.
    pipe = copy.copy(pipeline)
    pipe.scheduler = scheduler
    for name, tokenizer in own_tokenizers(pipeline).items():
        setattr(pipe, name, tokenizer)
    # CPU generators: the same seed gives the same noise on any device, GPU kind or driver.
    if len(requests) == 1:
        args = call_arguments(pipeline, first)
        generator: Any = torch.Generator("cpu").manual_seed(first.seed)
    else:
        args = batch_arguments(pipeline, requests)
        generator = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
    kind = decode_kind(pipeline)
    args["output_type"] = "latent" if kind else "pil"
    watch = BatchWatch(watches or [None] * len(requests), per_request=first.num_images)
    if any(w is not None for w in watch.watches) and takes_step_callback(pipeline):
        args["callback_on_step_end"] = watch
    # Inside `exclusive` (the LoRA gate), never around it: the upcast lock is always the
    # innermost lock, so its holders wait for nothing.
    with exclusive if exclusive is not None else nullcontext(), _encode_upcast(pipeline), torch.inference_mode():
        out = pipe(**args, generator=generator)
    if getattr(pipe, "_interrupt", False):
        # Only a watch stops the loop; in a batch, the first request whose deadline passed says
        # so, for every request of the call (their latents are unfinished too): runtime.execute
        # runs the members whose own deadline had not passed again, each on its own.
        watch.check()
        raise RuntimeError("the denoise loop was interrupted without a deadline passing")
    n = first.num_images
    if kind is None:
        images = pipeline_output(out)
        return [Denoised(images=tuple(images[i * n : (i + 1) * n])) for i in range(len(requests))]
    return [Denoised(latents=out.images[i * n : (i + 1) * n]) for i in range(len(requests))]


# HF fast tokenizers are not thread-safe: every call sets padding and truncation on the one Rust
# tokenizer they wrap, so two prompts encoded at once (diffusers' encode_prompt tokenizes with
# padding="max_length", then again with padding="longest") can come back at each other's
# lengths (seen: 19 tokens where 77 were asked, a failed concat). Each worker thread gets its own
# copy of each tokenizer, made once (a CLIP tokenizer copies in ~1 ms; added embedding tokens
# come along), and forgotten with the pipeline that owns the original.
_thread_tokenizers = threading.local()


def own_tokenizers(pipeline: Any) -> dict[str, Any]:
    """This thread's copies of the pipeline's tokenizers, by component name."""
    cache: weakref.WeakKeyDictionary[Any, Any] = _thread_tokenizers.__dict__.setdefault(
        "copies", weakref.WeakKeyDictionary()
    )
    out = {}
    for name, component in pipeline.components.items():
        if name.startswith("tokenizer") and component is not None:
            if component not in cache:
                cache[component] = copy.deepcopy(component)
            out[name] = cache[component]
    return out


# diffusers' SDXL decode (and SDXL img2img/inpaint's encode) casts a force_upcast fp16 VAE to fp32
# in place and back: the shared VAE must not change dtype under another request's use, so those
# decodes and encodes take turns (per VAE).
_upcast_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_upcast_locks_guard = threading.Lock()


def _upcast_lock(vae: Any) -> threading.Lock:
    with _upcast_locks_guard:
        return _upcast_locks.setdefault(vae, threading.Lock())


def _needs_upcast(vae: Any) -> bool:
    import torch

    return vae is not None and vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


def _encode_upcast(pipeline: Any) -> AbstractContextManager[Any]:
    """SDXL img2img and inpaint encode their input image inside their own call (prepare_latents,
    _encode_vae_image), casting a force_upcast fp16 VAE to fp32 and back in place: their whole
    call holds the VAE's upcast lock, so no decode (ours) or other encode sees it mid-cast."""
    name = type(pipeline).__name__
    if name in ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline") and _needs_upcast(
        getattr(pipeline, "vae", None)
    ):
        return _upcast_lock(pipeline.vae)
    return nullcontext()


class NonFiniteLatents(ValueError):
    """The denoise loop ended in NaN or infinite latents: decoded, they would be a black (or
    garbage) image returned as if it were the answer. A numerical failure of this request's
    generation (typically fp16 overflow), not of the worker."""

    def __init__(self, request: GenerationRequest):
        super().__init__(
            f"the model produced non-finite latents (NaN or infinity) for seed {request.seed}, "
            f"{request.steps} steps, scheduler {request.scheduler}, guidance_scale {request.guidance_scale}. "
            "hint: another seed, scheduler or guidance_scale may work; repeated failures point at fp16 "
            "overflow in the model: compile the recipe with precision bf16 or fp32"
        )


def check_finite(latents: Any, request: GenerationRequest) -> None:
    """Raises NonFiniteLatents unless every latent is finite (one reduction over the request's
    latents: cheap next to the decode it guards)."""
    import torch

    if not bool(torch.isfinite(latents).all()):
        raise NonFiniteLatents(request)


def decode(pipeline: Any, denoised: Denoised, request: GenerationRequest) -> list[Any]:
    """Latents -> PIL images, as the pipeline's own call ends (same operations, same order, so
    the same pixels), but outside the denoise phase: no LoRA gate, so it overlaps other requests'
    denoising. Mirrors diffusers 0.42's StableDiffusion*, StableDiffusionXL*, StableDiffusion3*
    and Flux* pipelines' tails (checked against them in tests/serving/test_concurrency.py). Non-finite
    latents raise NonFiniteLatents before any decoding."""
    import torch

    if denoised.latents is None:
        return list(denoised.images)
    check_finite(denoised.latents, request)
    kind = decode_kind(pipeline)
    vae = pipeline.vae
    latents = denoised.latents
    do_denormalize = None
    with torch.inference_mode():
        if kind == "sd":
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            if getattr(pipeline, "safety_checker", None) is not None:
                dtype = pipeline.text_encoder.dtype if pipeline.text_encoder is not None else latents.dtype
                image, nsfw = pipeline.run_safety_checker(image, latents.device, dtype)
                do_denormalize = None if nsfw is None else [not flagged for flagged in nsfw]
        elif kind == "sdxl":
            image = _decode_sdxl(vae, latents)
            if getattr(pipeline, "watermark", None) is not None:
                image = pipeline.watermark.apply_watermark(image)
        elif kind in ("sd3", "flux"):
            if kind == "flux":
                latents = pipeline._unpack_latents(latents, request.height, request.width, pipeline.vae_scale_factor)
            latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
            image = vae.decode(latents, return_dict=False)[0]
        else:  # pragma: no cover - denoise returned images for these
            raise ValueError(f"no decode rule for {type(pipeline).__name__}")
        return list(pipeline.image_processor.postprocess(image, output_type="pil", do_denormalize=do_denormalize))


def _decode_sdxl(vae: Any, latents: Any) -> Any:
    import torch

    def run(latents: Any) -> Any:
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        return vae.decode(latents.to(vae.device), return_dict=False)[0]

    if not _needs_upcast(vae):
        return run(latents)
    with _upcast_lock(vae):
        vae.to(dtype=torch.float32)
        try:
            return run(latents.to(next(iter(vae.post_quant_conv.parameters())).dtype))
        finally:
            vae.to(dtype=torch.float16)


def generate(
    pipeline: Any,
    request: GenerationRequest,
    watch: StepWatch | None = None,
    exclusive: AbstractContextManager[Any] | None = None,
    timings: dict[str, float] | None = None,
) -> list[Any]:
    """One request, both phases: denoise (inside `exclusive`) then decode (outside it).
    `timings` (when given) receives the seconds of each: "denoise", "decode"."""
    t0 = time.perf_counter()
    (denoised,) = denoise(pipeline, [request], [watch], exclusive)
    t1 = time.perf_counter()
    images = decode(pipeline, denoised, request)
    if timings is not None:
        timings.update(denoise=t1 - t0, decode=time.perf_counter() - t1)
    return images

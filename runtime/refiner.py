"""An artifact's SDXL refiner at serve time: loaded beside the base (sharing what the manifest says
it shares), and the requests it refines, run as RunPod's worker-sdxl runs them.

worker-sdxl (handler.py), for every request: text-to-image runs the base with the request's
prompt, negative prompt, size, steps, guidance, scheduler and image count, stopping at
``denoising_end=high_noise_frac`` (unset: the whole schedule), to latents; then the refiner, as
img2img on those latents, with the prompt only (its own guidance and aesthetic-score defaults),
``strength`` and ``refiner_inference_steps`` steps, its own scheduler, and the same generator,
which goes on from where the base left it. An image request (image_url) runs only the refiner.
``ensemble`` mode is diffusers' ensemble of experts instead: the refiner takes over the base's
own schedule at ``denoising_start=high_noise_frac``.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from runtime.artifact import SCHEDULERS, Manifest
from runtime.generate import Denoised, _encode_upcast, decode, make_generator, own_tokenizers
from runtime.progress import BatchWatch, StepWatch
from runtime.schema import GenerationRequest

REFINED_TASKS = ("txt2img", "img2img")
ENSEMBLE_SPLIT = 0.8  # diffusers' ensemble-of-experts example: the base does the first 80%


def load_refiner(manifest: Manifest, artifact_dir: Path, base: Any, dtype: Any, device: str) -> Any | None:
    """The refiner pipeline, with the base's own objects for the components it shares."""
    info = manifest.refiner
    if info is None:
        return None
    import diffusers

    shared = {name: getattr(base, name) for name in info.shared}
    cls = getattr(diffusers, info.pipeline_class)
    refiner = cls.from_pretrained(artifact_dir / info.path, dtype=dtype, local_files_only=True, **shared)
    if device != "cpu":
        refiner.to(device)
    refiner.set_progress_bar_config(disable=True)
    return refiner


def _own(pipeline: Any, scheduler: Any) -> Any:
    """A per-call view of a shared pipeline: its own scheduler and tokenizers, the same weights."""
    pipe = copy.copy(pipeline)
    pipe.scheduler = scheduler
    for name, tokenizer in own_tokenizers(pipeline).items():
        setattr(pipe, name, tokenizer)
    return pipe


def refine(
    base: Any,
    refiner: Any,
    manifest: Manifest,
    request: GenerationRequest,
    watch: StepWatch | None = None,
    exclusive: AbstractContextManager[Any] | None = None,
) -> list[Any]:
    """One request through base and refiner (txt2img) or the refiner alone (img2img) -> images."""
    import diffusers
    import torch

    assert manifest.refiner is not None
    ensemble = manifest.refiner.mode == "ensemble"
    gen = make_generator(manifest.runtime.generator, refiner, request.seed)
    callback = {"callback_on_step_end": BatchWatch([watch], request.num_images)} if watch is not None else {}
    n = request.num_images
    image: Any = request.image
    if request.task == "txt2img":
        scheduler = getattr(diffusers, SCHEDULERS[request.scheduler]).from_config(base.scheduler.config)
        pipe = _own(base, scheduler)
        split = request.high_noise_frac if request.high_noise_frac is not None or not ensemble else ENSEMBLE_SPLIT
        with exclusive if exclusive is not None else nullcontext(), torch.inference_mode():
            image = pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                height=request.height,
                width=request.width,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                denoising_end=split,
                output_type="latent",
                num_images_per_prompt=n,
                generator=gen,
                **callback,
            ).images
        _stopped(pipe, watch)
        image = image.to(dtype=refiner.unet.dtype)  # worker-sdxl casts to its refiner's fp16
    ref = _own(refiner, type(refiner.scheduler).from_config(refiner.scheduler.config))
    if ensemble and request.task == "txt2img":
        args = {"num_inference_steps": request.steps, "denoising_start": split}
    else:
        args = {"num_inference_steps": request.refiner_steps, "strength": request.strength}
    with _encode_upcast(refiner), torch.inference_mode():
        out = ref(
            prompt=request.prompt,
            image=image,
            num_images_per_prompt=n,
            generator=gen,
            output_type="latent",
            **args,
            **callback,
        ).images
    _stopped(ref, watch)
    return decode(refiner, Denoised(latents=out), request)


def _stopped(pipe: Any, watch: StepWatch | None) -> None:
    if getattr(pipe, "_interrupt", False):
        if watch is not None:
            watch.check()
        raise RuntimeError("the denoise loop was interrupted without a deadline passing")

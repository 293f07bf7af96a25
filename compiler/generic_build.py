"""A generic family's build: the base loaded as diffusers loads it, adapters applied, saved as it is.

``DiffusionPipeline.from_pretrained``'s own rules decide each component's precision: ``dtype``
with the modules a model keeps in fp32 (``_keep_in_fp32_modules``) left in fp32, and the saved
files keep them so. Nothing is cast afterwards (a whole-pipeline ``.to(dtype)`` would undo that).
What the plan could not know without the class (compiler.generic.PIPELINE_OWN) is read from it
here: the request schema (compiler.introspect), the serving defaults, the tasks its siblings
serve and the schedulers that fit it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.errors import Problem, UserError
from compiler.generic import OWN_SCHEDULER, PIPELINE_OWN, PIPELINE_OWN_GUIDANCE
from compiler.introspect import call_schema, own_default
from compiler.lora import apply_loras
from compiler.plan import BuildPlan
from compiler.video_limits import bound_frames
from runtime.artifact import SCHEDULERS, TORCH_DTYPES, CallSchema, Defaults, Serving

log = logging.getLogger(__name__)

# task -> diffusers' AutoPipeline mapping attribute that names a class's sibling for it
AUTO_MAPPINGS = {"img2img": "AUTO_IMAGE2IMAGE_PIPELINES_MAPPING", "inpaint": "AUTO_INPAINT_PIPELINES_MAPPING"}
# Sibling classes named as diffusers names them where no AutoPipeline mapping lists the class.
SIBLING_SUFFIXES = {"img2img": "Img2ImgPipeline", "inpaint": "InpaintPipeline"}


@dataclass(frozen=True)
class GenericBuilt:
    """What a generic build learned from the pipeline class, for the manifest."""

    call: CallSchema
    serving: Serving
    tasks: dict[str, str]  # task -> pipeline class


def pipeline_class(plan: BuildPlan) -> Any:
    import diffusers

    try:
        cls = getattr(diffusers, plan.pipeline_class, None)
    except ImportError as e:  # diffusers' placeholder for a class whose backend is not installed
        raise UserError.one(
            f"recipe {plan.recipe}: base",
            f"{plan.pipeline_class} needs a library this environment lacks: {str(e).strip()[:300]}",
            "install the library it names into the compiler's and the worker's environment",
        ) from e
    if cls is None:
        raise UserError.one(
            f"recipe {plan.recipe}: base",
            f"diffusers {diffusers.__version__} has no pipeline class {plan.pipeline_class!r}",
            "check model_index.json's _class_name, or install a diffusers that has the class",
        )
    if plan.loras and not hasattr(cls, "load_lora_weights"):
        raise UserError.one(
            f"recipe {plan.recipe}: loras",
            f"{plan.pipeline_class} has no LoRA support in diffusers (no LoRA loader mixin)",
            "remove `loras:`, or use a base whose pipeline class loads LoRAs",
        )
    return cls


def load_generic(plan: BuildPlan, cls: Any, folder: Path) -> Any:
    import torch

    dtype = getattr(torch, TORCH_DTYPES[plan.precision])
    try:
        # use_safetensors: never a pickle (the lock holds none)
        return cls.from_pretrained(folder, dtype=dtype, variant=plan.variant, use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as e:
        raise UserError.one(
            f"recipe {plan.recipe}: base",
            f"diffusers could not load the {plan.pipeline_class} folder: {type(e).__name__}: {str(e)[:500]}",
            "check that every component model_index.json names has its config and .safetensors weights",
        ) from e


def build_generic(plan: BuildPlan, cls: Any, pipe: Any, out: Path, loras: list[Any]) -> GenericBuilt:
    """Adapters, then what the manifest records of the class; the caller saves the pipeline."""
    if type(pipe) is not cls:
        raise ValueError(f"{plan.base} built {type(pipe).__name__}, the plan expects {plan.pipeline_class}")
    apply_loras(pipe, loras, out)
    schedulers, default_scheduler = scheduler_names(plan, pipe)
    call = call_schema(cls, size_multiple(pipe), schedulers)
    call, limits = bound_frames(plan.recipe, plan.pipeline_class, call, plan.limits)
    serving = Serving(scheduler=default_scheduler, defaults=serving_defaults(plan, cls, pipe, call), limits=limits)
    check_serving(plan, serving, call)
    return GenericBuilt(call=call, serving=serving, tasks=sibling_tasks(cls))


def scheduler_names(plan: BuildPlan, pipe: Any) -> tuple[tuple[str, ...], str]:
    """The scheduler names requests may choose (worker-sdxl's, where diffusers lists the class as
    compatible with the base's, and the base's own class), and the default: the recipe's or the
    base's own."""
    own = type(pipe.scheduler)
    compatible = {c.__name__ for c in getattr(pipe.scheduler, "compatibles", ())} | {own.__name__}
    own_name = next((n for n, c in SCHEDULERS.items() if c == own.__name__), own.__name__)
    names = tuple(dict.fromkeys([own_name, *(n for n, c in SCHEDULERS.items() if c in compatible)]))
    wanted = plan.scheduler or own_name
    if plan.scheduler != OWN_SCHEDULER and wanted not in names:
        raise UserError.one(
            f"recipe {plan.recipe}: scheduler",
            f"{wanted} is not compatible with {plan.pipeline_class}'s {own.__name__}",
            f"one of {', '.join(names)} (diffusers' scheduler.compatibles), or leave scheduler out",
        )
    return names, wanted


def size_multiple(pipe: Any) -> int:
    """What width and height must be multiples of: the VAE's scale factor times the latent patch the
    denoiser takes (pipelines that pack 2x2 latent patches: 2; else the transformer's patch_size)."""
    factor = spatial_factor(pipe)
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    patch = getattr(getattr(denoiser, "config", None), "patch_size", 1) if denoiser is not None else 1
    patch = 2 if hasattr(pipe, "_pack_latents") else patch if isinstance(patch, int) else 1
    return factor * max(1, patch)


def native_size(pipe: Any, cls: Any) -> tuple[int, int]:
    """The size a plain call without width/height makes, as the pipelines compute it."""
    width, height = own_default(cls, "width"), own_default(cls, "height")
    if isinstance(width, int) and isinstance(height, int):
        return width, height
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    config = getattr(denoiser, "config", None)
    sample = getattr(pipe, "default_sample_size", None) or getattr(config, "sample_size", None)
    if sample is None and isinstance(getattr(config, "sample_height", None), int):  # CogVideoX
        sample = (getattr(config, "sample_height", 0), getattr(config, "sample_width", 0))
    if sample is None:
        return 1024, 1024
    h, w = (sample, sample) if isinstance(sample, int) else sample
    factor = spatial_factor(pipe)
    return w * factor, h * factor


def spatial_factor(pipe: Any) -> int:
    """The VAE's spatial downsampling: ``vae_scale_factor``, or video pipelines' ``vae_scale_factor_spatial``."""
    return int(getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None) or 8)


def serving_defaults(plan: BuildPlan, cls: Any, pipe: Any, call: CallSchema) -> Defaults:
    """The recipe's defaults, and the pipeline's own where the plan holds PIPELINE_OWN."""
    d = plan.defaults
    w, h = native_size(pipe, cls)
    steps = own_default(cls, "num_inference_steps")
    guidance = own_default(cls, call.mapped.get("guidance_scale", "guidance_scale"))
    return Defaults(
        width=d.width if d.width != PIPELINE_OWN else w,
        height=d.height if d.height != PIPELINE_OWN else h,
        steps=d.steps if d.steps != PIPELINE_OWN else steps if isinstance(steps, int) else 28,
        guidance_scale=(
            d.guidance_scale
            if d.guidance_scale != PIPELINE_OWN_GUIDANCE
            else float(guidance)
            if isinstance(guidance, int | float)
            else 0.0
        ),
        negative_prompt=d.negative_prompt,
    )


def check_serving(plan: BuildPlan, serving: Serving, call: CallSchema) -> None:
    """Defaults within the limits and of a size the pipeline takes: a request that omits them works."""
    d, lim, where = serving.defaults, serving.limits, f"recipe {plan.recipe}: defaults"
    problems = [
        Problem(f"{where}.{field}", f"{value} exceeds limits.{limit} = {bound}", f"lower it or raise limits.{limit}")
        for field, value, limit, bound in (
            ("width", d.width, "max_width", lim.max_width),
            ("height", d.height, "max_height", lim.max_height),
            ("steps", d.steps, "max_steps", lim.max_steps),
        )
        if value > bound
    ]
    problems += [
        Problem(
            f"{where}.{field}",
            f"{value} is not a multiple of {call.size_multiple} ({plan.pipeline_class}'s VAE scale factor x patch)",
            f"set defaults.{field} to a multiple of {call.size_multiple}",
        )
        for field, value in (("width", d.width), ("height", d.height))
        if value % call.size_multiple
    ]
    if problems:
        raise UserError(problems)


def sibling_tasks(cls: Any) -> dict[str, str]:
    """txt2img by the class; img2img and inpaint by the sibling diffusers' AutoPipeline mappings
    name for it (the same model name in the text-to-image mapping), else by diffusers' naming."""
    import diffusers
    from diffusers.pipelines import auto_pipeline

    tasks = {"txt2img": cls.__name__}
    model = next(
        (k for k, v in auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING.items() if v.__name__ == cls.__name__), None
    )
    for task, attr in AUTO_MAPPINGS.items():
        mapping = getattr(auto_pipeline, attr)
        sibling = mapping.get(model) if model is not None else None
        name = (
            sibling.__name__ if sibling is not None else cls.__name__.removesuffix("Pipeline") + SIBLING_SUFFIXES[task]
        )
        try:
            if hasattr(getattr(diffusers, name, None), "from_pipe"):
                tasks[task] = name
        except ImportError:  # a sibling whose backend is not installed (Kolors' sentencepiece): not served
            log.info("%s: %s needs a library this environment lacks; %s not served", cls.__name__, name, task)
    return tasks

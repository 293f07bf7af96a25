"""Literal registry of model families: what each needs to build and serve. Pure data.

Only families the compiler can build today are listed; detection probes, config repos and
CivitAI aliases join each entry as those features land.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    id: str
    pipelines: dict[str, str]  # task -> diffusers pipeline class name
    native_size: tuple[int, int]  # (width, height) the family was trained at
    default_scheduler: str  # worker-sdxl name
    default_steps: int
    default_guidance: float
    # Request maxima when a recipe sets none: roomy enough for worker-sdxl's 1024x1024 request.
    max_size: tuple[int, int]
    max_steps: int
    max_images: int


FAMILIES: dict[str, Family] = {
    "sd15": Family(
        id="sd15",
        pipelines={"txt2img": "StableDiffusionPipeline"},
        native_size=(512, 512),
        default_scheduler="PNDM",  # SD 1.5's own scheduler_config.json
        default_steps=25,
        default_guidance=7.5,
        max_size=(1024, 1024),
        max_steps=100,
        max_images=4,
    ),
}


# CivitAI's `baseModel` values, by the family their files belong to: a lock that records one is
# cross-checked against detection. (CivitAI lists many fine-tune lineages under SDXL.)
CIVITAI_BASE_MODELS: dict[str, tuple[str, ...]] = {
    "sd15": ("SD 1.4", "SD 1.5", "SD 1.5 LCM", "SD 1.5 Hyper"),
    "sd2": ("SD 2.0", "SD 2.0 768", "SD 2.1", "SD 2.1 768", "SD 2.1 Unclip"),
    "sdxl": (
        "SDXL 0.9",
        "SDXL 1.0",
        "SDXL 1.0 LCM",
        "SDXL Turbo",
        "SDXL Lightning",
        "SDXL Hyper",
        "Pony",
        "Illustrious",
        "NoobAI",
    ),
    "sd3": ("SD 3",),
    "sd35-medium": ("SD 3.5 Medium",),
    "sd35-large": ("SD 3.5", "SD 3.5 Large", "SD 3.5 Large Turbo"),
    "flux-dev": ("Flux.1 D",),
    "flux-schnell": ("Flux.1 S",),
}


def family_of_civitai_base_model(base_model: str | None) -> str | None:
    for family, names in CIVITAI_BASE_MODELS.items():
        if base_model in names:
            return family
    return None


def family_of_pipeline(pipeline_class: str | None, where: str) -> str:
    """The family a diffusers repo's model_index.json class names. Several families share a class
    (SD 1.x and SD 2.x both use StableDiffusionPipeline); until detection reads the weights, the
    registry lists only families it can tell apart this way."""
    from compiler.errors import UserError

    matches = [f.id for f in FAMILIES.values() if pipeline_class in f.pipelines.values()]
    if len(matches) == 1:
        return matches[0]
    known = sorted({c for f in FAMILIES.values() for c in f.pipelines.values()})
    raise UserError.one(
        where,
        f"pipeline class {pipeline_class!r} " + ("matches " + ", ".join(matches) if matches else "is not supported"),
        f"supported pipeline classes: {', '.join(known)}",
    )

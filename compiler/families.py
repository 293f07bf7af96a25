"""Literal registry of model families: what each needs to build and serve. Pure data, no I/O.

Each entry says which diffusers pipeline serves each task, which Hub repo holds the configs and
tokenizers a single-file checkpoint of the family is built with (the repos diffusers itself uses
for ``from_single_file``), the family's native resolution, default scheduler and prediction type,
its dtype policy, the header probes that identify it (used by ``compiler.detect``) and the names
CivitAI gives it in ``baseModel``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SD_SCHEDULERS = ("PNDM", "KLMS", "DDIM", "K_EULER", "K_EULER_ANCESTRAL", "DPMSolverMultistep", "DPMSolverSinglestep")
FLOW_SCHEDULERS = ("FLOW_MATCH_EULER",)
# prediction -> the scheduler config's prediction_type (flow models have no such switch)
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}


@dataclass(frozen=True)
class Family:
    id: str
    label: str
    pipelines: dict[str, str]  # task -> diffusers pipeline class name
    config_repo: str  # hf:// repo whose configs and tokenizers build a single file of this family
    native_size: tuple[int, int]  # (width, height) the family was trained at
    default_scheduler: str  # worker-sdxl name (runtime.artifact.SCHEDULERS)
    default_steps: int
    default_guidance: float
    prediction: str  # eps, v or flow: what the denoiser predicts unless a checkpoint says otherwise
    # dtype policy: whether the VAE must decode in fp32 under fp16 (SDXL's VAE overflows to
    # NaN/black images in fp16 unless upcast).
    vae_upcast_under_fp16: bool
    # header probes (compiler.detect): the denoiser's cross-attention width (text context) and,
    # for SDXL, the ADM (pooled text + size conditioning) input width.
    context_dim: int | None = None
    adm_channels: int | None = None
    civitai_base_models: tuple[str, ...] = ()
    schedulers: tuple[str, ...] = SD_SCHEDULERS
    # Request maxima when a recipe sets none: roomy enough for worker-sdxl's 1024x1024 request.
    max_size: tuple[int, int] = (1024, 1024)
    max_steps: int = 100
    max_images: int = 4
    variants: dict[str, str] = field(default_factory=dict)  # variant -> config repo (inpaint models)


# "controlnet" is served only by artifacts built with `controlnets:`.
_SD_TASKS = {
    "txt2img": "StableDiffusionPipeline",
    "img2img": "StableDiffusionImg2ImgPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
    "controlnet": "StableDiffusionControlNetPipeline",
}
_SDXL_TASKS = {
    "txt2img": "StableDiffusionXLPipeline",
    "img2img": "StableDiffusionXLImg2ImgPipeline",
    "inpaint": "StableDiffusionXLInpaintPipeline",
    "controlnet": "StableDiffusionXLControlNetPipeline",
}
_SD3_TASKS = {
    "txt2img": "StableDiffusion3Pipeline",
    "img2img": "StableDiffusion3Img2ImgPipeline",
    "inpaint": "StableDiffusion3InpaintPipeline",
}
_FLUX_TASKS = {"txt2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"}

FAMILIES: dict[str, Family] = {
    f.id: f
    for f in (
        Family(
            id="sd15",
            label="Stable Diffusion 1.x",
            pipelines=_SD_TASKS,
            config_repo="hf://stable-diffusion-v1-5/stable-diffusion-v1-5",
            native_size=(512, 512),
            default_scheduler="PNDM",  # SD 1.5's own scheduler_config.json
            default_steps=25,
            default_guidance=7.5,
            prediction="eps",
            vae_upcast_under_fp16=False,
            context_dim=768,
            civitai_base_models=("SD 1.4", "SD 1.5", "SD 1.5 LCM", "SD 1.5 Hyper"),
            variants={"inpaint": "hf://stable-diffusion-v1-5/stable-diffusion-inpainting"},
        ),
        Family(
            id="sd2",
            label="Stable Diffusion 2.x",
            pipelines=_SD_TASKS,
            config_repo="hf://stabilityai/stable-diffusion-2-1",
            native_size=(768, 768),
            default_scheduler="DDIM",  # SD 2.1's scheduler_config.json
            default_steps=25,
            default_guidance=7.5,
            prediction="v",  # the 768 models; the 512 "base" ones are eps (override with prediction: eps)
            vae_upcast_under_fp16=False,
            context_dim=1024,
            civitai_base_models=("SD 2.0", "SD 2.0 768", "SD 2.1", "SD 2.1 768", "SD 2.1 Unclip"),
            variants={"inpaint": "hf://stabilityai/stable-diffusion-2-inpainting"},
        ),
        Family(
            id="sdxl",
            label="Stable Diffusion XL",
            pipelines=_SDXL_TASKS,
            config_repo="hf://stabilityai/stable-diffusion-xl-base-1.0",
            native_size=(1024, 1024),
            default_scheduler="K_EULER",
            default_steps=25,
            default_guidance=7.5,
            prediction="eps",
            vae_upcast_under_fp16=True,
            context_dim=2048,
            adm_channels=2816,
            # CivitAI lists many fine-tune lineages under SDXL.
            civitai_base_models=(
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
            max_size=(2048, 2048),
            variants={"inpaint": "hf://diffusers/stable-diffusion-xl-1.0-inpainting-0.1"},
        ),
        Family(
            id="sdxl-refiner",
            label="Stable Diffusion XL refiner",
            pipelines={"img2img": "StableDiffusionXLImg2ImgPipeline"},
            config_repo="hf://stabilityai/stable-diffusion-xl-refiner-1.0",
            native_size=(1024, 1024),
            default_scheduler="K_EULER",
            default_steps=25,
            default_guidance=5.0,
            prediction="eps",
            vae_upcast_under_fp16=True,
            context_dim=1280,
            adm_channels=2560,
            max_size=(2048, 2048),
        ),
        Family(
            id="sd3",
            label="Stable Diffusion 3 Medium",
            pipelines=_SD3_TASKS,
            config_repo="hf://stabilityai/stable-diffusion-3-medium-diffusers",
            native_size=(1024, 1024),
            default_scheduler="FLOW_MATCH_EULER",
            default_steps=28,
            default_guidance=7.0,
            prediction="flow",
            vae_upcast_under_fp16=False,
            civitai_base_models=("SD 3",),
            schedulers=FLOW_SCHEDULERS,
            max_size=(2048, 2048),
        ),
        Family(
            id="sd35-medium",
            label="Stable Diffusion 3.5 Medium",
            pipelines=_SD3_TASKS,
            config_repo="hf://stabilityai/stable-diffusion-3.5-medium",
            native_size=(1024, 1024),
            default_scheduler="FLOW_MATCH_EULER",
            default_steps=40,
            default_guidance=4.5,
            prediction="flow",
            vae_upcast_under_fp16=False,
            civitai_base_models=("SD 3.5 Medium",),
            schedulers=FLOW_SCHEDULERS,
            max_size=(2048, 2048),
        ),
        Family(
            id="sd35-large",
            label="Stable Diffusion 3.5 Large",
            pipelines=_SD3_TASKS,
            config_repo="hf://stabilityai/stable-diffusion-3.5-large",
            native_size=(1024, 1024),
            default_scheduler="FLOW_MATCH_EULER",
            default_steps=28,
            default_guidance=3.5,
            prediction="flow",
            vae_upcast_under_fp16=False,
            civitai_base_models=("SD 3.5", "SD 3.5 Large", "SD 3.5 Large Turbo"),
            schedulers=FLOW_SCHEDULERS,
            max_size=(2048, 2048),
        ),
        Family(
            id="flux-dev",
            label="FLUX.1 [dev]",
            pipelines=_FLUX_TASKS,
            config_repo="hf://black-forest-labs/FLUX.1-dev",
            native_size=(1024, 1024),
            default_scheduler="FLOW_MATCH_EULER",
            default_steps=28,
            default_guidance=3.5,  # distilled guidance, fed to the transformer (no CFG pass)
            prediction="flow",
            vae_upcast_under_fp16=False,
            civitai_base_models=("Flux.1 D",),
            schedulers=FLOW_SCHEDULERS,
            max_size=(2048, 2048),
        ),
        Family(
            id="flux-schnell",
            label="FLUX.1 [schnell]",
            pipelines=_FLUX_TASKS,
            config_repo="hf://black-forest-labs/FLUX.1-schnell",
            native_size=(1024, 1024),
            default_scheduler="FLOW_MATCH_EULER",
            default_steps=4,
            default_guidance=0.0,
            prediction="flow",
            vae_upcast_under_fp16=False,
            civitai_base_models=("Flux.1 S",),
            schedulers=FLOW_SCHEDULERS,
            max_size=(2048, 2048),
        ),
        Family(
            id="flux-fill",
            label="FLUX.1 Fill [dev]",
            pipelines={"inpaint": "FluxFillPipeline"},
            config_repo="hf://black-forest-labs/FLUX.1-Fill-dev",
            native_size=(1024, 1024),
            default_scheduler="FLOW_MATCH_EULER",
            default_steps=50,
            default_guidance=30.0,
            prediction="flow",
            vae_upcast_under_fp16=False,
            schedulers=FLOW_SCHEDULERS,
            max_size=(2048, 2048),
        ),
    )
}

# The cross-attention width of a UNet's attn2.to_k (its text context) -> family.
CONTEXT_FAMILY: dict[int, str] = {f.context_dim: f.id for f in FAMILIES.values() if f.context_dim}
ADM_FAMILY: dict[int, str] = {f.adm_channels: f.id for f in FAMILIES.values() if f.adm_channels}


# Families whose adapters share one architecture (a FLUX LoRA fits dev, schnell and Fill; an SD 3
# LoRA's header cannot tell Medium from 3.5): detection names the first, the build checks shapes.
LINEAGE: dict[str, str] = {
    "flux-schnell": "flux-dev",
    "flux-fill": "flux-dev",
    "sd35-medium": "sd3",
    "sd35-large": "sd3",
}


def lineage(family: str) -> str:
    return LINEAGE.get(family, family)


def family_of_civitai_base_model(base_model: str | None) -> str | None:
    for family in FAMILIES.values():
        if base_model in family.civitai_base_models:
            return family.id
    return None


def main_task(family: Family) -> str:
    """The task a plain build serves: txt2img where the family has it (a refiner only refines)."""
    return "txt2img" if "txt2img" in family.pipelines else next(iter(family.pipelines))


@dataclass(frozen=True)
class RepoFamily:
    """What a diffusers repo's model_index.json and configs say its family is."""

    family: str | None
    candidates: tuple[str, ...]
    evidence: tuple[str, ...]


def family_of_repo(pipeline_class: str | None, configs: dict[str, dict[str, Any]]) -> RepoFamily:
    """A diffusers repo's family from its pipeline class and component configs (pure).

    Several families share a pipeline class (SD 1.x and 2.x both use StableDiffusionPipeline), so
    the configs decide, by structure before width so that tiny test models are told apart too: SD
    2.x's UNet projects attention linearly and its OpenCLIP text encoder uses gelu (SD 1.x: conv
    projections, quick_gelu); SDXL's refiner has one text encoder; FLUX dev embeds guidance;
    SD 3.5 has q/k norms, Medium dual-attention layers too, and Large is 38 blocks deep."""
    matches = tuple(f.id for f in FAMILIES.values() if pipeline_class in f.pipelines.values())
    if len(matches) <= 1:
        return RepoFamily(matches[0] if matches else None, matches, (f"_class_name {pipeline_class}",))
    unet = configs.get("unet/config.json", {})
    transformer = configs.get("transformer/config.json", {})
    te = configs.get("text_encoder/config.json", {})
    ev = [f"_class_name {pipeline_class}"]
    found: str | None = None
    if "sd15" in matches:
        width = unet.get("cross_attention_dim")
        found = CONTEXT_FAMILY.get(width) if width in (768, 1024) else None
        if found is None and "use_linear_projection" in unet and "hidden_act" in te:
            sd2 = bool(unet["use_linear_projection"]) and te["hidden_act"] == "gelu"
            sd1 = not unet["use_linear_projection"] and te["hidden_act"] == "quick_gelu"
            found = "sd2" if sd2 else "sd15" if sd1 else None
            ev.append(f"use_linear_projection {unet['use_linear_projection']}, text encoder {te['hidden_act']}")
        else:
            ev.append(f"unet cross_attention_dim {width}")
    elif "sdxl" in matches:
        found = "sdxl" if "text_encoder/config.json" in configs else "sdxl-refiner"
        ev.append("two text encoders" if found == "sdxl" else "one text encoder (OpenCLIP-G)")
    elif "flux-dev" in matches:
        found = "flux-dev" if transformer.get("guidance_embeds") else "flux-schnell"
        ev.append(f"transformer guidance_embeds {transformer.get('guidance_embeds')}")
    elif "sd3" in matches:
        layers, dual, qk_norm = (transformer.get(k) for k in ("num_layers", "dual_attention_layers", "qk_norm"))
        # SD 3.5 adds q/k norms (SD 3 has none); Medium adds dual attention, Large is 38 deep.
        found = "sd35-medium" if dual else "sd35-large" if layers == 38 or qk_norm else "sd3"
        ev.append(f"transformer num_layers {layers}, dual_attention_layers {dual}, qk_norm {qk_norm}")
    return RepoFamily(found, () if found else matches, tuple(ev))

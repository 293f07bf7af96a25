"""Which tasks an artifact serves, and through which pipeline class (pure).

A normal model serves each task its family has a pipeline for (txt2img, img2img, inpaint; a
ControlNet pipeline only when the recipe brings ControlNets). An inpainting model (SD 1.x/2.x and
SDXL with a 9-channel UNet, FLUX.1 Fill) has a denoiser that always takes a mask and a masked image
beside its latents, so its family's txt2img and img2img pipelines cannot run it. It is served
through its inpaint pipeline alone, for every task that pipeline can do with a full (all-white)
mask, as AUTOMATIC1111 serves inpainting checkpoints:

- inpaint: the request's image and mask;
- img2img: the request's image and a full mask at the request's strength (A1111's img2img with an
  inpainting model conditions on a fully masked image, ``inpainting_mask_weight`` 1);
- txt2img: a full mask at strength 1.0 (runtime.full_mask). Strength 1.0 starts from pure noise and
  the full mask blanks the masked-image conditioning to 0 (mid-gray in [-1, 1]), which is exactly
  A1111's txt2img conditioning for inpainting models (a 0.5-gray image, a mask of ones).
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.detect import Detection
from compiler.errors import Problem
from compiler.families import Family, main_task

INPAINT = "inpaint"
NORMAL = ("normal", "ema")  # variants that are the family's plain model
# What an inpainting pipeline serves with a full mask; inpaint first, its own task.
FULL_MASK_TASKS = ("inpaint", "img2img", "txt2img")


@dataclass(frozen=True)
class Served:
    pipeline_class: str  # the pipeline the artifact is saved as
    tasks: dict[str, str]  # task -> pipeline class the runtime derives (from_pipe) for it


def served(family: Family, variant: str, controlnets: bool) -> Served:
    """The pipeline class and tasks of a model of ``family`` and ``variant`` (after task_problems)."""
    if variant == INPAINT or main_task(family) == INPAINT:
        cls = family.pipelines[INPAINT]
        return Served(cls, {t: cls for t in FULL_MASK_TASKS})
    tasks = {t: c for t, c in family.pipelines.items() if t != "controlnet" or controlnets}
    return Served(family.pipelines[main_task(family)], tasks)


def task_problems(
    where: str, family: Family, detected: Detection | None, base_variant: str, controlnets: bool
) -> list[Problem]:
    """A model this compiler cannot serve, or a checkpoint whose variant is not its base's."""
    file_variant = detected.variant if detected is not None else None
    if file_variant is not None and file_variant not in NORMAL and file_variant != INPAINT:
        return [
            Problem(
                f"{where}: checkpoint",
                f"this is a {file_variant} {family.label} model; this compiler serves normal and inpainting models",
                f"{file_variant} models need inputs worker-sdxl requests cannot carry; use the family's normal "
                "or inpainting checkpoint",
            )
        ]
    if main_task(family) not in ("txt2img", INPAINT):
        return [
            Problem(
                f"{where}: {'checkpoint' if detected else 'base'}",
                f"{family.label} only does {main_task(family)} (it only refines an image given to it)",
                "this compiler serves text-to-image and inpainting models; use a model of the family's normal variant",
            )
        ]
    inpaint = file_variant == INPAINT or (file_variant is None and base_variant == INPAINT)
    out = []
    if file_variant is not None and (file_variant == INPAINT) != (base_variant == INPAINT):
        out.append(_mismatch(where, family, file_variant, base_variant))
    if inpaint and INPAINT not in family.pipelines:
        out.append(
            Problem(f"{where}: checkpoint", f"{family.label} has no inpaint pipeline here", "use a normal model")
        )
    if inpaint and controlnets:
        out.append(
            Problem(
                f"{where}: controlnets",
                f"an inpainting {family.label} model is served through {family.pipelines.get(INPAINT)}, "
                "which takes no ControlNet",
                "remove `controlnets:`, or use the family's normal model with them",
            )
        )
    return out


def _mismatch(where: str, family: Family, file_variant: str, base_variant: str) -> Problem:
    if file_variant == INPAINT:
        return Problem(
            f"{where}: checkpoint",
            f"this is an inpainting {family.label} model (a 9-channel denoiser input), but the base is a "
            "normal model: its configs and pipeline cannot take it",
            "drop `base:` (the family's inpainting config repo is used), or set it to an inpainting model "
            f"of the family ({family.variants.get(INPAINT) or family.config_repo})",
        )
    return Problem(
        f"{where}: checkpoint",
        f"this is a normal {family.label} model, but the base is an inpainting model (9-channel denoiser)",
        f"set `base:` to a normal model of the family ({family.config_repo}), or drop it",
    )

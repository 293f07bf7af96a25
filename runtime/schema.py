"""Request validation: worker-sdxl's fields and aliases, bounded by the artifact's limits.

Our own checks, before any model work (the RunPod SDK's validator skips ranges). Every problem is
collected; unknown keys get worker-sdxl's wording. The bounds come from the manifest, so each
artifact gets its own request model (and, later, its own JSON Schema from the same model).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from runtime.artifact import SCHEDULERS, Limits, Manifest, Task

# Older RunPod workers' and public endpoints' names -> worker-sdxl's.
ALIASES = {
    "num_outputs": "num_images",
    "prompt_strength": "strength",
    "init_image": "image_url",
    "guidance": "guidance_scale",
    "mask": "mask_url",
}
REFINER_FIELDS = ("refiner_inference_steps", "high_noise_frac")
MAX_PROMPT_CHARS = 10_000
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MAX_GUIDANCE = 50.0
MIN_SIZE = 64
# Denoising strength when a request gives none: worker-sdxl's default (0.3, its img2img refiner
# pass) for img2img; inpainting regenerates the masked region from noise (diffusers' 1.0).
DEFAULT_STRENGTH: dict[Task, float] = {"img2img": 0.3, "inpaint": 1.0}


class RequestError(ValueError):
    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request with every default filled in: what generate() runs."""

    task: Task
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    num_images: int
    # img2img and inpaint only. image_url/mask_url as sent; runtime.inputs.attach_images fetches
    # and decodes them into `image` (RGB) and `mask` (L), both at width x height, before model work.
    strength: float | None = None
    image_url: str | None = None
    mask_url: str | None = None
    size_from_image: bool = False  # no width/height sent: the output takes the input image's size
    image: Any = None
    mask: Any = None
    # Switchable LoRAs (name, scale) applied to this request only; ControlNets (name, scale) with
    # their control images as sent, decoded by attach_images into `control_images`.
    loras: tuple[tuple[str, float], ...] = ()
    controlnets: tuple[tuple[str, float], ...] = ()
    control_urls: tuple[str, ...] = ()
    control_images: tuple[Any, ...] = ()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class LoraChoice(_Strict):
    name: str = Field(min_length=1, max_length=64)
    scale: float | None = Field(None, ge=-4, le=4)  # None: the recipe's scale


class ControlNetChoice(_Strict):
    name: str = Field(min_length=1, max_length=64)
    image: str = Field(min_length=1)  # URL, data: URI or base64, like image_url
    scale: float | None = Field(None, ge=0, le=4)  # None: the recipe's scale


MAX_ADAPTERS = 8


@lru_cache(maxsize=64)
def request_model(lim: Limits) -> type[BaseModel]:
    """The pydantic model of one artifact's requests (strict types; floats accept ints)."""
    fields: dict[str, Any] = {
        "prompt": (str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)),
        "negative_prompt": (str | None, Field(None, max_length=MAX_PROMPT_CHARS)),
        "width": (int | None, Field(None, ge=MIN_SIZE, le=lim.max_width, multiple_of=8)),
        "height": (int | None, Field(None, ge=MIN_SIZE, le=lim.max_height, multiple_of=8)),
        "seed": (int | None, Field(None, ge=0, le=MAX_SEED)),
        "scheduler": (Literal[tuple(SCHEDULERS)] | None, None),
        "num_inference_steps": (int | None, Field(None, ge=1, le=lim.max_steps)),
        "refiner_inference_steps": (int | None, Field(None, ge=1, le=lim.max_steps)),
        "guidance_scale": (float | None, Field(None, ge=0, le=MAX_GUIDANCE)),
        "strength": (float | None, Field(None, ge=0, le=1)),
        "image_url": (str | None, None),
        "mask_url": (str | None, None),
        "num_images": (int | None, Field(None, ge=1, le=lim.max_images)),
        "high_noise_frac": (float | None, Field(None, ge=0, le=1)),
        "loras": (list[LoraChoice], Field(default_factory=list, max_length=MAX_ADAPTERS)),
        "controlnets": (list[ControlNetChoice], Field(default_factory=list, max_length=MAX_ADAPTERS)),
    }
    return create_model("Request", __config__=ConfigDict(extra="forbid", strict=True, frozen=True), **fields)


def _message(err: Any) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "input"
    msg = err["msg"]
    if err["type"] == "literal_error" and field == "scheduler":
        msg = f"unknown scheduler; expected one of {', '.join(SCHEDULERS)}"
    return f"{field}: {msg}, got {err['input']!r}"


def validate(raw: Any, manifest: Manifest) -> tuple[GenerationRequest, list[str]]:
    """job["input"] -> (request, warnings). Raises RequestError listing every problem."""
    if not isinstance(raw, dict):
        raise RequestError([f"input: expected a JSON object, got {type(raw).__name__}"])
    model = request_model(manifest.serving.limits)
    errors: list[str] = []
    data = dict(raw)
    for alias, name in ALIASES.items():
        if alias in data:
            if name in data:
                errors.append(f"{alias}: both {alias!r} and its canonical name {name!r} given; send only {name!r}")
            data[name] = data.pop(alias)
    for key in list(data):
        if key not in model.model_fields:
            errors.append(f"Unexpected input. {key} is not a valid input option.")
            del data[key]
    try:
        checked = model.model_validate(data)
    except ValidationError as e:
        errors.extend(_message(err) for err in e.errors())
        checked = None
    if errors or checked is None:
        raise RequestError(errors)
    values = checked.model_dump()

    # An empty string counts as absent, as in worker-sdxl (`if image_url:`).
    image_url, mask_url = values["image_url"] or None, values["mask_url"] or None
    task: Task = "inpaint" if mask_url else "img2img" if image_url else "txt2img"
    if values["controlnets"]:
        task = "controlnet" if task == "txt2img" else task
        if task != "controlnet":
            errors.append(
                "controlnets: with image_url (img2img/inpaint) is not supported; send a text-to-image request"
            )
    errors.extend(_adapter_errors(values, manifest))
    supported = ", ".join(manifest.capabilities.tasks)
    if mask_url and not image_url:
        errors.append("mask_url: a mask needs the image it masks; send image_url (or init_image) with it")
    elif task not in manifest.capabilities.tasks:
        if task == "txt2img":
            errors.append(f"image_url: required, this artifact does not generate from text; it supports: {supported}")
        else:
            field = "mask_url" if task == "inpaint" else "image_url"
            errors.append(f"{field}: the {task} task is not supported by this artifact; it supports: {supported}")
    if errors:
        raise RequestError(errors)

    d = manifest.serving.defaults
    steps = values["num_inference_steps"] or d.steps
    warnings = [f"{f}: ignored, this artifact has no refiner" for f in REFINER_FIELDS if values[f] is not None]
    strength = None
    if task not in DEFAULT_STRENGTH:
        if values["strength"] is not None:
            warnings.append("strength: ignored, it applies to img2img (image_url) and refiners")
    else:
        strength = values["strength"] if values["strength"] is not None else DEFAULT_STRENGTH[task]
        # The pipelines run int(steps * strength) of the steps: none at all fails inside diffusers.
        if steps * strength < 1:
            raise RequestError(
                [
                    f"strength: {strength} with num_inference_steps {steps} leaves no denoising step "
                    f"(steps x strength must be at least 1); raise strength or num_inference_steps"
                ]
            )

    seed = values["seed"] if values["seed"] is not None else secrets.randbelow(2**32)
    loras = {lora.name: lora.scale for lora in manifest.loras}
    controlnets = {c.name: c.scale for c in manifest.controlnets}
    request = GenerationRequest(
        task=task,
        prompt=values["prompt"],
        negative_prompt=values["negative_prompt"] if "negative_prompt" in data else d.negative_prompt,
        width=values["width"] or d.width,
        height=values["height"] or d.height,
        steps=steps,
        guidance_scale=values["guidance_scale"] if values["guidance_scale"] is not None else d.guidance_scale,
        scheduler=values["scheduler"] or manifest.serving.scheduler,
        seed=seed,
        num_images=values["num_images"] or 1,
        strength=strength,
        image_url=image_url,
        mask_url=mask_url,
        size_from_image=task in ("img2img", "inpaint") and values["width"] is None and values["height"] is None,
        loras=tuple((c["name"], c["scale"] if c["scale"] is not None else loras[c["name"]]) for c in values["loras"]),
        controlnets=tuple(
            (c["name"], c["scale"] if c["scale"] is not None else controlnets[c["name"]]) for c in values["controlnets"]
        ),
        control_urls=tuple(c["image"] for c in values["controlnets"]),
    )
    return request, warnings


def _adapter_errors(values: dict[str, Any], manifest: Manifest) -> list[str]:
    """Requested LoRAs must be the artifact's switchable ones, ControlNets its ControlNets."""
    errors = []
    switchable = {lora.name for lora in manifest.loras if not lora.fused}
    fused = {lora.name: lora.scale for lora in manifest.loras if lora.fused}
    names = [c["name"] for c in values["loras"]]
    for i, name in enumerate(names):
        if name in fused:
            errors.append(
                f"loras.{i}.name: {name!r} is fused into this artifact at scale {fused[name]} (always on); "
                "only LoRAs compiled with `fuse: false` are chosen per request"
            )
        elif name not in switchable:
            have = ", ".join(repr(n) for n in sorted(switchable)) or "none"
            errors.append(f"loras.{i}.name: no switchable LoRA {name!r}; this artifact has: {have}")
    if len(set(names)) < len(names):
        errors.append("loras: a LoRA is named twice; name each once with its scale")
    known = {c.name for c in manifest.controlnets}
    cn = [c["name"] for c in values["controlnets"]]
    for i, name in enumerate(cn):
        if name not in known:
            have = ", ".join(repr(n) for n in sorted(known)) or "none"
            errors.append(f"controlnets.{i}.name: no ControlNet {name!r}; this artifact has: {have}")
    if len(set(cn)) < len(cn):
        errors.append("controlnets: a ControlNet is named twice")
    return errors

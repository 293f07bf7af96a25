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

from runtime.artifact import SCHEDULERS, Limits, Manifest

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


class RequestError(ValueError):
    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request with every default filled in: what generate() runs."""

    task: Literal["txt2img"]
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    num_images: int


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

    supported = manifest.capabilities.tasks
    for field, task in (("image_url", "img2img"), ("mask_url", "inpaint")):
        if values[field] is not None:
            errors.append(
                f"{field}: the {task} task is not supported by this artifact; it supports: {', '.join(supported)}"
            )
    if errors:
        raise RequestError(errors)

    warnings = [f"{f}: ignored, this artifact has no refiner" for f in REFINER_FIELDS if values[f] is not None]
    if values["strength"] is not None:
        warnings.append("strength: ignored, it applies to img2img (image_url) and refiners")

    d = manifest.serving.defaults
    seed = values["seed"] if values["seed"] is not None else secrets.randbelow(2**32)
    request = GenerationRequest(
        task="txt2img",
        prompt=values["prompt"],
        negative_prompt=values["negative_prompt"] if "negative_prompt" in data else d.negative_prompt,
        width=values["width"] or d.width,
        height=values["height"] or d.height,
        steps=values["num_inference_steps"] or d.steps,
        guidance_scale=values["guidance_scale"] if values["guidance_scale"] is not None else d.guidance_scale,
        scheduler=values["scheduler"] or manifest.serving.scheduler,
        seed=seed,
        num_images=values["num_images"] or 1,
    )
    return request, warnings

"""Request validation and the JSON Schema of one artifact's requests, from one source.

Our own checks, before any model work (the RunPod SDK's validator skips ranges). Every problem is
collected; unknown keys get worker-sdxl's wording. What a request may say depends on the artifact
(its limits, tasks, switchable LoRAs, ControlNets), so each artifact gets its own pydantic request
model (``request_model``, built from a ``RequestSpec`` taken from the manifest). That one model
validates requests and is the base of the JSON Schema that ``describe`` publishes
(runtime.request_schema); the rules between fields, which a pydantic field cannot carry, are
written twice, once as Python here (for the error messages) and once as JSON Schema there, and
tests/runtime/test_describe_schema.py checks with the independent ``jsonschema`` validator, on generated
inputs, that both accept and reject exactly the same requests.
"""

from __future__ import annotations

import reprlib
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, create_model
from pydantic_core import PydanticCustomError

from runtime.artifact import SCHEDULERS, CallParam, CallSchema, Defaults, Limits, Manifest, Task
from runtime.encode import DEFAULT_QUALITY
from runtime.encode import Format as ImageFormat

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
MAX_ADAPTERS = 8
# What an error reply may quote of a value the client sent: a short prefix (a 10^6-character
# prompt must not come back whole, twice); and how many problems one reply lists.
MAX_QUOTE_CHARS = 80
MAX_ERRORS = 20

# Which of SCHEDULERS' diffusers classes can replace which, as diffusers' own `compatibles` say:
# the noise-prediction (epsilon / v) schedulers are all interchangeable (KarrasDiffusionSchedulers);
# a flow-matching one is compatible only with itself (FLUX, SD 3). Written out, not read from
# diffusers, so that validation never imports it; tests/runtime/test_request_hardening.py compares it with
# diffusers. A request may only name a scheduler of its artifact's own group: a flow-matching
# scheduler on an SD 1.5 UNet fails inside diffusers (no init_noise_sigma).
SCHEDULER_GROUPS: dict[str, Literal["noise", "flow"]] = {
    "PNDMScheduler": "noise",
    "LMSDiscreteScheduler": "noise",
    "DDIMScheduler": "noise",
    "EulerDiscreteScheduler": "noise",
    "EulerAncestralDiscreteScheduler": "noise",
    "DPMSolverMultistepScheduler": "noise",
    "DPMSolverSinglestepScheduler": "noise",
    "FlowMatchEulerDiscreteScheduler": "flow",
}


def artifact_schedulers(manifest: Manifest) -> tuple[str, ...]:
    """The scheduler names (SCHEDULERS) a request to this artifact may choose: those compatible
    with its base model's own scheduler (manifest components), and always its serving default.
    A base scheduler outside SCHEDULER_GROUPS counts as its default's kind (the compiler checked
    the default against the family)."""
    default = manifest.serving.scheduler
    if manifest.call is not None:  # a generic artifact: read from diffusers' compatibles at build
        return manifest.call.schedulers
    base = manifest.components.get("scheduler", "")
    group = SCHEDULER_GROUPS.get(base) or SCHEDULER_GROUPS.get(SCHEDULERS.get(default, ""))
    return tuple(n for n, cls in SCHEDULERS.items() if n == default or SCHEDULER_GROUPS.get(cls) == group)


_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring = 2, MAX_QUOTE_CHARS + 2
_QUOTE.maxother = _QUOTE.maxlong = MAX_QUOTE_CHARS


def quote(value: Any) -> str:
    """A value the client sent, for an error message: its repr, at most MAX_QUOTE_CHARS
    characters then "…". Bounded in time and depth too (reprlib: a huge string or list is never
    rendered whole, a deeply nested one stops at two levels, a huge int is not converted)."""
    try:
        text = _QUOTE.repr(value)
    except Exception:  # e.g. an int over Python's int-to-str digit limit, a broken __repr__
        text = f"<{type(value).__name__}>"
    return text if len(text) <= MAX_QUOTE_CHARS else text[:MAX_QUOTE_CHARS] + "…"


def _capped(errors: list[str]) -> list[str]:
    if len(errors) <= MAX_ERRORS:
        return errors
    return [*errors[:MAX_ERRORS], f"... and {len(errors) - MAX_ERRORS} more problems (fix these first)"]


class RequestError(ValueError):
    """A request broke a rule: the client's to fix. Lists at most MAX_ERRORS problems."""

    def __init__(self, errors: list[str]):
        self.errors = _capped(errors)
        super().__init__("; ".join(self.errors))


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
    # How the reply carries the images (runtime.outputs); quality is None for lossless PNG.
    image_format: ImageFormat = "png"
    quality: int | None = None
    # Generic artifacts: the call schema (runtime.pipeline_call maps the fields above through it)
    # and the pipeline's own parameters this request set, by their __call__ names.
    call: CallSchema | None = None
    params: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class RequestSpec:
    """What of a manifest shapes its requests: the one input of the request model and its schema
    (hashable, so both are built once per distinct artifact)."""

    title: str
    limits: Limits
    defaults: Defaults
    scheduler: str
    schedulers: tuple[str, ...]  # what a request may choose (artifact_schedulers)
    tasks: tuple[Task, ...]
    loras: tuple[str, ...]  # switchable, chosen per request by name
    fused_loras: tuple[tuple[str, float], ...]  # always on: named only to say so
    controlnets: tuple[str, ...]
    embedding_tokens: tuple[str, ...]
    # Generic artifacts: the worker-sdxl fields the pipeline takes (None: a family artifact, all
    # of them), its own parameters, and what sizes must be multiples of.
    mapped: frozenset[str] | None = None
    extras: tuple[CallParam, ...] = ()
    size_multiple: int = 8

    @classmethod
    def of(cls, manifest: Manifest) -> RequestSpec:
        return cls(
            title=f"{manifest.recipe} ({manifest.cache_key[:12]})",
            limits=manifest.serving.limits,
            defaults=manifest.serving.defaults,
            scheduler=manifest.serving.scheduler,
            schedulers=artifact_schedulers(manifest),
            tasks=tuple(manifest.capabilities.tasks),
            loras=tuple(sorted(lora.name for lora in manifest.loras if not lora.fused)),
            fused_loras=tuple(sorted((lora.name, lora.scale) for lora in manifest.loras if lora.fused)),
            controlnets=tuple(sorted(c.name for c in manifest.controlnets)),
            embedding_tokens=tuple(e.token for e in manifest.embeddings),
            mapped=frozenset(manifest.call.mapped) if manifest.call else None,
            extras=manifest.call.extras if manifest.call else (),
            size_multiple=manifest.call.size_multiple if manifest.call else 8,
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _refuse_every_name(value: str) -> str:
    raise PydanticCustomError("literal_error", "this artifact has none")


def _one_of(names: tuple[str, ...]) -> Any:
    """The type of a name chosen from the artifact's own: an enum, in validation and schema alike
    (an enum of one too, where pydantic would write ``const``). With no names at all nothing is
    accepted (``enum: []``; Literal cannot be empty)."""
    if names:
        return Annotated[Literal[names], WithJsonSchema({"type": "string", "enum": list(names)})]
    return Annotated[str, AfterValidator(_refuse_every_name), WithJsonSchema({"enum": []})]


@lru_cache(maxsize=64)
def request_model(spec: RequestSpec) -> type[BaseModel]:
    """The pydantic model of one artifact's requests (strict types; floats accept ints)."""
    fields = {**_generation_fields(spec), **_adapter_fields(spec), **_output_fields()}
    if spec.mapped is not None:
        from runtime.generic_schema import generic_fields

        fields = generic_fields(fields, spec)
    config = ConfigDict(extra="forbid", strict=True, frozen=True, title=f"Request to {spec.title}")
    return create_model("Request", __config__=config, **fields)


def _generation_fields(spec: RequestSpec) -> dict[str, Any]:
    """worker-sdxl's fields, bounded by the artifact's limits. ``default`` in the schema is what
    the server fills in, not the model's None placeholder."""
    lim, d = spec.limits, spec.defaults
    tokens = ", ".join(spec.embedding_tokens)
    words = f" Textual-inversion tokens this artifact knows, used as words: {tokens}." if tokens else ""
    return {
        "prompt": (str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw." + words)),
        "negative_prompt": (
            str | None,
            Field(None, max_length=MAX_PROMPT_CHARS, json_schema_extra={"default": d.negative_prompt}),
        ),
        "width": (
            int | None,
            Field(
                None,
                ge=MIN_SIZE,
                le=lim.max_width,
                multiple_of=spec.size_multiple,
                json_schema_extra={"default": d.width},
            ),
        ),
        "height": (
            int | None,
            Field(
                None,
                ge=MIN_SIZE,
                le=lim.max_height,
                multiple_of=spec.size_multiple,
                json_schema_extra={"default": d.height},
            ),
        ),
        "seed": (int | None, Field(None, ge=0, le=MAX_SEED, description="default: random, returned in the reply")),
        "scheduler": (
            _one_of(spec.schedulers) | None,
            Field(None, description="compatible with this model", json_schema_extra={"default": spec.scheduler}),
        ),
        "num_inference_steps": (
            int | None,
            Field(None, ge=1, le=lim.max_steps, json_schema_extra={"default": d.steps}),
        ),
        "refiner_inference_steps": (int | None, Field(None, ge=1, le=lim.max_steps, description="ignored: no refiner")),
        "guidance_scale": (
            float | None,
            Field(None, ge=0, le=MAX_GUIDANCE, json_schema_extra={"default": d.guidance_scale}),
        ),
        "strength": (
            float | None,
            Field(
                None, ge=0, le=1, description="img2img/inpaint denoising strength; default 0.3 (img2img), 1 (inpaint)"
            ),
        ),
        "image_url": (str | None, Field(None, description="img2img/inpaint source: URL, data: URI or base64")),
        "mask_url": (str | None, Field(None, description="inpaint mask (white: repaint); needs image_url")),
        "num_images": (int | None, Field(None, ge=1, le=lim.max_images, json_schema_extra={"default": 1})),
        "high_noise_frac": (float | None, Field(None, ge=0, le=1, description="ignored: no refiner")),
    }


def _adapter_fields(spec: RequestSpec) -> dict[str, Any]:
    """Switchable LoRAs and ControlNets, chosen by the artifact's own names."""
    lora = create_model(
        "LoraChoice",
        __base__=_Strict,
        name=(_one_of(spec.loras), Field(description="a switchable LoRA of this artifact")),
        scale=(float | None, Field(None, ge=-4, le=4, description="default: the recipe's scale")),
    )
    controlnet = create_model(
        "ControlNetChoice",
        __base__=_Strict,
        name=(_one_of(spec.controlnets), Field(description="a ControlNet of this artifact")),
        image=(str, Field(min_length=1, description="control image: URL, data: URI or base64, like image_url")),
        scale=(float | None, Field(None, ge=0, le=4, description="conditioning scale; default: the recipe's")),
    )
    return {
        "loras": (list[lora], Field(default_factory=list, max_length=MAX_ADAPTERS)),
        "controlnets": (list[controlnet], Field(default_factory=list, max_length=MAX_ADAPTERS)),
    }


def _output_fields() -> dict[str, Any]:
    return {
        "image_format": (
            ImageFormat | None,
            Field(None, description="encoding of the reply's images", json_schema_extra={"default": "png"}),
        ),
        "quality": (
            int | None,
            Field(None, ge=1, le=100, description=f"jpeg/webp quality (default {DEFAULT_QUALITY}); png: ignored"),
        ),
    }


def _message(err: Any, spec: RequestSpec) -> str:
    """One pydantic error as our message. pydantic's `input` is the client's value: only quoted
    (a short prefix), never echoed whole."""
    loc = err["loc"]
    # An unknown key inside a LoRA or ControlNet entry is part of the path: bounded like a value.
    field = ".".join(str(p) if isinstance(p, int) or len(p) <= MAX_QUOTE_CHARS else quote(p) for p in loc) or "input"
    msg = err["msg"]
    value = err.get("input")
    if err["type"] == "literal_error":
        if field == "scheduler":
            have = ", ".join(spec.schedulers)
            if isinstance(value, str) and value in SCHEDULERS:
                return (
                    f"scheduler: {quote(value)} does not fit this model ({_kind(spec)}); it takes: {have}. "
                    "hint: leave scheduler out for the recipe's own"
                )
            msg = f"unknown scheduler; expected one of {have}"
        elif loc[0] == "loras" and loc[-1] == "name":
            fused = dict(spec.fused_loras)
            if isinstance(value, str) and value in fused:
                return (
                    f"{field}: {quote(value)} is fused into this artifact at scale {fused[value]} (always on); "
                    "only LoRAs compiled with `fuse: false` are chosen per request"
                )
            have = ", ".join(repr(n) for n in spec.loras) or "none"
            return f"{field}: no switchable LoRA {quote(value)}; this artifact has: {have}"
        elif loc[0] == "controlnets" and loc[-1] == "name":
            have = ", ".join(repr(n) for n in spec.controlnets) or "none"
            return f"{field}: no ControlNet {quote(value)}; this artifact has: {have}"
    return f"{field}: {msg}, got {quote(value)}"


def _kind(spec: RequestSpec) -> str:
    group = SCHEDULER_GROUPS.get(SCHEDULERS.get(spec.scheduler, ""))
    return "a flow-matching model" if group == "flow" else "a noise-prediction model, not flow matching"


def validate(raw: Any, manifest: Manifest) -> tuple[GenerationRequest, list[str]]:
    """job["input"] -> (request, warnings). Raises RequestError listing every problem.

    Three phases: structure (aliases, known keys, each field's type and range), the task the
    inputs ask for (checked against the artifact's), then defaults filled in. Every rule here has
    its JSON Schema twin in runtime.request_schema: change both together."""
    if not isinstance(raw, dict):
        raise RequestError([f"input: expected a JSON object, got {type(raw).__name__}"])
    spec = RequestSpec.of(manifest)
    values, sent = _structure(raw, spec)
    task = _task(values, spec)
    return _filled(values, sent, task, spec, manifest)


def _structure(raw: dict[Any, Any], spec: RequestSpec) -> tuple[dict[str, Any], set[str]]:
    """The request's fields under their canonical names, each checked by the artifact's request
    model, and the names the client sent. Raises RequestError with every problem."""
    model = request_model(spec)
    errors: list[str] = []
    data = dict(raw)
    for alias, name in ALIASES.items():
        if alias in data:
            if name in data:
                errors.append(f"{alias}: both {alias!r} and its canonical name {name!r} given; send only {name!r}")
            data[name] = data.pop(alias)
    for key in list(data):
        if key not in model.model_fields:
            # worker-sdxl's wording; the key is the client's, so quoted when it is long or not text.
            name = key if isinstance(key, str) and len(key) <= MAX_QUOTE_CHARS else quote(key)
            errors.append(f"Unexpected input. {name} is not a valid input option.")
            del data[key]
    try:
        checked = model.model_validate(data)
    except ValidationError as e:
        errors.extend(_message(err, spec) for err in e.errors())
        checked = None
    if errors or checked is None:
        raise RequestError(errors)
    return checked.model_dump(), set(data)


def _task(values: dict[str, Any], spec: RequestSpec) -> Task:
    """The task the inputs ask for (mask -> inpaint, image -> img2img, controlnets -> controlnet),
    if the artifact supports it; adapters named once. Raises RequestError with every problem."""
    errors: list[str] = []
    # An empty string counts as absent, as in worker-sdxl (`if image_url:`).
    image_url, mask_url = values["image_url"] or None, values["mask_url"] or None
    task: Task = "inpaint" if mask_url else "img2img" if image_url else "txt2img"
    if values["controlnets"]:
        task = "controlnet" if task == "txt2img" else task
        if task != "controlnet":
            errors.append(
                "controlnets: with image_url (img2img/inpaint) is not supported; send a text-to-image request"
            )
    if len({c["name"] for c in values["loras"]}) < len(values["loras"]):
        errors.append("loras: a LoRA is named twice; name each once with its scale")
    if len({c["name"] for c in values["controlnets"]}) < len(values["controlnets"]):
        errors.append("controlnets: a ControlNet is named twice")
    supported = ", ".join(spec.tasks)
    if mask_url and not image_url:
        errors.append("mask_url: a mask needs the image it masks; send image_url (or init_image) with it")
    elif task not in spec.tasks:
        if task == "txt2img":
            errors.append(f"image_url: required, this artifact does not generate from text; it supports: {supported}")
        else:
            field = "mask_url" if task == "inpaint" else "image_url"
            errors.append(f"{field}: the {task} task is not supported by this artifact; it supports: {supported}")
    if errors:
        raise RequestError(errors)
    return task


def _filled(
    values: dict[str, Any], sent: set[str], task: Task, spec: RequestSpec, manifest: Manifest
) -> tuple[GenerationRequest, list[str]]:
    """The request with the artifact's defaults filled in, and warnings for what it ignores."""
    d = spec.defaults
    steps = values["num_inference_steps"] or d.steps
    warnings = [f"{f}: ignored, this artifact has no refiner" for f in REFINER_FIELDS if values.get(f) is not None]
    strength = _strength(values["strength"], task, steps, warnings)
    image_format, quality = _encoding(values["image_format"], values["quality"], warnings)
    loras = {lora.name: lora.scale for lora in manifest.loras}
    controlnets = {c.name: c.scale for c in manifest.controlnets}
    request = GenerationRequest(
        task=task,
        prompt=values["prompt"],
        negative_prompt=values.get("negative_prompt") if "negative_prompt" in sent else d.negative_prompt,
        width=values.get("width") or d.width,
        height=values.get("height") or d.height,
        steps=steps,
        guidance_scale=values["guidance_scale"] if values.get("guidance_scale") is not None else d.guidance_scale,
        scheduler=values["scheduler"] or spec.scheduler,
        seed=values["seed"] if values["seed"] is not None else secrets.randbelow(2**32),
        num_images=values.get("num_images") or 1,
        strength=strength,
        image_url=values["image_url"] or None,
        mask_url=values["mask_url"] or None,
        size_from_image=task in ("img2img", "inpaint") and values["width"] is None and values["height"] is None,
        loras=tuple((c["name"], c["scale"] if c["scale"] is not None else loras[c["name"]]) for c in values["loras"]),
        controlnets=tuple(
            (c["name"], c["scale"] if c["scale"] is not None else controlnets[c["name"]]) for c in values["controlnets"]
        ),
        control_urls=tuple(c["image"] for c in values["controlnets"]),
        image_format=image_format,
        quality=quality,
        call=manifest.call,
        params=tuple((p.name, values[p.name]) for p in spec.extras if values.get(p.name) is not None),
    )
    return request, warnings


def _strength(given: float | None, task: Task, steps: int, warnings: list[str]) -> float | None:
    """The denoising strength of an img2img/inpaint request (its task's default when absent)."""
    if task not in DEFAULT_STRENGTH:
        if given is not None:
            warnings.append("strength: ignored, it applies to img2img (image_url) and refiners")
        return None
    strength = given if given is not None else DEFAULT_STRENGTH[task]
    # The pipelines run int(steps * strength) of the steps: none at all fails inside diffusers.
    if steps * strength < 1:
        raise RequestError(
            [
                f"strength: {strength} with num_inference_steps {steps} leaves no denoising step "
                f"(steps x strength must be at least 1); raise strength or num_inference_steps"
            ]
        )
    return strength


def _encoding(
    image_format: ImageFormat | None, quality: int | None, warnings: list[str]
) -> tuple[ImageFormat, int | None]:
    """The reply's image format and quality (None for lossless PNG)."""
    image_format = image_format or "png"
    if image_format == "png":
        if quality is not None:
            warnings.append("quality: ignored, png is lossless (ask for image_format jpeg or webp)")
        return image_format, None
    return image_format, DEFAULT_QUALITY if quality is None else quality

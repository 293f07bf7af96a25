"""Recipe + resolved sources -> BuildPlan and its cache_key. Pure: no I/O, no torch.

The plan holds every decision that changes the artifact's bytes or behaviour, already normalised
(family defaults filled in), so that two recipes that mean the same thing get the same key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from compiler import COMPILER_REVISION
from compiler.detect import Detection
from compiler.errors import UserError
from compiler.families import Family
from compiler.generic import family_spec, is_generic, recipe_problems
from compiler.recipe import Recipe
from compiler.sources.base import Pinned, Resolved
from compiler.tasks import served
from compiler.validate import check_plan
from runtime.artifact import CompileOptions, Defaults, Limits, RuntimeOptions


@dataclass(frozen=True)
class PlannedLora:
    name: str
    pin: str  # the file's content pin (its bytes, wherever it came from)
    inputs: tuple[tuple[str, str], ...]
    scale: float
    fuse: bool


@dataclass(frozen=True)
class PlannedFile:
    """An adapter file the build applies (a VAE, an embedding): its bytes and how it is used."""

    pin: str
    inputs: tuple[tuple[str, str], ...]
    token: str | None = None  # embeddings: the prompt word (None: the file's own, else `stem`)
    name: str | None = None  # controlnets: the name requests select it by; hypernetworks: their files' name
    scale: float | None = None  # controlnets: the default conditioning scale; hypernetworks: the strength
    stem: str = ""  # the file's name without extension


@dataclass(frozen=True)
class PlannedRefiner:
    """An SDXL refiner built beside the base (compiler.refiner): a pipeline (builtin, folder, repo)
    or a single file with its family's config repo."""

    pin: str
    inputs: tuple[tuple[str, str], ...]
    mode: str  # RefinerMode
    single_file: bool
    variant: str | None = None
    configs: str | None = None  # a single file's config repo pin
    configs_inputs: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class BuildPlan:
    recipe: str
    family: str
    pipeline_class: str
    base: str  # the source and its pin
    base_inputs: tuple[tuple[str, str], ...]  # (path, sha256) of every file the build reads
    variant: str | None  # the diffusers weight variant loaded (fp16 files for an fp16 build)
    checkpoint: str | None  # a single-file checkpoint's source and pin: weights from it, configs from base
    checkpoint_inputs: tuple[tuple[str, str], ...]
    checkpoint_kind: str | None  # "checkpoint" (whole pipeline) or "unet" (joins the base's other weights)
    # The performance options, as the manifest records them (runtime.dtype is the precision),
    # normalised: compile off carries no mode/shapes, so equal meanings hash equal. quantize
    # changes the stored weights; the rest the runtime applies at load.
    runtime: RuntimeOptions
    # The family's dtype policy: SDXL's VAE overflows to black images in fp16, so under fp16 its
    # config must say force_upcast (diffusers then decodes in fp32), whatever the config repo says.
    vae_force_upcast: bool
    prediction: str | None  # eps or v, written into the scheduler config; None keeps the base's
    scheduler: str
    defaults: Defaults
    limits: Limits
    steps: tuple[str, ...]  # what materialize does, in order
    tasks: dict[str, str]  # task -> pipeline class the runtime derives (from_pipe) for it
    loras: tuple[PlannedLora, ...] = ()
    vae: PlannedFile | None = None
    embeddings: tuple[PlannedFile, ...] = ()
    controlnets: tuple[PlannedFile, ...] = ()
    refiner: PlannedRefiner | None = None
    hypernetworks: tuple[PlannedFile, ...] = ()  # applied in this order

    @property
    def precision(self) -> str:
        return self.runtime.dtype

    @property
    def adapter_inputs(self) -> tuple[tuple[str, str], ...]:
        files = (
            *self.loras,
            *((self.vae,) if self.vae else ()),
            *self.embeddings,
            *self.controlnets,
            *self.hypernetworks,
        )
        refiner = (*self.refiner.inputs, *self.refiner.configs_inputs) if self.refiner else ()
        return (*(i for f in files for i in f.inputs), *refiner)

    def canonical(self) -> dict[str, Any]:
        d = asdict(self)
        d["defaults"] = self.defaults.model_dump()
        d["limits"] = self.limits.model_dump()
        if d["limits"].get("max_frames") is None:  # video bounds: hashed only when set
            d["limits"].pop("max_frames", None)
        d["steps"] = list(self.steps)
        d["loras"] = [asdict(lora) for lora in self.loras]
        d["vae"] = asdict(self.vae) if self.vae else None
        d["embeddings"] = [asdict(e) for e in self.embeddings]
        d["controlnets"] = [asdict(c) for c in self.controlnets]
        # Hashed only when there are some, so that plans without them keep their cache keys.
        d["hypernetworks"] = [asdict(h) for h in self.hypernetworks]
        if not self.hypernetworks:
            del d["hypernetworks"]
        d["base_inputs"] = [list(i) for i in self.base_inputs]
        d["checkpoint_inputs"] = [list(i) for i in self.checkpoint_inputs]
        # The options are hashed as the flat fields they were before they became one type (and
        # precision under its own name), so that existing artifacts keep their cache keys.
        runtime = d.pop("runtime").model_dump(mode="json")
        d["precision"] = runtime.pop("dtype")
        # Newer options and parts enter the key only when used: older artifacts keep their keys.
        if runtime["generator"] == "cpu":
            del runtime["generator"]
        if self.refiner is None:
            del d["refiner"]
        return d | runtime


def make_plan(
    recipe: Recipe,
    base: Resolved,
    variant: str | None = None,
    checkpoint: Pinned | None = None,
    detected: Detection | None = None,
    loras: tuple[Pinned, ...] = (),
    vae: Pinned | None = None,
    embeddings: tuple[Pinned, ...] = (),
    controlnets: tuple[Pinned, ...] = (),
    refiner: PlannedRefiner | None = None,
    hypernetworks: tuple[Pinned, ...] = (),
) -> BuildPlan:
    """The plan of one build, after validate.check_plan found nothing wrong (else UserError)."""
    family = family_spec(base.family)
    defaults, limits = _serving(recipe, family, base.native_size)
    scheduler = recipe.scheduler or family.default_scheduler
    problems = check_plan(recipe, family, detected, defaults, limits, scheduler, base.model_variant)
    if is_generic(family.id):
        given = {"checkpoint": checkpoint is not None, "vae": vae is not None, "embeddings": bool(embeddings)}
        given |= {"prediction": recipe.prediction is not None, "quantize": recipe.runtime.quantize != "none"}
        problems += recipe_problems(str(recipe.path), family, given, tuple(p for p, _ in base.inputs))
    if problems:
        raise UserError(problems)
    # An inpainting model (the file's word, else its base's) serves every task through its inpaint pipeline.
    tasks = served(family, detected.variant if detected else base.model_variant, bool(recipe.controlnets))
    runtime = _runtime(recipe.runtime, defaults)
    # A file that says it predicts v (a v_pred key, modelspec metadata) is believed over the base's
    # scheduler config; the recipe's `prediction:` over both. Detection's "eps" can be the family's
    # default rather than the file's word, so it never overrides a base's own v_prediction.
    prediction = recipe.prediction or ("v" if detected and detected.prediction == "v" else None)
    return BuildPlan(
        recipe=recipe.name,
        family=family.id,
        pipeline_class=tasks.pipeline_class,
        base=base.pin,
        base_inputs=base.inputs,
        variant=variant,
        checkpoint=checkpoint.pin if checkpoint else None,
        checkpoint_inputs=checkpoint.inputs if checkpoint else (),
        checkpoint_kind=detected.kind if detected else None,
        runtime=runtime,
        vae_force_upcast=runtime.dtype == "fp16" and family.vae_upcast_under_fp16,
        prediction=prediction,
        scheduler=scheduler,
        defaults=defaults,
        limits=limits,
        steps=_steps(recipe, runtime, detected.kind if detected else None, prediction, vae is not None),
        tasks=tasks.tasks,
        loras=tuple(
            PlannedLora(name=lora.name, pin=pinned.pin, inputs=pinned.inputs, scale=lora.scale, fuse=lora.fuse)
            for lora, pinned in zip(recipe.loras, loras, strict=True)
        ),
        vae=PlannedFile(pin=vae.pin, inputs=vae.inputs) if vae else None,
        embeddings=tuple(
            PlannedFile(pin=p.pin, inputs=p.inputs, token=e.token, stem=e.stem)
            for e, p in zip(recipe.embeddings, embeddings, strict=True)
        ),
        controlnets=tuple(
            PlannedFile(pin=p.pin, inputs=p.inputs, name=c.name, scale=c.scale)
            for c, p in zip(recipe.controlnets, controlnets, strict=True)
        ),
        refiner=refiner,
        hypernetworks=tuple(
            PlannedFile(pin=p.pin, inputs=p.inputs, name=h.name, scale=h.strength)
            for h, p in zip(recipe.hypernetworks, hypernetworks, strict=True)
        ),
    )


def _serving(recipe: Recipe, family: Family, native_size: tuple[int, int]) -> tuple[Defaults, Limits]:
    """The recipe's request defaults and limits, the family's (and the base's size) where it sets none."""
    d, lim = recipe.defaults, recipe.limits
    w, h = native_size
    defaults = Defaults(
        width=d.width or w,
        height=d.height or h,
        steps=d.steps or family.default_steps,
        guidance_scale=d.guidance_scale if d.guidance_scale is not None else family.default_guidance,
        negative_prompt=d.negative_prompt,
    )
    limits = Limits(
        max_width=lim.max_width or family.max_size[0],
        max_height=lim.max_height or family.max_size[1],
        max_steps=lim.max_steps or family.max_steps,
        max_images=lim.max_images or family.max_images,
        max_frames=lim.max_frames,
    )
    return defaults, limits


def _runtime(wanted: RuntimeOptions, defaults: Defaults) -> RuntimeOptions:
    """Compile off carries no mode or shapes; compile on with no shapes warms the default size."""
    if wanted.compile.scope == "off":
        return wanted.model_copy(update={"compile": CompileOptions()})
    shapes = wanted.compile.shapes or ((defaults.width, defaults.height),)
    return wanted.model_copy(update={"compile": wanted.compile.model_copy(update={"shapes": shapes})})


def _steps(
    recipe: Recipe, runtime: RuntimeOptions, checkpoint_kind: str | None, prediction: str | None, vae: bool
) -> tuple[str, ...]:
    """What materialize does, in order."""
    return (
        *_load_steps(checkpoint_kind),
        *((f"prediction-{prediction}",) if prediction else ()),
        *(("replace-vae",) if vae else ()),
        *(f"embed-{e.token or i}" for i, e in enumerate(recipe.embeddings)),
        *(f"fuse-lora-{lora.name}" for lora in recipe.loras if lora.fuse),
        *(f"controlnet-{c.name}" for c in recipe.controlnets),
        *(f"hypernetwork-{h.name}" for h in recipe.hypernetworks),
        f"cast-{runtime.dtype}",
        "save",
        *(("refiner",) if recipe.refiner is not None else ()),
        *((f"quantize-{runtime.quantize}",) if runtime.quantize != "none" else ()),
        *((f"compile-cache-{runtime.compile.scope}",) if runtime.compile.scope != "off" else ()),
    )


def _load_steps(checkpoint_kind: str | None) -> tuple[str, ...]:
    if checkpoint_kind is None:
        return ("load-base",)
    if checkpoint_kind == "checkpoint":
        return ("load-configs", "load-checkpoint")
    return ("load-base", f"replace-{checkpoint_kind}")


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(plan: BuildPlan, environment: dict[str, str]) -> str:
    """sha256 of everything that decides the artifact: the normalised plan, the compiler revision
    and the library versions that write the bytes. Never hash()/repr()/pickle: stable across runs."""
    payload = {"compiler_revision": COMPILER_REVISION, "plan": plan.canonical(), "environment": environment}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()

"""Recipe + resolved sources -> BuildPlan and its cache_key. Pure: no I/O, no torch.

The plan holds every decision that changes the artifact's bytes or behaviour, already normalised
(family defaults filled in), so that two recipes that mean the same thing get the same key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from compiler import COMPILER_REVISION
from compiler.detect import Detection
from compiler.errors import Problem, UserError
from compiler.families import FAMILIES, main_task
from compiler.recipe import Recipe
from compiler.sources.base import Pinned, Resolved
from compiler.validate import check_performance
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
    name: str | None = None  # controlnets: the name requests select it by
    scale: float | None = None  # controlnets: the default conditioning scale
    stem: str = ""  # the file's name without extension


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
    precision: str
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
    # Performance options (normalised: compile off carries no mode/shapes, so equal meanings hash
    # equal). quantize changes the stored weights; the rest the runtime applies at load.
    offload: str = "none"
    compile: CompileOptions = field(default_factory=CompileOptions)
    channels_last: bool = False
    fused_qkv: bool = False
    attention: str | None = None
    quantize: str = "none"

    def runtime_options(self) -> RuntimeOptions:
        """The manifest's record of what the runtime applies after load."""
        return RuntimeOptions(
            dtype=self.precision,
            offload=self.offload,
            compile=self.compile,
            channels_last=self.channels_last,
            fused_qkv=self.fused_qkv,
            attention=self.attention,
            quantize=self.quantize,
        )

    @property
    def adapter_inputs(self) -> tuple[tuple[str, str], ...]:
        files = (*self.loras, *((self.vae,) if self.vae else ()), *self.embeddings, *self.controlnets)
        return tuple(i for f in files for i in f.inputs)

    def canonical(self) -> dict[str, Any]:
        d = asdict(self)
        d["defaults"] = self.defaults.model_dump()
        d["limits"] = self.limits.model_dump()
        d["steps"] = list(self.steps)
        d["loras"] = [asdict(lora) for lora in self.loras]
        d["vae"] = asdict(self.vae) if self.vae else None
        d["embeddings"] = [asdict(e) for e in self.embeddings]
        d["controlnets"] = [asdict(c) for c in self.controlnets]
        d["base_inputs"] = [list(i) for i in self.base_inputs]
        d["checkpoint_inputs"] = [list(i) for i in self.checkpoint_inputs]
        d["compile"] = self.compile.model_dump(mode="json")
        return d


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
) -> BuildPlan:
    family = FAMILIES[base.family]
    d, lim = recipe.defaults, recipe.limits
    w, h = base.native_size
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
    )
    where = str(recipe.path)
    problems = [
        Problem(
            f"{where}: defaults.{field}",
            f"{value} exceeds limits.{limit} = {bound}",
            f"lower defaults.{field} or raise limits.{limit}",
        )
        for field, value, limit, bound in (
            ("width", defaults.width, "max_width", limits.max_width),
            ("height", defaults.height, "max_height", limits.max_height),
            ("steps", defaults.steps, "max_steps", limits.max_steps),
        )
        if value > bound
    ]
    scheduler = recipe.scheduler or family.default_scheduler
    if scheduler not in family.schedulers:
        problems.append(
            Problem(
                f"{where}: scheduler",
                f"{scheduler} does not fit {family.label} ({family.prediction} prediction)",
                f"one of {', '.join(family.schedulers)}",
            )
        )
    if main_task(family) != "txt2img":
        problems.append(
            Problem(
                f"{where}: {'checkpoint' if detected else 'base'}",
                f"{family.label} only does {main_task(family)} (it only refines or fills an image given to it)",
                "this compiler serves text-to-image so far; use a model of the family's normal variant",
            )
        )
    elif detected is not None and detected.variant not in ("normal", "ema"):
        problems.append(
            Problem(
                f"{where}: checkpoint",
                f"this is a {detected.variant} {family.label} model; it cannot serve text-to-image",
                "inpaint and other conditioned models need their task's requests (image, mask), which "
                "this compiler does not serve yet; use the family's normal checkpoint",
            )
        )
    if recipe.controlnets and "controlnet" not in family.pipelines:
        problems.append(
            Problem(f"{where}: controlnets", f"{family.label} has no ControlNet pipeline here", "remove `controlnets:`")
        )
    if recipe.prediction is not None and family.prediction == "flow":
        problems.append(
            Problem(f"{where}: prediction", f"{family.label} is a flow-matching model", "remove `prediction:`")
        )
    problems.extend(check_performance(recipe, (limits.max_width, limits.max_height)))
    if problems:
        raise UserError(problems)
    wanted = recipe.compile
    compile_options = (
        CompileOptions(
            scope=wanted.scope,
            mode=wanted.mode,
            dynamic=wanted.dynamic,
            shapes=wanted.shapes or ((defaults.width, defaults.height),),
        )
        if wanted.scope != "off"
        else CompileOptions()
    )
    # A file that says it predicts v (a v_pred key, modelspec metadata) is believed over the base's
    # scheduler config; the recipe's `prediction:` over both. Detection's "eps" can be the family's
    # default rather than the file's word, so it never overrides a base's own v_prediction.
    prediction = recipe.prediction or ("v" if detected and detected.prediction == "v" else None)
    return BuildPlan(
        recipe=recipe.name,
        family=family.id,
        pipeline_class=family.pipelines[main_task(family)],
        base=base.pin,
        base_inputs=base.inputs,
        variant=variant,
        checkpoint=checkpoint.pin if checkpoint else None,
        checkpoint_inputs=checkpoint.inputs if checkpoint else (),
        checkpoint_kind=detected.kind if detected else None,
        precision=recipe.precision,
        vae_force_upcast=recipe.precision == "fp16" and family.vae_upcast_under_fp16,
        prediction=prediction,
        scheduler=scheduler,
        defaults=defaults,
        limits=limits,
        steps=(
            *_load_steps(detected.kind if detected else None),
            *((f"prediction-{prediction}",) if prediction else ()),
            *(("replace-vae",) if vae else ()),
            *(f"embed-{e.token or i}" for i, e in enumerate(recipe.embeddings)),
            *(f"fuse-lora-{lora.name}" for lora in recipe.loras if lora.fuse),
            *(f"controlnet-{c.name}" for c in recipe.controlnets),
            f"cast-{recipe.precision}",
            "save",
            *((f"quantize-{recipe.quantize}",) if recipe.quantize != "none" else ()),
            *((f"compile-cache-{wanted.scope}",) if wanted.scope != "off" else ()),
        ),
        tasks={t: c for t, c in family.pipelines.items() if t != "controlnet" or recipe.controlnets},
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
        offload=recipe.offload,
        compile=compile_options,
        channels_last=recipe.channels_last,
        fused_qkv=recipe.fused_qkv,
        attention=recipe.attention,
        quantize=recipe.quantize,
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

"""Plain dict -> typed, frozen Recipe. Pure: no I/O, no torch.

Unknown keys are rejected (also ones a `+key=` override added), types are strict (YAML's "64" is
not 64), and every problem is collected and reported at once with its field path and a hint.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compiler import uri
from compiler.errors import Problem, UserError
from compiler.families import FAMILIES
from compiler.tiny_models import BUILTINS
from runtime.artifact import (
    ATTENTION_BACKENDS,
    MAX_FRAMES,
    SCHEDULERS,
    CompileOptions,
    Precision,
    RefinerMode,
    RuntimeOptions,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RecipeDefaults(_Strict):
    """What a request that omits a field gets; unset fields come from the model's family."""

    width: int | None = Field(None, ge=64, multiple_of=8)
    height: int | None = Field(None, ge=64, multiple_of=8)
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    negative_prompt: str | None = None


class RecipeLimits(_Strict):
    """Request bounds; unset fields come from the model's family."""

    max_width: int | None = Field(None, ge=64, multiple_of=8)
    max_height: int | None = Field(None, ge=64, multiple_of=8)
    max_steps: int | None = Field(None, ge=1)
    max_images: int | None = Field(None, ge=1)
    # video pipelines: num_frames at most (default: the pipeline's own num_frames default)
    max_frames: int | None = Field(None, ge=1, le=MAX_FRAMES)


class RecipeLora(_Strict):
    """One LoRA (kohya, PEFT/diffusers or a LyCORIS format diffusers reads)."""

    source: str
    scale: float = 1.0
    # true: baked into the artifact's weights at build time (no cost per request); false: stored in
    # the artifact and applied only to requests that ask for it by name, at their scale
    fuse: bool = True
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # default: the file's stem


class RecipeControlNet(_Strict):
    """One ControlNet (LDM `control_model.*` or diffusers naming) made for the base's family."""

    source: str
    scale: float = 1.0  # the conditioning scale a request gets unless it sets its own
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # default: the file's stem


class RecipeEmbedding(_Strict):
    """One textual-inversion embedding (A1111 .safetensors/.pt, diffusers learned_embeds, SDXL dual)."""

    source: str
    # The prompt word that calls it; default: the file's own token where it has one, else its stem.
    token: str | None = Field(None, pattern=r"^\S{1,64}$")


class RecipeHypernetwork(_Strict):
    """One A1111 hypernetwork (.pt, read only with `allow_pickle: true`)."""

    source: str
    strength: float = 1.0  # A1111's multiplier: context + module(context) * strength
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # default: the file's stem


class _Fields(_Strict):
    base: str | None = None
    checkpoint: str | None = None
    family: str | None = None
    prediction: Literal["eps", "v"] | None = None
    precision: Precision = "fp32"
    scheduler: str | None = None
    defaults: RecipeDefaults = Field(default_factory=RecipeDefaults)
    limits: RecipeLimits = Field(default_factory=RecipeLimits)
    allow_pickle: bool = False  # convert .ckpt/.pt checkpoints with torch.load(weights_only=True)
    loras: list[RecipeLora] = Field(default_factory=list)
    vae: str | None = None
    embeddings: list[RecipeEmbedding] = Field(default_factory=list)
    controlnets: list[RecipeControlNet] = Field(default_factory=list)
    refiner: str | None = None  # an SDXL refiner, run on every request (compiler.refiner)
    refiner_mode: RefinerMode = "worker-sdxl"
    hypernetworks: list[RecipeHypernetwork] = Field(default_factory=list)

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str | None) -> str | None:
        if v is not None and v not in FAMILIES:
            raise ValueError(f"unknown family {v!r}")
        return v

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, v: str | None) -> str | None:
        if v is not None and v not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {v!r}")
        return v


# Performance (docs/performance.md): top-level recipe keys read into the
# artifact contract's own RuntimeOptions (its dtype is the recipe's `precision`). quantize is baked
# into the weights; the others are applied by the runtime at load, as the manifest says.
PERFORMANCE_KEYS = tuple(k for k in RuntimeOptions.model_fields if k != "dtype")


class Recipe(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    path: Path
    base: uri.Source | None  # None: a checkpoint's configs come from its family's config repo
    checkpoint: uri.Source | None = None
    family: str | None = None  # overrides detection (an ambiguous or mislabelled file)
    prediction: str | None = None  # overrides the family's and the file's prediction type
    allow_pickle: bool = False
    scheduler: str | None
    defaults: RecipeDefaults
    limits: RecipeLimits
    loras: tuple[Lora, ...] = ()
    vae: uri.Source | None = None
    embeddings: tuple[Embedding, ...] = ()
    controlnets: tuple[ControlNet, ...] = ()
    refiner: uri.Source | None = None
    refiner_mode: RefinerMode = "worker-sdxl"
    hypernetworks: tuple[Hypernetwork, ...] = ()
    runtime: RuntimeOptions  # the performance options; runtime.dtype is the precision

    @property
    def precision(self) -> Precision:
        return self.runtime.dtype

    def sources(self) -> dict[str, uri.Source]:
        """Every source the recipe names, by field path (what the lock pins)."""
        out: dict[str, uri.Source] = {}
        if self.base is not None:
            out["base"] = self.base
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint
        for i, lora in enumerate(self.loras):
            out[f"loras.{i}"] = lora.source
        if self.vae is not None:
            out["vae"] = self.vae
        for i, emb in enumerate(self.embeddings):
            out[f"embeddings.{i}"] = emb.source
        for i, cn in enumerate(self.controlnets):
            out[f"controlnets.{i}"] = cn.source
        if self.refiner is not None:
            out["refiner"] = self.refiner
            single = uri.is_single_file(self.refiner)
            if isinstance(self.refiner, uri.LocalSource) and single is None:
                single = self.refiner.path.is_file()
            if single is not False:  # a single file's configs: the refiner's config repo
                out[REFINER_CONFIGS] = uri.parse(FAMILIES["sdxl-refiner"].config_repo)
        for i, hn in enumerate(self.hypernetworks):
            out[f"hypernetworks.{i}"] = hn.source
        return out


REFINER_CONFIGS = "refiner.configs"  # the lock role of a single-file refiner's config repo


class ControlNet(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    source: uri.Source
    name: str  # unique in the recipe: requests select ControlNets by name
    scale: float
    from_lock: bool = False  # no name given and the source names no file: the locked file's stem


class Hypernetwork(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    source: uri.Source
    name: str  # unique in the recipe: its files in the artifact are named by it
    strength: float
    from_lock: bool = False  # no name given and the source names no file: the locked file's stem


class Embedding(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    source: uri.Source
    token: str | None  # None: the file's own token (diffusers' key), else ``stem``
    stem: str  # the file's name without extension (A1111's convention: the file name is the word)
    from_lock: bool = False  # the source names no file (a CivitAI version): stem from the lock


class Lora(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    source: uri.Source
    name: str  # unique in the recipe
    scale: float
    fuse: bool
    from_lock: bool = False  # no name given and the source names no file: the locked file's stem


_HINTS = {
    # The accepted forms are in the message of a source that does not parse; the hint stays short.
    "base": "a model source: builtin:NAME, hf://ORG/REPO[@REV], a CivitAI model, https://… or a local folder",
    "checkpoint": "a single .safetensors file (CivitAI, hf://ORG/REPO/FILE, https://…, a local path); "
    "its configs and tokenizer come from `base:` when set, else from its family's config repo",
    "vae": "a single VAE file (.safetensors; LDM or diffusers naming) that replaces the base's VAE",
    "refiner": "an SDXL refiner: hf://stabilityai/stable-diffusion-xl-refiner-1.0, a single refiner "
    ".safetensors file, a local folder or builtin:tiny-sdxl-refiner",
    "refiner_mode": "worker-sdxl (refine every image as RunPod's worker-sdxl does) or ensemble (base to "
    "high_noise_frac, refiner from there)",
    "generator": "cpu (the same picture on any machine) or device (the GPU's own generator, as worker-sdxl)",
    "family": f"one of {', '.join(FAMILIES)}; set it only when detection cannot tell (it names the candidates)",
    "loras": "a list of {source, scale (default 1.0), fuse (default true), name (default: the file's stem)}",
    "hypernetworks": "a list of {source (an A1111 .pt; needs `allow_pickle: true`), strength (default 1.0), name}",
    "prediction": "eps or v: what the model predicts, for v-prediction fine-tunes whose files do not say so",
    "precision": "one of fp32, fp16, bf16 (override with precision=fp16 on the command line)",
    "scheduler": f"one of {', '.join(SCHEDULERS)} (worker-sdxl's names)",
    "offload": "one of none, model, sequential, group (diffusers' CPU offload kinds; they matter on CUDA only)",
    "compile": "off, regional, full, or {scope: off|regional|full, mode: default|max-autotune, dynamic: "
    "true|false, shapes: [[width, height], ...]}",
    "compile.scope": "one of off, regional (the repeated blocks), full (the whole denoiser)",
    "compile.mode": "default or max-autotune",
    "compile.shapes": "a list of [width, height] pairs, multiples of 8, at least 64",
    "attention": f"one of {', '.join(ATTENTION_BACKENDS)} (diffusers' attention backends)",
    "quantize": "one of none, int8, fp8: the denoiser's weights, stored quantized (optimum-quanto)",
    "defaults.width": "a multiple of 8, at least 64",
    "defaults.height": "a multiple of 8, at least 64",
    "limits.max_width": "a multiple of 8, at least 64",
    "limits.max_height": "a multiple of 8, at least 64",
}
# The model of each section, by its field path with list indexes left out ("loras.0" -> "loras").
_SECTIONS: dict[str, type[BaseModel]] = {
    "": _Fields,
    "defaults": RecipeDefaults,
    "limits": RecipeLimits,
    "compile": CompileOptions,
    "loras": RecipeLora,
    "embeddings": RecipeEmbedding,
    "controlnets": RecipeControlNet,
    "hypernetworks": RecipeHypernetwork,
}

_M = TypeVar("_M", bound=BaseModel)
Where = Callable[[str], str]  # a field path -> "<recipe file or command line>: <field path>"


def _problem(where: Where, err: Any) -> Problem:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        section = ".".join(str(p) for p in err["loc"][:-1] if not isinstance(p, int))
        model = _SECTIONS.get(section)
        keys = [*model.model_fields, *(PERFORMANCE_KEYS if model is _Fields else ())] if model else ["none"]
        known = ", ".join(keys)
        return Problem(where(loc), "unknown key", f"valid keys here: {known}; check the spelling")
    if kind == "missing":
        return Problem(where(loc), "required field is missing", _HINTS.get(loc, "add it to the recipe"))
    msg = err["msg"].removeprefix("Value error, ")
    found = repr(err["input"])
    # Validators that end by naming the value ("unknown scheduler 'EulerA'") are not repeated.
    named = isinstance(err["input"], str) and msg.endswith(found)
    what = msg if named else f"{msg}; found {found}"
    return Problem(where(loc), what, _HINTS.get(loc, "fix the value"))


def _builtin_problem(src: uri.Source, at: str) -> Problem | None:
    """A built-in model this compiler does not have, with the nearest names (the revision is the
    lock's to check: it knows which one is current)."""
    if not isinstance(src, uri.BuiltinSource) or src.name in BUILTINS:
        return None
    near = difflib.get_close_matches(src.name, list(BUILTINS), n=1)
    return Problem(
        at,
        f"no built-in model {src.name!r}",
        (f"did you mean builtin:{near[0]}? " if near else "")
        + f"built-in models: {', '.join('builtin:' + n for n in BUILTINS)}",
    )


def parse_recipe(
    name: str,
    path: Path,
    fields: dict[str, Any],
    civitai_hosts: tuple[str, ...] = (),
    command_line: tuple[str, ...] = (),
) -> Recipe:
    """Check every field; raise UserError listing all problems. ``command_line`` names the field
    paths that command-line overrides set: their problems are blamed on the command line."""

    def where(loc: str) -> str:
        by_cli = any(loc == k or loc.startswith(f"{k}.") for k in command_line)
        return f"{'command line' if by_cli else path}: {loc}"

    problems: list[Problem] = []
    checked = _validated(_Fields, {k: v for k, v in fields.items() if k not in PERFORMANCE_KEYS}, where, problems)
    runtime = _validated(RuntimeOptions, _performance(fields), where, problems)
    parsed = _pipeline_sources(fields, where, path, civitai_hosts, problems)
    loras = _loras(checked, where, path, civitai_hosts, problems)
    embeddings = _embeddings(checked, where, path, civitai_hosts, problems)
    controlnets = _controlnets(checked, where, path, civitai_hosts, problems)
    hypernetworks = _hypernetworks(checked, where, path, civitai_hosts, problems)
    problems.extend(_whole_recipe_problems(fields, checked, where))
    if problems or checked is None or runtime is None:
        raise UserError(problems)
    return Recipe(
        name=name,
        path=path,
        base=parsed.get("base"),
        checkpoint=parsed.get("checkpoint"),
        family=checked.family,
        prediction=checked.prediction,
        allow_pickle=checked.allow_pickle,
        scheduler=checked.scheduler,
        defaults=checked.defaults,
        limits=checked.limits,
        loras=loras,
        vae=parsed.get("vae"),
        embeddings=embeddings,
        controlnets=controlnets,
        refiner=parsed.get("refiner"),
        refiner_mode=checked.refiner_mode,
        hypernetworks=hypernetworks,
        runtime=runtime.model_copy(update={"dtype": checked.precision}),
    )


def _validated(model: type[_M], data: dict[str, Any], where: Where, problems: list[Problem]) -> _M | None:
    """``data`` read strictly as ``model`` (YAML's "64" is not 64); None and its problems otherwise."""
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        problems.extend(_problem(where, err) for err in e.errors())
        return None


def _performance(fields: dict[str, Any]) -> dict[str, Any]:
    """The performance keys as RuntimeOptions reads them. Its dtype is set from `precision` once
    that is checked (with the other fields, which report a bad one): fp32 stands in until then."""
    return {"dtype": "fp32", **{k: fields[k] for k in PERFORMANCE_KEYS if k in fields}}


def _pipeline_sources(
    fields: dict[str, Any], where: Where, path: Path, civitai_hosts: tuple[str, ...], problems: list[Problem]
) -> dict[str, uri.Source]:
    """base, checkpoint, vae and refiner parsed; a checkpoint or VAE must name one file."""
    parsed: dict[str, uri.Source] = {}
    for field in ("base", "checkpoint", "vae", "refiner"):
        if not isinstance(fields.get(field), str):
            continue
        try:
            src = uri.parse(fields[field], base_dir=path.parent, civitai_hosts=civitai_hosts)
        except uri.SourceError as e:
            problems.append(Problem(where(field), str(e), _HINTS[field]))
            continue
        if (unknown := _builtin_problem(src, where(field))) is not None:
            problems.append(unknown)
        if field not in ("base", "refiner") and uri.is_single_file(src) is False:
            problems.append(Problem(where(field), f"{src} names a whole pipeline", _HINTS[field]))
        parsed[field] = src
    return parsed


def _whole_recipe_problems(fields: dict[str, Any], checked: _Fields | None, where: Where) -> list[Problem]:
    out = []
    if fields.get("base") is None and fields.get("checkpoint") is None:  # `base: null` is no base
        out.append(
            Problem(
                where("base"), "a recipe needs `base:` or `checkpoint:`", f"{_HINTS['base']}; {_HINTS['checkpoint']}"
            )
        )
    return out


_Named = TypeVar("_Named", RecipeLora, RecipeControlNet, RecipeHypernetwork)


def _named_sources(
    items: Sequence[_Named],
    kind: str,
    what: str,
    where: Where,
    path: Path,
    civitai_hosts: tuple[str, ...],
    problems: list[Problem],
) -> Iterator[tuple[_Named, uri.Source, str, bool]]:
    """LoRAs and ControlNets alike: each item's parsed source and its name, unique within its kind (requests
    select them by name); from_lock when only the lock's file name can name it."""
    taken: set[str] = set()
    for i, item in enumerate(items):
        at = f"{kind}s.{i}"
        src = _adapter_source(item.source, where(f"{at}.source"), path, civitai_hosts, problems)
        if src is None:
            continue
        stem = file_stem(str(src))
        name = item.name or stem or f"{kind}{i}"
        _unique(name, taken, where(f"{at}.name"), what, problems)
        yield item, src, name, not item.name and not stem


def _controlnets(
    checked: _Fields | None, where: Where, path: Path, civitai_hosts: tuple[str, ...], problems: list[Problem]
) -> tuple[ControlNet, ...]:
    items = checked.controlnets if checked else []
    return tuple(
        ControlNet(source=src, name=name, scale=cn.scale, from_lock=from_lock)
        for cn, src, name, from_lock in _named_sources(
            items, "controlnet", "ControlNets", where, path, civitai_hosts, problems
        )
    )


def _hypernetworks(
    checked: _Fields | None, where: Where, path: Path, civitai_hosts: tuple[str, ...], problems: list[Problem]
) -> tuple[Hypernetwork, ...]:
    items = checked.hypernetworks if checked else []
    return tuple(
        Hypernetwork(source=src, name=name, strength=hn.strength, from_lock=from_lock)
        for hn, src, name, from_lock in _named_sources(
            items, "hypernetwork", "hypernetworks", where, path, civitai_hosts, problems
        )
    )


def _embeddings(
    checked: _Fields | None, where: Where, path: Path, civitai_hosts: tuple[str, ...], problems: list[Problem]
) -> tuple[Embedding, ...]:
    out: list[Embedding] = []
    for i, emb in enumerate(checked.embeddings if checked else ()):
        at = f"embeddings.{i}"
        src = _adapter_source(emb.source, where(f"{at}.source"), path, civitai_hosts, problems)
        if src is None:
            continue
        if emb.token is not None and emb.token in {o.token for o in out}:
            problems.append(
                Problem(where(f"{at}.token"), f"two embeddings use {emb.token!r}", "give each its own token")
            )
        stem = file_stem(str(src))
        out.append(Embedding(source=src, token=emb.token, stem=stem or f"embedding{i}", from_lock=stem is None))
    return tuple(out)


def _adapter_source(
    raw: str, at: str, path: Path, civitai_hosts: tuple[str, ...], problems: list[Problem]
) -> uri.Source | None:
    """One adapter's source, parsed; it must name one file. None (and a problem) otherwise."""
    try:
        src = uri.parse(raw, base_dir=path.parent, civitai_hosts=civitai_hosts)
    except uri.SourceError as e:
        problems.append(Problem(at, str(e), _HINTS["checkpoint"]))
        return None
    if uri.is_single_file(src) is False:
        problems.append(Problem(at, f"{src} names a whole pipeline", "name one .safetensors file"))
        return None
    return src


def _unique(name: str, taken: set[str], at: str, what: str, problems: list[Problem]) -> None:
    """Requests select LoRAs and ControlNets by name: two of one kind may not share one."""
    if name in taken:
        problems.append(Problem(at, f"two {what} are named {name!r}", f"give each of the {what} its own `name:`"))
    taken.add(name)


def _loras(
    checked: _Fields | None, where: Where, path: Path, civitai_hosts: tuple[str, ...], problems: list[Problem]
) -> tuple[Lora, ...]:
    items = checked.loras if checked else []
    return tuple(
        Lora(source=src, name=name, scale=lora.scale, fuse=lora.fuse, from_lock=from_lock)
        for lora, src, name, from_lock in _named_sources(items, "lora", "LoRAs", where, path, civitai_hosts, problems)
    )


def file_stem(name: str) -> str | None:
    """A file's stem as an adapter name (``./detail_v2.safetensors`` -> ``detail_v2``), or None
    where there is no file name (a CivitAI version: its file is known once it is locked)."""
    tail = name.split("#")[0].split("@")[0].rstrip("/").rsplit("/", 1)[-1]
    stem = tail
    for ext in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        stem = stem.removesuffix(ext)
    clean = "".join(c if c.isalnum() or c in "_.-" else "_" for c in stem)[:64]
    return clean if clean and clean[0].isalnum() and "." in tail else None

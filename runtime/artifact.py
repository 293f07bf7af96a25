"""The artifact contract, owned here and imported by the compiler (its only runtime import).

An artifact is a directory ``<store>/artifacts/v1/<cache_key>/`` holding ``manifest.json``, a
``pipeline/`` folder in diffusers' ``save_pretrained`` layout (safetensors only) and ``READY``,
written last. A directory without ``READY`` is not an artifact, whatever else it holds.

``<store>/names/<recipe>.json`` maps a recipe name to its current artifact, with history. The
runtime resolves names only through it.

This module stays free of torch and diffusers so that the compiler's cache-hit path and the
runtime's request validation never pay for importing them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Bump when a reader of the previous version could misread a new artifact.
FORMAT_VERSION = 1
# The store when UIW_HOME is unset: the one default, shared by the compiler, its store commands and the
# runtime (conf/config.yaml repeats it as a YAML literal, and a test holds the two equal).
DEFAULT_HOME = "~/.cache/uiw"
ARTIFACTS_SUBDIR = "artifacts/v1"
NAMES_SUBDIR = "names"
ALIASES_SUBDIR = "aliases"  # <alias>.json: public name -> weighted routes, with history
MANIFEST = "manifest.json"
READY = "READY"
CONTROLNET_DIR = "controlnets"  # one diffusers ControlNetModel folder per ControlNet
LORA_DIR = "loras"  # switchable LoRA files, as given (the runtime loads them as named adapters)
PIPELINE_DIR = "pipeline"
REFINER_DIR = "refiner"  # an SDXL refiner's pipeline folder, less what it shares with pipeline/
HYPERNETWORK_DIR = "hypernetworks"  # <name>.safetensors + <name>.json per A1111 hypernetwork

Precision = Literal["fp32", "fp16", "bf16"]
# precision -> the torch dtype's attribute name (getattr(torch, ...)); strings keep this module torch-free
TORCH_DTYPES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
Task = Literal["txt2img", "img2img", "inpaint", "controlnet"]

# worker-sdxl's scheduler names -> diffusers class names. One table for the compiler (recipe
# validation) and the runtime (per-request scheduler), kept as strings so neither imports diffusers
# to check a name.
SCHEDULERS: dict[str, str] = {
    "PNDM": "PNDMScheduler",
    "KLMS": "LMSDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "K_EULER": "EulerDiscreteScheduler",
    "K_EULER_ANCESTRAL": "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "DPMSolverSinglestep": "DPMSolverSinglestepScheduler",
    "FLOW_MATCH_EULER": "FlowMatchEulerDiscreteScheduler",  # SD3 and FLUX (flow matching)
}


class ArtifactError(Exception):
    """An artifact or name that cannot be used; the message says where, what and a hint."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Defaults(_Frozen):
    """Request defaults: what a request that omits a field gets."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    negative_prompt: str | None = None


# The most frames a video request may ask for, whatever a recipe says (runtime.video encodes them).
MAX_FRAMES = 1025


class Limits(_Frozen):
    """Request bounds, checked before any model work."""

    max_width: int
    max_height: int
    max_steps: int
    max_images: int
    max_frames: int | None = None  # video pipelines: num_frames at most (compiler.video_limits)


class Serving(_Frozen):
    scheduler: str
    defaults: Defaults
    limits: Limits


class Capabilities(_Frozen):
    tasks: tuple[Task, ...] = ("txt2img",)
    # task -> diffusers pipeline class, each derived at load from the one loaded pipeline
    # (``from_pipe``: shared components, no second copy of any weight)
    pipelines: dict[str, str] = Field(default_factory=dict)


class LoraInfo(_Frozen):
    """A LoRA in the artifact: fused into the weights at ``scale``, or stored as ``file`` for
    requests that name it (``scale`` is then the default a request may override)."""

    name: str
    scale: float
    fused: bool = True
    file: str | None = None  # relative to the artifact directory, for a LoRA that is not fused


class ControlNetInfo(_Frozen):
    """A ControlNet a request can name; ``scale`` is its default conditioning scale."""

    name: str
    scale: float
    path: str  # its ControlNetModel folder, relative to the artifact directory


RefinerMode = Literal["worker-sdxl", "ensemble"]


class RefinerInfo(_Frozen):
    """An SDXL refiner beside the base. ``worker-sdxl``: every request is refined as RunPod's
    worker-sdxl does it (the base's latents refined as img2img at ``strength``); ``ensemble``:
    diffusers' ensemble of experts (the base stops at ``denoising_end``, the refiner goes on from
    there). ``shared``: its components that are the base's own bytes, loaded from the base."""

    path: str = REFINER_DIR
    pipeline_class: str = "StableDiffusionXLImg2ImgPipeline"
    mode: RefinerMode = "worker-sdxl"
    shared: tuple[str, ...] = ()


class EmbeddingInfo(_Frozen):
    """A textual-inversion token the artifact's tokenizer(s) know: prompts use it as a word."""

    token: str
    vectors: int  # tokens it expands to (token, token_1, …)
    text_encoders: tuple[str, ...]


# A1111's hypernetwork activation names -> the torch.nn class it builds for each, without arguments
# (its HypernetworkModule.activation_dict: "swish" is Hardswish there). The ones that take
# arguments or change the width (PReLU, Softmax, GLU, MultiheadAttention, ...) are not listed.
HYPERNETWORK_ACTIVATIONS: dict[str, str] = {
    "relu": "ReLU",
    "leakyrelu": "LeakyReLU",
    "elu": "ELU",
    "swish": "Hardswish",
    "tanh": "Tanh",
    "sigmoid": "Sigmoid",
    "gelu": "GELU",
    "silu": "SiLU",
    "mish": "Mish",
    "selu": "SELU",
    "celu": "CELU",
    "softplus": "Softplus",
    "softsign": "Softsign",
    "hardswish": "Hardswish",
    "hardsigmoid": "Hardsigmoid",
    "hardtanh": "Hardtanh",
    "relu6": "ReLU6",
    "logsigmoid": "LogSigmoid",
    "tanhshrink": "Tanhshrink",
    "softshrink": "Softshrink",
    "hardshrink": "Hardshrink",
}


class HypernetworkInfo(_Frozen):
    """An A1111 hypernetwork: its modules change the key and value inputs of the denoiser's
    attention layers whose context width they were made for, at ``strength`` (runtime.hypernetworks)."""

    name: str
    strength: float
    weights: str  # its .safetensors, relative to the artifact directory
    config: str  # its .json: the layers of each module, in order, and the widths it has modules for


Offload = Literal["none", "model", "sequential", "group"]
CompileScope = Literal["off", "regional", "full"]
Quantize = Literal["none", "int8", "fp8"]
COMPILE_DIR = "compile"  # compile/<key>/: torch.compiler cache artifacts, key = GPU kind + versions

# diffusers attention backends (``ModelMixin.set_attention_backend``) a recipe may name: the ones
# that need no download at serve time (the *_hub ones fetch kernels). Checked against this
# diffusers' AttentionBackendName by a test. Only these run on a CPU:
ATTENTION_BACKENDS = (
    "native",
    "_native_math",
    "_native_flash",
    "_native_efficient",
    "_native_cudnn",
    "flex",
    "flash",
    "flash_varlen",
    "_flash_3",
    "sage",
    "sage_varlen",
    "xformers",
)
CPU_ATTENTION_BACKENDS = ("native", "_native_math")


def compile_cache_key() -> str:
    """The machine kind a compile cache under ``compile/<key>/`` is good for: device name and
    compute capability, torch and triton versions (Inductor's kernels are specific to all four).
    Part of the contract: the compiler names the folder, the runtime looks it up. Imports torch
    when called, never at import."""
    import platform
    import re
    from importlib import metadata

    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        device = f"{torch.cuda.get_device_name(0)}-sm{major}{minor}"
    else:
        device = f"cpu-{platform.machine()}"
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = "none"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{device}-torch{torch.__version__}-triton{triton}")


class CompileOptions(_Frozen):
    """torch.compile of the denoiser at load, its caches warmed for ``shapes`` at build time."""

    scope: CompileScope = "off"
    mode: Literal["default", "max-autotune"] = "default"
    dynamic: bool = False
    # (width, height) pairs the build warms (on a GPU); in a recipe, empty means its default size.
    shapes: tuple[tuple[int, int], ...] = ()

    @field_validator("shapes", mode="before")
    @classmethod
    def _pairs(cls, v: object) -> object:
        # YAML and JSON give lists; a recipe is read in strict mode, which wants tuples. A pair is
        # two multiples of 8, at least 64.
        if not isinstance(v, list | tuple):
            return v
        out = []
        for pair in v:
            ok = isinstance(pair, list | tuple) and len(pair) == 2
            if not ok or not all(type(x) is int and x >= 64 and x % 8 == 0 for x in pair):
                raise ValueError(f"each shape is [width, height], multiples of 8 and at least 64; found {pair!r}")
            out.append(tuple(pair))
        return tuple(out)


class RuntimeOptions(_Frozen):
    """The performance options: what the runtime applies after loading (runtime.optimize);
    quantize is already in the weights. One type from the recipe (read strictly) through the
    plan to the manifest. Every field has a default so that manifests written before it existed
    stay readable."""

    dtype: Precision
    offload: Offload = "none"
    compile: CompileOptions = Field(default_factory=CompileOptions)
    channels_last: bool = False
    fused_qkv: bool = False
    attention: str | None = None
    quantize: Quantize = "none"
    # Where a request's seeded noise is drawn: "cpu" (the same picture on any machine) or "device"
    # (the pipeline's device: on CUDA, the picture worker-sdxl draws from its CUDA generator).
    generator: Literal["cpu", "device"] = "cpu"

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_shorthand(cls, v: object) -> object:
        # YAML reads a bare `off` as false; `compile: regional` (and `compile=regional` on the
        # command line) is short for `compile: {scope: regional}`; manifests before compile
        # options said "off".
        if v is False:
            return {"scope": "off"}
        return {"scope": v} if isinstance(v, str) else v

    @field_validator("attention")
    @classmethod
    def _known_backend(cls, v: str | None) -> str | None:
        if v is not None and v not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {v!r}")
        return v


ParamType = Literal["int", "float", "bool", "str"]


class CallParam(_Frozen):
    """A plain-typed parameter of a generic pipeline's ``__call__`` that requests may set, as the
    compiler read it from the signature and docstring (``default``: the pipeline's own)."""

    name: str
    type: ParamType
    default: bool | int | float | str | None = None
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""


class CallSchema(_Frozen):
    """A generic artifact's requests, read at build from its pipeline class (compiler.introspect):
    which worker-sdxl fields the pipeline takes and under what name, and its other parameters."""

    mapped: dict[str, str]  # worker-sdxl field -> the __call__ parameter it fills
    extras: tuple[CallParam, ...] = ()
    size_multiple: int = 8  # width and height must be multiples of it (the VAE's scale factor)
    schedulers: tuple[str, ...] = ()  # what a request may name: SCHEDULERS keys, or the base's own class
    output: Literal["images", "frames"] = "images"  # frames: a video pipeline
    step_callback: bool = True  # whether __call__ takes callback_on_step_end (progress, time limits)


class FileEntry(_Frozen):
    path: str  # relative to the artifact directory, POSIX separators
    sha256: str
    size: int


class Manifest(_Frozen):
    format_version: int
    cache_key: str
    content_digest: str
    recipe: str
    family: str
    pipeline_class: str
    components: dict[str, str]
    serving: Serving
    capabilities: Capabilities = Field(default_factory=Capabilities)
    loras: tuple[LoraInfo, ...] = ()
    embeddings: tuple[EmbeddingInfo, ...] = ()
    controlnets: tuple[ControlNetInfo, ...] = ()
    refiner: RefinerInfo | None = None
    hypernetworks: tuple[HypernetworkInfo, ...] = ()  # applied in this order, as A1111 chains them
    call: CallSchema | None = None  # generic artifacts (family generic:<class>) only
    runtime: RuntimeOptions
    environment: dict[str, str]
    provenance: dict[str, str]  # recipe field -> "SOURCE PIN" (e.g. "hf://org/repo@main commit:…")
    # input role -> what its weights became (e.g. "checkpoint": "source fp8 e4m3fn (912 tensors) -> bf16")
    conversions: dict[str, str] = Field(default_factory=dict)
    inputs: tuple[str, ...] = ()  # sha256 of every store blob the build read (gc keeps them)
    files: tuple[FileEntry, ...]
    created_at: str


def content_digest(files: list[FileEntry] | tuple[FileEntry, ...]) -> str:
    """sha256 over sorted ``"<sha256>  <path>\\n"`` lines: the output of ``sha256sum`` on the files,
    sorted by path, hashed again. Checkable by hand with coreutils."""
    lines = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(lines.encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(artifact_dir: Path) -> Manifest:
    """Read and check an artifact's manifest. Raises ArtifactError with a hint."""
    artifact_dir = Path(artifact_dir)
    if not (artifact_dir / READY).is_file():
        raise ArtifactError(
            f"{artifact_dir}: not a finished artifact (no {READY} file). "
            "hint: compile it with `python -m compiler recipe=NAME`; a build that was interrupted "
            "leaves no READY, and the next compile rebuilds it."
        )
    try:
        raw = json.loads((artifact_dir / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{artifact_dir / MANIFEST}: unreadable manifest ({e}). hint: recompile.") from e
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{artifact_dir / MANIFEST}: format_version {version!r}, this runtime reads {FORMAT_VERSION}. "
            "hint: recompile the recipe with the compiler that matches this runtime."
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise ArtifactError(f"{artifact_dir / MANIFEST}: invalid manifest: {e}. hint: recompile.") from e


# --- names: recipe name -> current artifact, with history -------------------------------------


class NameRecord(_Frozen):
    cache_key: str
    content_digest: str
    published_at: str


class NameFile(_Frozen):
    name: str
    current: NameRecord
    history: tuple[NameRecord, ...] = ()  # previous currents, newest first


# --- aliases: a public name -> weighted routes to artifacts, with history ---------------------


class AliasRoute(_Frozen):
    """One route of an alias. ``target`` is what `alias set` was given (a recipe name or a cache
    key); ``cache_key`` is the artifact it named then, pinned, so that recompiling a recipe never
    moves an alias behind its users' backs and a rollback restores exactly what was served."""

    target: str
    cache_key: str
    weight: float = Field(1.0, ge=0)  # relative; 0 keeps a route listed but sends it nothing


class AliasRecord(_Frozen):
    routes: tuple[AliasRoute, ...] = Field(min_length=1)
    set_at: str


class AliasFile(_Frozen):
    name: str
    current: AliasRecord
    history: tuple[AliasRecord, ...] = ()  # previous currents, newest first


def alias_path(home: Path, name: str) -> Path:
    return Path(home) / ALIASES_SUBDIR / f"{name}.json"


def read_alias(home: Path, name: str) -> AliasFile | None:
    hint = f"rewrite it with `python -m compiler.store alias set {name} ...`"
    return _read_record(alias_path(home, name), AliasFile, "alias", hint)


def names_path(home: Path, name: str) -> Path:
    return Path(home) / NAMES_SUBDIR / f"{name}.json"


def artifact_path(home: Path, cache_key: str) -> Path:
    return Path(home) / ARTIFACTS_SUBDIR / cache_key


def read_name(home: Path, name: str) -> NameFile | None:
    return _read_record(names_path(home, name), NameFile, "name", "recompile the recipe to rewrite it")


_Record = TypeVar("_Record", NameFile, AliasFile)


def _read_record(path: Path, model: type[_Record], what: str, hint: str) -> _Record | None:
    """A small JSON record of the store (a name or an alias): None when there is none yet."""
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as e:
        raise ArtifactError(f"{path}: unreadable {what} file ({e}). hint: {hint}.") from e


def write_json_atomic(path: Path, data: object, durable: bool = True) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", durable)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so a rename inside it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Write to a temp file in the same folder, fsync (unless not ``durable``: a file that may be
    lost in a crash), then rename: readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_artifact(entry: str, home: Path) -> Path:
    """An entry of UIW_ARTIFACTS: an artifact directory, or a recipe name looked up in names/."""
    p = Path(entry).expanduser()
    if p.is_dir() or os.sep in entry or entry.startswith("."):
        return p.resolve()
    record = read_name(home, entry)
    if record is None:
        raise ArtifactError(
            f"UIW_ARTIFACTS: {entry!r} is neither an artifact directory nor a compiled recipe name "
            f"(no {names_path(home, entry)}). hint: run `python -m compiler recipe={entry}` with the same "
            "UIW_HOME, or give the artifact directory that the compiler printed."
        )
    return artifact_path(home, record.current.cache_key)


def absent_components(folder: Path) -> dict[str, None]:
    """The components the pipeline folder's model_index.json records as absent (``[null, null]``:
    SD 3 built from a file without T5), as ``None`` arguments: diffusers' from_pretrained refuses
    a folder that lacks a component the pipeline class does not list as optional, unless told."""
    index = json.loads((folder / "model_index.json").read_text())
    return {name: None for name, entry in index.items() if entry == [None, None]}

"""BuildPlan + fetched inputs -> pipeline folder on disk (diffusers save_pretrained layout,
safetensors only).

Imports torch and diffusers, as do the stages it drives (lora, controlnets, optimize, finite, and
tiny_models for built-in bases) and compiler.pickles where a recipe allows a pickle. The build
imports it only on a cache miss, so a cache hit never pays for torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler import uri
from compiler.controlnets import build_controlnets
from compiler.converted_bases import ConvertedBase
from compiler.embeddings import load_embeddings
from compiler.families import PREDICTION_TYPES
from compiler.finite import require_finite_file
from compiler.generic import is_generic
from compiler.generic_build import GenericBuilt, build_generic, load_generic, pipeline_class
from compiler.lora import apply_loras, base_shapes, check_fit, meta_components
from compiler.plan import BuildPlan
from compiler.singlefile import linked, load_component
from compiler.sources import Fetched
from compiler.tiny_models import BUILTINS
from runtime.artifact import PIPELINE_DIR, SCHEDULERS, TORCH_DTYPES, ControlNetInfo, EmbeddingInfo

log = logging.getLogger(__name__)


def snapshot(fetched: Fetched, scratch: Path) -> Path:
    """The fetched files laid out as the repo had them (symlinks into the blob store), so that
    diffusers reads a plain local folder and nothing is copied."""
    root = scratch / "snapshot"
    for rel, blob in fetched.files.items():
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(blob.resolve(), link)
    return root


def _builtin(fetched: Fetched) -> Any:
    src = uri.parse(fetched.source)
    assert isinstance(src, uri.BuiltinSource)
    return BUILTINS[src.name].build()


def layer_shapes(fetched: Fetched, scratch: Path) -> dict[str, tuple[int, ...]]:
    """A diffusers base's LoRA-checked layer shapes, from its configs on the meta device: no
    weight is read or allocated."""
    folder = snapshot(fetched, scratch / "layer-shapes")
    if not (folder / "model_index.json").is_file():
        return {}
    try:
        return base_shapes(meta_components(folder))
    except (ValueError, TypeError, KeyError, OSError, ImportError, RuntimeError) as e:
        # A config this check cannot instantiate is left to the build, which loads the base for
        # real and checks where every LoRA module lands.
        log.warning("LoRA widths not checked before the build (%s: %s)", type(e).__name__, str(e)[:200])
        return {}


def load_base(
    plan: BuildPlan,
    fetched: Fetched,
    scratch: Path,
    checkpoint: Fetched | None,
    converted: ConvertedBase | None = None,
) -> Any:
    import diffusers
    import torch

    cls = getattr(diffusers, plan.pipeline_class)
    dtype = getattr(torch, TORCH_DTYPES[plan.precision])
    if checkpoint is not None and plan.checkpoint_kind == "checkpoint":
        if converted is None:
            return load_checkpoint(cls, fetched, scratch, checkpoint, dtype)
        # Converted once per (checkpoint, configs, precision, versions): a rebuild that changed
        # only what goes on top (a LoRA's scale) loads the converted folder instead.
        return converted.load_or_convert(
            convert=lambda: load_checkpoint(cls, fetched, scratch, checkpoint, dtype),
            load=lambda folder: _load_converted(cls, folder, dtype),
            save=_save_converted,
        )
    if fetched.kind == "builtin":
        pipe = _builtin(fetched)
    else:
        # use_safetensors: never fall back to a pickle; the lock holds no .bin files anyway.
        pipe = cls.from_pretrained(snapshot(fetched, scratch), dtype=dtype, variant=plan.variant, use_safetensors=True)
    if checkpoint is not None:
        replace_denoiser(pipe, scratch, checkpoint)
    return pipe


def replace_denoiser(pipe: Any, scratch: Path, checkpoint: Fetched) -> None:
    """A UNet-only (or transformer-only) file replaces the base's; the base's other weights stay."""
    (path,) = checkpoint.files.values()
    require_finite_file(path, "checkpoint", "checkpoint")
    replace_component(pipe, "unet" if hasattr(pipe, "unet") else "transformer", scratch, checkpoint)


def replace_component(pipe: Any, name: str, scratch: Path, file: Fetched, where: str | None = None) -> None:
    """One component's weights from a single file, converted by diffusers with the base's own
    config for it, so a file that does not fit the base (another latent width, another family)
    fails here with the shapes that disagree."""
    current = getattr(pipe, name)
    folder = scratch / f"{name}-config"
    current.save_config(folder)
    hint = f"use a {name} made for the base's family (same latent channels and widths)"
    model = load_component(type(current), file, scratch, name, folder, where, f"the base's {name}", hint)
    pipe.register_modules(**{name: model.to(current.dtype).eval()})


def load_checkpoint(cls: Any, base: Fetched, scratch: Path, checkpoint: Fetched, dtype: Any) -> Any:
    """A single-file checkpoint through diffusers' own converter, with the base's configs and
    tokenizer (``config=`` a local folder, so nothing reaches the Hub)."""
    import diffusers

    # Streamed before the conversion reads it (which then finds it in the page cache).
    (path,) = checkpoint.files.values()
    require_finite_file(path, "checkpoint", "checkpoint")
    if base.kind == "builtin":
        folder = scratch / "configs"
        _builtin(base).save_pretrained(folder)
    else:
        folder = snapshot(base, scratch)
    # dtype: converted straight to the build's precision (an fp16 file otherwise becomes fp32
    # tensors first: twice the peak memory).
    pipe = cls.from_single_file(
        linked(scratch, checkpoint, "checkpoint"), config=str(folder), local_files_only=True, torch_dtype=dtype
    )
    # from_single_file builds its scheduler from defaults; the base's own scheduler config is the
    # one the recipe's scheduler and every per-request one derive from.
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, sched["_class_name"]).from_pretrained(folder, subfolder="scheduler")
    return pipe


def _load_converted(cls: Any, folder: Path, dtype: Any) -> Any:
    from diffusers.configuration_utils import FrozenDict

    pipe = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    # from_pretrained records the folder it read as `_name_or_path` in every config, which
    # save_pretrained writes again: the store's path, not the weights' identity. Dropped, so that
    # every store builds the same bytes (and as the converter, which records none, would).
    for obj in (pipe, *pipe.components.values()):
        config = getattr(obj, "_internal_dict", None)
        if config is not None and "_name_or_path" in config:
            obj._internal_dict = FrozenDict({k: v for k, v in config.items() if k != "_name_or_path"})
    return pipe


def _save_converted(pipe: Any, folder: Path) -> None:
    pipe.save_pretrained(folder, safe_serialization=True)
    _drop_load_options(folder)


# transformers records how a tokenizer was loaded in the config it saves; from_single_file loads
# them with local_files_only, so without this the same weights would give two content digests.
_LOAD_OPTIONS = ("is_local", "local_files_only")


def _drop_load_options(folder: Path) -> None:
    for path in folder.glob("tokenizer*/tokenizer_config.json"):
        config = json.loads(path.read_text())
        if any(k in config for k in _LOAD_OPTIONS):
            kept = {k: v for k, v in config.items() if k not in _LOAD_OPTIONS}
            path.write_text(json.dumps(kept, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class Materialized:
    """What the build learned that the manifest records."""

    components: dict[str, str]  # component -> class name
    embeddings: tuple[EmbeddingInfo, ...]
    controlnets: tuple[ControlNetInfo, ...]
    generic: GenericBuilt | None = None  # a generic family's schema, serving and tasks


def materialize(
    plan: BuildPlan,
    out: Path,
    fetched: Fetched,
    scratch: Path,
    checkpoint: Fetched | None = None,
    adapters: dict[str, Fetched] | None = None,
    converted: ConvertedBase | None = None,
) -> Materialized:
    """Build the plan's pipeline and save it under ``out/pipeline``."""
    import diffusers
    import torch

    if is_generic(plan.family):
        try:
            return _materialize_generic(plan, out, fetched, scratch, adapters or {})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    try:
        adapters = adapters or {}
        loras = [(lora, adapters[f"loras.{i}"]) for i, lora in enumerate(plan.loras)]
        builtin = fetched.kind == "builtin"
        if loras and not builtin:  # before the base is loaded or converted: its configs on the meta device
            check_fit(loras, layer_shapes(fetched, scratch), plan.family)
        pipe = load_base(plan, fetched, scratch, checkpoint, converted)
        if loras and builtin:  # a generated tiny base costs less to build than a meta twin of it
            check_fit(loras, base_shapes(pipe), plan.family)
        if type(pipe).__name__ != plan.pipeline_class:
            raise ValueError(f"{plan.base} built {type(pipe).__name__}, the plan expects {plan.pipeline_class}")
        # The base's own scheduler config is kept as it is: the runtime derives the recipe's default
        # scheduler and every per-request one from it, as a plain diffusers user would
        # (`EulerDiscreteScheduler.from_config(pipe.scheduler.config)`). Converting here and again per
        # request would chain conversions, and each one fills in defaults of its own.
        getattr(diffusers, SCHEDULERS[plan.scheduler])  # the name maps to a class of this diffusers
        if plan.vae is not None:
            replace_component(pipe, "vae", scratch, adapters["vae"], "vae")
        tokens = load_embeddings(pipe, [(e, adapters[f"embeddings.{i}"]) for i, e in enumerate(plan.embeddings)])
        apply_loras(pipe, loras, out)
        controlnets = build_controlnets(
            pipe, [(c, adapters[f"controlnets.{i}"]) for i, c in enumerate(plan.controlnets)], scratch, out
        )
        if plan.prediction is not None:
            pipe.scheduler.register_to_config(prediction_type=PREDICTION_TYPES[plan.prediction])
        pipe.to(dtype=getattr(torch, TORCH_DTYPES[plan.precision]))
        if plan.vae_force_upcast:
            pipe.vae.register_to_config(force_upcast=True)
        pipe.save_pretrained(out / PIPELINE_DIR, safe_serialization=True)
        _drop_load_options(out / PIPELINE_DIR)
        # The target-hardware pass (compiler.optimize): quantized weights stored as served, then
        # compile caches warmed from the final files.
        from compiler.optimize import capture_compile_cache, quantize_denoiser

        quantize_denoiser(plan, out)
        capture_compile_cache(plan, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("materialized %s (%s, %s)", plan.base, plan.precision, plan.scheduler)
    components = {name: type(c).__name__ for name, c in pipe.components.items() if c is not None}
    return Materialized(components=components, embeddings=tokens, controlnets=controlnets)


def _materialize_generic(
    plan: BuildPlan, out: Path, fetched: Fetched, scratch: Path, adapters: dict[str, Fetched]
) -> Materialized:
    """A generic family (compiler.generic_build): loaded and saved as diffusers does, no cast after."""
    cls = pipeline_class(plan)  # before the load: a class without LoRA support fails first
    pipe = load_generic(plan, cls, snapshot(fetched, scratch))
    loras = [(lora, adapters[f"loras.{i}"]) for i, lora in enumerate(plan.loras)]
    built = build_generic(plan, cls, pipe, out, loras)
    pipe.save_pretrained(out / PIPELINE_DIR, safe_serialization=True)
    _drop_load_options(out / PIPELINE_DIR)
    log.info("materialized %s generically as %s (%s)", plan.base, plan.pipeline_class, plan.precision)
    components = {name: type(c).__name__ for name, c in pipe.components.items() if c is not None}
    return Materialized(components=components, embeddings=(), controlnets=(), generic=built)

"""The refiner of a recipe's `refiner:` built into the artifact's ``refiner/`` folder.

Loaded through the same loaders as a base (a builtin, ``from_pretrained`` of a diffusers folder,
``from_single_file`` with the refiner's config repo), given the recipe's `vae:` as the base got it
(worker-sdxl loads madebyollin's fp16-fix VAE into both), cast to the build's precision, saved.
A component whose saved files are the base's own bytes (SDXL base 1.0 and refiner 1.0 share their
OpenCLIP-G and VAE) is removed from ``refiner/`` and listed as shared: stored once, loaded once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from compiler import uri
from compiler.errors import UserError
from compiler.materialize import _drop_load_options, load_checkpoint, snapshot
from compiler.plan import BuildPlan
from compiler.recipe import REFINER_CONFIGS
from compiler.sources import Fetched
from compiler.tiny_models import BUILTINS
from runtime.artifact import PIPELINE_DIR, REFINER_DIR, TORCH_DTYPES, RefinerInfo

PIPELINE_CLASS = "StableDiffusionXLImg2ImgPipeline"
# What a refiner may share with its base, when the bytes are the same.
SHAREABLE = ("vae", "text_encoder_2", "tokenizer_2")
# Recorded by loaders, not part of what a component is.
_LOAD_KEYS = ("_name_or_path", "name_or_path", "is_local", "local_files_only")


def build_refiner(
    plan: BuildPlan, base: Any, inputs: dict[str, Fetched], scratch: Path, out: Path
) -> RefinerInfo | None:
    if plan.refiner is None:
        return None
    import torch

    dtype = getattr(torch, TORCH_DTYPES[plan.precision])
    scratch.mkdir(parents=True, exist_ok=True)
    refiner = _load(plan, inputs, scratch, dtype)
    where = f"recipe {plan.recipe}: refiner"
    if base.unet.config.in_channels != refiner.unet.config.in_channels or refiner.text_encoder_2 is None:
        raise UserError.one(
            where,
            f"this refiner does not fit the base (UNet input channels {refiner.unet.config.in_channels}, "
            f"the base's latents have {base.unet.config.in_channels})",
            "use an SDXL refiner (stabilityai/stable-diffusion-xl-refiner-1.0 or a fine-tune of it)",
        )
    if plan.vae is not None:
        refiner.register_modules(vae=base.vae)  # the recipe's VAE decodes the refined latents too
    refiner.to(dtype=dtype)
    if plan.vae_force_upcast:
        refiner.vae.register_to_config(force_upcast=True)
    folder = out / REFINER_DIR
    refiner.save_pretrained(folder, safe_serialization=True)
    _drop_load_options(folder)
    shared = tuple(name for name in SHAREABLE if _same(out / PIPELINE_DIR / name, folder / name))
    for name in shared:
        shutil.rmtree(folder / name)
    return RefinerInfo(path=REFINER_DIR, pipeline_class=PIPELINE_CLASS, mode=plan.refiner.mode, shared=shared)


def _load(plan: BuildPlan, inputs: dict[str, Fetched], scratch: Path, dtype: Any) -> Any:
    import diffusers

    assert plan.refiner is not None
    cls = getattr(diffusers, PIPELINE_CLASS)
    fetched = inputs["refiner"]
    if plan.refiner.single_file:
        pipe = load_checkpoint(cls, inputs[REFINER_CONFIGS], scratch, fetched, dtype)
    elif fetched.kind == "builtin":
        src = uri.parse(fetched.source)
        assert isinstance(src, uri.BuiltinSource)
        pipe = BUILTINS[src.name].build()
    else:
        folder = snapshot(fetched, scratch)
        pipe = cls.from_pretrained(folder, dtype=dtype, variant=plan.refiner.variant, use_safetensors=True)
    if type(pipe).__name__ != PIPELINE_CLASS:
        raise ValueError(f"{plan.refiner.pin} built {type(pipe).__name__}, the plan expects {PIPELINE_CLASS}")
    return pipe


def _same(a: Path, b: Path) -> bool:
    """Two saved component folders hold the same weights and the same settings (JSON compared
    without what loaders record about where they read from)."""
    if not a.is_dir() or not b.is_dir():
        return False
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    if names != sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()):
        return False
    for name in names:
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        if name.endswith(".json"):
            if _settings(x) != _settings(y):
                return False
        elif x != y:
            return False
    return True


def _settings(raw: bytes) -> Any:
    data = json.loads(raw)
    return {k: v for k, v in data.items() if k not in _LOAD_KEYS} if isinstance(data, dict) else data

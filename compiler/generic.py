"""Generic families: any diffusers pipeline class, served without a family entry. Pure: no torch.

A diffusers repo or folder whose ``model_index.json`` names a pipeline class that no family of
compiler.families serves, but that diffusers has, is the family ``generic:<PipelineClass>``. The
registry's families stay the fast paths (single files, detection, tuned defaults); a generic one
has what a plain ``DiffusionPipeline.from_pretrained(repo)`` has, and its request schema is read
from the pipeline class at build (compiler.introspect). What the plan cannot know without
importing torch (the pipeline's default steps, guidance and size; its other tasks; which
schedulers fit) the build reads from the class: the plan carries PIPELINE_OWN for those.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from compiler.errors import Problem
from compiler.families import FAMILIES, Family
from runtime.artifact import SCHEDULERS

PREFIX = "generic:"
# In a generic plan's defaults: "the pipeline's own, read at build" (a request size, step count or
# guidance is never 0 or negative, so the value cannot be a recipe's).
PIPELINE_OWN = 0
PIPELINE_OWN_GUIDANCE = -1.0
OWN_SCHEDULER = ""  # the base's own scheduler, whatever its class


def is_generic(family: str) -> bool:
    return family.startswith(PREFIX)


def pipeline_class_of(family: str) -> str:
    return family.removeprefix(PREFIX)


@lru_cache(maxsize=1)
def _diffusers_names() -> frozenset[str]:
    """The public names diffusers exports, read from its package's ``__init__.py`` as text: importing
    diffusers imports torch (seconds), which planning and a cache hit must not pay. diffusers lists
    every export as a string in its lazy-import table; the build checks the class for real."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or spec.origin is None:
        return frozenset()
    return frozenset(re.findall(r'"([A-Za-z0-9_]+Pipeline)"', Path(spec.origin).read_text()))


def diffusers_has(pipeline_class: str | None) -> bool:
    return bool(pipeline_class) and pipeline_class in _diffusers_names()


def family_id(pipeline_class: str) -> str:
    return PREFIX + pipeline_class


def generic_family(family: str) -> Family:
    """The Family entry of ``generic:<Class>``: txt2img by the class itself (the build adds the
    img2img/inpaint siblings it finds), every worker-sdxl scheduler name allowed at plan time (the
    build checks the base's ``scheduler.compatibles``), generous request bounds."""
    cls = pipeline_class_of(family)
    return Family(
        id=family,
        label=f"{cls} (generic)",
        pipelines={"txt2img": cls},
        config_repo="",
        native_size=(PIPELINE_OWN, PIPELINE_OWN),
        default_scheduler=OWN_SCHEDULER,
        default_steps=PIPELINE_OWN,
        default_guidance=PIPELINE_OWN_GUIDANCE,
        prediction="generic",
        vae_upcast_under_fp16=False,
        schedulers=(OWN_SCHEDULER, *SCHEDULERS),
        max_size=(2048, 2048),
        max_steps=200,
    )


def family_spec(family: str) -> Family:
    """The registry's family, or the generic one of a ``generic:<Class>`` id."""
    return generic_family(family) if is_generic(family) else FAMILIES[family]


# Recipe fields a generic family cannot honour yet, and why (each has a family-specific path).
_UNSUPPORTED = {
    "checkpoint": "single-file checkpoints need a family's converter and configs",
    "vae": "a replacement VAE file is converted with a family's configs",
    "embeddings": "textual-inversion loading is per family",
    "prediction": "the base's own scheduler config says what it predicts",
    "quantize": "build-time quantization is written for the families' denoisers",
}


def recipe_problems(where: str, family: Family, given: dict[str, bool], inputs: tuple[str, ...]) -> list[Problem]:
    """What a recipe on a generic base asks that it cannot have, and component folders that hold a
    model config but no weights (``from_pretrained`` would fail deep inside, after the download)."""
    out = [
        Problem(f"{where}: {field}", f"{family.label} does not support `{field}:` ({why})", f"remove `{field}:`")
        for field, why in _UNSUPPORTED.items()
        if given.get(field)
    ]
    folders: dict[str, set[str]] = {}
    for path in inputs:
        folder, _, name = path.rpartition("/")
        if folder:
            folders.setdefault(folder, set()).add(name)
    for folder, names in sorted(folders.items()):
        weights = any(n.endswith(".safetensors") or ".safetensors.index" in n for n in names)
        if "config.json" in names and not weights:
            out.append(
                Problem(
                    f"{where}: base",
                    f"component {folder!r} has a config.json but no .safetensors weights",
                    "add the component's weights (model.safetensors or diffusion_pytorch_model.safetensors), "
                    "or use a repo revision that has them",
                )
            )
    return out

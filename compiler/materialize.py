"""BuildPlan -> pipeline folder on disk (diffusers save_pretrained layout, safetensors only).

The only compiler stage that imports torch and diffusers; everything before it is pure, so a
cache hit never pays for them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from compiler.builtins import BUILTINS
from compiler.plan import BuildPlan
from runtime.artifact import PIPELINE_DIR, SCHEDULERS

log = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def load_base(pin: str) -> Any:
    scheme, _, rest = pin.partition(":")
    if scheme == "builtin":
        return BUILTINS[rest.partition("@")[0]].build()
    raise ValueError(f"no materializer for pin {pin!r}")  # the resolver only pins what we can load


def materialize(plan: BuildPlan, out: Path) -> dict[str, str]:
    """Build the plan's pipeline and save it under ``out/pipeline``. Returns component classes."""
    import diffusers
    import torch

    pipe = load_base(plan.base)
    if type(pipe).__name__ != plan.pipeline_class:
        raise ValueError(f"{plan.base} built {type(pipe).__name__}, the plan expects {plan.pipeline_class}")
    # The base's own scheduler config is kept as it is: the runtime derives the recipe's default
    # scheduler and every per-request one from it, as a plain diffusers user would
    # (`EulerDiscreteScheduler.from_config(pipe.scheduler.config)`). Converting here and again per
    # request would chain conversions, and each one fills in defaults of its own.
    getattr(diffusers, SCHEDULERS[plan.scheduler])  # the name maps to a class of this diffusers
    pipe.to(dtype=getattr(torch, DTYPES[plan.precision]))
    pipe.save_pretrained(out / PIPELINE_DIR, safe_serialization=True)
    log.info("materialized %s (%s, %s)", plan.base, plan.precision, plan.scheduler)
    return {name: type(c).__name__ for name, c in pipe.components.items() if c is not None}

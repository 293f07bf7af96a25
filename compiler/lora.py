"""LoRAs fused into a pipeline's weights at build time, through diffusers' own loaders (kohya,
PEFT/diffusers, and the LyCORIS and FLUX formats diffusers converts), with the check diffusers
does not make: every module a file names must land on a module of the model.

diffusers skips what it cannot map in some formats (LoHa/LoKr on FLUX, DoRA scales, BFL-PEFT
names) and warns at most; an artifact that silently lacks half a LoRA is worse than an error.
So the modules a file names are counted from its keys and compared with the modules that
actually received the adapter.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from compiler.errors import UserError
from compiler.plan import PlannedLora
from compiler.sources import Fetched

log = logging.getLogger(__name__)

# The key endings that mark one module's low-rank "down" factor, per format; each module has one.
_DOWN = re.compile(
    r"(\.lora_down\.weight|\.lora_A\.weight|\.lora_A\.[^.]+\.weight|\.lora\.down\.weight|\.hada_w1_b|\.lokr_w1|"
    r"\.lokr_w1_a)$"
)


def file_modules(keys: list[str]) -> list[str]:
    """The modules a LoRA file patches, by the names it uses (one per down factor)."""
    return sorted({_DOWN.sub("", k) for k in keys if _DOWN.search(k)})


def patched_modules(pipe: Any, adapter: str) -> list[str]:
    """The modules of every pipeline component that hold ``adapter`` (PEFT tuner layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = []
    for comp_name, comp in pipe.components.items():
        if not hasattr(comp, "named_modules"):
            continue
        for name, module in comp.named_modules():
            if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {}):
                out.append(f"{comp_name}.{name}")
    return out


def fuse_loras(pipe: Any, loras: list[tuple[PlannedLora, Fetched]]) -> None:
    """Load each LoRA as a named adapter, check it landed whole, then bake all of them into the
    weights at their scales (W + scale·(alpha/rank)·up·down each) and drop the adapter layers."""
    if not loras:
        return
    from safetensors.torch import load_file

    for lora, fetched in loras:
        where = f"loras: {lora.name}"
        (path,) = fetched.files.values()
        state = load_file(path)
        named = file_modules(list(state))
        if not named:
            raise UserError.one(where, "no LoRA factors in this file", "check that it is a LoRA")
        try:
            pipe.load_lora_weights(state, adapter_name=lora.name)
        except (ValueError, KeyError, RuntimeError) as e:  # diffusers' format and shape errors
            first = str(e).splitlines()[0][:400]
            raise UserError.one(
                where,
                f"diffusers cannot apply this LoRA to the base: {first}",
                "a LoRA fits the family (and the architecture) it was trained on: check the base",
            ) from None
        got = patched_modules(pipe, lora.name)
        if not got:
            raise UserError.one(
                where,
                f"the file names {len(named)} modules (e.g. {named[0]}) and none of them exists in the base",
                "a LoRA for another model or an unsupported naming; `python -m compiler.detect FILE` shows what it is",
            )
        if len(got) < len(named):
            raise UserError.one(
                where,
                f"only {len(got)} of the {len(named)} modules the file names were patched; "
                f"{len(named) - len(got)} would be silently left out",
                "diffusers cannot map part of this format onto the base; a partial LoRA is refused",
            )
        log.info("lora %s: %d modules, scale %g", lora.name, len(got), lora.scale)
    names = [lora.name for lora, _ in loras]
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora, _ in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()

"""LoRAs fused into a pipeline's weights at build time, through diffusers' own loaders (kohya,
PEFT/diffusers, and the LyCORIS and FLUX formats diffusers converts), with the check diffusers
does not make: every module a file names must land on a module of the model.

diffusers skips what it cannot map in some formats and warns at most (LoHa/LoKr, T5 and unknown
modules of kohya FLUX files, blocks the base lacks, the kohya half of a mixed file, BFL-PEFT
names); an artifact that silently lacks half a LoRA is worse than an error. Counting is not
enough: one file module may become several model modules (a kohya FLUX ``qkv`` becomes to_q, to_k
and to_v), so a count would let a dropped module hide behind a split one. Each LoRA is therefore
loaded twice: first a *probe*, the file with every module's down factor replaced by a tag that
names the module and survives diffusers' conversions, which tells for each patched model module
which file module it came from; then the file itself.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compiler.errors import UserError
from compiler.finite import require_finite
from compiler.plan import PlannedLora
from compiler.sources import Fetched
from runtime.artifact import LORA_DIR

log = logging.getLogger(__name__)

# The key endings that mark one module's low-rank "down" factor, per format; each module has one.
_DOWN = re.compile(
    r"(\.lora_down\.weight|\.lora_A\.weight|\.lora_A\.[^.]+\.weight|\.lora\.down\.weight|\.hada_w1_b|\.lokr_w1|"
    r"\.lokr_w1_a)$"
)
# What diffusers and PEFT raise on a file they cannot map: format errors, missing keys, shapes its
# converters assert (kohya FLUX's fused single-block projection assumes FLUX.1's full widths).
_CANNOT_APPLY = (ValueError, KeyError, RuntimeError, AssertionError, NotImplementedError, IndexError)
_LYCORIS = re.compile(r"\.(hada|lokr)_w[12](_[ab])?$")
_PROBE = "uiw_landing_probe"


def file_modules(keys: list[str]) -> list[str]:
    """The modules a LoRA file patches, by the names it uses (one per down factor)."""
    return sorted({_DOWN.sub("", k) for k in keys if _DOWN.search(k)})


def _tuner_layers(pipe: Any, adapter: str) -> Iterator[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for comp_name, comp in pipe.components.items():
        if not hasattr(comp, "named_modules"):
            continue
        for name, module in comp.named_modules():
            if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {}):
                yield f"{comp_name}.{name}", module


def patched_modules(pipe: Any, adapter: str) -> list[str]:
    """The modules of every pipeline component that hold ``adapter`` (PEFT tuner layers)."""
    return [name for name, _ in _tuner_layers(pipe, adapter)]


# The probe's tag: every row of module i's down factor (flattened) reads [1, d0+1, d1+1, …, 1, 1, …]
# with d the base-16 digits of i. Converters scale a down factor (alpha/rank), copy it or chunk
# it along the rank into the modules a fused one splits into; none of that changes the ratios to
# the first entry, and digits + 1 ≤ 16 stay exact (to well within the tolerance) in fp16 and bf16.
def _digits(n_modules: int) -> int:
    return max(1, (max(n_modules - 1, 0).bit_length() + 3) // 4)


def _tagged(i: int, like: Any, digits: int) -> Any:
    import torch

    width = like[0].numel() if like.dim() else 0
    if width < digits + 1:
        return like  # too small to tag (no LoRA factor of a real model is): it cannot be attributed
    row = torch.ones(width)
    for j in range(digits):
        row[1 + j] = ((i >> (4 * j)) & 15) + 1
    return row.to(like.dtype).repeat(like.shape[0], 1).reshape(like.shape)


def _origin(weight: Any, digits: int) -> int | None:
    """Which file module a patched module's lora_A was converted from (None: not from the probe)."""
    import torch

    row = weight.detach()[0].reshape(-1).float().cpu()
    if row.numel() < digits + 1 or row[0] == 0:
        return None
    ratios = row / row[0]
    tag = torch.ones_like(ratios)
    tag[1 : 1 + digits] = ratios[1 : 1 + digits].round().clamp(1, 16)
    if not torch.allclose(ratios, tag, rtol=0.02, atol=0.02):
        return None
    return sum((int(d) - 1) << (4 * j) for j, d in enumerate(tag[1 : 1 + digits].tolist()))


def probe_state(state: dict[str, Any], named: list[str]) -> dict[str, Any]:
    """The file with each module's down factor replaced by its tag (everything else as it is, so
    that diffusers takes the same conversion path)."""
    index = {m: i for i, m in enumerate(named)}
    digits = _digits(len(named))
    return {k: _tagged(index[_DOWN.sub("", k)], v, digits) if _DOWN.search(k) else v for k, v in state.items()}


def landed_modules(pipe: Any, adapter: str, named: list[str]) -> dict[str, list[str]]:
    """For a loaded probe: each file module that landed -> the model modules it patched."""
    digits = _digits(len(named))
    out: dict[str, list[str]] = {}
    for name, module in _tuner_layers(pipe, adapter):
        i = _origin(module.lora_A[adapter].weight, digits)
        if i is not None and i < len(named):
            out.setdefault(named[i], []).append(name)
    return out


def _flux_kohya(pipe: Any, state: dict[str, Any]) -> dict[str, Any] | None:
    """A kohya FLUX file (BFL module names) converted to the diffusers names diffusers 0.42 loads,
    with two of its conversion's slips put right; None for another pipeline or format.

    - It names the modules outside the blocks (x_embedder, context_embedder, time_text_embed.*,
      norm_out.linear, proj_out) without the ``transformer.`` prefix, and its own loader then
      drops them silently: the prefix is put back.
    - It ignores the alpha of the final layer's modules (final_layer_*, applied at alpha = rank):
      every alpha is folded into its module's down factor (down·alpha/rank) before the conversion,
      which then has no alpha left to miss.
    """
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    if not issubclass(type(pipe), FluxLoraLoaderMixin) or not any(k.endswith(".lora_down.weight") for k in state):
        return None
    folded = {}
    for k, v in state.items():
        module = k.rsplit(".", 2)[0] if k.endswith(".lora_down.weight") else None
        if k.endswith(".alpha") and f"{k[: -len('.alpha')]}.lora_down.weight" in state:
            continue
        if module is not None and f"{module}.alpha" in state:
            v = (v.float() * (float(state[f"{module}.alpha"]) / v.shape[0])).to(v.dtype)
        folded[k] = v
    converted = type(pipe).lora_state_dict(folded)
    prefixes = tuple(f"{c}." for c in pipe.components)
    return {k if k.startswith(prefixes) else f"transformer.{k}": v for k, v in converted.items()}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers' and PEFT's messages about the probe (the real load repeats what matters)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(level)


def _cannot_apply(where: str, e: BaseException) -> UserError:
    first = " ".join(str(e).split())[:400]  # some messages put the keys on the following lines
    if isinstance(e, KeyError):
        first = f"KeyError {first}"
    elif not first:
        first = f"{type(e).__name__} in diffusers' conversion (shapes it does not expect)"
    return UserError.one(
        where,
        f"diffusers cannot apply this LoRA to the base: {first}",
        "a LoRA fits the family (and the architecture) it was trained on: check the base",
    )


def _partial(where: str, state: dict[str, Any], named: list[str], missing: list[str]) -> UserError:
    lycoris = sorted({_DOWN.sub("", k) for k in state if _LYCORIS.search(k)} & set(missing))
    if lycoris:
        return UserError.one(
            where,
            f"{len(lycoris)} of the {len(named)} modules the file names are LyCORIS LoHa/LoKr (e.g. {lycoris[0]}), "
            f"which diffusers does not apply to this base; {len(missing)} would be left out",
            "use a plain LoRA (kohya or PEFT) of this model, or merge the LyCORIS file into a checkpoint",
        )
    if len(missing) == len(named):
        return UserError.one(
            where,
            f"the file names {len(named)} modules (e.g. {named[0]}) and none of them exists in the base",
            "a LoRA for another model or an unsupported naming; `python -m compiler.detect FILE` shows what it is",
        )
    return UserError.one(
        where,
        f"only {len(named) - len(missing)} of the {len(named)} modules the file names were patched; "
        f"{len(missing)} would be silently left out (e.g. {', '.join(missing[:3])})",
        "diffusers cannot map part of this format onto the base; a partial LoRA is refused",
    )


def load_checked(pipe: Any, path: Path, adapter: str, where: str) -> list[str]:
    """Load one LoRA file as ``adapter``, refusing it unless every module it names lands.
    Returns the model modules patched."""
    from safetensors.torch import load_file

    state = load_file(path)
    require_finite(state.items(), where, "LoRA")
    named = file_modules(list(state))
    if not named:
        raise UserError.one(where, "no LoRA factors in this file", "check that it is a LoRA")
    dora = sorted(k for k in state if k.endswith(".dora_scale"))
    if dora:
        raise UserError.one(
            where,
            f"a DoRA file ({len(dora)} dora_scale keys, e.g. {dora[0]}): diffusers drops the magnitudes "
            "and would apply a different LoRA",
            "export it as a plain LoRA (or merge it into a checkpoint) with the tool that trained it",
        )
    try:
        probe = probe_state(state, named)
        with _quiet():
            pipe.load_lora_weights(_flux_kohya(pipe, probe) or probe, adapter_name=_PROBE)
            landed = landed_modules(pipe, _PROBE, named)
            pipe.delete_adapters(_PROBE)
        # The file itself where diffusers can read it as a file: PEFT files keep their alpha in the
        # header (lora_adapter_metadata), which a state dict passed in memory loses.
        pipe.load_lora_weights(_flux_kohya(pipe, state) or str(path), adapter_name=adapter, use_safetensors=True)
    except _CANNOT_APPLY as e:  # diffusers' format and shape errors
        raise _cannot_apply(where, e) from None
    got = patched_modules(pipe, adapter)
    # A file module landed when the probe reached the model through it and the file itself reached
    # the same modules (a header's target_modules could differ from its keys).
    missing = [m for m in named if not landed.get(m) or not set(landed[m]) <= set(got)]
    if missing:
        if got:
            pipe.delete_adapters(adapter)
        raise _partial(where, state, named, missing)
    log.info("%s: %d file modules onto %d model modules", where, len(named), len(got))
    return got


# The components whose layers a LoRA's shapes are checked against before the build. FLUX's and
# SD3's transformers are left to the build: diffusers widens a FLUX base's input layer for Control
# LoRAs, so a wider factor there is not an error.
SHAPE_CHECKED = ("unet", "text_encoder", "text_encoder_2")


def base_shapes(pipe_like: Any) -> dict[str, tuple[int, ...]]:
    """ "component.module.weight" -> shape for every SHAPE_CHECKED component of a pipeline whose
    parameters may live on the meta device."""
    out: dict[str, tuple[int, ...]] = {}
    for comp in SHAPE_CHECKED:
        model = pipe_like.get(comp) if isinstance(pipe_like, dict) else getattr(pipe_like, comp, None)
        if model is not None and hasattr(model, "state_dict"):
            out.update({f"{comp}.{k}": tuple(v.shape) for k, v in model.state_dict().items()})
    return out


def meta_components(folder: Path) -> dict[str, Any]:
    """The SHAPE_CHECKED components of a diffusers folder (model_index.json + configs), built from
    their configs with every parameter on the meta device: shapes without reading or allocating a
    weight (SDXL's UNet and both text encoders: 1.4 s on one core here)."""
    import importlib
    import json

    from accelerate import init_empty_weights

    index = json.loads((folder / "model_index.json").read_text())
    out = {}
    for comp in SHAPE_CHECKED:
        entry = index.get(comp)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in ("diffusers", "transformers")):
            continue
        cls = getattr(importlib.import_module(entry[0]), entry[1], None)
        if cls is None or not (folder / comp / "config.json").is_file():
            continue
        with init_empty_weights():
            if entry[0] == "diffusers":
                out[comp] = cls.from_config(cls.load_config(folder / comp))
            else:
                out[comp] = cls(cls.config_class.from_pretrained(folder / comp))
    return out


def check_fit(loras: list[tuple[PlannedLora, Fetched]], shapes: dict[str, tuple[int, ...]], family: str) -> None:
    """Every LoRA's factors against the base's layer shapes, from the files' headers: a LoRA of
    another model fails here, naming the module, before the base is built."""
    from compiler.detect import detect
    from compiler.headers import read_header
    from compiler.validate import check_lora_shapes

    for lora, fetched in loras:
        (path,) = fetched.files.values()
        keys, meta = read_header(path)
        check_lora_shapes(
            {k: shape for k, (shape, _) in keys.items()}, shapes, family, detect(keys, meta), f"loras: {lora.name}"
        )


def apply_loras(pipe: Any, loras: list[tuple[PlannedLora, Fetched]], out: Path) -> None:
    """Load every LoRA as an adapter and check it landed whole; bake the ``fuse`` ones into the
    weights at their scales (W + scale·(alpha/rank)·up·down each); copy the others' files into
    the artifact (``loras/NAME.safetensors``) for the runtime to apply to the requests that name
    them. The saved pipeline holds no adapter layers either way."""
    if not loras:
        return
    from safetensors.torch import load_file, save_file

    # Adapter names of our own: a user's name may clash with a torch.nn.Module attribute (a LoRA
    # named "half" or "to" breaks PEFT's ModuleDict).
    names = [f"uiw_lora_{i}" for i in range(len(loras))]
    for adapter, (lora, fetched) in zip(names, loras, strict=True):
        (path,) = fetched.files.values()
        load_checked(pipe, path, adapter, f"loras: {lora.name}")
        log.info("lora %s: scale %g, %s", lora.name, lora.scale, "fused" if lora.fuse else "switchable")
        if not lora.fuse:
            dest = out / LORA_DIR / f"{lora.name}.safetensors"
            dest.parent.mkdir(parents=True, exist_ok=True)
            # What the runtime loads must be what was checked: a kohya FLUX file is stored as
            # converted here (prefixes and alphas diffusers' own conversion drops), others as given.
            converted = _flux_kohya(pipe, load_file(path))
            if converted is not None:
                save_file({k: v.contiguous() for k, v in converted.items()}, str(dest))
            else:
                shutil.copyfile(path, dest)
    fused = [(adapter, lora) for adapter, (lora, _) in zip(names, loras, strict=True) if lora.fuse]
    if fused:
        pipe.set_adapters([a for a, _ in fused], adapter_weights=[lora.scale for _, lora in fused])
        # Every component that can hold a LoRA: FLUX's fuse_lora fuses only the transformer by
        # default, and unload_lora_weights would then drop a text-encoder part unfused.
        pipe.fuse_lora(
            components=list(pipe._lora_loadable_modules), adapter_names=[a for a, _ in fused], lora_scale=1.0
        )
    pipe.unload_lora_weights()

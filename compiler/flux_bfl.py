"""FLUX transformers in Black Forest Labs naming, converted by diffusers' own converter at the
file's own widths.

diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` splits each single block's fused
``linear1`` (q, k, v and the MLP input) at FLUX.1's widths, written into the function (inner width
3072, MLP 12288), so a FLUX of any other width stops there ("split_with_sizes expects split_sizes
to sum exactly to ..."). Here that one split is done at the widths the file has (``img_in``'s
output is the inner width, the rest of ``linear1`` the MLP's); everything else is diffusers'
converter, handed a meta stand-in of FLUX.1's size for each ``linear1`` whose (meta) pieces are
then replaced by ours. At FLUX.1's widths the result is exactly diffusers' own.

The converter ignores keys it does not know. A file with more than a FLUX transformer's weights
under the transformer's names (ComfyUI's "scaled fp8" files carry a ``scale_weight`` per layer,
without which the fp8 numbers are not the weights) is refused here instead of being upcast
without its scales.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

COMFY_PREFIX = "model.diffusion_model."
_MARKER = re.compile(r"^(model\.diffusion_model\.)?double_blocks\.0\.img_attn\.qkv\.weight$")
_LINEAR1 = re.compile(r"^single_blocks\.(\d+)\.linear1\.(weight|bias)$")
FLUX1_LINEAR1_ROWS = 3 * 3072 + 4 * 3072  # what diffusers' converter splits: q, k, v, MLP


def bfl_prefix(keys: list[str]) -> str | None:
    """ "" for a bare BFL transformer, ``model.diffusion_model.`` for ComfyUI's layout, None for a
    file without FLUX's BFL blocks (diffusers naming, another model)."""
    for key in keys:
        if m := _MARKER.match(key):
            return m.group(1) or ""
    return None


def is_bfl_file(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return bfl_prefix(list(f.keys())) is not None


def read_transformer(path: Path) -> dict[str, Any]:
    """The transformer's tensors of a BFL file, in BFL names without the ComfyUI prefix; the text
    encoders and VAE beside them in an all-in-one file are not read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        prefix = bfl_prefix(keys)
        if prefix is None:
            raise ValueError("no FLUX transformer in BFL naming (double_blocks.0.img_attn.qkv.weight) in this file")
        if prefix:
            return {k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
        # A bare file is the transformer alone: every key is taken, so that extras are seen.
        return {k: f.get_tensor(k) for k in keys}


def to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """BFL names -> diffusers names (diffusers' converter, the single blocks split at the file's
    widths). ValueError if the file's tensors do not make a FLUX transformer: a ``linear1`` too
    narrow to split, or keys left over that the converter did not take."""
    import torch
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    if "img_in.weight" not in state:
        raise ValueError("img_in.weight is missing: not a whole FLUX transformer")
    inner = state["img_in.weight"].shape[0]
    state = dict(state)  # the converter pops what it takes
    ours: dict[str, Any] = {}
    for key in [k for k in state if _LINEAR1.match(k)]:
        index, kind = _LINEAR1.match(key).groups()  # type: ignore[union-attr]
        fused = state[key]
        mlp = fused.shape[0] - 3 * inner
        if mlp <= 0:
            raise ValueError(f"{key} has {fused.shape[0]} rows, not q, k, v of width {inner} plus an MLP")
        q, k, v, m = torch.split(fused, [inner, inner, inner, mlp], dim=0)
        block = f"single_transformer_blocks.{index}."
        for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", m)):
            ours[f"{block}{name}.{kind}"] = part.clone()
        state[key] = torch.empty((FLUX1_LINEAR1_ROWS, *fused.shape[1:]), dtype=fused.dtype, device="meta")
    try:
        converted = convert_flux_transformer_checkpoint_to_diffusers(state)
    except KeyError as e:
        raise ValueError(f"{e.args[0]} is missing: not a whole FLUX transformer") from None
    if state:
        left = sorted(state)
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise ValueError(
            f"{len(left)} tensors are not FLUX transformer weights: {', '.join(left[:3])}{more} "
            "(a scaled-fp8 file keeps per-layer scales the weights are meaningless without)"
        )
    converted.update(ours)
    return converted


def load_transformer(cls: Any, path: Path, config: str, subfolder: str | None, dtype: Any) -> Any:
    """``cls.from_single_file`` of the file's transformer, converted here (diffusers' loader then
    finds diffusers names and converts nothing), cast to ``dtype`` as it loads."""
    converted = to_diffusers(read_transformer(path))
    expected = _expected_keys(cls, config, subfolder)
    missing, extra = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or extra:
        raise ValueError(
            f"the file's FLUX transformer does not match the configuration: missing {missing[:3] or 'none'}, "
            f"unexpected {extra[:3] or 'none'} (a dev file has guidance_in, a schnell file has none)"
        )
    return cls.from_single_file(converted, config=config, subfolder=subfolder, torch_dtype=dtype, local_files_only=True)


def _expected_keys(cls: Any, config: str, subfolder: str | None) -> set[str]:
    import torch

    with torch.device("meta"):
        model = cls.from_config(cls.load_config(config, subfolder=subfolder, local_files_only=True))
    return set(model.state_dict())


def preloaded(pipeline_cls: Any, path: Path, config: str, dtype: Any) -> dict[str, Any]:
    """For a whole-pipeline file: ``{"transformer": model}`` when the pipeline's transformer is
    FLUX's and the file holds it in BFL naming (the pipeline loader then takes it as given),
    else ``{}`` (diffusers' pipeline loader converts everything)."""
    import json

    index = json.loads((Path(config) / "model_index.json").read_text())
    if index.get("transformer", [None, None])[1] != "FluxTransformer2DModel" or not is_bfl_file(path):
        return {}
    import diffusers

    cls = diffusers.FluxTransformer2DModel
    return {"transformer": load_transformer(cls, path, config, "transformer", dtype)}

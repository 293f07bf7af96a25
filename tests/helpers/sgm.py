"""diffusers SDXL pipeline -> the original (Stability's generative-models, "SGM") single-file layout.

The test-side inverse of diffusers' single-file conversion for SDXL (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``
in ``diffusers.loaders.single_file_utils``), which diffusers does not ship. The UNet and VAE keep
the LDM names (tests/helpers/ldm.py does those); SGM differs in its text encoders, which sit under
``conditioner.embedders.N``:

- base: ``0.transformer.text_model.*`` is CLIP-L in transformers naming, ``1.model.*`` is OpenCLIP-G
  in open_clip naming (fused q/k/v ``in_proj``, ``resblocks``, ``c_fc``/``c_proj``, and
  ``text_projection`` stored transposed, as open_clip multiplies ``x @ text_projection``);
- refiner: OpenCLIP-G alone, as ``0.model.*``.
"""

from __future__ import annotations

import re
from typing import Any

from tests.helpers.ldm import clip_to_ldm, unet_to_ldm, vae_to_ldm

EMBEDDERS = "conditioner.embedders."
CLIP_L_PREFIX = EMBEDDERS + "0.transformer."

# transformers CLIP layer part -> open_clip resblock part (diffusers' DIFFUSERS_TO_LDM_MAPPING["openclip"])
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def open_clip_to_sgm(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A CLIPTextModelWithProjection's state dict in open_clip naming under ``prefix``."""
    import torch

    out: dict[str, Any] = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}  # (resblock, weight|bias) -> {q, k, v}
    for key, value in state.items():
        if key == "text_projection.weight":  # nn.Linear's (out, in); open_clip's is (in, out)
            out[prefix + "text_projection"] = value.T
            continue
        rest = key.removeprefix("text_model.")
        if rest == "embeddings.position_ids":  # a buffer, not a weight: open_clip has none
            continue
        if rest in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[rest]] = value
            continue
        layer, sep, part = rest.partition(".layers.")
        assert layer == "encoder" and sep, f"unexpected CLIP key {key}"
        index, _, part = part.partition(".")
        block = f"{prefix}transformer.resblocks.{index}."
        if m := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", part):
            qkv.setdefault((block, m.group(2)), {})[m.group(1)] = value
            continue
        for hf, oc in _OPEN_CLIP_LAYER.items():
            if part.startswith(hf):
                out[block + oc + part[len(hf) :]] = value
                break
        else:
            raise AssertionError(f"unexpected CLIP key {key}")
    for (block, kind), parts in qkv.items():  # open_clip's nn.MultiheadAttention: q, k, v stacked
        out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def clip_l_to_sgm(state: dict[str, Any]) -> dict[str, Any]:
    return clip_to_ldm(state, CLIP_L_PREFIX)


def pipeline_to_sgm(pipe: Any) -> dict[str, Any]:
    """A whole SDXL pipeline as one SGM-layout state dict (contiguous CPU tensors). A pipeline
    without ``text_encoder`` (the refiner) puts OpenCLIP-G first, as the refiner's file does."""
    state = {
        **unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)),
        **vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)),
    }
    base = getattr(pipe, "text_encoder", None) is not None
    if base:
        state.update(clip_l_to_sgm(pipe.text_encoder.state_dict()))
    state.update(open_clip_to_sgm(pipe.text_encoder_2.state_dict(), f"{EMBEDDERS}{1 if base else 0}.model."))
    return {k: v.detach().contiguous().clone() for k, v in state.items()}

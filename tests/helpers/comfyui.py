"""diffusers SD 3 / 3.5 pipeline -> the ComfyUI all-in-one single-file layout.

The test-side inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint`` and ``convert_sd3_t5_checkpoint_to_diffusers`` (diffusers ships the
forward direction only), with the names of tests/fixtures/model-keys/sd3-comfyui.yaml:

- the MMDiT under ``model.diffusion_model.``: ``joint_blocks.N.{x_block,context_block}`` with fused
  ``attn.qkv``, ``attn.proj``, ``adaLN_modulation.1``, ``mlp.fc1/fc2`` (SD 3.5 Medium adds
  ``x_block.attn2``, SD 3.5 the ``ln_q``/``ln_k`` norms); the last block's context stream keeps only
  its modulation, and the final modulations store (shift, scale) where diffusers has (scale, shift);
- the VAE under ``first_stage_model.`` (LDM names, tests/helpers/ldm.py);
- the text encoders under ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` in transformers
  naming (T5 without its tied ``encoder.embed_tokens``).
"""

from __future__ import annotations

import re
from typing import Any

from tests.helpers.ldm import vae_to_ldm

PREFIX = "model.diffusion_model."
_TOP = {
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj.": "x_embedder.proj.",
    "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
    "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
    "context_embedder.": "context_embedder.",
    "proj_out.": "final_layer.linear.",
}
# diffusers' block part -> ComfyUI's (the q/k/v projections are fused separately)
_BLOCK = {
    "attn.norm_q.": "x_block.attn.ln_q.",
    "attn.norm_k.": "x_block.attn.ln_k.",
    "attn.norm_added_q.": "context_block.attn.ln_q.",
    "attn.norm_added_k.": "context_block.attn.ln_k.",
    "attn.to_out.0.": "x_block.attn.proj.",
    "attn.to_add_out.": "context_block.attn.proj.",
    "attn2.norm_q.": "x_block.attn2.ln_q.",
    "attn2.norm_k.": "x_block.attn2.ln_k.",
    "attn2.to_out.0.": "x_block.attn2.proj.",
    "norm1.linear.": "x_block.adaLN_modulation.1.",
    "norm1_context.linear.": "context_block.adaLN_modulation.1.",
    "ff.net.0.proj.": "x_block.mlp.fc1.",
    "ff.net.2.": "x_block.mlp.fc2.",
    "ff_context.net.0.proj.": "context_block.mlp.fc1.",
    "ff_context.net.2.": "context_block.mlp.fc2.",
}
# the separate q/k/v projections ComfyUI fuses into one qkv: (attention, to_ or add_) -> its name
_QKV_PART = re.compile(r"(attn2?)\.(to|add)_([qkv])(?:_proj)?\.(weight|bias)")
_QKV = {
    ("attn", "to"): "x_block.attn.qkv",
    ("attn", "add"): "context_block.attn.qkv",
    ("attn2", "to"): "x_block.attn2.qkv",
}


def _swap(value: Any) -> Any:
    """(scale, shift) <-> (shift, scale): diffusers' swap_scale_shift is its own inverse."""
    import torch

    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_comfyui(state: dict[str, Any], num_layers: int) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    fused: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in state.items():
        top = next((t for t in _TOP if key.startswith(t)), None)
        if top is not None:
            out[PREFIX + _TOP[top] + key[len(top) :]] = value
            continue
        if key.startswith("norm_out.linear."):
            out[PREFIX + "final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = _swap(value)
            continue
        _, index, part = key.split(".", 2)
        block = f"{PREFIX}joint_blocks.{index}."
        last = int(index) == num_layers - 1
        if m := _QKV_PART.fullmatch(part):
            attn, stream, which, kind = m.groups()
            fused.setdefault((block + _QKV[(attn, stream)], kind), {})[which] = value
            continue
        hf = next((h for h in _BLOCK if part.startswith(h)), None)
        assert hf is not None, f"unexpected SD3 transformer key {key}"
        if last and hf == "norm1_context.linear.":
            value = _swap(value)
        out[block + _BLOCK[hf] + part[len(hf) :]] = value
    for (name, kind), parts in fused.items():
        out[f"{name}.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def pipeline_to_comfyui(pipe: Any, t5: bool = True) -> dict[str, Any]:
    """A whole SD 3 pipeline as one ComfyUI-layout state dict (contiguous CPU tensors); ``t5``
    False: the "incl_clips" files that leave T5 out."""
    te = "text_encoders."
    state = {
        **transformer_to_comfyui(pipe.transformer.state_dict(), pipe.transformer.config.num_layers),
        **vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)),
        **{f"{te}clip_l.transformer.{k}": v for k, v in pipe.text_encoder.state_dict().items()},
        **{f"{te}clip_g.transformer.{k}": v for k, v in pipe.text_encoder_2.state_dict().items()},
    }
    if t5:
        for k, v in pipe.text_encoder_3.state_dict().items():
            if k != "encoder.embed_tokens.weight":  # tied to shared.weight; the real files store it once
                state[f"{te}t5xxl.transformer.{k}"] = v
    return {k: v.detach().contiguous().clone() for k, v in state.items()}

"""diffusers SD 1.x pipeline -> the original (LDM / A1111 / CivitAI) single-file key layout.

The test-side inverse of diffusers' ``convert_ldm_*_checkpoint``, written from the key tables of
diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py`` and generalised to any
block count and ``layers_per_block`` (the tiny builtin keeps SD 1.5's topology at a smaller width).
The UNet and VAE maps serve SDXL's SGM layout too (tests/helpers/sgm.py), which shares them.
Tests turn a known pipeline into a CivitAI-style checkpoint with it, so a single-file compile can
be compared against the pipeline it came from.
"""

from __future__ import annotations

from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    # SDXL's ADM input (pooled text + size conditioning); SD 1.x has none
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
}
_UNET_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def _unet_prefixes(config: dict[str, Any]) -> list[tuple[str, str]]:
    n = len(config["block_out_channels"])
    per = config["layers_per_block"]
    out = []
    for i in range(n):
        for j in range(per):
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.0."))
            out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.1."))
        for j in range(per + 1):
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(per + 1) * i + j}.0."))
            out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(per + 1) * i + j}.1."))
        if i < n - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op."))
            has_attn = config["up_block_types"][i].startswith("CrossAttn")
            out.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per + 1) * i + per}.{2 if has_attn else 1}."))
    out.append(("mid_block.attentions.0.", "middle_block.1."))
    out += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    return out


def unet_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    prefixes = _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        new = key
        for hf, sd in _UNET_TOP.items():
            if new.startswith(hf):
                new = sd + new[len(hf) :]
        for hf, sd in prefixes:
            if new.startswith(hf):
                rest = new[len(hf) :]
                if "resnets" in hf:
                    for a, b in _UNET_RESNET:
                        rest = rest.replace(a + ".", b + ".", 1) if rest.startswith(a + ".") else rest
                new = sd + rest
                break
        out[UNET_PREFIX + new] = value
    return out


def vae_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    n = len(config["block_out_channels"])
    per = config["layers_per_block"]
    prefixes = []
    for i in range(n):
        for j in range(per):
            prefixes.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        for j in range(per + 1):
            prefixes.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}."))
        if i < n - 1:
            prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
        prefixes.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
        prefixes.append((f"{part}.conv_norm_out.", f"{part}.norm_out."))
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    out = {}
    for key, value in state.items():
        new = key
        for hf, sd in prefixes:
            if new.startswith(hf):
                rest = new[len(hf) :]
                if "attentions" in hf:
                    for a, b in attn.items():
                        if rest.startswith(a):
                            rest = b + rest[len(a) :]
                            if value.ndim == 2:  # LDM keeps attention projections as 1x1 convs
                                value = value[:, :, None, None]
                elif rest.startswith("conv_shortcut."):
                    rest = "nin_shortcut." + rest[len("conv_shortcut.") :]
                new = sd + rest
                break
        out[VAE_PREFIX + new] = value
    return out


def clip_to_ldm(state: dict[str, Any], prefix: str = CLIP_PREFIX) -> dict[str, Any]:
    """A transformers CLIPTextModel in transformers naming under ``prefix`` (SDXL's CLIP-L too)."""
    out = {}
    for key, value in state.items():
        rest = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + rest] = value
    return out


def pipeline_to_ldm(pipe: Any) -> dict[str, Any]:
    """A whole StableDiffusionPipeline as one LDM-layout state dict (contiguous CPU tensors)."""
    state = {
        **unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)),
        **vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)),
        **clip_to_ldm(pipe.text_encoder.state_dict()),
    }
    return {k: v.detach().contiguous().clone() for k, v in state.items()}

"""diffusers FLUX.1 -> the original Black Forest Labs single-file layouts.

The test-side inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` (and, for
the all-in-one file, of its LDM VAE, CLIP and T5 single-file converters), which diffusers does not
ship. Three shapes of file, as they are distributed:

- BFL's own release (``flux1-dev.safetensors``, ``flux1-schnell.safetensors``): the transformer
  alone, bare names (``double_blocks.0.img_attn.qkv.weight``); most CivitAI FLUX fine-tunes are
  this file too;
- ComfyUI's all-in-one (``flux1-dev-fp8.safetensors``): the transformer under
  ``model.diffusion_model.``, CLIP-L and T5-XXL under ``text_encoders.{clip_l,t5xxl}.transformer.``,
  the autoencoder in LDM naming under ``vae.`` (tests/fixtures/model-keys/flux-flux.yaml);
- schnell: the same layouts without ``guidance_in`` (a model with ``guidance_embeds: false``).

BFL fuses what diffusers splits: a double block's q/k/v per stream into one ``qkv``, a single
block's q/k/v and MLP input into ``linear1``; and its final modulation stores (shift, scale) where
diffusers stores (scale, shift).
"""

from __future__ import annotations

from typing import Any

from tests.helpers.ldm import VAE_PREFIX, clip_to_ldm, vae_to_ldm

DIFFUSION_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
COMFY_VAE_PREFIX = "vae."

# diffusers name (after the block prefix) -> BFL name, for weights taken over as they are
_TOP = {
    "time_text_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
    "time_text_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
    "time_text_embed.text_embedder.linear_1.": "vector_in.in_layer.",
    "time_text_embed.text_embedder.linear_2.": "vector_in.out_layer.",
    "time_text_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
    "time_text_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
    "context_embedder.": "txt_in.",
    "x_embedder.": "img_in.",
    "proj_out.": "final_layer.linear.",
}
_DOUBLE = {
    "norm1.linear.": "img_mod.lin.",
    "norm1_context.linear.": "txt_mod.lin.",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "ff.net.0.proj.": "img_mlp.0.",
    "ff.net.2.": "img_mlp.2.",
    "ff_context.net.0.proj.": "txt_mlp.0.",
    "ff_context.net.2.": "txt_mlp.2.",
    "attn.to_out.0.": "img_attn.proj.",
    "attn.to_add_out.": "txt_attn.proj.",
}
_SINGLE = {
    "norm.linear.": "modulation.lin.",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
    "proj_out.": "linear2.",
}
# Fused in BFL: (the BFL tensor, its parts in diffusers' order)
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def _rename(rest: str, table: dict[str, str]) -> str | None:
    for hf, bfl in table.items():
        if rest.startswith(hf):
            return bfl + rest[len(hf) :]
    return None


def _block(state: dict[str, Any], prefix: str, renames: dict[str, str], fused: dict[str, tuple[str, ...]]) -> Any:
    """One block's tensors (``state`` holds diffusers names under ``prefix``) in BFL naming."""
    import torch

    out: dict[str, Any] = {}
    parts = {p for names in fused.values() for p in names}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if rest.rpartition(".")[0] in parts:
            continue
        new = _rename(rest, renames)
        assert new is not None, f"unexpected FLUX key {key}"
        out[new] = value
    for bfl, names in fused.items():
        for kind in ("weight", "bias"):
            out[f"{bfl}.{kind}"] = torch.cat([state[f"{prefix}{n}.{kind}"] for n in names])
    return out


def transformer_to_bfl(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A FluxTransformer2DModel's state dict in BFL naming under ``prefix`` ("" as BFL ships the
    transformer alone, ``model.diffusion_model.`` in ComfyUI's all-in-one file)."""
    import torch

    out: dict[str, Any] = {}
    blocks = {
        tuple(k.split(".")[:2]) for k in state if k.startswith(("transformer_blocks.", "single_transformer_blocks."))
    }
    for kind, index in sorted(blocks):
        double = kind == "transformer_blocks"
        renames, fused = (_DOUBLE, _DOUBLE_FUSED) if double else (_SINGLE, _SINGLE_FUSED)
        converted = _block(state, f"{kind}.{index}.", renames, fused)
        bfl = "double_blocks" if double else "single_blocks"
        out.update({f"{bfl}.{index}.{k}": v for k, v in converted.items()})
    for key, value in state.items():
        if key.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        if key.startswith("norm_out.linear."):  # diffusers (scale, shift) -> BFL (shift, scale)
            scale, shift = value.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1." + key.rpartition(".")[2]] = torch.cat([shift, scale])
            continue
        new = _rename(key, _TOP)
        assert new is not None, f"unexpected FLUX key {key}"
        out[new] = value
    return {prefix + k: v.detach().contiguous().clone() for k, v in out.items()}


def t5_to_comfy(state: dict[str, Any]) -> dict[str, Any]:
    """A T5EncoderModel's state dict as ComfyUI stores it: ``shared`` once (the encoder's
    ``embed_tokens`` is the same tensor, tied), under ``text_encoders.t5xxl.transformer.``."""
    return {T5_PREFIX + k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}


def pipeline_to_bfl(pipe: Any, text_encoders: bool = True, vae: bool = True) -> dict[str, Any]:
    """A FluxPipeline as one ComfyUI all-in-one state dict: the transformer under
    ``model.diffusion_model.``, with the text encoders and the VAE unless left out."""
    state = transformer_to_bfl(pipe.transformer.state_dict(), DIFFUSION_PREFIX)
    if vae:
        ldm = vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config))
        state.update({COMFY_VAE_PREFIX + k.removeprefix(VAE_PREFIX): v for k, v in ldm.items()})
    if text_encoders:
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), CLIP_L_PREFIX))
        state.update(t5_to_comfy(pipe.text_encoder_2.state_dict()))
    return {k: v.detach().contiguous().clone() for k, v in state.items()}

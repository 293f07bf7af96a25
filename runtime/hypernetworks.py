"""A1111 hypernetworks at serve time: each one's modules, read from the artifact (safetensors + JSON),
installed as attention processors of the denoiser.

A1111 changes every attention layer of the UNet (self- and cross-attention alike) the same way:
the context (the text for cross-attention, the hidden states themselves for self-attention) goes
through the hypernetwork's module for its width before ``to_k``, and through another before
``to_v``: ``context + module(context) * strength``. Several hypernetworks chain in order. A width
a hypernetwork has no module for is left alone. The queries never change.

The modules live in the denoiser (``uiw_hypernetworks``), so moving it (``.to``, offload hooks)
moves them; each runs in its own weights' dtype (A1111 keeps them in float32) and gives the
attention its context back in the attention's dtype.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.nn import functional as F

from runtime.artifact import HYPERNETWORK_ACTIVATIONS, HypernetworkInfo

log = logging.getLogger(__name__)

ATTRIBUTE = "uiw_hypernetworks"  # the denoiser's submodule that holds every hypernetwork's modules


class HypernetworkModule(torch.nn.Module):
    """A1111's HypernetworkModule at inference: ``x + layers(x) * multiplier`` (its dropouts are
    inactive in eval mode and not stored)."""

    def __init__(self, layers: list[str], state: dict[str, torch.Tensor], multiplier: float):
        super().__init__()
        modules: list[torch.nn.Module] = []
        for i, kind in enumerate(layers):
            if kind == "linear":
                out_features, in_features = state[f"{i}.weight"].shape
                modules.append(torch.nn.Linear(in_features, out_features))
            elif kind == "layer_norm":
                modules.append(torch.nn.LayerNorm(state[f"{i}.weight"].shape[0]))
            else:
                modules.append(getattr(torch.nn, HYPERNETWORK_ACTIVATIONS[kind])())
        self.linear = torch.nn.Sequential(*modules)
        self.linear.load_state_dict(state)
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * self.multiplier


def read(artifact_dir: Path, info: HypernetworkInfo, dtype: torch.dtype) -> dict[int, tuple[Any, Any]]:
    """One hypernetwork: context width -> (its key module, its value module), in eval mode."""
    from safetensors.torch import load_file

    config = json.loads((artifact_dir / info.config).read_text())
    tensors = load_file(artifact_dir / info.weights)
    out = {}
    for dim in config["dims"]:
        pair = []
        for which in ("k", "v"):
            prefix = f"{dim}.{which}."
            state = {k.removeprefix(prefix): v.to(dtype) for k, v in tensors.items() if k.startswith(prefix)}
            pair.append(HypernetworkModule(config["layers"], state, info.strength).eval().requires_grad_(False))
        out[int(dim)] = (pair[0], pair[1])
    return out


class HypernetworkAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor with the key and value inputs passed through the hypernetworks'
    modules for the context's width, in order."""

    def __init__(self, chain: list[dict[int, tuple[Any, Any]]]):
        super().__init__()
        self.chain = chain

    def contexts(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context_k = context_v = context
        for modules in self.chain:
            pair = modules.get(context.shape[-1])
            if pair is None:
                continue
            k, v = pair
            dtype = k.linear[0].weight.dtype
            context_k = k(context_k.to(dtype)).to(context.dtype)
            context_v = v(context_v.to(dtype)).to(context.dtype)
        return context_k, context_v

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # AttnProcessor2_0.__call__ of diffusers 0.42, with one context for the key and another for the value.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        context_k, context_v = self.contexts(encoder_hidden_states)
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install(unet: Any, artifact_dir: Path, infos: tuple[HypernetworkInfo, ...]) -> int:
    """The artifact's hypernetworks on every attention layer of ``unet``; returns how many layers
    got one of their widths (0 when there are none). Call before the runtime options (fused QKV,
    compile) are applied, and after any other processor change."""
    if not infos:
        return 0
    from diffusers.models.attention_processor import Attention

    # float32 like A1111 (whatever the artifact's precision): the modules are small.
    chain = [read(artifact_dir, info, torch.float32) for info in infos]
    holder = torch.nn.ModuleList(
        torch.nn.ModuleDict({str(d): torch.nn.ModuleList(pair) for d, pair in modules.items()}) for modules in chain
    )
    device = next(unet.parameters()).device
    unet.add_module(ATTRIBUTE, holder.to(device))
    processor = HypernetworkAttnProcessor(chain)
    touched = 0
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)  # type: ignore[arg-type]  # an AttnProcessor2_0
            # self-attention's context is its own input; cross-attention's the text
            width = module.cross_attention_dim if module.is_cross_attention else module.query_dim
            touched += any(width in modules for modules in chain)
    log.info("hypernetworks %s on %d attention layers", ", ".join(i.name for i in infos), touched)
    return touched

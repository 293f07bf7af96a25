"""diffusers SD 2.x pipelines and UNets -> the original LDM single-file layouts tests/helpers/ldm.py
does not cover: SD 2.x's OpenCLIP text encoder, and EMA-only UNets.

- SD 2.x keeps SD 1.x's UNet and VAE names (tests/helpers/ldm.py) and stores OpenCLIP-H under
  ``cond_stage_model.model.`` in open_clip naming (fused ``in_proj``, ``resblocks``, ``ln_final``,
  the ``text_projection`` diffusers ignores), as ``convert_open_clip_checkpoint`` reads it.
- An EMA-only file holds the UNet's exponential moving average alone, as LDM's ``LitEma`` names its
  buffers: ``model_ema.`` + the LDM name without ``model.`` and without its dots
  (``model_ema.diffusion_modelinput_blocks11normweight``), beside ``model_ema.decay`` and
  ``model_ema.num_updates``.
"""

from __future__ import annotations

from typing import Any

from tests.helpers.ldm import UNET_PREFIX, unet_to_ldm, vae_to_ldm
from tests.helpers.sgm import open_clip_to_sgm

OPEN_CLIP_PREFIX = "cond_stage_model.model."


def pipeline_to_ldm_sd2(pipe: Any) -> dict[str, Any]:
    """A whole SD 2.x pipeline as one LDM-layout state dict (contiguous CPU tensors)."""
    import torch

    width = pipe.text_encoder.config.hidden_size
    state = {
        **unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)),
        **vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)),
        **open_clip_to_sgm(pipe.text_encoder.state_dict(), OPEN_CLIP_PREFIX),
        # OpenCLIP's projection to the joint image-text space: in the file, unused by SD 2
        # (diffusers' converter skips it), its size what splits the fused q/k/v.
        OPEN_CLIP_PREFIX + "text_projection": torch.eye(width),
    }
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def ema_only_unet(unet: Any) -> dict[str, Any]:
    """A UNet's weights as an EMA-only LDM file: LitEma's flattened buffer names."""
    import torch

    state = {
        "model_ema." + "".join(k.split(".")[1:]): v
        for k, v in unet_to_ldm(unet.state_dict(), dict(unet.config)).items()
        if k.startswith(UNET_PREFIX)
    }
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(12345, dtype=torch.int32)
    return {k: v.detach().contiguous().clone() for k, v in state.items()}

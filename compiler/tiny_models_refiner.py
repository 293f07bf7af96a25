"""The built-in tiny SDXL refiner: `builtin:tiny-sdxl-refiner`, generated in code.

It has the refiner's shape, not the base's: one text encoder (OpenCLIP-G's slot, text_encoder_2,
and its tokenizer), the aesthetic-score ADM input (pooled text + five numbers: original size,
crop, aesthetic score; 2560 = 1280 + 5 x 256 in the real model, where the base has six numbers),
a UNet conditioned on OpenCLIP-G's hidden states alone, and ``requires_aesthetics_score``. Its
VAE, second text encoder, tokenizer and scheduler are tiny-sdxl's own objects, as SDXL base 1.0
and refiner 1.0 share the same OpenCLIP-G and VAE weights: a recipe with both saves them once.
"""

from __future__ import annotations

from typing import Any


def build_tiny_sdxl_refiner() -> Any:
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    from compiler.tiny_models import BUILTINS

    base = BUILTINS["tiny-sdxl"].build()
    text_encoder_2 = base.text_encoder_2
    time_embed = base.unet.config.addition_time_embed_dim
    projection = text_encoder_2.config.projection_dim
    torch.manual_seed(2101)
    # The refiner's topology at tiny widths: attention at the two middle levels only (the real
    # one: four levels, DownBlock2D at both ends), context = OpenCLIP-G's width alone.
    unet: Any = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(8, 16, 16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2,
        attention_head_dim=(1, 2, 2, 4),
        use_linear_projection=True,
        cross_attention_dim=text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=5 * time_embed + projection,
        norm_num_groups=8,
    )
    unet.eval()
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet,
        scheduler=base.scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )

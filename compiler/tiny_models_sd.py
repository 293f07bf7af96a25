"""Built-in tiny SD 2.x and SD 3 models, generated in code (registered in compiler.tiny_models).

Like the other builtins they keep their family's real topology and conventions at tiny widths:
SD 2.x's linear attention projections, OpenCLIP-style text encoder (gelu, "!" padding) and 768-v
scheduler; SD 3's MMDiT with its three text encoders (CLIP-L and OpenCLIP-G with projections,
T5) and flow-matching scheduler. Seeded per component, so outputs are reproducible.
"""

from __future__ import annotations

from typing import Any

from compiler.tiny_models import _tiny_clip, _tiny_vae, tiny_clip_tokenizer, tiny_t5_tokenizer


def build_tiny_sd2() -> Any:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from compiler.family_configs import SD2_SCHEDULER

    # SD 2's tokenizer is OpenCLIP's: CLIP's vocabulary, padded with "!" (id 0 in the real one).
    tokenizer = tiny_clip_tokenizer(pad_token="!")
    vocab = tokenizer.get_vocab()
    torch.manual_seed(2101)
    # OpenCLIP-H as diffusers holds it: a CLIPTextModel with gelu whose last layer is dropped (23 of
    # 24 layers, so the pipeline's last hidden state is OpenCLIP's penultimate one, as SD 2 was
    # trained on). Here the file and the model hold the same two layers.
    text_encoder = _tiny_clip(CLIPTextModel, vocab, width=32, act="gelu", projection=32, pad_token_id=vocab["!"])
    torch.manual_seed(2102)
    # SD 2.1's UNet topology (SD 1.5's blocks, linear projections in the transformers, attention
    # upcast to fp32 as the 768-v model needs) at tiny widths.
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(1, 2, 4, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    )
    torch.manual_seed(2103)
    vae = _tiny_vae(latent_channels=4, scaling_factor=0.18215)
    # SD 2.1's (768-v) scheduler_config.json, the registry's copy, with explicit values for what it
    # omits (see the SD 1.5 builtin: the in-memory model then behaves as its saved folder does).
    scheduler = DDIMScheduler.from_config(
        {
            **{k: v for k, v in SD2_SCHEDULER.items() if k != "_diffusers_version"},
            "clip_sample_range": 1.0,
            "dynamic_thresholding_ratio": 0.995,
            "rescale_betas_zero_snr": False,
            "sample_max_value": 1.0,
            "thresholding": False,
            "timestep_spacing": "leading",
        }
    )
    module: Any
    for module in (text_encoder, unet, vae):
        module.eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd3(**transformer: Any) -> Any:
    """SD 3 Medium's topology; ``transformer``: settings over the MMDiT's (SD 3.5 Medium's dual
    attention and q/k norms, SD 3.5 Large's q/k norms), for tests of those families."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from compiler.family_configs import SD3_SCHEDULER

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    tokenizer_3 = tiny_t5_tokenizer()
    vocab = tokenizer.get_vocab()
    # Widths differ (768, 1280, 4096 in the real model) so that a swapped encoder is a shape error.
    # The CLIPs' hidden states are concatenated and zero-padded to T5's width, so it is the widest.
    clip_l, clip_g, clip_g_projection, t5 = 32, 48, 40, 96
    torch.manual_seed(3101)
    text_encoder = _tiny_clip(CLIPTextModelWithProjection, vocab, width=clip_l, act="quick_gelu", projection=clip_l)
    # SD 3's single files carry CLIP-L without its projection; diffusers' converter puts in the
    # identity (as SD 3 uses it), so the builtin has the identity too.
    with torch.no_grad():
        text_encoder.text_projection.weight.copy_(torch.eye(clip_l))
    torch.manual_seed(3102)
    text_encoder_2 = _tiny_clip(
        CLIPTextModelWithProjection,
        vocab,
        width=clip_g,
        act="gelu",
        projection=clip_g_projection,
        intermediate=96,
        pad_token_id=vocab["!"],
    )
    torch.manual_seed(3103)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=t5,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    torch.manual_seed(3104)
    # SD 3 Medium's MMDiT (24 joint blocks of 24 heads x 64, 2x2 patches of 16-channel latents):
    # two blocks, the last one context-pre-only as in the real model. pos_embed_max_size 32 serves
    # images up to 512 x 512.
    denoiser = SD3Transformer2DModel(
        **{
            "sample_size": 8,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": t5,
            "caption_projection_dim": 16,
            "pooled_projection_dim": clip_l + clip_g_projection,
            "pos_embed_max_size": 32,
            **transformer,
        }
    )
    torch.manual_seed(3105)
    # SD 3's autoencoder: 16 latent channels, no quant convs, its own scale and shift.
    vae = _tiny_vae(
        latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER)
    module: Any
    for module in (text_encoder, text_encoder_2, text_encoder_3, denoiser, vae):
        module.eval()
    return StableDiffusion3Pipeline(
        transformer=denoiser,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )

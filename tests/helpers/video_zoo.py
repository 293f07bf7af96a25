"""Tiny text-to-video pipelines built in code (test-only): CogVideoX and Wan.

LTX-Video is not here: at diffusers' test widths its tiny VAE (diffusers 0.42's
AutoencoderKLLTXVideo) decodes 64-pixel, 9-frame requests to 128-pixel, 17-frame videos and one
call takes minutes on a CPU; it needs a configuration of its own.

Seeded random weights at the widths diffusers' own tests use (tests/pipelines/{cogvideo,wan}/
test_*.py get_dummy_components), with the tiny T5 tokenizer of compiler.tiny_models (built
offline) in place of hf-internal-testing/tiny-random-t5. Widths are as small as those tests';
the sample sizes are set for 64-pixel frames, the smallest size the worker takes.

``VIDEO_ZOO[name].save(folder)`` writes a diffusers pipeline folder (safetensors).
"""

from __future__ import annotations

from typing import Any

from tests.helpers.zoo import Tiny, t5


def cogvideox() -> Any:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,  # 4 x 8 = 32: the text encoder's width, as CogVideoX's 3D embeddings need
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=8,  # latent 8 x 8: 64-pixel frames
        sample_height=8,
        sample_frames=9,  # latent frames (9 - 1) / 4 + 1 = 3
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    text_encoder, tokenizer = t5(32)
    return CogVideoXPipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=DDIMScheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


def wan() -> Any:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    text_encoder, tokenizer = t5(32, umt5=True)
    return WanPipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


# request: what every test request sends (the text length the tiny transformers were made for);
# extra: num_frames, the parameter that makes a longer video (temporal compression 4: 4k + 1).
VIDEO_ZOO: dict[str, Tiny] = {
    t.name: t
    for t in (
        Tiny("cogvideox", "CogVideoXPipeline", cogvideox, {"max_sequence_length": 16}, ("num_frames", 13)),
        Tiny("wan", "WanPipeline", wan, {"max_sequence_length": 16}, ("num_frames", 13)),
    )
}

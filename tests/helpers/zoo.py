"""A zoo of tiny diffusers pipelines that no family serves, built in code (test-only).

Seeded random weights at the widths diffusers' own tests use (tests/pipelines/<name>/test_*.py
get_dummy_components), with tokenizers built offline: the tiny T5 and CLIP ones of
compiler.tiny_models, a BERT WordPiece vocabulary, and a word-level fast tokenizer standing in
for Gemma's and GLM's (the pipelines only call them to turn text into ids). Each VAE downsamples
8x (four levels at width 8-16) so that a 64-pixel request, the smallest the worker takes, is a
few latent pixels.

``ZOO[name].save(folder)`` writes a diffusers pipeline folder (safetensors), as ``save_pretrained``
would for the real model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORDS = ("a", "photo", "of", "cat", "dog", "the", "in", "on", "with", "red", "blue", "fox", "snow", "painting")


def word_tokenizer(max_length: int = 128) -> Any:
    """A word-level fast tokenizer over a small vocabulary with the usual special tokens: what a
    Gemma or GLM tokenizer does for these pipelines (text -> ids, padding, truncation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = dict.fromkeys([*specials, *WORDS, *letters, ".", ",", ":", "'", "-"])  # "a" is a word and a letter
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like Gemma's and GLM's: a begin token first, so that no text (an empty negative prompt) is no ids.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def bert_tokenizer() -> Any:
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizer(vocab={t: i for i, t in enumerate([*specials, *WORDS])}, model_max_length=77)


def vae(latent_channels: int = 4, **extra: Any) -> Any:
    """An 8x AutoencoderKL at tiny widths (block_out_channels 8-16)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        **extra,
    ).eval()


def t5(width: int = 32, umt5: bool = False) -> tuple[Any, Any]:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    from compiler.tiny_models import tiny_t5_tokenizer

    tokenizer = tiny_t5_tokenizer()
    kw = dict(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    kw |= dict(relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))
    return model.eval(), tokenizer


def gemma2(width: int = 8) -> tuple[Any, Any]:
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = word_tokenizer(512)
    config = Gemma2Config(
        head_dim=4,
        hidden_size=width,
        intermediate_size=16,
        num_attention_heads=2,
        num_hidden_layers=1,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",
    )
    return Gemma2Model(config).eval(), tokenizer


def pixart_sigma() -> Any:
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    text_encoder, tokenizer = t5(32)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae(),
        transformer=transformer.eval(),
        scheduler=DPMSolverMultistepScheduler(),
    )


def aura_flow() -> Any:
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    text_encoder, tokenizer = t5(32, umt5=True)
    transformer = AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        out_channels=4,
        pos_embed_max_size=256,
    )
    return AuraFlowPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae(),
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def chroma() -> Any:
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    text_encoder, tokenizer = t5(32)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=[4, 4, 8],
        approximator_hidden_dim=32,
        approximator_layers=1,
        approximator_num_channels=16,
    )
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(latent_channels=1, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        image_encoder=None,
        feature_extractor=None,
    )


def sana() -> Any:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    text_encoder, tokenizer = gemma2(8)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=32,
    )
    dc = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=dc.eval(),
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def lumina2() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    text_encoder, tokenizer = gemma2(8)
    transformer = Lumina2Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=4,
        hidden_size=8,
        num_layers=2,
        num_attention_heads=1,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2],
        cap_feat_dim=8,
    )
    return Lumina2Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


def cogview4() -> Any:
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmForCausalLM

    tokenizer = word_tokenizer(1024)
    config = GlmConfig(
        hidden_size=32,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=8,
        vocab_size=len(tokenizer),
        pad_token_id=0,
    )
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        out_channels=4,
        text_embed_dim=32,
        time_embed_dim=8,
        condition_dim=4,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )
    return CogView4Pipeline(
        tokenizer=tokenizer,
        text_encoder=GlmForCausalLM(config).eval(),
        vae=vae(),
        transformer=transformer.eval(),
        scheduler=scheduler,
    )


def hunyuan_dit() -> Any:
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel

    tokenizer = bert_tokenizer()
    bert = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=128,
        )
    ).eval()
    text_encoder_2, tokenizer_2 = t5(32)
    transformer = HunyuanDiT2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        in_channels=4,
        cross_attention_dim=32,
        cross_attention_dim_t5=32,
        pooled_projection_dim=16,
        hidden_size=24,
        activation_fn="gelu-approximate",
    )
    return HunyuanDiTPipeline(
        vae=vae(),
        text_encoder=bert,
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        requires_safety_checker=False,
    )


@dataclass(frozen=True)
class Tiny:
    """One zoo pipeline: how to build it, and what a test request sends it."""

    name: str
    pipeline_class: str
    build: Callable[[], Any]
    request: dict[str, Any] = field(default_factory=dict)  # the pipeline's own parameters to send
    extra: tuple[str, Any] = ("max_sequence_length", 4)  # one exposed parameter that changes the output

    def save(self, folder: Path) -> Path:
        import torch

        torch.manual_seed(0)
        pipe = self.build()
        pipe.save_pretrained(folder, safe_serialization=True)
        return folder


ZOO: dict[str, Tiny] = {
    t.name: t
    for t in (
        Tiny("pixart-sigma", "PixArtSigmaPipeline", pixart_sigma, {"use_resolution_binning": False}),
        Tiny("aura-flow", "AuraFlowPipeline", aura_flow),
        Tiny("chroma", "ChromaPipeline", chroma),
        Tiny("sana", "SanaPipeline", sana, {"use_resolution_binning": False}, ("max_sequence_length", 4)),
        Tiny("lumina2", "Lumina2Pipeline", lumina2, {}, ("cfg_trunc_ratio", 0.5)),
        Tiny("cogview4", "CogView4Pipeline", cogview4),
        Tiny(
            "hunyuan-dit",
            "HunyuanDiTPipeline",
            hunyuan_dit,
            {"use_resolution_binning": False},
            ("guidance_rescale", 0.7),
        ),
    )
}

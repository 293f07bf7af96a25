"""The config-only content of each family's Hub "config repo", as data. Pure: no I/O, no torch.

A single-file checkpoint (CivitAI style) is built with diffusers'
``Pipeline.from_single_file(path, config=<folder>)``: the folder supplies ``model_index.json``,
each component's ``config.json``, the scheduler config and the tokenizers; the weights come from
the checkpoint. In production the compiler locks and fetches these files from the Hub repos that
diffusers itself defaults to (``DIFFUSERS_DEFAULT_PIPELINE_PATHS`` in
``diffusers/loaders/single_file_utils.py``). Offline tests serve this data from the fake Hub
instead (``tests/helpers/configrepos.py``), so it has to be faithful to the real files: a wrong width here
would pass every offline test and fail on the first real checkpoint.

Keys: a family id (``compiler.families.FAMILIES``) or ``"<family>/<variant>"`` for the variant
repos a family names in ``Family.variants`` (``"sd15/inpaint"``, ``"sd2/inpaint"``,
``"sdxl/inpaint"``). FLUX.1 Fill is its own family (``flux-fill``), as in the registry. The dicts
are shared between entries: read them, copy before changing anything.

Sources. Model configs: every field that shapes a model is checked by
tests/compiler/test_family_configs.py against the real checkpoints (parameter counts, and diffusers'
single-file converters run over the real key layouts in ``tests/fixtures/model-keys``, which must
land on exactly these models' tensors). Their text, and the scheduler, VAE-scaling, tokenizer and
preprocessor files, follow the Hub files as public projects vendor them, cross-checked where more
than one copy was found: taproot's ``pretrained`` modules (SD 1.5 UNet, scheduler and feature
extractor; T5-XXL encoder; T5 and OpenCLIP-G tokenizer configs; FLUX scheduler), a vendored copy of
the SDXL base and SDXL-inpainting UNet configs, several recordings of the SD 3.5 transformer and
VAE configs, SDXL's CLIP-L / OpenCLIP-G text configs, ai-toolkit's FLUX scheduler and Open-Sora's
FLUX autoencoder constants. What no copy was found for is reconstructed from the repo layout and
the converter's own derivation, and marked ``reconstructed``. Version stamps
(``_diffusers_version``, ``transformers_version``, ``_name_or_path``) are best effort: cosmetic.

``model_index.json`` keeps SD 1.5's real ``safety_checker`` / ``feature_extractor`` entries rather
than nulling them: ``from_single_file`` never loads ``safety_checker`` (it is in
``SINGLE_FILE_OPTIONAL_COMPONENTS``) and builds ``feature_extractor`` (a ``CLIPImageProcessor``,
no weights) from ``feature_extractor/preprocessor_config.json``, which is therefore included.
``safety_checker/config.json`` is not: nothing on the single-file path reads it, and its weights
are never fetched. A pipeline built this way has ``safety_checker=None``, as diffusers intends
for single files.
"""

from __future__ import annotations

from typing import Any

from compiler.families import FAMILIES

# --- repos -------------------------------------------------------------------------------------

# family id -> Hub repo id, from the registry (the repos diffusers' DIFFUSERS_DEFAULT_PIPELINE_PATHS
# names: v1, v2, xl_base, xl_refiner, sd3, sd35_medium, sd35_large, flux-dev, flux-schnell, flux-fill).
CONFIG_REPOS: dict[str, str] = {f.id: f.config_repo.removeprefix("hf://") for f in FAMILIES.values()}

# "<family>/<variant>" -> Hub repo id, from Family.variants (diffusers' "inpainting",
# "inpainting_v2" and "xl_inpaint" defaults).
VARIANT_REPOS: dict[str, str] = {
    f"{f.id}/{v}": repo.removeprefix("hf://") for f in FAMILIES.values() for v, repo in f.variants.items()
}

# Every key CONFIGS holds -> its repo.
REPOS: dict[str, str] = {**CONFIG_REPOS, **VARIANT_REPOS}

# --- shared pieces -----------------------------------------------------------------------------

_DOWN_ENC = ["DownEncoderBlock2D"] * 4
_UP_DEC = ["UpDecoderBlock2D"] * 4

# The SD 1.x/2.x/XL KL-f8 autoencoder (83,653,863 parameters), SD 1.5's file.
SD_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": _DOWN_ENC,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": _UP_DEC,
}
SD2_VAE: dict[str, Any] = {**SD_VAE, "_diffusers_version": "0.8.0", "sample_size": 768}
# SDXL's VAE: same topology, rescaled latents, and it overflows in fp16 (force_upcast).
SDXL_VAE: dict[str, Any] = {
    **SD_VAE,
    "_diffusers_version": "0.20.0.dev0",
    "_name_or_path": "../sdxl-vae/",
    "force_upcast": True,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}
# The 16-channel KL-f8 autoencoder of SD 3 / 3.5 (83,819,683 parameters): no quant convs.
SD3_VAE: dict[str, Any] = {
    **SD_VAE,
    "_diffusers_version": "0.29.0.dev0",
    "force_upcast": True,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
# FLUX.1's autoencoder: SD 3's architecture with its own latent normalisation.
FLUX_VAE: dict[str, Any] = {
    **SD3_VAE,
    "_diffusers_version": "0.30.0.dev0",
    "mid_block_add_attention": True,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}

# OpenAI CLIP ViT-L/14's text tower (123,060,480 parameters; +589,824 with the projection).
# bos/eos 0/2 are the legacy values of the original conversion, kept in every real repo: with
# eos_token_id == 2 transformers pools at the argmax token id, which is <|endoftext|>.
CLIP_L: dict[str, Any] = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}
# OpenCLIP ViT-H/14's text tower as SD 2 uses it: 23 of its 24 layers (the last is cut off,
# SD 2 conditions on the penultimate layer), gelu, no projection.
OPENCLIP_H: dict[str, Any] = {
    **CLIP_L,
    "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "transformers_version": "4.25.0.dev0",
}
# OpenCLIP ViT-bigG/14's text tower with its projection (694,659,840 parameters): SDXL's
# text_encoder_2, SD 3's too.
OPENCLIP_G: dict[str, Any] = {
    **CLIP_L,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0",
}
del OPENCLIP_G["_name_or_path"]
SDXL_CLIP_L: dict[str, Any] = {**CLIP_L, "torch_dtype": "float16", "transformers_version": "4.32.0.dev0"}
# SD 3 / 3.5 use CLIP-L's projection head too (its pooled output feeds the pooled embedding).
SD3_CLIP_L: dict[str, Any] = {
    **SDXL_CLIP_L,
    "architectures": ["CLIPTextModelWithProjection"],
    "transformers_version": "4.41.2",
}
del SD3_CLIP_L["_name_or_path"]
SD3_CLIP_G: dict[str, Any] = {**OPENCLIP_G, "transformers_version": "4.41.2"}
FLUX_CLIP_L: dict[str, Any] = {**CLIP_L, "torch_dtype": "bfloat16", "transformers_version": "4.43.3"}

# google/t5-v1_1-xxl's encoder (4,762,310,656 parameters), as SD 3 ships it.
T5_XXL: dict[str, Any] = {
    "_name_or_path": "google/t5-v1_1-xxl",
    "architectures": ["T5EncoderModel"],
    "classifier_dropout": 0.0,
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "vocab_size": 32128,
}
FLUX_T5_XXL: dict[str, Any] = {**T5_XXL, "torch_dtype": "bfloat16", "transformers_version": "4.43.3"}

# --- tokenizers --------------------------------------------------------------------------------
# The vocabularies themselves (vocab.json + merges.txt, tokenizer.json, spiece.model) are not data
# here: tests write tiny real tokenizers next to these files (tests/helpers/configrepos.py). What these
# files fix is what the pipeline reads: the special tokens, the padding token and model_max_length
# (77 for CLIP; 512 for T5, which the pipelines cap at max_sequence_length).


def _token(content: str, normalized: bool = True, legacy: bool = False) -> dict[str, Any]:
    """A serialized AddedToken: ``__type`` in the pre-4.30 tokenizer_config format."""
    token: dict[str, Any] = {"__type": "AddedToken"} if legacy else {}
    return token | {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
    }


# The pre-4.30 format of SD 1.x/2.x/XL repos (AddedToken objects inline, no added_tokens_decoder).
CLIP_TOKENIZER_LEGACY: dict[str, Any] = {
    "add_prefix_space": False,
    "bos_token": _token("<|startoftext|>", legacy=True),
    "do_lower_case": True,
    "eos_token": _token("<|endoftext|>", legacy=True),
    "errors": "replace",
    "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14",
    "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": _token("<|endoftext|>", legacy=True),
}
CLIP_SPECIAL_TOKENS_LEGACY: dict[str, Any] = {
    "bos_token": _token("<|startoftext|>"),
    "eos_token": _token("<|endoftext|>"),
    "pad_token": "<|endoftext|>",
    "unk_token": _token("<|endoftext|>"),
}
# OpenCLIP pads with id 0, which is "!" in CLIP's vocabulary: SD 2's tokenizer and SDXL's / SD 3's
# tokenizer_2 say so; padding with <|endoftext|> would change the prompt embeddings.
OPENCLIP_TOKENIZER_LEGACY: dict[str, Any] = {
    **CLIP_TOKENIZER_LEGACY,
    "name_or_path": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    "pad_token": "!",
}
OPENCLIP_SPECIAL_TOKENS_LEGACY: dict[str, Any] = {**CLIP_SPECIAL_TOKENS_LEGACY, "pad_token": "!"}
SDXL_TOKENIZER: dict[str, Any] = {**CLIP_TOKENIZER_LEGACY, "clean_up_tokenization_spaces": True}
SDXL_TOKENIZER_2: dict[str, Any] = {**OPENCLIP_TOKENIZER_LEGACY, "clean_up_tokenization_spaces": True}

# The 4.3x format of SD 3 / FLUX repos. added_tokens_decoder ids are the real vocabulary's (a tiny
# test vocabulary re-keys them, see tests/helpers/configrepos.py).
_CLIP_ADDED = {
    "49406": _token("<|startoftext|>") | {"special": True},
    "49407": _token("<|endoftext|>", normalized=False) | {"special": True},
}
CLIP_TOKENIZER: dict[str, Any] = {
    "add_prefix_space": False,
    "added_tokens_decoder": _CLIP_ADDED,
    "bos_token": "<|startoftext|>",
    "clean_up_tokenization_spaces": True,
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}
CLIP_SPECIAL_TOKENS: dict[str, Any] = {
    "bos_token": _token("<|startoftext|>"),
    "eos_token": _token("<|endoftext|>", normalized=False),
    "pad_token": _token("<|endoftext|>", normalized=False),
    "unk_token": _token("<|endoftext|>", normalized=False),
}
OPENCLIP_TOKENIZER: dict[str, Any] = {
    **CLIP_TOKENIZER,
    "added_tokens_decoder": {"0": _token("!", normalized=False) | {"special": True}, **_CLIP_ADDED},
    "pad_token": "!",
}
OPENCLIP_SPECIAL_TOKENS: dict[str, Any] = {**CLIP_SPECIAL_TOKENS, "pad_token": _token("!", normalized=False)}

# T5's sentinels: <extra_id_0> .. <extra_id_99>, stored at ids 32099 .. 32000 (reverse order).
_T5_EXTRA_IDS = [f"<extra_id_{i}>" for i in range(100)]
T5_TOKENIZER: dict[str, Any] = {
    "add_prefix_space": True,
    "added_tokens_decoder": {
        "0": _token("<pad>", normalized=False) | {"special": True},
        "1": _token("</s>", normalized=False) | {"special": True},
        "2": _token("<unk>", normalized=False) | {"special": True},
        **{
            str(32000 + i): _token(f"<extra_id_{99 - i}>", normalized=False)
            | {"lstrip": True, "rstrip": True, "special": True}
            for i in range(100)
        },
    },
    "additional_special_tokens": _T5_EXTRA_IDS,
    "clean_up_tokenization_spaces": True,
    "eos_token": "</s>",
    "extra_ids": 100,
    "legacy": True,
    "model_max_length": 512,
    "pad_token": "<pad>",
    "sp_model_kwargs": {},
    "tokenizer_class": "T5Tokenizer",
    "unk_token": "<unk>",
}
T5_SPECIAL_TOKENS: dict[str, Any] = {
    "additional_special_tokens": _T5_EXTRA_IDS,
    "eos_token": _token("</s>", normalized=False),
    "pad_token": _token("<pad>", normalized=False),
    "unk_token": _token("<unk>", normalized=False),
}

# SD 1.x/2.x's safety-checker preprocessor (a CLIPImageProcessor: no weights).
CLIP_IMAGE_PROCESSOR: dict[str, Any] = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}

# --- denoisers ---------------------------------------------------------------------------------

# SD 1.5's UNet (859,520,964 parameters).
SD15_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# SD 2.1 (768-v): OpenCLIP-H context, linear projections, heads of 64 channels, fp32 attention.
SD2_UNET: dict[str, Any] = {
    **SD15_UNET,
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
# SDXL base's UNet (2,567,463,684 parameters): three levels, 1/2/10 transformer blocks, ADM
# (pooled OpenCLIP-G 1280 + 6 size/crop numbers x 256) = 2816 inputs.
SDXL_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
# The refiner's UNet: four levels at 384 channels, 4 transformer blocks where there is attention,
# heads of 64 channels, OpenCLIP-G context only (1280), ADM = 1280 + 5 x 256 (aesthetic score
# replaces the target size) = 2560. # reconstructed: sgm's refiner config via the converter.
SDXL_REFINER_UNET: dict[str, Any] = {
    **SDXL_UNET,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
# Inpainting UNets take 9 input channels: latents 4 + mask 1 + masked-image latents 4.
SD15_INPAINT_UNET: dict[str, Any] = {**SD15_UNET, "_diffusers_version": "0.6.0.dev0", "in_channels": 9}
# reconstructed: SD 2's inpainting model is the 512-px epsilon model (SD 2 base), not 2.1's 768-v.
SD2_INPAINT_UNET: dict[str, Any] = {
    **SD2_UNET,
    "_diffusers_version": "0.8.0",
    "in_channels": 9,
    "sample_size": 64,
    "upcast_attention": False,
}
SDXL_INPAINT_UNET: dict[str, Any] = {
    **SDXL_UNET,
    "_diffusers_version": "0.21.0.dev0",
    "_name_or_path": "valhalla/sdxl-inpaint-ema",
    "attention_type": "default",
    "in_channels": 9,
    # EMA bookkeeping the training script saved into the config; diffusers ignores it.
    "decay": 0.9999,
    "inv_gamma": 1.0,
    "min_decay": 0.0,
    "optimization_step": 37000,
    "power": 0.6666666666666666,
    "update_after_step": 0,
    "use_ema_warmup": False,
}

# SD 3 medium's MMDiT: 24 blocks of 24 heads x 64, a 192 x 192 positional table.
SD3_TRANSFORMER: dict[str, Any] = {
    "_class_name": "SD3Transformer2DModel",
    "_diffusers_version": "0.29.0.dev0",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}
# SD 3.5 medium's MMDiT-X: dual attention in its first 13 blocks, RMS q/k norm, 384 x 384 table.
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    **SD3_TRANSFORMER,
    "_diffusers_version": "0.31.0.dev0",
    "dual_attention_layers": list(range(13)),
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
}
# SD 3.5 large: 38 blocks of 38 heads x 64 (2432 wide), RMS q/k norm, no dual attention.
SD35_LARGE_TRANSFORMER: dict[str, Any] = {
    **SD3_TRANSFORMER,
    "_diffusers_version": "0.31.0.dev0",
    "caption_projection_dim": 2432,
    "num_attention_heads": 38,
    "num_layers": 38,
    "qk_norm": "rms_norm",
}
# FLUX.1 [dev]'s transformer (11,901,408,320 parameters): 19 double + 38 single blocks, 24 heads
# x 128, 2x2-packed 16-channel latents (64 inputs), guidance-distilled (guidance embedder).
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel",
    "_diffusers_version": "0.30.0.dev0",
    "_name_or_path": "../checkpoints/flux-dev/transformer",
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
# [schnell] is timestep-distilled instead: no guidance embedder.
FLUX_SCHNELL_TRANSFORMER: dict[str, Any] = {
    **FLUX_DEV_TRANSFORMER,
    "_name_or_path": "../checkpoints/flux-schnell/transformer",
    "guidance_embeds": False,
}
# Fill [dev] concatenates the masked image's and the mask's packed latents: 64 + 64 + 256 = 384
# inputs (diffusers' detector keys flux-fill on exactly that width), 64 outputs.
FLUX_FILL_TRANSFORMER: dict[str, Any] = {
    **FLUX_DEV_TRANSFORMER,
    "_diffusers_version": "0.32.0.dev0",
    "_name_or_path": "../checkpoints/flux-fill/transformer",
    "in_channels": 384,
    "out_channels": 64,
}

# --- schedulers --------------------------------------------------------------------------------

SD15_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# reconstructed: the inpainting repo ships a DDIM config with SD 1.5's betas.
SD15_INPAINT_SCHEDULER: dict[str, Any] = {
    **SD15_SCHEDULER,
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.6.0.dev0",
}
# SD 2.1 is a v-prediction model: the scheduler's prediction_type is what says so.
SD2_SCHEDULER: dict[str, Any] = {
    **SD15_SCHEDULER,
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "prediction_type": "v_prediction",
}
# reconstructed: SD 2 inpainting predicts epsilon and ships a PNDM config.
SD2_INPAINT_SCHEDULER: dict[str, Any] = {**SD15_SCHEDULER, "_diffusers_version": "0.8.0"}
SDXL_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# SD 3 / 3.5: a static shift of 3.0, no resolution-dependent shifting.
SD3_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
SD35_SCHEDULER: dict[str, Any] = {**SD3_SCHEDULER, "_diffusers_version": "0.31.0.dev0"}
# FLUX.1 [dev] shifts with the image's token count (mu between base_shift and max_shift).
FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
# [schnell]'s 1-4 step schedule is unshifted.
FLUX_SCHNELL_SCHEDULER: dict[str, Any] = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}

# --- pipelines ---------------------------------------------------------------------------------

_D = "diffusers"
_T = "transformers"


def _sd15_like(pipeline: str, version: str, scheduler: dict[str, Any], unet: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_index.json": {
            "_class_name": pipeline,
            "_diffusers_version": version,
            "feature_extractor": [_T, "CLIPImageProcessor"],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "scheduler": [_D, scheduler["_class_name"]],
            "text_encoder": [_T, "CLIPTextModel"],
            "tokenizer": [_T, "CLIPTokenizer"],
            "unet": [_D, "UNet2DConditionModel"],
            "vae": [_D, "AutoencoderKL"],
        },
        "feature_extractor/preprocessor_config.json": CLIP_IMAGE_PROCESSOR,
        "scheduler/scheduler_config.json": scheduler,
        "text_encoder/config.json": CLIP_L,
        "tokenizer/special_tokens_map.json": CLIP_SPECIAL_TOKENS_LEGACY,
        "tokenizer/tokenizer_config.json": CLIP_TOKENIZER_LEGACY,
        "unet/config.json": unet,
        "vae/config.json": SD_VAE,
    }


def _sd2_like(
    pipeline: str, version: str, scheduler: dict[str, Any], unet: dict[str, Any], vae: dict[str, Any]
) -> dict[str, Any]:
    # SD 2 repos ship no safety checker: null in model_index.json, and requires_safety_checker off.
    return {
        "model_index.json": {
            "_class_name": pipeline,
            "_diffusers_version": version,
            "feature_extractor": [_T, "CLIPImageProcessor"],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": [_D, scheduler["_class_name"]],
            "text_encoder": [_T, "CLIPTextModel"],
            "tokenizer": [_T, "CLIPTokenizer"],
            "unet": [_D, "UNet2DConditionModel"],
            "vae": [_D, "AutoencoderKL"],
        },
        "feature_extractor/preprocessor_config.json": CLIP_IMAGE_PROCESSOR,
        "scheduler/scheduler_config.json": scheduler,
        "text_encoder/config.json": OPENCLIP_H,
        "tokenizer/special_tokens_map.json": OPENCLIP_SPECIAL_TOKENS_LEGACY,
        "tokenizer/tokenizer_config.json": {
            **OPENCLIP_TOKENIZER_LEGACY,
            "name_or_path": "hf-models/stable-diffusion-v2-768x768/tokenizer",
        },
        "unet/config.json": unet,
        "vae/config.json": vae,
    }


def _sdxl_like(pipeline: str, version: str, extra: dict[str, Any], unet: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_index.json": {
            "_class_name": pipeline,
            "_diffusers_version": version,
            **extra,
            "scheduler": [_D, "EulerDiscreteScheduler"],
            "text_encoder": [_T, "CLIPTextModel"],
            "text_encoder_2": [_T, "CLIPTextModelWithProjection"],
            "tokenizer": [_T, "CLIPTokenizer"],
            "tokenizer_2": [_T, "CLIPTokenizer"],
            "unet": [_D, "UNet2DConditionModel"],
            "vae": [_D, "AutoencoderKL"],
        },
        "scheduler/scheduler_config.json": SDXL_SCHEDULER,
        "text_encoder/config.json": SDXL_CLIP_L,
        "text_encoder_2/config.json": OPENCLIP_G,
        "tokenizer/special_tokens_map.json": CLIP_SPECIAL_TOKENS_LEGACY,
        "tokenizer/tokenizer_config.json": SDXL_TOKENIZER,
        "tokenizer_2/special_tokens_map.json": OPENCLIP_SPECIAL_TOKENS_LEGACY,
        "tokenizer_2/tokenizer_config.json": SDXL_TOKENIZER_2,
        "unet/config.json": unet,
        "vae/config.json": SDXL_VAE,
    }


def _sd3_like(version: str, transformer: dict[str, Any], scheduler: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_index.json": {
            "_class_name": "StableDiffusion3Pipeline",
            "_diffusers_version": version,
            "scheduler": [_D, "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": [_T, "CLIPTextModelWithProjection"],
            "text_encoder_2": [_T, "CLIPTextModelWithProjection"],
            "text_encoder_3": [_T, "T5EncoderModel"],
            "tokenizer": [_T, "CLIPTokenizer"],
            "tokenizer_2": [_T, "CLIPTokenizer"],
            "tokenizer_3": [_T, "T5TokenizerFast"],
            "transformer": [_D, "SD3Transformer2DModel"],
            "vae": [_D, "AutoencoderKL"],
        },
        "scheduler/scheduler_config.json": scheduler,
        "text_encoder/config.json": SD3_CLIP_L,
        "text_encoder_2/config.json": SD3_CLIP_G,
        "text_encoder_3/config.json": T5_XXL,
        "tokenizer/special_tokens_map.json": CLIP_SPECIAL_TOKENS,
        "tokenizer/tokenizer_config.json": CLIP_TOKENIZER,
        "tokenizer_2/special_tokens_map.json": OPENCLIP_SPECIAL_TOKENS,
        "tokenizer_2/tokenizer_config.json": OPENCLIP_TOKENIZER,
        "tokenizer_3/special_tokens_map.json": T5_SPECIAL_TOKENS,
        "tokenizer_3/tokenizer_config.json": T5_TOKENIZER,
        "transformer/config.json": transformer,
        "vae/config.json": {**SD3_VAE, "_diffusers_version": version},
    }


def _flux_like(pipeline: str, version: str, transformer: dict[str, Any], scheduler: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_index.json": {
            "_class_name": pipeline,
            "_diffusers_version": version,
            "scheduler": [_D, "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": [_T, "CLIPTextModel"],
            "text_encoder_2": [_T, "T5EncoderModel"],
            "tokenizer": [_T, "CLIPTokenizer"],
            "tokenizer_2": [_T, "T5TokenizerFast"],
            "transformer": [_D, "FluxTransformer2DModel"],
            "vae": [_D, "AutoencoderKL"],
        },
        "scheduler/scheduler_config.json": scheduler,
        "text_encoder/config.json": FLUX_CLIP_L,
        "text_encoder_2/config.json": FLUX_T5_XXL,
        "tokenizer/special_tokens_map.json": CLIP_SPECIAL_TOKENS,
        "tokenizer/tokenizer_config.json": CLIP_TOKENIZER,
        "tokenizer_2/special_tokens_map.json": T5_SPECIAL_TOKENS,
        "tokenizer_2/tokenizer_config.json": T5_TOKENIZER,
        "transformer/config.json": transformer,
        "vae/config.json": FLUX_VAE,
    }


# key (family id or "<family>/<variant>") -> {path in the repo: JSON content}
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": _sd15_like("StableDiffusionPipeline", "0.6.0", SD15_SCHEDULER, SD15_UNET),
    "sd15/inpaint": _sd15_like(
        "StableDiffusionInpaintPipeline", "0.6.0.dev0", SD15_INPAINT_SCHEDULER, SD15_INPAINT_UNET
    ),
    "sd2": _sd2_like("StableDiffusionPipeline", "0.10.0.dev0", SD2_SCHEDULER, SD2_UNET, SD2_VAE),
    "sd2/inpaint": _sd2_like(
        "StableDiffusionInpaintPipeline", "0.8.0", SD2_INPAINT_SCHEDULER, SD2_INPAINT_UNET, SD_VAE
    ),
    "sdxl": _sdxl_like("StableDiffusionXLPipeline", "0.19.0.dev0", {"force_zeros_for_empty_prompt": True}, SDXL_UNET),
    "sdxl/inpaint": _sdxl_like(
        "StableDiffusionXLInpaintPipeline",
        "0.21.0.dev0",
        {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False},
        SDXL_INPAINT_UNET,
    ),
    # The refiner has no CLIP-L: its text_encoder/tokenizer slots are null in model_index.json.
    "sdxl-refiner": {
        "model_index.json": {
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "_diffusers_version": "0.19.0.dev0",
            "force_zeros_for_empty_prompt": False,
            "requires_aesthetics_score": True,
            "scheduler": [_D, "EulerDiscreteScheduler"],
            "text_encoder": [None, None],
            "text_encoder_2": [_T, "CLIPTextModelWithProjection"],
            "tokenizer": [None, None],
            "tokenizer_2": [_T, "CLIPTokenizer"],
            "unet": [_D, "UNet2DConditionModel"],
            "vae": [_D, "AutoencoderKL"],
        },
        "scheduler/scheduler_config.json": SDXL_SCHEDULER,
        "text_encoder_2/config.json": OPENCLIP_G,
        "tokenizer_2/special_tokens_map.json": OPENCLIP_SPECIAL_TOKENS_LEGACY,
        "tokenizer_2/tokenizer_config.json": SDXL_TOKENIZER_2,
        "unet/config.json": SDXL_REFINER_UNET,
        "vae/config.json": SDXL_VAE,
    },
    "sd3": _sd3_like("0.29.0.dev0", SD3_TRANSFORMER, SD3_SCHEDULER),
    "sd35-medium": _sd3_like("0.31.0.dev0", SD35_MEDIUM_TRANSFORMER, SD35_SCHEDULER),
    "sd35-large": _sd3_like("0.31.0.dev0", SD35_LARGE_TRANSFORMER, SD35_SCHEDULER),
    "flux-dev": _flux_like("FluxPipeline", "0.30.0.dev0", FLUX_DEV_TRANSFORMER, FLUX_DEV_SCHEDULER),
    "flux-schnell": _flux_like("FluxPipeline", "0.30.0.dev0", FLUX_SCHNELL_TRANSFORMER, FLUX_SCHNELL_SCHEDULER),
    "flux-fill": _flux_like("FluxFillPipeline", "0.32.0.dev0", FLUX_FILL_TRANSFORMER, FLUX_DEV_SCHEDULER),
}

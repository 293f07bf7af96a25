"""Built-in tiny inpainting models: SD 1.5 and SDXL with 9-channel UNets, and FLUX.1 Fill.

Each is its family's tiny builtin (compiler.tiny_models: the same tokenizers, text encoders and
VAE, from the same seeds) with the denoiser of the inpainting model in its place, as the real
inpainting checkpoints are fine-tunes of their base with a wider input layer:

- SD 1.5 / SDXL inpainting: the UNet takes 9 channels, noisy latents (4) + the mask downsampled to
  the latent size (1) + the masked image's latents (4); everything else as the base.
- FLUX.1 Fill: the transformer's input (x_embedder) takes 384 features per packed 2x2 token:
  noisy latents (16 x 4 = 64), the masked image's latents (64) and the mask at full pixel
  resolution folded into the token (8 x 8 pixels x 4 = 256). The tiny VAE downscales 8x as the real
  one does, so the widths are the real model's.

Torch is imported only when a model is built.
"""

from __future__ import annotations

from typing import Any


def _explicit(cls: Any, config: dict[str, Any]) -> Any:
    """A scheduler whose every setting is explicit in its config: from_config marks the settings a
    dict omits as defaults, which another scheduler class's from_config then replaces with its own
    defaults, while the same config read back from disk keeps them (see tiny_models' SD 1.5)."""
    first = cls.from_config(config)
    return cls.from_config(_public(first.config))


def _public(config: Any) -> dict[str, Any]:
    """A config without from_config's bookkeeping (``_use_default_values`` would reset the
    settings it lists, the ones changed here among them)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _inpaint_unet(unet: Any, seed: int) -> Any:
    """The base UNet's topology with a 9-channel input, seeded on its own."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config({**_public(unet.config), "in_channels": 9}).eval()


def build_tiny_sd15_inpaint() -> Any:
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    from compiler.family_configs import SD15_INPAINT_SCHEDULER
    from compiler.tiny_models import BUILTINS

    base = BUILTINS["tiny-sd15"].build()
    # SD 1.5 inpainting's scheduler_config.json (DDIM), with explicit values as the base's.
    config = {k: v for k, v in SD15_INPAINT_SCHEDULER.items() if not k.startswith("_")}
    scheduler = _explicit(DDIMScheduler, {**config, "prediction_type": "epsilon", "timestep_spacing": "leading"})
    return StableDiffusionInpaintPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=_inpaint_unet(base.unet, 1512),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_inpaint() -> Any:
    from diffusers import StableDiffusionXLInpaintPipeline

    from compiler.tiny_models import BUILTINS

    base = BUILTINS["tiny-sdxl"].build()
    # SDXL inpainting 0.1's model_index: no aesthetic score (a base fine-tune, not the refiner),
    # an empty negative prompt as zeros; its scheduler config is SDXL base's.
    return StableDiffusionXLInpaintPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2,
        unet=_inpaint_unet(base.unet, 2012),
        scheduler=base.scheduler,
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_flux_fill() -> Any:
    import torch
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    from compiler.tiny_models import BUILTINS

    base = BUILTINS["tiny-flux"].build()
    torch.manual_seed(3013)
    # tiny-flux's transformer with FLUX.1 Fill's input width: 384 in, 64 (the packed latents) out.
    transformer = FluxTransformer2DModel.from_config(
        {**_public(base.transformer.config), "in_channels": 384, "out_channels": 64}
    )
    return FluxFillPipeline(
        scheduler=base.scheduler,
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        transformer=transformer.eval(),
    )

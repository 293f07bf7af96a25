"""Checked generation requests for tests that call runtime.generate directly (no handler, no
schema): one builder with the tiny models' usual settings, each test overriding what it is about."""

from __future__ import annotations

from typing import Any

from runtime.schema import GenerationRequest

# 64x64 is the tiny builtins' native size; two steps of K_EULER draw a real image in milliseconds.
TINY_DEFAULTS: dict[str, Any] = {
    "task": "txt2img",
    "prompt": "a red fox in the snow",
    "negative_prompt": None,
    "width": 64,
    "height": 64,
    "steps": 2,
    "guidance_scale": 5.0,
    "scheduler": "K_EULER",
    "seed": 1,
    "num_images": 1,
}


def tiny_request(**overrides: Any) -> GenerationRequest:
    """A GenerationRequest with TINY_DEFAULTS, overridden field by field (an unknown field is a TypeError)."""
    return GenerationRequest(**{**TINY_DEFAULTS, **overrides})


def reference_image(pipe: Any, prompt: str, negative_prompt: str | None, seed: int, steps: int = 4) -> Any:
    """What plain diffusers draws with `pipe` for the demo's serving settings (64x64, guidance 7.5):
    its own call, with a CPU generator seeded as the worker seeds its requests."""
    import torch

    return pipe(
        prompt,
        negative_prompt=negative_prompt,
        width=64,
        height=64,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]

"""An artifact with an SDXL refiner serves worker-sdxl's requests as worker-sdxl's handler.py runs
them: txt2img = the base to latents (denoising_end=high_noise_frac), then the refiner as img2img
on those latents (prompt only, strength, refiner_inference_steps, the same generator going on);
image_url = the refiner alone. Compared with plain diffusers calls on the same tiny weights."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import compile_text, decode_image

RECIPE = """base: builtin:tiny-sdxl
refiner: builtin:tiny-sdxl-refiner
precision: fp32
scheduler: DDIM
defaults: {steps: 4, guidance_scale: 7.5}
"""
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("refiner")
    proc = compile_text(tmp, "refined", RECIPE)
    assert proc.returncode == 0, proc.stderr
    return tmp / "home", Path(proc.stdout.strip())


@pytest.fixture(scope="module")
def service(compiled: tuple[Path, Path]) -> Any:
    from runtime.service import Service, Settings

    home, artifact = compiled
    return Service(Settings(artifacts=(str(artifact),), home=home))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """Plain diffusers: both builtins saved as diffusers folders and loaded back as a user would."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from compiler.tiny_models import BUILTINS

    out = []
    for name, cls in (
        ("tiny-sdxl", StableDiffusionXLPipeline),
        ("tiny-sdxl-refiner", StableDiffusionXLImg2ImgPipeline),
    ):
        folder = tmp_path_factory.mktemp(name)
        BUILTINS[name].build().save_pretrained(folder)
        pipe = cls.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        out.append(pipe)
    return out[0], out[1]


def _reference(plain: tuple[Any, Any], seed: int, **req: Any) -> list[np.ndarray]:
    """worker-sdxl's generate_image, as plain diffusers calls."""
    import torch
    from diffusers import DDIMScheduler

    base, refiner = plain
    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(seed)
    n = req.get("num_images", 1)
    latents = base(
        prompt=PROMPT,
        negative_prompt=req.get("negative_prompt"),
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=7.5,
        denoising_end=req.get("high_noise_frac"),
        output_type="latent",
        num_images_per_prompt=n,
        generator=generator,
    ).images
    images = refiner(
        prompt=PROMPT,
        num_inference_steps=req.get("refiner_inference_steps", 50),
        strength=req.get("strength", 0.3),
        image=latents,
        num_images_per_prompt=n,
        generator=generator,
    ).images
    return [np.array(i) for i in images]


def _run(service: Any, **fields: Any) -> dict[str, Any]:
    reply = service.run({"prompt": PROMPT, **fields})
    assert "images" in reply, reply
    return reply


def test_refiner_shares_the_bases_vae_and_second_text_encoder(compiled: tuple[Path, Path]) -> None:
    _, artifact = compiled
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["refiner"] == {
        "path": "refiner",
        "pipeline_class": "StableDiffusionXLImg2ImgPipeline",
        "mode": "worker-sdxl",
        "shared": ["vae", "text_encoder_2", "tokenizer_2"],
    }
    stored = sorted(p.relative_to(artifact / "refiner").parts[0] for p in (artifact / "refiner").rglob("*.*"))
    assert set(stored) == {"model_index.json", "scheduler", "unet"}
    assert any(f["path"].startswith("refiner/unet/") for f in manifest["files"])  # hashed and verified as the rest


def test_txt2img_is_base_then_refiner_with_worker_sdxl_defaults(service: Any, plain: tuple[Any, Any]) -> None:
    reply = _run(service, seed=11)
    assert not reply.get("warnings"), reply
    (expected,) = _reference(plain, 11)
    assert np.abs(decode_image(reply["images"][0]).astype(int) - expected).max() <= 2


def test_refiner_fields_are_used_not_ignored(service: Any, plain: tuple[Any, Any]) -> None:
    fields = {
        "high_noise_frac": 0.5,
        "strength": 0.6,
        "refiner_inference_steps": 5,
        "num_images": 2,
        "negative_prompt": "blurry",
    }
    reply = _run(service, seed=5, **fields)
    assert not reply.get("warnings"), reply
    expected = _reference(plain, 5, **fields)
    got = [decode_image(i) for i in reply["images"]]
    assert len(got) == 2
    for g, e in zip(got, expected, strict=True):
        assert np.abs(g.astype(int) - e).max() <= 2
    # and they change the picture: the defaults draw another one
    (default,) = _reference(plain, 5)
    assert np.abs(got[0].astype(int) - default).max() > 10


def test_image_url_runs_only_the_refiner(service: Any, plain: tuple[Any, Any]) -> None:
    import torch
    from PIL import Image

    from tests.runtime.test_img2img import SOURCE

    buf = io.BytesIO()
    Image.fromarray(SOURCE).save(buf, format="PNG")
    reply = _run(service, seed=3, image_url=base64.b64encode(buf.getvalue()).decode(), refiner_inference_steps=10)
    _, refiner = plain
    expected = refiner(
        prompt=PROMPT,
        num_inference_steps=10,
        strength=0.3,
        image=Image.fromarray(SOURCE),
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert np.abs(decode_image(reply["images"][0]).astype(int) - np.array(expected)).max() <= 2

"""builtin:tiny-flux, FLUX.1 [dev]'s topology at tiny widths, compiled with the CLI and served
through the runtime: worker-sdxl's fields reach a FluxPipeline (its guidance_scale is distilled
guidance; a negative prompt is dropped with a warning), and the served pixels are plain diffusers'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import decode_image, run_compiler

RECIPE = """
base: builtin:tiny-flux
precision: fp32
defaults:
  steps: 4
"""
REQUEST = {
    "prompt": "a photo of a cat",
    "negative_prompt": "blurry",
    "guidance_scale": 5.0,
    "num_inference_steps": 3,
    "width": 96,  # not square, so a swapped width and height shows
    "height": 64,
    "seed": 11,
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tiny-flux")
    (tmp / "recipes").mkdir()
    (tmp / "recipes" / "flux.yaml").write_text(RECIPE)
    proc = run_compiler("recipe=flux", f"recipes_dir={tmp / 'recipes'}", home=tmp / "home")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "home", Path(proc.stdout.strip())


@pytest.fixture(scope="module")
def service(compiled: tuple[Path, Path]):
    from runtime.service import Service, Settings

    home, artifact = compiled
    return Service(Settings(artifacts=(str(artifact),), home=home))


def _image(service, request: dict) -> tuple[np.ndarray, dict]:
    reply = service.run(request)
    assert "images" in reply, reply
    return decode_image(reply["images"][0]), reply


def test_compiled_with_the_flux_dev_family_defaults(compiled):
    _, artifact = compiled
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert (manifest["family"], manifest["pipeline_class"]) == ("flux-dev", "FluxPipeline")
    assert manifest["serving"]["scheduler"] == "FLOW_MATCH_EULER"  # the family's, the recipe names none
    assert manifest["serving"]["defaults"]["guidance_scale"] == 3.5  # distilled guidance
    assert (manifest["serving"]["defaults"]["width"], manifest["serving"]["defaults"]["height"]) == (64, 64)
    assert manifest["components"]["transformer"] == "FluxTransformer2DModel"
    assert manifest["components"]["text_encoder_2"] == "T5EncoderModel"


def test_served_image_is_sized_seeded_and_says_what_it_ignored(service):
    first, reply = _image(service, REQUEST)
    assert first.shape == (64, 96, 3)
    assert reply["seed"] == 11
    assert any(w.startswith("negative_prompt: ignored") for w in reply["warnings"]), reply["warnings"]
    again, _ = _image(service, REQUEST)
    assert np.array_equal(first, again)
    other, _ = _image(service, {**REQUEST, "seed": 12})
    assert not np.array_equal(first, other)
    # guidance_scale is the transformer's guidance input: another value, another image.
    guided, _ = _image(service, {**REQUEST, "guidance_scale": 1.0})
    assert not np.array_equal(first, guided)
    # Without a negative prompt there is nothing to warn about.
    _, quiet = _image(service, {k: v for k, v in REQUEST.items() if k != "negative_prompt"})
    assert "warnings" not in quiet, quiet
    # FLUX sizes are multiples of 16 (8x VAE, 2x2 packing): diffusers rounds down, the reply says so.
    rounded, reply = _image(service, {**REQUEST, "width": 72, "height": 88})
    assert rounded.shape == (80, 64, 3)
    assert "width: 72 rounded down to 64, a multiple of 16" in reply["warnings"], reply["warnings"]
    assert "height: 88 rounded down to 80, a multiple of 16" in reply["warnings"], reply["warnings"]


def test_served_image_equals_plain_diffusers(service):
    import torch

    from compiler.tiny_models import BUILTINS

    served, _ = _image(service, REQUEST)
    pipe = BUILTINS["tiny-flux"].build()
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(REQUEST["seed"])
    with torch.inference_mode():
        image = pipe(
            prompt=REQUEST["prompt"],
            width=REQUEST["width"],
            height=REQUEST["height"],
            num_inference_steps=REQUEST["num_inference_steps"],
            guidance_scale=REQUEST["guidance_scale"],
            generator=generator,
        ).images[0]
    assert np.array_equal(served, np.array(image))


def test_every_family_pipeline_has_a_guidance_rule():
    from compiler.families import FAMILIES
    from runtime.generate import GUIDANCE

    classes = {cls for family in FAMILIES.values() for cls in family.pipelines.values()}
    assert classes <= set(GUIDANCE), classes - set(GUIDANCE)
    assert all(GUIDANCE[c] == "distilled" for c in classes if c.startswith("Flux"))

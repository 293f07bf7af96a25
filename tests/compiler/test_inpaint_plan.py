"""Which tasks and pipeline an inpainting model's plan serves, and the recipes that cannot work
with one, decided before anything is downloaded or built (pure: real files' headers from the
detection cases, the plan as the CLI makes it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compiler.errors import UserError
from tests.helpers.detect_cases import CASES, FIXTURES

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="fixtures not found")
TASKS = ("inpaint", "img2img", "txt2img")


def _plan(case: str, base_variant: str, **fields: Any) -> Any:
    from compiler.detect import detect
    from compiler.plan import make_plan
    from compiler.recipe import parse_recipe
    from compiler.sources.base import Pinned, Resolved

    found = detect(next(c for c in CASES if c.name == case).keys())
    recipe = parse_recipe("r", Path("/m/r.yaml"), {"checkpoint": "./x.safetensors", **fields})
    base = Resolved(
        pin="files:sha256:0", inputs=(), family=str(found.family), native_size=(1024, 1024), model_variant=base_variant
    )
    return make_plan(recipe, base, None, Pinned(pin="files:sha256:1", inputs=()), found)


@pytest.mark.parametrize(
    ("case", "cls"),
    [
        ("sd15-inpaint", "StableDiffusionInpaintPipeline"),
        ("sdxl-inpaint", "StableDiffusionXLInpaintPipeline"),
        ("flux-fill", "FluxFillPipeline"),
    ],
)
def test_an_inpainting_checkpoint_serves_every_task_through_its_inpaint_pipeline(case, cls):
    plan = _plan(case, "inpaint")
    assert plan.pipeline_class == cls
    assert plan.tasks == dict.fromkeys(TASKS, cls)


def test_a_normal_checkpoint_keeps_its_family_pipelines():
    plan = _plan("sd15-ldm", "normal")
    assert plan.pipeline_class == "StableDiffusionPipeline"
    assert tuple(plan.tasks) == ("txt2img", "img2img", "inpaint")


@pytest.mark.parametrize(
    ("case", "base_variant", "what", "hint"),
    [
        ("sd15-inpaint", "normal", "this is an inpainting Stable Diffusion 1.x model", "drop `base:`"),
        (
            "sdxl-inpaint",
            "normal",
            "this is an inpainting Stable Diffusion XL model",
            "stable-diffusion-xl-1.0-inpainting",
        ),
        ("sd15-ldm", "inpaint", "this is a normal Stable Diffusion 1.x model, but the base is an inpainting", "normal"),
    ],
)
def test_a_checkpoint_of_another_variant_than_its_base_is_refused(case, base_variant, what, hint):
    with pytest.raises(UserError) as e:
        _plan(case, base_variant)
    text = str(e.value)
    assert "/m/r.yaml: checkpoint" in text and what in text, text
    assert "hint:" in text and hint in text.split("hint:", 1)[1], text


def test_controlnets_on_an_inpainting_model_are_refused():
    with pytest.raises(UserError) as e:
        _plan("sd15-inpaint", "inpaint", controlnets=[{"source": "./cn.safetensors"}])
    text = str(e.value)
    assert "/m/r.yaml: controlnets" in text and "StableDiffusionInpaintPipeline, which takes no ControlNet" in text
    assert "remove `controlnets:`" in text, text

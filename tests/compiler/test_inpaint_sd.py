"""SD 1.5 and SDXL inpainting checkpoints (9-channel UNets), end to end: written as the original
single files (LDM, SGM), compiled by the CLI with the family's inpainting config repo from the
test Hub, served through the RunPod handler for inpaint, img2img and txt2img, and compared with
plain diffusers (``from_single_file`` of the same file, the same arguments and generator)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compiler.families import FAMILIES
from tests.compiler.test_sources import compile_recipe
from tests.helpers.fakehub import FakeHub, tree
from tests.helpers.inpaint import SIZE, jobs, reference, serve_all, within_one_level

RECIPE = "{fields}\nprecision: fp32\nscheduler: K_EULER\ndefaults:\n  guidance_scale: 7.5\n"
TASKS = ["inpaint", "img2img", "txt2img"]


def _configs(pipe: Any, root: Path) -> dict[str, bytes]:
    pipe.save_pretrained(root)
    return {p: b for p, b in tree(root).items() if not p.endswith(".safetensors")}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Both tiny inpainting models, their single files, and a Hub whose inpainting config repos
    (the families' `variants`) hold their configs and tokenizers, no weights."""
    from safetensors.torch import save_file

    from compiler.tiny_models import BUILTINS
    from tests.helpers.ldm import pipeline_to_ldm
    from tests.helpers.sgm import pipeline_to_sgm

    root = tmp_path_factory.mktemp("inpaint-models")
    hub = FakeHub().start()
    out: dict[str, Any] = {"hub": hub}
    for family, writer in (("sd15", pipeline_to_ldm), ("sdxl", pipeline_to_sgm)):
        pipe = BUILTINS[f"tiny-{family}-inpaint"].build()
        configs = root / f"{family}-configs"
        hub.repo(FAMILIES[family].variants["inpaint"].removeprefix("hf://")).push(_configs(pipe, configs))
        save_file(writer(pipe), root / f"{family}-inpaint.safetensors")
        out[family] = (root / f"{family}-inpaint.safetensors", configs)
    yield out
    hub.stop()


def _compile(tmp_path: Path, hub: FakeHub, fields: str, *args: str) -> Any:
    return compile_recipe(tmp_path, tmp_path / "home", hub, "", *args, text=RECIPE.replace("{fields}", fields))


def _reference(family: str, file: Path, configs: Path) -> Any:
    """Plain diffusers on the same file: the family's inpaint pipeline from the single file with
    the config folder, the config repo's scheduler switched to Euler as the recipe asks."""
    import diffusers

    cls = getattr(diffusers, FAMILIES[family].pipelines["inpaint"])
    pipe = cls.from_single_file(str(file), config=str(configs), local_files_only=True)
    own = json.loads((configs / "scheduler" / "scheduler_config.json").read_text())
    sched = getattr(diffusers, own["_class_name"]).from_pretrained(configs, subfolder="scheduler")
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(sched.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_inpainting_single_file_builds_and_serves_every_task_as_diffusers(family, tmp_path, models, monkeypatch):
    file, configs = models[family]
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "inpaint.safetensors").write_bytes(file.read_bytes())
    proc = _compile(tmp_path, models["hub"], "checkpoint: ./inpaint.safetensors")
    assert proc.returncode == 0, proc.stderr[-2000:]
    artifact = Path(proc.stdout.strip())

    lock = json.loads((tmp_path / "recipes" / "r.lock.json").read_text())
    detected = next(e for k, e in lock["sources"].items() if k.endswith(".safetensors"))["meta"]["detected"]
    assert (detected["kind"], detected["family"], detected["variant"]) == ("checkpoint", family, "inpaint")
    assert f"{FAMILIES[family].variants['inpaint']}@main" in lock["sources"], "the inpainting config repo"
    manifest = json.loads((artifact / "manifest.json").read_text())
    cls = FAMILIES[family].pipelines["inpaint"]
    assert (manifest["family"], manifest["pipeline_class"]) == (family, cls)
    assert manifest["capabilities"] == {"tasks": TASKS, "pipelines": dict.fromkeys(TASKS, cls)}

    replies = serve_all(artifact, tmp_path / "home", jobs(), monkeypatch)
    ref = _reference(family, file, configs)
    for task in TASKS:
        within_one_level(replies[task], reference(ref, task, guidance_scale=7.5))
    described = serve_all(artifact, tmp_path / "home", {"d": {"describe": True}}, monkeypatch)["d"]
    (art,) = described["artifacts"].values()
    assert art["tasks"] == TASKS and art["schema"]["x-tasks"] == TASKS
    # The one task it does not serve: ControlNet (an inpaint pipeline takes none).
    job = {"prompt": "x", "controlnets": [{"name": "c", "image": "x"}]}
    refused = serve_all(artifact, tmp_path / "home", {"controlnet": job}, monkeypatch)["controlnet"]
    assert refused["errors"] == ["controlnets.0.name: no ControlNet 'c'; this artifact has: none"], refused


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_an_inpainting_diffusers_folder_serves_what_its_single_file_serves(family, tmp_path, models, monkeypatch):
    """The same model as a diffusers folder (`base:`, its model_index naming the inpaint pipeline)
    builds the same artifact files and serves the same pixels as its single file."""
    file, folder = models[family]
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "inpaint.safetensors").write_bytes(file.read_bytes())
    artifacts = []
    for name, fields in (("a", f"base: {folder}"), ("b", "checkpoint: ./inpaint.safetensors")):
        proc = compile_recipe(
            tmp_path, tmp_path / "home", models["hub"], "", name=name, text=RECIPE.replace("{fields}", fields)
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        artifacts.append(Path(proc.stdout.strip()))
    manifests = [json.loads((a / "manifest.json").read_text()) for a in artifacts]
    assert manifests[0]["capabilities"] == manifests[1]["capabilities"]
    job = {"inpaint": jobs()["inpaint"]}
    images = [serve_all(a, tmp_path / "home", job, monkeypatch)["inpaint"]["images"] for a in artifacts]
    assert images[0] == images[1]


def test_an_inpainting_file_on_a_normal_base_fails_before_any_build(tmp_path, models):
    """`base: builtin:tiny-sd15` (a 4-channel UNet's pipeline) with the inpainting file: refused at
    the plan with where, what and a hint, and nothing is left in the store."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "inpaint.safetensors").write_bytes(models["sd15"][0].read_bytes())
    proc = _compile(tmp_path, models["hub"], "base: builtin:tiny-sd15\ncheckpoint: ./inpaint.safetensors")
    assert proc.returncode == 2, proc.stderr
    assert "r.yaml: checkpoint: this is an inpainting Stable Diffusion 1.x model" in proc.stderr, proc.stderr
    assert "hint: drop `base:`" in proc.stderr and "stable-diffusion-inpainting" in proc.stderr, proc.stderr
    assert not list((tmp_path / "home").glob("artifacts/v1/*")), "nothing half-written in the store"


def test_txt2img_on_an_inpainting_model_does_not_depend_on_the_init_image():
    """Why txt2img through the inpaint pipeline matches A1111 (a 0.5-gray masked image, a mask of
    ones, pure noise): at strength 1.0 with a full mask the init image never reaches the UNet, so
    any init image gives the same pixels; the mid-gray one is only what is conditioned on."""
    import torch
    from PIL import Image

    from compiler.tiny_models import BUILTINS
    from tests.helpers.inpaint import full_mask

    pipe = BUILTINS["tiny-sd15-inpaint"].build()
    pipe.set_progress_bar_config(disable=True)

    def draw(color: tuple[int, int, int]) -> np.ndarray:
        image = Image.new("RGB", (SIZE, SIZE), color)
        out = pipe(
            "a cat",
            image=image,
            mask_image=full_mask(),
            strength=1.0,
            num_inference_steps=2,
            generator=torch.Generator("cpu").manual_seed(3),
            width=SIZE,
            height=SIZE,
        )
        return np.array(out.images[0])

    gray, black, red = draw((128, 128, 128)), draw((0, 0, 0)), draw((255, 0, 0))
    assert np.array_equal(gray, black) and np.array_equal(gray, red)

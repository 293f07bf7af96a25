"""recipes/sdxl.yaml is worker-sdxl as a recipe: SDXL base 1.0 + refiner 1.0 + the fp16-fix VAE,
with worker-sdxl's own defaults (read from its vendored schemas.py). Its lock cannot be written
here (no Hub), so the test Hub publishes tiny stand-ins under the recipe's real names and the
recipe is compiled as written, through the CLI, then served."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, decode_image, run_compiler
from tests.helpers.fakehub import FakeHub, tree

pytestmark = pytest.mark.slow  # a fp16 compile of three Hub sources and a serve: minutes on a loaded CPU

RECIPE = REPO / "recipes" / "sdxl.yaml"
BASE, REFINER, VAE = (
    "stabilityai/stable-diffusion-xl-base-1.0",
    "stabilityai/stable-diffusion-xl-refiner-1.0",
    "madebyollin/sdxl-vae-fp16-fix",
)


def _worker_sdxl_defaults() -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("worker_sdxl_schemas", REPO / "tests/fixtures/worker-sdxl/schemas.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {k: v.get("default") for k, v in module.INPUT_SCHEMA.items()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """The tiny base and refiner as the Hub repos hold theirs (fp32 and fp16 variants), and a VAE
    of other weights in the fp16-fix repo's layout."""
    import torch

    from compiler.tiny_models import BUILTINS

    tmp = tmp_path_factory.mktemp("sdxl-repos")
    h = FakeHub().start()
    base = BUILTINS["tiny-sdxl"].build()
    torch.manual_seed(77)
    vae = type(base.vae).from_config(base.vae.config).eval()
    vae.save_pretrained(tmp / "vae")
    h.repo(VAE).push(tree(tmp / "vae"))
    for repo, pipe in ((BASE, base), (REFINER, BUILTINS["tiny-sdxl-refiner"].build())):
        folder = tmp / repo.replace("/", "--")
        pipe.save_pretrained(folder)
        pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
        h.repo(repo).push(tree(folder))
    yield h
    h.stop()


def test_sdxl_recipe_compiles_with_worker_sdxls_defaults_and_serves(tmp_path: Path, hub: FakeHub) -> None:
    from runtime.schema import DEFAULT_REFINER_STEPS, DEFAULT_STRENGTH
    from runtime.service import Service, Settings

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copy(RECIPE, recipes / "sdxl.yaml")
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "UIW_HTTP_TIMEOUT": "10"}
    proc = run_compiler(f"recipes_dir={recipes}", "recipe=sdxl", home=tmp_path / "home", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = Path(proc.stdout.strip())
    lock = json.loads((recipes / "sdxl.lock.json").read_text())
    for repo in (BASE, REFINER, VAE):
        assert any(k.startswith(f"hf://{repo}") for k in lock["sources"]), sorted(lock["sources"])

    manifest = json.loads((artifact / "manifest.json").read_text())
    theirs = _worker_sdxl_defaults()
    serving = manifest["serving"]
    assert serving["scheduler"] == theirs["scheduler"] == "DDIM"
    d = serving["defaults"]
    assert (d["width"], d["height"], d["steps"], d["guidance_scale"]) == (
        theirs["width"],
        theirs["height"],
        theirs["num_inference_steps"],
        theirs["guidance_scale"],
    )
    assert d["negative_prompt"] is theirs["negative_prompt"] is None
    assert (
        theirs["refiner_inference_steps"] == DEFAULT_REFINER_STEPS and DEFAULT_STRENGTH["img2img"] == theirs["strength"]
    )
    assert theirs["high_noise_frac"] is None  # the base's whole schedule: no split to configure
    assert manifest["runtime"]["dtype"] == "fp16" and manifest["runtime"]["generator"] == "device"
    # The recipe's VAE replaces both VAEs: one copy, as the second text encoder.
    assert manifest["refiner"]["mode"] == "worker-sdxl"
    assert {"vae", "text_encoder_2"} <= set(manifest["refiner"]["shared"])

    job = {"prompt": "a lighthouse", "seed": 7, "width": 64, "height": 64, "num_inference_steps": 2}
    reply = Service(Settings(artifacts=("sdxl",), home=tmp_path / "home")).run({**job, "refiner_inference_steps": 4})
    assert "images" in reply and not reply.get("warnings"), reply
    image = decode_image(reply["images"][0])
    assert image.shape == (64, 64, 3) and image.std() > 0

"""The example recipes (recipes/examples/) compile as written and serve: each names real public
models, and the test Hub (tests/helpers/fakehub.py) publishes tiny stand-ins under those very names (the
Hub repos, the CivitAI model and version ids), so the compiler resolves, pins, fetches, detects and
builds exactly the path a user's compile takes, offline. Compiled through the CLI with
`recipes_dir=` pointing at a copy of the folder, as the README's command does at the real one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from compiler.families import FAMILIES
from tests.conftest import REPO, decode_image, run_compiler
from tests.helpers.fakehub import FakeHub, tree

EXAMPLES = REPO / "recipes" / "examples"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
REALISTIC_VISION = (4201, 130072)  # CivitAI model and version ids (Realistic Vision V6.0 B1)
DETAIL_TWEAKER = (58390, 62833)  # the Detail Tweaker LoRA
# One small request per example: the stand-ins are tiny, the recipes' own sizes are not.
REQUEST = {"prompt": "a lighthouse on a cliff at dusk", "seed": 7, "width": 64, "height": 64, "num_inference_steps": 2}


def _saved(pipe, folder: Path) -> dict[str, bytes]:
    pipe.save_pretrained(folder)
    return tree(folder)


def _tiny_schnell():
    """tiny-flux with FLUX.1 [schnell]'s difference: a transformer without the guidance embedder
    (detection tells schnell from dev by it)."""
    from diffusers import FluxTransformer2DModel

    from compiler.tiny_models import BUILTINS

    pipe = BUILTINS["tiny-flux"].build()
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(3103)
    pipe.transformer = FluxTransformer2DModel(**{**config, "guidance_embeds": False}).eval()
    return pipe


def _detail_lora() -> bytes:
    """A kohya LoRA on tiny-sd15's attention and MLP modules, as CivitAI LoRAs are published."""
    from safetensors.torch import save

    from compiler.tiny_models import BUILTINS
    from tests.compiler.test_lora import MODULES, RANK

    g = torch.Generator().manual_seed(58390)
    pipe = BUILTINS["tiny-sd15"].build()
    state = {}
    for kohya, comp, module in MODULES:
        w = getattr(pipe, comp).state_dict()[module + ".weight"]
        state[f"{kohya}.lora_down.weight"] = torch.randn(RANK, w.shape[1], generator=g) * 0.1
        state[f"{kohya}.lora_up.weight"] = torch.randn(w.shape[0], RANK, generator=g) * 0.1
        state[f"{kohya}.alpha"] = torch.tensor(float(RANK))
    return save(state)


@pytest.fixture(scope="module")
def example_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    from safetensors.torch import save

    from compiler.tiny_models import BUILTINS
    from tests.helpers.ldm import pipeline_to_ldm

    tmp = tmp_path_factory.mktemp("example-repos")
    hub = FakeHub().start()
    hub.repo(SDXL).push(_saved(BUILTINS["tiny-sdxl"].build(), tmp / "sdxl"))
    hub.repo(SCHNELL).push(_saved(_tiny_schnell(), tmp / "schnell"))
    # Realistic Vision has no base: its configs come from SD 1.5's config repo (no weights there).
    sd15 = BUILTINS["tiny-sd15"].build()
    configs = {p: b for p, b in _saved(sd15, tmp / "sd15").items() if not p.endswith(".safetensors")}
    hub.repo(FAMILIES["sd15"].config_repo.removeprefix("hf://")).push(configs)
    hub.add_civitai(*REALISTIC_VISION, save(pipeline_to_ldm(sd15)), "realisticVisionV60B1_v51VAE.safetensors")
    hub.add_civitai(*DETAIL_TWEAKER, _detail_lora(), "add_detail.safetensors", model_type="LORA")
    yield hub
    hub.stop()


def test_the_examples_are_the_ones_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted(CASES)
    for name in CASES:  # each says how to compile it
        assert f"recipes_dir=recipes/examples recipe={name}" in (EXAMPLES / f"{name}.yaml").read_text()


# name -> (family the artifact must have, the real sources its lock must pin)
CASES = {
    "sdxl-base": ("sdxl", [f"hf://{SDXL}"]),
    "realistic-vision-lora": ("sd15", ["civitai://models/4201", "civitai://models/58390"]),
    "flux-schnell": ("flux-schnell", [f"hf://{SCHNELL}"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_compiles_from_its_public_names_and_serves(name: str, tmp_path: Path, example_hub: FakeHub):
    from runtime.service import Service, Settings

    recipes = tmp_path / "examples"
    shutil.copytree(EXAMPLES, recipes)
    home = tmp_path / "home"
    env = {
        "HF_ENDPOINT": example_hub.url,
        "CIVITAI_BASE_URL": example_hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "UIW_HTTP_TIMEOUT": "10",
    }
    proc = run_compiler(f"recipes_dir={recipes}", f"recipe={name}", home=home, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = Path(proc.stdout.strip())

    family, sources = CASES[name]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["family"] == family, manifest["family"]
    lock = json.loads((recipes / f"{name}.lock.json").read_text())
    for source in sources:  # pinned under the name the recipe wrote
        assert any(key.startswith(source) for key in lock["sources"]), (source, sorted(lock["sources"]))

    reply = Service(Settings(artifacts=(name,), home=home)).run(dict(REQUEST))
    assert "images" in reply, reply
    image = decode_image(reply["images"][0])
    assert image.shape == (64, 64, 3) and image.std() > 0

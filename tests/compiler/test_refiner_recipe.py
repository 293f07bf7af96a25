"""`refiner:` in a recipe: a single SGM refiner file (its configs from the refiner's config repo,
here the tiny refiner's configs on a loopback Hub) builds the same refiner as the builtin; a
refiner of another family, an inpaint checkpoint as a refiner and a refiner on a non-SDXL base are
compile errors with where, what and a hint, and leave no artifact."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_compiler
from tests.helpers.fakehub import FakeHub, tree

REFINER_REPO = "stabilityai/stable-diffusion-xl-refiner-1.0"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny refiner and a tiny SDXL inpaint model as SGM single files."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from compiler.tiny_models import BUILTINS
    from tests.helpers.sgm import pipeline_to_sgm

    root = tmp_path_factory.mktemp("refiner-files")
    save_file(pipeline_to_sgm(BUILTINS["tiny-sdxl-refiner"].build()), root / "tiny-refiner.safetensors")
    inpaint = BUILTINS["tiny-sdxl"].build()
    inpaint.unet = UNet2DConditionModel.from_config({**inpaint.unet.config, "in_channels": 9})
    save_file(pipeline_to_sgm(inpaint), root / "tiny-sdxl-inpaint.safetensors")
    return root


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A Hub of its own whose refiner config repo holds the tiny refiner's configs and tokenizer
    (no weights), as the real repo holds the real refiner's."""
    from compiler.tiny_models import BUILTINS

    folder = tmp_path_factory.mktemp("refiner-configs")
    BUILTINS["tiny-sdxl-refiner"].build().save_pretrained(folder)
    h = FakeHub().start()
    h.repo(REFINER_REPO).push({k: v for k, v in tree(folder).items() if not k.endswith(".safetensors")})
    yield h
    h.stop()


def _compile(tmp_path: Path, hub: FakeHub, text: str, name: str = "r") -> Any:
    recipes = tmp_path / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    (recipes / f"{name}.yaml").write_text(text)
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "UIW_HTTP_RETRIES": "0"}
    return run_compiler(f"recipe={name}", f"recipes_dir={recipes}", home=tmp_path / "home", env=env)


def _tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_single_file_refiner_builds_the_builtins_refiner(tmp_path: Path, hub: FakeHub, files: Path) -> None:
    import torch

    from compiler.tiny_models import BUILTINS

    recipe = f"base: builtin:tiny-sdxl\nprecision: fp32\nrefiner: {files / 'tiny-refiner.safetensors'}\n"
    proc = _compile(tmp_path, hub, recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = Path(proc.stdout.strip())
    lock = json.loads((tmp_path / "recipes" / "r.lock.json").read_text())
    detected = lock["sources"][str(files / "tiny-refiner.safetensors")]["meta"]["detected"]
    assert (detected["kind"], detected["family"], detected["format"]) == ("checkpoint", "sdxl-refiner", "sgm")
    assert any(k.startswith(f"hf://{REFINER_REPO}") for k in lock["sources"])  # its configs, pinned like any source
    manifest = json.loads((artifact / "manifest.json").read_text())
    # The file's OpenCLIP-G and VAE are the base's own weights: stored once.
    assert manifest["refiner"]["shared"] == ["vae", "text_encoder_2", "tokenizer_2"]
    want = BUILTINS["tiny-sdxl-refiner"].build().unet.state_dict()
    got = _tensors(artifact / "refiner" / "unet")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize(
    ("case", "recipe", "what"),
    [
        (
            "another family",
            "base: builtin:tiny-sdxl\nrefiner: builtin:tiny-sdxl\n",
            "is Stable Diffusion XL (sdxl), not an SDXL refiner",
        ),
        (
            "an inpaint checkpoint",
            "base: builtin:tiny-sdxl\nrefiner: {files}/tiny-sdxl-inpaint.safetensors\n",
            "this file is not an SDXL refiner: it is a checkpoint, family sdxl, variant inpaint",
        ),
        (
            "a non-SDXL base",
            "base: builtin:tiny-sd15\nrefiner: builtin:tiny-sdxl-refiner\n",
            "a refiner refines an SDXL base's latents; this base is Stable Diffusion 1.x (sd15)",
        ),
    ],
)
def test_a_wrong_refiner_is_a_compile_error(
    case: str, recipe: str, what: str, tmp_path: Path, hub: FakeHub, files: Path
) -> None:
    proc = _compile(tmp_path, hub, recipe.format(files=files))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{tmp_path / 'recipes' / 'r.yaml'}: refiner" in proc.stderr and what in proc.stderr, proc.stderr
    assert "hint:" in proc.stderr and "Traceback" not in proc.stderr
    artifacts = tmp_path / "home" / "artifacts" / "v1"
    assert not artifacts.exists() or not any(artifacts.iterdir()), "nothing half-written"

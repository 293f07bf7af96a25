"""Single-file checkpoints built the ways users write them: without a base (the family's config
repo, locked and fetched from the Hub), as a UNet alone on a base, with `family:` settling an
ambiguous file and `prediction:` overriding the scheduler's. Served images are compared with the
same weights loaded as a diffusers pipeline (the demo artifact)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from compiler.families import FAMILIES, family_of_repo
from tests.compiler.test_sources import compile_recipe
from tests.conftest import DEMO_SETTINGS, REQ, serve
from tests.helpers.fakehub import FakeHub, tree

SD15_CONFIGS = FAMILIES["sd15"].config_repo.removeprefix("hf://")
RECIPE = "{fields}\n" + DEMO_SETTINGS


@pytest.fixture(scope="module")
def tiny() -> object:
    from compiler.tiny_models import BUILTINS

    return BUILTINS["tiny-sd15"].build()


@pytest.fixture(scope="module")
def config_hub(tmp_path_factory: pytest.TempPathFactory, tiny) -> Iterator[FakeHub]:
    """A Hub whose SD 1.5 config repo holds the tiny model's configs and tokenizer, no weights:
    what a base-less checkpoint of this family is built with (the real repo's files at full size)."""
    folder = tmp_path_factory.mktemp("sd15-configs")
    tiny.save_pretrained(folder)
    files = {p: b for p, b in tree(folder).items() if not p.endswith(".safetensors")}
    hub = FakeHub().start()
    hub.repo(SD15_CONFIGS).push(files)
    yield hub
    hub.stop()


def _write(tmp_path: Path, name: str, state: dict) -> str:
    from safetensors.torch import save_file

    path = tmp_path / "recipes" / "weights" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)
    return f"./weights/{name}"


def _compile(tmp_path: Path, hub: FakeHub, fields: str, *args: str):
    return compile_recipe(tmp_path, tmp_path / "home", hub, "", *args, text=RECIPE.replace("{fields}", fields))


def test_checkpoint_without_base_builds_with_the_family_config_repo(tmp_path, config_hub, tiny, demo_image):
    from tests.helpers.ldm import pipeline_to_ldm

    ckpt = _write(tmp_path, "tiny.safetensors", pipeline_to_ldm(tiny))
    proc = _compile(tmp_path, config_hub, f"checkpoint: {ckpt}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    artifact = Path(proc.stdout.strip())

    lock = json.loads((tmp_path / "recipes" / "r.lock.json").read_text())
    detected = next(e for k, e in lock["sources"].items() if k.endswith("tiny.safetensors"))["meta"]["detected"]
    assert (detected["kind"], detected["family"], detected["format"]) == ("checkpoint", "sd15", "ldm")
    configs = lock["sources"][f"hf://{SD15_CONFIGS}@main"]
    assert configs["kind"] == "repo" and configs["pin"] == f"commit:{config_hub.repos[SD15_CONFIGS].refs['main']}"
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["family"] == "sd15" and manifest["provenance"]["configs"].startswith(f"hf://{SD15_CONFIGS}@main")
    # The same weights as the demo's builtin, so the same pixels.
    assert np.array_equal(serve(tmp_path / "home", artifact, REQ), demo_image)

    # Frozen: the lock holds the config repo too; a rebuild asks the Hub nothing.
    before = len(config_hub.log)
    again = _compile(tmp_path, config_hub, f"checkpoint: {ckpt}", "lock=frozen")
    assert again.returncode == 0 and again.stdout == proc.stdout, again.stderr[-2000:]
    assert len(config_hub.log) == before
    # Locked: the lock covers the recipe (its checkpoint and the derived config repo) exactly.
    strict = _compile(tmp_path, config_hub, f"checkpoint: {ckpt}", "lock=locked")
    assert strict.returncode == 0 and strict.stdout == proc.stdout, strict.stderr[-2000:]

    # A checkpoint swapped for a file that cannot be detected fails the lock, and the config repo's
    # pin stays in the lockfile (the next good compile does not silently move it).
    weights = tmp_path / "recipes" / "weights" / "tiny.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"PK\x03\x04 a zipped pickle")
    bad = _compile(tmp_path, config_hub, f"checkpoint: {ckpt}")
    assert bad.returncode == 2 and "pickle" in bad.stderr, bad.stderr[-2000:]
    after = json.loads((tmp_path / "recipes" / "r.lock.json").read_text())
    assert after["sources"][f"hf://{SD15_CONFIGS}@main"]["pin"] == configs["pin"]
    weights.write_bytes(good)

    # `family:` settles ambiguity; it never contradicts a file whose header is clear.
    wrong = _compile(tmp_path, config_hub, f"checkpoint: {ckpt}\nfamily: sdxl")
    assert wrong.returncode == 2, wrong.stderr
    assert "`family: sdxl` contradicts the file, which is sd15" in wrong.stderr
    assert "cond_stage_model" in wrong.stderr or "CLIP-L" in wrong.stderr  # the evidence


def test_unet_only_file_needs_a_base_and_family_settles_an_ambiguous_width(tmp_path, config_hub, tiny, demo_image):
    from tests.helpers.ldm import unet_to_ldm

    unet = _write(tmp_path, "unet.safetensors", unet_to_ldm(tiny.unet.state_dict(), dict(tiny.unet.config)))
    # Tiny widths match no family's cross-attention width, and no text encoder says which it is.
    amb = _compile(tmp_path, config_hub, f"base: builtin:tiny-sd15\ncheckpoint: {unet}")
    assert amb.returncode == 2
    assert "candidates: sd15, sd2, sdxl, sdxl-refiner" in amb.stderr and "`family:`" in amb.stderr, amb.stderr

    ok = _compile(tmp_path, config_hub, f"base: builtin:tiny-sd15\ncheckpoint: {unet}\nfamily: sd15")
    assert ok.returncode == 0, ok.stderr[-2000:]
    manifest = json.loads((Path(ok.stdout.strip()) / "manifest.json").read_text())
    assert manifest["family"] == "sd15"
    # The file's UNet replaced the base's (same weights here): same pixels as the builtin.
    assert np.array_equal(serve(tmp_path / "home", Path(ok.stdout.strip()), REQ), demo_image)

    # A UNet alone cannot be built without a base (no VAE, no text encoder in the file).
    alone = _compile(tmp_path, config_hub, f"checkpoint: {unet}\nfamily: sd15")
    assert alone.returncode == 2 and "needs `base:`" in alone.stderr, alone.stderr
    # `family:` against a base whose family is known is a contradiction, not an override.
    contra = _compile(tmp_path, config_hub, f"base: builtin:tiny-sd15\ncheckpoint: {unet}\nfamily: sd2")
    assert contra.returncode == 2 and "contradicts builtin:tiny-sd15, which is sd15" in contra.stderr, contra.stderr


def test_prediction_override_reaches_the_scheduler(tmp_path, config_hub, demo_image):
    proc = _compile(tmp_path, config_hub, "base: builtin:tiny-sd15\nprediction: v")
    assert proc.returncode == 0, proc.stderr[-2000:]
    artifact = Path(proc.stdout.strip())
    sched = json.loads((artifact / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    assert not np.array_equal(serve(tmp_path / "home", artifact, REQ), demo_image)
    flow = _compile(tmp_path, config_hub, "base: builtin:tiny-sd15\nprediction: flow")
    assert flow.returncode == 2 and "prediction" in flow.stderr and "'eps' or 'v'" in flow.stderr, flow.stderr


# --- family of a diffusers repo, from its model_index.json and configs (pure) ------------------

SD_UNET = {"cross_attention_dim": 768, "use_linear_projection": False}
SD_TE = {"hidden_act": "quick_gelu"}


@pytest.mark.parametrize(
    ("cls", "configs", "family"),
    [
        ("StableDiffusionPipeline", {"unet/config.json": SD_UNET, "text_encoder/config.json": SD_TE}, "sd15"),
        (
            "StableDiffusionPipeline",
            {"unet/config.json": {"cross_attention_dim": 1024, "use_linear_projection": True}},
            "sd2",
        ),
        # tiny widths: structure decides (SD 2's linear attention projections, OpenCLIP's gelu)
        (
            "StableDiffusionPipeline",
            {
                "unet/config.json": {"cross_attention_dim": 32, "use_linear_projection": True},
                "text_encoder/config.json": {"hidden_act": "gelu"},
            },
            "sd2",
        ),
        (
            "StableDiffusionPipeline",
            {
                "unet/config.json": {"cross_attention_dim": 32, "use_linear_projection": False},
                "text_encoder/config.json": SD_TE,
            },
            "sd15",
        ),
        ("StableDiffusionXLPipeline", {}, "sdxl"),
        ("StableDiffusionXLImg2ImgPipeline", {"text_encoder_2/config.json": {}}, "sdxl-refiner"),
        (
            "StableDiffusionXLImg2ImgPipeline",
            {"text_encoder/config.json": {}, "text_encoder_2/config.json": {}},
            "sdxl",
        ),
        ("FluxPipeline", {"transformer/config.json": {"guidance_embeds": True}}, "flux-dev"),
        ("FluxPipeline", {"transformer/config.json": {"guidance_embeds": False}}, "flux-schnell"),
        ("StableDiffusion3Pipeline", {"transformer/config.json": {"num_layers": 24}}, "sd3"),
        (
            "StableDiffusion3Pipeline",
            {"transformer/config.json": {"num_layers": 24, "dual_attention_layers": [0, 1, 2]}},
            "sd35-medium",
        ),
        ("StableDiffusion3Pipeline", {"transformer/config.json": {"num_layers": 38}}, "sd35-large"),
    ],
)
def test_family_of_a_diffusers_repo(cls, configs, family):
    assert family_of_repo(cls, configs).family == family


def test_family_of_a_repo_that_cannot_tell_lists_candidates():
    found = family_of_repo("StableDiffusionPipeline", {"unet/config.json": {"cross_attention_dim": 32}})
    assert found.family is None and found.candidates == ("sd15", "sd2")
    assert family_of_repo("KandinskyPipeline", {}).family is None


# --- which config repo a base-less checkpoint locks, for every family's real layout (pure) -----

CONFIG_REPO_CASES = {
    "sd15-ldm": "hf://stable-diffusion-v1-5/stable-diffusion-v1-5@main",
    "sd15-inpaint": "hf://stable-diffusion-v1-5/stable-diffusion-inpainting@main",
    "sd2-ldm": "hf://stabilityai/stable-diffusion-2-1@main",
    "sdxl-sgm": "hf://stabilityai/stable-diffusion-xl-base-1.0@main",
    "sdxl-inpaint": "hf://diffusers/stable-diffusion-xl-1.0-inpainting-0.1@main",
    "sdxl-refiner": "hf://stabilityai/stable-diffusion-xl-refiner-1.0@main",
    "sd3-comfyui": "hf://stabilityai/stable-diffusion-3-medium-diffusers@main",
    "sd35-medium": "hf://stabilityai/stable-diffusion-3.5-medium@main",
    "sd35-large": "hf://stabilityai/stable-diffusion-3.5-large@main",
    "flux-dev": "hf://black-forest-labs/FLUX.1-dev@main",
    "flux-schnell": "hf://black-forest-labs/FLUX.1-schnell@main",
    "flux-fill": "hf://black-forest-labs/FLUX.1-Fill-dev@main",
}


def _entry(case_name: str):
    from compiler.detect import detect
    from compiler.lockfile import LockEntry
    from tests.helpers.detect_cases import CASES

    found = next(c for c in CASES if c.name == case_name).keys()
    return detect(found), LockEntry(
        source="/m/x.safetensors", kind="file", pin="sha256:0", meta={"detected": detect(found).as_json("")}
    )


@pytest.mark.parametrize(("case", "repo"), CONFIG_REPO_CASES.items())
def test_a_base_less_checkpoint_locks_its_family_config_repo(case, repo):
    from compiler.pinning import configs_source
    from compiler.recipe import parse_recipe
    from tests.helpers.detect_cases import FIXTURES

    if not FIXTURES.is_dir():
        pytest.skip("fixtures not found")
    _, entry = _entry(case)
    recipe = parse_recipe("r", Path("/m/r.yaml"), {"checkpoint": "./x.safetensors"})
    assert str(configs_source(recipe, entry)) == repo


@pytest.mark.parametrize("case", ["sdxl-refiner"])
def test_models_that_cannot_serve_txt2img_are_refused_at_plan(case):
    from compiler.errors import UserError
    from compiler.plan import make_plan
    from compiler.recipe import parse_recipe
    from compiler.sources.base import Pinned, Resolved
    from tests.helpers.detect_cases import FIXTURES

    if not FIXTURES.is_dir():
        pytest.skip("fixtures not found")
    found, _ = _entry(case)
    recipe = parse_recipe("r", Path("/m/r.yaml"), {"checkpoint": "./x.safetensors"})
    base = Resolved(pin="files:sha256:0", inputs=(), family=str(found.family), native_size=(1024, 1024))
    with pytest.raises(UserError) as e:
        make_plan(recipe, base, None, Pinned(pin="files:sha256:1", inputs=()), found)
    assert "cannot serve text-to-image" in str(e.value) or "only does" in str(e.value), str(e.value)


def test_only_a_file_that_says_v_overrides_the_base_prediction():
    from compiler.detect import Detection
    from compiler.plan import make_plan
    from compiler.recipe import parse_recipe
    from compiler.sources.base import Pinned, Resolved

    base = Resolved(pin="files:sha256:0", inputs=(), family="sdxl", native_size=(1024, 1024))
    ckpt = Pinned(pin="files:sha256:1", inputs=())
    recipe = parse_recipe("r", Path("/m/r.yaml"), {"base": "hf://a/b", "checkpoint": "./x.safetensors"})

    def plan(prediction: str | None, override: str | None = None):
        r = recipe.model_copy(update={"prediction": override})
        return make_plan(r, base, None, ckpt, Detection("checkpoint", "sdxl", "sgm", prediction=prediction))

    assert plan("v").prediction == "v" and "prediction-v" in plan("v").steps
    assert plan("eps").prediction is None, "eps may be the family's default: the base's config stays"
    assert plan("eps", override="v").prediction == "v" and plan("v", override="eps").prediction == "eps"

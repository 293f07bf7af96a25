"""SD 3 Medium, SD 3.5 Medium and SD 3.5 Large single files in ComfyUI's all-in-one layout (the
MMDiT, the VAE and all three text encoders in one file; tests/helpers/comfyui.py writes it), built
without a base: each family's own config repo is locked from the Hub, diffusers' loader converts
the file, and the handler serves what plain diffusers draws with the same weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compiler.families import FAMILIES
from tests.helpers.fakehub import FakeHub
from tests.helpers.singlefile_serving import (
    JOB,
    assert_close,
    compiled,
    config_folder,
    detected,
    push_config_repo,
    reference,
    served,
    write_weights,
)

# family -> the MMDiT settings that tell it apart (as diffusers' converter infers them from a file)
VARIANTS: dict[str, dict[str, Any]] = {
    "sd3": {},
    "sd35-medium": {"dual_attention_layers": (0,), "qk_norm": "rms_norm"},
    "sd35-large": {"qk_norm": "rms_norm"},
}


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    from compiler.tiny_models_sd import build_tiny_sd3

    return {family: build_tiny_sd3(**settings) for family, settings in VARIANTS.items()}


@pytest.fixture(scope="module")
def sd3_hub(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Any]) -> Iterator[tuple[FakeHub, Path]]:
    """A Hub holding each family's config repo with its tiny model's configs and tokenizers, and
    the tiny models saved whole (diffusers folders) beside it: ``root/<family>``."""
    root = tmp_path_factory.mktemp("sd3")
    hub = FakeHub().start()
    for family, pipe in tiny.items():
        pipe.save_pretrained(root / family)
        push_config_repo(hub, family, config_folder(pipe, root / f"{family}-configs"))
    yield hub, root
    hub.stop()


# SD 3 Medium runs in the default suite; the 3.5 families (one more compile each) are slow-marked.
@pytest.mark.parametrize("family", [pytest.param(f, marks=[pytest.mark.slow] if f != "sd3" else []) for f in VARIANTS])
def test_comfyui_file_serves_the_diffusers_pixels(family, tmp_path, tiny, sd3_hub, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    from tests.helpers.comfyui import pipeline_to_comfyui

    hub, root = sd3_hub
    write_weights(tmp_path, "sd3.safetensors", pipeline_to_comfyui(tiny[family]))
    artifact = compiled(tmp_path, hub, "checkpoint: ./weights/sd3.safetensors")
    found = detected(tmp_path, "sd3.safetensors")
    assert (found["kind"], found["family"], found["format"], found["prediction"]) == (
        "checkpoint",
        family,
        "comfyui",
        "flow",
    )
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert (manifest["family"], manifest["pipeline_class"]) == (family, "StableDiffusion3Pipeline")
    assert manifest["provenance"]["configs"].startswith(FAMILIES[family].config_repo)
    assert manifest["serving"]["scheduler"] == "FLOW_MATCH_EULER"

    # The same weights as a plain diffusers folder (no single-file conversion on this side).
    ref = StableDiffusion3Pipeline.from_pretrained(root / family)
    assert_close(served(artifact, tmp_path / "serve", JOB, monkeypatch), reference(ref, JOB))


@pytest.mark.slow  # one more compile
def test_a_file_without_t5_builds_without_it_as_diffusers_runs_it(tmp_path, tiny, sd3_hub, monkeypatch):
    """SD 3's "incl_clips" files leave T5 out: the artifact has no text_encoder_3 (diffusers'
    documented `text_encoder_3=None`), and serves what diffusers draws without it."""
    from diffusers import StableDiffusion3Pipeline

    from tests.helpers.comfyui import pipeline_to_comfyui

    hub, root = sd3_hub
    write_weights(tmp_path, "clips.safetensors", pipeline_to_comfyui(tiny["sd3"], t5=False))
    artifact = compiled(tmp_path, hub, "checkpoint: ./weights/clips.safetensors")
    index = json.loads((artifact / "pipeline" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert not (artifact / "pipeline" / "text_encoder_3").exists()

    ref = StableDiffusion3Pipeline.from_pretrained(root / "sd3", text_encoder_3=None, tokenizer_3=None)
    assert_close(served(artifact, tmp_path / "serve", JOB, monkeypatch), reference(ref, JOB))

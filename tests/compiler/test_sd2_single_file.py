"""SD 2.x single files (LDM layout, OpenCLIP text encoder) built without a base: the SD 2.1 config
repo (768-v: DDIM with v-prediction) is locked from the Hub, the file is converted by diffusers'
own loader, and the handler serves what plain diffusers draws from the same file. A 512 "base"
model predicts epsilon: `prediction: eps` says so, and reaches the scheduler."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
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


@pytest.fixture(scope="module")
def tiny_sd2() -> Any:
    from compiler.tiny_models import BUILTINS

    return BUILTINS["tiny-sd2"].build()


@pytest.fixture(scope="module")
def sd2_hub(tmp_path_factory: pytest.TempPathFactory, tiny_sd2: Any) -> Iterator[tuple[FakeHub, Path]]:
    """A Hub whose SD 2.1 config repo holds the tiny model's configs and tokenizer (no weights)."""
    folder = config_folder(tiny_sd2, tmp_path_factory.mktemp("sd2") / "configs")
    hub = FakeHub().start()
    push_config_repo(hub, "sd2", folder)
    yield hub, folder
    hub.stop()


@pytest.mark.slow  # two compiles and two serves: ~60 s on a loaded machine
def test_sd2_checkpoint_serves_diffusers_pixels_as_v_and_as_eps(tmp_path, tiny_sd2, sd2_hub, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from tests.helpers.ldm_sd2 import pipeline_to_ldm_sd2

    hub, configs = sd2_hub
    file = write_weights(tmp_path, "sd21.safetensors", pipeline_to_ldm_sd2(tiny_sd2))
    v_artifact = compiled(tmp_path, hub, "checkpoint: ./weights/sd21.safetensors")
    found = detected(tmp_path, "sd21.safetensors")
    assert (found["kind"], found["family"], found["format"]) == ("checkpoint", "sd2", "ldm")
    manifest = json.loads((v_artifact / "manifest.json").read_text())
    assert manifest["family"] == "sd2" and manifest["provenance"]["configs"].startswith(FAMILIES["sd2"].config_repo)
    assert manifest["serving"]["scheduler"] == "DDIM"  # SD 2.1's own
    sched = json.loads((v_artifact / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"

    # The same file, read by plain diffusers with the same config folder.
    ref = StableDiffusionPipeline.from_single_file(str(file), config=str(configs), local_files_only=True)
    assert ref.scheduler.config.prediction_type == "v_prediction"
    v_image = served(v_artifact, tmp_path / "serve", JOB, monkeypatch)
    assert_close(v_image, reference(ref, JOB, "DDIMScheduler"))

    # A 512 base model: same layout, epsilon prediction, said by the recipe.
    eps_artifact = compiled(tmp_path, hub, "checkpoint: ./weights/sd21.safetensors\nprediction: eps", name="eps")
    sched = json.loads((eps_artifact / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "epsilon"
    eps_image = served(eps_artifact, tmp_path / "serve", JOB, monkeypatch)
    ref.scheduler.register_to_config(prediction_type="epsilon")
    assert_close(eps_image, reference(ref, JOB, "DDIMScheduler"))
    assert np.abs(eps_image.astype(int) - v_image.astype(int)).max() > 8, "the prediction type changed nothing"

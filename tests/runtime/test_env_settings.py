"""The template's settings, parsed (runtime.settings) and turned into a recipe (runtime.envrecipe):
UIW_MODEL/UIW_LORAS/UIW_RECIPE, the network volume's store, the image's store, RunPod's cached
models; a bad value stops the worker at start with a hint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runtime.envrecipe import cached_source, recipe_text, role_of
from runtime.settings import (
    LoraSpec,
    SettingError,
    image_home,
    model_spec,
    store_home,
    url_expires,
)
from tests.helpers.devserver import refused_start


def test_model_shorthand_parses():
    spec = model_spec(
        {
            "UIW_MODEL": "civitai://models/4201",
            "UIW_LORAS": "civitai://models/58390:0.5, hf://org/repo/lora.safetensors,urn:air:sd1:lora:civitai:1@2",
            "UIW_PRECISION": "FP16",
        }
    )
    assert spec is not None and spec.name == "model" and spec.precision == "fp16"
    assert spec.loras == (
        LoraSpec("civitai://models/58390", 0.5),
        LoraSpec("hf://org/repo/lora.safetensors", None),
        LoraSpec("urn:air:sd1:lora:civitai:1@2", None),
    )
    assert model_spec({"UIW_PRECISION": "fp16", "UIW_LORAS": ""}) is None  # a template's defaults alone
    assert model_spec({"UIW_RECIPE": "/app/recipes/examples/flux-schnell.yaml"}).name == "flux-schnell"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"UIW_MODEL": "a", "UIW_RECIPE": "b"}, "both set"),
        ({"UIW_RECIPE": "base: x\n", "UIW_LORAS": "y"}, "UIW_LORAS goes with UIW_MODEL"),
        ({"UIW_MODEL": "a", "UIW_PRECISION": "int4"}, "UIW_PRECISION='int4'"),
        ({"UIW_MODEL": "a", "UIW_RECIPE_NAME": "../x"}, "UIW_RECIPE_NAME"),
        ({"UIW_MODEL": "a", "UIW_LORAS": "civitai://models/1:99"}, "out of range"),
        ({"UIW_UPLOAD_URL_EXPIRES": "604801"}, "UIW_UPLOAD_URL_EXPIRES"),
    ],
)
def test_bad_values_are_setting_errors(env, words):
    with pytest.raises(SettingError, match="hint:") as e:
        model_spec(env)
        url_expires(env)
    assert words in str(e.value)


def test_a_bad_model_setting_stops_the_worker_at_start(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("UIW_")}
    proc = refused_start({**env, "UIW_HOME": str(tmp_path), "UIW_MODEL": "x", "UIW_RECIPE": "y"}, "UIW_MODEL")
    assert "UIW_RECIPE and UIW_MODEL are both set" in proc.stderr


def test_the_store_is_on_the_volume_unless_uiw_home_says(tmp_path: Path):
    volume = tmp_path / "vol"
    assert store_home({"UIW_VOLUME": str(volume), "UIW_IMAGE_HOME": "/img"}) == Path("/img")  # no volume mounted
    volume.mkdir()
    assert store_home({"UIW_VOLUME": str(volume), "UIW_IMAGE_HOME": "/img"}) == volume / "uiw"
    assert image_home({"UIW_VOLUME": str(volume), "UIW_IMAGE_HOME": "/img"}) == Path("/img")
    assert store_home({"UIW_VOLUME": str(volume), "UIW_HOME": str(tmp_path / "h")}) == tmp_path / "h"
    assert image_home({"UIW_IMAGE_HOME": "/img"}) is None  # the image's store is the home: nothing first


def test_sources_take_their_recipe_role(tmp_path: Path):
    assert role_of("hf://org/repo") == role_of("hf://org/repo@abc") == role_of("builtin:tiny-sd15") == "base"
    assert role_of("hf://org/repo/unet/x.safetensors") == role_of("civitai://models/4201") == "checkpoint"
    assert role_of("urn:air:sdxl:checkpoint:civitai:101055@128078") == "checkpoint"
    assert role_of("https://example.com/m.safetensors") == role_of(str(tmp_path / "m.safetensors")) == "checkpoint"
    assert role_of(str(tmp_path)) == "base"


def test_runpods_cached_models_become_local_sources(tmp_path: Path):
    cache = tmp_path / "huggingface-cache" / "hub"
    repo = cache / "models--org--repo"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123\n")
    (repo / "snapshots" / "abc123" / "unet").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "unet" / "w.safetensors").write_bytes(b"x")
    assert cached_source("hf://org/repo", cache) == str(repo / "snapshots" / "abc123")
    assert cached_source("hf://org/repo/unet/w.safetensors", cache).endswith("abc123/unet/w.safetensors")
    assert cached_source("hf://org/repo@abc123", cache) == str(repo / "snapshots" / "abc123")
    assert cached_source("hf://org/other", cache) == "hf://org/other"  # not cached: the Hub
    assert cached_source("hf://org/repo@v2", cache) == "hf://org/repo@v2"
    spec = model_spec({"UIW_MODEL": "hf://org/repo", "UIW_LORAS": "civitai://models/2:0.7"})
    assert spec is not None
    recipe = json.loads(recipe_text(spec, tmp_path, {}))
    assert recipe == {
        "base": str(repo / "snapshots" / "abc123"),
        "loras": [{"source": "civitai://models/2", "scale": 0.7}],
    }


def test_uiw_recipe_is_text_a_file_or_unreadable(tmp_path: Path):
    text = "base: builtin:tiny-sd15\nprecision: fp32\n"
    assert recipe_text(model_spec({"UIW_RECIPE": text}), None, {}) == text.strip()  # as the variable holds it
    f = tmp_path / "mine.yaml"
    f.write_text(text)
    assert recipe_text(model_spec({"UIW_RECIPE": str(f)}), None, {}) == text
    with pytest.raises(SettingError, match="neither YAML text nor a readable file"):
        recipe_text(model_spec({"UIW_RECIPE": str(tmp_path / "missing.yaml")}), None, {})

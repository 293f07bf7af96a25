"""Pipelines no family serves (tests/helpers/zoo.py), compiled from local folders into generic
artifacts and served through runtime.handler.handler: the served pixels are plain diffusers' for
the same arguments and generator, `describe` shows the parameters read from each pipeline's
__call__, one of them changes the output as it does in plain diffusers, and what a pipeline does
not take is refused before any model work."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import decode_image, run_compiler
from tests.helpers.zoo import ZOO

DEFAULT = ("pixart-sigma", "aura-flow", "chroma", "lumina2", "hunyuan-dit")
HEAVY = ("sana", "cogview4")  # a second or more per call here: run with -m slow
NAMES = [*DEFAULT, *(pytest.param(n, marks=pytest.mark.slow) for n in HEAVY)]
REQUEST = {
    "prompt": "a photo of a red fox in the snow with a blue dog",
    "seed": 5,
    "num_inference_steps": 2,
    "width": 96,
    "height": 64,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """name -> its compiled artifact, compiled on first use into one store, which the in-process
    worker then serves (every compiled recipe, by name). The first is compiled by the CLI as a
    user does; the rest through compiler.build, the library the CLI wraps (one torch import)."""
    import runtime.service as service

    tmp = tmp_path_factory.mktemp("generic")
    home, recipes = tmp / "home", tmp / "recipes"
    recipes.mkdir()
    built: dict[str, Path] = {}
    saved = {k: os.environ.get(k) for k in ("UIW_ARTIFACTS", "UIW_HOME")}
    # The session's service (tests/conftest.py service_env) is put back after: tests that patch it
    # must find it still the one the handler serves with.
    saved_service = service._service

    def compiled(name: str) -> Path:
        if name not in built:
            folder = ZOO[name].save(tmp / "models" / name)
            (recipes / f"{name}.yaml").write_text(f"base: {folder}\nprecision: fp32\n")
            argv = [f"recipe={name}", f"recipes_dir={recipes}", f"home={home}"]
            if not built:
                proc = run_compiler(*argv[:2], home=home)
                assert proc.returncode == 0, proc.stderr[-3000:]
                built[name] = Path(proc.stdout.strip())
            else:
                from compiler.build import build

                built[name] = build(argv)
            os.environ["UIW_ARTIFACTS"] = ",".join(built)
            os.environ["UIW_HOME"] = str(home)
            service._service = None  # the next request starts a worker that serves them all
        return built[name]

    yield compiled
    service._service = saved_service
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def handle(job_input: dict[str, Any]) -> dict[str, Any]:
    from runtime.handler import handler

    return asyncio.run(handler({"id": "generic", "input": job_input}))


def plain(folder: Path, name: str, **kwargs: Any) -> np.ndarray:
    """The plain diffusers call on the source folder, as a diffusers user makes it."""
    import diffusers
    import torch

    pipe = getattr(diffusers, ZOO[name].pipeline_class).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    seed = kwargs.pop("seed")
    with torch.inference_mode():
        out = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed))
    return np.array(out.images[0])


def served(name: str, **fields: Any) -> np.ndarray:
    reply = handle({"model": name, **fields})
    assert "images" in reply, reply
    return decode_image(reply["images"][0])


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


@pytest.mark.parametrize("name", NAMES)
def test_manifest_records_the_generic_family_and_the_call_schema(store, name):
    manifest = json.loads((store(name) / "manifest.json").read_text())
    cls = ZOO[name].pipeline_class
    assert (manifest["family"], manifest["pipeline_class"]) == (f"generic:{cls}", cls)
    call = manifest["call"]
    assert call["mapped"]["prompt"] == "prompt" and call["mapped"]["num_images"] == "num_images_per_prompt"
    extras = {p["name"]: p for p in call["extras"]}
    assert ZOO[name].extra[0] in extras
    assert not any("latents" in n or "embeds" in n or "callback" in n for n in extras)
    assert "txt2img" in manifest["capabilities"]["tasks"]


@pytest.mark.parametrize("name", NAMES)
def test_served_image_is_plain_diffusers_and_an_extra_parameter_acts(store, name):
    artifact = store(name)
    folder = artifact.parents[3] / "models" / name
    tiny = ZOO[name]
    request = {**REQUEST, **tiny.request}
    image = served(name, **request)
    assert close(image, plain(folder, name, **request))
    param, value = tiny.extra
    changed = served(name, **request, **{param: value})
    assert not np.array_equal(image, changed), f"{param}={value} changed nothing"
    assert close(changed, plain(folder, name, **request, **{param: value}))


@pytest.mark.parametrize("name", DEFAULT[:2])
def test_describe_publishes_the_pipelines_own_parameters(store, name):
    store(name)
    reply = handle({"describe": True, "model": name})
    (artifact,) = reply["artifacts"].values()
    assert artifact["family"] == f"generic:{ZOO[name].pipeline_class}"
    props = artifact["schema"]["properties"]
    param, _ = ZOO[name].extra
    assert param in props and "the pipeline's own" in props[param]["description"]
    assert "latents" not in props and "prompt_embeds" not in props and "output_type" not in props


def test_requests_the_pipeline_does_not_take_are_refused_before_model_work(store):
    store("pixart-sigma")
    wrong = handle({"model": "pixart-sigma", "prompt": "x", "latents": [1, 2]})
    assert wrong["error"].startswith("Unexpected input. latents is not a valid input option."), wrong
    typed = handle({"model": "pixart-sigma", "prompt": "x", "use_resolution_binning": "no"})
    assert "use_resolution_binning" in typed["error"], typed
    bounded = handle({"model": "pixart-sigma", "prompt": "x", "max_sequence_length": 301})
    assert "max_sequence_length" in bounded["error"], bounded
    # PixArt's VAE (8x) and its transformer's 2x2 patches: sizes are multiples of 16.
    size = handle({"model": "pixart-sigma", "prompt": "x", "width": 72})
    assert "width" in size["error"] and "multiple of 16" in size["error"], size
    task = handle({"model": "pixart-sigma", "prompt": "x", "image_url": "data:image/png;base64,AAAA"})
    assert "img2img task is not supported" in task["error"] and "txt2img" in task["error"], task


def test_a_scheduler_outside_the_compatibles_is_refused_with_the_accepted_ones(store):
    store("aura-flow")  # flow matching: only FlowMatchEulerDiscreteScheduler is compatible
    reply = handle({"model": "aura-flow", "prompt": "x", "scheduler": "K_EULER"})
    assert "scheduler" in reply["error"] and "FLOW_MATCH_EULER" in reply["error"], reply


def test_img2img_runs_through_the_sibling_diffusers_maps_the_class_to(store):
    """Chroma's AutoPipeline sibling (ChromaImg2ImgPipeline), derived at load with from_pipe."""
    import base64
    import io

    import diffusers
    import torch
    from PIL import Image

    artifact = store("chroma")
    folder = artifact.parents[3] / "models" / "chroma"
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    buf = io.BytesIO()
    source.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    image = served("chroma", **REQUEST, image_url=uri, strength=0.6)
    pipe = diffusers.ChromaImg2ImgPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    args = {k: v for k, v in REQUEST.items() if k != "seed"}
    with torch.inference_mode():
        out = pipe(**args, image=source, strength=0.6, generator=torch.Generator("cpu").manual_seed(REQUEST["seed"]))
    assert close(image, np.array(out.images[0]))

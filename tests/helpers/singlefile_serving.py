"""What the single-file build tests of each family share: a tiny pipeline's configs served as its
family's config repo by the fake Hub, a single file compiled with the CLI, one job through the
RunPod handler, and plain diffusers' image for the same job to compare with."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np

from compiler.families import FAMILIES
from tests.conftest import decode_image
from tests.helpers.fakehub import FakeHub, tree

# One worker-sdxl job at the tiny models' size: a negative prompt, so classifier-free guidance runs.
JOB: dict[str, Any] = {
    "prompt": "a photo of a cat",
    "negative_prompt": "blurry",
    "width": 64,
    "height": 64,
    "num_inference_steps": 3,
    "guidance_scale": 6.0,
    "seed": 7,
}
SETTINGS = """
precision: fp32
defaults:
  steps: 3
"""


def config_folder(pipe: Any, folder: Path) -> Path:
    """The pipeline saved without its weights: the config repo a single file of it is built with."""
    pipe.save_pretrained(folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    return folder


def push_config_repo(hub: FakeHub, family: str, folder: Path) -> str:
    """``folder`` as ``family``'s config repo (its real repo id) on the fake Hub: the repo id."""
    repo = FAMILIES[family].config_repo.removeprefix("hf://")
    hub.repo(repo).push(tree(folder))
    return repo


def write_weights(tmp_path: Path, name: str, state: dict[str, Any]) -> Path:
    """``state`` as ``tmp_path/recipes/weights/NAME`` (a recipe names it ``./weights/NAME``)."""
    from safetensors.torch import save_file

    path = tmp_path / "recipes" / "weights" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)
    return path


def compiled(tmp_path: Path, hub: FakeHub, fields: str, name: str = "r") -> Path:
    """``fields`` + SETTINGS compiled with the CLI against ``hub``: the artifact's folder."""
    from tests.compiler.test_sources import compile_recipe

    proc = compile_recipe(tmp_path, tmp_path / "home", hub, "", name=name, text=fields + "\n" + SETTINGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip())


def detected(tmp_path: Path, file: str, name: str = "r") -> dict[str, Any]:
    """What the lockfile recorded detection said about the source whose path ends in ``file``."""
    lock = json.loads((tmp_path / "recipes" / f"{name}.lock.json").read_text())
    return next(e for k, e in lock["sources"].items() if k.endswith(file))["meta"]["detected"]


def served(artifact: Path, home: Path, job: dict[str, Any], monkeypatch: Any) -> np.ndarray:
    """One job through the real RunPod handler, served from ``artifact``: its image."""
    import runtime.service as service
    from runtime.handler import handler

    monkeypatch.setattr(service, "_service", service.Service(service.Settings(artifacts=(str(artifact),), home=home)))
    reply = asyncio.run(handler({"id": "test", "input": job}))
    assert "images" in reply, reply
    return decode_image(reply["images"][0])


def reference(pipe: Any, job: dict[str, Any], scheduler: str | None = None) -> np.ndarray:
    """Plain diffusers' image for ``job``: ``pipe``'s own call with the job's settings and a CPU
    generator seeded as the worker seeds (``scheduler``: a diffusers class made from the
    pipeline's scheduler config, as any user switches schedulers)."""
    import diffusers
    import torch

    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        job["prompt"],
        negative_prompt=job["negative_prompt"],
        width=job["width"],
        height=job["height"],
        num_inference_steps=job["num_inference_steps"],
        guidance_scale=job["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(job["seed"]),
    ).images[0]
    return np.array(image)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """Within 1/255 per channel (the same model, reached through two loaders), and a real image."""
    assert got.shape == want.shape
    diff = np.abs(got.astype(int) - want.astype(int)).max()
    assert diff <= 1, f"pixels differ by up to {diff}/255"
    assert got.std() > 1, "a blank image"

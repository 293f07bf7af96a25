"""FLUX.1 Fill, end to end: the tiny Fill model as a local diffusers folder and as the builtin,
compiled by the CLI, served through the RunPod handler for inpaint, img2img and txt2img, and
compared with plain diffusers' FluxFillPipeline on the same folder (same arguments, generator)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import compile_text
from tests.helpers.inpaint import jobs, reference, serve_all, within_one_level

TASKS = ["inpaint", "img2img", "txt2img"]


@pytest.fixture(scope="module")
def fill_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from compiler.tiny_models import BUILTINS

    folder = tmp_path_factory.mktemp("fill") / "tiny-flux-fill"
    BUILTINS["tiny-flux-fill"].build().save_pretrained(folder)
    return folder


def _compile(tmp_path: Path, name: str, base: str) -> Path:
    proc = compile_text(tmp_path, name, f"base: {base}\nprecision: fp32\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Path(proc.stdout.strip())


def test_fill_folder_builds_and_serves_every_task_as_diffusers(tmp_path, fill_folder, monkeypatch):
    from diffusers import FluxFillPipeline

    artifact = _compile(tmp_path, "fill", str(fill_folder))
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert (manifest["family"], manifest["pipeline_class"]) == ("flux-fill", "FluxFillPipeline")
    assert manifest["capabilities"] == {"tasks": TASKS, "pipelines": dict.fromkeys(TASKS, "FluxFillPipeline")}
    # diffusers' documented Fill settings: 50 steps, guidance 30 (distilled: one pass per step).
    defaults = manifest["serving"]["defaults"]
    assert (defaults["steps"], defaults["guidance_scale"]) == (50, 30.0)

    replies = serve_all(artifact, tmp_path / "home", jobs(steps=2), monkeypatch)
    ref = FluxFillPipeline.from_pretrained(fill_folder)
    ref.set_progress_bar_config(disable=True)
    for task in TASKS:
        within_one_level(replies[task], reference(ref, task, steps=2, guidance_scale=30.0))


@pytest.mark.slow
def test_the_fill_builtin_serves_what_its_folder_serves(tmp_path, fill_folder, monkeypatch):
    job = {"inpaint": jobs(steps=2)["inpaint"]}
    replies = [
        serve_all(_compile(tmp_path, n, b), tmp_path / "home", job, monkeypatch)
        for n, b in (("a", str(fill_folder)), ("b", "builtin:tiny-flux-fill"))
    ]
    assert replies[0]["inpaint"]["images"] == replies[1]["inpaint"]["images"]


def test_a_fill_model_refuses_controlnets_before_any_build(tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "recipes").mkdir()
    save_file({"controlnet_x_embedder.weight": torch.zeros(4, 4)}, tmp_path / "recipes" / "cn.safetensors")
    proc = compile_text(tmp_path, "fill", "base: builtin:tiny-flux-fill\ncontrolnets:\n  - source: ./cn.safetensors\n")
    assert proc.returncode == 2, proc.stderr
    assert "FluxFillPipeline, which takes no ControlNet" in proc.stderr and "hint:" in proc.stderr, proc.stderr
    assert not list((tmp_path / "home").glob("artifacts/v1/*")), "nothing half-written in the store"

"""An SD 1.5 checkpoint stored in fp8 (e4m3fn), as some CivitAI uploads are: built without a base
(the family's config repo from the test Hub), every weight is the file's fp8 number cast to the
build's precision (``tensor.to(fp32)``, exact), the manifest says so, and the RunPod handler draws
what plain diffusers draws with those weights."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from tests.compiler.test_single_file import _compile, _write, config_hub, tiny  # noqa: F401 (fixtures)
from tests.conftest import REQ, decode_image


def _rounded(state: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: v.to(torch.float8_e4m3fn).float() if v.is_floating_point() else v for k, v in state.items()}


def test_fp8_sd15_checkpoint_builds_in_fp32_with_the_file_values(tmp_path, config_hub, tiny, monkeypatch):  # noqa: F811
    import torch
    from diffusers import EulerDiscreteScheduler

    import runtime.service as service
    from compiler.tiny_models import BUILTINS
    from runtime.handler import handler
    from tests.helpers.generation import reference_image
    from tests.helpers.ldm import pipeline_to_ldm

    state = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in pipeline_to_ldm(tiny).items()}
    ckpt = _write(tmp_path, "tiny-fp8.safetensors", state)
    proc = _compile(tmp_path, config_hub, f"checkpoint: {ckpt}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = Path(proc.stdout.strip())
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert re.fullmatch(r"source fp8 e4m3fn \(\d+ tensors\) -> fp32", manifest["conversions"]["checkpoint"])

    from safetensors.torch import load_file

    saved = load_file(next((artifact / "pipeline" / "unet").glob("*.safetensors")))
    want = _rounded(tiny.unet.state_dict())
    assert set(saved) == set(want) and all(torch.equal(saved[k], want[k]) for k in want)

    settings = service.Settings(artifacts=(str(artifact),), home=tmp_path / "home")
    monkeypatch.setattr(service, "_service", service.Service(settings))
    reply = asyncio.run(handler({"id": "t", "input": dict(REQ)}))
    assert "images" in reply, reply
    served = decode_image(reply["images"][0])

    ref = BUILTINS["tiny-sd15"].build()
    for name in ("unet", "vae", "text_encoder"):
        getattr(ref, name).load_state_dict(_rounded(getattr(ref, name).state_dict()))
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expected = np.array(reference_image(ref, REQ["prompt"], "blurry, low quality", seed=REQ["seed"]))
    assert served.std() > 1 and np.abs(served.astype(int) - expected.astype(int)).max() <= 1

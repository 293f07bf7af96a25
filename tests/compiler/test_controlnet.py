"""ControlNets stored in the artifact and applied per request: the served image has the
requested size, a ControlNet at scale 0 gives the base image and at scale > 0 another, and the
process holds one UNet (the ControlNet pipeline is derived from the loaded one)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import DEMO_SETTINGS, REQ, compile_text, decode_image

RECIPE = (
    "base: builtin:tiny-sd15\n"
    + DEMO_SETTINGS
    + """controlnets:
  - source: ./edges.safetensors
    scale: 0.9
  - source: ./edges.safetensors
    name: edges-soft
    scale: 0.3
"""
)


@pytest.fixture(scope="module")
def controlnet_file(tmp_path_factory) -> Path:
    """A ControlNet for the tiny SD 1.5 (diffusers' from_unet), with seeded non-zero output convs
    so that it changes the image (a fresh one starts with zero convs: no effect)."""
    from diffusers import ControlNetModel

    from compiler.tiny_models import BUILTINS

    unet = BUILTINS["tiny-sd15"].build().unet
    torch.manual_seed(77)
    cn = ControlNetModel.from_unet(unet).eval()
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if "zero_conv" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("cn") / "edges.safetensors"
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, controlnet_file) -> Path:
    tmp = tmp_path_factory.mktemp("cn-build")
    (tmp / "recipes").mkdir()
    (tmp / "recipes" / "edges.safetensors").write_bytes(controlnet_file.read_bytes())
    proc = compile_text(tmp, "r", RECIPE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip())


def test_controlnet_is_stored_with_its_weights(artifact, controlnet_file):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["controlnets"] == [
        {"name": "edges", "scale": 0.9, "path": "controlnets/edges"},
        {"name": "edges-soft", "scale": 0.3, "path": "controlnets/edges-soft"},
    ]
    assert "controlnet" in manifest["capabilities"]["tasks"]
    assert manifest["capabilities"]["pipelines"]["controlnet"] == "StableDiffusionControlNetPipeline"
    stored = load_file(artifact / "controlnets" / "edges" / "diffusion_pytorch_model.safetensors")
    given = load_file(controlnet_file)
    assert set(stored) == set(given) and all(torch.equal(stored[k], given[k]) for k in given)


def _png(seed: int = 3) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_controlnet_requests(artifact, demo_image):
    from runtime.service import Service, Settings

    svc = Service(Settings(artifacts=(str(artifact),), home=artifact.parents[2]))
    plain = svc.run(REQ)
    assert np.array_equal(decode_image(plain["images"][0]), demo_image), "no ControlNet asked: the base image"
    zero = svc.run({**REQ, "controlnets": [{"name": "edges", "image": _png(), "scale": 0.0}]})
    assert "images" in zero, zero
    assert np.abs(decode_image(zero["images"][0]).astype(int) - demo_image.astype(int)).max() <= 1
    on = svc.run({**REQ, "width": 96, "height": 64, "controlnets": [{"name": "edges", "image": _png()}]})
    assert "images" in on, on
    img = decode_image(on["images"][0])
    assert img.shape == (64, 96, 3)
    again = svc.run({**REQ, "width": 96, "height": 64, "controlnets": [{"name": "edges", "image": _png()}]})
    assert again["images"] == on["images"]
    same_size = svc.run({**REQ, "controlnets": [{"name": "edges", "image": _png()}]})
    assert not np.array_equal(decode_image(same_size["images"][0]), demo_image), "a ControlNet at 0.9 steers"
    both = svc.run(
        {**REQ, "controlnets": [{"name": "edges", "image": _png()}, {"name": "edges-soft", "image": _png(4)}]}
    )
    assert "images" in both, both
    assert decode_image(both["images"][0]).shape == (64, 64, 3) and both["images"] != same_size["images"]
    unknown = svc.run({**REQ, "controlnets": [{"name": "depth", "image": _png()}]})
    assert "error" in unknown and "'edges'" in unknown["error"], unknown
    with_image = svc.run({**REQ, "image_url": _png(), "controlnets": [{"name": "edges", "image": _png()}]})
    assert "error" in with_image and "controlnets" in with_image["error"], with_image
    # One UNet in the process: the ControlNet pipeline shares the loaded pipeline's components.
    loaded = svc.default
    cn_pipe = loaded.controlnet_pipeline(("edges",))
    assert cn_pipe.unet is loaded.pipeline.unet and cn_pipe.vae is loaded.pipeline.vae

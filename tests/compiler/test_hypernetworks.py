"""A1111 hypernetworks: a .pt built here in A1111's format is compiled into an artifact and served
through runtime.handler.handler. The image is compared with plain diffusers on the same weights
whose attention key/value inputs are changed by A1111's formula, written out here with torch's
functional ops (``context + module(context) * strength``, the module's layers from the file's
settings), not through the runtime's modules or processor."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from tests.conftest import DEMO_SETTINGS, REQ, compile_text, decode_image

RECIPE = "base: builtin:tiny-sd15\n" + DEMO_SETTINGS + "{extra}\n"
# tiny-sd15's attention context widths: self-attention 8, 16 and 32 wide, the text context 32.
WIDTHS = (8, 16, 32)
# Four Linears with ReLU between them (not after the last: activate_output false), a LayerNorm
# after each and dropouts after the first two: A1111's Sequential indexes are 0, 2, 4, 6, 8, 9.
SETTINGS: dict[str, Any] = {
    "layer_structure": [1, 2, 2, 1],
    "activation_func": "relu",
    "is_layer_norm": True,
    "use_dropout": True,
    "last_layer_dropout": True,
    "activate_output": False,
    "weight_initialization": "Normal",
    "name": "style",
    "step": 1000,
    "sd_checkpoint": "abcdef12",
    "sd_checkpoint_name": "tiny",
}
INDEXES = (("linear", 0), ("norm", 2), ("linear", 4), ("norm", 6), ("linear", 8), ("norm", 9))


def _module_state(dim: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    widths = [int(dim * m) for m in SETTINGS["layer_structure"]]
    state, n = {}, 0
    for kind, index in INDEXES:
        if kind == "linear":
            state[f"linear.{index}.weight"] = torch.randn(widths[n + 1], widths[n], generator=g) * 0.4
            state[f"linear.{index}.bias"] = torch.randn(widths[n + 1], generator=g) * 0.1
            n += 1
        else:
            state[f"linear.{index}.weight"] = 1 + torch.randn(widths[n], generator=g) * 0.1
            state[f"linear.{index}.bias"] = torch.randn(widths[n], generator=g) * 0.1
    return state


def hypernetwork_file(path: Path, widths=WIDTHS, seed: int = 3, **settings: Any) -> dict:
    g = torch.Generator().manual_seed(seed)
    data: dict[Any, Any] = {dim: [_module_state(dim, g), _module_state(dim, g)] for dim in widths}
    data |= {**SETTINGS, **settings}
    torch.save(data, path)
    return data


def a1111_module(state: dict[str, torch.Tensor], strength: float):
    """A1111's HypernetworkModule.forward for SETTINGS, by hand: dropout is off when generating."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (kind, index) in enumerate(INDEXES):
            w, b = state[f"linear.{index}.weight"], state[f"linear.{index}.bias"]
            if kind == "linear":
                h = F.linear(h, w, b)
                if i < len(INDEXES) - 2:  # not after the last Linear
                    h = F.relu(h)
            else:
                h = F.layer_norm(h, (h.shape[-1],), w, b)
        return x + h * strength

    return forward


def reference(data: dict, strength: float) -> np.ndarray:
    """Plain diffusers on the tiny model, each attention's to_k/to_v input replaced by the
    hypernetwork's output for its width (a forward pre-hook: diffusers' own processor runs)."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.models.attention_processor import Attention

    from compiler.tiny_models import BUILTINS
    from tests.helpers.generation import reference_image

    pipe = BUILTINS["tiny-sd15"].build()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    hooked = 0
    for m in pipe.unet.modules():
        if not isinstance(m, Attention):
            continue
        for layer, which in ((m.to_k, 0), (m.to_v, 1)):

            def hook(_mod: Any, args: tuple, which: int = which) -> tuple:
                x = args[0]
                pair = data.get(x.shape[-1])
                return (a1111_module(pair[which], strength)(x),) if pair else args

            layer.register_forward_pre_hook(hook)
            hooked += 1
    assert hooked > 0
    with torch.no_grad():
        image = reference_image(pipe, REQ["prompt"], "blurry, low quality", seed=REQ["seed"])
    return np.array(image)


def served(home: Path, artifact: Path, request: dict) -> np.ndarray:
    import runtime.service as service
    from runtime.handler import handler

    saved = {k: os.environ.get(k) for k in ("UIW_ARTIFACTS", "UIW_HOME")}
    old = service._service
    os.environ |= {"UIW_ARTIFACTS": str(artifact), "UIW_HOME": str(home)}
    service._service = None
    try:
        reply = asyncio.run(handler({"id": "t", "input": request}))
    finally:
        service._service = old
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert "images" in reply, reply
    return decode_image(reply["images"][0])


def _compile(tmp_path: Path, name: str, extra: str):
    return compile_text(tmp_path, name, RECIPE.format(extra=extra))


@pytest.fixture(scope="module")
def style(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("hn")
    return folder / "style.pt", hypernetwork_file(folder / "style.pt")


def test_served_image_is_a1111s_formula(tmp_path: Path, style):
    path, data = style
    proc = _compile(tmp_path, "hn", f"allow_pickle: true\nhypernetworks:\n  - source: {path}\n    strength: 0.8\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = Path(proc.stdout.strip())
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["hypernetworks"] == [
        {
            "name": "style",
            "strength": 0.8,
            "weights": "hypernetworks/style.safetensors",
            "config": "hypernetworks/style.json",
        }
    ]
    config = json.loads((artifact / "hypernetworks" / "style.json").read_text())
    assert config["dims"] == [8, 16, 32]
    assert config["layers"] == ["linear", "relu", "layer_norm", "linear", "relu", "layer_norm", "linear", "layer_norm"]
    assert not list(artifact.rglob("*.pt")) and not list(artifact.rglob("*.bin"))

    image = served(tmp_path / "home", artifact, REQ)
    expected = reference(data, 0.8)
    plain = reference({}, 0.0)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(image.astype(int) - plain.astype(int)).max() > 20  # the hypernetwork changes the image


def test_strength_zero_is_no_hypernetwork(tmp_path: Path, style):
    path, _ = style
    proc = _compile(tmp_path, "zero", f"allow_pickle: true\nhypernetworks:\n  - source: {path}\n    strength: 0\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    image = served(tmp_path / "home", Path(proc.stdout.strip()), REQ)
    assert np.abs(image.astype(int) - reference({}, 0.0).astype(int)).max() <= 1


def _refused(tmp_path: Path, name: str, extra: str, *expected: str) -> None:
    proc = _compile(tmp_path, name, extra)
    assert proc.returncode == 2, proc.stderr[-3000:]
    for text in (*expected, "hint:"):
        assert text in proc.stderr, proc.stderr[-3000:]
    artifacts = tmp_path / "home" / "artifacts" / "v1"
    assert not artifacts.exists() or not any(artifacts.iterdir()), "nothing half-written"


def test_bad_hypernetworks_are_compile_errors(tmp_path: Path, style):
    path, _ = style
    folder = tmp_path / "files"
    folder.mkdir()
    _refused(tmp_path, "nopickle", f"hypernetworks:\n  - source: {path}\n", "hypernetworks.0", "allow_pickle")
    hypernetwork_file(folder / "xl.pt", widths=(2048,))  # SDXL's text context on an SD 1.5 base
    _refused(
        tmp_path, "xl", f"allow_pickle: true\nhypernetworks:\n  - source: {folder / 'xl.pt'}\n", "does not fit", "sdxl"
    )
    hypernetwork_file(folder / "prelu.pt", activation_func="prelu")
    _refused(tmp_path, "act", f"allow_pickle: true\nhypernetworks:\n  - source: {folder / 'prelu.pt'}\n", "'prelu'")
    (folder / "broken.pt").write_bytes((folder / "xl.pt").read_bytes()[:300])
    _refused(
        tmp_path, "broken", f"allow_pickle: true\nhypernetworks:\n  - source: {folder / 'broken.pt'}\n", "readable"
    )
    hypernetwork_file(folder / "mismatch.pt", is_layer_norm=False)  # the file has LayerNorms its settings deny
    _refused(
        tmp_path, "mm", f"allow_pickle: true\nhypernetworks:\n  - source: {folder / 'mismatch.pt'}\n", "do not match"
    )
    _refused(
        tmp_path,
        "fused",
        f"allow_pickle: true\nfused_qkv: true\nhypernetworks:\n  - source: {path}\n",
        "fused_qkv",
    )

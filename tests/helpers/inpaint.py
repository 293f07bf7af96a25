"""What the inpainting-model tests share: request images as data URIs, jobs served through the
RunPod handler, and the arguments plain diffusers gets for each task (the reference)."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import decode_image

SIZE = 64
PROMPT = "a red fox in the snow"


def source_image() -> Any:
    """A seeded noise picture: every pixel differs, so a wrong crop, flip or resize shows."""
    from PIL import Image

    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "RGB")


def mask_image() -> Any:
    """White (repaint) in the middle, black (keep) around it."""
    from PIL import Image

    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


def data_uri(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def jobs(seed: int = 11, steps: int = 3) -> dict[str, dict[str, Any]]:
    """One worker-sdxl request per task: inpaint (image + mask), img2img (image), txt2img."""
    common = {"prompt": PROMPT, "seed": seed, "num_inference_steps": steps, "width": SIZE, "height": SIZE}
    image = data_uri(source_image())
    return {
        "inpaint": {**common, "image_url": image, "mask_url": data_uri(mask_image())},
        "img2img": {**common, "image_url": image, "strength": 0.6},
        "txt2img": dict(common),
    }


def full_mask() -> Any:
    from PIL import Image

    return Image.new("L", (SIZE, SIZE), 255)


def reference_arguments(task: str) -> dict[str, Any]:
    """What a plain diffusers user passes the inpaint pipeline for each of jobs()' tasks: the
    inpaint task's image and mask; img2img and txt2img with a full mask (A1111's way), txt2img at
    strength 1.0 from a mid-gray image."""
    from PIL import Image

    if task == "inpaint":
        return {"image": source_image(), "mask_image": mask_image(), "strength": 1.0}
    if task == "img2img":
        return {"image": source_image(), "mask_image": full_mask(), "strength": 0.6}
    return {"image": Image.new("RGB", (SIZE, SIZE), (128, 128, 128)), "mask_image": full_mask(), "strength": 1.0}


def reference(pipe: Any, task: str, seed: int = 11, steps: int = 3, **extra: Any) -> np.ndarray:
    import torch

    out = pipe(
        PROMPT,
        **reference_arguments(task),
        width=SIZE,
        height=SIZE,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        **extra,
    )
    return np.array(out.images[0])


def serve_all(
    artifact: Path, home: Path, requests: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> dict[str, dict[str, Any]]:
    """Each job through the real RunPod handler, one worker serving ``artifact``: task -> reply."""
    import runtime.service as service
    from runtime.handler import handler

    monkeypatch.setattr(service, "_service", service.Service(service.Settings(artifacts=(str(artifact),), home=home)))
    return {task: asyncio.run(handler({"id": task, "input": job})) for task, job in requests.items()}


def within_one_level(got: dict[str, Any], want: np.ndarray) -> None:
    """The served image equals the reference within 1/255 per channel."""
    assert "error" not in got, got
    image = decode_image(got["images"][0])
    assert image.shape == want.shape
    diff = np.abs(image.astype(int) - want.astype(int)).max()
    assert diff <= 1, diff

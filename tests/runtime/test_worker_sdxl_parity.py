"""Our worker and RunPod's own worker-sdxl handler.py (vendored, unchanged, in
tests/fixtures/worker-sdxl/) give the same picture for the same request and seed, with the same
weights: the tiny SDXL base, refiner and a VAE of their own, saved as fp16 diffusers folders.

worker-sdxl is made to run here, on a CPU, by patching around it, never inside generate_image:
- its ``from_pretrained`` model ids (stabilityai/stable-diffusion-xl-base-1.0, ...-refiner-1.0,
  madebyollin/sdxl-vae-fp16-fix) resolve to the tiny folders;
- ``DiffusionPipeline.to("cuda")`` stays on the CPU, and ``enable_xformers_memory_efficient_attention``
  and ``enable_model_cpu_offload`` (CUDA only) do nothing;
- ``runpod.serverless.start``, which its import calls to start serving, does nothing.
Its generator needs no patch: it is created on "cpu" when CUDA is unavailable. Its job id is a
path under the test's temporary folder, because it writes its PNGs to ``/<job id>/``.
Ours compiles a recipe naming the same folders (`vae:` the VAE as one file) in fp16.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO, compile_text, decode_image

# About a minute on one core: the compile, two fp16 pipelines per side, the handler's imports.
pytestmark = pytest.mark.slow

WORKER = REPO / "tests" / "fixtures" / "worker-sdxl"
IDS = {
    "stabilityai/stable-diffusion-xl-base-1.0": "base",
    "stabilityai/stable-diffusion-xl-refiner-1.0": "refiner",
    "madebyollin/sdxl-vae-fp16-fix": "vae",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base and refiner as fp16-variant folders, as the Hub repos hold them, and a VAE of
    other weights than theirs (as the fp16-fix VAE differs from SDXL's), as a folder and a file."""
    import torch
    from safetensors.torch import save_file

    from compiler.tiny_models import BUILTINS

    root = tmp_path_factory.mktemp("worker-sdxl-weights")
    base = BUILTINS["tiny-sdxl"].build()
    BUILTINS["tiny-sdxl-refiner"].build().to(torch.float16).save_pretrained(root / "refiner", variant="fp16")
    torch.manual_seed(77)
    vae = type(base.vae).from_config(base.vae.config).eval()
    vae.to(torch.float16).save_pretrained(root / "vae")
    save_file(vae.state_dict(), str(root / "vae.safetensors"))
    base.to(torch.float16).save_pretrained(root / "base", variant="fp16")
    return root


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory, folders: Path) -> Any:
    from runtime.service import Service, Settings

    tmp = tmp_path_factory.mktemp("ours")
    recipe = f"""base: {folders / "base"}
refiner: {folders / "refiner"}
vae: {folders / "vae.safetensors"}
precision: fp16
scheduler: DDIM
"""
    proc = compile_text(tmp, "sdxl", recipe)
    assert proc.returncode == 0, proc.stderr
    return Service(Settings(artifacts=(proc.stdout.strip(),), home=tmp / "home"))


@pytest.fixture(scope="module")
def theirs(folders: Path) -> Any:
    """worker-sdxl's handler module, imported with the patches the docstring lists."""
    import diffusers
    import runpod

    def local(cls: Any) -> Any:
        loader = cls.from_pretrained

        def from_pretrained(_cls: Any, name: str, **kwargs: Any) -> Any:
            return loader(str(folders / IDS[name]), **kwargs)

        return classmethod(from_pretrained)

    def to(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self if args == ("cuda",) else original_to(self, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    original_to = diffusers.DiffusionPipeline.to
    for cls in (
        diffusers.StableDiffusionXLPipeline,
        diffusers.StableDiffusionXLImg2ImgPipeline,
        diffusers.AutoencoderKL,
    ):
        mp.setattr(cls, "from_pretrained", local(cls))
    mp.setattr(diffusers.DiffusionPipeline, "to", to)
    mp.setattr(diffusers.DiffusionPipeline, "enable_xformers_memory_efficient_attention", lambda self: None)
    mp.setattr(diffusers.DiffusionPipeline, "enable_model_cpu_offload", lambda self: None)
    mp.setattr(runpod.serverless, "start", lambda config: None)
    mp.syspath_prepend(str(WORKER))  # its `from schemas import INPUT_SCHEMA`
    spec = importlib.util.spec_from_file_location("worker_sdxl_handler", WORKER / "handler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        mp.undo()
        sys.modules.pop("schemas", None)
    for pipe in (module.MODELS.base, module.MODELS.refiner):
        pipe.set_progress_bar_config(disable=True)
    return module


def _theirs(module: Any, tmp_path: Path, job_input: dict[str, Any]) -> list[np.ndarray]:
    job_id = str(tmp_path / "job").lstrip("/")  # it writes to f"/{job_id}"
    reply = module.generate_image({"id": job_id, "input": job_input})
    assert "images" in reply, reply
    return [decode_image(i) for i in reply["images"]]


def _ours(service: Any, job_input: dict[str, Any]) -> list[np.ndarray]:
    reply = service.run(job_input)
    assert "images" in reply and not reply.get("warnings"), reply
    return [decode_image(i) for i in reply["images"]]


REQUESTS = {
    "defaults": {"prompt": "a red fox in the snow", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 42},
    "test_input": {
        "prompt": "a steampunk dragon",
        "negative_prompt": "blurry, low quality",
        "width": 64,
        "height": 64,
        "num_inference_steps": 5,
        "refiner_inference_steps": 8,
        "guidance_scale": 7.5,
        "strength": 0.5,
        "high_noise_frac": 0.8,
        "scheduler": "K_EULER",
        "num_images": 2,
        "seed": 42,
    },
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_txt2img_matches_worker_sdxl(name: str, ours: Any, theirs: Any, tmp_path: Path) -> None:
    job_input = REQUESTS[name]
    expected = _theirs(theirs, tmp_path, dict(job_input))
    got = _ours(ours, dict(job_input))
    assert len(got) == len(expected) == job_input.get("num_images", 1)
    for g, e in zip(got, expected, strict=True):
        assert e.std() > 5, "a flat picture would match anything"
        assert np.abs(g.astype(int) - e.astype(int)).max() <= 2
    if len(got) == 2:  # two pictures, not one twice
        assert np.abs(got[0].astype(int) - got[1].astype(int)).max() > 10


def test_img2img_matches_worker_sdxl(ours: Any, theirs: Any, tmp_path: Path) -> None:
    from PIL import Image

    from tests.runtime.test_img2img import SOURCE

    path = tmp_path / "source.png"
    Image.fromarray(SOURCE).save(path)
    job_input = {"prompt": "a red fox", "refiner_inference_steps": 10, "strength": 0.4, "seed": 9}
    (expected,) = _theirs(theirs, tmp_path, {**job_input, "image_url": str(path)})
    buf = io.BytesIO()
    Image.fromarray(SOURCE).save(buf, format="PNG")
    (got,) = _ours(ours, {**job_input, "image_url": base64.b64encode(buf.getvalue()).decode()})
    assert expected.std() > 5 and np.abs(expected.astype(int) - SOURCE).max() > 10  # it was changed
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2

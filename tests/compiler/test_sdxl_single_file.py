"""SDXL single files in the original SGM layout, end to end on the tiny SDXL builtin.

tests/helpers/sgm.py writes a diffusers SDXL pipeline as an SGM single file. These tests prove that file
is what a real SDXL checkpoint looks like (the real key layout, and diffusers' own loader turns it
back into the same weights), that detection calls it SDXL without the real widths, and that a
recipe with it as `checkpoint:` compiles to the same model as the builtin and serves the same
pixels through the RunPod handler.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.conftest import decode_image, run_compiler
from tests.helpers.detect_cases import fixture_path

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
RECIPE = """
base: builtin:tiny-sdxl
{checkpoint}precision: fp32
defaults:
  steps: 4
  guidance_scale: 7.5
  negative_prompt: blurry, low quality
"""


@pytest.fixture(scope="module")
def tiny_sdxl() -> Any:
    from compiler.tiny_models import BUILTINS

    return BUILTINS["tiny-sdxl"].build()


@pytest.fixture(scope="module")
def sgm_file(tiny_sdxl: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the builtin as an SGM single file, the builtin's diffusers folder for its configs)."""
    from safetensors.torch import save_file

    from tests.helpers.sgm import pipeline_to_sgm

    root = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl.save_pretrained(root / "diffusers")
    # diffusers picks the reader by the file extension: a single file must end in .safetensors
    save_file(pipeline_to_sgm(tiny_sdxl), root / "tiny-sdxl.safetensors")
    return root / "tiny-sdxl.safetensors", root / "diffusers"


def test_diffusers_own_single_file_loader_gives_back_the_same_weights(tiny_sdxl, sgm_file):
    """tests/helpers/sgm.py is the exact inverse of diffusers' SDXL single-file conversion: every tensor of
    every component comes back bit for bit, under the same names, none missing or extra."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    path, config = sgm_file
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), local_files_only=True)
    for name in COMPONENTS:
        want, got = getattr(tiny_sdxl, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(want), (name, set(got) ^ set(want))
        assert not [k for k in want if not torch.equal(want[k], got[k])], name


def _pattern(key: str) -> str:
    """A key with its repeat indices (transformer blocks, text-encoder layers) taken out: the tiny
    model has fewer of them than SDXL (2 vs 1/2/10 transformer blocks, 2 vs 12/32 layers)."""
    return re.sub(r"\b(transformer_blocks|layers|resblocks)\.\d+\.", r"\1.N.", key)


def test_converted_keys_follow_the_real_sdxl_file_layout(tiny_sdxl):
    """Same key patterns as a real SDXL base file (sd-mecha's sdxl-sgm layout), and the same
    tensor ranks (SGM's VAE attention is 1x1 convs, its UNet projections are linear)."""
    import yaml

    from tests.helpers.sgm import pipeline_to_sgm

    components = yaml.safe_load(fixture_path("sdxl-sgm").read_text())["components"]
    real = {k: v for c, entries in components.items() if c != "scheduler" for k, v in entries.items()}
    ranks = {_pattern(k): len(v["shape"]) for k, v in real.items()}
    required = {_pattern(k) for k, v in real.items() if not v.get("optional")}
    ours = {_pattern(k): v.ndim for k, v in pipeline_to_sgm(tiny_sdxl).items()}
    assert not set(ours) - set(ranks), sorted(set(ours) - set(ranks))[:10]
    assert not required - set(ours), sorted(required - set(ours))[:10]
    assert {k: r for k, r in ours.items() if ranks[k] != r} == {}
    # The real UNet's top level is matched exactly: 9 input and 9 output blocks, ADM, mid block.
    top = {k.split(".")[2] + "." + k.split(".")[3] for k in real if k.startswith("model.diffusion_model.")}
    assert {k.split(".")[2] + "." + k.split(".")[3] for k in ours if k.startswith("model.diffusion_model.")} == top


def _header(state: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), "float32") for k, v in state.items()}


def test_tiny_sgm_files_are_detected_by_their_text_encoder_layout(tiny_sdxl, sgm_file):
    """At tiny widths neither the cross-attention width (2048) nor the ADM width (2816) is there
    to tell SDXL; the SGM text-encoder layout is."""
    from compiler.detect import CONTEXT_FAMILY, detect, detect_file
    from tests.helpers.sgm import pipeline_to_sgm

    base = detect_file(sgm_file[0])
    assert (base.kind, base.family, base.format, base.variant, base.prediction) == (
        "checkpoint",
        "sdxl",
        "sgm",
        "normal",
        "eps",
    )
    assert any("CLIP-L + OpenCLIP-G" in e for e in base.evidence), base.evidence
    assert tiny_sdxl.unet.config.cross_attention_dim not in CONTEXT_FAMILY, "the width did not decide"

    # The refiner's layout: OpenCLIP-G alone, as conditioner.embedders.0.model.
    refiner_like = SimpleNamespace(
        unet=tiny_sdxl.unet, vae=tiny_sdxl.vae, text_encoder=None, text_encoder_2=tiny_sdxl.text_encoder_2
    )
    keys = _header(pipeline_to_sgm(refiner_like))
    assert any(k.startswith("conditioner.embedders.0.model.") for k in keys)
    refiner = detect(keys)
    assert (refiner.kind, refiner.family, refiner.format) == ("checkpoint", "sdxl-refiner", "sgm")

    # A UNet and VAE with no text encoder: nothing tells the family, so no guess.
    bare = detect({k: v for k, v in _header(pipeline_to_sgm(tiny_sdxl)).items() if "conditioner." not in k})
    assert (bare.family, bare.candidates) == (None, tuple(CONTEXT_FAMILY.values()))


def _compile(tmp_path: Path, name: str, checkpoint: str | None) -> Path:
    recipes = tmp_path / "recipes"
    (recipes / f"{name}.yaml").write_text(RECIPE.format(checkpoint=f"checkpoint: {checkpoint}\n" if checkpoint else ""))
    proc = run_compiler(f"recipe={name}", f"recipes_dir={recipes}", home=tmp_path / f"home-{name}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Path(proc.stdout.strip())


def _serve(artifact: Path, home: Path, job_input: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """One job through the real RunPod handler, served from ``artifact``."""
    import runtime.service as service
    from runtime.handler import handler

    monkeypatch.setattr(service, "_service", service.Service(service.Settings(artifacts=(str(artifact),), home=home)))
    return asyncio.run(handler({"id": "test", "input": job_input}))


def test_sgm_checkpoint_compiles_to_the_builtin_and_serves_the_same_pixels(tmp_path, sgm_file, monkeypatch):
    """`checkpoint: ./tiny-sdxl.safetensors` on the tiny SDXL base (the CLI: lock, detect, build,
    package) gives the model the base alone gives: the same weight files, the same image for a
    worker-sdxl request through the handler, and plain diffusers' image on the builtin."""
    from diffusers import EulerDiscreteScheduler

    from compiler.tiny_models import BUILTINS
    from tests.helpers.generation import reference_image

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny-sdxl.safetensors").write_bytes(sgm_file[0].read_bytes())
    # One after the other: run side by side, two torch processes on this machine's cores take
    # longer than in turn.
    built_dir = _compile(tmp_path, "builtin", None)
    single_dir = _compile(tmp_path, "single", "./tiny-sdxl.safetensors")
    assert built_dir != single_dir, "different inputs, different cache keys"
    for d in (built_dir, single_dir):
        manifest = json.loads((d / "manifest.json").read_text())
        assert (manifest["family"], manifest["pipeline_class"]) == ("sdxl", "StableDiffusionXLPipeline")

    # Every weight, config and tokenizer file is byte-identical (materialize drops the loading
    # options transformers writes into tokenizer configs), so the content digests are equal.
    def files(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted((d / "pipeline").rglob("*")) if p.is_file()}

    a, b = files(built_dir), files(single_dir)
    assert set(a) == set(b) and not sorted(k for k in a if a[k] != b[k])
    digests = {json.loads((d / "manifest.json").read_text())["content_digest"] for d in (built_dir, single_dir)}
    assert len(digests) == 1

    job = json.loads((Path(__file__).parents[1] / "data" / "worker_sdxl_test_input.json").read_text())["input"]
    job |= {"width": 64, "height": 64, "num_inference_steps": 4}  # the tiny model's size, a quick run
    replies = [_serve(d, tmp_path / "home-x", job, monkeypatch) for d in (built_dir, single_dir)]
    for reply in replies:
        assert "error" not in reply, reply
        assert reply["seed"] == 42 and {w.split(":")[0] for w in reply["warnings"]} == {
            "refiner_inference_steps",
            "high_noise_frac",
            "strength",
        }
    images = [decode_image(r["images"][0]) for r in replies]
    assert images[0].shape == (64, 64, 3) and images[0].std() > 1
    assert np.array_equal(images[0], images[1])

    # ...and both are what plain diffusers draws with the builtin and the same settings.
    ref = BUILTINS["tiny-sdxl"].build()
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expected = reference_image(ref, job["prompt"], job["negative_prompt"], seed=42)
    assert np.array_equal(images[0], np.array(expected))


def test_fp16_sdxl_decodes_in_fp32_and_leaves_the_shared_vae_as_it_was():
    """How SDXL is served on a GPU: fp16 weights, and diffusers upcasts the VAE to fp32 for the
    decode (force_upcast) by casting the pipeline's VAE in place, then back. The runtime shares one
    VAE between requests, so it must find it in fp16 again after each one, and the same request
    must give the same bytes."""
    import torch

    from compiler.tiny_models import BUILTINS
    from runtime.generate import generate
    from tests.helpers.generation import tiny_request

    pipe = BUILTINS["tiny-sdxl"].build().to(torch.float16)  # as materialize casts an fp16 build
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.force_upcast
    seen: list[torch.dtype] = []
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    request = tiny_request(negative_prompt="blurry", steps=1, guidance_scale=7.5, seed=7)
    first, again = (np.array(generate(pipe, request)[0]) for _ in range(2))
    assert seen == [torch.float32, torch.float32], "decoded in fp32"
    assert pipe.vae.dtype == torch.float16 and pipe.unet.dtype == torch.float16, "the shared VAE is cast back"
    assert np.array_equal(first, again) and first.std() > 1

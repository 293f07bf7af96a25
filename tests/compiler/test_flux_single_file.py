"""FLUX.1 single files as they are distributed, end to end on the tiny FLUX builtin.

tests/helpers/bfl.py writes diffusers FLUX as Black Forest Labs' files: ComfyUI's all-in-one file
(transformer, CLIP-L, T5-XXL, VAE) for dev and schnell, and the transformer alone (BFL's own
release, most CivitAI fine-tunes). Each is compiled with the CLI (a base-less all-in-one file with
its family's config repo from the test Hub; a transformer with `base:`), served through the RunPod
handler and compared with plain diffusers drawing the same weights with the same arguments.

diffusers' own FLUX single-file converter splits at FLUX.1's widths only (inner 3072, written into
the function), so it cannot read a tiny FLUX: the reference pipelines are built from the same
weights with ``from_pretrained``, and compiler.flux_bfl's split is compared with diffusers' at
FLUX.1's widths instead.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compiler.families import FAMILIES
from tests.compiler.test_sources import compile_recipe
from tests.conftest import decode_image
from tests.helpers.detect_cases import fixture_path
from tests.helpers.fakehub import FakeHub, tree

REQUEST = {"prompt": "a photo of a cat", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 11}
RECIPE = "{fields}\nprecision: {precision}\ndefaults:\n  steps: 3\n"


def _configs(family: str) -> str:
    return FAMILIES[family].config_repo.removeprefix("hf://")


def tiny(variant: str) -> Any:
    """The builtin tiny FLUX.1 [dev], or its schnell twin: the same encoders and VAE, a transformer
    without the guidance embedder (other seed), FLUX.1 [schnell]'s scheduler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from compiler.family_configs import FLUX_SCHNELL_SCHEDULER
    from compiler.tiny_models import BUILTINS

    pipe = BUILTINS["tiny-flux"].build()
    pipe.set_progress_bar_config(disable=True)
    if variant == "schnell":
        torch.manual_seed(3005)
        config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
        transformer = FluxTransformer2DModel.from_config({**config, "guidance_embeds": False}).eval()
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHNELL_SCHEDULER)
        pipe.register_modules(transformer=transformer, scheduler=scheduler)
    return pipe


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    return {v: tiny(v) for v in ("dev", "schnell")}


@pytest.fixture(scope="module")
def config_hub(tmp_path_factory: pytest.TempPathFactory, pipes) -> Iterator[FakeHub]:
    """A Hub whose FLUX.1 [dev] and [schnell] config repos hold the tiny models' configs and
    tokenizers, no weights: what a base-less all-in-one file is built with."""
    hub = FakeHub().start()
    for variant, pipe in pipes.items():
        folder = tmp_path_factory.mktemp(f"flux-{variant}-configs")
        pipe.save_pretrained(folder)
        files = {p: b for p, b in tree(folder).items() if not p.endswith(".safetensors")}
        hub.repo(_configs(f"flux-{variant}")).push(files)
    yield hub
    hub.stop()


def write_file(tmp_path: Path, name: str, state: dict[str, Any]) -> str:
    from safetensors.torch import save_file

    path = tmp_path / "recipes" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)
    return f"./{name}"


def compile_flux(tmp_path: Path, hub: FakeHub, fields: str, precision: str = "fp32", *args: str) -> Any:
    text = RECIPE.format(fields=fields, precision=precision)
    return compile_recipe(tmp_path, tmp_path / "home", hub, "", *args, text=text)


def handler_image(tmp_path: Path, artifact: Path, monkeypatch: pytest.MonkeyPatch, **request: Any) -> np.ndarray:
    """One job through the real RunPod handler, served from ``artifact``."""
    import runtime.service as service
    from runtime.handler import handler

    settings = service.Settings(artifacts=(str(artifact),), home=tmp_path / "home")
    monkeypatch.setattr(service, "_service", service.Service(settings))
    reply = asyncio.run(handler({"id": "test", "input": {**REQUEST, **request}}))
    assert "images" in reply, reply
    return decode_image(reply["images"][0])


def diffusers_image(pipe: Any, guidance_scale: float) -> np.ndarray:
    """Plain diffusers with the request's arguments and a CPU generator seeded as the worker seeds."""
    import torch

    with torch.inference_mode():
        image = pipe(
            prompt=REQUEST["prompt"],
            width=REQUEST["width"],
            height=REQUEST["height"],
            num_inference_steps=REQUEST["num_inference_steps"],
            guidance_scale=guidance_scale,
            generator=torch.Generator("cpu").manual_seed(REQUEST["seed"]),
        ).images[0]
    return np.array(image)


def assert_close(served: np.ndarray, expected: np.ndarray) -> None:
    """Within 1/255 per channel: the same model, on the same machine, as plain diffusers."""
    assert served.shape == expected.shape and served.std() > 1
    diff = np.abs(served.astype(int) - expected.astype(int)).max()
    assert diff <= 1, diff


def reloaded(pipe: Any, tmp_path: Path, dtype: str = "float32") -> Any:
    """``pipe`` saved and read back with ``from_pretrained``: the same weights as plain diffusers loads them."""
    import torch
    from diffusers import FluxPipeline

    pipe.save_pretrained(tmp_path / "reference")
    ref = FluxPipeline.from_pretrained(tmp_path / "reference", torch_dtype=getattr(torch, dtype))
    ref.set_progress_bar_config(disable=True)
    return ref


# --- the writer: the real layout, and read back exactly -------------------------------------------


def _pattern(key: str) -> str:
    return re.sub(r"\b(double_blocks|single_blocks|layers|block|down|up)\.\d+\.", r"\1.N.", key)


def test_written_files_follow_the_real_flux_layout(pipes):
    """Same key patterns and tensor ranks as the real all-in-one FLUX.1 [dev] file
    (tests/fixtures/model-keys/flux-flux.yaml); the bare file is its transformer without the
    prefix; schnell lacks guidance_in and nothing else."""
    import yaml

    from tests.helpers.bfl import pipeline_to_bfl, transformer_to_bfl

    components = yaml.safe_load(fixture_path("flux-flux").read_text())["components"]
    real = {_pattern(k): len(v["shape"]) for c in components.values() for k, v in c.items()}
    ours = {_pattern(k): v.ndim for k, v in pipeline_to_bfl(pipes["dev"]).items()}
    assert set(ours) == set(real), sorted(set(ours) ^ set(real))[:10]
    assert {k: r for k, r in ours.items() if real[k] != r} == {}
    bare = {_pattern(k) for k in transformer_to_bfl(pipes["dev"].transformer.state_dict())}
    assert bare == {k.removeprefix("model.diffusion_model.") for k in ours if k.startswith("model.diffusion_model.")}
    schnell = {_pattern(k) for k in pipeline_to_bfl(pipes["schnell"])}
    assert set(ours) - schnell == {f"model.diffusion_model.guidance_in.{p}" for p in _GUIDANCE}


_GUIDANCE = ("in_layer.weight", "in_layer.bias", "out_layer.weight", "out_layer.bias")


def test_conversion_gives_back_every_transformer_weight(pipes, tmp_path):
    """compiler.flux_bfl reads the written file back to the transformer's own tensors, bit for bit."""
    import torch
    from safetensors.torch import save_file

    from compiler.flux_bfl import read_transformer, to_diffusers
    from tests.helpers.bfl import pipeline_to_bfl

    for variant, pipe in pipes.items():
        save_file(pipeline_to_bfl(pipe), tmp_path / f"{variant}.safetensors")
        got, want = to_diffusers(read_transformer(tmp_path / f"{variant}.safetensors")), pipe.transformer.state_dict()
        assert set(got) == set(want), set(got) ^ set(want)
        assert not [k for k in want if not torch.equal(got[k], want[k])]


def test_split_at_flux1_widths_is_diffusers_own():
    """At FLUX.1's widths (3072 inner, 12288 MLP) the single-block split equals diffusers' converter's:
    a FLUX.1-shaped state on the meta device, one single block's linear1 with real numbers."""
    import torch
    import yaml
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from compiler.flux_bfl import to_diffusers

    entries = yaml.safe_load(fixture_path("flux-flux").read_text())["components"]["diffuser"]
    state = {k: torch.empty(v["shape"], device="meta") for k, v in entries.items()}
    state = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}
    generator = torch.Generator().manual_seed(0)
    for kind, shape in (("weight", (21504, 3072)), ("bias", (21504,))):
        state[f"single_blocks.7.linear1.{kind}"] = torch.randn(shape, generator=generator, dtype=torch.bfloat16)
    ours, theirs = to_diffusers(state), convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    assert set(ours) == set(theirs)
    block = [k for k in theirs if k.startswith("single_transformer_blocks.7.") and not theirs[k].is_meta]
    assert len(block) == 8  # q, k, v, MLP: weight and bias
    assert all(torch.equal(ours[k], theirs[k]) for k in block)


# --- compiled with the CLI, served through the handler --------------------------------------------


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_all_in_one_file_builds_with_its_config_repo_and_serves_diffusers_pixels(
    variant, pipes, config_hub, tmp_path, monkeypatch
):
    """`checkpoint: ./flux1-VARIANT.safetensors` and nothing else: detection says which FLUX, the
    lock takes that family's config repo from the Hub, the build converts the file, and the handler
    draws what plain diffusers draws with the same weights."""
    from tests.helpers.bfl import pipeline_to_bfl

    family = f"flux-{variant}"
    ckpt = write_file(tmp_path, f"flux1-{variant}.safetensors", pipeline_to_bfl(pipes[variant]))
    proc = compile_flux(tmp_path, config_hub, f"checkpoint: {ckpt}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = Path(proc.stdout.strip())
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert (manifest["family"], manifest["pipeline_class"]) == (family, "FluxPipeline")
    assert manifest["provenance"]["configs"].startswith(f"hf://{_configs(family)}@main")
    assert manifest["conversions"]["checkpoint"].startswith("source fp32 (")
    guidance = FAMILIES[family].default_guidance
    assert manifest["serving"]["defaults"]["guidance_scale"] == guidance

    served = handler_image(tmp_path, artifact, monkeypatch)
    assert_close(served, diffusers_image(reloaded(pipes[variant], tmp_path), guidance))


def _other_transformer(pipe: Any) -> Any:
    """A transformer of the base's shape with other weights: a fine-tune, as far as a test can tell."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(4242)
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    return FluxTransformer2DModel.from_config(config).eval()


def test_transformer_only_file_joins_the_base_and_serves_its_own_pixels(pipes, config_hub, tmp_path, monkeypatch):
    """BFL's own file layout (the transformer alone, bare names; most CivitAI FLUX fine-tunes) with
    `base:`: the file's transformer replaces the base's, the base gives the encoders and VAE."""
    from tests.helpers.bfl import transformer_to_bfl

    tuned = _other_transformer(pipes["dev"])
    ckpt = write_file(tmp_path, "flux-finetune.safetensors", transformer_to_bfl(tuned.state_dict()))
    proc = compile_flux(tmp_path, config_hub, f"base: builtin:tiny-flux\ncheckpoint: {ckpt}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = Path(proc.stdout.strip())
    lock = json.loads((tmp_path / "recipes" / "r.lock.json").read_text())
    detected = next(e for k, e in lock["sources"].items() if k.endswith("flux-finetune.safetensors"))["meta"]
    assert (detected["detected"]["kind"], detected["detected"]["family"]) == ("transformer", "flux-dev")

    reference = tiny("dev")
    reference.register_modules(transformer=tuned)
    expected = diffusers_image(reloaded(reference, tmp_path), 3.5)
    served = handler_image(tmp_path, artifact, monkeypatch)
    assert_close(served, expected)
    assert not np.array_equal(served, diffusers_image(pipes["dev"], 3.5)), "the file's transformer, not the base's"

    # A schnell transformer (no guidance_in) does not fit a dev base: said before anything is built.
    schnell = write_file(tmp_path, "schnell.safetensors", transformer_to_bfl(pipes["schnell"].transformer.state_dict()))
    wrong = compile_flux(tmp_path, config_hub, f"base: builtin:tiny-flux\ncheckpoint: {schnell}")
    assert wrong.returncode == 2 and "flux-schnell but the base is flux-dev" in wrong.stderr, wrong.stderr[-2000:]


# --- fp8 files -------------------------------------------------------------------------------------


def _fp8(state: dict[str, Any], dtype: Any, prefixes: tuple[str, ...] = ("",)) -> dict[str, Any]:
    """``state`` with the floating tensors under ``prefixes`` stored in ``dtype``, as fp8 files are."""
    return {k: v.to(dtype) if k.startswith(prefixes) and v.is_floating_point() else v for k, v in state.items()}


def _saved(artifact: Path, component: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    (path,) = (artifact / "pipeline" / component).glob("*.safetensors")
    return load_file(path)


def test_fp8_all_in_one_file_becomes_bf16_exactly_and_says_so(pipes, config_hub, tmp_path, monkeypatch):
    """ComfyUI's flux1-dev-fp8 layout (transformer and T5 in fp8 e4m3fn) built in bf16: every
    weight is the file's fp8 number cast to bf16 (``tensor.to(bf16)``, exact), the manifest says
    so, and the handler draws what diffusers draws with those bf16 weights."""
    import torch

    from tests.helpers.bfl import DIFFUSION_PREFIX, T5_PREFIX, pipeline_to_bfl

    e4m3 = torch.float8_e4m3fn
    state = _fp8(pipeline_to_bfl(pipes["dev"]), e4m3, (DIFFUSION_PREFIX, T5_PREFIX))
    ckpt = write_file(tmp_path, "flux1-dev-fp8.safetensors", state)
    proc = compile_flux(tmp_path, config_hub, f"checkpoint: {ckpt}", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = Path(proc.stdout.strip())
    manifest = json.loads((artifact / "manifest.json").read_text())
    source, _, target = manifest["conversions"]["checkpoint"].partition(" -> ")
    assert target == "bf16" and re.sub(r" \(\d+( tensors)?\)", "", source) == "source fp32 + fp8 e4m3fn", source

    # The values survive: fp8 -> bf16 is the file's tensor .to(bf16), for the transformer and T5.
    for component, module in (
        ("transformer", pipes["dev"].transformer),
        ("text_encoder_2", pipes["dev"].text_encoder_2),
    ):
        saved = _saved(artifact, component)
        want = {k: v.to(e4m3).to(torch.bfloat16) for k, v in module.state_dict().items() if k in saved}
        assert set(saved) <= set(module.state_dict()) and len(want) == len(saved)
        assert not [k for k in saved if not torch.equal(saved[k], want[k])], component
    clip = _saved(artifact, "text_encoder")  # fp32 in the file: bf16 is its own rounding
    assert all(torch.equal(v, pipes["dev"].text_encoder.state_dict()[k].bfloat16()) for k, v in clip.items())

    reference = tiny("dev")
    reference.transformer.load_state_dict(_fp8(reference.transformer.state_dict(), e4m3))
    reference.text_encoder_2.load_state_dict(_fp8(reference.text_encoder_2.state_dict(), e4m3))
    expected = diffusers_image(reloaded(reference, tmp_path, "bfloat16"), 3.5)
    assert_close(handler_image(tmp_path, artifact, monkeypatch), expected)


def test_fp8_e5m2_transformer_kept_quantized_when_the_recipe_says_so(pipes, config_hub, tmp_path):
    """An fp8 e5m2 transformer-only file: without `quantize` the weights are the file's .to(bf16);
    with `quantize: fp8` the artifact stores the transformer quantized (1-byte weights with
    per-channel scales) and the manifest says both steps."""
    import torch

    from tests.helpers.bfl import transformer_to_bfl

    e5m2 = torch.float8_e5m2
    tuned = _other_transformer(pipes["dev"])
    ckpt = write_file(tmp_path, "flux-e5m2.safetensors", _fp8(transformer_to_bfl(tuned.state_dict()), e5m2))
    fields = f"base: builtin:tiny-flux\ncheckpoint: {ckpt}"
    plain = compile_flux(tmp_path, config_hub, fields, "bf16")
    assert plain.returncode == 0, plain.stderr[-3000:]
    saved = _saved(Path(plain.stdout.strip()), "transformer")
    want = {k: v.to(e5m2).to(torch.bfloat16) for k, v in tuned.state_dict().items()}
    assert set(saved) == set(want) and all(torch.equal(saved[k], want[k]) for k in want)
    manifest = json.loads((Path(plain.stdout.strip()) / "manifest.json").read_text())
    assert re.fullmatch(r"source fp8 e5m2 \(\d+ tensors\) -> bf16", manifest["conversions"]["checkpoint"])

    quantized = compile_flux(tmp_path, config_hub, fields + "\nquantize: fp8", "bf16")
    assert quantized.returncode == 0, quantized.stderr[-3000:]
    artifact = Path(quantized.stdout.strip())
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["conversions"]["checkpoint"].endswith(
        "-> bf16, then the denoiser quantized to fp8 (optimum-quanto, per-channel scales)"
    )
    stored = _saved(artifact, "transformer")
    data = stored["transformer_blocks.0.attn.to_q.weight._data"]
    scale = stored["transformer_blocks.0.attn.to_q.weight._scale"]
    assert data.element_size() == 1
    # quanto rescales each output channel to fp8's range: the file's numbers within fp8's precision.
    weights = data.to(torch.float32) * scale.to(torch.float32)
    assert torch.allclose(weights, want["transformer_blocks.0.attn.to_q.weight"].float(), rtol=0.13, atol=1e-3)


def test_truncated_fp8_file_is_a_compile_error_and_leaves_nothing(pipes, config_hub, tmp_path):
    import torch

    from tests.helpers.bfl import transformer_to_bfl

    state = _fp8(transformer_to_bfl(pipes["dev"].transformer.state_dict()), torch.float8_e4m3fn)
    ckpt = write_file(tmp_path, "cut.safetensors", state)
    path = tmp_path / "recipes" / "cut.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    proc = compile_flux(tmp_path, config_hub, f"base: builtin:tiny-flux\ncheckpoint: {ckpt}", "bf16")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "checkpoint" in proc.stderr and "hint:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "truncated" in proc.stderr or "holds" in proc.stderr, proc.stderr
    artifacts = tmp_path / "home" / "artifacts"
    assert not artifacts.exists() or not [p for p in artifacts.rglob("*") if p.is_file()]

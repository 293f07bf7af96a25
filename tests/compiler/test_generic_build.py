"""Generic families at build time, through the CLI: a pipeline folder or Hub repo of a class no
family serves compiles as diffusers loads it (bytes from the Hub and from a folder give one
artifact; components a model keeps in fp32 stay fp32 under fp16), LoRAs apply where the class
has diffusers' LoRA loader and are refused where it has none, and a folder diffusers could not
load is refused with where, what and a hint, nothing written to the store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compile_text, run_compiler
from tests.helpers.fakehub import tree
from tests.helpers.zoo import ZOO


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ZOO["chroma"].save(tmp_path_factory.mktemp("zoo") / "chroma")


def copy_of(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    return out


def artifacts(tmp_path: Path) -> list[Path]:
    root = tmp_path / "home" / "artifacts" / "v1"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def refused(tmp_path: Path, text: str) -> str:
    proc = compile_text(tmp_path, "bad", text)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not artifacts(tmp_path)
    return proc.stderr


def test_a_class_diffusers_does_not_have_is_refused(tmp_path, chroma):
    folder = copy_of(chroma, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "NoSuchPipeline"}))
    err = refused(tmp_path, f"base: {folder}\n")
    assert "NoSuchPipeline" in err and "neither a diffusers pipeline class" in err and "hint:" in err


def test_a_component_folder_without_weights_is_refused(tmp_path, chroma):
    folder = copy_of(chroma, tmp_path)
    for f in (folder / "transformer").glob("*.safetensors"):
        f.unlink()
    err = refused(tmp_path, f"base: {folder}\n")
    assert "component 'transformer' has a config.json but no .safetensors weights" in err and "hint:" in err


def test_a_pickle_only_component_is_refused(tmp_path, chroma):
    folder = copy_of(chroma, tmp_path)
    (weights,) = (folder / "vae").glob("*.safetensors")
    weights.rename(folder / "vae" / "diffusion_pytorch_model.bin")
    err = refused(tmp_path, f"base: {folder}\n")
    assert "component 'vae' has only pickled weights" in err


def test_options_a_generic_family_cannot_honour_are_refused(tmp_path, chroma):
    err = refused(tmp_path, f"base: {chroma}\nprediction: v\nquantize: int8\n")
    assert "ChromaPipeline (generic) does not support `prediction:`" in err
    assert "does not support `quantize:`" in err


def lora_file(tmp_path: Path, name: str) -> Path:
    """A LoRA on the tiny pipeline's transformer attention, random factors, saved by diffusers."""
    import diffusers
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    pipe = ZOO[name].build()
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )
    layers = get_peft_model_state_dict(pipe.transformer)
    getattr(diffusers, ZOO[name].pipeline_class).save_lora_weights(tmp_path / "lora", transformer_lora_layers=layers)
    return tmp_path / "lora" / "pytorch_lora_weights.safetensors"


def test_a_lora_on_a_class_without_lora_support_is_refused(tmp_path):
    folder = ZOO["hunyuan-dit"].save(tmp_path / "hunyuan")
    lora = lora_file(tmp_path, "aura-flow")
    err = refused(tmp_path, f"base: {folder}\nloras:\n  - source: {lora}\n")
    assert "HunyuanDiTPipeline has no LoRA support in diffusers" in err and "hint:" in err


def test_a_fused_lora_serves_what_diffusers_draws_with_it(tmp_path):
    import diffusers
    import torch

    from tests.conftest import serve

    folder = ZOO["aura-flow"].save(tmp_path / "aura")
    lora = lora_file(tmp_path, "aura-flow")
    proc = compile_text(
        tmp_path, "aura", f"base: {folder}\nprecision: fp32\nloras:\n  - source: {lora}\n    scale: 0.8\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    request = {"prompt": "a photo of a cat", "seed": 3, "num_inference_steps": 2, "width": 64, "height": 64}
    image = serve(tmp_path / "home", Path(proc.stdout.strip()), request)
    pipe = diffusers.AuraFlowPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(lora), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.8])
    args = {k: v for k, v in request.items() if k != "seed"}
    want = np.array(pipe(**args, generator=torch.Generator("cpu").manual_seed(3)).images[0])
    assert int(np.abs(image.astype(int) - want.astype(int)).max()) <= 1
    pipe.disable_lora()
    without = np.array(pipe(**args, generator=torch.Generator("cpu").manual_seed(3)).images[0])
    assert not np.array_equal(image, without)  # the LoRA acted


@pytest.mark.slow
def test_fp16_keeps_the_modules_a_model_keeps_in_fp32(tmp_path, chroma):
    from safetensors import safe_open

    proc = compile_text(tmp_path, "half", f"base: {chroma}\nprecision: fp16\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (weights,) = (Path(proc.stdout.strip()) / "pipeline" / "text_encoder").glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    # T5's _keep_in_fp32_modules: the feed-forward output projections ("wo") overflow in fp16.
    assert {d for k, d in dtypes.items() if k.endswith("DenseReluDense.wo.weight")} == {"F32"}
    assert {d for k, d in dtypes.items() if k.endswith("SelfAttention.q.weight")} == {"F16"}


def test_the_same_bytes_from_the_test_hub_and_a_folder_build_the_same_files(tmp_path, chroma, hub):
    """Same recipe name, two stores: one compiles the folder, the other the Hub repo of its bytes."""
    hub.repo("uiw-test/tiny-chroma").push(tree(chroma))
    built = {}
    for store, base, env in (("a", str(chroma), None), ("b", "hf://uiw-test/tiny-chroma", {"HF_ENDPOINT": hub.url})):
        (tmp_path / store).mkdir()
        (tmp_path / store / "m.yaml").write_text(f"base: {base}\n")
        proc = run_compiler("recipe=m", f"recipes_dir={tmp_path / store}", home=tmp_path / store / "home", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        built[store] = Path(proc.stdout.strip())
    files = {
        store: {(f["path"], f["sha256"]) for f in json.loads((p / "manifest.json").read_text())["files"]}
        for store, p in built.items()
    }
    assert files["a"] == files["b"]  # the same pipeline, byte for byte
    manifest = json.loads((built["b"] / "manifest.json").read_text())
    assert manifest["family"] == "generic:ChromaPipeline"
    assert manifest["capabilities"]["tasks"] == ["txt2img", "img2img", "inpaint"]

"""Hostile model files: NaN/Inf weights, truncated or malformed safetensors, FIFOs, LoRAs of
another model. Each is refused through the real CLIs (`python -m compiler`, `python -m
compiler.detect`) with exit 2, nothing on stdout, where/what/hint on stderr, no traceback and
nothing left in the store."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from compiler.detect import Detection
from compiler.errors import UserError
from tests.conftest import PY, REPO, compile_text, run_compiler

RECIPE = "base: {base}\nprecision: fp32\n{fields}\n"
# kohya names of tiny-sd15 layers (diffusers module paths with "_"), and the component they are in.
LAYERS = (
    "unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "text_encoder.text_model.encoder.layers.1.self_attn.v_proj",
    "text_encoder.text_model.encoder.layers.1.self_attn.out_proj",
)
KOHYA = {
    ("lora_unet_" if layer.startswith("unet.") else "lora_te_") + layer.split(".", 1)[1].replace(".", "_"): layer
    for layer in LAYERS
}


@pytest.fixture(scope="module")
def sd15() -> dict[str, torch.Tensor]:
    """tiny-sd15's UNet and text encoder weights, "component.key" -> tensor."""
    from compiler.tiny_models import BUILTINS

    pipe = BUILTINS["tiny-sd15"].build()
    return {f"{c}.{k}": v for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def kohya_lora(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A rank-4 kohya LoRA of the KOHYA layers, shaped after ``weights``."""
    g = torch.Generator().manual_seed(5)
    state = {}
    for name, layer in KOHYA.items():
        out_dim, in_dim = weights[layer.replace("text_model.", "") + ".weight"].shape
        state[f"{name}.lora_down.weight"] = torch.randn(4, in_dim, generator=g) * 0.1
        state[f"{name}.lora_up.weight"] = torch.randn(out_dim, 4, generator=g) * 0.1
        state[f"{name}.alpha"] = torch.tensor(4.0)
    return state


def refused(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A user error: exit 2, empty stdout, where/what/hint on stderr, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == "", proc.stdout
    assert "error: " in proc.stderr and "hint: " in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


def store_is_clean(home: Path) -> None:
    """No artifact, staging folder, converted base, scratch folder or name was left behind."""
    for pattern in ("artifacts/*/*", "converted/*/*", "tmp/*", "names/*"):
        assert not list(home.glob(pattern)), (pattern, list(home.glob(pattern)))


def write_raw(path: Path, header: dict[str, object], data: bytes) -> Path:
    """A safetensors file written byte by byte: whatever header it is given."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# -- NaN / Inf weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nonfinite_count_agrees_with_numpy(dtype):
    from compiler.finite import nonfinite

    g = torch.Generator().manual_seed(11)
    tensors = []
    for i in range(40):
        t = torch.randn(int(torch.randint(1, 5000, (1,), generator=g)), generator=g).to(dtype)
        if i % 3 == 0:  # NaN, +Inf or -Inf at a random place, the last element included
            pos = int(torch.randint(0, t.numel(), (1,), generator=g)) if i % 2 else t.numel() - 1
            t[pos] = (float("nan"), float("inf"), float("-inf"))[i % 9 // 3]
        tensors.append((f"t{i}", t))
    tensors.append(("ints", torch.arange(10)))  # integer tensors hold no NaN
    seen, bad, named = nonfinite(tensors)
    want = [n for n, t in tensors if not np.isfinite(t.double().numpy()).all()]
    assert (seen, bad) == (len(tensors), len(want))
    assert [x.split(" ")[0] for x in named] == want[:3]


def test_lora_full_of_nan_is_a_compile_error_naming_the_tensors(tmp_path, sd15):
    (tmp_path / "recipes").mkdir()
    state = kohya_lora(sd15)
    for i, name in enumerate(KOHYA):
        state[f"{name}.lora_up.weight"][0, i] = float("nan") if i % 2 else float("inf")
    save_file(state, tmp_path / "recipes" / "diverged.safetensors")
    proc = compile_text(
        tmp_path, "r", RECIPE.format(base="builtin:tiny-sd15", fields="loras:\n  - source: ./diverged.safetensors")
    )
    refused(proc, "loras: diverged", "4 of the 12 tensors", "NaN or Inf", "and 1 more")
    assert ".lora_up.weight (Inf)" in proc.stderr and ".lora_up.weight (NaN)" in proc.stderr
    store_is_clean(tmp_path / "home")


def test_checkpoint_with_nonfinite_weights_fails(tmp_path):
    from compiler.tiny_models import BUILTINS
    from tests.helpers.ldm import pipeline_to_ldm

    (tmp_path / "recipes").mkdir()
    state = pipeline_to_ldm(BUILTINS["tiny-sd15"].build())
    key = "model.diffusion_model.out.2.weight"
    state[key] = state[key].clone()
    state[key][0, 0, 0, 0] = float("nan")
    save_file(state, tmp_path / "recipes" / "ckpt.safetensors")
    proc = compile_text(tmp_path, "c", RECIPE.format(base="builtin:tiny-sd15", fields="checkpoint: ./ckpt.safetensors"))
    refused(proc, "checkpoint", f"1 of the {len(state)} tensors", f"{key} (NaN)")
    store_is_clean(tmp_path / "home")


def test_embedding_with_nonfinite_weights_fails(tmp_path, sd15):
    (tmp_path / "recipes").mkdir()
    width = sd15["text_encoder.embeddings.token_embedding.weight"].shape[1]
    vectors = torch.randn(2, width)
    vectors[1, 3] = float("-inf")
    save_file({"emb_params": vectors}, tmp_path / "recipes" / "style.safetensors")
    proc = compile_text(
        tmp_path, "e", RECIPE.format(base="builtin:tiny-sd15", fields="embeddings:\n  - source: ./style.safetensors")
    )
    refused(proc, "embeddings.0", "emb_params (Inf)")
    store_is_clean(tmp_path / "home")


# -- unreadable files ----------------------------------------------------------------------------


def hostile_files(folder: Path) -> dict[str, Path]:
    """A 1-D "first convolution", a file cut short, a FIFO."""
    folder.mkdir(parents=True, exist_ok=True)
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    files = {
        "flat": write_raw(
            folder / "flat.safetensors", {conv: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)
        ),
        "truncated": write_raw(
            folder / "truncated.safetensors",
            {conv: {"dtype": "F32", "shape": [32, 4, 3, 3], "data_offsets": [0, 4608]}},
            bytes(1000),
        ),
        "fifo": folder / "fifo.safetensors",
    }
    os.mkfifo(files["fifo"])
    return files


def test_detect_cli_refuses_unreadable_files_with_a_hint(tmp_path):
    files = hostile_files(tmp_path)
    expect = {"flat": "has shape [4]", "truncated": "truncated", "fifo": "FIFO"}
    for name, path in files.items():
        # A FIFO nobody writes to used to block the read forever: bounded here.
        proc = subprocess.run(
            [PY, "-m", "compiler.detect", str(path)], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        refused(proc, str(path), expect[name])


@pytest.mark.parametrize("field", ["checkpoint", "loras"])
def test_compile_refuses_unreadable_files(tmp_path, field):
    files = hostile_files(tmp_path / "recipes")
    expect = {"flat": "has shape [4]", "truncated": "past the end of the file", "fifo": "FIFO"}
    for name, path in files.items():
        fields = f"checkpoint: ./{path.name}" if field == "checkpoint" else f"loras:\n  - source: ./{path.name}"
        proc = compile_text(tmp_path, name, RECIPE.format(base="builtin:tiny-sd15", fields=fields))
        refused(proc, f"{name}.yaml: {'checkpoint' if field == 'checkpoint' else 'loras.0'}", expect[name])
    store_is_clean(tmp_path / "home")


def test_a_fifo_inside_a_base_folder_is_refused(tmp_path):
    """Every file of a plain folder is hashed to pin it: a FIFO there used to block that forever."""
    folder = tmp_path / "recipes" / "model"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("weights below")
    os.mkfifo(folder / "weights.safetensors")
    (tmp_path / "recipes" / "f.yaml").write_text(RECIPE.format(base="./model", fields=""))
    proc = run_compiler("recipe=f", f"recipes_dir={tmp_path / 'recipes'}", home=tmp_path / "home", timeout=60)
    refused(proc, "f.yaml: base", "weights.safetensors", "not regular files")


def test_the_checkpoint_detection_log_line_says_what_was_found(tmp_path, sd15):
    (tmp_path / "recipes").mkdir()
    save_file(kohya_lora(sd15), tmp_path / "recipes" / "a-lora.safetensors")
    proc = compile_text(
        tmp_path, "l", RECIPE.format(base="builtin:tiny-sd15", fields="checkpoint: ./a-lora.safetensors")
    )
    refused(proc, "this file is a lora, not a checkpoint")
    (line,) = [x for x in proc.stderr.splitlines() if "checkpoint detected" in x]
    assert "None" not in line, line
    assert "lora (kohya format), family one of sd15, sd2, sdxl, flux-dev, sd3; evidence: kohya keys" in line, line


# -- LoRAs of another model ----------------------------------------------------------------------


def test_lora_layer_widths_name_the_layer_and_both_families():
    """Real SD 1.5 widths against an SDXL base's layers: the cross-attention width names SD 1.x
    where the header's detection of this file (a LoRA without that key's pattern) could not."""
    from compiler.validate import check_lora_shapes

    lora = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (8, 768),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": (640, 8),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (8, 640),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": (640, 8),
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (8, 640),  # SGM naming: left to the build
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": (640, 8),
    }
    base = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight": (640, 640),
    }
    unknown = Detection("lora", None, "kohya")
    with pytest.raises(UserError) as e:
        check_lora_shapes(lora, base, "sdxl", unknown, "loras: x")
    text = str(e.value)
    assert text.startswith("loras: x: this LoRA does not fit the sdxl base: 1 of the 2 layers it patches has")
    assert "attn2.to_k (lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k)" in text
    assert "768 -> 640 in the file, 2048 -> 640 in the base" in text and "family: sd15" in text
    # The same widths pass, and so do names the base does not have (the build checks where they land).
    fitting = {k: v for k, v in lora.items() if "attn2" not in k}
    check_lora_shapes(fitting, base, "sdxl", unknown, "loras: x")


def test_an_sd15_lora_on_an_sdxl_base_fails_before_the_build(tmp_path, sd15):
    from compiler.tiny_models import BUILTINS

    (tmp_path / "recipes").mkdir()
    save_file(kohya_lora(sd15), tmp_path / "recipes" / "sd15-style.safetensors")
    # The base as a diffusers folder: its layers come from its configs, on the meta device.
    BUILTINS["tiny-sdxl"].build().save_pretrained(tmp_path / "recipes" / "xl")
    for base in ("builtin:tiny-sdxl", "./xl"):
        proc = compile_text(
            tmp_path, "x", RECIPE.format(base=base, fields="loras:\n  - source: ./sd15-style.safetensors")
        )
        refused(
            proc,
            "loras: sd15-style: this LoRA does not fit the sdxl base",
            "unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
            "32 -> 16 in the file, 80 -> 16 in the base",
        )
        assert "uiw_landing_probe" not in proc.stderr and "size mismatch" not in proc.stderr
        store_is_clean(tmp_path / "home")

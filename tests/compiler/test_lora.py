"""LoRAs fused at build time. The artifact's weights are compared with the LoRA math computed
here, independently of diffusers: W + scale·(alpha/rank)·up·down per module (PEFT files have no
alpha: alpha = rank), for kohya and PEFT files and for two LoRAs on the same modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import DEMO_SETTINGS, REQ, compile_text, serve

RANK = 4
# (kohya module name, diffusers component, module path): attention projections of the UNet
# (several blocks, self and cross attention) and of the text encoder.
MODULES = [
    (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "unet",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
    (
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k",
        "unet",
        "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    ),
    (
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
        "unet",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",
    ),
    (
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
        "unet",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    ),
    (
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj",
        "text_encoder",
        "encoder.layers.1.self_attn.v_proj",
    ),
    # diffusers 0.42 tells kohya text-encoder LoRAs by an out_proj key (to_out_lora after its
    # conversion): one without out_proj fails to load (docs/facts.md). Real kohya files have it.
    (
        "lora_te_text_model_encoder_layers_1_self_attn_out_proj",
        "text_encoder",
        "encoder.layers.1.self_attn.out_proj",
    ),
]
RECIPE = "base: builtin:tiny-sd15\n" + DEMO_SETTINGS + "loras:\n{loras}\n"


@pytest.fixture(scope="module")
def base() -> dict[str, dict[str, torch.Tensor]]:
    from compiler.tiny_models import BUILTINS

    pipe = BUILTINS["tiny-sd15"].build()
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")}


def _factors(base, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for kohya, comp, path in MODULES:
        w = base[comp][path + ".weight"]
        down = torch.randn(RANK, w.shape[1], generator=g) * 0.1
        up = torch.randn(w.shape[0], RANK, generator=g) * 0.1
        out[kohya] = (up, down)
    return out


def kohya_file(path: Path, factors, alpha: float) -> Path:
    state = {}
    for kohya, (up, down) in factors.items():
        state[f"{kohya}.lora_down.weight"] = down
        state[f"{kohya}.lora_up.weight"] = up
        state[f"{kohya}.alpha"] = torch.tensor(alpha)
    save_file(state, path)
    return path


def peft_file(path: Path, factors) -> Path:
    """diffusers' own LoRA format (PEFT names under the component's prefix), no alpha."""
    state = {}
    for kohya, comp, module in MODULES:
        up, down = factors[kohya]
        name = f"text_model.{module}" if comp == "text_encoder" else module  # as published files name it
        state[f"{comp}.{name}.lora_A.weight"] = down
        state[f"{comp}.{name}.lora_B.weight"] = up
    save_file(state, path)
    return path


def _compile(tmp_path: Path, loras: str, name: str = "r"):
    return compile_text(tmp_path, name, RECIPE.format(loras=loras))


def _weights(artifact: Path) -> dict[str, dict[str, torch.Tensor]]:
    pipe = artifact / "pipeline"
    return {
        "unet": load_file(pipe / "unet" / "diffusion_pytorch_model.safetensors"),
        "text_encoder": load_file(pipe / "text_encoder" / "model.safetensors"),
    }


def _expect(base, terms) -> dict[tuple[str, str], torch.Tensor]:
    """W + Σ scale·(alpha/rank)·up·down, per module (float64 for the reference)."""
    out = {}
    for kohya, comp, module in MODULES:
        w = base[comp][module + ".weight"].double()
        for factors, scale, alpha in terms:
            up, down = factors[kohya]
            w = w + scale * (alpha / RANK) * (up.double() @ down.double())
        out[(comp, module)] = w
    return out


def _check(artifact: Path, base, terms) -> None:
    got = _weights(artifact)
    for (comp, module), want in _expect(base, terms).items():
        have = got[comp][module + ".weight"].double()
        assert torch.allclose(have, want, atol=1e-5), (comp, module, (have - want).abs().max())
    # Everything the LoRAs do not target is untouched, bit for bit.
    targeted = {(c, m + ".weight") for _, c, m in MODULES}
    for comp in ("unet", "text_encoder"):
        for k, v in base[comp].items():
            if (comp, k) not in targeted and k in got[comp]:
                assert torch.equal(got[comp][k], v), (comp, k)


def test_kohya_and_peft_loras_fuse_to_the_lora_math(tmp_path, base, demo_image):
    a = _factors(base, 1)
    b = _factors(base, 2)
    (tmp_path / "recipes").mkdir()
    kohya_file(tmp_path / "recipes" / "style-a.safetensors", a, alpha=2.0)
    peft_file(tmp_path / "recipes" / "detail-b.safetensors", b)

    one = _compile(tmp_path, "  - source: ./style-a.safetensors\n    scale: 0.7", name="kohya")
    assert one.returncode == 0, one.stderr[-3000:]
    _check(Path(one.stdout.strip()), base, [(a, 0.7, 2.0)])
    manifest = json.loads((Path(one.stdout.strip()) / "manifest.json").read_text())
    assert "loras.0" in manifest["provenance"] and manifest["loras"] == [
        {"name": "style-a", "scale": 0.7, "fused": True, "file": None}
    ]

    both = _compile(
        tmp_path,
        "  - source: ./style-a.safetensors\n    scale: 0.7\n  - source: ./detail-b.safetensors\n    scale: -0.5",
        name="both",
    )
    assert both.returncode == 0, both.stderr[-3000:]
    artifact = Path(both.stdout.strip())
    _check(artifact, base, [(a, 0.7, 2.0), (b, -0.5, RANK)])
    # A fused artifact serves like any other, and the LoRA changes the picture.
    image = serve(tmp_path / "home", artifact, REQ)
    assert image.shape == demo_image.shape and not np.array_equal(image, demo_image)
    # The manifest says what was fused, at which scale; the scale is part of the cache key.
    both_manifest = json.loads((artifact / "manifest.json").read_text())
    assert both_manifest["loras"] == [
        {"name": "style-a", "scale": 0.7, "fused": True, "file": None},
        {"name": "detail-b", "scale": -0.5, "fused": True, "file": None},
    ]
    assert both_manifest["cache_key"] != manifest["cache_key"]


def test_wrong_family_and_foreign_loras_fail_at_compile(tmp_path, base):
    (tmp_path / "recipes").mkdir()
    # SDXL kohya naming (two text encoders: lora_te1_/lora_te2_): detection calls it sdxl.
    sdxl = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(RANK, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, RANK),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(RANK, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, RANK),
    }
    save_file(sdxl, tmp_path / "recipes" / "xl.safetensors")
    wrong = _compile(tmp_path, "  - source: ./xl.safetensors", name="xl")
    assert wrong.returncode == 2, wrong.stderr
    assert "made for sdxl, the base is sd15" in wrong.stderr and "te1/te2" in wrong.stderr, wrong.stderr

    # Keys of a model that is not this one: nothing would be patched.
    foreign = {
        "lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.zeros(RANK, 32),
        "lora_unet_input_blocks_99_1_proj_in.lora_up.weight": torch.zeros(32, RANK),
    }
    save_file(foreign, tmp_path / "recipes" / "foreign.safetensors")
    none = _compile(tmp_path, "  - source: ./foreign.safetensors", name="foreign")
    assert none.returncode == 2, none.stderr
    assert "loras: foreign" in none.stderr and ("none of them exists" in none.stderr or "cannot apply" in none.stderr)

    # Part of a LoRA lands, part names modules the base lacks: refused, never half-applied.
    a = _factors(base, 3)
    partial = {
        f"{k}.{n}": v for k, (up, down) in a.items() for n, v in (("lora_down.weight", down), ("lora_up.weight", up))
    }
    partial.update(foreign)
    save_file(partial, tmp_path / "recipes" / "partial.safetensors")
    half = _compile(tmp_path, "  - source: ./partial.safetensors", name="partial")
    assert half.returncode == 2, half.stderr
    assert "left out" in half.stderr or "cannot apply" in half.stderr, half.stderr
    # Nothing was published for any of them.
    assert not list((tmp_path / "home").glob("artifacts/*/*"))


def test_lora_recipe_errors_are_reported_with_hints(tmp_path):
    (tmp_path / "recipes").mkdir()
    proc = _compile(
        tmp_path, "  - source: ./a.safetensors\n  - source: ./a.safetensors\n  - source: ftp://x/y", name="bad"
    )
    assert proc.returncode == 2
    assert (
        "loras.1.name: two LoRAs are named 'a'" in proc.stderr
        and "give each of the LoRAs its own `name:`" in proc.stderr
    )
    assert "loras.2.source" in proc.stderr
    typo = _compile(tmp_path, "  - source: ./a.safetensors\n    fuse: maybe", name="typo")
    assert typo.returncode == 2 and "loras.0.fuse" in typo.stderr and "'maybe'" in typo.stderr


def test_adapters_from_civitai_versions_take_their_locked_file_names():
    from compiler.build import named_by_lock
    from compiler.lockfile import Lock, LockedFile, LockEntry
    from compiler.pinning import Locked
    from compiler.recipe import parse_recipe

    recipe = parse_recipe(
        "r",
        Path("/m/r.yaml"),
        {
            "base": "builtin:tiny-sd15",
            "loras": [{"source": "civitai://models/58390@62833"}, {"source": "./mine.safetensors"}],
            "embeddings": [{"source": "civitai://models/7808@9208"}],
        },
    )
    assert [x.name for x in recipe.loras] == ["lora0", "mine"] and recipe.embeddings[0].stem == "embedding0"

    def entry(src: str, name: str) -> LockEntry:
        return LockEntry(source=src, kind="file", pin="x", files=(LockedFile(path=name, sha256="sha256:0", size=1),))

    sources = {
        "civitai://models/58390@62833": entry("civitai://models/58390@62833", "add_detail.safetensors"),
        "/m/mine.safetensors": entry("/m/mine.safetensors", "mine.safetensors"),
        "civitai://models/7808@9208": entry("civitai://models/7808@9208", "easynegative.safetensors"),
    }
    roles = {"loras.0": "civitai://models/58390@62833", "loras.1": "/m/mine.safetensors"}
    roles["embeddings.0"] = "civitai://models/7808@9208"
    named = named_by_lock(recipe, Locked(Lock(recipe="r", sources=sources), roles))
    assert [x.name for x in named.loras] == ["add_detail", "mine"]
    assert named.embeddings[0].stem == "easynegative"

"""VAE override and textual-inversion embeddings, built into the artifact. Checked against the
files' own tensors: the artifact's VAE is the file's, each token's input-embedding rows are the
file's vectors (both text encoders for SDXL), and the served image changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import REQ, compile_text, serve
from tests.helpers.ldm import VAE_PREFIX, vae_to_ldm

RECIPE = """base: {base}
precision: fp32
scheduler: K_EULER
defaults:
  steps: 4
{extra}
"""


def _compile(tmp_path: Path, name: str, extra: str, base: str = "builtin:tiny-sd15"):
    return compile_text(tmp_path, name, RECIPE.format(base=base, extra=extra))


def _token_rows(artifact: Path, encoder: str, tokenizer: str, token: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(artifact / "pipeline" / tokenizer)
    vocab = tok.get_vocab()
    ids = [vocab[t] for t in (token, *(f"{token}_{i}" for i in range(1, 8))) if t in vocab]
    weights = load_file(artifact / "pipeline" / encoder / "model.safetensors")
    table = next(v for k, v in weights.items() if k.endswith("token_embedding.weight"))
    return table[ids]


@pytest.fixture(scope="module")
def tiny():
    from compiler.tiny_models import BUILTINS

    return BUILTINS["tiny-sd15"].build()


def test_vae_and_embeddings_are_built_in(tmp_path, tiny, demo_image):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    # Another VAE of the same architecture (reseeded), as a standalone LDM-named file.
    torch.manual_seed(99)
    vae = type(tiny.vae)(**{k: v for k, v in tiny.vae.config.items() if not k.startswith("_")}).eval()
    state = {
        k.removeprefix(VAE_PREFIX): v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()
    }
    save_file(state, recipes / "other-vae.safetensors")
    g = torch.Generator().manual_seed(5)
    style = torch.randn(2, 32, generator=g)  # A1111: two vectors, named by the file
    save_file({"emb_params": style}, recipes / "tiny-style.safetensors")
    cat = torch.randn(32, generator=g)  # diffusers learned_embeds: the key is the token
    save_file({"<cat-toy>": cat}, recipes / "learned_embeds.safetensors")
    old = torch.randn(3, 32, generator=g)  # an A1111 .pt (a pickle): read with weights_only
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": old}, "name": "old-style", "step": 500}
    torch.save(a1111, recipes / "old-style.pt")

    proc = _compile(
        tmp_path,
        "r",
        "vae: ./other-vae.safetensors\nallow_pickle: true\nembeddings:\n  - source: ./tiny-style.safetensors\n"
        "  - source: ./learned_embeds.safetensors\n  - source: ./old-style.pt",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = Path(proc.stdout.strip())
    built = load_file(artifact / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors")
    want = vae.state_dict()
    assert set(built) == set(want) and all(torch.equal(built[k], want[k]) for k in want)

    assert torch.equal(_token_rows(artifact, "text_encoder", "tokenizer", "tiny-style"), style)
    assert torch.equal(_token_rows(artifact, "text_encoder", "tokenizer", "<cat-toy>"), cat[None])
    assert torch.equal(_token_rows(artifact, "text_encoder", "tokenizer", "old-style"), old)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["embeddings"] == [
        {"token": "tiny-style", "vectors": 2, "text_encoders": ["text_encoder"]},
        {"token": "<cat-toy>", "vectors": 1, "text_encoders": ["text_encoder"]},
        {"token": "old-style", "vectors": 3, "text_encoders": ["text_encoder"]},
    ]
    # The same prompt, with the token, on the artifact without it: another image.
    req = {**REQ, "prompt": "a tiny-style fox, <cat-toy>"}
    assert not np.array_equal(serve(tmp_path / "home", artifact, req), serve(tmp_path / "home", _demo(tmp_path), req))


def _demo(tmp_path: Path) -> Path:
    proc = _compile(tmp_path, "plain", "")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Path(proc.stdout.strip())


def test_adapters_that_do_not_fit_fail_at_compile(tmp_path):
    from compiler.tiny_models import BUILTINS

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    flux_vae = BUILTINS["tiny-flux"].build().vae  # 16 latent channels: not an SD VAE
    save_file({k: v.contiguous() for k, v in flux_vae.state_dict().items()}, recipes / "flux-vae.safetensors")
    bad_vae = _compile(tmp_path, "v", "vae: ./flux-vae.safetensors")
    assert bad_vae.returncode == 2 and "vae: this file does not fit the base's vae" in bad_vae.stderr, bad_vae.stderr

    save_file({"emb_params": torch.zeros(1, 32)}, recipes / "a.safetensors")
    clash = _compile(tmp_path, "c", "embeddings:\n  - source: ./a.safetensors\n    token: a")  # "a" is a word already
    assert clash.returncode == 2 and "cannot add 'a'" in clash.stderr and "`token:`" in clash.stderr, clash.stderr

    save_file({"emb_params": torch.zeros(1, 768)}, recipes / "wide.safetensors")  # an SD 1.5 embedding
    wide = _compile(tmp_path, "w", "embeddings:\n  - source: ./wide.safetensors")
    assert wide.returncode == 2 and "embeddings.0" in wide.stderr and "width" in wide.stderr, wide.stderr

    # Of another family by its header (SDXL's two vector sets): refused before the build.
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, recipes / "xl.safetensors")
    xl = _compile(tmp_path, "x", "embeddings:\n  - source: ./xl.safetensors")
    assert xl.returncode == 2 and "made for sdxl, the base is sd15" in xl.stderr, xl.stderr
    assert not list((tmp_path / "home").glob("artifacts/*/*")), "nothing half-built was published"


def test_sdxl_embedding_reaches_both_text_encoders(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    g = torch.Generator().manual_seed(6)
    clip_l, clip_g = torch.randn(2, 32, generator=g), torch.randn(2, 48, generator=g)  # tiny-sdxl widths
    save_file({"clip_l": clip_l, "clip_g": clip_g}, recipes / "xl-style.safetensors")
    proc = _compile(
        tmp_path,
        "xl",
        "embeddings:\n  - source: ./xl-style.safetensors\n    token: <xl-style>",
        base="builtin:tiny-sdxl",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = Path(proc.stdout.strip())
    assert torch.equal(_token_rows(artifact, "text_encoder", "tokenizer", "<xl-style>"), clip_l)
    assert torch.equal(_token_rows(artifact, "text_encoder_2", "tokenizer_2", "<xl-style>"), clip_g)

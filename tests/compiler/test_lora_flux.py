"""FLUX LoRAs on builtin:tiny-flux, in the formats FLUX LoRAs are published in. Fused weights are
compared with the LoRA math computed here, independently of diffusers: W + scale·(alpha/rank)·up·down
per module, where a kohya file names BFL modules (its fused qkv is one up matrix whose rows are q, k
and v; its final layer's modulation is (shift, scale) where diffusers' is (scale, shift)). Formats
diffusers drops in part or whole fail the build; nothing is ever fused half.

Most checks run in-process on one tiny-flux pipeline (compiler.lora.apply_loras, the build's own
code); two CLI compiles cover the recipe → artifact → service path."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from compiler.detect import detect, detect_file
from compiler.errors import UserError
from compiler.lora import apply_loras
from tests.conftest import REQ, compile_text, serve

RANK = 4
COMPONENTS = ("transformer", "text_encoder")
# kohya FLUX module (BFL names, as kohya sd-scripts and ai-toolkit write them) -> the diffusers
# modules its update lands on, in the order of its up matrix's rows. FLUX.1's fused projections:
# img/txt attention qkv is [q; k; v]; the final layer's adaLN modulation is [shift; scale].
KOHYA: dict[str, tuple[str, tuple[str, ...]]] = {
    "lora_unet_double_blocks_0_img_attn_qkv": (
        "transformer",
        tuple(f"transformer_blocks.0.attn.to_{x}" for x in "qkv"),
    ),
    "lora_unet_double_blocks_1_txt_attn_qkv": (
        "transformer",
        tuple(f"transformer_blocks.1.attn.add_{x}_proj" for x in "qkv"),
    ),
    "lora_unet_double_blocks_0_img_attn_proj": ("transformer", ("transformer_blocks.0.attn.to_out.0",)),
    "lora_unet_double_blocks_1_txt_attn_proj": ("transformer", ("transformer_blocks.1.attn.to_add_out",)),
    "lora_unet_double_blocks_0_img_mlp_0": ("transformer", ("transformer_blocks.0.ff.net.0.proj",)),
    "lora_unet_double_blocks_1_txt_mlp_2": ("transformer", ("transformer_blocks.1.ff_context.net.2",)),
    "lora_unet_double_blocks_0_img_mod_lin": ("transformer", ("transformer_blocks.0.norm1.linear",)),
    "lora_unet_double_blocks_1_txt_mod_lin": ("transformer", ("transformer_blocks.1.norm1_context.linear",)),
    "lora_unet_single_blocks_1_linear2": ("transformer", ("single_transformer_blocks.1.proj_out",)),
    "lora_unet_single_blocks_0_modulation_lin": ("transformer", ("single_transformer_blocks.0.norm.linear",)),
    "lora_unet_img_in": ("transformer", ("x_embedder",)),
    "lora_unet_txt_in": ("transformer", ("context_embedder",)),
    "lora_unet_time_in_in_layer": ("transformer", ("time_text_embed.timestep_embedder.linear_1",)),
    "lora_unet_vector_in_out_layer": ("transformer", ("time_text_embed.text_embedder.linear_2",)),
    "lora_unet_guidance_in_in_layer": ("transformer", ("time_text_embed.guidance_embedder.linear_1",)),
    "lora_unet_final_layer_linear": ("transformer", ("proj_out",)),
    "lora_unet_final_layer_adaLN_modulation_1": ("transformer", ("norm_out.linear",)),  # [shift; scale]
    # CLIP-L (kohya's lora_te1_). diffusers tells a kohya text-encoder LoRA by its out_proj key.
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", ("encoder.layers.0.self_attn.q_proj",)),
    "lora_te1_text_model_encoder_layers_0_self_attn_out_proj": (
        "text_encoder",
        ("encoder.layers.0.self_attn.out_proj",),
    ),
    "lora_te1_text_model_encoder_layers_1_mlp_fc1": ("text_encoder", ("encoder.layers.1.mlp.fc1",)),
}
SWAPPED = {"lora_unet_final_layer_adaLN_modulation_1"}
# A rank divisible by 3 and a block-diagonal up matrix: diffusers then splits the down matrix
# too (its "sparse" branch); the other qkv takes the dense branch (down shared by q, k and v).
SPARSE = "lora_unet_double_blocks_1_txt_attn_qkv"
# ComfyUI's spelling of the same kohya format (diffusion_model.<BFL name with dots>).
COMFY = {
    "diffusion_model.double_blocks.1.img_attn.qkv": (
        "transformer",
        tuple(f"transformer_blocks.1.attn.to_{x}" for x in "qkv"),
    ),
    "diffusion_model.single_blocks.0.linear2": ("transformer", ("single_transformer_blocks.0.proj_out",)),
}
# diffusers' own naming (PEFT factors under the component), as its training scripts save it.
PEFT: dict[str, tuple[str, tuple[str, ...]]] = {
    f"transformer.{m}": ("transformer", (m,))
    for m in (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.add_k_proj",
        "transformer_blocks.0.ff_context.net.0.proj",
        "single_transformer_blocks.1.proj_mlp",
        "single_transformer_blocks.0.attn.to_k",
        "x_embedder",
        "norm_out.linear",  # diffusers' order: no swap
    )
} | {
    "text_encoder.text_model.encoder.layers.1.self_attn.v_proj": (
        "text_encoder",
        ("encoder.layers.1.self_attn.v_proj",),
    )
}

RECIPE = """base: builtin:tiny-flux
precision: fp32
defaults:
  steps: 2
loras:
{loras}
"""


@pytest.fixture(scope="module")
def flux():
    from compiler.tiny_models import BUILTINS

    pipe = BUILTINS["tiny-flux"].build()
    clean = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}
    return pipe, clean


def _lora(clean, table, seed: int, alphas=(2.0, 8.0, 1.0)):
    """{file module: (up, down, alpha)} with the shapes of the modules it lands on."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, (name, (comp, mods)) in enumerate(table.items()):
        ws = [clean[comp][m + ".weight"] for m in mods]
        rank = 6 if name == SPARSE else RANK
        up = torch.randn(sum(w.shape[0] for w in ws), rank, generator=g) * 0.1
        if name == SPARSE:  # block-diagonal: q rows use rank 0-1, k rows 2-3, v rows 4-5
            mask = torch.block_diag(*[torch.ones(w.shape[0], 2) for w in ws])
            up = up * mask
        down = torch.randn(rank, ws[0].shape[1], generator=g) * 0.1
        out[name] = (up, down, alphas[n % len(alphas)])
    return out


def kohya_file(path: Path, lora) -> Path:
    state = {}
    for name, (up, down, alpha) in lora.items():
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    save_file(state, path)
    return path


def peft_file(path: Path, lora) -> Path:
    save_file(
        {
            f"{n}.{k}": t
            for n, (up, down, _) in lora.items()
            for k, t in (("lora_A.weight", down), ("lora_B.weight", up))
        },
        path,
    )
    return path


def metadata_file(folder: Path, lora, alpha: float) -> Path:
    """A PEFT file as diffusers' FLUX training scripts write it: alpha (and target_modules) in the
    header's lora_adapter_metadata, not in the keys."""
    from diffusers import FluxPipeline

    layers = {
        n.removeprefix("transformer.") + f".{k}": t
        for n, (up, down, _) in lora.items()
        for k, t in (("lora_A.weight", down), ("lora_B.weight", up))
    }
    meta = {"r": RANK, "lora_alpha": alpha, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in lora})}
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta)
    return folder / "pytorch_lora_weights.safetensors"


def _expect(clean, terms) -> dict[tuple[str, str], torch.Tensor]:
    """W + Σ scale·(alpha/rank)·up·down per diffusers module (float64), each fused matrix's rows
    split among the modules it names, the final layer's [shift; scale] reordered to [scale; shift]."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    for table, lora, scale, alpha_of in terms:
        for name, (comp, mods) in table.items():
            up, down, alpha = lora[name]
            a = alpha_of(alpha, down.shape[0])
            delta = scale * (a / down.shape[0]) * (up.double() @ down.double())
            if name in SWAPPED:
                delta = torch.cat(delta.chunk(2)[::-1])
            rows = [clean[comp][m + ".weight"].shape[0] for m in mods]
            for m, d in zip(mods, delta.split(rows), strict=True):
                w = out.get((comp, m), clean[comp][m + ".weight"].double())
                out[(comp, m)] = w + d
    return out


KOHYA_ALPHA = lambda alpha, rank: alpha  # noqa: E731  (the file's alpha)
NO_ALPHA = lambda alpha, rank: rank  # noqa: E731  (PEFT keys carry none: alpha = rank)


def _check(got, clean, terms) -> None:
    want = _expect(clean, terms)
    for (comp, m), w in want.items():
        have = got[comp][m + ".weight"].double()
        assert torch.allclose(have, w, atol=1e-5), (comp, m, (have - w).abs().max())
    for comp in COMPONENTS:  # everything the LoRAs do not target is untouched, bit for bit
        for k, v in clean[comp].items():
            if (comp, k.removesuffix(".weight")) not in want:
                assert torch.equal(got[comp][k], v), (comp, k)


def _fuse(flux, files: list[tuple[Path, float]]):
    """apply_loras (all fused) on the shared pipeline, its weights read back, the pipeline then restored."""
    pipe, clean = flux
    loras = [
        (SimpleNamespace(name=f"l{i}", scale=s, fuse=True), SimpleNamespace(files={"f": p}))
        for i, (p, s) in enumerate(files)
    ]
    try:
        apply_loras(pipe, loras, Path("/nonexistent"))  # type: ignore[arg-type]  (nothing to store: all fused)
        return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}
    finally:
        pipe.unload_lora_weights()  # what a refused file may have left
        for c in COMPONENTS:
            getattr(pipe, c).load_state_dict(clean[c])


def test_kohya_flux_lora_fuses_to_the_bfl_lora_math(tmp_path, flux):
    _, clean = flux
    a = _lora(clean, KOHYA, 1)
    got = _fuse(flux, [(kohya_file(tmp_path / "a.safetensors", a), 0.8)])
    _check(got, clean, [(KOHYA, a, 0.8, KOHYA_ALPHA)])
    # The ComfyUI spelling, and two kohya LoRAs with one another on shared modules.
    c = _lora(clean, COMFY, 2)
    got = _fuse(
        flux, [(kohya_file(tmp_path / "a.safetensors", a), 0.8), (kohya_file(tmp_path / "c.safetensors", c), -0.6)]
    )
    _check(got, clean, [(KOHYA, a, 0.8, KOHYA_ALPHA), (COMFY, c, -0.6, KOHYA_ALPHA)])


def test_peft_flux_loras_fuse_to_the_lora_math(tmp_path, flux):
    _, clean = flux
    p = _lora(clean, PEFT, 3)
    got = _fuse(flux, [(peft_file(tmp_path / "p.safetensors", p), -0.5)])
    _check(got, clean, [(PEFT, p, -0.5, NO_ALPHA)])
    # Alpha in the header's metadata (8 at rank 4: twice the update) is kept: the file is handed
    # to diffusers as a file, not as a state dict. Its target_modules make PEFT wrap every to_q
    # and to_v of the model; those the file has no weights for stay bit for bit (checked).
    table = {
        f"transformer.transformer_blocks.1.attn.to_{x}": ("transformer", (f"transformer_blocks.1.attn.to_{x}",))
        for x in "qv"
    }
    m = _lora(clean, table, 4)
    (tmp_path / "meta").mkdir()
    got = _fuse(flux, [(metadata_file(tmp_path / "meta", m, alpha=8.0), 0.7)])
    _check(got, clean, [(table, m, 0.7, lambda alpha, rank: 8.0)])


def test_peft_dora_fuses_to_the_dora_math(tmp_path, flux):
    """PEFT's own DoRA (lora_magnitude_vector) is real DoRA in diffusers: W' = m·V/‖V‖ per output
    row, V = W + scale·B·A. (kohya's dora_scale is not: see the refusals.)"""
    _, clean = flux
    g = torch.Generator().manual_seed(5)
    w = clean["transformer"]["x_embedder.weight"].double()
    a, b, mag = (
        torch.randn(RANK, w.shape[1], generator=g) * 0.1,
        torch.randn(w.shape[0], RANK, generator=g) * 0.1,
        torch.rand(w.shape[0], generator=g) + 0.5,
    )
    path = tmp_path / "dora.safetensors"
    save_file(
        {
            "transformer.x_embedder.lora_A.weight": a,
            "transformer.x_embedder.lora_B.weight": b,
            "transformer.x_embedder.lora_magnitude_vector": mag,
        },
        path,
    )
    got = _fuse(flux, [(path, 0.5)])
    v = w + 0.5 * (b.double() @ a.double())
    want = mag.double()[:, None] * v / v.norm(dim=1, keepdim=True)
    assert torch.allclose(got["transformer"]["x_embedder.weight"].double(), want, atol=1e-5)


_G = torch.Generator().manual_seed(0)


def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_G) * 0.1


def _pair(name: str, out: int, inp: int, down="lora_down.weight", up="lora_up.weight") -> dict[str, torch.Tensor]:
    return {f"{name}.{down}": _t(RANK, inp), f"{name}.{up}": _t(out, RANK)}


GOOD_KOHYA = _pair("lora_unet_double_blocks_0_img_attn_qkv", 96, 32)
GOOD_PEFT = _pair("transformer.transformer_blocks.0.attn.to_q", 32, 32, "lora_A.weight", "lora_B.weight")
LOHA = {
    f"lora_unet_double_blocks_0_img_attn_proj.hada_{w}": _t(*s)
    for w, s in (("w1_a", (32, RANK)), ("w1_b", (RANK, 32)), ("w2_a", (32, RANK)), ("w2_b", (RANK, 32)))
}
# Each: (file, what the error says). diffusers raises on some, drops others silently.
REFUSED = {
    "loha": (LOHA, "LyCORIS LoHa/LoKr"),
    "lokr": (
        {
            "lora_unet_double_blocks_0_img_attn_proj.lokr_w1": _t(4, 4),
            "lora_unet_double_blocks_0_img_attn_proj.lokr_w2": _t(8, 8),
        },
        "LyCORIS LoHa/LoKr",
    ),
    "peft-loha": (
        {
            k.replace("lora_unet_double_blocks_0_img_attn_proj", "transformer.transformer_blocks.0.attn.to_out.0"): v
            for k, v in LOHA.items()
        },
        "cannot apply",
    ),
    "kohya-dora": ({**GOOD_KOHYA, "lora_unet_double_blocks_0_img_attn_qkv.dora_scale": torch.ones(96, 1)}, "DoRA"),
    "kohya-unknown-module": ({**GOOD_KOHYA, **_pair("lora_unet_double_blocks_0_img_foo", 32, 32)}, "cannot apply"),
    # diffusers drops these silently: a T5 (lora_te2_) module, a block the base lacks. Counting
    # would not see it: the one qkv module patches three modules, as many as the file names.
    "kohya-t5-and-missing-block": (
        {
            **GOOD_KOHYA,
            **_pair("lora_te2_encoder_block_0_layer_0_SelfAttention_q", 32, 48),
            **_pair("lora_unet_double_blocks_5_img_attn_proj", 32, 32),
        },
        "only 1 of the 3 modules",
    ),
    # A kohya file with diffusers-named keys too: diffusers keeps only the latter.
    "kohya-and-peft-mixed": ({**GOOD_KOHYA, **GOOD_PEFT}, "only 1 of the 2 modules"),
    "peft-missing-block": (
        {**GOOD_PEFT, **_pair("transformer.transformer_blocks.5.attn.to_q", 32, 32, "lora_A.weight", "lora_B.weight")},
        "only 1 of the 2 modules",
    ),
    "peft-unknown-only": (
        _pair("transformer.transformer_blocks.5.attn.to_q", 32, 32, "lora_A.weight", "lora_B.weight"),
        "cannot apply",
    ),
    # BFL module names with PEFT factors: diffusers has no conversion for them.
    "bfl-peft": (
        _pair("transformer.double_blocks.0.img_attn.qkv", 96, 32, "lora_A.weight", "lora_B.weight"),
        "cannot apply",
    ),
    "comfy-peft": (
        _pair("diffusion_model.double_blocks.0.img_attn.qkv", 96, 32, "lora_A.weight", "lora_B.weight"),
        "none of them exists",
    ),
    # fal's Kontext naming: diffusers converts only a complete FLUX.1 (19 + 38 blocks).
    "fal-kontext-partial": (
        _pair("base_model.model.double_blocks.0.img_attn.qkv", 96, 32, "lora_A.weight", "lora_B.weight"),
        "cannot apply",
    ),
    # kohya's single-block linear1 (q, k, v, mlp fused): diffusers' conversion asserts FLUX.1's
    # widths (3 x 3072 + 12288), so at tiny width it is an error, not a crash.
    "kohya-linear1-tiny": (
        {**GOOD_KOHYA, **_pair("lora_unet_single_blocks_0_linear1", 3 * 32 + 128, 32)},
        "cannot apply",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_flux_formats_diffusers_cannot_apply_whole_are_refused(tmp_path, flux, case):
    state, says = REFUSED[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(state, path)
    with pytest.raises(UserError) as err:
        _fuse(flux, [(path, 1.0)])
    assert "loras: l0" in str(err.value) and says in str(err.value), str(err.value)
    assert "hint:" in str(err.value)


def test_flux_loras_are_detected_as_flux(tmp_path, flux):
    _, clean = flux
    files = {
        "kohya": kohya_file(tmp_path / "k.safetensors", _lora(clean, KOHYA, 1)),
        "comfy": kohya_file(tmp_path / "c.safetensors", _lora(clean, COMFY, 1)),
        "peft": peft_file(tmp_path / "p.safetensors", _lora(clean, PEFT, 1)),
    }
    for case in ("loha", "lokr", "kohya-dora", "bfl-peft", "comfy-peft"):
        files[case] = tmp_path / f"{case}.safetensors"
        save_file(REFUSED[case][0], files[case])
    for case, path in files.items():
        found = detect_file(path)
        assert (found.kind, found.family) == ("lora", "flux-dev"), (case, found)

    # diffusers names of double-stream blocks only: FLUX's and SD3's blocks share them, the width
    # tells (FLUX.1 is 3072 wide, SD3 1536 or 2432), or a FLUX-only module; else no guess.
    def double_only(width: int, extra: str = "") -> dict:
        names = [
            "transformer.transformer_blocks.0.attn.to_q",
            "transformer.transformer_blocks.0.attn.add_k_proj",
            *([extra] if extra else []),
        ]
        return {f"{n}.lora_A.weight": ((RANK, width), "F32") for n in names} | {
            f"{n}.lora_B.weight": ((width, RANK), "F32") for n in names
        }

    assert detect(double_only(3072)).family == "flux-dev"
    assert detect(double_only(1536)).family == "sd3" and detect(double_only(2432)).family == "sd3"
    assert detect(double_only(32, "transformer.x_embedder")).family == "flux-dev"
    tiny = detect(double_only(32))
    assert tiny.family is None and tiny.candidates == ("flux-dev", "sd3"), tiny
    sd15 = detect(
        {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": ((RANK, 320), "F32")}
    )
    assert sd15.family is None and "sd15" in sd15.candidates  # SD's transformer_blocks are not MMDiT ones


def _compile(tmp_path: Path, loras: str, name: str):
    return compile_text(tmp_path, name, RECIPE.format(loras=loras))


def test_flux_recipe_with_kohya_and_peft_loras_compiles_and_serves(tmp_path, flux):
    _, clean = flux
    (tmp_path / "recipes").mkdir()
    a = _lora(clean, KOHYA, 11)
    kohya_file(tmp_path / "recipes" / "bfl-style.safetensors", a)
    table = {
        f"transformer.{m}": ("transformer", (m,))
        for m in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_q")
    }
    m = _lora(clean, table, 12)
    (tmp_path / "meta").mkdir()
    (tmp_path / "recipes" / "diffusers-style.safetensors").write_bytes(
        metadata_file(tmp_path / "meta", m, alpha=2.0).read_bytes()
    )
    proc = _compile(
        tmp_path,
        "  - source: ./bfl-style.safetensors\n    scale: 0.8\n"
        "  - source: ./diffusers-style.safetensors\n    scale: -0.5\n    fuse: true",
        name="flux-loras",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = Path(proc.stdout.strip())
    pipe_dir = artifact / "pipeline"
    got = {
        "transformer": load_file(pipe_dir / "transformer" / "diffusion_pytorch_model.safetensors"),
        "text_encoder": {
            k.removeprefix("text_model."): v
            for k, v in load_file(pipe_dir / "text_encoder" / "model.safetensors").items()
        },
    }
    _check(got, clean, [(KOHYA, a, 0.8, KOHYA_ALPHA), (table, m, -0.5, lambda alpha, rank: 2.0)])
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert [(x["name"], x["scale"], x["fused"]) for x in manifest["loras"]] == [
        ("bfl-style", 0.8, True),
        ("diffusers-style", -0.5, True),
    ]
    image = serve(tmp_path / "home", artifact, {**REQ, "num_inference_steps": 2})
    assert image.shape == (64, 64, 3)


def test_flux_recipe_with_a_partial_lora_fails_and_publishes_nothing(tmp_path):
    (tmp_path / "recipes").mkdir()
    # Named "half", as torch.nn.Module's method: PEFT adapters take the compiler's own names.
    save_file(REFUSED["kohya-t5-and-missing-block"][0], tmp_path / "recipes" / "half.safetensors")
    proc = _compile(tmp_path, "  - source: ./half.safetensors", name="half")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "loras: half" in proc.stderr and "only 1 of the 3 modules" in proc.stderr, proc.stderr[-3000:]
    assert "lora_te2_encoder_block_0_layer_0_SelfAttention_q" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "home").glob("artifacts/*/*"))

"""Detection from real key layouts (../shared/fixtures/model-keys, sd-mecha's model configs):
full-shape safetensors headers over sparse files, and variants derived from them."""

from __future__ import annotations

import json
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from compiler.detect import detect, detect_file
from tests.conftest import PY, REPO

FIXTURES = REPO.parent / "shared" / "fixtures" / "model-keys"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures not found at {FIXTURES}")
ST_DTYPE = {
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "float8_e4m3fn": ("F8_E4M3", 1),
}
Keys = dict[str, tuple[tuple[int, ...], str]]


@cache
def layout(name: str) -> dict[str, Keys]:
    data = yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())
    return {
        comp: {k: (tuple(v["shape"]), v["dtype"]) for k, v in entries.items() if not v.get("optional")}
        for comp, entries in data["components"].items()
    }


def keys_of(name: str, *components: str) -> Keys:
    comps = layout(name)
    out: Keys = {}
    for c in components or [c for c in comps if c not in ("ema", "scheduler")]:
        out.update(comps[c])
    return out


def write(path: Path, keys: Keys, metadata: dict[str, str] | None = None) -> Path:
    """A real safetensors file: header with every name, shape and dtype; zeros behind it, sparse."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for k in sorted(keys):
        shape, dtype = keys[k]
        name, size = ST_DTYPE[dtype]
        n = size
        for d in shape:
            n *= d
        header[k] = {"dtype": name, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def as_dtype(keys: Keys, dtype: str) -> Keys:
    return {k: (s, dtype if d.startswith(("float", "bfloat")) else d) for k, (s, d) in keys.items()}


def test_full_single_files_from_real_layouts(tmp_path):
    cases = {
        "sd1-ldm": ("checkpoint", "sd15", "ldm", "normal", "eps"),
        "sdxl-sgm": ("checkpoint", "sdxl", "sgm", "normal", "eps"),
        "sd3-comfyui": ("checkpoint", "sd3", "comfyui", "normal", "flow"),
        "flux-flux": ("checkpoint", "flux-dev", "bfl", "normal", "flow"),
    }
    for name, expected in cases.items():
        path = write(tmp_path / f"{name}.safetensors", keys_of(name))
        d = detect_file(path)
        assert (d.kind, d.family, d.format, d.variant, d.prediction) == expected, (name, d)
        assert d.evidence, name
    assert (tmp_path / "sd1-ldm.safetensors").stat().st_size > 2 * 10**9  # full shapes, fp32
    assert (tmp_path / "sd1-ldm.safetensors").stat().st_blocks * 512 < 10**6  # and sparse


def test_variants_derived_from_real_layouts():
    sd1 = keys_of("sd1-ldm")
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint = {**sd1, conv: ((320, 9, 3, 3), "float32")}
    assert (detect(inpaint).family, detect(inpaint).variant) == ("sd15", "inpaint")

    unet = detect(keys_of("sd1-ldm", "diffuser"))
    assert (unet.kind, unet.family, unet.format) == ("unet", "sd15", "ldm")
    ema = detect(_ema_only("sd1-ldm"))
    assert (ema.kind, ema.family, ema.variant) == ("unet", "sd15", "ema")

    vae = detect(keys_of("sd1-ldm", "vae"))
    assert (vae.kind, vae.family, vae.candidates) == ("vae", None, ("sd15", "sd2", "sdxl"))
    flux_vae = detect(keys_of("flux-flux", "vae"))
    assert (flux_vae.kind, flux_vae.family) == ("vae", None) and "flux-dev" in flux_vae.candidates

    for dtype in ("float16", "bfloat16", "float8_e4m3fn"):
        assert detect(as_dtype(sd1, dtype)).family == "sd15", dtype

    def widen(keys: Keys) -> Keys:
        return {
            k: ((v[0][0], 1024), v[1]) if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else v
            for k, v in keys.items()
        }

    sd2_unet = detect(widen(keys_of("sd1-ldm", "diffuser")))
    assert (sd2_unet.family, sd2_unet.prediction) == ("sd2", None), "eps or v: a header cannot tell"
    open_clip = {
        k.replace("cond_stage_model.transformer.", "cond_stage_model.model."): v for k, v in widen(sd1).items()
    }
    assert detect(open_clip).family == "sd2"
    mixed = detect(widen(sd1))  # an SD 2 UNet with SD 1's text encoder: no guess
    assert (mixed.kind, mixed.family, mixed.candidates) == ("unknown", None, ("sd2", "sd15"))

    sd3 = keys_of("sd3-comfyui")
    medium = {**sd3, "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight": ((4608, 1536), "float32")}
    assert detect(medium).family == "sd35-medium"
    large = {**sd3, "model.diffusion_model.x_embedder.proj.weight": ((2432, 16, 2, 2), "float32")}
    assert detect(large).family == "sd35-large"

    sgm = keys_of("sdxl-sgm")
    refiner = {k: v for k, v in sgm.items() if not k.startswith("conditioner.embedders.0.")}
    for k, (shape, dt) in refiner.items():
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            refiner[k] = ((shape[0], 1280), dt)
    refiner["model.diffusion_model.label_emb.0.0.weight"] = ((1280, 2560), "float32")
    assert detect(refiner).family == "sdxl-refiner"
    # The refiner's own file puts its one text encoder (OpenCLIP-G) first: conditioner.embedders.0.model.
    first = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in refiner.items()}
    found = detect(first)
    assert (found.family, found.format) == ("sdxl-refiner", "sgm")
    assert any("OpenCLIP-G text encoder alone" in e for e in found.evidence)
    assert any("CLIP-L + OpenCLIP-G" in e for e in detect(sgm).evidence), "both widths and layout agree"
    # An SDXL base UNet (2048, ADM 2816) with the refiner's text-encoder layout: no guess.
    base_unet = {k: v for k, v in sgm.items() if not k.startswith("conditioner.")}
    clash = detect({**base_unet, **{k: v for k, v in first.items() if k.startswith("conditioner.")}})
    assert (clash.kind, clash.family, clash.candidates) == ("unknown", None, ("sdxl", "sdxl-refiner"))
    vpred = detect({**sgm, "v_pred": ((0,), "float32")})
    assert (vpred.family, vpred.prediction) == ("sdxl", "v")

    flux = keys_of("flux-flux")
    schnell = {k: v for k, v in flux.items() if "guidance_in" not in k}
    assert detect(schnell).family == "flux-schnell"
    img_in = next(k for k in flux if k.endswith("img_in.weight"))
    fill = detect({**flux, img_in: ((3072, 384), "bfloat16")})
    assert (fill.family, fill.variant) == ("flux-fill", "inpaint")
    transformer = detect(keys_of("flux-flux", "diffuser"))
    assert (transformer.kind, transformer.family) == ("transformer", "flux-dev")

    sdxl_unet = detect(keys_of("sdxl-diffusers_unet_only"))
    assert (sdxl_unet.kind, sdxl_unet.family, sdxl_unet.format) == ("unet", "sdxl", "diffusers")


def _ema_only(name: str) -> Keys:
    """A file holding only the EMA weights (LDM stores them as model_ema.<name without dots>);
    the fixture marks them optional, so they are read here directly."""
    data = yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())
    ema = {k: (tuple(v["shape"]), v["dtype"]) for k, v in data["components"]["ema"].items()}
    assert len(ema) > 600, "the fixture lists the EMA weights"
    return ema


def _kohya_lora(name: str, rank: int = 4) -> Keys:
    prefixes = {"unet.": "lora_unet_", "te.": "lora_te_", "te1.": "lora_te1_", "te2.": "lora_te2_"}
    out: Keys = {}
    for k, (shape, _) in keys_of(name).items():
        head = next((p for p in prefixes if k.startswith(p)), None)
        if head is None or len(shape) != 2 or not k.endswith(".weight") or "embedding" in k:
            continue
        base = prefixes[head] + k[len(head) : -len(".weight")].replace(".", "_")
        out[f"{base}.lora_down.weight"] = ((rank, shape[1]), "float16")
        out[f"{base}.lora_up.weight"] = ((shape[0], rank), "float16")
        out[f"{base}.alpha"] = ((), "float16")
    return out


def test_adapters_are_recognised_with_their_family():
    sd1 = detect(_kohya_lora("sd1-kohya"))
    assert (sd1.kind, sd1.family, sd1.format) == ("lora", "sd15", "kohya")
    sdxl = detect(_kohya_lora("sdxl-kohya"))
    assert (sdxl.kind, sdxl.family, sdxl.format) == ("lora", "sdxl", "kohya")
    loha = {k.replace("lora_down", "hada_w1_a"): v for k, v in _kohya_lora("sd1-kohya").items()}
    assert detect(loha).format == "lycoris"
    ldm_cn = detect(
        {
            "control_model.input_hint_block.0.weight": ((16, 3, 3, 3), "float16"),
            "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ((320, 768), "float16"),
        }
    )
    assert (ldm_cn.kind, ldm_cn.family, ldm_cn.format) == ("controlnet", "sd15", "ldm")
    diffusers_cn = detect(
        {
            "controlnet_cond_embedding.conv_in.weight": ((16, 3, 3, 3), "float16"),
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": ((640, 2048), "float16"),
        }
    )
    assert (diffusers_cn.kind, diffusers_cn.family, diffusers_cn.format) == ("controlnet", "sdxl", "diffusers")
    assert detect({"emb_params": ((2, 768), "float32")}).family == "sd15"
    assert detect({"clip_l": ((2, 768), "float32"), "clip_g": ((2, 1280), "float32")}).family == "sdxl"


def test_cli_prints_one_json_line_per_file_and_fails_on_unknown(tmp_path):
    good = write(tmp_path / "good.safetensors", keys_of("sd1-ldm"))
    vae = write(tmp_path / "vae.safetensors", keys_of("sdxl-sgm", "vae"))
    write(tmp_path / "odd.safetensors", {"some.tensor": ((3,), "float32")})
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"PK\x03\x04 never read")
    args = [str(good), str(vae), "odd.safetensors", str(pickle)]
    proc = subprocess.run(
        [PY, "-m", "compiler.detect", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [x["path"] for x in lines] == args, "paths exactly as given"
    assert (lines[0]["kind"], lines[0]["family"]) == ("checkpoint", "sd15")
    assert (lines[1]["kind"], lines[1]["format"], lines[1]["family"]) == ("vae", "ldm", None)
    assert lines[1]["candidates"] == ["sd15", "sd2", "sdxl"]
    assert lines[2]["kind"] == "unknown" and lines[3]["kind"] == "unknown"
    assert "pickle" in lines[3]["evidence"][0]
    assert proc.returncode == 1
    ok = subprocess.run([PY, "-m", "compiler.detect", str(good)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0

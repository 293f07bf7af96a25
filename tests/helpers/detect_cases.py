"""The detection cases: files built from real key layouts (tests/fixtures/model-keys, vendored from
sd-mecha's model configs with their license) and variants derived from them, each with what
detection must say and what the compiler does with it. tests/compiler/test_detect.py asserts every case;
scripts/compatibility.py turns the same table into docs/compatibility.md, so the document says
what the tests prove.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
# The real layouts live in the repository (their README and sd-mecha's MIT license beside them): a
# clone anywhere runs every detection test, and a missing file fails them instead of skipping.
FIXTURES = REPO / "tests" / "fixtures" / "model-keys"
ST_DTYPE = {
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "float8_e4m3fn": ("F8_E4M3", 1),
}
Keys = dict[str, tuple[tuple[int, ...], str]]


def fixture_path(name: str) -> Path:
    """A layout file of tests/fixtures/model-keys; a missing one is an error (never a skip)."""
    path = FIXTURES / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: key-layout fixture missing. hint: it is tracked in git under tests/fixtures/model-keys; "
            "restore the checkout (the README there says where the layouts come from)"
        )
    return path


@cache
def layout(name: str) -> dict[str, Keys]:
    data = yaml.safe_load(fixture_path(name).read_text())
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


def ema_only(name: str) -> Keys:
    """A file holding only the EMA weights (LDM stores them as model_ema.<name without dots>);
    the fixture marks them optional, so they are read here directly."""
    data = yaml.safe_load(fixture_path(name).read_text())
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in data["components"]["ema"].items()}


def kohya_lora(name: str, rank: int = 4) -> Keys:
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


def loha(lora: Keys) -> Keys:
    """LyCORIS LoHa from a kohya LoRA's shapes: two Hadamard factors per module, each an
    up (out, rank) and a down (rank, in) matrix, named hada_w{1,2}_{a,b}."""
    out: Keys = {}
    for k, v in lora.items():
        for n in (1, 2):
            if k.endswith(".lora_down.weight"):
                out[k.replace(".lora_down.weight", f".hada_w{n}_b")] = v
            elif k.endswith(".lora_up.weight"):
                out[k.replace(".lora_up.weight", f".hada_w{n}_a")] = v
        if k.endswith(".alpha"):
            out[k] = v
    return out


def _replace(keys: Keys, suffix: str, shape: tuple[int, ...]) -> Keys:
    """``keys`` with every tensor whose name ends in ``suffix`` reshaped."""
    return {k: (shape, d) if k.endswith(suffix) else (s, d) for k, (s, d) in keys.items()}


def _widen_context(keys: Keys, width: int) -> Keys:
    return {
        k: ((v[0][0], width), v[1]) if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else v
        for k, v in keys.items()
    }


def _sd2() -> Keys:
    """SD 2.x: SD 1's UNet layout at 1024-wide context with the OpenCLIP-H text encoder naming."""
    wide = _widen_context(keys_of("sd1-ldm"), 1024)
    return {k.replace("cond_stage_model.transformer.", "cond_stage_model.model."): v for k, v in wide.items()}


def _refiner() -> Keys:
    """The SDXL refiner's own layout: OpenCLIP-G alone (first), 1280-wide context, ADM 2560."""
    sgm = {k: v for k, v in keys_of("sdxl-sgm").items() if not k.startswith("conditioner.embedders.0.")}
    out = {
        k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
        for k, v in _widen_context(sgm, 1280).items()
    }
    out["model.diffusion_model.label_emb.0.0.weight"] = ((1280, 2560), "float32")
    return out


def _flux_img_in(channels: int) -> Keys:
    flux = keys_of("flux-flux")
    return _replace(flux, "img_in.weight", (3072, channels))


@dataclass(frozen=True)
class Case:
    """One file: what it is, how to build its header, what detection says, what the compiler does."""

    name: str
    what: str  # family and kind as a user would name it
    keys: Callable[[], Keys]
    expected: tuple[str, str | None, str | None, str, str | None]  # kind, family, format, variant, prediction
    compiles: str  # what `python -m compiler` does with it, and the test that shows it
    candidates: tuple[str, ...] = ()
    metadata: dict[str, str] | None = None


SD_CONV = "model.diffusion_model.input_blocks.0.0.weight"
TINY_PARITY = (
    "yes: served image = diffusers folder (tests/compiler/test_single_file.py, tests/compiler/test_sources.py)"
)
INPAINT_BUILDS = (
    "yes: inpaint, img2img and txt2img (full mask, as A1111) through the inpaint pipeline, served = diffusers "
    "from_single_file (tests/compiler/test_inpaint_sd.py)"
)
NOT_HERE = "locks its family's config repo (tested); build not run here: no tiny model of it yet, full size too big"

CASES: tuple[Case, ...] = (
    Case(
        "sd15-ldm",
        "SD 1.5 checkpoint",
        lambda: keys_of("sd1-ldm"),
        ("checkpoint", "sd15", "ldm", "normal", "eps"),
        TINY_PARITY + "; full size 2.1 GB fp16: bench/single_file_sd15.py",
    ),
    Case(
        "sd15-fp16",
        "SD 1.5 checkpoint, fp16",
        lambda: as_dtype(keys_of("sd1-ldm"), "float16"),
        ("checkpoint", "sd15", "ldm", "normal", "eps"),
        "yes (as above)",
    ),
    Case(
        "sd15-bf16",
        "SD 1.5 checkpoint, bf16",
        lambda: as_dtype(keys_of("sd1-ldm"), "bfloat16"),
        ("checkpoint", "sd15", "ldm", "normal", "eps"),
        "yes (as above)",
    ),
    Case(
        "sd15-fp8",
        "SD 1.5 checkpoint, fp8 (e4m3)",
        lambda: as_dtype(keys_of("sd1-ldm"), "float8_e4m3fn"),
        ("checkpoint", "sd15", "ldm", "normal", "eps"),
        "yes: weights = the file's fp8 cast to the build precision, said in the manifest; served image = diffusers "
        "(tests/compiler/test_sd15_fp8.py)",
    ),
    Case(
        "sd15-inpaint",
        "SD 1.5 inpainting checkpoint",
        lambda: _replace(keys_of("sd1-ldm"), SD_CONV, (320, 9, 3, 3)),
        ("checkpoint", "sd15", "ldm", "inpaint", "eps"),
        INPAINT_BUILDS,
    ),
    Case(
        "sdxl-inpaint",
        "SDXL inpainting checkpoint",
        lambda: _replace(keys_of("sdxl-sgm"), SD_CONV, (320, 9, 3, 3)),
        ("checkpoint", "sdxl", "sgm", "inpaint", "eps"),
        INPAINT_BUILDS,
    ),
    Case(
        "sd15-unet",
        "SD 1.5 UNet only",
        lambda: keys_of("sd1-ldm", "diffuser"),
        ("unet", "sd15", "ldm", "normal", "eps"),
        "yes, with `base:` (replaces the base's UNet; tests/compiler/test_single_file.py)",
    ),
    Case(
        "sd15-ema-only",
        "SD 1.5 EMA-only UNet",
        lambda: ema_only("sd1-ldm"),
        ("unet", "sd15", "ldm", "ema", "eps"),
        "yes, with `base:`: the EMA weights are the UNet, as A1111/diffusers' extract_ema "
        "(tests/compiler/test_ema_only_unet.py)",
    ),
    Case(
        "sd15-vae",
        "SD VAE (LDM)",
        lambda: keys_of("sd1-ldm", "vae"),
        ("vae", None, "ldm", "normal", None),
        "no: a VAE is not a checkpoint (use the `vae:` field)",
        candidates=("sd15", "sd2", "sdxl"),
    ),
    Case(
        "sd2-ldm",
        "SD 2.x checkpoint",
        _sd2,
        ("checkpoint", "sd2", "ldm", "normal", None),
        "yes: v (SD 2.1 config repo) and `prediction: eps`; served image = diffusers from_single_file "
        "(tests/compiler/test_sd2_single_file.py, tiny SD 2)",
    ),
    Case(
        "sd2-unet",
        "SD 2.x UNet only",
        lambda: _widen_context(keys_of("sd1-ldm", "diffuser"), 1024),
        ("unet", "sd2", "ldm", "normal", None),
        "with `base:` (as SD 1.5 UNet only)",
    ),
    Case(
        "sd-mixed",
        "SD 2 UNet + SD 1 text encoder",
        lambda: _widen_context(keys_of("sd1-ldm"), 1024),
        ("unknown", None, None, "normal", None),
        "no: an error names both candidates",
        candidates=("sd2", "sd15"),
    ),
    Case(
        "sdxl-sgm",
        "SDXL checkpoint",
        lambda: keys_of("sdxl-sgm"),
        ("checkpoint", "sdxl", "sgm", "normal", "eps"),
        "yes: served image = diffusers folder (tests/compiler/test_sdxl_single_file.py, tiny SDXL)",
    ),
    Case(
        "sdxl-vpred",
        "SDXL v-prediction checkpoint (NoobAI style)",
        lambda: {**keys_of("sdxl-sgm"), "v_pred": ((0,), "float32")},
        ("checkpoint", "sdxl", "sgm", "normal", "v"),
        "detected; the build sets the scheduler to v_prediction (that step is tested with `prediction: v`)",
    ),
    Case(
        "sdxl-unet",
        "SDXL UNet only (diffusers naming)",
        lambda: keys_of("sdxl-diffusers_unet_only"),
        ("unet", "sdxl", "diffusers", "normal", "eps"),
        "yes, with `base:` (replaces the base's UNet; SGM naming too: tests/compiler/test_sdxl_unet_only.py)",
    ),
    Case(
        "sdxl-vae",
        "SDXL VAE",
        lambda: keys_of("sdxl-sgm", "vae"),
        ("vae", None, "ldm", "normal", None),
        "no: a VAE is not a checkpoint",
        candidates=("sd15", "sd2", "sdxl"),
    ),
    Case(
        "sdxl-refiner",
        "SDXL refiner checkpoint",
        _refiner,
        ("checkpoint", "sdxl-refiner", "sgm", "normal", "eps"),
        "yes, as `refiner:` of an SDXL base, run as worker-sdxl runs it (tests/compiler/test_refiner_recipe.py, "
        "tests/runtime/test_refiner.py); alone as `base:` or `checkpoint:` it is refused (it only refines)",
    ),
    Case(
        "sd3-comfyui",
        "SD3 Medium all-in-one",
        lambda: keys_of("sd3-comfyui"),
        ("checkpoint", "sd3", "comfyui", "normal", "flow"),
        "yes: served image = diffusers folder, with or without T5 (tests/compiler/test_sd3_single_file.py, tiny SD 3)",
    ),
    Case(
        "sd35-medium",
        "SD 3.5 Medium",
        lambda: {
            **keys_of("sd3-comfyui"),
            "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight": ((4608, 1536), "float32"),
        },
        ("checkpoint", "sd35-medium", "comfyui", "normal", "flow"),
        "yes: served image = diffusers folder (tests/compiler/test_sd3_single_file.py, tiny SD 3.5 Medium)",
    ),
    Case(
        "sd35-large",
        "SD 3.5 Large",
        lambda: _replace(keys_of("sd3-comfyui"), "x_embedder.proj.weight", (2432, 16, 2, 2)),
        ("checkpoint", "sd35-large", "comfyui", "normal", "flow"),
        "yes: served image = diffusers folder (tests/compiler/test_sd3_single_file.py, "
        "tiny SD 3.5 Large: told by its q/k norms)",
    ),
    Case(
        "flux-dev",
        "FLUX.1 [dev] (BFL)",
        lambda: keys_of("flux-flux"),
        ("checkpoint", "flux-dev", "bfl", "normal", "flow"),
        "yes: locks the FLUX.1-dev config repo; served image = diffusers; fp8 e4m3fn -> bf16 exact, said in the "
        "manifest (tests/compiler/test_flux_single_file.py)",
    ),
    Case(
        "flux-schnell",
        "FLUX.1 [schnell] (no guidance_in)",
        lambda: {k: v for k, v in keys_of("flux-flux").items() if "guidance_in" not in k},
        ("checkpoint", "flux-schnell", "bfl", "normal", "flow"),
        "yes: locks the FLUX.1-schnell config repo; served image = diffusers (tests/compiler/test_flux_single_file.py)",
    ),
    Case(
        "flux-fill",
        "FLUX.1 Fill",
        lambda: _flux_img_in(384),
        ("checkpoint", "flux-fill", "bfl", "inpaint", "flow"),
        "yes: inpaint, img2img and txt2img through FluxFillPipeline, served = diffusers (diffusers folder and "
        "builtin: tests/compiler/test_flux_fill.py); a BFL single file locks the Fill config repo, and converts "
        "where diffusers' FLUX converter does (it assumes the full 3072 width, so no tiny file here)",
    ),
    Case(
        "flux-transformer",
        "FLUX.1 transformer only",
        lambda: keys_of("flux-flux", "diffuser"),
        ("transformer", "flux-dev", "bfl", "normal", "flow"),
        "yes, with `base:`: served image = diffusers; fp8 e5m2, and `quantize: fp8` on top "
        "(tests/compiler/test_flux_single_file.py)",
    ),
    Case(
        "flux-vae",
        "FLUX VAE",
        lambda: keys_of("flux-flux", "vae"),
        ("vae", None, "ldm", "normal", None),
        "no: a VAE is not a checkpoint",
        candidates=("sd3", "flux-dev"),
    ),
    Case(
        "sd15-lora-kohya",
        "SD 1.5 LoRA (kohya)",
        lambda: kohya_lora("sd1-kohya"),
        ("lora", "sd15", "kohya", "normal", None),
        "no: `loras:` field",
    ),
    Case(
        "sdxl-lora-kohya",
        "SDXL LoRA (kohya)",
        lambda: kohya_lora("sdxl-kohya"),
        ("lora", "sdxl", "kohya", "normal", None),
        "no: `loras:` field",
    ),
    Case(
        "sd15-loha",
        "SD 1.5 LoHa (LyCORIS)",
        lambda: loha(kohya_lora("sd1-kohya")),
        ("lora", "sd15", "lycoris", "normal", None),
        "no: `loras:` field",
    ),
    Case(
        "sd15-embedding",
        "SD 1.5 embedding (A1111 safetensors)",
        lambda: {"emb_params": ((2, 768), "float32")},
        ("embedding", "sd15", "a1111", "normal", None),
        "no: `embeddings:` field",
    ),
    Case(
        "sdxl-embedding",
        "SDXL embedding (clip_l + clip_g)",
        lambda: {"clip_l": ((2, 768), "float32"), "clip_g": ((2, 1280), "float32")},
        ("embedding", "sdxl", "a1111", "normal", None),
        "no: `embeddings:` field",
    ),
)

"""What a model file is, from its safetensors header alone: no tensor is read, nothing executes.

``detect(header)`` is pure: names, shapes and dtypes in, a ``Detection`` out, with the keys and
shapes that decided (``evidence``). It never guesses a family: when the header cannot tell (an SD
and an SDXL VAE share a layout) ``family`` is None and ``candidates`` lists what it could be.
``detect_file(path)`` reads the header with compiler.headers.read_header (nothing more) first.

The rules follow the layouts of real files (tests/fixtures/model-keys/, from sd-mecha's model
configs) and the checks diffusers' and ComfyUI's loaders make: the UNet's cross-attention width
tells SD 1.x (768) from SD 2.x (1024), SDXL (2048) and the SDXL refiner (1280); SDXL's ADM input
(label_emb, 2816 vs 2560) confirms base vs refiner; the first conv's input channels tell an
inpaint model (9) or a depth model (5); FLUX dev has ``guidance_in``, schnell has not; SD3.5
adds q/k norms, medium a second attention to its x blocks, and SD3.5 large is 2432 wide.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compiler.errors import Problem
from compiler.families import ADM_FAMILY, CONTEXT_FAMILY  # the registry's probes
from compiler.headers import HeaderError, MalformedTensor, Shape, find_key, key_evidence, probe_dim, read_header

SD_LATENT_FAMILIES = ("sd15", "sd2", "sdxl")  # 4-channel latents: VAEs share one layout
FLOW_LATENT_FAMILIES = ("sd3", "flux-dev")  # 16-channel latents


@dataclass(frozen=True)
class Detection:
    # checkpoint, unet, transformer, vae, text-encoder, lora, embedding, controlnet, unknown (readable,
    # not recognised), invalid (not a readable safetensors model file: the evidence says why)
    kind: str
    family: str | None
    format: str | None  # ldm, sgm, diffusers, bfl, comfyui, kohya, peft, lycoris, a1111
    variant: str = "normal"  # normal, inpaint, depth, control, ema
    prediction: str | None = None  # eps, v, flow; None when the header cannot tell
    candidates: tuple[str, ...] = ()
    evidence: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Detection:
        """Back from ``as_json`` (as recorded in a lockfile)."""
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(
            **{**fields, "candidates": tuple(d.get("candidates") or ()), "evidence": tuple(d.get("evidence") or ())}
        )

    def summary(self) -> str:
        """One line for logs: what the file is, its family or the candidates, and why."""
        family = self.family or (f"family one of {', '.join(self.candidates)}" if self.candidates else "family unknown")
        what = f"{self.kind} ({self.format} format)" if self.format else self.kind
        return f"{what}, {family}; evidence: {'; '.join(self.evidence) or 'none'}"

    def as_json(self, path: str) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = list(self.candidates)
        d["evidence"] = list(self.evidence)
        return {"path": path, **d}


def _context_family(keys: dict[str, tuple[Shape, str]], pattern: str) -> tuple[str | None, list[str]]:
    hit = find_key(keys, pattern)
    if hit is None or len(hit[1]) < 2:
        return None, []
    return CONTEXT_FAMILY.get(hit[1][1]), [key_evidence(hit)]


def _prediction(keys: dict[str, tuple[Shape, str]], meta: dict[str, str], family: str | None) -> str | None:
    if "v_pred" in keys:  # NoobAI-style SDXL v-prediction checkpoints carry this marker key
        return "v"
    declared = meta.get("modelspec.prediction_type") or meta.get("prediction_type")
    if declared in ("v", "v_prediction"):
        return "v"
    if declared in ("epsilon", "eps"):
        return "eps"
    return {"sd15": "eps", "sdxl": "eps", "sdxl-refiner": "eps"}.get(family or "")


def detect(keys: dict[str, tuple[Shape, str]], meta: dict[str, str] | None = None) -> Detection:
    meta = meta or {}
    names = set(keys)
    if not names:
        return Detection("unknown", None, None, evidence=("no tensors",))
    for rule in (
        _lora,
        _embedding,
        _controlnet,
        _bfl_flux,
        _mmdit,
        _ldm_unet,
        _diffusers_denoiser,
        _vae,
        _text_encoder,
    ):
        try:
            found = rule(keys, names, meta)
        except MalformedTensor as e:
            need = (e.axis if e.axis >= 0 else -e.axis - 1) + 1
            return Detection(
                "invalid",
                None,
                None,
                evidence=(
                    f"{e.key} has shape {list(e.shape)}, where this layer's weight has at least {need} "
                    "dimensions: a damaged or hand-made file",
                ),
            )
        if found is not None:
            return found
    sample = sorted(names)[:3]
    return Detection("unknown", None, None, evidence=tuple(f"unrecognised key {k}" for k in sample))


def _any(names: set[str], *needles: str) -> bool:
    return any(n in k for k in names for n in needles)


def _lora(keys: dict[str, tuple[Shape, str]], names: set[str], meta: dict[str, str]) -> Detection | None:
    lycoris = _any(names, ".hada_w1_a", ".lokr_w1", ".oft_blocks", ".lokr_w2")
    kohya = _any(names, ".lora_down.weight", ".lora_up.weight")
    peft = _any(names, ".lora_A.weight", ".lora_B.weight", ".lora.down.weight")
    if not (lycoris or kohya or peft):
        return None
    fmt = "lycoris" if lycoris else "kohya" if kohya else "peft"
    factors = sorted(k for k in names if _LORA_DOWN.search(k)) or sorted(
        k for k in names if "lora" in k or "hada" in k or "lokr" in k
    )
    evidence = [f"{fmt} keys, e.g. {factors[0]}"]
    family: str | None = None
    cands: tuple[str, ...] = ("sd15", "sd2", "sdxl", "flux-dev", "sd3")
    if _any(names, "double_blocks", "single_transformer_blocks", "single_blocks"):
        family = "flux-dev"  # BFL (kohya, ComfyUI) or diffusers names of FLUX's two block kinds
        evidence.append("FLUX block names")
    elif _any(names, "joint_blocks", "context_block"):
        family = "sd3"
        evidence.append("SD3 joint block names")
    elif find_key(keys, _MMDIT) is not None:
        family, ev = _mmdit_lora_family(keys, names)
        evidence += ev
        cands = ("flux-dev", "sd3")
    else:
        fam, ev = _context_family(
            keys, r"attn2[._]to_k(\.lora_down\.weight|\.lora_A\.weight|\.lora\.down\.weight|\.hada_w1_b|\.weight)$"
        )
        family, evidence = fam, evidence + ev
        if family is None and _any(names, "lora_te1_", "lora_te2_", "text_encoder_2"):
            family = "sdxl"
            evidence.append("two text encoders (te1/te2)")
    return Detection("lora", family, fmt, candidates=() if family else cands, evidence=tuple(evidence))


# A LoRA factor's "down" half (rank, in, ...) in the kohya, PEFT, old-diffusers and LoHa namings.
_LORA_DOWN = re.compile(r"(\.lora_down\.weight|\.lora_A(\.[^.]+)?\.weight|\.lora\.down\.weight|\.hada_w1_b)$")
# Diffusers' names of an MMDiT double-stream block (FLUX's transformer_blocks and SD3's alike): the
# context stream's projections. SD 1.x/XL's transformer_blocks have attn1/attn2 and none of these.
_MMDIT = r"transformer_blocks[._]\d+[._](attn[._](add_[qkv]_proj|to_add_out)|ff_context|norm1_context)"
_MMDIT_WIDTHS = {3072: "flux-dev", 1536: "sd3", 2432: "sd3"}  # FLUX.1; SD3/3.5 medium, SD3.5 large


def _mmdit_lora_family(keys: dict[str, tuple[Shape, str]], names: set[str]) -> tuple[str | None, list[str]]:
    """A LoRA of double-stream blocks only, in diffusers naming: FLUX's and SD3's blocks share every
    name, so the modules outside the blocks or the width decide."""
    if _any(names, "x_embedder", "guidance_embedder", "proj_mlp"):
        return "flux-dev", ["FLUX-only modules (x_embedder, guidance_embedder or proj_mlp)"]
    if _any(names, "pos_embed", ".attn2.", "_attn2_"):
        return "sd3", ["SD3-only modules (pos_embed or a second attention in joint blocks)"]
    hit = find_key(keys, r"transformer_blocks[._]\d+[._]attn[._](to_[qkv]|add_[qkv]_proj)" + _LORA_DOWN.pattern)
    if hit is not None and len(hit[1]) >= 2 and hit[1][1] in _MMDIT_WIDTHS:
        width = hit[1][1]
        return _MMDIT_WIDTHS[width], [f"{key_evidence(hit)}: {width}-wide joint attention"]
    ev = [
        f"MMDiT joint blocks of a width neither FLUX.1 nor SD3 has ({key_evidence(hit)})"
        if hit
        else "MMDiT joint blocks"
    ]
    return None, ev


def _embedding(keys: dict[str, tuple[Shape, str]], names: set[str], meta: dict[str, str]) -> Detection | None:
    if {"clip_l", "clip_g"} <= names:
        return Detection(
            "embedding",
            "sdxl",
            "a1111",
            evidence=(f"clip_l {list(keys['clip_l'][0])}", f"clip_g {list(keys['clip_g'][0])}"),
        )
    for k in ("emb_params", "string_to_param.*", "string_to_param"):
        if k in names:
            dim = probe_dim((k, keys[k][0]), -1)
            fam = {768: "sd15", 1024: "sd2"}.get(dim)
            return Detection(
                "embedding",
                fam,
                "a1111",
                candidates=() if fam else SD_LATENT_FAMILIES,
                evidence=(f"{k} {list(keys[k][0])}",),
            )
    if len(names) == 1:
        # diffusers' learned_embeds: one tensor named by its token, a few vectors of the text
        # encoder's width (which tells SD 1.x from 2.x; any other width leaves the family open).
        (k,) = names
        shape = keys[k][0]
        width_like = len(shape) > 0 and shape[-1] >= 16 and shape[-1] % 8 == 0  # a text encoder's hidden width
        if width_like and (len(shape) == 1 or (len(shape) == 2 and shape[0] <= 128)):
            fam = {768: "sd15", 1024: "sd2"}.get(shape[-1])
            cands = () if fam else SD_LATENT_FAMILIES
            return Detection(
                "embedding", fam, "diffusers", candidates=cands, evidence=(f"one tensor {k} {list(shape)}",)
            )
    return None


_CONTROLNET_LAYOUTS = (  # (marker key part, format, the cross-attention key that gives the width)
    ("input_hint_block.0.weight", "ldm", r"input_blocks\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.weight$"),
    ("controlnet_cond_embedding.conv_in.weight", "diffusers", r"attn2\.to_k\.weight$"),
)


def _controlnet(keys: dict[str, tuple[Shape, str]], names: set[str], meta: dict[str, str]) -> Detection | None:
    for marker, fmt, width in _CONTROLNET_LAYOUTS:
        if _any(names, marker):
            fam, ev = _context_family(keys, width)
            return Detection(
                "controlnet",
                fam,
                fmt,
                candidates=() if fam else SD_LATENT_FAMILIES,
                evidence=(f"{marker.split('.')[0]} keys", *ev),
            )
    return None


_SGM = "conditioner.embedders."


def _text_encoders(names: set[str]) -> tuple[str | None, str]:
    """The family the text encoders' layout names, and why. Naming is structural evidence that
    holds at any width (tiny test models too), where the widths that tell families apart do not:
    SD 1.x ships CLIP-L in transformers naming, SD 2.x OpenCLIP-H in open_clip naming (LDM's
    cond_stage_model); SGM's conditioner holds SDXL base's two, CLIP-L (transformers naming) then
    OpenCLIP-G (open_clip naming), and the refiner's OpenCLIP-G alone, first."""
    if _any(names, _SGM + "0.transformer.") and _any(names, _SGM + "1.model."):
        return "sdxl", "SDXL CLIP-L + OpenCLIP-G text encoders (conditioner.embedders.0.transformer, 1.model)"
    if _any(names, _SGM + "0.model.") and not _any(names, _SGM + "1."):
        return "sdxl-refiner", "SDXL refiner OpenCLIP-G text encoder alone (conditioner.embedders.0.model)"
    if _any(names, "cond_stage_model.transformer."):
        return "sd15", "SD 1.x CLIP-L text encoder"
    if _any(names, "cond_stage_model.model."):
        return "sd2", "SD 2.x OpenCLIP-H text encoder"
    return None, ""


def _whole(names: set[str]) -> bool:
    """An original-layout file with a VAE or text encoders beside its denoiser: a whole pipeline."""
    return _any(
        names, "first_stage_model.", "vae.decoder.", "cond_stage_model.", "conditioner.embedders.", "text_encoders."
    )


def _bfl_flux(keys: dict[str, tuple[Shape, str]], names: set[str], meta: dict[str, str]) -> Detection | None:
    """FLUX in BFL naming, bare or under the ComfyUI prefix: img_in's width tells fill (384) and
    control (128) models, guidance_in dev from schnell."""
    if not _any(names, "double_blocks.0.img_attn.qkv.weight"):
        return None
    img_in = find_key(keys, r"(^|\.)img_in\.weight$")
    channels = probe_dim(img_in, 1) if img_in else 64
    fam: str | None
    variant, fam = "normal", "flux-dev"
    if channels == 384:
        variant, fam = "inpaint", "flux-fill"
    elif channels == 128:
        variant, fam = "control", None
    guidance = find_key(keys, r"(^|\.)guidance_in\.in_layer\.weight$")
    if fam == "flux-dev" and guidance is None:
        fam = "flux-schnell"
    return Detection(
        "checkpoint" if _whole(names) else "transformer",
        fam,
        "bfl",
        variant,
        "flow",
        candidates=("flux-depth", "flux-canny") if fam is None else (),
        evidence=(
            "double_blocks (BFL naming)",
            key_evidence(img_in) if img_in else "img_in missing",
            key_evidence(guidance) if guidance else "no guidance_in (distilled without guidance: schnell)",
        ),
    )


_LDM = "model.diffusion_model."


def _mmdit(keys: dict[str, tuple[Shape, str]], names: set[str], meta: dict[str, str]) -> Detection | None:
    """SD3 / SD3.5 (MMDiT) single files: SD3.5 large is 2432 wide, medium adds x_block.attn2."""
    if not _any(names, _LDM + "joint_blocks.0."):
        return None
    blocks = {int(m.group(1)) for k in names if (m := re.match(re.escape(_LDM) + r"joint_blocks\.(\d+)\.", k))}
    emb = find_key(keys, re.escape(_LDM) + r"x_embedder\.proj\.weight$")
    width = probe_dim(emb, 0) if emb else 0
    # SD 3 Medium has no q/k norms; SD 3.5 has them, Medium with a second attention, Large without:
    # structure that holds at any width (tiny test models too), where only Large is 2432 wide.
    qk_norm = _any(names, ".attn.ln_q.")
    dual = _any(names, ".x_block.attn2.")
    fam = "sd35-medium" if dual else "sd35-large" if width == 2432 or qk_norm else "sd3"
    whole = _whole(names)
    return Detection(
        "checkpoint" if whole else "transformer",
        fam,
        "comfyui" if whole else "ldm",
        "normal",
        "flow",
        evidence=(
            f"{len(blocks)} joint_blocks",
            key_evidence(emb) if emb else "no x_embedder",
            "x_block.attn2 (MMDiT-X)" if dual else "no x_block.attn2",
            "q/k norms (ln_q, ln_k)" if qk_norm else "no q/k norms",
        ),
    )


def _ldm_unet(keys: dict[str, tuple[Shape, str]], names: set[str], meta: dict[str, str]) -> Detection | None:
    """LDM/SGM UNets, with or without VAE and text encoders; an EMA-only file stores them as
    model_ema.<name without dots>. The cross-attention width, the ADM input and the text
    encoders' layout must agree on the family (else: unknown, with both candidates)."""
    ema_only = not _any(names, _LDM) and _any(names, "model_ema.diffusion_model")
    if not _any(names, _LDM + "input_blocks.") and not ema_only:
        return None
    fam, evidence, conv, adm = _ldm_probes(keys, ema_only)
    if adm is not None:
        evidence.append(key_evidence(adm))
        by_adm = ADM_FAMILY.get(probe_dim(adm, 1))
        if by_adm is not None and fam not in (None, by_adm):
            return Detection("unknown", None, None, candidates=(fam, by_adm), evidence=tuple(evidence))
        fam = by_adm or fam
    te_fam, te_ev = _text_encoders(names)
    if te_fam is not None:
        evidence.append(te_ev)
        if fam is None:
            fam = te_fam
        elif fam != te_fam:
            return Detection("unknown", None, None, candidates=(fam, te_fam), evidence=tuple(evidence))
    in_ch = probe_dim(conv, 1) if conv else 4
    if conv:
        evidence.append(key_evidence(conv))
    variant = {4: "normal", 9: "inpaint", 5: "depth", 8: "instruct-pix2pix"}.get(in_ch, f"{in_ch}-channel")
    if ema_only:
        variant = "ema" if variant == "normal" else variant
    fmt = "sgm" if _any(names, _SGM) or fam in ("sdxl", "sdxl-refiner") else "ldm"
    kind = "checkpoint" if _whole(names) else "unet"
    cands = () if fam else tuple(CONTEXT_FAMILY.values())
    return Detection(kind, fam, fmt, variant, _prediction(keys, meta, fam), cands, tuple(evidence))


def _ldm_probes(
    keys: dict[str, tuple[Shape, str]], ema_only: bool
) -> tuple[str | None, list[str], tuple[str, Shape] | None, tuple[str, Shape] | None]:
    """(family by cross-attention width, its evidence, the first conv, the ADM input) of an LDM UNet."""
    if ema_only:
        fam, ev = _context_family(keys, r"model_ema\.diffusion_model.*attn2to_kweight$")
        conv = find_key(keys, r"model_ema\.diffusion_modelinput_blocks00weight$")
        adm = find_key(keys, r"model_ema\.diffusion_modellabel_emb00weight$")
        return fam, ev, conv, adm
    prefix = re.escape(_LDM)
    fam, ev = _context_family(
        keys, prefix + r"(input|output)_blocks\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.weight$"
    )
    conv = find_key(keys, prefix + r"input_blocks\.0\.0\.weight$")
    adm = find_key(keys, prefix + r"label_emb\.0\.0\.weight$")
    return fam, ev, conv, adm


def _diffusers_denoiser(keys: dict[str, tuple[Shape, str]], names: set[str], meta: dict[str, str]) -> Detection | None:
    if "conv_in.weight" in names and _any(names, "down_blocks.0.") and _any(names, "time_embedding."):
        fam, ev = _context_family(keys, r"attn2\.to_k\.weight$")
        adm = keys.get("add_embedding.linear_1.weight")
        if adm is not None:
            fam = ADM_FAMILY.get(probe_dim(("add_embedding.linear_1.weight", adm[0]), 1), fam)
            ev.append(f"add_embedding.linear_1.weight {list(adm[0])}")
        in_ch = probe_dim(("conv_in.weight", keys["conv_in.weight"][0]), 1)
        variant = {4: "normal", 9: "inpaint", 5: "depth"}.get(in_ch, f"{in_ch}-channel")
        return Detection(
            "unet",
            fam,
            "diffusers",
            variant,
            _prediction(keys, meta, fam),
            () if fam else tuple(CONTEXT_FAMILY.values()),
            (*ev, f"conv_in.weight {list(keys['conv_in.weight'][0])}"),
        )
    if _any(names, "single_transformer_blocks.0.") and "x_embedder.weight" in names:
        guidance = _any(names, "time_text_embed.guidance_embedder.")
        return Detection(
            "transformer",
            "flux-dev" if guidance else "flux-schnell",
            "diffusers",
            "normal",
            "flow",
            evidence=(
                "single_transformer_blocks (diffusers FLUX)",
                "guidance_embedder" if guidance else "no guidance_embedder",
            ),
        )
    if _any(names, "transformer_blocks.0.attn.add_q_proj.") and "pos_embed.proj.weight" in names:
        return Detection("transformer", "sd3", "diffusers", "normal", "flow", evidence=("joint transformer_blocks",))
    return None


def _vae(keys: dict[str, tuple[Shape, str]], names: set[str], meta: dict[str, str]) -> Detection | None:
    hit = find_key(keys, r"(^|\.)decoder\.conv_in\.weight$")
    if hit is None or not _any(names, "encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks."):
        return None
    latent = probe_dim(hit, 1)
    cands = SD_LATENT_FAMILIES if latent == 4 else FLOW_LATENT_FAMILIES if latent == 16 else ()
    return Detection(
        "vae",
        None,
        "diffusers" if _any(names, "decoder.up_blocks.") else "ldm",
        candidates=cands,
        evidence=(key_evidence(hit), f"{latent}-channel latents: the layout alone cannot tell the family"),
    )


def _text_encoder(keys: dict[str, tuple[Shape, str]], names: set[str], meta: dict[str, str]) -> Detection | None:
    tok = find_key(keys, r"(^|\.)embeddings\.token_embedding\.weight$")
    if tok is not None and _any(names, "encoder.layers.0."):
        width = probe_dim(tok, 1)
        cands = {768: ("sd15", "sdxl", "sd3", "flux-dev"), 1024: ("sd2",), 1280: ("sdxl", "sd3")}.get(width, ())
        fam = cands[0] if len(cands) == 1 else None
        return Detection(
            "text-encoder", fam, "diffusers", candidates=() if fam else cands, evidence=(key_evidence(tok),)
        )
    if _any(names, "encoder.block.0.layer.0.SelfAttention.q.weight"):
        return Detection(
            "text-encoder", None, "diffusers", candidates=("sd3", "flux-dev"), evidence=("T5 encoder blocks",)
        )
    return None


def detect_file(path: Path) -> Detection:
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        return Detection(
            "unknown", None, None, evidence=(f"{path.suffix} is a pickle format: not read (it could run code)",)
        )
    try:
        keys, meta = read_header(path)
    except (OSError, HeaderError) as e:
        return Detection("invalid", None, None, evidence=(str(e),))
    return detect(keys, meta)


INVALID_HINT = (
    "download or copy the file again (compare its sha256 with the one its model page lists); "
    "a file that still fails is damaged at the source"
)
NOT_REGULAR_HINT = "name the model file itself: FIFOs, devices and folders are never read (they can block forever)"


def invalid_hint(path: Path) -> str:
    """What to do about a file detection calls invalid."""
    if not path.exists():
        return "check the path (relative paths are relative to the current directory)"
    return INVALID_HINT if path.is_file() else NOT_REGULAR_HINT


def main(argv: list[str]) -> int:
    """`python -m compiler.detect FILE...`: one JSON object per file on stdout, `path` as given;
    a file that is not a readable safetensors model file is an error on stderr instead (where,
    what, hint). Exit status 2 when any file is invalid, else 1 when any is unknown."""
    import sys

    if not argv or any(a in ("-h", "--help") for a in argv):
        sys.stderr.write("usage: python -m compiler.detect FILE.safetensors [FILE ...]\n")
        return 0 if argv else 2
    unknown = invalid = False
    for arg in argv:
        found = detect_file(Path(arg))
        if found.kind == "invalid":
            invalid = True
            sys.stderr.write(f"error: {Problem(arg, '; '.join(found.evidence), invalid_hint(Path(arg)))}\n")
            continue
        unknown |= found.kind == "unknown"
        sys.stdout.write(json.dumps(found.as_json(arg), separators=(",", ":")) + "\n")
    return 2 if invalid else 1 if unknown else 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

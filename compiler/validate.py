"""Pure cross-checks between what a recipe asks for and what its files are. No I/O."""

from __future__ import annotations

from compiler.detect import INVALID_HINT, Detection
from compiler.errors import Problem, UserError
from compiler.families import family_of_civitai_base_model, lineage
from compiler.recipe import Recipe


def check_readable(found: Detection, where: str) -> None:
    """A file detection could not read as a safetensors model file (truncated, malformed, not a
    regular file) is an error here, before anything loads it."""
    if found.kind == "invalid":
        raise UserError.one(
            where,
            f"not a readable safetensors model file: {'; '.join(found.evidence)}",
            INVALID_HINT,
        )


def check_checkpoint(
    found: Detection, base_family: str, where: str, civitai_base_model: str | None = None, override: bool = False
) -> None:
    """A checkpoint must be a whole pipeline (or a UNet) of the base's family, and agree with what
    CivitAI says it is. Raises UserError naming both families and the evidence; never guesses.
    ``override``: the recipe's ``family:`` chose ``base_family``, which settles an ambiguous file
    (one of its candidates) but never contradicts a file whose header is clear."""
    check_readable(found, where)
    evidence = "; ".join(found.evidence) or "none"
    if found.kind not in ("checkpoint", "unet"):
        raise UserError.one(
            where,
            f"this file is a {found.kind}, not a checkpoint (evidence: {evidence})",
            "a LoRA, embedding, VAE or ControlNet goes in its own recipe field; `checkpoint:` takes a whole model",
        )
    if found.family is None and override and base_family in found.candidates:
        return
    if found.family is None:
        raise UserError.one(
            where,
            f"cannot tell this checkpoint's family; candidates: {', '.join(found.candidates) or 'none'} "
            f"(evidence: {evidence})",
            "set `family:` in the recipe to one of the candidates if you know which it is",
        )
    if found.family != base_family and override:
        raise UserError.one(
            where,
            f"`family: {base_family}` contradicts the file, which is {found.family} (evidence: {evidence})",
            "remove `family:` (it is only for files whose family detection cannot tell)",
        )
    if found.family != base_family:
        raise UserError.one(
            where,
            f"this checkpoint is {found.family} but the base is {base_family} (evidence: {evidence})",
            f"use a {found.family} base (its configs and tokenizer), or a {base_family} checkpoint",
        )
    claimed = family_of_civitai_base_model(civitai_base_model)
    if civitai_base_model and claimed is not None and claimed != found.family:
        raise UserError.one(
            where,
            f"CivitAI lists this file as {civitai_base_model!r} ({claimed}), but its weights are {found.family} "
            f"(evidence: {evidence})",
            "the upload is mislabelled or the version id is wrong; check the model page",
        )


def check_adapter(found: Detection, kind: str, family: str, where: str) -> None:
    """An adapter must be of its field's kind and, where its header tells, of the base's family.
    A family the header cannot tell (tiny widths, a LoRA of text-encoder modules only) is left to
    the build, which checks every module the file names against the base's actual modules."""
    check_readable(found, where)
    evidence = "; ".join(found.evidence) or "none"
    if found.kind != kind:
        raise UserError.one(
            where,
            f"this file is {_a(found.kind)}, not {_a(kind)} (evidence: {evidence})",
            f"this field takes {FIELD_TAKES[kind]}; `python -m compiler.detect FILE` says what a file is",
        )
    if found.family is not None and lineage(found.family) != lineage(family):
        raise UserError.one(
            where,
            f"this {kind} is made for {found.family}, the base is {family} (evidence: {evidence})",
            f"use a {family} {kind}, or a {found.family} base",
        )


FIELD_TAKES = {
    "lora": "LoRA files (kohya, PEFT/diffusers, LyCORIS)",
    "vae": "one VAE file (LDM or diffusers naming)",
    "embedding": "textual-inversion files (A1111, diffusers learned_embeds, SDXL clip_l + clip_g)",
    "controlnet": "ControlNet files (LDM control_model.* or diffusers naming)",
}


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def check_performance(recipe: Recipe, limits: tuple[int, int]) -> list[Problem]:
    """dtype x offload x compile x quantize x fused QKV x switchable LoRAs: the combinations that
    cannot work, each with the reason and a fix. ``limits``: the artifact's (max_width,
    max_height). Returns every problem found (the plan reports them with its own)."""
    where = str(recipe.path)
    out: list[Problem] = []
    switchable = [lora.name for lora in recipe.loras if not lora.fuse]
    moving = recipe.offload in ("sequential", "group")
    if recipe.compile.scope != "off" and moving:
        out.append(
            Problem(
                f"{where}: compile",
                f"compile {recipe.compile.scope} with offload {recipe.offload}: the offload hooks move weights "
                "inside every forward, which torch.compile turns into graph breaks and recompiles",
                "use `offload: model` (whole components move, the compiled denoiser stays intact) or `offload: none`",
            )
        )
    if recipe.quantize != "none":
        if moving:
            out.append(
                Problem(
                    f"{where}: quantize",
                    f"quantize {recipe.quantize} with offload {recipe.offload}: optimum-quanto's weights cannot be "
                    "offloaded leaf by leaf (diffusers refuses quanto with a CPU/disk device map)",
                    "use `offload: model` or `offload: none` with a quantized denoiser",
                )
            )
        if recipe.fused_qkv:
            out.append(
                Problem(
                    f"{where}: fused_qkv",
                    "fused_qkv with quantize: the fuse concatenates float weights, the quantized layers hold int8/fp8 "
                    "ones with per-layer scales",
                    "choose one: `quantize:` (smaller weights) or `fused_qkv: true` (fewer, larger matmuls)",
                )
            )
        if switchable:
            out.append(
                Problem(
                    f"{where}: quantize",
                    f"switchable LoRAs ({', '.join(switchable)}) need float layers; quantized ones have none",
                    "fuse them (`fuse: true`: baked in before quantizing) or drop `quantize:`",
                )
            )
    if recipe.fused_qkv and switchable:
        out.append(
            Problem(
                f"{where}: fused_qkv",
                f"switchable LoRAs ({', '.join(switchable)}) target to_q/to_k/to_v, which fused_qkv replaces with "
                "one to_qkv layer: they would silently stop applying",
                "fuse the LoRAs (`fuse: true`) or drop `fused_qkv:`",
            )
        )
    for i, (w, h) in enumerate(recipe.compile.shapes if recipe.compile.scope != "off" else ()):
        if w > limits[0] or h > limits[1]:
            out.append(
                Problem(
                    f"{where}: compile.shapes.{i}",
                    f"[{w}, {h}] exceeds the artifact's limits ({limits[0]}x{limits[1]})",
                    "warm sizes that requests may ask for, or raise limits.max_width/max_height",
                )
            )
    return out

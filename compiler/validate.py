"""Pure cross-checks between what a recipe asks for and what its files are. No I/O."""

from __future__ import annotations

from compiler.detect import Detection
from compiler.errors import UserError
from compiler.families import family_of_civitai_base_model, lineage


def check_checkpoint(
    found: Detection, base_family: str, where: str, civitai_base_model: str | None = None, override: bool = False
) -> None:
    """A checkpoint must be a whole pipeline (or a UNet) of the base's family, and agree with what
    CivitAI says it is. Raises UserError naming both families and the evidence; never guesses.
    ``override``: the recipe's ``family:`` chose ``base_family``, which settles an ambiguous file
    (one of its candidates) but never contradicts a file whose header is clear."""
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

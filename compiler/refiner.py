"""`refiner:`: an SDXL refiner built beside an SDXL base, checked and planned before any build.

Any source form: a pipeline (``hf://stabilityai/stable-diffusion-xl-refiner-1.0``, a local
diffusers folder, ``builtin:tiny-sdxl-refiner``) or a single refiner ``.safetensors`` file, whose
configs and tokenizer come from the refiner's config repo (the recipe's ``refiner.configs`` lock
role, added by ``Recipe.sources``). What a single file is gets detected once, from its header, and
kept in the lock, as for ``checkpoint:``. The build itself is compiler.refiner_build.
"""

from __future__ import annotations

from compiler import lockfile
from compiler.detect import Detection, detect_file
from compiler.errors import UserError
from compiler.families import FAMILIES
from compiler.fetch import fetch_entry
from compiler.lockfile import Lock
from compiler.plan import PlannedRefiner
from compiler.recipe import REFINER_CONFIGS, Recipe
from compiler.sources import Context, Fetched, describe_file, describe_pipeline
from compiler.sources.hf import diffusers_variant
from compiler.validate import check_readable

REFINER_FAMILY = "sdxl-refiner"
BASE_FAMILY = "sdxl"  # the only family a refiner refines
_HINT = (
    "`refiner:` takes an SDXL refiner: hf://stabilityai/stable-diffusion-xl-refiner-1.0, its single "
    ".safetensors file, a local diffusers folder of one, or builtin:tiny-sdxl-refiner"
)


def detect_refiner_file(recipe: Recipe, lock: Lock, ctx: Context) -> Lock:
    """A single-file refiner's header read once and recorded in its lock entry (``detected``)."""
    if recipe.refiner is None:
        return lock
    key = str(recipe.refiner)
    entry = lock.sources.get(key)
    if entry is None or entry.kind != "file" or "detected" in entry.meta:
        return lock
    where = f"{recipe.path}: refiner"
    fetched = fetch_entry(entry, where, ctx, recipe.precision, allow_pickle=recipe.allow_pickle)
    (path,) = fetched.files.values()
    found = detect_file(path)
    check_readable(found, where)
    detected = {k: v for k, v in found.as_json("").items() if k != "path"}
    entry = entry.model_copy(update={"meta": {**entry.meta, "detected": detected}})
    return lockfile.with_entries(lock, recipe.name, {key: entry}, tuple(lock.sources))


def _label(family: str) -> str:
    return FAMILIES[family].label if family in FAMILIES else family  # generic:<Class> has no entry


def plan_refiner(recipe: Recipe, entries: dict[str, lockfile.LockEntry], base_family: str) -> PlannedRefiner | None:
    """The refiner's part of the plan, after checking that it is an SDXL refiner on an SDXL base;
    ``entries``: the recipe's lock entries by role. Raises UserError with where, what and a hint."""
    if recipe.refiner is None:
        return None
    where = f"{recipe.path}: refiner"
    if base_family != BASE_FAMILY:
        raise UserError.one(
            where,
            f"a refiner refines an SDXL base's latents; this base is {_label(base_family)} ({base_family})",
            "remove `refiner:`, or use an SDXL base (hf://stabilityai/stable-diffusion-xl-base-1.0, "
            "an SDXL checkpoint)",
        )
    entry = entries["refiner"]
    if entry.kind == "file":
        _check_file(Detection.from_json(entry.meta["detected"]), where)
        pinned = describe_file(entry, where)
        configs = describe_pipeline(
            entries[REFINER_CONFIGS], f"{recipe.path}: {REFINER_CONFIGS}", recipe.precision, True
        )
        return PlannedRefiner(
            pin=pinned.pin,
            inputs=pinned.inputs,
            mode=recipe.refiner_mode,
            single_file=True,
            configs=configs.pin,
            configs_inputs=configs.inputs,
        )
    resolved = describe_pipeline(entry, where, recipe.precision)
    if resolved.family != REFINER_FAMILY:
        raise UserError.one(
            where,
            f"{entry.source} is {FAMILIES[resolved.family].label} ({resolved.family}), not an SDXL refiner",
            _HINT,
        )
    return PlannedRefiner(
        pin=resolved.pin,
        inputs=resolved.inputs,
        mode=recipe.refiner_mode,
        single_file=False,
        variant=diffusers_variant(entry, recipe.precision),
    )


def _check_file(found: Detection, where: str) -> None:
    check_readable(found, where)
    if found.kind == "checkpoint" and found.family == REFINER_FAMILY and found.variant in ("normal", "ema"):
        return
    family = found.family or f"one of {', '.join(found.candidates) or 'no known family'}"
    variant = f", variant {found.variant}" if found.variant not in ("normal", "ema") else ""
    evidence = "; ".join(found.evidence) or "none"
    raise UserError.one(
        where,
        f"this file is not an SDXL refiner: it is a {found.kind}, family {family}{variant} (evidence: {evidence})",
        _HINT,
    )


def fetch_refiner(recipe: Recipe, entries: dict[str, lockfile.LockEntry], ctx: Context) -> dict[str, Fetched]:
    """The refiner's files (and a single file's configs) by lock role, for the build."""
    if recipe.refiner is None:
        return {}
    out = {}
    for role in ("refiner", REFINER_CONFIGS):
        if role in entries:
            configs_only = role == REFINER_CONFIGS
            where = f"{recipe.path}: {role}"
            out[role] = fetch_entry(entries[role], where, ctx, recipe.precision, configs_only, recipe.allow_pickle)
    return out

"""The build as a library: a recipe's command-line words -> a finished artifact's directory.

``prepare`` composes, parses, locks and plans (no download, no torch); ``build`` looks the plan's
cache key up in the store and, on a miss, fetches the inputs, materializes and packages them and
publishes the artifact under the key's build lock; either way the recipe's name is pointed at it.
A cache hit is checked first (a stat per file against the verification memo): a damaged one is
set aside and rebuilt, never returned. ``compiler.cli`` is the command line over this module.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

from compiler import COMPILER_REVISION
from compiler.compose import compose
from compiler.converted_bases import ConvertedBase, converted_key
from compiler.detect import Detection, detect_file
from compiler.errors import UserError
from compiler.fetch import fetch_entry
from compiler.lockfile import LockEntry
from compiler.pinning import Locked, civitai_base_model, lock_sources
from compiler.plan import BuildPlan, cache_key, make_plan
from compiler.recipe import Recipe, file_stem, parse_recipe
from compiler.sources import Context, Fetched, describe_file, describe_pipeline
from compiler.sources.base import Pinned
from compiler.sources.hf import diffusers_variant
from compiler.store import Store
from compiler.store.converted_bases import (
    PROVENANCE_ROLE,
    ConvertedBaseStore,
    key_of,
    link_identical,
    provenance_value,
)
from compiler.validate import check_adapter, check_checkpoint
from runtime.artifact import PIPELINE_DIR, READY, ArtifactError, read_manifest, read_name
from runtime.integrity import check_artifact, remember_verified, stat_files

log = logging.getLogger("compiler")

# recipe field -> the kind of file it takes (compiler.detect's kinds)
ADAPTER_KINDS = {"loras": "lora", "vae": "vae", "embeddings": "embedding", "controlnets": "controlnet"}


def environment() -> dict[str, str]:
    """Versions of what writes the artifact's bytes, read without importing torch."""
    env = {"compiler_revision": COMPILER_REVISION}
    for dist in ("torch", "diffusers", "transformers", "safetensors", "peft"):  # peft: LoRA fusing
        env[dist] = metadata.version(dist)
    return env


def civitai_hosts() -> tuple[str, ...]:
    """A configured CivitAI mirror's URLs are CivitAI URLs too."""
    host = urlsplit(os.environ.get("CIVITAI_BASE_URL", "")).hostname
    return (host,) if host else ()


@dataclass(frozen=True)
class Prepared:
    """Everything decided before a build: the recipe, its lock, the plan and its cache key."""

    recipe: Recipe
    store: Store
    ctx: Context
    locked: Locked
    plan: BuildPlan
    key: str
    environment: dict[str, str]

    def where(self, role: str) -> str:
        return f"{self.recipe.path}: {role}"

    @property
    def base_role(self) -> str:
        return base_role(self.recipe)

    @property
    def checkpoint(self) -> LockEntry | None:
        return self.locked.entry("checkpoint") if "checkpoint" in self.locked.roles else None

    def fetch_adapters(self) -> dict[str, Fetched]:
        """Each adapter file (LoRAs, VAE, embeddings) by role, checked before the build: of its
        field's kind and, where its header can tell, of the base's family (the build then checks
        that it fits the base's actual modules)."""
        out = {}
        for role in self.locked.roles:
            kind = ADAPTER_KINDS.get(role.split(".")[0])
            if kind is None:
                continue
            fetched = fetch_entry(
                self.locked.entry(role),
                self.where(role),
                self.ctx,
                self.recipe.precision,
                allow_pickle=self.recipe.allow_pickle,
            )
            (path,) = fetched.files.values()
            check_adapter(detect_file(path), kind, self.plan.family, self.where(role))
            out[role] = fetched
        return out

    def fetch(self) -> tuple[Fetched, Fetched | None]:
        """The build's inputs as local files (downloading what the store lacks)."""
        r = self.recipe
        base = fetch_entry(
            self.locked.entry(self.base_role),
            self.where(self.base_role),
            self.ctx,
            r.precision,
            configs_only=self.plan.checkpoint_kind == "checkpoint",
        )
        ckpt = self.checkpoint and fetch_entry(
            self.checkpoint, self.where("checkpoint"), self.ctx, r.precision, allow_pickle=r.allow_pickle
        )
        return base, ckpt or None


def prepare(argv: list[str]) -> Prepared:
    composed = compose(argv)
    recipe = parse_recipe(composed.name, composed.path, composed.fields, civitai_hosts(), composed.command_line)
    store = Store(composed.home)
    ctx = Context.from_env(store)
    locked = lock_sources(recipe, composed.lock, ctx)
    recipe = named_by_lock(recipe, locked)
    where = f"{recipe.path}: "
    role = base_role(recipe)
    found: Detection | None = None
    ckpt: Pinned | None = None
    if "checkpoint" in locked.roles:
        entry = locked.entry("checkpoint")
        found = Detection.from_json(entry.meta["detected"])
        ckpt = describe_file(entry, where + "checkpoint")
    base_entry = locked.entry(role)
    whole = found is not None and found.kind == "checkpoint"
    base = describe_pipeline(base_entry, where + role, recipe.precision, configs_only=whole, family=recipe.family)
    if found is not None:
        # Before anything is downloaded or built: the file must be of the base's family.
        check_checkpoint(
            found,
            base.family,
            where + "checkpoint",
            civitai_base_model(locked.entry("checkpoint")),
            recipe.family is not None,
        )
    variant = None if whole else diffusers_variant(base_entry, recipe.precision)

    def pinned(role: str) -> Pinned:
        return describe_file(locked.entry(role), where + role)

    plan = make_plan(
        recipe,
        base,
        variant,
        ckpt,
        found,
        loras=tuple(pinned(f"loras.{i}") for i in range(len(recipe.loras))),
        vae=pinned("vae") if recipe.vae is not None else None,
        embeddings=tuple(pinned(f"embeddings.{i}") for i in range(len(recipe.embeddings))),
        controlnets=tuple(pinned(f"controlnets.{i}") for i in range(len(recipe.controlnets))),
    )
    from compiler.optimize import target_environment  # torch only for recipes that compile

    env = {**environment(), **target_environment(plan)}
    return Prepared(recipe, store, ctx, locked, plan, cache_key(plan, env), env)


def base_role(recipe: Recipe) -> str:
    """The lock role that gives the pipeline: `base:`, or the config repo a base-less checkpoint's
    family names."""
    return "base" if recipe.base is not None else "configs"


def named_by_lock(recipe: Recipe, locked: Locked) -> Recipe:
    """Adapters whose source names no file (a CivitAI version) and that the recipe did not name
    take their locked file's stem: an A1111 embedding's token is its file name."""

    def stem(role: str, fallback: str) -> str:
        files = locked.entry(role).files
        return (file_stem(files[0].path) if len(files) == 1 else None) or fallback

    loras = tuple(
        x.model_copy(update={"name": stem(f"loras.{i}", x.name)}) if x.from_lock else x
        for i, x in enumerate(recipe.loras)
    )
    embeddings = tuple(
        x.model_copy(update={"stem": stem(f"embeddings.{i}", x.stem)}) if x.from_lock else x
        for i, x in enumerate(recipe.embeddings)
    )
    controlnets = tuple(
        x.model_copy(update={"name": stem(f"controlnets.{i}", x.name)}) if x.from_lock else x
        for i, x in enumerate(recipe.controlnets)
    )
    for what, names in (("LoRAs", [x.name for x in loras]), ("ControlNets", [x.name for x in controlnets])):
        if len(set(names)) < len(names):
            raise UserError.one(
                f"{recipe.path}: {what.lower()}", f"two {what} have the same file name", "give each a `name:`"
            )
    return recipe.model_copy(update={"loras": loras, "embeddings": embeddings, "controlnets": controlnets})


def build(argv: list[str]) -> Path:
    t0 = time.perf_counter()
    p = prepare(argv)
    store, plan, key = p.store, p.plan, p.key
    hit = store.lookup(key)
    if hit is not None:
        # A stat per file (and the memo): a hit whose files changed since they last hashed right is
        # hashed again, and a damaged one is rebuilt below, never printed.
        problems = artifact_problems(hit)
        if not problems:
            _record(store, plan.recipe, key, hit)
            log.info("cache hit %s (%.2f s)", key, time.perf_counter() - t0)
            return hit
        log.warning("cache hit %s is damaged: %s", key, "; ".join(problems))

    with store.building(key, artifact_problems) as staging:
        if staging is None:  # another compile finished it while we waited
            hit = store.artifact_dir(key)
        else:
            log.info("building %s for recipe %s", key, plan.recipe)
            base, ckpt = p.fetch()  # before torch loads: a failed download costs no import
            adapters = p.fetch_adapters()
            # Imported here: torch and diffusers load only when something must be built.
            from compiler.materialize import materialize
            from compiler.package import package

            converted = converted_base(p)
            built = materialize(plan, staging, base, store.scratch(), ckpt, adapters, converted)
            provenance = {role: _provenance(p.locked.entry(role)) for role in p.locked.roles}
            if converted is not None and (entry := converted.store.lookup(converted.key)) is not None:
                provenance[PROVENANCE_ROLE] = provenance_value(converted.key)  # gc keeps the entry by it
                shared = link_identical(entry / PIPELINE_DIR, staging / PIPELINE_DIR)
                log.info("%.1f MiB hard-linked from the converted base", shared / 2**20)
            package(
                staging,
                plan,
                key,
                built.components,
                p.environment,
                provenance,
                built.embeddings,
                built.controlnets,
                built.generic,
            )
            hit = store.publish(staging, key)
            remember_published(hit)
            log.info("built %s in %.1f s", hit, time.perf_counter() - t0)
    _record(store, plan.recipe, key, hit)
    return hit


def artifact_problems(artifact: Path) -> list[str]:
    """What is wrong with a finished artifact: its manifest unreadable, a file missing or resized,
    or, for the files whose stat changed since they last hashed right, other bytes. A damaged
    artifact that came from a converted base checks that entry too: its files are hard links to the
    same inodes, and an entry left damaged would be built into the artifact again."""
    try:
        manifest = read_manifest(artifact)
    except ArtifactError as e:
        return [str(e)]
    problems = check_artifact(artifact, manifest)
    converted = key_of(manifest.provenance)
    if problems and converted is not None:
        entries = ConvertedBaseStore(artifact.parents[2])
        with entries.lock(converted):
            if entries.lookup(converted) is not None and (bad := entries.verify(converted)):
                log.warning("converted base %s is damaged too (%s); it is converted again", converted, "; ".join(bad))
                entries.discard(converted)
    return problems


def remember_published(artifact: Path) -> None:
    """The memo of a just-published artifact: package hashed every file moments ago, and the
    rename into place changed no file's stat, so its first load and cache hit hash nothing."""
    manifest = read_manifest(artifact)
    stamps, problems = stat_files(artifact, manifest)
    if not problems:
        remember_verified(artifact, manifest, stamps)


def converted_base(p: Prepared) -> ConvertedBase | None:
    """Where a whole-pipeline single-file checkpoint's conversion is cached, or None."""
    key = converted_key(p.plan, p.environment)
    if key is None:
        return None
    plan = p.plan
    about = {"checkpoint": str(plan.checkpoint), "configs": plan.base, "family": plan.family}
    about["precision"] = plan.precision
    return ConvertedBase(ConvertedBaseStore(p.store.home), key, about)


def _provenance(entry: LockEntry) -> str:
    return entry.pin if entry.kind == "builtin" else f"{entry.source} {entry.pin}"


def _record(store: Store, name: str, key: str, artifact: Path) -> None:
    current = read_name(store.home, name)
    if current is not None and current.current.cache_key == key:
        return  # already current: a cache hit writes nothing
    digest = json.loads((artifact / READY).read_text())["content_digest"]
    store.record_name(name, key, digest)

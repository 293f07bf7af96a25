"""Recipe sources -> the recipe's lock, per the lock mode; reads and writes ``NAME.lock.json``.

- ``auto`` (default): keep every pin the lock has; pin what the recipe added; drop what it removed;
  re-check local files (memoised hashes), since their bytes can change under the same path.
- ``locked``: the lock must cover the recipe exactly; drift is an error that lists it.
- ``frozen``: trust the lock; no metadata calls at all (CI, Docker builds).
- ``update``: re-resolve every source: branches move to their new commit, CivitAI models without a
  version to their newest one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler import lockfile, uri
from compiler.detect import Detection, detect_file
from compiler.errors import UserError
from compiler.families import FAMILIES
from compiler.fetch import fetch_entry
from compiler.lockfile import Lock, LockEntry
from compiler.recipe import Recipe
from compiler.refiner import detect_refiner_file
from compiler.sources import Context, enrich, inventory
from compiler.validate import check_checkpoint, check_readable
from runtime.artifact import write_text_atomic

log = logging.getLogger(__name__)


def lock_path(recipe_path: Path) -> Path:
    return recipe_path.with_name(recipe_path.name.removesuffix(".yaml") + ".lock.json")


def read_lock(path: Path) -> Lock | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return lockfile.loads(text)
    except ValueError as e:
        raise UserError.one(
            str(path),
            f"not a valid lockfile: {str(e).splitlines()[0]}",
            "delete it and compile again to relock (lock=auto), or restore it from version control",
        ) from None


@dataclass(frozen=True)
class Locked:
    """The recipe's lock and which entry plays which role (base, checkpoint, configs)."""

    lock: Lock
    roles: dict[str, str]  # role -> key in lock.sources

    def entry(self, role: str) -> LockEntry:
        return self.lock.sources[self.roles[role]]


def lock_sources(recipe: Recipe, mode: str, ctx: Context) -> Locked:
    """Pin the recipe's sources. A checkpoint without ``base:`` also pins its family's config repo,
    chosen from what the checkpoint's header says it is (recorded in the lock as ``detected``)."""
    path = lock_path(recipe.path)
    old = read_lock(path)
    roles = {role: str(src) for role, src in recipe.sources().items()}
    # Without a base, the lock also holds the family's config repo, which only the second pass
    # (after detection) names: the first pass must not call it removed.
    derived = frozenset(old.sources) - frozenset(roles.values()) if old and recipe.base is None else frozenset()
    new = _relock(recipe, roles, old, mode, ctx, extra=derived)
    if recipe.checkpoint is not None:
        # What the file is decides how it builds (whole pipeline or UNet only) and, without a base,
        # which config repo it needs: detect it once, at lock time, and keep the answer in the lock.
        key = str(recipe.checkpoint)
        ckpt = new.sources[key]
        if "detected" not in ckpt.meta:
            try:
                detected = _detect(recipe, ckpt, ctx)
            except UserError:
                # The pins stand (the file is what failed), the derived config repo's with them.
                kept = {k: old.sources[k] for k in derived} if old else {}
                partial = new.model_copy(update={"sources": dict(sorted({**new.sources, **kept}.items()))})
                if partial != old and mode in ("auto", "update"):
                    _write(path, partial)
                raise
            ckpt = ckpt.model_copy(update={"meta": {**ckpt.meta, "detected": detected}})
            new = lockfile.with_entries(new, recipe.name, {key: ckpt}, tuple(new.sources))
    if recipe.base is None:
        ckpt = new.sources[str(recipe.checkpoint)]
        roles["configs"] = str(configs_source(recipe, ckpt))
        # The config repo keeps its pin across runs like any source: seed it from the old lock.
        kept = {roles["configs"]: old.sources[roles["configs"]]} if old and roles["configs"] in old.sources else {}
        seeded = new.model_copy(update={"sources": {**new.sources, **kept}})
        new = _relock(recipe, roles, seeded, mode, ctx, settled=frozenset(new.sources))
    new = detect_refiner_file(recipe, new, ctx)
    if new != old and mode in ("auto", "update"):
        _write(path, new)
    return Locked(new, roles)


def _detect(recipe: Recipe, entry: LockEntry, ctx: Context) -> dict[str, Any]:
    """Fetch the checkpoint (the build needs it anyway) and record what its header says."""
    where = f"{recipe.path}: checkpoint"
    fetched = fetch_entry(entry, where, ctx, recipe.precision, allow_pickle=recipe.allow_pickle)
    (path,) = fetched.files.values()
    found = detect_file(path)
    check_readable(found, where)  # a truncated or malformed file is not recorded as what it seems
    log.info("checkpoint detected: %s", found.summary())
    return {k: v for k, v in found.as_json("").items() if k != "path"}


def configs_source(recipe: Recipe, checkpoint: LockEntry) -> uri.Source:
    """The config repo a base-less checkpoint builds with: its family's (``family:`` overrides
    detection), or the family's inpaint repo for a 9-channel UNet. Pure."""
    found = checkpoint.meta["detected"]
    where = f"{recipe.path}: checkpoint"
    evidence = "; ".join(found.get("evidence") or ()) or "none"
    family = recipe.family or found.get("family")
    if found.get("kind") != "checkpoint":
        raise UserError.one(
            where,
            f"this file is a {found.get('kind')}, not a whole checkpoint (evidence: {evidence})",
            "a UNet or transformer alone needs `base:` (a diffusers repo whose other weights it joins); "
            "a LoRA, embedding, VAE or ControlNet goes in its own recipe field",
        )
    if family is None:
        raise UserError.one(
            where,
            "cannot tell which model family this checkpoint is; candidates: "
            f"{', '.join(found.get('candidates') or ()) or 'none'} (evidence: {evidence})",
            "set `family:` in the recipe to one of the candidates, or `base:` to a diffusers repo "
            "whose configs and tokenizer fit the file",
        )
    check_checkpoint(
        Detection.from_json(found), family, where, civitai_base_model(checkpoint), recipe.family is not None
    )
    fam = FAMILIES[family]
    variant = found.get("variant") or "normal"
    # A family that only inpaints (FLUX Fill) is its own config repo; others name a variant repo.
    plain = variant in ("normal", "ema") or set(fam.pipelines) == {variant}
    repo = fam.config_repo if plain else fam.variants.get(variant)
    if repo is None:
        raise UserError.one(
            where,
            f"a {variant} {fam.label} checkpoint has no config repo in the registry (evidence: {evidence})",
            "set `base:` to a diffusers repo of the same variant (its configs and tokenizer are used, not its weights)",
        )
    return uri.parse(repo)


def civitai_base_model(entry: LockEntry) -> str | None:
    """What CivitAI calls the file's base model, from its own API or a by-hash lookup."""
    meta = entry.meta
    return meta.get("base_model") or (meta.get("civitai") or {}).get("base_model")


def _relock(
    recipe: Recipe,
    roles: dict[str, str],
    old: Lock | None,
    mode: str,
    ctx: Context,
    settled: frozenset[str] = frozenset(),
    extra: frozenset[str] = frozenset(),
) -> Lock:
    """The lock for ``roles`` per the mode; ``settled`` keys were already pinned this run."""
    path = lock_path(recipe.path)
    where = {key: f"{recipe.path}: {role}" for role, key in roles.items()}
    keys = tuple(sorted(where))
    drift = lockfile.drift(old, keys)
    if extra:  # locked keys a later pass will claim
        drift = lockfile.Drift(added=drift.added, removed=tuple(k for k in drift.removed if k not in extra))
    if mode == "locked" and old is not None and not drift and not settled:
        # A local file can change under the same path: that is drift too (memoised hashes, cheap).
        changed = tuple(
            k
            for k in keys
            if isinstance(src := uri.parse(k), uri.LocalSource)
            and inventory(src, where[k], ctx).pin != old.sources[k].pin
        )
        drift = lockfile.Drift(added=(), removed=(), changed=changed)
    if mode == "locked" and drift:
        raise UserError.one(
            str(path),
            "the lock does not match the recipe (lock=locked):\n" + drift.describe(),
            "compile with lock=auto to relock, review the lockfile diff and commit it",
        )
    if mode == "frozen":
        if old is None or drift.added:
            missing = "no lockfile" if old is None else "unlocked sources:\n" + drift.describe()
            raise UserError.one(
                str(path), f"lock=frozen but {missing}", "compile once with lock=auto and commit the lockfile"
            )
        return lockfile.with_entries(old, recipe.name, {}, keys)
    if mode == "locked":
        assert old is not None
        return old
    fresh: dict[str, LockEntry] = {}
    for key in keys:
        src = uri.parse(key)
        if key in settled:
            continue
        if mode == "update" or key in drift.added or isinstance(src, uri.LocalSource):
            entry = inventory(src, where[key], ctx)
            before = old.sources.get(key) if old else None
            if before is not None and before.pin == entry.pin:
                entry = before  # unchanged (a re-checked local file): keep what was recorded
            else:
                entry = enrich(entry, ctx)
                if before is not None:
                    log.info("relocked %s: %s -> %s", key, before.pin, entry.pin)
            fresh[key] = entry
    return lockfile.with_entries(old, recipe.name, fresh, keys)


def _write(path: Path, lock: Lock) -> None:
    try:
        write_text_atomic(path, lockfile.dumps(lock))
        log.info("wrote %s", path)
    except OSError as e:  # a read-only recipes folder (an installed package) still compiles
        log.warning("cannot write the lockfile %s (%s); the pins hold for this build only", path, e.strerror)

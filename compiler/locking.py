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
from pathlib import Path

from compiler import lock as lockfile
from compiler import uri
from compiler.errors import UserError
from compiler.lock import Lock, LockEntry
from compiler.recipe import Recipe
from compiler.sources import Context, enrich, inventory
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


def lock_sources(recipe: Recipe, mode: str, ctx: Context) -> Lock:
    path = lock_path(recipe.path)
    where = {str(src): f"{recipe.path}: {role}" for role, src in recipe.sources().items()}
    keys = tuple(sorted(where))
    old = read_lock(path)
    drift = lockfile.drift(old, keys)
    if mode == "locked" and old is not None and not drift:
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
    new = lockfile.with_entries(old, recipe.name, fresh, keys)
    if new != old:
        _write(path, new)
    return new


def _write(path: Path, lock: Lock) -> None:
    try:
        write_text_atomic(path, lockfile.dumps(lock))
        log.info("wrote %s", path)
    except OSError as e:  # a read-only recipes folder (an installed package) still compiles
        log.warning("cannot write the lockfile %s (%s); the pins hold for this build only", path, e.strerror)

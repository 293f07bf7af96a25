"""`python -m compiler recipe=NAME [overrides]`: compose -> parse -> resolve -> plan -> store.

Contract: on success stdout carries exactly one line, the absolute artifact directory; all logs go
to stderr; on failure stdout is empty and the exit status is 2 for the user's errors (printed
without a traceback; UIW_DEBUG=1 shows it), 1 otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

from compiler import COMPILER_REVISION
from compiler.compose import compose
from compiler.detect import detect_file
from compiler.errors import UserError
from compiler.fetch import fetch_entry
from compiler.lock import Lock, LockEntry
from compiler.locking import lock_sources
from compiler.plan import BuildPlan, cache_key, make_plan
from compiler.recipe import Recipe, parse_recipe
from compiler.sources import Context, Fetched, describe_file, describe_pipeline
from compiler.sources.hf import diffusers_variant
from compiler.store import Store
from compiler.validate import check_checkpoint
from runtime.artifact import READY, read_name

log = logging.getLogger("compiler")

USAGE = """usage: python -m compiler recipe=NAME [key=value ...]

Compiles recipes/NAME.yaml into an artifact and prints its directory.
  recipe=NAME        the recipe to compile (recipes_dir=DIR or env UIW_RECIPES: where recipes live)
  home=DIR           the store (env UIW_HOME, default ~/.cache/uiw)
  lock=MODE          auto (default), locked, frozen or update: how recipes/NAME.lock.json is used
  precision=fp16     any recipe field; command-line values win over the recipe file
"""


def environment() -> dict[str, str]:
    """Versions of what writes the artifact's bytes, read without importing torch."""
    env = {"compiler_revision": COMPILER_REVISION}
    for dist in ("torch", "diffusers", "transformers", "safetensors"):
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
    lock: Lock
    base: LockEntry
    checkpoint: LockEntry | None
    plan: BuildPlan
    key: str
    environment: dict[str, str]

    def where(self, role: str) -> str:
        return f"{self.recipe.path}: {role}"

    def fetch(self) -> tuple[Fetched, Fetched | None]:
        """The build's inputs as local files (downloading what the store lacks)."""
        r = self.recipe
        # With a checkpoint the base only gives configs and tokenizers: its weights are never read.
        base = fetch_entry(self.base, self.where("base"), self.ctx, r.precision, configs_only=bool(self.checkpoint))
        ckpt = self.checkpoint and fetch_entry(
            self.checkpoint, self.where("checkpoint"), self.ctx, r.precision, allow_pickle=r.allow_pickle
        )
        return base, ckpt or None

    def check_checkpoint(self, fetched: Fetched) -> None:
        """The checkpoint's header says which family it is; it must be the base's (and CivitAI's)."""
        assert self.checkpoint is not None
        (path,) = fetched.files.values()
        found = detect_file(path)
        log.info("checkpoint detected as %s %s (%s)", found.family, found.kind, "; ".join(found.evidence))
        check_checkpoint(found, self.plan.family, self.where("checkpoint"), _civitai_base_model(self.checkpoint))


def _civitai_base_model(entry: LockEntry) -> str | None:
    meta = entry.meta
    return meta.get("base_model") or (meta.get("civitai") or {}).get("base_model")


def prepare(argv: list[str]) -> Prepared:
    composed = compose(argv)
    recipe = parse_recipe(composed.name, composed.path, composed.fields, civitai_hosts())
    store = Store(composed.home)
    ctx = Context.from_env(store)
    lock = lock_sources(recipe, composed.lock, ctx)
    base_entry = lock.sources[str(recipe.base)]
    ckpt_entry = lock.sources[str(recipe.checkpoint)] if recipe.checkpoint is not None else None
    where = f"{recipe.path}: "
    base = describe_pipeline(base_entry, where + "base", recipe.precision, configs_only=ckpt_entry is not None)
    ckpt = describe_file(ckpt_entry, where + "checkpoint") if ckpt_entry is not None else None
    variant = None if ckpt else diffusers_variant(base_entry, recipe.precision)
    plan = make_plan(recipe, base, variant, ckpt)
    env = environment()
    return Prepared(recipe, store, ctx, lock, base_entry, ckpt_entry, plan, cache_key(plan, env), env)


def build(argv: list[str]) -> Path:
    t0 = time.perf_counter()
    p = prepare(argv)
    store, plan, key = p.store, p.plan, p.key
    hit = store.lookup(key)
    if hit is not None:
        _record(store, plan.recipe, key, hit)
        log.info("cache hit %s (%.2f s)", key, time.perf_counter() - t0)
        return hit

    with store.building(key) as staging:
        if staging is None:  # another compile finished it while we waited
            hit = store.artifact_dir(key)
        else:
            log.info("building %s for recipe %s", key, plan.recipe)
            base, ckpt = p.fetch()  # before torch loads: a failed download costs no import
            if ckpt is not None:
                p.check_checkpoint(ckpt)
            # Imported here: torch and diffusers load only when something must be built.
            from compiler.materialize import materialize
            from compiler.package import package

            components = materialize(plan, staging, base, store.scratch(), ckpt)
            provenance = {role: _provenance(p.lock.sources[str(src)]) for role, src in p.recipe.sources().items()}
            package(staging, plan, key, components, p.environment, provenance)
            hit = store.publish(staging, key)
            log.info("built %s in %.1f s", hit, time.perf_counter() - t0)
    _record(store, plan.recipe, key, hit)
    return hit


def _provenance(entry: LockEntry) -> str:
    return entry.pin if entry.kind == "builtin" else f"{entry.source} {entry.pin}"


def _record(store: Store, name: str, key: str, artifact: Path) -> None:
    current = read_name(store.home, name)
    if current is not None and current.current.cache_key == key:
        return  # already current: a cache hit writes nothing
    digest = json.loads((artifact / READY).read_text())["content_digest"]
    store.record_name(name, key, digest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        sys.stderr.write(USAGE)
        return 0
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("UIW_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    debug = os.environ.get("UIW_DEBUG") == "1"
    try:
        # Libraries that print (progress bars, warnings) must not pollute the one-line stdout.
        with contextlib.redirect_stdout(sys.stderr):
            path = build(argv)
    except UserError as e:
        if debug:
            log.exception("user error")
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; nothing was published\n")
        return 130
    except Exception as e:
        log.error("internal error: %s: %s", type(e).__name__, e, exc_info=True)
        return 1
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()
    return 0

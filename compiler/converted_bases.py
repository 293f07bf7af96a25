"""The converted-base cache: a single-file checkpoint converted to diffusers' layout once, kept in
the store by what decides its bytes, so that a rebuild whose other inputs changed (a LoRA's scale,
an embedding, the scheduler) loads it with ``from_pretrained`` instead of converting the file again.

    <store>/converted/v1/<key>/
      pipeline/    save_pretrained layout, safetensors only: the base as converted, before adapters
      entry.json   what it was converted from, and every file's size and sha256
      READY        written last; no READY, not an entry

Published like artifacts: built in a staging folder beside its final place under a per-key file
lock, renamed into place once READY is written. Artifacts stay self-contained: files whose bytes an
artifact shares with its converted base are hard links to the same inode (``link_identical``), so
``gc`` may drop an entry without touching any artifact. An artifact records the entry it came from
in its manifest's provenance (``PROVENANCE_ROLE``), which is what ``gc`` keeps entries by.

Torch-free: the compiler's cache-hit path and the store commands import it; the caller passes the
conversion, load and save steps in.
"""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from compiler.plan import BuildPlan
from runtime.artifact import PIPELINE_DIR, READY, fsync_path, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

CONVERTED_SUBDIR = "converted/v1"
ENTRY = "entry.json"
PROVENANCE_ROLE = "converted"  # manifest.provenance[PROVENANCE_ROLE] = "converted/v1/<key>"
# Bump by hand when the compiler converts the same inputs into other bytes (another converter
# call, another post-conversion fix-up). Independent of COMPILER_REVISION: a change to what is
# built on top of the base does not invalidate the conversions.
CONVERTED_REVISION = "1"
# The libraries whose code writes the converted bytes (the converter, the model classes and their
# save format); peft and the compiler's own revision only touch what is built on top.
CONVERTER_LIBRARIES = ("torch", "diffusers", "transformers", "safetensors")
# What a damaged entry raises when loaded (a truncated or garbled safetensors file, a bad config).
# (safetensors' own SafetensorError is added where it is imported.)
LOAD_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, RuntimeError, KeyError)


def converted_key(plan: BuildPlan, environment: dict[str, str]) -> str | None:
    """sha256 of what decides a whole-pipeline single-file conversion, or None when the plan has
    none (a diffusers base, or a UNet-only file that joins one: its conversion is one component).

    In it: the checkpoint's bytes, the config repo's bytes (the configs and tokenizer it is
    converted with), the pipeline class and family (which converter runs), the detected kind and
    the build precision (converted straight to it), and the converter's library versions. Not in
    it: the prediction type, the scheduler, adapters and the recipe's name, all applied after the
    conversion, so recipes that differ only there share one entry."""
    if plan.checkpoint is None or plan.checkpoint_kind != "checkpoint":
        return None
    payload = {
        "revision": CONVERTED_REVISION,
        "checkpoint": plan.checkpoint,
        "checkpoint_inputs": sorted(list(i) for i in plan.checkpoint_inputs),
        "kind": plan.checkpoint_kind,
        "configs": plan.base,
        "configs_inputs": sorted(list(i) for i in plan.base_inputs),
        "family": plan.family,
        "pipeline_class": plan.pipeline_class,
        "precision": plan.precision,
        "libraries": {lib: environment.get(lib) for lib in CONVERTER_LIBRARIES},
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def provenance_value(key: str) -> str:
    return f"{CONVERTED_SUBDIR}/{key}"


def key_of(provenance: dict[str, str]) -> str | None:
    """The converted entry an artifact's manifest provenance names, if any."""
    value = provenance.get(PROVENANCE_ROLE)
    if value is None or not value.startswith(CONVERTED_SUBDIR + "/"):
        return None
    return value.removeprefix(CONVERTED_SUBDIR + "/")


class ConvertedStore:
    """``<home>/converted/v1``: lookup, fill under a lock, publish, discard."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.root = self.home / CONVERTED_SUBDIR
        self.locks = self.home / "locks"

    def path(self, key: str) -> Path:
        return self.root / key

    def entries(self) -> dict[str, Path]:
        """Every published entry (READY present), by key."""
        if not self.root.is_dir():
            return {}
        return {p.name: p for p in sorted(self.root.iterdir()) if (p / READY).is_file()}

    def staging_dirs(self) -> list[Path]:
        """Unfinished fills: staging folders and final folders without READY."""
        if not self.root.is_dir():
            return []
        return [p for p in sorted(self.root.iterdir()) if p.is_dir() and not (p / READY).is_file()]

    def lock(self, key: str) -> FileLock:
        self.locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.locks / f"converted-{key}.lock"))

    def lookup(self, key: str) -> Path | None:
        """The entry's folder if it is published and whole: READY, its record readable, every
        recorded file present at its recorded size (a stat each; ``verify`` re-hashes)."""
        d = self.path(key)
        if not (d / READY).is_file():
            return None
        problem = self._damage(d)
        if problem is not None:
            log.warning("converted base %s is damaged (%s); it is converted again", key, problem)
            return None
        return d

    def _damage(self, d: Path) -> str | None:
        try:
            files = json.loads((d / ENTRY).read_text())["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"{ENTRY}: {e}"
        for rel, info in files.items():
            p = d / rel
            if not p.is_file():
                return f"{rel} is missing"
            if p.stat().st_size != info["size"]:
                return f"{rel} has {p.stat().st_size} bytes, {info['size']} recorded"
        return None

    def verify(self, key: str) -> list[str]:
        """Every recorded file re-hashed: the problems found (none: the entry is whole)."""
        d = self.path(key)
        problem = self._damage(d)
        if problem is not None:
            return [problem]
        files = json.loads((d / ENTRY).read_text())["files"]
        bad = [rel for rel, info in files.items() if sha256_file(d / rel) != info["sha256"]]
        return [f"{rel} does not hash to its recorded sha256" for rel in bad]

    def discard(self, key: str) -> None:
        """Remove a damaged entry (READY first, so no reader takes it for whole meanwhile)."""
        d = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            (d / READY).unlink()
        shutil.rmtree(d, ignore_errors=True)

    @contextlib.contextmanager
    def filling(self, key: str) -> Iterator[Path | None]:
        """Hold the key's lock and yield a fresh staging folder, or None if another compile
        published the entry while we waited."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self.lock(key):
            if self.lookup(key) is not None:
                yield None
                return
            # Under the lock nobody else fills this key: leftovers of a killed fill are garbage.
            for stale in self.root.glob(f".staging-{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            self.discard(key)
            staging = self.root / f".staging-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            try:
                yield staging
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # gone already when published

    def publish(self, staging: Path, key: str, about: dict[str, Any]) -> Path:
        """Record every file's size and sha256 (fsynced), READY last, then rename into place."""
        files = {}
        for p in sorted(staging.rglob("*")):
            if p.is_file():
                fsync_path(p)
                files[p.relative_to(staging).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        write_json_atomic(staging / ENTRY, {"key": key, **about, "files": files})
        write_json_atomic(staging / READY, {"key": key})
        final = self.path(key)
        os.replace(staging, final)
        fsync_path(final.parent)
        return final


@dataclass(frozen=True)
class ConvertedBase:
    """One plan's converted base: where it is (or goes) in the store, and what it came from."""

    store: ConvertedStore
    key: str
    about: dict[str, str]  # recorded in entry.json: the checkpoint, configs, family, precision

    @property
    def folder(self) -> Path:
        return self.store.path(self.key) / PIPELINE_DIR

    def load_or_convert(
        self,
        convert: Callable[[], Any],
        load: Callable[[Path], Any],
        save: Callable[[Any, Path], None],
    ) -> Any:
        """The converted pipeline: loaded from the entry (``load``) on a hit; on a miss converted
        (``convert``), saved into a new entry (``save``) and loaded back from it, so that a build
        continues from the same bytes whichever way it went (cold and warm builds give one
        artifact). A damaged entry is discarded and converted again."""
        from safetensors import SafetensorError

        errors: tuple[type[Exception], ...] = (*LOAD_ERRORS, SafetensorError)
        t0 = time.perf_counter()
        if self.store.lookup(self.key) is not None:
            try:
                pipe = load(self.folder)
            except errors as e:
                log.warning("converted base %s does not load (%s); converting again", self.key, str(e)[:200])
                with self.store.lock(self.key):
                    self.store.discard(self.key)
            else:
                log.info("converted base: hit %s (loaded in %.2f s)", self.key, time.perf_counter() - t0)
                return pipe
        with self.store.filling(self.key) as staging:
            if staging is not None:
                log.info("converted base: miss %s; converting the single file", self.key)
                pipe = convert()
                save(pipe, staging / PIPELINE_DIR)
                del pipe
                self.store.publish(staging, self.key, self.about)
                log.info("converted base: stored %s (%.1f s)", self.key, time.perf_counter() - t0)
            else:
                log.info("converted base: hit %s (filled by another compile meanwhile)", self.key)
        return load(self.folder)


def link_identical(source: Path, target: Path) -> int:
    """Replace each file under ``target`` whose bytes equal the file at the same relative path
    under ``source`` by a hard link to it (one copy on disk, as DESIGN asks for shared bytes).
    Returns the bytes shared. Byte comparison stops at the first difference, so a component the
    build changed (a fused LoRA) costs one read of its first differing chunk. Where links are not
    possible (another filesystem), the copies stay."""
    shared = 0
    for dst in sorted(target.rglob("*")):
        src = source / dst.relative_to(target)
        if not dst.is_file() or dst.is_symlink() or not src.is_file():
            continue
        if src.stat().st_size != dst.stat().st_size or src.stat().st_ino == dst.stat().st_ino:
            continue
        if not filecmp.cmp(src, dst, shallow=False):
            continue
        tmp = dst.with_name(f".{dst.name}.link-{uuid.uuid4().hex[:8]}")
        try:
            os.link(src, tmp)
        except OSError as e:
            log.info("kept a copy of %s (no hard link: %s)", dst, e)
            continue
        os.replace(tmp, dst)
        shared += dst.stat().st_size
    return shared

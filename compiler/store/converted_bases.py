"""The store's side of converted single-file bases: ``<home>/converted/v1/<key>/`` entries, found,
filled under a lock, published, verified and discarded (``compiler.converted_bases`` decides the
key and runs the conversion).

    <store>/converted/v1/<key>/
      pipeline/    save_pretrained layout, safetensors only: the base as converted, before adapters
      entry.json   what it was converted from, and every file's size and sha256
      READY        written last; no READY, not an entry

Published like artifacts (``compiler.store.staging``). Artifacts stay self-contained: files whose
bytes an artifact shares with its converted base are hard links to the same inode
(``link_identical``), so ``gc`` may drop an entry without touching any artifact. An artifact
records the entry it came from in its manifest's provenance (``PROVENANCE_ROLE``), which is what
``gc`` keeps entries by. Not to be confused with ``blobs/converted``: the pickle -> safetensors
markers of ``compiler.pickles``.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from filelock import FileLock

from compiler.store.layout import CONVERTED_BASES_SUBDIR, converted_lock_name, file_lock
from compiler.store.staging import publish_staged, staged
from runtime.artifact import READY, fsync_path, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

ENTRY = "entry.json"
PROVENANCE_ROLE = "converted"  # manifest.provenance[PROVENANCE_ROLE] = "converted/v1/<key>"
ABOUT_FIELDS = ("checkpoint", "configs", "family", "precision")  # what entry.json says it came from


def provenance_value(key: str) -> str:
    return f"{CONVERTED_BASES_SUBDIR}/{key}"


def key_of(provenance: dict[str, str]) -> str | None:
    """The converted entry an artifact's manifest provenance names, if any."""
    value = provenance.get(PROVENANCE_ROLE)
    if value is None or not value.startswith(CONVERTED_BASES_SUBDIR + "/"):
        return None
    return value.removeprefix(CONVERTED_BASES_SUBDIR + "/")


class ConvertedBaseStore:
    """``<home>/converted/v1``: lookup, fill under a lock, publish, verify, discard."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.root = self.home / CONVERTED_BASES_SUBDIR

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
        return file_lock(self.home, converted_lock_name(key))

    def about(self, key: str) -> dict[str, Any]:
        """What an entry was converted from (its entry.json, without the file list)."""
        try:
            about = json.loads((self.path(key) / ENTRY).read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in about.items() if k in ABOUT_FIELDS}

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

    def filling(self, key: str) -> contextlib.AbstractContextManager[Path | None]:
        """Hold the key's lock and yield a fresh staging folder, or None if another compile
        published the entry while we waited."""
        return staged(self.root, key, self.lock(key), lambda: self.lookup(key) is not None)

    def publish(self, staging: Path, key: str, about: dict[str, Any]) -> Path:
        """Record every file's size and sha256 (fsynced), READY last, then rename into place."""
        files = {}
        for p in sorted(staging.rglob("*")):
            if p.is_file():
                fsync_path(p)
                files[p.relative_to(staging).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        write_json_atomic(staging / ENTRY, {"key": key, **about, "files": files})
        write_json_atomic(staging / READY, {"key": key})
        return publish_staged(staging, self.path(key))


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

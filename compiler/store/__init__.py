"""The artifact store: ``artifacts/v1/<cache_key>/``, ``names/<recipe>.json``, build locks.

Publishing is atomic: a build writes into a staging folder beside its final place and renames it
there once ``READY`` is written, so a reader sees a whole artifact or none. A per-key file lock
makes two concurrent compiles of one recipe build it once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from runtime.artifact import (
    ARTIFACTS_SUBDIR,
    READY,
    NameFile,
    NameRecord,
    artifact_path,
    fsync_path,
    names_path,
    read_name,
    write_json_atomic,
)

log = logging.getLogger(__name__)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Store:
    def __init__(self, home: Path):
        self.home = Path(home)
        self.artifacts = self.home / ARTIFACTS_SUBDIR
        self.locks = self.home / "locks"

    # --- blobs: blobs/sha256/<hex>, shared by every recipe -------------------------------------

    def blob_path(self, hex_digest: str) -> Path:
        return self.home / "blobs" / "sha256" / hex_digest

    def partial_path(self, name: str) -> Path:
        """Where an interrupted download keeps its bytes until it resumes (same filesystem as the
        blobs, so the final rename is atomic)."""
        return self.home / "blobs" / "partial" / f"{name}.part"

    @contextlib.contextmanager
    def blob_lock(self, name: str) -> Iterator[None]:
        """Held while a blob is fetched: a second compile wanting the same bytes waits, then finds
        the blob in place instead of downloading it again."""
        self.locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.locks / f"blob-{name}.lock")):
            yield

    def scratch(self) -> Path:
        """A fresh private folder for build inputs (symlinked snapshots); the caller removes it."""
        d = self.home / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def artifact_dir(self, key: str) -> Path:
        return artifact_path(self.home, key)

    def lookup(self, key: str) -> Path | None:
        """The finished artifact for a key, or None. Only stats READY: touches no file."""
        d = self.artifact_dir(key)
        return d if (d / READY).is_file() else None

    @contextlib.contextmanager
    def building(self, key: str) -> Iterator[Path | None]:
        """Hold the key's build lock and yield a fresh staging folder, or None if another process
        finished the same artifact while we waited for the lock."""
        self.locks.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.locks / f"{key}.lock")):
            if self.lookup(key) is not None:
                yield None
                return
            # Under the lock nobody else builds this key: staging folders left by a killed build
            # (and a final folder without READY) are garbage.
            for stale in self.artifacts.glob(f".staging-{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            final = self.artifact_dir(key)
            if final.exists():
                shutil.rmtree(final)
            staging = self.artifacts / f".staging-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            try:
                yield staging
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # gone already when published

    def publish(self, staging: Path, key: str) -> Path:
        """Rename a staged artifact (READY already inside) to its final place."""
        if not (staging / READY).is_file():
            raise RuntimeError(f"{staging}: refusing to publish without {READY}")
        final = self.artifact_dir(key)
        os.replace(staging, final)
        fsync_path(final.parent)
        return final

    def record_name(self, name: str, key: str, digest: str) -> None:
        """Point names/<name>.json at an artifact, keeping the previous ones as history. Leaves the
        file untouched when it already points there."""
        self.locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.locks / f"name-{name}.lock")):
            old = read_name(self.home, name)
            if old is not None and old.current.cache_key == key:
                return
            record = NameRecord(cache_key=key, content_digest=digest, published_at=utc_now())
            history = () if old is None else (old.current, *old.history)
            new = NameFile(name=name, current=record, history=history)
            write_json_atomic(names_path(self.home, name), new.model_dump(mode="json"))
            log.info("name %s -> %s", name, key)

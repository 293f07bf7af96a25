"""The artifact store: ``artifacts/v1/<cache_key>/``, ``names/<recipe>.json``, build locks.

Publishing is atomic: a build writes into a staging folder beside its final place and renames it
there once ``READY`` is written, so a reader sees a whole artifact or none. A per-key file lock
makes two concurrent compiles of one recipe build it once. A finished artifact found damaged (its
files are not what its manifest lists) is set aside under that lock and built again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock

from runtime.artifact import (
    ARTIFACTS_SUBDIR,
    READY,
    NameFile,
    NameRecord,
    artifact_path,
    fsync_path,
    memo_path,
    names_path,
    read_name,
    write_json_atomic,
    write_text_atomic,
)

DAMAGED_SUBDIR = "damaged"  # <home>/damaged/<cache_key>-<time>/: damaged artifacts, kept to look at; gc removes them

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
    def building(self, key: str, problems: Callable[[Path], list[str]] | None = None) -> Iterator[Path | None]:
        """Hold the key's build lock and yield a fresh staging folder, or None if another process
        finished the same artifact while we waited for the lock. ``problems`` checks a finished
        artifact found there: one with problems is set aside and built again."""
        self.locks.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.locks / f"{key}.lock")):
            if (found := self.lookup(key)) is not None:
                # Checked again under the lock: another compile may have rebuilt it meanwhile.
                damage = problems(found) if problems is not None else []
                if not damage:
                    yield None
                    return
                self.set_aside(key, damage)
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

    def set_aside(self, key: str, problems: list[str]) -> Path:
        """Move a damaged artifact out of artifacts/ (READY removed first: a worker resolving it
        meanwhile sees no artifact rather than a damaged one), with a note of what was wrong.
        Call under the key's build lock."""
        final = self.artifact_dir(key)
        (final / READY).unlink(missing_ok=True)
        memo_path(final).unlink(missing_ok=True)
        aside = self.home / DAMAGED_SUBDIR / f"{key}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(final, aside)
        write_text_atomic(aside / "PROBLEMS.txt", "".join(f"{p}\n" for p in problems))
        log.warning("artifact %s is damaged (%s); moved to %s and rebuilding", key, "; ".join(problems), aside)
        return aside

    def publish(self, staging: Path, key: str) -> Path:
        """Rename a staged artifact (READY already inside) to its final place."""
        if not (staging / READY).is_file():
            raise RuntimeError(f"{staging}: refusing to publish without {READY}")
        final = self.artifact_dir(key)
        os.replace(staging, final)
        fsync_path(final.parent)
        return final

    def trim_history(self, name: str, keep: int, dry_run: bool = False) -> tuple[NameRecord, ...]:
        """Keep the ``keep`` newest entries of the name's history (what a rollback can return to);
        return the dropped ones. ``dry_run``: only say what would go."""
        self.locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.locks / f"name-{name}.lock")):
            old = read_name(self.home, name)
            if old is None or len(old.history) <= keep:
                return ()
            if not dry_run:
                new = NameFile(name=name, current=old.current, history=old.history[:keep])
                write_json_atomic(names_path(self.home, name), new.model_dump(mode="json"))
                log.info("name %s: history trimmed to %d", name, keep)
            return old.history[keep:]

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

"""The artifact store: ``artifacts/v1/<cache_key>/``, ``names/<recipe>.json``, blobs, build locks
(``compiler.store.layout`` names every folder and lock under the home).

Publishing is atomic: a build writes into a staging folder beside its final place and renames it
there once ``READY`` is written, so a reader sees a whole artifact or none. A per-key file lock
makes two concurrent compiles of one recipe build it once. A finished artifact found damaged (its
files are not what its manifest lists) is set aside under that lock and built again.

Storage only: nothing here imports a stage that decides or builds (the layering test holds it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock

from compiler.store.layout import (
    BLOBS_SUBDIR,
    DAMAGED_SUBDIR,
    PARTIAL_SUBDIR,
    PICKLE_MARKERS_SUBDIR,
    SCRATCH_SUBDIR,
    blob_lock_name,
    build_lock_name,
    file_lock,
    name_lock_name,
)
from compiler.store.staging import publish_staged, staged
from runtime.artifact import (
    ARTIFACTS_SUBDIR,
    READY,
    NameFile,
    NameRecord,
    artifact_path,
    names_path,
    read_name,
    write_json_atomic,
    write_text_atomic,
)
from runtime.integrity import memo_path

log = logging.getLogger(__name__)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Store:
    def __init__(self, home: Path):
        self.home = Path(home)
        self.artifacts = self.home / ARTIFACTS_SUBDIR

    # --- blobs: blobs/sha256/<hex>, shared by every recipe -------------------------------------

    def blob_path(self, hex_digest: str) -> Path:
        return self.home / BLOBS_SUBDIR / hex_digest

    def pickle_marker(self, source_hex: str) -> Path:
        """Where the sha256 of a pickled checkpoint's safetensors blob is noted, by the pickle's
        own sha256 (``compiler.pickles`` converts each pickle once)."""
        return self.home / PICKLE_MARKERS_SUBDIR / source_hex

    def partial_path(self, name: str) -> Path:
        """Where an interrupted download keeps its bytes until it resumes (same filesystem as the
        blobs, so the final rename is atomic)."""
        return self.home / PARTIAL_SUBDIR / f"{name}.part"

    @contextlib.contextmanager
    def blob_lock(self, name: str) -> Iterator[None]:
        """Held while a blob is fetched: a second compile wanting the same bytes waits, then finds
        the blob in place instead of downloading it again."""
        with file_lock(self.home, blob_lock_name(name)):
            yield

    def scratch(self) -> Path:
        """A fresh private folder for build inputs (symlinked snapshots); the caller removes it."""
        d = self.home / SCRATCH_SUBDIR / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def artifact_dir(self, key: str) -> Path:
        return artifact_path(self.home, key)

    def lookup(self, key: str) -> Path | None:
        """The finished artifact for a key, or None. Only stats READY: touches no file."""
        d = self.artifact_dir(key)
        return d if (d / READY).is_file() else None

    def build_lock(self, key: str) -> FileLock:
        """Held while the key's artifact is built (and while a damaged one is set aside)."""
        return file_lock(self.home, build_lock_name(key))

    @contextlib.contextmanager
    def building(self, key: str, problems: Callable[[Path], list[str]] | None = None) -> Iterator[Path | None]:
        """Hold the key's build lock and yield a fresh staging folder, or None if another process
        finished the same artifact while we waited for the lock. ``problems`` checks a finished
        artifact found there: one with problems is set aside and built again."""

        def finished() -> bool:
            # Checked again under the lock: another compile may have rebuilt it meanwhile.
            if (found := self.lookup(key)) is None:
                return False
            damage = problems(found) if problems is not None else []
            if damage:
                self.set_aside(key, damage)
            return not damage

        with staged(self.artifacts, key, self.build_lock(key), finished) as staging:
            yield staging

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
        return publish_staged(staging, self.artifact_dir(key))

    def name_lock(self, name: str) -> FileLock:
        return file_lock(self.home, name_lock_name(name))

    def trim_history(self, name: str, keep: int, dry_run: bool = False) -> tuple[NameRecord, ...]:
        """Keep the ``keep`` newest entries of the name's history (what a rollback can return to);
        return the dropped ones. ``dry_run``: only say what would go."""
        with self.name_lock(name):
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
        with self.name_lock(name):
            old = read_name(self.home, name)
            if old is not None and old.current.cache_key == key:
                return
            record = NameRecord(cache_key=key, content_digest=digest, published_at=utc_now())
            history = () if old is None else (old.current, *old.history)
            new = NameFile(name=name, current=record, history=history)
            write_json_atomic(names_path(self.home, name), new.model_dump(mode="json"))
            log.info("name %s -> %s", name, key)

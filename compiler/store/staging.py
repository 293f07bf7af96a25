"""Build beside the final place, under a per-key lock, and rename into place: what artifacts and
converted bases both do, so that a reader sees a whole entry or none and two compiles of one key
build it once."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock

from runtime.artifact import READY, fsync_path

STAGING_PREFIX = ".staging-"


def key_of_folder(folder: Path) -> str:
    """The key a staging folder (``.staging-<key>-<pid>-<rand>``) or final folder belongs to."""
    return folder.name.removeprefix(STAGING_PREFIX).split("-")[0]


@contextlib.contextmanager
def staged(root: Path, key: str, lock: FileLock, finished: Callable[[], bool]) -> Iterator[Path | None]:
    """Hold ``lock`` and yield a fresh staging folder beside ``root/key``, or None when
    ``finished()``, asked under the lock, says a usable entry is there (another compile made it
    while we waited). The folder is removed on the way out (gone already when published)."""
    root.mkdir(parents=True, exist_ok=True)
    with lock:
        if finished():
            yield None
            return
        # Under the lock nobody else builds this key: staging folders left by a killed build, and a
        # final folder without a usable entry, are garbage. READY goes first, so that no reader
        # takes what is left for whole meanwhile.
        for stale in root.glob(f"{STAGING_PREFIX}{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = root / key
        (final / READY).unlink(missing_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        staging = root / f"{STAGING_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def publish_staged(staging: Path, final: Path) -> Path:
    """Rename a finished staging folder (READY inside) to its final place, durably."""
    os.replace(staging, final)
    fsync_path(final.parent)
    return final

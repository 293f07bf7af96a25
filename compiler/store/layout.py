"""Where everything lives under a store's home, and its file locks: the one place that spells the
store's on-disk names.

    <home>/artifacts/v1/<cache_key>/   artifacts (runtime.artifact owns their layout)
    <home>/names/<recipe>.json         a recipe name -> its current artifact, with history
    <home>/aliases/<alias>.json        public names with weighted routes
    <home>/blobs/sha256/<hex>          every fetched input file, by its sha256
    <home>/blobs/partial/<name>.part   interrupted downloads, resumed by the next fetch
    <home>/blobs/converted/<hex>       pickle -> safetensors markers: a pickled checkpoint's sha256
                                       names the file holding the sha256 of its safetensors blob
                                       (compiler.pickles); not the converted single-file bases
    <home>/converted/v1/<key>/         converted single-file bases (compiler.store.converted_bases)
    <home>/damaged/<key>-<time>/       damaged artifacts set aside by a compile; gc removes them
    <home>/tmp/                        private build scratch folders
    <home>/locks/*.lock                file locks (names below)
"""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout

from runtime.artifact import DEFAULT_HOME

BLOBS_SUBDIR = "blobs/sha256"
PARTIAL_SUBDIR = "blobs/partial"
# The on-disk name predates the converted bases; old stores hold markers there, so it stays.
PICKLE_MARKERS_SUBDIR = "blobs/converted"
CONVERTED_BASES_SUBDIR = "converted/v1"
DAMAGED_SUBDIR = "damaged"
SCRATCH_SUBDIR = "tmp"
LOCKS_SUBDIR = "locks"


def default_home() -> Path:
    """The store ``UIW_HOME`` names, else ``DEFAULT_HOME``."""
    return Path(os.path.expanduser(os.environ.get("UIW_HOME", DEFAULT_HOME)))


# Lock file names, one per thing that is written under a lock (the build lock of an artifact is the
# bare cache key: stores written by earlier compilers hold it under that name).
def build_lock_name(key: str) -> str:
    return key


def blob_lock_name(name: str) -> str:
    return f"blob-{name}"


def name_lock_name(recipe: str) -> str:
    return f"name-{recipe}"


def alias_lock_name(alias: str) -> str:
    return f"alias-{alias}"


def converted_lock_name(key: str) -> str:
    return f"converted-{key}"


def file_lock(home: Path, name: str) -> FileLock:
    """The lock ``<home>/locks/<name>.lock`` (its folder made when missing)."""
    locks = Path(home) / LOCKS_SUBDIR
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{name}.lock"))


def held(lock: FileLock) -> bool:
    """Whether another process holds the lock now (taken and released at once when it is free)."""
    try:
        with lock.acquire(timeout=0):
            return False
    except Timeout:
        return True

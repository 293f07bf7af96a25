"""Remote bytes -> blobs/sha256/<hex>: one download per blob however many compiles want it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from compiler.lockfile import LockedFile
from compiler.sources.base import Context
from compiler.sources.download import download


def fetch_pinned(
    ctx: Context,
    locked: LockedFile,
    url: str,
    headers: Mapping[str, str],
    label: str,
) -> Path:
    """The blob for a locked file, downloading it under the blob's lock if it is not there yet."""
    dest = ctx.store.blob_path(locked.hex)
    if dest.is_file():
        return dest
    with ctx.store.blob_lock(locked.hex):
        if not dest.is_file():  # whoever held the lock before us may have fetched it
            download(
                url,
                headers,
                dest,
                ctx.store.partial_path(locked.hex),
                expected_sha256=locked.hex,
                expected_size=locked.size,
                label=label,
                policy=ctx.policy,
            )
    return dest


def fetch_unpinned(ctx: Context, url: str, headers: Mapping[str, str], label: str) -> tuple[str, int, Path]:
    """Download bytes whose hash is not known yet (lock time: small configs, unpinned URLs), store
    them as a blob and return (sha256 hex, size, blob path)."""
    name = "url-" + hashlib.sha256(url.encode()).hexdigest()
    with ctx.store.blob_lock(name):
        # No resume across runs here: with no pin to check against, bytes left by an earlier run
        # might be of another version of the file and would poison the pin.
        ctx.store.partial_path(name).unlink(missing_ok=True)
        tmp = ctx.store.partial_path(name).with_suffix(".done")
        found = download(
            url,
            headers,
            tmp,
            ctx.store.partial_path(name),
            expected_sha256=None,
            expected_size=None,
            label=label,
            policy=ctx.policy,
        )
        dest = ctx.store.blob_path(found)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    return found, dest.stat().st_size, dest

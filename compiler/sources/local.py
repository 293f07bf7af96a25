"""Local files and folders: pinned by the sha256 of every file they hold, used in place.

Hashing multi-GB checkpoints on every compile would dominate a no-op rebuild, so a memo keyed by
``(path, size, mtime_ns, inode)`` remembers each file's sha256; any change to the file changes the key
and it is hashed again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from compiler import uri
from compiler.errors import UserError
from compiler.lockfile import LockedFile, LockEntry
from compiler.sources import hf
from compiler.sources.base import Context, Fetched
from runtime.artifact import sha256_file, write_json_atomic

SKIP_DIRS = {".git", ".cache", "__pycache__", ".huggingface"}


class HashMemo:
    def __init__(self, path: Path):
        self.path = path
        self._data: dict[str, dict[str, int | str]] | None = None
        self._dirty = False

    def _load(self) -> dict[str, dict[str, int | str]]:
        if self._data is None:
            try:
                self._data = json.loads(self.path.read_text())
            except (FileNotFoundError, ValueError):
                self._data = {}
        return self._data

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
        data = self._load()
        hit = data.get(str(path))
        if hit is not None and all(hit.get(k) == v for k, v in key.items()):
            return str(hit["sha256"])
        digest = sha256_file(path)
        data[str(path)] = {**key, "sha256": digest}
        self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            try:  # merge with what other compiles wrote meanwhile
                merged = {**json.loads(self.path.read_text()), **(self._data or {})}
            except (FileNotFoundError, ValueError):
                merged = dict(self._data or {})
            write_json_atomic(self.path, merged)
        self._dirty = False


def memo(ctx: Context) -> HashMemo:
    return HashMemo(ctx.store.home / "memo" / "local-sha256.json")


def _listing(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def inventory(source: uri.LocalSource, where: str, ctx: Context) -> LockEntry:
    path = source.path
    m = memo(ctx)
    try:
        if path.is_file():
            digest = m.sha256(path)
            return LockEntry(
                source=str(source),
                kind="file",
                pin=f"sha256:{digest}",
                files=(LockedFile(path=path.name, sha256=f"sha256:{digest}", size=path.stat().st_size),),
            )
        if path.is_dir():
            listing = {p.relative_to(path).as_posix(): p for p in _listing(path)}
            odd = sorted(n for n, p in listing.items() if not p.is_file())
            if odd:  # hashing a FIFO would block forever
                raise UserError.one(
                    where,
                    f"the folder {path} holds {len(odd)} entries that are not regular files (FIFOs, sockets, "
                    f"devices or broken links), e.g. {', '.join(odd[:3])}",
                    "remove them from the model folder; only regular files are read",
                )
            meta: dict[str, Any] = {}
            if "model_index.json" in listing:  # a diffusers folder: pin what a pipeline load reads
                index = json.loads(listing["model_index.json"].read_text())
                listing = {n: listing[n] for n in hf.select_files(index, listing, where)}
                configs = {n: json.loads(p.read_text()) for n, p in listing.items() if n.endswith("config.json")}
                meta = hf.pipeline_meta(index, configs)
            files = tuple(
                LockedFile(path=n, sha256=f"sha256:{m.sha256(p)}", size=p.stat().st_size, variant=hf.variant_of(n))
                for n, p in listing.items()
            )
            if not files:
                raise UserError.one(where, f"the folder {path} holds no files", "point at a diffusers pipeline folder")
            from runtime.artifact import FileEntry, content_digest

            digest = content_digest(tuple(FileEntry(path=f.path, sha256=f.hex, size=f.size) for f in files))
            meta["variants"] = sorted({f.variant for f in files if f.variant})
            return LockEntry(source=str(source), kind="folder", pin=f"sha256:{digest}", files=files, meta=meta)
    finally:
        m.save()
    if path.exists():
        raise UserError.one(
            where,
            f"{path} is not a regular file or folder (a FIFO, socket or device): it is never read",
            "name the model file itself, or a folder of them",
        )
    raise UserError.one(
        where,
        f"no such file or folder: {path}",
        "relative paths are relative to the recipe file; check the path or use an absolute one",
    )


def fetch(entry: LockEntry, where: str, ctx: Context, wanted: tuple[str, ...]) -> Fetched:
    """Check that the files still hold the locked bytes (memo-fast) and use them in place."""
    src = uri.parse(entry.source)
    assert isinstance(src, uri.LocalSource)
    root = src.path if entry.kind == "folder" else src.path.parent
    m = memo(ctx)
    files: dict[str, Path] = {}
    changed = []
    try:
        for name in wanted:
            locked = entry.file(name)
            p = root / name
            if not p.is_file():
                changed.append(f"{p}: missing")
            elif m.sha256(p) != locked.hex:
                changed.append(f"{p}: sha256 is now {m.sha256(p)}, locked {locked.hex}")
            files[name] = p
    finally:
        m.save()
    if changed:
        raise UserError.one(
            where,
            "local files changed since they were locked:\n    " + "\n    ".join(changed),
            "run with lock=update (or lock=auto) to pin the new contents, or restore the files",
        )
    return Fetched(source=entry.source, kind=entry.kind, files=files, root=root if entry.kind == "folder" else None)

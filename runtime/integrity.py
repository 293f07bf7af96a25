"""Integrity: what a load, a cache hit or ``store verify`` checks before it trusts an artifact's
files (their stat against a memo, their sha256 against the manifest)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from runtime.artifact import (
    MANIFEST,
    ArtifactError,
    FileEntry,
    Manifest,
    content_digest,
    sha256_file,
    write_json_atomic,
)

log = logging.getLogger(__name__)

# Full hashing costs about a second per GB (bench/verify_cost.py). The memo, beside the artifact
# folder (memo_path: the folder itself stays exactly what was built), records for each file the
# stat it had when it last hashed to the manifest's sha256 (the compiler writes it as it
# publishes): a file whose size, mtime, ctime and inode are all unchanged is taken as verified. A
# write changes mtime and ctime (ctime cannot be set back by a user), a replacement the inode, a
# truncation the size; what the memo cannot see is a change below the filesystem (bit rot):
# `store verify` and UIW_VERIFY=full hash regardless.

VERIFIED_DIR = ".verified"  # <artifacts>/.verified/<cache_key>.json; a dot: never taken for an artifact
VerifyMode = Literal["memo", "full", "off"]
VERIFY_MODES: tuple[VerifyMode, ...] = ("memo", "full", "off")


class IntegrityError(ArtifactError):
    """An artifact whose files are not what its manifest lists (missing, resized, other bytes)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileStamp(_Frozen):
    """A file's stat, with the sha256 it hashed to at that stat."""

    path: str
    sha256: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


class VerifiedMemo(_Frozen):
    content_digest: str
    files: tuple[FileStamp, ...]


def stat_files(artifact_dir: Path, manifest: Manifest) -> tuple[dict[str, FileStamp], list[str]]:
    """Each file's stamp now, and what stat alone shows wrong (a missing file, another size, a file
    list that does not add up to the content digest). Reads no file's bytes."""
    stamps: dict[str, FileStamp] = {}
    problems = []
    if content_digest(manifest.files) != manifest.content_digest:
        problems.append(f"{MANIFEST}: the file list does not hash to content_digest {manifest.content_digest}")
    for entry in manifest.files:
        try:
            st = (Path(artifact_dir) / entry.path).stat()
        except OSError:
            problems.append(f"{entry.path}: missing")
            continue
        if st.st_size != entry.size:
            problems.append(f"{entry.path}: {st.st_size} bytes, the manifest says {entry.size}")
            continue
        stamps[entry.path] = FileStamp(
            path=entry.path,
            sha256=entry.sha256,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            inode=st.st_ino,
        )
    return stamps, problems


def unverified(
    artifact_dir: Path, manifest: Manifest, stamps: dict[str, FileStamp], mode: VerifyMode
) -> list[FileEntry]:
    """The files to hash before the artifact is trusted: none when ``off``, all when ``full``, and
    with the memo those whose stamp differs from the one recorded when they last hashed right."""
    if mode == "off":
        return []
    memo = read_memo(artifact_dir, manifest) if mode == "memo" else {}
    return [e for e in manifest.files if memo.get(e.path) != stamps.get(e.path)]


def hash_mismatch(artifact_dir: Path, entry: FileEntry) -> str | None:
    """Hash one file; the problem (naming the file, the expected and the found sha256) or None."""
    try:
        found = sha256_file(Path(artifact_dir) / entry.path)
    except OSError as e:
        return f"{entry.path}: unreadable ({e})"
    return None if found == entry.sha256 else f"{entry.path}: sha256 {found}, the manifest says {entry.sha256}"


def memo_path(artifact_dir: Path) -> Path:
    artifact_dir = Path(artifact_dir)
    return artifact_dir.parent / VERIFIED_DIR / f"{artifact_dir.name}.json"


def read_memo(artifact_dir: Path, manifest: Manifest) -> dict[str, FileStamp]:
    """The memo's stamps of this manifest's files (a memo left by other contents vouches for nothing)."""
    try:
        memo = VerifiedMemo.model_validate_json(memo_path(artifact_dir).read_bytes())
    except (OSError, ValidationError):
        return {}
    if memo.content_digest != manifest.content_digest:
        return {}
    expected = {e.path: e.sha256 for e in manifest.files}
    return {s.path: s for s in memo.files if expected.get(s.path) == s.sha256}


def remember_verified(artifact_dir: Path, manifest: Manifest, stamps: dict[str, FileStamp]) -> None:
    """Record the stamps (taken before the files were hashed: a change during hashing then shows as
    a different stamp next time). Best effort: a read-only store keeps hashing on every load."""
    memo = VerifiedMemo(content_digest=manifest.content_digest, files=tuple(stamps[p] for p in sorted(stamps)))
    try:
        # Not fsynced (a tenth of a second on a busy disk, on every load that hashed): a memo
        # lost in a crash only costs the next load its hashing.
        write_json_atomic(memo_path(artifact_dir), memo.model_dump(mode="json"), durable=False)
    except OSError as e:
        log.debug("%s: memo not written (%s); the next load hashes again", artifact_dir, e)


def check_artifact(artifact_dir: Path, manifest: Manifest, mode: VerifyMode = "memo") -> list[str]:
    """Stat every file, hash those the memo does not vouch for (``mode``), refresh the memo when all
    is well; return the problems. Synchronous: the runtime's load hashes in a thread instead
    (runtime.fastload.Verifier)."""
    stamps, problems = stat_files(artifact_dir, manifest)
    if problems or mode == "off":
        return problems
    pending = unverified(artifact_dir, manifest, stamps, mode)
    problems = [p for entry in pending if (p := hash_mismatch(artifact_dir, entry)) is not None]
    if pending and not problems:
        remember_verified(artifact_dir, manifest, stamps)
    return problems


def integrity_error(artifact_dir: Path, manifest: Manifest, problems: list[str]) -> IntegrityError:
    return IntegrityError(
        f"{artifact_dir}: damaged artifact of recipe {manifest.recipe} ({manifest.cache_key[:12]}), not served: "
        f"{'; '.join(problems)}. hint: recompile the recipe (`python -m compiler recipe={manifest.recipe}` with "
        "the same UIW_HOME): the compiler finds the damage and rebuilds it; `python -m compiler.store verify` "
        "checks the whole store."
    )


def verify_files(artifact_dir: Path, manifest: Manifest) -> list[str]:
    """Re-hash every file, whatever the memo says; return the problems (empty when the artifact is
    intact). What ``store verify`` runs: the only check that also catches bytes that rotted in
    place (the stat the memo records cannot see those). An intact artifact's memo is refreshed."""
    stamps, problems = stat_files(artifact_dir, manifest)
    if problems:
        return problems
    problems = [p for entry in manifest.files if (p := hash_mismatch(artifact_dir, entry)) is not None]
    if not problems:
        remember_verified(artifact_dir, manifest, stamps)
    return problems

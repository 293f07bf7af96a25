"""What a store holds, read in one pass: finished artifacts, names, blobs and converted bases; and
the checks ``verify`` runs over them (artifacts through ``runtime.integrity.verify_files``, the one
artifact check)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from compiler.store.converted_bases import ConvertedBaseStore, key_of
from compiler.store.layout import BLOBS_SUBDIR
from runtime.artifact import (
    ARTIFACTS_SUBDIR,
    NAMES_SUBDIR,
    READY,
    ArtifactError,
    Manifest,
    NameFile,
    read_manifest,
    sha256_file,
)
from runtime.integrity import verify_files

log = logging.getLogger("compiler.store")


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def manifest_or_none(path: Path) -> Manifest | None:
    """An artifact's manifest, or None (with a warning) when it cannot be read."""
    try:
        return read_manifest(path)
    except ArtifactError as e:
        log.warning("%s", e)
        return None


@dataclass(frozen=True)
class Inventory:
    home: Path
    artifacts: dict[str, Path]  # cache key -> folder (READY ones)
    names: dict[str, NameFile]
    blobs: dict[str, Path]  # sha256 hex -> file
    converted: dict[str, Path]  # converted-base key -> folder (READY ones)

    @classmethod
    def read(cls, home: Path) -> Inventory:
        arts = home / ARTIFACTS_SUBDIR
        artifacts = {p.name: p for p in sorted(arts.iterdir()) if (p / READY).is_file()} if arts.is_dir() else {}
        names = {}
        for p in sorted((home / NAMES_SUBDIR).glob("*.json")):
            try:
                names[p.stem] = NameFile.model_validate_json(p.read_text())
            except ValueError as e:
                log.warning("%s: unreadable name file (%s)", p, e)
        bdir = home / BLOBS_SUBDIR
        blobs = {p.name: p for p in sorted(bdir.iterdir()) if p.is_file()} if bdir.is_dir() else {}
        return cls(home, artifacts, names, blobs, ConvertedBaseStore(home).entries())

    def converted_users(self) -> dict[str, list[str]]:
        """Converted-base key -> the artifacts (cache keys) that came from it."""
        users: dict[str, list[str]] = {}
        for key, path in self.artifacts.items():
            m = manifest_or_none(path)
            base = key_of(m.provenance) if m else None
            if base is not None:
                users.setdefault(base, []).append(key)
        return users

    def artifact_problems(self, keys: list[str] | dict[str, Path]) -> list[str]:
        """Each listed artifact's files re-hashed against its manifest: the problems found."""
        bad: list[str] = []
        for key in keys:
            m = manifest_or_none(self.artifacts[key])
            if m is None:
                bad.append(f"artifact {key}: unreadable manifest")
                continue
            bad += [f"artifact {key}: {problem}" for problem in verify_files(self.artifacts[key], m)]
        return bad

    def blob_and_converted_problems(self) -> list[str]:
        """Every blob re-hashed against its name, every converted base against its entry.json."""
        bad = [f"blob {hex_}: bytes hash to something else" for hex_, p in self.blobs.items() if sha256_file(p) != hex_]
        converted = ConvertedBaseStore(self.home)
        return bad + [f"converted {k}: {problem}" for k in self.converted for problem in converted.verify(k)]

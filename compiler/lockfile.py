"""The lockfile: every source of a recipe pinned to immutable bytes. Pure: models, canonical JSON and
the drift check; reading and writing the file is the caller's (cli) business.

``recipes/NAME.lock.json`` is meant to be committed: it is canonical (sorted keys, no timestamps,
no host names or tokens), so the same pins give the same bytes on every machine. Each entry pins
*everything* any precision of the recipe may need (fp32 files and fp16 variants alike), so a
command-line ``precision=fp16`` never rewrites it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

LOCK_VERSION = 1
LockMode = Literal["auto", "locked", "frozen", "update"]
LOCK_MODES: tuple[str, ...] = ("auto", "locked", "frozen", "update")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LockedFile(_Frozen):
    path: str  # inside the repo/folder; the file name for single files
    sha256: str  # "sha256:<hex>"
    size: int | None  # None where the service gives no exact byte count (CivitAI: sizeKB)
    variant: str | None = None  # e.g. "fp16" for diffusers variant files
    # Where to fetch it, relative to the service's configured root where one exists (HF and CivitAI:
    # the endpoint is a setting, not part of the pin). Absolute only for plain URL sources.
    url: str | None = None

    @property
    def hex(self) -> str:
        return self.sha256.removeprefix("sha256:")


class LockEntry(_Frozen):
    source: str  # the normalised source string, also the key in Lock.sources
    kind: Literal["builtin", "repo", "file", "folder"]
    pin: str  # scheme-prefixed: "commit:…", "civitai-version:…", "sha256:…", "builtin:…"
    files: tuple[LockedFile, ...] = ()
    # Facts the plan needs, recorded so that `lock=frozen` makes no metadata calls: family hints,
    # pipeline class, native size, CivitAI baseModel and AIR, the repo and resolved revision.
    meta: dict[str, Any] = Field(default_factory=dict)

    def file(self, path: str) -> LockedFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


class Lock(_Frozen):
    lock_version: int = LOCK_VERSION
    recipe: str
    sources: dict[str, LockEntry] = Field(default_factory=dict)


def dumps(lock: Lock) -> str:
    """Canonical text: sorted keys, two-space indent, one trailing newline. Same lock, same bytes."""
    return json.dumps(lock.model_dump(mode="json"), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def loads(text: str) -> Lock:
    return Lock.model_validate_json(text)


@dataclass(frozen=True)
class Drift:
    added: tuple[str, ...]  # in the recipe, not in the lock
    removed: tuple[str, ...]  # in the lock, not in the recipe
    changed: tuple[str, ...] = ()  # local sources whose bytes are no longer the locked ones

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self) -> str:
        lines = [f"  + {s} (in the recipe, not locked)" for s in self.added]
        lines += [f"  - {s} (locked, no longer in the recipe)" for s in self.removed]
        lines += [f"  ~ {s} (its bytes changed since they were locked)" for s in self.changed]
        return "\n".join(lines)


def drift(lock: Lock | None, wanted: tuple[str, ...]) -> Drift:
    have = set(lock.sources) if lock else set()
    return Drift(
        added=tuple(sorted(set(wanted) - have)),
        removed=tuple(sorted(have - set(wanted))),
    )


def with_entries(lock: Lock | None, recipe: str, entries: dict[str, LockEntry], keep: tuple[str, ...]) -> Lock:
    """A new lock holding ``keep``'s entries: fresh ones from ``entries``, the rest from ``lock``."""
    old = lock.sources if lock else {}
    return Lock(recipe=recipe, sources={s: entries[s] if s in entries else old[s] for s in sorted(keep)})

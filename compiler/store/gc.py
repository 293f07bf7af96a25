"""What ``gc`` may remove from a store, and the removal itself.

Kept: every artifact a name points at, currently and in its history (``Store.trim_history`` first
trims it where asked, so that what was dropped can go), every artifact an alias routes to (current
routes and the alias's own history), every blob such an artifact was built from
(``manifest.inputs``), every converted single-file base such an artifact came from
(``manifest.provenance["converted"]``), and every blob a lockfile in the given recipe folders pins.
Everything else under ``artifacts/``, ``blobs/``, ``tmp/``, stale partial downloads, damaged
artifacts the compiler set aside and verification memos of artifacts that are gone goes.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from compiler.lockfile import loads
from compiler.store.alias import alias_keys
from compiler.store.converted_bases import ConvertedBaseStore
from compiler.store.inventory import Inventory, manifest_or_none
from compiler.store.layout import DAMAGED_SUBDIR, PARTIAL_SUBDIR, SCRATCH_SUBDIR, build_lock_name, file_lock, held
from compiler.store.staging import key_of_folder
from runtime.artifact import ARTIFACTS_SUBDIR, READY
from runtime.integrity import VERIFIED_DIR

log = logging.getLogger("compiler.store")
PARTIAL_MAX_AGE_S = 24 * 3600  # younger partial downloads may belong to a running compile


@dataclass(frozen=True)
class Sweep:
    """What a gc removes, and how much it keeps."""

    doomed: tuple[Path, ...]
    kept_artifacts: int
    kept_blobs: int
    kept_converted: int


def lock_blobs(dirs: Iterable[Path]) -> set[str]:
    """Every blob a lockfile in these folders pins."""
    keep: set[str] = set()
    for d in dirs:
        for p in sorted(d.glob("*.lock.json")):
            try:
                lock = loads(p.read_text())
            except ValueError:
                log.warning("%s: not a lockfile; its blobs are not protected", p)
                continue
            keep |= {f.hex for e in lock.sources.values() for f in e.files}
    return keep


def sweep(inv: Inventory, recipe_dirs: list[Path]) -> Sweep:
    """What nothing kept references (see the module's docstring)."""
    home = inv.home
    keep_art = {nf.current.cache_key for nf in inv.names.values()}
    keep_art |= {h.cache_key for nf in inv.names.values() for h in nf.history}
    keep_art |= alias_keys(home)  # what an alias routes to, now or in its history (rollback)
    keep_blobs = lock_blobs(recipe_dirs)
    for key in keep_art & set(inv.artifacts):
        m = manifest_or_none(inv.artifacts[key])
        keep_blobs |= set(m.inputs) if m else set()
    doomed: list[Path] = [p for k, p in inv.artifacts.items() if k not in keep_art]
    doomed += [p for h, p in inv.blobs.items() if h not in keep_blobs]
    # A build loads its converted base before its artifact exists to name it: a gc in between may
    # drop the entry, which costs that build its links and the next one a conversion, nothing more.
    users = inv.converted_users()
    keep_converted = {k for k in inv.converted if set(users.get(k, ())) & keep_art}
    doomed += [p for k, p in inv.converted.items() if k not in keep_converted]
    doomed += _unfinished(home)
    # Memos of artifacts that are gone or going (a memo of a key rebuilt later vouches for nothing:
    # its stamps name other inodes).
    staying = set(inv.artifacts) - {p.name for p in doomed}
    memos = home / ARTIFACTS_SUBDIR / VERIFIED_DIR
    if memos.is_dir():
        doomed += [p for p in memos.glob("*.json") if p.stem not in staying]
    if (home / DAMAGED_SUBDIR).is_dir():  # set aside by a compile that found them damaged, then rebuilt
        doomed += sorted((home / DAMAGED_SUBDIR).iterdir())
    now = time.time()
    for sub in (PARTIAL_SUBDIR, SCRATCH_SUBDIR):
        d = home / sub
        if d.is_dir():
            doomed += [p for p in d.iterdir() if now - p.stat().st_mtime > PARTIAL_MAX_AGE_S]
    kept = len(keep_art & set(inv.artifacts)), len(keep_blobs & set(inv.blobs)), len(keep_converted)
    return Sweep(tuple(doomed), *kept)


def _unfinished(home: Path) -> list[Path]:
    """Converted-base fills and artifact builds without READY whose key's lock nobody holds (a
    running build or fill holds it)."""
    converted = ConvertedBaseStore(home)
    doomed = [p for p in converted.staging_dirs() if not held(converted.lock(key_of_folder(p)))]
    arts = home / ARTIFACTS_SUBDIR
    if arts.is_dir():
        doomed += [
            p
            for p in arts.iterdir()
            if p.is_dir()
            and p.name != VERIFIED_DIR
            and not (p / READY).is_file()
            and not held(file_lock(home, build_lock_name(key_of_folder(p))))
        ]
    return doomed


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def tidy(home: Path) -> None:
    """Remove the memo and damaged folders once nothing is left in them."""
    for empty in (home / ARTIFACTS_SUBDIR / VERIFIED_DIR, home / DAMAGED_SUBDIR):
        with contextlib.suppress(OSError):
            empty.rmdir()

"""The store's commands: list, show a recipe's lock and plan, verify hashes, collect garbage.

What is kept by ``gc``: every artifact a name points at (current or in its history, so rollbacks
keep working), every blob such an artifact was built from (``manifest.inputs``), every converted
single-file base such an artifact came from (``manifest.provenance["converted"]``), and every blob a
lockfile in the given recipe folders pins. Everything else under ``artifacts/``, ``blobs/``,
``tmp/`` and stale partial downloads goes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.converted import ConvertedStore, key_of
from compiler.errors import UserError
from runtime.artifact import (
    NAMES_SUBDIR,
    READY,
    ArtifactError,
    Manifest,
    NameFile,
    content_digest,
    read_manifest,
    sha256_file,
)

log = logging.getLogger("compiler.store")
PARTIAL_MAX_AGE_S = 24 * 3600  # younger partial downloads may belong to a running compile


def default_home() -> Path:
    return Path(os.path.expanduser(os.environ.get("UIW_HOME", "~/.cache/uiw")))


@dataclass(frozen=True)
class Inventory:
    artifacts: dict[str, Path]  # cache key -> folder (READY ones)
    names: dict[str, NameFile]
    blobs: dict[str, Path]  # sha256 hex -> file
    converted: dict[str, Path]  # converted-base key -> folder (READY ones)

    @classmethod
    def read(cls, home: Path) -> Inventory:
        arts = home / "artifacts" / "v1"
        artifacts = {p.name: p for p in sorted(arts.iterdir()) if (p / READY).is_file()} if arts.is_dir() else {}
        names = {}
        for p in sorted((home / NAMES_SUBDIR).glob("*.json")):
            try:
                names[p.stem] = NameFile.model_validate_json(p.read_text())
            except ValueError as e:
                log.warning("%s: unreadable name file (%s)", p, e)
        bdir = home / "blobs" / "sha256"
        blobs = {p.name: p for p in sorted(bdir.iterdir()) if p.is_file()} if bdir.is_dir() else {}
        return cls(artifacts, names, blobs, ConvertedStore(home).entries())

    def converted_users(self) -> dict[str, list[str]]:
        """Converted-base key -> the artifacts (cache keys) that came from it."""
        users: dict[str, list[str]] = {}
        for key, path in self.artifacts.items():
            m = _manifest(path)
            base = key_of(m.provenance) if m else None
            if base is not None:
                users.setdefault(base, []).append(key)
        return users


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _manifest(path: Path) -> Manifest | None:
    try:
        return read_manifest(path)
    except ArtifactError as e:
        log.warning("%s", e)
        return None


def cmd_ls(home: Path, as_json: bool) -> int:
    inv = Inventory.read(home)
    named: dict[str, list[str]] = {}
    for name, nf in inv.names.items():
        named.setdefault(nf.current.cache_key, []).append(name)
    rows: list[dict[str, Any]] = []
    for key, path in inv.artifacts.items():
        m = _manifest(path)
        rows.append(
            {
                "cache_key": key,
                "recipe": m.recipe if m else None,
                "family": m.family if m else None,
                "dtype": m.runtime.dtype if m else None,
                "bytes": _size(path),
                "created_at": m.created_at if m else None,
                "names": sorted(named.get(key, [])),
            }
        )
    names = {
        n: {"current": nf.current.cache_key, "history": [h.cache_key for h in nf.history]}
        for n, nf in inv.names.items()
    }
    blob_bytes = sum(p.stat().st_size for p in inv.blobs.values())
    users = inv.converted_users()
    converted = [
        {"key": k, "bytes": _size(p), "artifacts": sorted(users.get(k, [])), **_about(p)}
        for k, p in inv.converted.items()
    ]
    if as_json:
        print(
            json.dumps(
                {
                    "home": str(home),
                    "artifacts": rows,
                    "names": names,
                    "blobs": {"count": len(inv.blobs), "bytes": blob_bytes},
                    "converted": converted,
                },
                indent=2,
            )
        )
        return 0
    print(f"store {home}")
    print(f"artifacts ({len(rows)}):")
    for r in rows:
        print(
            f"  {r['cache_key'][:16]}  {r['recipe'] or '?':<20} {r['family'] or '?':<6} {r['dtype'] or '?':<5} "
            f"{r['bytes'] / 2**20:9.1f} MiB  {r['created_at'] or ''}  {' '.join(r['names'])}"
        )
    print(f"names ({len(names)}):")
    for n, v in names.items():
        print(f"  {n} -> {v['current'][:16]}" + (f"  (history: {len(v['history'])})" if v["history"] else ""))
    print(f"blobs: {len(inv.blobs)} files, {blob_bytes / 2**20:.1f} MiB")
    print(f"converted single-file bases ({len(converted)}):")
    for c in converted:
        print(
            f"  {c['key'][:16]}  {c.get('family', '?'):<6} {c.get('precision', '?'):<5} {c['bytes'] / 2**20:9.1f} MiB  "
            f"used by {len(c['artifacts'])} artifacts"
        )
    return 0


def _about(entry: Path) -> dict[str, Any]:
    """What a converted base was converted from (its entry.json, without the file list)."""
    try:
        about = json.loads((entry / "entry.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in about.items() if k in ("checkpoint", "configs", "family", "precision")}


def cmd_show(overrides: list[str]) -> int:
    """The recipe's lock and build plan as the compiler would use them, without any network call
    (lock=frozen) and without building anything."""
    from compiler.cli import prepare
    from compiler.compose import compose
    from compiler.locking import lock_path, read_lock

    composed = compose(overrides)
    lock = read_lock(lock_path(composed.path))
    out: dict[str, Any] = {
        "recipe": composed.name,
        "file": str(composed.path),
        "lockfile": str(lock_path(composed.path)),
    }
    out["lock"] = lock.model_dump(mode="json") if lock else None
    try:
        p = prepare([*overrides, "lock=frozen"])
    except UserError as e:
        if "lock=frozen" not in str(e):
            raise
        out.update(plan=None, cache_key=None, built=None, note="not fully locked yet; compile once (lock=auto) to pin")
    else:
        built = p.store.lookup(p.key)
        out.update(plan=p.plan.canonical(), cache_key=p.key, built=str(built) if built else None)
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def cmd_fetch(overrides: list[str]) -> int:
    """Lock the recipe and download what a build at its precision reads, without building: a
    Docker layer or a CI cache can hold the weights before any compile runs."""
    from compiler.cli import prepare

    p = prepare(overrides)
    base, ckpt = p.fetch()
    for f in (base, ckpt):
        if f is not None:
            for name, path in f.files.items():
                print(f"{f.source}  {name}  {path}")
    return 0


def cmd_verify(home: Path, keys: list[str]) -> int:
    inv = Inventory.read(home)
    bad: list[str] = []
    targets = {k: inv.artifacts[k] for k in keys} if keys else inv.artifacts
    for key, path in targets.items():
        m = _manifest(path)
        if m is None:
            bad.append(f"artifact {key}: unreadable manifest")
            continue
        for f in m.files:
            p = path / f.path
            if not p.is_file():
                bad.append(f"artifact {key}: missing {f.path}")
            elif sha256_file(p) != f.sha256:
                bad.append(f"artifact {key}: {f.path} does not hash to {f.sha256}")
        if content_digest(m.files) != m.content_digest:
            bad.append(f"artifact {key}: content digest mismatch")
    if not keys:
        for digest, p in inv.blobs.items():
            if sha256_file(p) != digest:
                bad.append(f"blob {digest}: bytes hash to something else")
        converted = ConvertedStore(home)
        bad += [f"converted {k}: {problem}" for k in inv.converted for problem in converted.verify(k)]
    for line in bad:
        print(f"BAD {line}")
    checked = f"{len(targets)} artifacts" + (
        "" if keys else f", {len(inv.blobs)} blobs, {len(inv.converted)} converted"
    )
    print(f"verified {checked}: {'all good' if not bad else f'{len(bad)} problems'}")
    if bad:
        print("hint: delete the bad artifact or blob (or run gc) and compile again; it is rebuilt or refetched")
    return 1 if bad else 0


def _lock_blobs(dirs: Iterable[Path]) -> set[str]:
    from compiler.lock import loads

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


def cmd_gc(home: Path, recipe_dirs: list[Path], dry_run: bool) -> int:
    inv = Inventory.read(home)
    keep_art = {nf.current.cache_key for nf in inv.names.values()}
    keep_art |= {h.cache_key for nf in inv.names.values() for h in nf.history}
    from compiler.store.alias import alias_keys

    keep_art |= alias_keys(home)  # what an alias routes to, now or in its history (rollback)
    keep_blobs = _lock_blobs(recipe_dirs)
    for key in keep_art & set(inv.artifacts):
        m = _manifest(inv.artifacts[key])
        keep_blobs |= set(m.inputs) if m else set()
    doomed: list[Path] = [p for k, p in inv.artifacts.items() if k not in keep_art]
    doomed += [p for h, p in inv.blobs.items() if h not in keep_blobs]
    # A build loads its converted base before its artifact exists to name it: a gc in between may
    # drop the entry, which costs that build its links and the next one a conversion, nothing more.
    users = inv.converted_users()
    keep_converted = {k for k in inv.converted if set(users.get(k, ())) & keep_art}
    doomed += [p for k, p in inv.converted.items() if k not in keep_converted]
    # unfinished fills (no READY) whose key's lock nobody holds
    doomed += [p for p in ConvertedStore(home).staging_dirs() if not _filling(home, p)]
    arts = home / "artifacts" / "v1"
    if arts.is_dir():  # unfinished builds: no READY (a running build holds its key's lock)
        doomed += [p for p in arts.iterdir() if p.is_dir() and not (p / READY).is_file() and not _busy(home, p)]
    now = time.time()
    for sub in ("blobs/partial", "tmp"):
        d = home / sub
        if d.is_dir():
            doomed += [p for p in d.iterdir() if now - p.stat().st_mtime > PARTIAL_MAX_AGE_S]
    freed = 0
    for p in doomed:
        size = _size(p)
        freed += size
        print(f"{'would remove' if dry_run else 'removed'} {p} ({size / 2**20:.1f} MiB)")
        if not dry_run:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    print(
        f"{'would free' if dry_run else 'freed'} {freed / 2**20:.1f} MiB; kept {len(keep_art & set(inv.artifacts))} "
        f"artifacts, {len(keep_blobs & set(inv.blobs))} blobs and {len(keep_converted)} converted bases"
    )
    return 0


def _busy(home: Path, staging: Path) -> bool:
    """A staging folder whose key's build lock is held belongs to a running compile."""
    from filelock import FileLock, Timeout

    key = staging.name.removeprefix(".staging-").split("-")[0]
    try:
        with FileLock(str(home / "locks" / f"{key}.lock"), timeout=0):
            return False
    except Timeout:
        return True


def _filling(home: Path, folder: Path) -> bool:
    """A converted-base folder without READY whose key's lock is held is being filled."""
    from filelock import Timeout

    key = folder.name.removeprefix(".staging-").split("-")[0]
    try:
        with ConvertedStore(home).lock(key).acquire(timeout=0):
            return False
    except Timeout:
        return True


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m compiler.store", description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=None, help="the store (default: env UIW_HOME or ~/.cache/uiw)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_ls = sub.add_parser("ls", help="list artifacts, names and blobs")
    p_ls.add_argument("--json", action="store_true")
    p_show = sub.add_parser("show", help="a recipe's lock and build plan: show recipe=NAME [overrides]")
    p_show.add_argument("overrides", nargs="+")
    p_fetch = sub.add_parser("fetch", help="lock a recipe and download its inputs without building: fetch recipe=NAME")
    p_fetch.add_argument("overrides", nargs="+")
    p_verify = sub.add_parser("verify", help="re-hash artifacts (and blobs) against their manifests and names")
    p_verify.add_argument("keys", nargs="*")
    p_gc = sub.add_parser("gc", help="remove what no name, artifact or lockfile references")
    p_gc.add_argument(
        "--recipes",
        type=Path,
        action="append",
        default=None,
        help="folders whose *.lock.json pins are kept (default: env UIW_RECIPES or ./recipes)",
    )
    p_gc.add_argument("--dry-run", action="store_true")
    p_alias = sub.add_parser(
        "alias",
        help="public names for workers: alias set NAME TARGET[=WEIGHT]... | alias rollback NAME | alias show NAME",
    )
    p_alias.add_argument("action", choices=("set", "rollback", "show"))
    p_alias.add_argument("name")
    p_alias.add_argument("targets", nargs="*", help="set: recipe names or cache keys, each with an optional =WEIGHT")
    args = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("UIW_LOG_LEVEL", "WARNING"))
    home = (args.home or default_home()).expanduser().resolve()
    try:
        if args.cmd == "ls":
            return cmd_ls(home, args.json)
        if args.cmd == "show":
            overrides = args.overrides + ([f"home={args.home}"] if args.home else [])
            return cmd_show(overrides)
        if args.cmd == "fetch":
            logging.getLogger("compiler").setLevel(logging.INFO)
            return cmd_fetch(args.overrides + ([f"home={args.home}"] if args.home else []))
        if args.cmd == "verify":
            return cmd_verify(home, args.keys)
        if args.cmd == "alias":
            from compiler.store.alias import cmd_alias

            return cmd_alias(home, args.action, args.name, args.targets)
        dirs = args.recipes or [Path(os.environ.get("UIW_RECIPES", "recipes"))]
        return cmd_gc(home, [d for d in dirs if d.is_dir()], args.dry_run)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyError as e:
        sys.stderr.write(f"error: no artifact {e} in {home}\n  hint: python -m compiler.store ls\n")
        return 2

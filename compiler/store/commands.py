"""The store's commands: list, show a recipe's lock and plan, verify hashes, collect garbage.

A name's history (``names/<recipe>.json``) holds every artifact the name pointed at before its
current one, newest first: what ``alias``-free rollbacks return to. What is kept by ``gc``: every
artifact a name points at, currently and in its history (``--keep-history N`` first trims each
name's history to its N newest entries, so that what was dropped can go), every artifact an alias
routes to (current routes and the alias's own history), every blob such an artifact was built from
(``manifest.inputs``), every converted single-file base such an artifact came from
(``manifest.provenance["converted"]``), and every blob a lockfile in the given recipe folders pins.
Everything else under ``artifacts/``, ``blobs/``, ``tmp/``, stale partial downloads, damaged
artifacts the compiler set aside and verification memos of artifacts that are gone.
"""

from __future__ import annotations

import argparse
import contextlib
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

from compiler.converted_bases import ConvertedStore, key_of
from compiler.errors import UserError
from compiler.store import DAMAGED_SUBDIR, Store
from runtime.artifact import (
    ARTIFACTS_SUBDIR,
    NAMES_SUBDIR,
    READY,
    VERIFIED_DIR,
    ArtifactError,
    Manifest,
    NameFile,
    read_manifest,
    sha256_file,
    verify_files,
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
        arts = home / ARTIFACTS_SUBDIR
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


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def settings(m: Manifest) -> dict[str, str]:
    """What an artifact was built with, as flat ``field: value`` pairs named as a recipe names them
    where it does (precision, scheduler, defaults.steps, loras, ...): two artifacts of one recipe
    differ in some of these."""
    out: dict[str, str] = {}
    data = {
        "precision": m.runtime.dtype,
        "scheduler": m.serving.scheduler,
        "defaults": m.serving.defaults.model_dump(mode="json"),
        "limits": m.serving.limits.model_dump(mode="json"),
        "runtime": m.runtime.model_dump(mode="json", exclude={"dtype"}),
        "tasks": list(m.capabilities.tasks),
        "loras": [x.model_dump(mode="json") for x in m.loras],
        "embeddings": [x.model_dump(mode="json") for x in m.embeddings],
        "controlnets": [x.model_dump(mode="json") for x in m.controlnets],
        "sources": m.provenance,
        "environment": m.environment,
    }
    _flat("", data, out)
    return out


def differences(manifests: dict[str, Manifest]) -> dict[str, dict[str, str]]:
    """cache key -> the settings in which it differs from another artifact of the same recipe
    (with its own values); empty for a recipe's only artifact."""
    by_recipe: dict[str, list[str]] = {}
    for key, m in manifests.items():
        by_recipe.setdefault(m.recipe, []).append(key)
    out: dict[str, dict[str, str]] = {key: {} for key in manifests}
    for keys in by_recipe.values():
        if len(keys) < 2:
            continue
        each = {k: settings(manifests[k]) for k in keys}
        fields = sorted({f for v in each.values() for f in v})
        varying = [f for f in fields if len({each[k].get(f) for k in keys}) > 1]
        for k in keys:
            out[k] = {f: each[k].get(f, "(none)") for f in varying}
    return out


def cmd_ls(home: Path, as_json: bool) -> int:
    inv = Inventory.read(home)
    named: dict[str, list[str]] = {}
    history_of: dict[str, list[str]] = {}  # cache key -> "name~N": the name's N-th previous artifact
    for name, nf in inv.names.items():
        named.setdefault(nf.current.cache_key, []).append(name)
        for i, h in enumerate(nf.history, 1):
            history_of.setdefault(h.cache_key, []).append(f"{name}~{i}")
    manifests = {key: m for key, path in inv.artifacts.items() if (m := _manifest(path)) is not None}
    differs = differences(manifests)
    rows: list[dict[str, Any]] = []
    for key, path in inv.artifacts.items():
        m = manifests.get(key)
        rows.append(
            {
                "cache_key": key,
                "recipe": m.recipe if m else None,
                "family": m.family if m else None,
                "dtype": m.runtime.dtype if m else None,
                "scheduler": m.serving.scheduler if m else None,
                "bytes": _size(path),
                "created_at": m.created_at if m else None,
                "names": sorted(named.get(key, [])),
                "history_of": sorted(history_of.get(key, [])),
                "differs": differs.get(key, {}),
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
    print(f"artifacts ({len(rows)}; names: current, name~N: the name's N-th previous artifact, kept for rollback):")
    for r in rows:
        tags = " ".join([*r["names"], *r["history_of"]])
        print(
            f"  {r['cache_key'][:16]}  {r['recipe'] or '?':<20} {r['family'] or '?':<6} {r['dtype'] or '?':<5} "
            f"{r['scheduler'] or '?':<18} {r['bytes'] / 2**20:9.1f} MiB  {r['created_at'] or ''}  {tags}"
        )
        if r["differs"]:
            print("      differs: " + ", ".join(f"{k}={v}" for k, v in r["differs"].items()))
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
    from compiler.pinning import lock_path, read_lock

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
    unknown = [k for k in keys if k not in inv.artifacts]
    if unknown:
        raise UserError.one(
            "store verify",
            f"no finished artifact {', '.join(unknown)} in {home / ARTIFACTS_SUBDIR}",
            "give full cache keys as `python -m compiler.store ls --json` lists them, or none to verify everything",
        )
    targets = {k: inv.artifacts[k] for k in keys} if keys else inv.artifacts
    for key, path in targets.items():
        m = _manifest(path)
        if m is None:
            bad.append(f"artifact {key}: unreadable manifest")
            continue
        bad += [f"artifact {key}: {problem}" for problem in verify_files(path, m)]
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
        print("hint: compile the recipe again: a damaged artifact is set aside and rebuilt, a damaged blob refetched")
    return 1 if bad else 0


def _lock_blobs(dirs: Iterable[Path]) -> set[str]:
    from compiler.lockfile import loads

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


def cmd_gc(home: Path, recipe_dirs: list[Path], dry_run: bool, keep_history: int | None = None) -> int:
    inv = Inventory.read(home)
    if keep_history is not None:
        store = Store(home)
        for name in inv.names:
            dropped = store.trim_history(name, keep_history, dry_run)
            if dropped:
                keys = ", ".join(h.cache_key[:16] for h in dropped)
                print(f"{'would trim' if dry_run else 'trimmed'} names/{name}.json history to {keep_history}: {keys}")
        if not dry_run:
            inv = Inventory.read(home)
        else:  # as if trimmed
            inv = Inventory(
                inv.artifacts,
                {n: nf.model_copy(update={"history": nf.history[:keep_history]}) for n, nf in inv.names.items()},
                inv.blobs,
                inv.converted,
            )
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
    arts = home / ARTIFACTS_SUBDIR
    if arts.is_dir():  # unfinished builds: no READY (a running build holds its key's lock)
        doomed += [
            p
            for p in arts.iterdir()
            if p.is_dir() and p.name != VERIFIED_DIR and not (p / READY).is_file() and not _busy(home, p)
        ]
    # Memos of artifacts that are gone or going (a memo of a key rebuilt later vouches for nothing:
    # its stamps name other inodes).
    staying = set(inv.artifacts) - {p.name for p in doomed}
    if (arts / VERIFIED_DIR).is_dir():
        doomed += [p for p in (arts / VERIFIED_DIR).glob("*.json") if p.stem not in staying]
    if (home / DAMAGED_SUBDIR).is_dir():  # set aside by a compile that found them damaged, then rebuilt
        doomed += sorted((home / DAMAGED_SUBDIR).iterdir())
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
    if not dry_run:
        for empty in (arts / VERIFIED_DIR, home / DAMAGED_SUBDIR):  # only when nothing is left in them
            with contextlib.suppress(OSError):
                empty.rmdir()
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
    p_gc.add_argument(
        "--keep-history",
        type=int,
        metavar="N",
        default=None,
        help="first trim each name's history (its previous artifacts, kept for rollback) to the N newest; "
        "default: keep all history",
    )
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
        if args.keep_history is not None and args.keep_history < 0:
            raise UserError.one("gc --keep-history", f"{args.keep_history} is negative", "give 0 or more")
        return cmd_gc(home, [d for d in dirs if d.is_dir()], args.dry_run, args.keep_history)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyError as e:
        sys.stderr.write(f"error: no artifact {e} in {home}\n  hint: python -m compiler.store ls\n")
        return 2

"""`python -m compiler.store ls|show|fetch|verify|gc|alias`: look into and tidy the store.

Hydra owns `python -m compiler`'s arguments, so the store's commands live here, with argparse. The
storage they read and change is ``compiler.store``'s (inventory, gc, aliases); this module parses,
dispatches and prints. A name's history (``names/<recipe>.json``) holds every artifact the name
pointed at before its current one, newest first: what ``alias``-free rollbacks return to. What
``gc`` keeps is listed in ``compiler.store.gc``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from compiler.errors import UserError
from compiler.store import Store
from compiler.store.converted_bases import ConvertedBaseStore
from compiler.store.inventory import Inventory, manifest_or_none, size_of
from compiler.store.layout import default_home
from runtime.artifact import ARTIFACTS_SUBDIR, DEFAULT_HOME, Manifest

log = logging.getLogger("compiler.store")


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


def _artifact_rows(inv: Inventory) -> list[dict[str, Any]]:
    named: dict[str, list[str]] = {}
    history_of: dict[str, list[str]] = {}  # cache key -> "name~N": the name's N-th previous artifact
    for name, nf in inv.names.items():
        named.setdefault(nf.current.cache_key, []).append(name)
        for i, h in enumerate(nf.history, 1):
            history_of.setdefault(h.cache_key, []).append(f"{name}~{i}")
    manifests = {key: m for key, path in inv.artifacts.items() if (m := manifest_or_none(path)) is not None}
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
                "bytes": size_of(path),
                "created_at": m.created_at if m else None,
                "names": sorted(named.get(key, [])),
                "history_of": sorted(history_of.get(key, [])),
                "differs": differs.get(key, {}),
            }
        )
    return rows


def listing(inv: Inventory) -> dict[str, Any]:
    """``ls --json``: the store's artifacts, names, blobs and converted bases."""
    names = {
        n: {"current": nf.current.cache_key, "history": [h.cache_key for h in nf.history]}
        for n, nf in inv.names.items()
    }
    users = inv.converted_users()
    entries = ConvertedBaseStore(inv.home)
    converted = [
        {"key": k, "bytes": size_of(p), "artifacts": sorted(users.get(k, [])), **entries.about(k)}
        for k, p in inv.converted.items()
    ]
    blob_bytes = sum(p.stat().st_size for p in inv.blobs.values())
    return {
        "home": str(inv.home),
        "artifacts": _artifact_rows(inv),
        "names": names,
        "blobs": {"count": len(inv.blobs), "bytes": blob_bytes},
        "converted": converted,
    }


def _print_listing(out: dict[str, Any]) -> None:
    rows, names, converted = out["artifacts"], out["names"], out["converted"]
    print(f"store {out['home']}")
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
    print(f"blobs: {out['blobs']['count']} files, {out['blobs']['bytes'] / 2**20:.1f} MiB")
    print(f"converted single-file bases ({len(converted)}):")
    for c in converted:
        print(
            f"  {c['key'][:16]}  {c.get('family', '?'):<6} {c.get('precision', '?'):<5} {c['bytes'] / 2**20:9.1f} MiB  "
            f"used by {len(c['artifacts'])} artifacts"
        )


def cmd_ls(home: Path, as_json: bool) -> int:
    out = listing(Inventory.read(home))
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        _print_listing(out)
    return 0


def cmd_show(overrides: list[str]) -> int:
    """The recipe's lock and build plan as the compiler would use them, without any network call
    (lock=frozen) and without building anything."""
    from compiler.build import prepare  # Hydra and the planner: only for the commands that plan
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
    from compiler.build import prepare

    p = prepare(overrides)
    base, ckpt = p.fetch()
    for f in (base, ckpt):
        if f is not None:
            for name, path in f.files.items():
                print(f"{f.source}  {name}  {path}")
    return 0


def cmd_verify(home: Path, keys: list[str]) -> int:
    inv = Inventory.read(home)
    unknown = [k for k in keys if k not in inv.artifacts]
    if unknown:
        raise UserError.one(
            "store verify",
            f"no finished artifact {', '.join(unknown)} in {home / ARTIFACTS_SUBDIR}",
            "give full cache keys as `python -m compiler.store ls --json` lists them, or none to verify everything",
        )
    targets = list(dict.fromkeys(keys)) if keys else list(inv.artifacts)
    bad = inv.artifact_problems(targets)
    if not keys:
        bad += inv.blob_and_converted_problems()
    for line in bad:
        print(f"BAD {line}")
    checked = f"{len(targets)} artifacts" + (
        "" if keys else f", {len(inv.blobs)} blobs, {len(inv.converted)} converted"
    )
    print(f"verified {checked}: {'all good' if not bad else f'{len(bad)} problems'}")
    if bad:
        print("hint: compile the recipe again: a damaged artifact is set aside and rebuilt, a damaged blob refetched")
    return 1 if bad else 0


def _trim_histories(home: Path, inv: Inventory, keep: int, dry_run: bool) -> Inventory:
    """Each name's history trimmed to its ``keep`` newest entries (or, dry, as if it were)."""
    store = Store(home)
    for name in inv.names:
        dropped = store.trim_history(name, keep, dry_run)
        if dropped:
            keys = ", ".join(h.cache_key[:16] for h in dropped)
            print(f"{'would trim' if dry_run else 'trimmed'} names/{name}.json history to {keep}: {keys}")
    if not dry_run:
        return Inventory.read(home)
    names = {n: nf.model_copy(update={"history": nf.history[:keep]}) for n, nf in inv.names.items()}
    return dataclasses.replace(inv, names=names)


def cmd_gc(home: Path, recipe_dirs: list[Path], dry_run: bool, keep_history: int | None = None) -> int:
    from compiler.store import gc

    inv = Inventory.read(home)
    if keep_history is not None:
        inv = _trim_histories(home, inv, keep_history, dry_run)
    sweep = gc.sweep(inv, recipe_dirs)
    freed = 0
    for p in sweep.doomed:
        size = size_of(p)
        freed += size
        print(f"{'would remove' if dry_run else 'removed'} {p} ({size / 2**20:.1f} MiB)")
        if not dry_run:
            gc.remove(p)
    if not dry_run:
        gc.tidy(home)
    print(
        f"{'would free' if dry_run else 'freed'} {freed / 2**20:.1f} MiB; kept {sweep.kept_artifacts} "
        f"artifacts, {sweep.kept_blobs} blobs and {sweep.kept_converted} converted bases"
    )
    return 0


def cmd_alias(home: Path, action: str, name: str, specs: list[str]) -> int:
    from compiler.store.alias import rollback_alias, set_alias, show_alias, where

    if action != "set" and specs:
        raise UserError.one(where(name), f"alias {action} takes only the name, got {specs}", f"alias {action} {name}")
    if action == "set":
        record = set_alias(home, name, specs)
    elif action == "rollback":
        record = rollback_alias(home, name)
    else:
        record = show_alias(home, name)
    print(json.dumps(record.model_dump(mode="json"), indent=2, sort_keys=True))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m compiler.store", description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=None, help=f"the store (default: env UIW_HOME or {DEFAULT_HOME})")
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
    return ap


def run(args: argparse.Namespace, home: Path) -> int:
    """One parsed command."""
    with_home = [f"home={args.home}"] if args.home else []
    if args.cmd == "ls":
        return cmd_ls(home, args.json)
    if args.cmd == "show":
        return cmd_show(args.overrides + with_home)
    if args.cmd == "fetch":
        logging.getLogger("compiler").setLevel(logging.INFO)
        return cmd_fetch(args.overrides + with_home)
    if args.cmd == "verify":
        return cmd_verify(home, args.keys)
    if args.cmd == "alias":
        return cmd_alias(home, args.action, args.name, args.targets)
    dirs = args.recipes or [Path(os.environ.get("UIW_RECIPES", "recipes"))]
    if args.keep_history is not None and args.keep_history < 0:
        raise UserError.one("gc --keep-history", f"{args.keep_history} is negative", "give 0 or more")
    return cmd_gc(home, [d for d in dirs if d.is_dir()], args.dry_run, args.keep_history)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("UIW_LOG_LEVEL", "WARNING"))
    home = (args.home or default_home()).expanduser().resolve()
    try:
        return run(args, home)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyError as e:
        sys.stderr.write(f"error: no artifact {e} in {home}\n  hint: python -m compiler.store ls\n")
        return 2

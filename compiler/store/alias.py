"""Aliases: public names with weighted routes (``python -m compiler.store alias set|rollback|show``).

An alias maps a name to one or more artifacts with weights (A/B rollouts). Each target, a recipe
name or a cache key (or a unique prefix of one, at least 12 hex digits: what replies show), is
resolved to its artifact when the alias is set and pinned there, so recompiling a recipe never
moves an alias and a rollback restores exactly what was served before. The file is
``$UIW_HOME/aliases/<name>.json`` (runtime.artifact.AliasFile), written atomically under a file
lock; running workers pick a change up on their next request.
"""

from __future__ import annotations

import re
from pathlib import Path

from filelock import FileLock

from compiler.errors import UserError
from compiler.store import utc_now
from compiler.store.layout import alias_lock_name, file_lock
from runtime.artifact import (
    ALIASES_SUBDIR,
    ARTIFACTS_SUBDIR,
    READY,
    AliasFile,
    AliasRecord,
    AliasRoute,
    ArtifactError,
    alias_path,
    artifact_path,
    names_path,
    read_alias,
    read_manifest,
    read_name,
    write_json_atomic,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{12,64}$")
MIN_PREFIX = 12


def where(name: str) -> str:
    return f"alias {name}"


def parse_route(home: Path, alias: str, spec: str) -> AliasRoute:
    """``TARGET[=WEIGHT]`` -> a route pinned to the artifact TARGET names now."""
    target, sep, weight_text = spec.partition("=")
    weight = 1.0
    if sep:
        try:
            weight = float(weight_text)
        except ValueError:
            weight = -1.0
        if not weight >= 0 or weight == float("inf"):
            raise UserError.one(
                where(alias), f"route {spec!r}: weight {weight_text!r} is not a number >= 0", "write TARGET=0.9"
            )
    return AliasRoute(target=target, cache_key=resolve_target(home, alias, target), weight=weight)


def resolve_target(home: Path, alias: str, target: str) -> str:
    """A recipe name (its current artifact) or a cache key / unique prefix -> the full cache key."""
    record = read_name(home, target) if _NAME.match(target) else None
    if record is not None:
        key = record.current.cache_key
    elif _HEX.match(target):
        arts = Path(home) / ARTIFACTS_SUBDIR
        found = sorted(p.name for p in arts.glob(f"{target}*") if (p / READY).is_file()) if arts.is_dir() else []
        if len(found) != 1:
            what = "no artifact" if not found else f"{len(found)} artifacts ({', '.join(k[:16] for k in found)})"
            raise UserError.one(
                where(alias),
                f"target {target!r}: {what} in {arts} with that cache key",
                "give a longer prefix or the full key (`python -m compiler.store ls`)",
            )
        key = found[0]
    else:
        raise UserError.one(
            where(alias),
            f"target {target!r}: neither a compiled recipe name (no {names_path(home, target)}) nor a cache key "
            f"(at least {MIN_PREFIX} hex digits)",
            f"compile it first (`python -m compiler recipe={target}`), or see `python -m compiler.store ls`",
        )
    try:
        read_manifest(artifact_path(home, key))
    except Exception as e:  # an artifact removed by gc since the name was written, a broken manifest
        raise UserError.one(where(alias), f"target {target!r} -> {key[:16]}: {e}", "recompile the recipe") from e
    return key


def _check_name(home: Path, name: str) -> None:
    if not _NAME.match(name):
        raise UserError.one(
            where(name),
            "not a valid alias name",
            "use letters, digits, '.', '_' and '-', starting with a letter or digit (64 at most)",
        )
    if names_path(home, name).is_file():
        raise UserError.one(
            where(name),
            f"{name!r} is already a recipe name ({names_path(home, name)}); a worker could not tell which is meant",
            "choose another alias name",
        )


def _lock(home: Path, name: str) -> FileLock:
    return file_lock(home, alias_lock_name(name))


def set_alias(home: Path, name: str, specs: list[str]) -> AliasFile:
    """Point the alias at these routes; the previous routes go to its history."""
    _check_name(home, name)
    routes = tuple(parse_route(home, name, s) for s in specs)
    if not routes:
        raise UserError.one(where(name), "no target given", "alias set NAME TARGET[=WEIGHT] ...")
    targets = [r.cache_key for r in routes]
    if len(set(targets)) < len(targets):
        raise UserError.one(where(name), "two routes lead to the same artifact", "name each artifact once")
    if sum(r.weight for r in routes) <= 0:
        raise UserError.one(where(name), "every route has weight 0", "give at least one route a positive weight")
    with _lock(home, name):
        old = read_alias(home, name)
        if old is not None and old.current.routes == routes:
            return old
        record = AliasRecord(routes=routes, set_at=utc_now())
        history = () if old is None else (old.current, *old.history)
        new = AliasFile(name=name, current=record, history=history)
        write_json_atomic(alias_path(home, name), new.model_dump(mode="json"))
        return new


def rollback_alias(home: Path, name: str) -> AliasFile:
    """The previous routes become current again (the current ones are dropped)."""
    with _lock(home, name):
        old = read_alias(home, name)
        if old is None:
            raise UserError.one(where(name), f"no such alias ({alias_path(home, name)})", "alias set NAME TARGET")
        if not old.history:
            raise UserError.one(where(name), "no earlier version to roll back to", "alias show NAME")
        new = AliasFile(name=name, current=old.history[0], history=old.history[1:])
        write_json_atomic(alias_path(home, name), new.model_dump(mode="json"))
        return new


def show_alias(home: Path, name: str) -> AliasFile:
    record = read_alias(home, name)
    if record is None:
        raise UserError.one(where(name), f"no such alias ({alias_path(home, name)})", "alias set NAME TARGET")
    return record


def alias_keys(home: Path) -> set[str]:
    """Every cache key an alias routes to, now or in its history (gc keeps them)."""
    keys: set[str] = set()
    for p in sorted((Path(home) / ALIASES_SUBDIR).glob("*.json")):
        try:
            record = read_alias(home, p.stem)
        except ArtifactError as e:  # never collect what an unreadable alias may route to
            raise UserError.one(where(p.stem), str(e), "fix or remove the alias file, then run gc again") from e
        if record is not None:
            keys |= {r.cache_key for rec in (record.current, *record.history) for r in rec.routes}
    return keys

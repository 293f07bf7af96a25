"""Sources: a parsed source -> a lock entry (pinned), and a lock entry -> local files (fetched).

One module per scheme, dispatched from literal tables (no discovery). Only these modules reach the
network. ``describe`` turns a lock entry into what the plan needs, without any I/O, so that a
frozen lock plans offline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from compiler import uri
from compiler.errors import UserError
from compiler.families import FAMILIES, family_of_repo
from compiler.generic import family_spec
from compiler.lockfile import LockEntry
from compiler.sources import builtin, civitai, hf, local, url
from compiler.sources.base import Context, Fetched, Pinned, Resolved

INVENTORY: dict[type, Callable[[Any, str, Context], LockEntry]] = {
    uri.BuiltinSource: builtin.inventory,
    uri.HfSource: hf.inventory,
    uri.CivitaiSource: civitai.inventory,
    uri.UrlSource: url.inventory,
    uri.LocalSource: local.inventory,
}
FETCH: dict[type, Callable[[LockEntry, str, Context, tuple[str, ...]], Fetched]] = {
    uri.BuiltinSource: builtin.fetch,
    uri.HfSource: hf.fetch,
    uri.CivitaiSource: civitai.fetch,
    uri.UrlSource: url.fetch,
    uri.LocalSource: local.fetch,
}


def inventory(source: uri.Source, where: str, ctx: Context) -> LockEntry:
    return INVENTORY[type(source)](source, where, ctx)


def enrich(entry: LockEntry, ctx: Context) -> LockEntry:
    """A single file from outside CivitAI, with what CivitAI knows of its bytes (opt-in lookup)."""
    if entry.kind != "file" or isinstance(uri.parse(entry.source), uri.CivitaiSource):
        return entry
    found = civitai.lookup_by_hash(ctx, entry.files[0].hex)
    return entry.model_copy(update={"meta": {**entry.meta, "civitai": found}}) if found else entry


def wanted(entry: LockEntry, precision: str, configs_only: bool = False) -> tuple[str, ...]:
    """The locked files a build at this precision reads (all of them but unused variants; with
    ``configs_only``, when a checkpoint brings the weights, no weights at all)."""
    if entry.kind in ("repo", "folder"):
        return hf.wanted(entry, precision, configs_only)
    return tuple(f.path for f in entry.files)


def fetch(entry: LockEntry, where: str, ctx: Context, precision: str, configs_only: bool = False) -> Fetched:
    return FETCH[type(uri.parse(entry.source))](entry, where, ctx, wanted(entry, precision, configs_only))


def content_pin(entry: LockEntry, inputs: tuple[tuple[str, str], ...]) -> str:
    """What the plan (and so the cache key) knows of a source: its bytes, not its name, so the
    same file from CivitAI, the Hub, a URL or a disk builds one artifact. Where it came from is
    provenance, recorded in the manifest."""
    if entry.kind == "builtin":
        return entry.pin
    files = "\n".join(f"{sha}  {path}" for path, sha in sorted(inputs))
    return "files:sha256:" + hashlib.sha256(files.encode()).hexdigest()


def describe_pipeline(
    entry: LockEntry, where: str, precision: str, configs_only: bool = False, family: str | None = None
) -> Resolved:
    """A locked pipeline source (builtin, diffusers repo or folder) -> what the plan needs;
    ``family`` (the recipe's override) wins over what the repo's configs say."""
    if entry.kind == "file":
        raise UserError.one(
            where,
            f"{entry.source} is a single file, not a diffusers pipeline",
            "single-file checkpoints (CivitAI-style) compile through `checkpoint:` (model detection); "
            "`base:` takes builtin:NAME, hf://ORG/REPO or a local diffusers folder",
        )
    meta = entry.meta
    if family is not None and meta.get("family") not in (None, family):
        raise UserError.one(
            where,
            f"`family: {family}` contradicts {entry.source}, which is {meta['family']} "
            f"(evidence: {'; '.join(meta.get('family_evidence') or ()) or 'its lock entry'})",
            "remove `family:` (it is only for models whose family cannot be told), or use a base of that family",
        )
    if family is None and "family" not in meta:  # a lock written before repo families were recorded
        by_class = family_of_repo(meta.get("pipeline_class"), {})
        family = by_class.family
        meta = {**meta, "family_candidates": list(by_class.candidates)}
    family = family or meta.get("family")
    if family is None:
        known = sorted({c for f in FAMILIES.values() for c in f.pipelines.values()})
        cands = meta.get("family_candidates") or []
        raise UserError.one(
            where,
            f"cannot tell the model family of {entry.source} (pipeline class {meta.get('pipeline_class')!r}"
            + (f"; candidates: {', '.join(cands)}" if cands else "; not a supported pipeline class")
            + f"; evidence: {'; '.join(meta.get('family_evidence') or ()) or 'none'})",
            f"set `family:` in the recipe to one of {', '.join(cands)}, or relock it (lock=update)"
            if cands
            else "the class is neither a diffusers pipeline class (of the installed diffusers) nor one of the "
            f"families' ({', '.join(known)}); check model_index.json's _class_name",
        )
    size = meta.get("native_size") or family_spec(family).native_size
    needed = set(wanted(entry, precision, configs_only))
    inputs = tuple((f.path, f.sha256) for f in entry.files if f.path in needed)
    inpaint = meta.get("pipeline_class") == family_spec(family).pipelines.get("inpaint")
    return Resolved(
        pin=content_pin(entry, inputs),
        family=family,
        native_size=(int(size[0]), int(size[1])),
        inputs=inputs,
        model_variant="inpaint" if inpaint else "normal",
    )


def describe_file(entry: LockEntry, where: str) -> Pinned:
    """A locked single file (a checkpoint) -> its pin and bytes (its family is the base's, checked
    against its header before the build)."""
    if entry.kind != "file":
        raise UserError.one(where, f"{entry.source} is a {entry.kind}, not a single file", "name one .safetensors file")
    # A single file's name differs between sources (CivitAI's, the Hub's, yours); its bytes do not.
    inputs = tuple(("file", f.sha256) for f in entry.files)
    return Pinned(pin=content_pin(entry, inputs), inputs=inputs)


__all__ = [
    "Context",
    "Fetched",
    "Resolved",
    "describe_file",
    "describe_pipeline",
    "enrich",
    "fetch",
    "inventory",
    "wanted",
]

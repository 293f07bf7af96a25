"""builtin: sources. Pinned by name and revision; the bytes are generated at materialize time."""

from __future__ import annotations

from compiler import uri
from compiler.errors import UserError
from compiler.families import FAMILIES, main_task
from compiler.lockfile import LockEntry
from compiler.sources.base import Context, Fetched
from compiler.tiny_models import BUILTINS


def inventory(source: uri.BuiltinSource, where: str, ctx: Context) -> LockEntry:
    model = BUILTINS.get(source.name)
    if model is None:
        raise UserError.one(
            where,
            f"no built-in model {source.name!r}",
            f"built-in models: {', '.join('builtin:' + n for n in BUILTINS)}",
        )
    if source.revision is not None and source.revision != model.revision:
        raise UserError.one(
            where,
            f"builtin:{source.name} revision {source.revision} is not available; this compiler has {model.revision}",
            f"write builtin:{source.name} (current) or builtin:{source.name}@{model.revision}",
        )
    return LockEntry(
        source=str(source),
        kind="builtin",
        pin=model.pin,
        meta={
            "family": model.family,
            "native_size": list(model.native_size),
            "pipeline_class": FAMILIES[model.family].pipelines[main_task(FAMILIES[model.family])],
        },
    )


def fetch(entry: LockEntry, where: str, ctx: Context, paths: tuple[str, ...]) -> Fetched:
    return Fetched(source=entry.source, kind=entry.kind, files={})

"""builtin: sources. Pinned by name and revision; the bytes are generated at materialize time."""

from __future__ import annotations

from compiler import uri
from compiler.builtins import BUILTINS
from compiler.errors import UserError
from compiler.sources.base import Resolved


def resolve(source: uri.BuiltinSource, where: str) -> Resolved:
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
    return Resolved(pin=model.pin, family=model.family, native_size=model.native_size)

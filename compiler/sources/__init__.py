"""Source resolution: a parsed source -> an immutable pin. One module per scheme, dispatched from
one literal table (no discovery). Only these modules may reach the network."""

from __future__ import annotations

from collections.abc import Callable

from compiler import uri
from compiler.sources import builtin
from compiler.sources.base import Resolved

RESOLVERS: dict[type, Callable[..., Resolved]] = {
    uri.BuiltinSource: builtin.resolve,
}


def resolve(source: uri.Source, where: str) -> Resolved:
    return RESOLVERS[type(source)](source, where)


__all__ = ["RESOLVERS", "Resolved", "resolve"]

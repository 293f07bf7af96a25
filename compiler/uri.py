"""The one grammar of model sources. Pure: parses strings, touches nothing.

Accepted now:
  builtin:NAME[@REVISION]     a model generated in code (e.g. builtin:tiny-sd15)
Recognised, resolved by later compiler versions:
  hf://org/repo[/path/file.safetensors][@rev], civitai://models/ID[@VERSION], urn:air:..., https://...,
  local paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FORMS = ("builtin:NAME[@REVISION]   e.g. builtin:tiny-sd15",)
_BUILTIN = re.compile(r"^builtin:(?P<name>[a-z0-9][a-z0-9-]*)(?:@(?P<rev>[0-9]+))?$")
_LATER = ("hf://", "civitai://", "urn:air:", "https://", "http://")


class SourceError(ValueError):
    """A source string that does not parse; the message lists the accepted forms."""


@dataclass(frozen=True)
class BuiltinSource:
    name: str
    revision: int | None  # None: the current revision

    def __str__(self) -> str:
        return f"builtin:{self.name}" + (f"@{self.revision}" if self.revision is not None else "")


Source = BuiltinSource


def parse(text: str) -> Source:
    text = text.strip()
    if m := _BUILTIN.match(text):
        rev = m.group("rev")
        return BuiltinSource(m.group("name"), int(rev) if rev is not None else None)
    if text.startswith(_LATER) or "/" in text or text.startswith("."):
        raise SourceError(
            f"{text!r}: this compiler resolves only builtin sources so far "
            f"(HuggingFace, CivitAI, HTTPS and local sources are not implemented yet); accepted: {'; '.join(FORMS)}"
        )
    raise SourceError(f"{text!r} is not a source; accepted: {'; '.join(FORMS)}")

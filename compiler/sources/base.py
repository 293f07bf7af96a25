from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resolved:
    """A source pinned to immutable bytes, plus what the pin says about the model."""

    pin: str  # scheme-prefixed fingerprint, e.g. "builtin:tiny-sd15@1"
    family: str
    native_size: tuple[int, int]

"""Aliases at serve time: a public name's routes, re-read when its file changes, and the
per-request weighted choice between them.

The file (``$UIW_HOME/aliases/<name>.json``, see runtime.artifact.AliasFile) is written by
``python -m compiler.store alias set|rollback``; the worker notices a new version by its
modification time, size and inode on the next request, without a restart.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from pathlib import Path

from runtime.artifact import ArtifactError, alias_path, artifact_path, read_alias


@dataclass(frozen=True)
class Route:
    target: str  # as given to `alias set`
    cache_key: str
    weight: float
    path: Path  # the artifact directory


class AliasWatch:
    """One alias, as its file says now."""

    def __init__(self, home: Path, name: str):
        self.home = Path(home)
        self.name = name
        self.path = alias_path(home, name)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._routes: tuple[Route, ...] = ()
        self.routes()  # a missing or broken file fails at start, not at the first request

    def routes(self) -> tuple[Route, ...]:
        """The current routes; re-reads the file when it changed since the last call."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise ArtifactError(
                f"alias {self.name!r}: {self.path} is gone. hint: set it again with "
                f"`python -m compiler.store alias set {self.name} TARGET`, or drop it from UIW_ARTIFACTS."
            ) from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if stamp != self._stamp:
                record = read_alias(self.home, self.name)
                if record is None:  # removed between the stat and the read
                    raise ArtifactError(f"alias {self.name!r}: {self.path} is gone. hint: set it again.")
                self._routes = tuple(
                    Route(r.target, r.cache_key, r.weight, artifact_path(self.home, r.cache_key))
                    for r in record.current.routes
                )
                self._stamp = stamp
            return self._routes


def choose(routes: tuple[Route, ...], rng: random.Random) -> Route:
    """A route at random by weight (one with weight 0 is never chosen)."""
    live = [r for r in routes if r.weight > 0]
    if not live:
        raise ArtifactError("alias: every route has weight 0. hint: give one route a positive weight.")
    if len(live) == 1:
        return live[0]
    return rng.choices(live, weights=[r.weight for r in live])[0]

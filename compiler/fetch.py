"""Lock entries -> verified local files, with download failures turned into actionable errors."""

from __future__ import annotations

from compiler.errors import UserError
from compiler.lock import LockEntry
from compiler.sources import Context, Fetched, fetch
from compiler.sources.download import DiskFull, HashMismatch


def fetch_entry(entry: LockEntry, where: str, ctx: Context, precision: str) -> Fetched:
    try:
        return fetch(entry, where, ctx, precision)
    except HashMismatch as e:
        raise UserError.one(
            where,
            f"{e.what}: the downloaded bytes hash to {e.found}, the lock pins {e.expected}; nothing was kept",
            "the server sent other bytes than were locked: if the upload was replaced on purpose, relock "
            "with lock=update and review the change; otherwise retry (a proxy or mirror may be corrupting it)",
        ) from None
    except DiskFull as e:
        raise UserError.one(
            where, str(e), "free space under the store (UIW_HOME) or run `python -m compiler.store gc`"
        ) from None

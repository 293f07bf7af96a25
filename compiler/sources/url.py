"""https:// sources (and http:// on loopback, for local mirrors). A ``#sha256=`` fragment pins the
bytes without a network call at lock time; without one the file is downloaded once when locking
and pinned by the hash of what arrived."""

from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from compiler import uri
from compiler.errors import UserError
from compiler.lockfile import LockedFile, LockEntry
from compiler.sources.base import Context, Fetched
from compiler.sources.blobs import fetch_pinned, fetch_unpinned
from compiler.sources.download import HttpStatusError, TransferError, redact


def _name(url: str) -> str:
    return PurePosixPath(unquote(urlsplit(url).path)).name or "download"


def _error(e: Exception, where: str, url: str) -> UserError:
    if isinstance(e, HttpStatusError):
        hint = {
            401: "the server wants credentials; URL sources take none (tokens would leak into the lock)",
            403: "the server refuses access",
            404: "check the URL",
        }.get(e.status, "retry later")
        return UserError.one(where, f"HTTP {e.status} from {redact(url)}", hint)
    return UserError.one(where, f"cannot download {redact(url)}: {e}", "check the URL and the network")


def inventory(src: uri.UrlSource, where: str, ctx: Context) -> LockEntry:
    if src.sha256:
        f = LockedFile(path=_name(src.url), sha256=f"sha256:{src.sha256}", size=None, url=src.url)
    else:
        try:
            digest, size, _ = fetch_unpinned(ctx, src.url, {}, _name(src.url))
        except (HttpStatusError, TransferError) as e:
            raise _error(e, where, src.url) from None
        f = LockedFile(path=_name(src.url), sha256=f"sha256:{digest}", size=size, url=src.url)
    return LockEntry(source=str(src), kind="file", pin=f.sha256, files=(f,))


def fetch(entry: LockEntry, where: str, ctx: Context, paths: tuple[str, ...]) -> Fetched:
    (f,) = entry.files
    try:
        blob = fetch_pinned(ctx, f, f.url or "", {}, f.path)
    except (HttpStatusError, TransferError) as e:
        raise _error(e, where, f.url or "") from None
    return Fetched(source=entry.source, kind=entry.kind, files={f.path: blob})

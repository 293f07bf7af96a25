"""HTTP for every scheme: verified, resumable, retried downloads into the blob store, and JSON GETs.

One policy for all services: bounded retries with exponential backoff on 5xx, 429, timeouts and
dropped connections; a dropped transfer resumes from the bytes already on disk with an HTTP Range
request; the bytes are hashed while they stream and checked against the pin before the file gets
its final name. Headers (which may carry tokens) are never logged, and a redirect to another host
drops the Authorization header (httpx does so for cross-origin redirects).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from compiler.errors import UserError
from runtime.artifact import fsync_path

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_ENV = "UIW_HTTP_TIMEOUT"
RETRIES_ENV = "UIW_HTTP_RETRIES"


@dataclass(frozen=True)
class Policy:
    """How hard to try. Env: UIW_HTTP_TIMEOUT (seconds without a byte), UIW_HTTP_RETRIES."""

    timeout: float = 30.0
    retries: int = 5
    backoff: float = 0.5  # first wait; doubles each retry, capped at max_backoff
    max_backoff: float = 8.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Policy:
        """Raises UserError naming the variable for a value that is not a time or a count."""
        return cls(timeout=_timeout(env, cls.timeout), retries=_retries(env, cls.retries))

    def wait(self, attempt: int) -> float:
        return min(self.backoff * 2**attempt, self.max_backoff)


def _timeout(env: Mapping[str, str], default: float) -> float:
    raw = env.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < math.inf:  # NaN fails too
        raise UserError.one(
            f"environment: {TIMEOUT_ENV}",
            f"expected seconds greater than 0 (the longest wait for a byte), found {raw!r}",
            f"unset it for {default:g} s, or give e.g. 120 for a slow mirror",
        )
    return value


def _retries(env: Mapping[str, str], default: int) -> int:
    raw = env.get(RETRIES_ENV, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise UserError.one(
            f"environment: {RETRIES_ENV}",
            f"expected a whole number of retries, 0 or more, found {raw!r}",
            f"unset it for {default}, or give 0 to fail at the first error",
        )
    return int(raw)


class HttpStatusError(Exception):
    """A final (non-retryable, or retries exhausted) HTTP status. The caller turns it into a
    UserError with the service-specific hint (which token, which repo)."""

    def __init__(self, url: str, status: int, body: str):
        self.url, self.status, self.body = url, status, body
        super().__init__(f"HTTP {status} from {redact(url)}")


class TransferError(Exception):
    """The service could not be reached or kept dropping the transfer after every retry."""


class HashMismatch(Exception):
    def __init__(self, what: str, expected: str, found: str):
        self.what, self.expected, self.found = what, expected, found
        super().__init__(f"{what}: expected sha256 {expected}, downloaded bytes hash to {found}; nothing was kept")


class DiskFull(Exception):
    pass


def redact(url: str) -> str:
    """The URL without query string: queries may carry tokens (CivitAI accepts ?token=)."""
    p = urlsplit(url)
    return p._replace(query="", fragment="").geturl()


def _retryable(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def client(policy: Policy) -> httpx.Client:
    # A read timeout is the time without any byte: a stalled server fails fast, a slow one does not.
    return httpx.Client(follow_redirects=True, timeout=httpx.Timeout(policy.timeout, connect=min(policy.timeout, 10)))


def get_json(url: str, headers: Mapping[str, str], policy: Policy) -> Any:
    with client(policy) as c:
        for attempt in range(policy.retries + 1):
            try:
                r = c.get(url, headers=dict(headers))
            except httpx.TransportError as e:
                if attempt == policy.retries:
                    raise TransferError(f"{redact(url)}: {type(e).__name__}: {e}") from None
                _sleep(policy, attempt, f"{redact(url)}: {type(e).__name__}")
                continue
            if r.status_code == 200:
                return r.json()
            if _retryable(r.status_code) and attempt < policy.retries:
                _sleep(policy, attempt, f"{redact(url)}: HTTP {r.status_code}")
                continue
            raise HttpStatusError(url, r.status_code, r.text[:500])
    raise AssertionError("unreachable")


def _sleep(policy: Policy, attempt: int, why: str) -> None:
    wait = policy.wait(attempt)
    log.warning("%s; retry %d/%d in %.1f s", why, attempt + 1, policy.retries, wait)
    time.sleep(wait)


@dataclass
class _Partial:
    """A download in progress: the bytes on disk and their running hash."""

    path: Path
    hasher: Any
    size: int = 0

    @classmethod
    def open(cls, path: Path) -> _Partial:
        part = cls(path, hashlib.sha256())
        if path.exists():  # left by an interrupted run: hash what is there once, then resume after it
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    part.hasher.update(chunk)
                    part.size += len(chunk)
        return part

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.hasher, self.size = hashlib.sha256(), 0


def download(
    url: str,
    headers: Mapping[str, str],
    dest: Path,
    partial: Path,
    *,
    expected_sha256: str | None,
    expected_size: int | None,
    label: str,
    policy: Policy,
) -> str:
    """Fetch ``url`` into ``dest`` (atomically) and return the sha256 hex of its bytes.

    ``partial`` keeps the bytes of an interrupted transfer between attempts and between runs; the
    caller holds the blob's file lock. Raises HashMismatch (partial deleted), HttpStatusError,
    TransferError or DiskFull (partial deleted).
    """
    partial.parent.mkdir(parents=True, exist_ok=True)
    part = _Partial.open(partial)
    if expected_size is not None and part.size > expected_size:
        part.reset()
    bar = _progress(label, expected_size, part.size)
    try:
        with client(policy) as c:
            _transfer(c, _Source(url, headers, label), part, bar, expected_size, policy)
        return _land(part, dest, expected_sha256, expected_size, label)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _disk_full(part, expected_size, label) from None
        raise
    finally:
        bar.close()


@dataclass(frozen=True)
class _Source:
    url: str
    headers: Mapping[str, str]
    label: str  # for logs and errors: never the URL, which may carry a token


def _transfer(
    c: httpx.Client, src: _Source, part: _Partial, bar: Any, expected_size: int | None, policy: Policy
) -> None:
    """Attempts until every byte is on disk, each resuming after the bytes already there; raises
    TransferError once the retries are spent."""
    attempt = 0
    while not (expected_size is not None and part.size == expected_size):
        try:
            _attempt(c, src, part, bar)
            return
        except (_Retry, httpx.TransportError) as e:
            why = str(e) if isinstance(e, _Retry) else f"{type(e).__name__}: {e}"
            if attempt >= policy.retries:
                raise TransferError(f"{src.label}: {why} (after {attempt + 1} attempts)") from None
            _sleep(policy, attempt, f"{src.label}: {why} (have {part.size} bytes)")
            attempt += 1


def _attempt(c: httpx.Client, src: _Source, part: _Partial, bar: Any) -> None:
    """One GET (a Range request after the bytes on disk); raises _Retry for what another attempt
    may fix, HttpStatusError for a final status."""
    req_headers = {**src.headers, "Accept-Encoding": "identity"}
    if part.size:
        req_headers["Range"] = f"bytes={part.size}-"
    with c.stream("GET", src.url, headers=req_headers) as r:
        if r.status_code == 416 and part.size:  # nothing after our offset: restart clean
            part.reset()
            raise _Retry(f"HTTP 416 at offset {part.size}")
        if r.status_code not in (200, 206):
            if _retryable(r.status_code):
                raise _Retry(f"HTTP {r.status_code}")
            r.read()
            raise HttpStatusError(src.url, r.status_code, r.text[:500])
        if r.status_code == 200 and part.size:
            log.info("%s: server ignored the Range request; starting over", src.label)
            part.reset()
        if r.status_code == 206:
            log.info("%s: resuming at byte %d", src.label, part.size)
        total = _total(r)
        _write(r, part, bar)
        if total is not None and part.size < total:
            raise _Retry(f"connection closed at byte {part.size} of {total}")


def _land(part: _Partial, dest: Path, expected_sha256: str | None, expected_size: int | None, label: str) -> str:
    """Check the finished bytes against the pin, then give them their final name (atomically)."""
    found = part.hasher.hexdigest()
    wrong_size = expected_size is not None and part.size != expected_size
    if wrong_size or (expected_sha256 is not None and found != expected_sha256):
        got = f"{found} ({part.size} bytes)"
        part.reset()
        raise HashMismatch(label, expected_sha256 or f"{expected_size} bytes", got)
    fsync_path(part.path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part.path, dest)
    fsync_path(dest.parent)
    return found


def _disk_full(part: _Partial, expected_size: int | None, label: str) -> DiskFull:
    part.reset()
    free = shutil.disk_usage(part.path.parent).free
    return DiskFull(
        f"{label}: disk full under {part.path.parent} ({free} bytes free"
        + (f", the file needs {expected_size}" if expected_size else "")
        + "); nothing partial was kept"
    )


class _Retry(Exception):
    pass


def _total(r: httpx.Response) -> int | None:
    if r.status_code == 206:
        cr = r.headers.get("Content-Range", "")  # bytes START-END/TOTAL
        tail = cr.rpartition("/")[2]
        return int(tail) if tail.isdigit() else None
    length = r.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _write(r: httpx.Response, part: _Partial, bar: Any) -> None:
    with part.path.open("ab") as f:
        # iter_raw yields bytes as they arrive: a transfer cut mid-chunk keeps what came before the
        # cut (a buffered iterator would drop it), and identity encoding makes them the file's bytes.
        for chunk in r.iter_raw():
            f.write(chunk)
            part.hasher.update(chunk)
            part.size += len(chunk)
            bar.update(len(chunk))


def _progress(label: str, total: int | None, initial: int) -> Any:
    """A tqdm bar (file, bytes, speed, ETA) on a terminal; a start line in logs otherwise."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    if not tty:
        log.info("downloading %s (%s bytes)", label, total if total is not None else "unknown")
    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        disable=not tty,
        file=sys.stderr,
        leave=False,
    )

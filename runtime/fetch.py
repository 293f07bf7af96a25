"""One client-chosen http(s) URL -> its body, bounded, from public addresses only.

The URL comes from a request, so the server at the other end may be hostile. What it can try, and
what stops it:

- Reach what only the worker can (SSRF): cloud metadata at 169.254.169.254, loopback services, the
  private network. The host is resolved once, every address it resolves to must be public, and the
  connection is made to those checked addresses and no others (a second lookup, by the HTTP client,
  could answer differently: "DNS rebinding"). TLS still verifies, and SNI and Host still name, the
  URL's host. Every redirect hop is checked the same way. No proxy and no .netrc: a proxy would
  resolve the name itself, and .netrc would hand the operator's credentials to a host a client chose.
- Hold the worker: every socket operation (connect, TLS handshake, each read and write) gets the
  smaller of its own timeout and the time left to the fetch's deadline, so a server that dribbles
  its headers or its body a byte at a time is cut at the deadline like one that stalls.
- Exhaust memory: the body is read raw (httpcore decodes no Content-Encoding) and counted as it
  arrives. The request asks for identity; a gzip or deflate body sent anyway (an object stored
  compressed on S3 is served so whatever the request asks) is inflated in small steps and refused
  as soon as the inflated size passes the limit, so a kilobyte "zip bomb" never unpacks past it.
  Other encodings (br, zstd, ...) are refused unread: nothing here decodes them with a bound.

httpcore (the transport under httpx) is used directly because it takes a network backend, which is
where the pinning and the deadline live; httpx only parses and joins URLs and builds the Host header.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, TypeVar

import httpcore
import httpx

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIRECTS = frozenset((301, 302, 303, 307, 308))
# Content-Encodings inflated with a bound (zlib: wbits 47 reads a gzip or a zlib header, which
# covers "deflate" as RFC 9110 defines it).
INFLATED = frozenset(("gzip", "x-gzip", "deflate"))
_INFLATE_STEP = 2**20  # bytes of inflated output per zlib call: the most held beyond the body itself
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(Exception):
    """Why a URL was not fetched, as a sentence for the client (the caller adds the field name)."""


class _DeadlinePassed(Exception):
    """The fetch's deadline passed during a socket operation."""


@dataclass(frozen=True)
class Bounds:
    max_bytes: int  # of the body, after any Content-Encoding is undone
    timeout_s: float  # connect, and each read and write
    deadline: float  # time.monotonic() by which the whole fetch, redirects included, is over
    deadline_what: str  # what set the deadline, for the error: "the 30 s limit of a fetch"
    max_redirects: int
    private_ok: bool  # the operator allows loopback, private and link-local hosts


def public(ip: str) -> bool:
    """Whether an address is a public unicast one, judging IPv6 forms of IPv4 by the IPv4 address."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address a gateway will reach (mapped, 6to4, NAT64's
        # well-known prefix): judged by that address, or 64:ff9b::a9fe:a9fe is the metadata host.
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            addr = embedded
    return addr.is_global and not addr.is_multicast


def resolve(host: str, port: int, private_ok: bool) -> tuple[str, ...]:
    """The addresses to connect to for host:port, each checked: one non-public address refuses the
    host (a name that answers with a public and a private address is treated as hostile)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchError(f"cannot resolve the host {host!r} ({e})") from None
    ips = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    if not ips:
        raise FetchError(f"cannot resolve the host {host!r} (no addresses)")
    if not private_ok:
        for ip in ips:
            if not public(ip):
                log.info("URL host %s resolves to %s: refused", host, ip)
                raise FetchError(
                    f"the host {host!r} is a private, loopback or link-local address; only public hosts are fetched"
                )
    return ips


def _within(deadline: float, timeout: float | None, operation: Callable[[float], T]) -> T:
    """Runs a socket operation with the smaller of its timeout and the time left to the deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _DeadlinePassed
    if timeout is not None and timeout <= left:
        return operation(timeout)
    try:
        return operation(left)
    except httpcore.TimeoutException:
        raise _DeadlinePassed from None


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, deadline: float):
        self._stream, self._deadline = stream, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return _within(self._deadline, timeout, partial(self._stream.read, max_bytes))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        _within(self._deadline, timeout, partial(self._stream.write, buffer))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = _within(self._deadline, timeout, partial(self._stream.start_tls, ssl_context, server_hostname))
        return _DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects a host:port only to the addresses `resolve` checked for it (never looks a name up
    itself), and puts every stream under the fetch's deadline."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.addresses: dict[tuple[str, int], tuple[str, ...]] = {}
        self._sockets = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        ips = self.addresses.get((host, port))
        if not ips:  # every hop is resolved before its request: reaching here is a bug of ours
            raise httpcore.ConnectError(f"{host}:{port} was not resolved and checked before connecting")
        # A name often resolves to several addresses (IPv6 and IPv4) and the first may be
        # unroutable from the worker: each checked address in turn, as a plain client would.
        failure: Exception | None = None
        for ip in ips:
            connect = partial(
                self._sockets.connect_tcp, ip, port, local_address=local_address, socket_options=socket_options
            )
            try:
                stream = _within(self.deadline, timeout, connect)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                failure = e
                continue
            return _DeadlineStream(stream, self.deadline)
        assert failure is not None
        raise failure


@cache
def _tls() -> ssl.SSLContext:
    """httpx's verifying context (certifi's CAs), made once: loading the CAs costs each fetch otherwise.
    trust_env=False: no SSL_CERT_FILE from the environment, as no proxy and no .netrc."""
    return httpx.create_ssl_context(trust_env=False)


def _authority_key(url: httpx.URL) -> tuple[str, int]:
    """(host, port) as httpcore hands them to connect_tcp: the IDNA-encoded host, the default port filled in."""
    return url.raw_host.decode("ascii"), url.port or (443 if url.scheme == "https" else 80)


def _check_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, UnicodeError) as e:
        raise FetchError(f"not a valid URL ({e})") from None
    if parsed.scheme not in ("http", "https"):
        raise FetchError(f"redirected to an unsupported scheme {parsed.scheme!r}; only http and https are fetched")
    if not parsed.raw_host:
        raise FetchError(f"no host in the URL {shown(url)!r}")
    return parsed


def shown(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


def _too_big(url: str, bounds: Bounds, how: str = "") -> FetchError:
    return FetchError(f"{shown(url)} is more than the {bounds.max_bytes} bytes allowed{how}")


def _read_body(response: httpcore.Response, url: str, bounds: Bounds) -> bytes:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1").strip() for k, v in response.headers}
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > bounds.max_bytes:
        raise FetchError(f"{shown(url)} is {int(declared)} bytes, more than the {bounds.max_bytes} bytes allowed")
    encoding = headers.get("content-encoding", "identity").lower() or "identity"
    body = bytearray()
    if encoding == "identity":
        for chunk in response.iter_stream():
            body += chunk
            if len(body) > bounds.max_bytes:
                raise _too_big(url, bounds)
        return bytes(body)
    if encoding not in INFLATED:
        raise FetchError(
            f"{shown(url)} came with Content-Encoding {encoding!r}, which was not asked for (the request asks "
            f"for identity) and is not decoded here: a compressed body can unpack past the {bounds.max_bytes} "
            "bytes allowed. hint: serve the image uncompressed"
        )
    inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, detected
    try:
        for chunk in response.iter_stream():
            data = chunk
            while True:  # at most _INFLATE_STEP bytes of output a call: the bomb never unpacks at once
                out = inflate.decompress(data, _INFLATE_STEP)
                body += out
                if len(body) > bounds.max_bytes:
                    raise _too_big(url, bounds, f" once its {encoding} Content-Encoding is undone")
                data = inflate.unconsumed_tail
                if not data and len(out) < _INFLATE_STEP:
                    break
    except zlib.error as e:
        raise FetchError(f"{shown(url)}: its {encoding} body could not be decoded ({e})") from None
    if not inflate.eof:
        raise FetchError(f"{shown(url)}: its {encoding} body is truncated")
    return bytes(body)


def fetch(url: str, bounds: Bounds, headers: dict[str, str]) -> bytes:
    """GET `url` (following redirects, each hop checked) -> the body, within `bounds`."""
    backend = _PinnedBackend(bounds.deadline)
    timeouts = {"connect": bounds.timeout_s, "read": bounds.timeout_s, "write": bounds.timeout_s, "pool": 1.0}
    with httpcore.ConnectionPool(ssl_context=_tls(), network_backend=backend, retries=0) as pool:
        for _ in range(bounds.max_redirects + 1):
            target = _check_url(url)
            host, port = _authority_key(target)
            backend.addresses[host, port] = resolve(host, port, bounds.private_ok)
            request = httpx.Request("GET", target, headers=headers)  # adds Host: the URL's authority
            where = httpcore.URL(scheme=target.raw_scheme, host=target.raw_host, port=port, target=target.raw_path)
            try:
                with pool.stream(
                    "GET",
                    where,
                    headers=request.headers.raw,
                    extensions={"timeout": timeouts},
                ) as response:
                    if response.status in REDIRECTS:
                        location = next((v for k, v in response.headers if k.lower() == b"location"), None)
                        if not location:
                            raise FetchError(f"fetching {shown(url)}: a redirect without a Location")
                        url = str(target.join(location.decode("latin-1")))
                        continue
                    if response.status != 200:
                        raise FetchError(f"fetching {shown(url)} answered HTTP {response.status}, expected 200")
                    return _read_body(response, url, bounds)
            except _DeadlinePassed:
                raise FetchError(
                    f"fetching {shown(url)} was stopped at {bounds.deadline_what}. "
                    "hint: serve the image from a faster host, or send it as base64"
                ) from None
            except (
                httpcore.TimeoutException,
                httpcore.NetworkError,
                httpcore.ProtocolError,
                httpcore.UnsupportedProtocol,
                httpx.InvalidURL,
                UnicodeError,
            ) as e:
                raise FetchError(f"fetching {shown(url)} failed: {type(e).__name__}: {e}") from None
        raise FetchError(f"fetching {shown(url)}: more than {bounds.max_redirects} redirects")

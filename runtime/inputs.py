"""Request images (image_url, mask_url) -> decoded PIL images at the output size, before model work.

Accepted forms, as worker-sdxl clients send them: ``https://`` and ``http://`` URLs,
``data:image/<type>;base64,<data>`` URIs and bare base64. Nothing else: no ``file://`` (a request
must never read the worker's disk) and no other scheme (ftp, gopher, ... reach services an HTTP
client was never meant to).

Every input is bounded before it is decoded: bytes (MAX_IMAGE_BYTES, checked on the base64 text,
the Content-Length and while streaming), time (per read and overall), redirects (each hop checked
like the first) and pixels (read from the header, before the pixel data is decoded: a small PNG
can declare a gigapixel image). Only common formats are opened (Pillow's rarer decoders have the
longer CVE history).

SSRF: a URL is a request to fetch from wherever the worker runs. Cloud workers can reach metadata
endpoints (169.254.169.254 hands out credentials on several clouds), loopback services and the
private network, none of which a client should be able to reach through us. So hosts that resolve
to a non-public address (loopback, link-local, private, CGNAT, multicast, reserved) are refused,
and the address actually connected to is checked again before the body is read (a DNS answer that
changes between our lookup and httpx's, "DNS rebinding", gets no body back). Operators who serve
images from their own network set UIW_ALLOW_PRIVATE_URLS=1 (the older name
UIW_ALLOW_PRIVATE_IMAGE_URLS=1 still works; the tests do: they serve on 127.0.0.1). Proxies and
.netrc are ignored (trust_env=False): a proxy would hide the peer address, and .netrc would send
the operator's credentials to a host a client chose.

Every problem becomes a RequestError naming the field; a URL is echoed shortened, base64 never.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import logging
import os
import re
import socket
import time
from dataclasses import replace
from typing import Any
from urllib.parse import urljoin, urlsplit

from runtime.artifact import Limits
from runtime.schema import MIN_SIZE, GenerationRequest, RequestError

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 20 * 2**20  # 20 MiB: a large phone JPEG is under 10
MAX_IMAGE_PIXELS = 8192 * 8192  # decoded size: 64 Mpx, 192 MiB as RGB
FETCH_TIMEOUT_S = 10.0  # connect, and each read
FETCH_DEADLINE_S = 30.0  # the whole download, redirects included
MAX_REDIRECTS = 3
FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP")  # MPO: the JPEG variant many phones write
ALLOW_PRIVATE_ENV = "UIW_ALLOW_PRIVATE_URLS"
ALLOW_PRIVATE_ENV_OLD = "UIW_ALLOW_PRIVATE_IMAGE_URLS"  # the first name, kept working
USER_AGENT = "universal-image-worker"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_FORMS = "an https:// or http:// URL, a data:image/...;base64, URI or bare base64"


class _Bad(Exception):
    """One input's problem; attach_images prefixes the field name."""


def allow_private() -> bool:
    return any(
        os.environ.get(n, "").strip().lower() in ("1", "true", "yes")
        for n in (ALLOW_PRIVATE_ENV, ALLOW_PRIVATE_ENV_OLD)
    )


def _shown(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


def _public(ip: str) -> bool:
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


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _check_host(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise _Bad(f"cannot resolve the host {host!r} ({e})") from None
    for info in infos:
        ip = str(info[4][0])
        if not _public(ip):
            log.info("image URL host %s resolves to %s: refused", host, ip)
            raise _Bad(f"the host {host!r} is a private, loopback or link-local address; only public hosts are fetched")


def _check_url(url: str) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _Bad(f"not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _Bad(f"redirected to an unsupported scheme {scheme!r}; only http and https are fetched")
    if not parts.hostname:
        raise _Bad(f"no host in the URL {_shown(url)!r}")
    return parts.hostname, port or (443 if scheme == "https" else 80)


def _read_body(response: Any, url: str, deadline: float) -> bytes:
    too_big = f"more than the {MAX_IMAGE_BYTES} bytes allowed"
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_IMAGE_BYTES:
        raise _Bad(f"{_shown(url)} is {int(declared)} bytes, {too_big}")
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > MAX_IMAGE_BYTES:
            raise _Bad(f"{_shown(url)} is {too_big}")
        if time.monotonic() > deadline:
            raise _Bad(f"fetching {_shown(url)} took more than {FETCH_DEADLINE_S:g} s")
    return bytes(body)


def _fetch(url: str) -> bytes:
    import httpx

    private_ok = allow_private()
    deadline = time.monotonic() + FETCH_DEADLINE_S
    headers = {"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"}
    with httpx.Client(
        trust_env=False, follow_redirects=False, timeout=httpx.Timeout(FETCH_TIMEOUT_S), headers=headers
    ) as client:
        for _ in range(MAX_REDIRECTS + 1):
            host, port = _check_url(url)
            if not private_ok:
                _check_host(host, port)
            try:
                with client.stream("GET", url) as response:
                    stream = response.extensions.get("network_stream")
                    peer = stream.get_extra_info("server_addr") if stream is not None else None
                    if not private_ok and not (peer and _public(str(peer[0]))):
                        log.info("image URL %s connected to %s: refused", _shown(url), peer)
                        raise _Bad(f"the host {host!r} is a private, loopback or link-local address")
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise _Bad(f"fetching {_shown(url)}: a redirect without a Location")
                        url = urljoin(str(response.url), location)
                        continue
                    if response.status_code != 200:
                        raise _Bad(f"fetching {_shown(url)} answered HTTP {response.status_code}, expected 200")
                    return _read_body(response, url, deadline)
            except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as e:
                raise _Bad(f"fetching {_shown(url)} failed: {type(e).__name__}: {e}") from None
        raise _Bad(f"fetching {_shown(url)}: more than {MAX_REDIRECTS} redirects")


def _b64(text: str, what: str) -> bytes:
    text = "".join(text.split())  # line breaks and spaces that some encoders insert
    if not text:
        raise _Bad(f"{what} is empty")
    if len(text) > (MAX_IMAGE_BYTES + 2) // 3 * 4:
        raise _Bad(f"{what} decodes to more than the {MAX_IMAGE_BYTES} bytes allowed")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _Bad(f"{what} is not valid base64") from None


def read_bytes(value: str) -> bytes:
    """An image input as sent -> its encoded bytes (PNG, JPEG, ...), bounded."""
    value = value.strip()
    match = _SCHEME.match(value)
    if match is None:  # ":" is not in the base64 alphabet: no scheme, so bare base64
        return _b64(value, "bare base64")
    scheme = match.group(1).lower()
    if scheme == "data":
        header, comma, payload = value[5:].partition(",")
        params = [p.strip().lower() for p in header.split(";")]
        if not comma or "base64" not in params[1:]:
            raise _Bad("a data URI must be base64: data:image/png;base64,<data>")
        if not params[0].startswith("image/"):
            raise _Bad(f"a data URI of media type {params[0] or 'none'!r}; expected image/png, image/jpeg, ...")
        return _b64(payload, "the data URI's payload")
    if scheme in ("http", "https"):
        return _fetch(value)
    raise _Bad(f"unsupported scheme {scheme!r}; expected {_FORMS} (local files and other schemes are refused)")


def decode(data: bytes, mode: str) -> Any:
    """Encoded bytes -> a PIL image in `mode` ("RGB", or "L" for masks), upright per its EXIF."""
    import warnings

    from PIL import Image, ImageOps

    too_big = f"more than the {MAX_IMAGE_PIXELS} pixels allowed"
    try:
        # open() reads the header only; Pillow's own bomb check (a warning, an error at twice its
        # limit) is left to ours, below, which is tighter and says the size.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise _Bad(f"an image of {too_big}") from None
    except Exception:
        raise _Bad("not an image that can be read; expected PNG, JPEG, WebP, GIF or BMP") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise _Bad(f"{width}x{height} pixels, {too_big}")
    try:
        image.load()
        return ImageOps.exif_transpose(image).convert(mode)
    except Exception as e:
        raise _Bad(f"the {image.format} data is corrupt or truncated ({e})") from None


def fit_size(size: tuple[int, int], limits: Limits) -> tuple[int, int]:
    """An input image's size as an output size: scaled down to the artifact's maxima (aspect kept),
    rounded down to multiples of 8, at least MIN_SIZE."""
    width, height = size
    scale = min(1.0, limits.max_width / width, limits.max_height / height)

    def side(n: int, most: int) -> int:
        return min(most, max(MIN_SIZE, int(n * scale) // 8 * 8))

    return side(width, limits.max_width), side(height, limits.max_height)


def attach_images(request: GenerationRequest, limits: Limits) -> tuple[GenerationRequest, list[str]]:
    """Fetch and decode the request's image (and mask), resized to the output size.

    The output size is the request's width x height; with neither given, the input image's own
    size (as worker-sdxl, whose img2img keeps the input's size), fitted by fit_size. Raises
    RequestError listing every problem of both fields."""
    if request.control_urls:
        return _attach_control_images(request)
    if request.image_url is None:
        return request, []
    from PIL import Image

    errors: list[str] = []
    decoded: dict[str, Any] = {}
    for field, value, mode in (("image_url", request.image_url, "RGB"), ("mask_url", request.mask_url, "L")):
        if value is None:
            continue
        try:
            decoded[field] = decode(read_bytes(value), mode)
        except _Bad as e:
            errors.append(f"{field}: {e}")
    if errors:
        raise RequestError(errors)

    image, mask = decoded["image_url"], decoded.get("mask_url")
    warnings: list[str] = []
    if request.size_from_image:
        width, height = fit_size(image.size, limits)
        request = replace(request, width=width, height=height)
        why = "no width/height given: the input's size, within this artifact's maxima, in multiples of 8"
    else:
        why = "the requested width x height"
    size = (request.width, request.height)
    resized = {}
    for field, im in (("image_url", image), ("mask_url", mask)):
        if im is None:
            continue
        if im.size != size:
            warnings.append(f"{field}: resized from {im.size[0]}x{im.size[1]} to {size[0]}x{size[1]} ({why})")
            im = im.resize(size, Image.Resampling.LANCZOS)
        resized[field] = im
    return replace(request, image=resized["image_url"], mask=resized.get("mask_url")), warnings


def _attach_control_images(request: GenerationRequest) -> tuple[GenerationRequest, list[str]]:
    """Each ControlNet's image, decoded as RGB and resized to the output size (a control image
    must cover the latent grid exactly)."""
    from PIL import Image

    errors: list[str] = []
    images = []
    warnings = []
    size = (request.width, request.height)
    for i, value in enumerate(request.control_urls):
        try:
            im = decode(read_bytes(value), "RGB")
        except _Bad as e:
            errors.append(f"controlnets.{i}.image: {e}")
            continue
        if im.size != size:
            warnings.append(f"controlnets.{i}.image: resized from {im.size[0]}x{im.size[1]} to {size[0]}x{size[1]}")
            im = im.resize(size, Image.Resampling.LANCZOS)
        images.append(im)
    if errors:
        raise RequestError(errors)
    return replace(request, control_images=tuple(images)), warnings

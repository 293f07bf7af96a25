"""Request images (image_url, mask_url) -> decoded PIL images at the output size, before model work.

Accepted forms, as worker-sdxl clients send them: ``https://`` and ``http://`` URLs,
``data:image/<type>;base64,<data>`` URIs and bare base64. Nothing else: no ``file://`` (a request
must never read the worker's disk) and no other scheme (ftp, gopher, ... reach services an HTTP
client was never meant to).

Every input is bounded before it is decoded: bytes (MAX_IMAGE_BYTES, checked on the base64 text,
and by runtime.fetch on the Content-Length, while streaming and while undoing a Content-Encoding),
time (per socket operation, and overall: FETCH_DEADLINE_S or the request's own deadline, whichever
comes first, headers included), redirects (each hop checked like the first) and pixels (read from
the header, before the pixel data is decoded: a small PNG can declare a gigapixel image). Only
common formats are opened (Pillow's rarer decoders have the longer CVE history).

URLs are fetched by runtime.fetch, from public addresses only (SSRF: cloud metadata endpoints,
loopback and the private network are what a client must not reach through us), with the connection
pinned to the addresses that were checked. Operators who serve images from their own network set
UIW_ALLOW_PRIVATE_URLS=1 (the older name UIW_ALLOW_PRIVATE_IMAGE_URLS=1 still works; the tests do:
they serve on 127.0.0.1).

Every problem becomes a RequestError naming the field; a URL is echoed shortened, base64 never.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
from dataclasses import replace
from typing import Any

from runtime.artifact import Limits
from runtime.progress import Deadline
from runtime.schema import MIN_SIZE, GenerationRequest, RequestError
from runtime.settings import allow_private_urls

MAX_IMAGE_BYTES = 20 * 2**20  # 20 MiB: a large phone JPEG is under 10
MAX_IMAGE_PIXELS = 8192 * 8192  # decoded size: 64 Mpx, 192 MiB as RGB
FETCH_TIMEOUT_S = 10.0  # connect, and each read
FETCH_DEADLINE_S = 30.0  # the whole download, headers and redirects included
MAX_REDIRECTS = 3
# Pillow's opener names. JPEG's opener also reads MPO (the multi-picture JPEG many phones write):
# Pillow 13 registers no opener of MPO's own, and an unknown name in Image.open(formats=) raises.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# identity: a compressed body could unpack past MAX_IMAGE_BYTES (runtime.fetch bounds it anyway).
HEADERS = {"User-Agent": "universal-image-worker", "Accept": "image/*", "Accept-Encoding": "identity"}

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_FORMS = "an https:// or http:// URL, a data:image/...;base64, URI or bare base64"


class _Bad(Exception):
    """One input's problem; attach_images prefixes the field name."""


def _fetch(url: str, deadline: Deadline | None) -> bytes:
    """An image URL -> its bytes, within this module's bounds and the request's own deadline."""
    from runtime.fetch import Bounds, FetchError, fetch  # httpx/httpcore: only when a URL is sent

    own = time.monotonic() + FETCH_DEADLINE_S
    if deadline is not None and deadline.at < own:
        until, what = deadline.at, f"the request's time limit of {deadline.limit_s:g} s ({deadline.source})"
    else:
        until, what = own, f"the {FETCH_DEADLINE_S:g} s limit of a fetch"
    bounds = Bounds(MAX_IMAGE_BYTES, FETCH_TIMEOUT_S, until, what, MAX_REDIRECTS, allow_private_urls())
    try:
        return fetch(url, bounds, HEADERS)
    except FetchError as e:
        raise _Bad(str(e)) from None


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


def read_bytes(value: str, deadline: Deadline | None = None) -> bytes:
    """An image input as sent -> its encoded bytes (PNG, JPEG, ...), bounded; a URL is fetched
    within FETCH_DEADLINE_S and `deadline` (the request's), whichever comes first."""
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
        return _fetch(value, deadline)
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
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        # What Pillow raises for data it cannot identify or parse; anything else is a bug of ours
        # and must not read as the client's "not an image".
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


def attach_images(
    request: GenerationRequest, limits: Limits, deadline: Deadline | None = None
) -> tuple[GenerationRequest, list[str]]:
    """Fetch and decode the request's image (and mask), resized to the output size. `deadline`:
    the request's own, which bounds the fetches too (they stop at FETCH_DEADLINE_S otherwise).

    The output size is the request's width x height; with neither given, the input image's own
    size (as worker-sdxl, whose img2img keeps the input's size), fitted by fit_size. Raises
    RequestError listing every problem of both fields."""
    if request.control_urls:
        return _attach_control_images(request, deadline)
    if request.image_url is None:
        return request, []
    from PIL import Image

    errors: list[str] = []
    decoded: dict[str, Any] = {}
    for field, value, mode in (("image_url", request.image_url, "RGB"), ("mask_url", request.mask_url, "L")):
        if value is None:
            continue
        try:
            decoded[field] = decode(read_bytes(value, deadline), mode)
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


def _attach_control_images(
    request: GenerationRequest, deadline: Deadline | None
) -> tuple[GenerationRequest, list[str]]:
    """Each ControlNet's image, decoded as RGB and resized to the output size (a control image
    must cover the latent grid exactly)."""
    from PIL import Image

    errors: list[str] = []
    images = []
    warnings = []
    size = (request.width, request.height)
    for i, value in enumerate(request.control_urls):
        try:
            im = decode(read_bytes(value, deadline), "RGB")
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

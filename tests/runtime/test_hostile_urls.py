"""Image URLs served by hostile servers, over loopback with real HTTP servers started here.

Compressed bodies that unpack far past the byte limit ("zip bombs", in each Content-Encoding a
server might send), servers that dribble their headers or body, a name that resolves to a public
address for the check and to loopback for the connection (DNS rebinding), and the image formats
docs/serving.md accepts, decoded as Pillow itself decodes them.
"""

from __future__ import annotations

import base64
import gzip
import http.server
import io
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from runtime.artifact import Limits
from runtime.inputs import MAX_IMAGE_BYTES, attach_images
from runtime.progress import Deadline
from runtime.schema import GenerationRequest, RequestError
from tests.helpers.generation import tiny_request

LIMITS = Limits(max_width=1024, max_height=1024, max_steps=50, max_images=4)
BOMB_SIZE = 256 * 2**20  # unpacked: 12x MAX_IMAGE_BYTES
PUBLIC_IP = "93.184.215.14"  # a global unicast address; the test routes its connections to loopback


def picture(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


SOURCE = picture(48, 32, seed=0)


def encoded(fmt: str, pixels: np.ndarray = SOURCE) -> bytes:
    """`pixels` in Pillow format `fmt`, written by Pillow (MPO: two frames, as a phone writes)."""
    from PIL import Image

    image = Image.fromarray(pixels)
    out = io.BytesIO()
    if fmt == "MPO":
        image.save(out, "MPO", save_all=True, append_images=[Image.fromarray(255 - pixels)])
    else:
        image.save(out, fmt)
    return out.getvalue()


PNG = encoded("PNG")

Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class Server:
    """A threaded loopback HTTP server whose paths are answered by `routes`; `seen` records each
    request's (path, Host header)."""

    def __init__(self, routes: dict[str, Route]):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # a stuck client cannot hold a server thread

            def do_GET(self) -> None:
                server.seen.append((self.path, self.headers.get("Host")))
                route = server.routes.get(self.path)
                try:
                    if route is None:
                        reply(self, 404, b"not found")
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):  # the worker hung up: as it should
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.routes = routes
        self.seen: list[tuple[str, str | None]] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def reply(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


def serving(body: bytes, **headers: str) -> Route:
    return lambda handler: reply(handler, 200, body, **headers)


def dribble(data: bytes, every_s: float = 0.2, most_s: float = 8.0) -> Iterator[bytes]:
    """`data` a byte at a time, one every `every_s`, for at most `most_s` (the server's own bound)."""
    for i in range(min(len(data), int(most_s / every_s))):
        time.sleep(every_s)
        yield data[i : i + 1]


def slow_headers(handler: http.server.BaseHTTPRequestHandler) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Pad-%d: %d\r\n" % (i, i) for i in range(40))
    for byte in dribble(head):
        handler.wfile.write(byte)
        handler.wfile.flush()


def slow_body(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(PNG)))
    handler.end_headers()
    handler.wfile.flush()
    for byte in dribble(PNG):
        handler.wfile.write(byte)
        handler.wfile.flush()


def request(image_url: str, width: int = 48, height: int = 32) -> GenerationRequest:
    return tiny_request(
        task="img2img",
        prompt="x",
        width=width,
        height=height,
        steps=4,
        guidance_scale=7.5,
        strength=0.5,
        image_url=image_url,
    )


def errors_of(image_url: str, deadline: Deadline | None = None) -> list[str]:
    extra = (deadline,) if deadline is not None else ()  # the two-argument call also runs on older code
    with pytest.raises(RequestError) as e:
        attach_images(request(image_url), LIMITS, *extra)
    return e.value.errors


@pytest.fixture()
def private_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UIW_ALLOW_PRIVATE_URLS", "1")  # the test servers are on loopback


# --- compressed bodies ------------------------------------------------------------------------


def _zeros(compress: Callable[[bytes], bytes], flush: Callable[[], bytes]) -> bytes:
    chunk = bytes(2**20)
    return b"".join(compress(chunk) for _ in range(BOMB_SIZE // len(chunk))) + flush()


def bomb(encoding: str) -> bytes:
    """BOMB_SIZE zero bytes in `encoding`, made by that format's own library, streamed (never held whole)."""
    if encoding in ("gzip", "deflate"):
        z = zlib.compressobj(9, zlib.DEFLATED, 31 if encoding == "gzip" else 15)  # gzip or zlib header
        return _zeros(z.compress, z.flush)
    if encoding == "br":
        brotli = pytest.importorskip("brotli")
        b = brotli.Compressor(quality=5)
        return _zeros(b.process, b.finish)
    zstandard = pytest.importorskip("zstandard")
    zs = zstandard.ZstdCompressor().compressobj()
    return _zeros(zs.compress, zs.flush)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_a_compressed_bomb_is_refused_without_unpacking_past_the_limit(private_ok, encoding: str):
    body = bomb(encoding)
    assert len(body) < 300_000, "a bomb: small on the wire"
    routes = {"/a.png": serving(PNG), "/bomb.png": serving(body, Content_Type="image/png", Content_Encoding=encoding)}
    with Server(routes) as server:
        attach_images(request(f"{server.url}/a.png"), LIMITS)  # imports and set-up, before measuring
        tracemalloc.start()
        try:
            errors = errors_of(f"{server.url}/bomb.png")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(errors) == 1 and errors[0].startswith(f"image_url: {server.url}/bomb.png"), errors
    assert f"the {MAX_IMAGE_BYTES} bytes allowed" in errors[0], errors
    # The body is held up to the limit (20 MiB) and inflated a MiB at a time; unbounded decoding
    # holds at least one network read's worth inflated (64 KiB of gzip: ~64 MiB), or all of it.
    assert peak < 1.5 * MAX_IMAGE_BYTES, f"peak {peak / 2**20:.0f} MiB of Python allocations"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_gzip_or_deflate_image_within_the_limit_is_inflated(private_ok, encoding: str):
    # Servers that compress whatever the request asks (an object stored gzipped on S3) still work.
    body = gzip.compress(PNG) if encoding == "gzip" else zlib.compress(PNG)
    with Server({"/a.png": serving(body, Content_Encoding=encoding)}) as server:
        got, _ = attach_images(request(f"{server.url}/a.png"), LIMITS)
    assert np.array_equal(np.asarray(got.image), SOURCE)


def test_a_truncated_gzip_body_is_refused(private_ok):
    with Server({"/a.png": serving(gzip.compress(PNG)[:-30], Content_Encoding="gzip")}) as server:
        errors = errors_of(f"{server.url}/a.png")
    assert errors == [f"image_url: {server.url}/a.png: its gzip body is truncated"]


# --- slow servers -----------------------------------------------------------------------------


def timed_errors_of(image_url: str, deadline: Deadline | None = None) -> tuple[list[str], float]:
    """The errors of fetching `image_url` and the seconds it took to refuse it."""
    start = time.monotonic()
    errors = errors_of(image_url, deadline)
    return errors, time.monotonic() - start


def test_headers_dribbled_a_byte_at_a_time_stop_at_the_fetch_deadline(private_ok, monkeypatch):
    # The per-read timeout (10 s) never fires on a byte every 0.2 s: only the deadline can stop it.
    monkeypatch.setattr("runtime.inputs.FETCH_DEADLINE_S", 1.5)
    with Server({"/slow": slow_headers}) as server:
        errors, took = timed_errors_of(f"{server.url}/slow")
    assert errors == [
        f"image_url: fetching {server.url}/slow was stopped at the 1.5 s limit of a fetch. "
        "hint: serve the image from a faster host, or send it as base64"
    ]
    assert 1.4 < took < 4.5, took


def test_a_body_dribbled_a_byte_at_a_time_stops_at_the_fetch_deadline(private_ok, monkeypatch):
    monkeypatch.setattr("runtime.inputs.FETCH_DEADLINE_S", 1.5)
    with Server({"/slow": slow_body}) as server:
        errors, took = timed_errors_of(f"{server.url}/slow")
    assert len(errors) == 1 and errors[0].startswith(f"image_url: fetching {server.url}/slow"), errors
    assert took < 4.5, took


def test_the_request_deadline_bounds_a_fetch_that_is_within_its_own(private_ok):
    # The fetch limit stays 30 s: the request's 1 s deadline is the one that stops it.
    with Server({"/slow": slow_headers}) as server:
        errors, took = timed_errors_of(f"{server.url}/slow", Deadline.after(1.0, "the request's timeout"))
    assert errors == [
        f"image_url: fetching {server.url}/slow was stopped at the request's time limit of 1 s (the request's "
        "timeout). hint: serve the image from a faster host, or send it as base64"
    ]
    assert took < 4.0, took


def test_a_request_timeout_sent_by_the_client_bounds_its_image_fetch(call, private_ok):
    """Through the handler: the request's `timeout` reaches the fetch (UIW_REQUEST_TIMEOUT takes
    the same path, runtime.execute.Executor.deadline)."""
    with Server({"/slow": slow_headers}) as server:
        start = time.monotonic()
        reply_ = call({"prompt": "x", "image_url": f"{server.url}/slow", "timeout": 1})
        took = time.monotonic() - start
    assert set(reply_) == {"error", "errors"}, reply_
    assert "was stopped at the request's time limit of 1 s (the request's timeout)" in reply_["errors"][0]
    assert took < 4.5, took


# --- DNS rebinding ----------------------------------------------------------------------------


def test_the_connection_goes_to_the_address_that_was_checked(monkeypatch):
    """rebind.test resolves to a public address on the first lookup and to 127.0.0.1 on every later
    one. The worker must connect to the public address it checked (here routed to a loopback
    server standing in for that host), naming rebind.test in the Host header, and never send the
    request to the loopback server that a second lookup would pick."""
    for name in ("UIW_ALLOW_PRIVATE_URLS", "UIW_ALLOW_PRIVATE_IMAGE_URLS"):
        monkeypatch.delenv(name, raising=False)
    internal_image = encoded("PNG", 255 - SOURCE)
    with (
        Server({"/a.png": serving(PNG)}) as public_host,
        Server({"/a.png": serving(internal_image)}) as internal,
    ):
        lookups: list[str] = []
        connects: list[tuple[str, int]] = []
        real_getaddrinfo, real_connect = socket.getaddrinfo, socket.create_connection

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host != "rebind.test":
                return real_getaddrinfo(host, port, *args, **kwargs)
            lookups.append(host)
            ip = PUBLIC_IP if len(lookups) == 1 else "127.0.0.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port)))]

        def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
            connects.append(address)
            if address[0] == PUBLIC_IP:  # the public host "is" the stand-in server
                address = ("127.0.0.1", public_host.port)
            return real_connect(address, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", create_connection)
        monkeypatch.setattr("runtime.inputs.FETCH_DEADLINE_S", 5.0)
        url = f"http://rebind.test:{internal.port}/a.png"
        try:
            got, _ = attach_images(request(url), LIMITS)
        except RequestError as e:
            got = e
    assert internal.seen == [], "a request reached the address of the second lookup"
    assert connects == [(PUBLIC_IP, internal.port)]
    assert public_host.seen == [("/a.png", f"rebind.test:{internal.port}")]
    assert not isinstance(got, RequestError), got
    assert np.array_equal(np.asarray(got.image), SOURCE)


# --- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP"])
def test_every_accepted_format_decodes_as_pillow_decodes_it(fmt: str):
    from PIL import Image, ImageOps

    data = encoded(fmt)
    reference = Image.open(io.BytesIO(data))
    assert reference.format == fmt, "the test's file is what it says"
    expected = np.asarray(ImageOps.exif_transpose(reference).convert("RGB"))
    uri = f"data:image/{fmt.lower()};base64,{base64.b64encode(data).decode()}"
    got, warnings = attach_images(request(uri), LIMITS)
    assert warnings == []
    assert np.array_equal(np.asarray(got.image), expected)


def test_a_gif_fetched_from_a_server_is_accepted(private_ok):
    data = encoded("GIF")
    with Server({"/a.gif": serving(data, Content_Type="image/gif")}) as server:
        got, _ = attach_images(request(f"{server.url}/a.gif"), LIMITS)
    from PIL import Image

    assert np.array_equal(np.asarray(got.image), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))

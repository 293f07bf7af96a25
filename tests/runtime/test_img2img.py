"""img2img and inpaint from the one loaded model, through the real handler on the compiled demo
artifact: image inputs as base64, data URIs and loopback URLs; parity with plain diffusers'
from_pipe pipelines; shared weights; every bad input a clear request error naming its field."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import REQ, decode_image

PROMPT = REQ["prompt"]


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colour gradient with noise: an input the tiny VAE can encode."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    noise = np.random.default_rng(seed).integers(-20, 20, rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


SOURCE = picture(64, 64)
SOURCE_PNG = png(SOURCE)
SOURCE_B64 = base64.b64encode(SOURCE_PNG).decode()
MASK = np.zeros((64, 64), np.uint8)
MASK[16:48, 16:48] = 255  # white: repaint; black: keep
MASK_B64 = base64.b64encode(png(MASK)).decode()
BIG = 30 * 2**20  # over runtime.inputs.MAX_IMAGE_BYTES (20 MiB)


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 5  # a stuck client cannot hold a server thread

    def do_GET(self) -> None:
        routes: dict[str, Any] = {
            "/source.png": (200, {"Content-Type": "image/png"}, SOURCE_PNG),
            "/redirect": (302, {"Location": "/source.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/text": (200, {"Content-Type": "text/plain"}, b"hello, not an image"),
            "/declared-big": (200, {"Content-Length": str(BIG)}, b""),
        }
        try:
            if self.path == "/streamed-big":  # no Content-Length: the body ends when the connection does
                self.send_response(200)
                self.end_headers()
                for _ in range(BIG // 2**20):
                    self.wfile.write(b"\0" * 2**20)
                return
            status, headers, body = routes.get(self.path, (404, {}, b"not found"))
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the worker stopped reading: as it should
            pass

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A loopback HTTP server in a daemon thread: http://127.0.0.1:PORT."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture()
def private_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UIW_ALLOW_PRIVATE_IMAGE_URLS", "1")  # the test server is on loopback


@pytest.fixture(scope="module")
def demo_manifest(demo_artifact: Path) -> Any:
    from runtime.artifact import read_manifest

    return read_manifest(demo_artifact)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Plain diffusers on the builtin saved as a diffusers folder (as tests/runtime/test_handler.py)."""
    from diffusers import DiffusionPipeline

    from compiler.tiny_models import BUILTINS

    folder = tmp_path_factory.mktemp("plain")
    BUILTINS["tiny-sd15"].build().save_pretrained(folder)
    ref = DiffusionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    return ref


def reference(plain: Any, task_class: str, scheduler: str, steps: int = 4, **kwargs: Any) -> np.ndarray:
    """What a diffusers user writes: TaskPipeline.from_pipe(pipe), a scheduler from its config."""
    import diffusers
    import torch

    pipe = getattr(diffusers, task_class).from_pipe(plain)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT,
        negative_prompt="blurry, low quality",
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(7),
        **kwargs,
    )
    return np.array(out.images[0])


def ok(reply: dict) -> np.ndarray:
    assert "images" in reply, reply
    return decode_image(reply["images"][0])


# --- the pipelines --------------------------------------------------------------------------------


def test_task_pipelines_share_every_weight(service_env):
    loaded = service_env.default
    base = loaded.pipeline
    assert loaded.manifest.capabilities.tasks == ("txt2img", "img2img", "inpaint")
    assert {t: type(p).__name__ for t, p in loaded.pipelines.items()} == {
        "txt2img": "StableDiffusionPipeline",
        "img2img": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
    }
    assert loaded.pipelines["txt2img"] is base
    for task in ("img2img", "inpaint"):
        pipe = loaded.pipelines[task]
        for name in ("unet", "vae", "text_encoder", "tokenizer"):
            assert getattr(pipe, name) is getattr(base, name), (task, name)
        # its own scheduler (its __init__ may rewrite the config), from the same config
        assert pipe.scheduler is not base.scheduler
        assert dict(pipe.scheduler.config) == dict(base.scheduler.config)


def test_deriving_keeps_half_precision_weights_half(demo_manifest):
    """from_pipe casts every component to float32 unless told a dtype, in place, on the shared
    modules: the loader passes the loaded dtype, so a bf16 artifact stays bf16 for every task."""
    import torch

    from compiler.tiny_models import BUILTINS
    from runtime.loader import task_pipelines

    pipe = BUILTINS["tiny-sd15"].build().to(torch.bfloat16)
    pipelines = task_pipelines(pipe, demo_manifest)
    assert pipelines["inpaint"].unet is pipe.unet
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    # what the dtype argument prevents: from_pipe's default upcasts the shared weights in place
    type(pipelines["img2img"]).from_pipe(pipe)
    assert pipe.unet.dtype == torch.float32


# --- img2img ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "scheduler", "strength"),
    [({}, "EulerDiscreteScheduler", 0.3), ({"prompt_strength": 0.75, "scheduler": "DDIM"}, "DDIMScheduler", 0.75)],
    ids=["defaults", "ddim-0.75"],
)
def test_img2img_equals_plain_diffusers(call, plain, extra: dict, scheduler: str, strength: float):
    """A base64 PNG at the requested size: the same pixels as plain StableDiffusionImg2ImgPipeline
    (worker-sdxl's default strength 0.3; prompt_strength is its alias)."""
    from PIL import Image

    got = ok(call({**REQ, "image_url": SOURCE_B64, **extra}))
    expected = reference(
        plain, "StableDiffusionImg2ImgPipeline", scheduler, image=Image.fromarray(SOURCE), strength=strength
    )
    assert got.shape == (64, 64, 3)
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, ok(call(REQ))), "differs from txt2img with the same seed"


def test_every_input_form_gives_the_same_image(call, server, private_ok):
    """Bare base64, a data URI (via the init_image alias), a loopback URL and a redirect to it."""
    replies = [
        call({**REQ, "image_url": SOURCE_B64}),
        call({**REQ, "init_image": "data:image/png;base64," + SOURCE_B64}),
        call({**REQ, "image_url": f"{server}/source.png"}),
        call({**REQ, "image_url": f"{server}/redirect"}),
    ]
    assert all(r["images"] == replies[0]["images"] for r in replies), [r.get("error") for r in replies]
    assert all("warnings" not in r for r in replies)


def test_output_has_the_requested_size(call, server, private_ok):
    reply = call({**REQ, "image_url": f"{server}/source.png", "width": 96, "height": 72, "num_images": 2})
    assert [decode_image(u).shape for u in reply["images"]] == [(72, 96, 3)] * 2
    assert reply["warnings"] == ["image_url: resized from 64x64 to 96x72 (the requested width x height)"]


def test_without_a_size_the_output_takes_the_input_size(call):
    """As worker-sdxl, whose img2img keeps the input's size; rounded down to multiples of 8."""
    exact = call({"prompt": "x", "seed": 1, "image_url": base64.b64encode(png(picture(96, 72))).decode()})
    assert ok(exact).shape == (72, 96, 3) and "warnings" not in exact
    odd = call({"prompt": "x", "seed": 1, "image_url": base64.b64encode(png(picture(100, 75))).decode()})
    assert ok(odd).shape == (72, 96, 3)
    assert odd["warnings"] == [
        "image_url: resized from 100x75 to 96x72 "
        "(no width/height given: the input's size, within this artifact's maxima, in multiples of 8)"
    ]


# --- inpaint ----------------------------------------------------------------------------------


def test_inpaint_equals_plain_diffusers_and_differs_from_img2img(call, plain):
    """Inpainting's default strength is 1.0 (the masked region starts from noise). The tiny UNet is
    not an inpainting one (4 input channels): diffusers blends the known region back each step."""
    from PIL import Image

    req = {**REQ, "image_url": SOURCE_B64, "mask": MASK_B64, "width": 64, "height": 64, "num_inference_steps": 2}
    first, again = call(req), call(req)
    assert first["images"] == again["images"], "deterministic"
    got = ok(first)
    assert got.shape == (64, 64, 3)
    expected = reference(
        plain,
        "StableDiffusionInpaintPipeline",
        "EulerDiscreteScheduler",
        steps=2,
        image=Image.fromarray(SOURCE),
        mask_image=Image.fromarray(MASK),
        width=64,
        height=64,
        strength=1.0,
    )
    assert np.array_equal(got, expected)
    img2img = ok(call({**req, "mask": None, "strength": 1.0}))
    assert not np.array_equal(got, img2img)


# --- bad inputs -------------------------------------------------------------------------------


@functools.cache
def _bomb() -> str:
    """A 10000x10000 PNG of a few kilobytes: 100 Mpx once decoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


BAD: list[tuple[dict, list[str]]] = [
    ({"image_url": "not base64!"}, ["image_url: bare base64 is not valid base64"]),
    ({"image_url": "data:image/png;base64,%%%"}, ["image_url: the data URI's payload is not valid base64"]),
    ({"image_url": "data:text/plain;base64,aGk="}, ["image_url: a data URI of media type 'text/plain'"]),
    ({"image_url": "data:image/png,rawbytes"}, ["image_url: a data URI must be base64"]),
    ({"image_url": base64.b64encode(b"GIF89a? no").decode()}, ["image_url: not an image that can be read"]),
    ({"image_url": base64.b64encode(SOURCE_PNG[:200]).decode()}, ["image_url: the PNG data is corrupt or truncated"]),
    ({"image_url": "{bomb}"}, ["image_url: 10000x10000 pixels, more than the 67108864 pixels allowed"]),
    ({"image_url": "file:///etc/passwd"}, ["image_url: unsupported scheme 'file'"]),
    ({"image_url": "ftp://example.com/a.png"}, ["image_url: unsupported scheme 'ftp'"]),
    ({"image_url": "{server}/missing.png"}, ["image_url: fetching http://127.0.0.1:", "answered HTTP 404"]),
    ({"image_url": "{server}/text"}, ["image_url: not an image that can be read"]),
    ({"image_url": "{server}/declared-big"}, [f"is {BIG} bytes, more than the 20971520 bytes allowed"]),
    ({"image_url": "{server}/streamed-big"}, ["image_url: http://", "is more than the 20971520 bytes allowed"]),
    ({"image_url": "{server}/loop"}, ["image_url: fetching", "more than 3 redirects"]),
    ({"image_url": "http://127.0.0.1:9/x.png"}, ["image_url: fetching http://127.0.0.1:9/x.png failed: ConnectError"]),
    ({"mask_url": MASK_B64}, ["mask_url: a mask needs the image it masks"]),
    ({"image_url": SOURCE_B64, "mask": "AAAA"}, ["mask_url: not an image that can be read"]),
    ({"image_url": "???", "mask_url": "file:/x"}, ["image_url: bare base64", "mask_url: unsupported scheme 'file'"]),
    ({"image_url": SOURCE_B64, "strength": 0.2}, ["strength: 0.2 with num_inference_steps 4 leaves no denoising step"]),
    ({"image_url": SOURCE_B64, "strength": 0}, ["strength: 0.0 with num_inference_steps 4"]),
]


@pytest.mark.parametrize(("patch", "messages"), BAD, ids=[f"{i}-{'+'.join(p)}" for i, (p, _) in enumerate(BAD)])
def test_bad_image_inputs_are_request_errors(call, server, private_ok, patch: dict, messages: list[str]):
    fill = {"server": server, "bomb": _bomb() if "{bomb}" in str(patch) else ""}
    reply = call({"prompt": "x", **{k: v.format(**fill) if isinstance(v, str) else v for k, v in patch.items()}})
    assert set(reply) == {"error", "errors"}, reply
    for message in messages:
        assert any(message in e for e in reply["errors"]), (message, reply["errors"])
    assert "AAAA" not in reply["error"] and SOURCE_B64[:40] not in reply["error"], "base64 is never echoed"


@pytest.mark.parametrize(
    "url", ["{server}/source.png", "http://169.254.169.254/latest/meta-data/", "http://[::1]:9/", "http://10.0.0.1/"]
)
def test_private_and_loopback_hosts_are_refused_by_default(call, server, monkeypatch, url: str):
    monkeypatch.delenv("UIW_ALLOW_PRIVATE_IMAGE_URLS", raising=False)
    reply = call({"prompt": "x", "image_url": url.format(server=server)})
    assert set(reply) == {"error", "errors"}, reply
    assert reply["errors"][0].startswith("image_url: the host ")
    assert reply["errors"][0].endswith("is a private, loopback or link-local address; only public hosts are fetched")


def test_a_task_the_artifact_lacks_is_refused_before_any_fetch(demo_manifest):
    from runtime.artifact import Capabilities
    from runtime.schema import RequestError, validate

    def only(task: str) -> Any:
        return demo_manifest.model_copy(update={"capabilities": Capabilities(tasks=(task,), pipelines={})})

    txt2img_only = only("txt2img")
    with pytest.raises(RequestError) as e:
        validate({"prompt": "x", "image_url": "https://example.com/a.png"}, txt2img_only)
    assert e.value.errors == ["image_url: the img2img task is not supported by this artifact; it supports: txt2img"]
    img2img_only = only("img2img")
    with pytest.raises(RequestError) as e:
        validate({"prompt": "x"}, img2img_only)
    assert e.value.errors == ["image_url: required, this artifact does not generate from text; it supports: img2img"]


def test_ipv6_forms_of_private_ipv4_addresses_are_private():
    from runtime.fetch import public as _public

    # IPv4-mapped, 6to4 and NAT64 forms of the metadata address reach it through a gateway.
    for ip in ("::ffff:169.254.169.254", "2002:a9fe:a9fe::1", "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1"):
        assert not _public(ip), ip
    assert _public("2606:4700:4700::1111") and _public("64:ff9b::808:808")  # public v6, NAT64 of 8.8.8.8

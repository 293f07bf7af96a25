"""Output formats: image_format (png, jpeg, webp) and quality, as data URIs with the right MIME
type; each reply's bytes are exactly what Pillow writes for the generated pixels."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REQ


@pytest.fixture(scope="module")
def svc(home: Path, demo_artifact: Path) -> Any:
    from runtime.service import Service, Settings

    return Service(Settings(artifacts=(str(demo_artifact),), home=home))


def payload(uri: str) -> tuple[str, bytes]:
    header, _, data = uri.partition(",")
    assert header.startswith("data:") and header.endswith(";base64"), header
    return header[len("data:") : -len(";base64")], base64.b64decode(data)


def test_formats_carry_their_mime_type_and_pillows_exact_bytes(svc):
    png = svc.run(REQ)
    mime, png_bytes = payload(png["images"][0])
    assert mime == "image/png"
    pixels = Image.open(io.BytesIO(png_bytes))
    assert pixels.format == "PNG" and pixels.size == (64, 64)
    assert svc.run({**REQ, "image_format": "png"})["images"] == png["images"]

    for fmt, mime_type, quality, options in (
        ("jpeg", "image/jpeg", 90, {}),  # the default quality
        ("jpeg", "image/jpeg", 40, {}),
        ("webp", "image/webp", 90, {"method": 2}),
        ("webp", "image/webp", 40, {"method": 2}),
    ):
        ask = {"image_format": fmt} | ({} if quality == 90 else {"quality": quality})
        reply = svc.run({**REQ, **ask})
        assert "warnings" not in reply and reply["seed"] == REQ["seed"], reply
        got_mime, data = payload(reply["image_url"])
        assert got_mime == mime_type
        # The independent reference: Pillow encoding the PNG reply's pixels itself.
        ref = io.BytesIO()
        pixels.convert("RGB").save(ref, format=fmt.upper(), quality=quality, **options)
        assert data == ref.getvalue(), (fmt, quality)
        decoded = Image.open(io.BytesIO(data))
        assert decoded.format == fmt.upper() and decoded.size == (64, 64)


def test_quality_trades_bytes_for_fidelity(svc):
    png = np.array(Image.open(io.BytesIO(payload(svc.run(REQ)["images"][0])[1])).convert("RGB")).astype(int)
    for fmt in ("jpeg", "webp"):
        low, high = (payload(svc.run({**REQ, "image_format": fmt, "quality": q})["images"][0])[1] for q in (10, 95))
        assert len(low) < len(high)
        err = [np.abs(np.array(Image.open(io.BytesIO(b)).convert("RGB")).astype(int) - png).mean() for b in (low, high)]
        assert err[1] < err[0], (fmt, err)


def test_png_ignores_quality_with_a_warning_and_bad_values_are_refused(svc):
    reply = svc.run({**REQ, "quality": 50})
    assert reply["warnings"] == ["quality: ignored, png is lossless (ask for image_format jpeg or webp)"]
    assert reply["images"] == svc.run(REQ)["images"]
    bad = svc.run({**REQ, "image_format": "gif", "quality": 0})
    assert "images" not in bad
    assert any(e.startswith("image_format: Input should be 'png', 'jpeg' or 'webp'") for e in bad["errors"]), bad
    assert any(e.startswith("quality: Input should be greater than or equal to 1") for e in bad["errors"]), bad


def test_several_images_each_encoded(svc):
    reply = svc.run({**REQ, "num_images": 2, "image_format": "jpeg"})
    assert len(reply["images"]) == 2 and reply["image_url"] == reply["images"][0]
    assert all(payload(u)[0] == "image/jpeg" for u in reply["images"])
    assert reply["images"][0] != reply["images"][1]


def test_encode_is_lossless_for_png_and_takes_rgba_for_jpeg():
    from runtime.encode import encode

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    out = encode(Image.fromarray(rgb), "png")
    assert out.mime == "image/png" and out.extension == ".png"
    assert np.array_equal(np.array(Image.open(io.BytesIO(out.data))), rgb)
    rgba = Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA")
    assert Image.open(io.BytesIO(encode(rgba, "jpeg", 80).data)).mode == "RGB"
    assert encode(rgba, "webp").data_uri().startswith("data:image/webp;base64,")

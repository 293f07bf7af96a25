"""PIL image -> encoded bytes (PNG, JPEG or WebP) with their MIME type, and data URIs.

Encoding is most of the runtime's own cost at large sizes, so the settings are chosen by
measurement (bench/overhead.py, bench/RESULTS.md "Per-request overhead"): at 1024x1024 zlib level 1
with the run-length strategy writes PNG several times faster than Pillow's default level 6, for
files somewhat larger; JPEG is fastest by far, WebP smallest.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Literal

Format = Literal["png", "jpeg", "webp"]

# zlib level 1 + Z_RLE (3): PNG's filters already turn smooth areas into runs of small values,
# which RLE codes nearly as well as full deflate search at a fraction of the time.
PNG_OPTIONS: dict[str, Any] = {"compress_level": 1, "compress_type": 3}
# libwebp's method trades speed for size (0 fastest .. 6 smallest; Pillow's default is 4).
WEBP_METHOD = 2
# jpeg/webp quality when a request gives none: visually close to lossless at a fraction of PNG's
# bytes (Pillow's own defaults, 75 and 80, show blocking on smooth gradients).
DEFAULT_QUALITY = 90

MIME: dict[Format, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSION: dict[Format, str] = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


@dataclass(frozen=True)
class Encoded:
    data: bytes
    image_format: Format

    @property
    def mime(self) -> str:
        return MIME[self.image_format]

    @property
    def extension(self) -> str:
        return EXTENSION[self.image_format]

    def data_uri(self) -> str:
        return f"data:{self.mime};base64," + base64.b64encode(self.data).decode("ascii")


def encode(image: Any, image_format: Format = "png", quality: int | None = None) -> Encoded:
    """Encode one RGB(A) PIL image. quality (1-100) applies to jpeg and webp; png is lossless."""
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG", **PNG_OPTIONS)
    elif image_format == "jpeg":
        # JPEG has no alpha channel; our pipelines draw RGB, but a caller's RGBA must not fail here.
        rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
        rgb.save(buf, format="JPEG", quality=quality or DEFAULT_QUALITY)
    elif image_format == "webp":
        image.save(buf, format="WEBP", quality=quality or DEFAULT_QUALITY, method=WEBP_METHOD)
    else:
        raise ValueError(f"image_format: {image_format!r} is not one of png, jpeg, webp. hint: see runtime.encode")
    return Encoded(buf.getvalue(), image_format)

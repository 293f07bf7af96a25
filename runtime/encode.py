"""PIL images -> what the reply carries (data URIs for now)."""

from __future__ import annotations

import base64
import io
from typing import Any


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(image: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")

"""Generated images -> the values a reply carries: data URIs, or URLs of uploaded objects.

worker-sdxl's reply shape either way (``images`` and ``image_url``, its first): without a bucket
each value is a ``data:<mime>;base64,…`` URI in the request's ``image_format``; with
``BUCKET_ENDPOINT_URL`` set (runtime.upload) each value is a presigned URL of the uploaded file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runtime import settings
from runtime.encode import encode
from runtime.schema import GenerationRequest
from runtime.settings import Bucket
from runtime.upload import UploadError, upload

__all__ = ["Delivered", "UploadError", "deliver", "destination"]


@dataclass(frozen=True)
class Delivered:
    values: tuple[str, ...]  # one per image, in order: data URIs or URLs
    encode_s: float
    upload_s: float  # 0.0 when no bucket is configured
    nbytes: int  # encoded bytes, all images together

    def reply(self, seed: int) -> dict[str, Any]:
        """worker-sdxl's reply fields."""
        return {"images": list(self.values), "image_url": self.values[0], "seed": seed}


def destination(s3_config: object = None) -> Bucket | None:
    """Where this request's images go: the job's ``s3Config`` when it has one, else this worker's
    bucket, else None for data URIs. Read per request (cheap), so a changed environment needs no
    restart; call it before model work, as a partial configuration raises UploadError (an error
    reply, not an image silently kept somewhere else)."""
    try:
        return settings.bucket() if s3_config is None else settings.job_bucket(s3_config)
    except settings.SettingError as e:
        raise UploadError(str(e)) from e


def deliver(images: Sequence[Any], request: GenerationRequest, job_id: str, bucket: Bucket | None) -> Delivered:
    """Encode every image as the request asks; upload them when a bucket is given.
    Raises UploadError when an upload fails."""
    t0 = time.perf_counter()
    encoded = [encode(image, request.image_format, request.quality) for image in images]
    t1 = time.perf_counter()
    if bucket is None:
        values = tuple(e.data_uri() for e in encoded)
        t2 = time.perf_counter()
        return Delivered(values, t2 - t0, 0.0, sum(len(e.data) for e in encoded))
    urls = tuple(upload(bucket, job_id, encoded))
    return Delivered(urls, t1 - t0, time.perf_counter() - t1, sum(len(e.data) for e in encoded))

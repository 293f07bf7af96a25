"""Encoded images (and videos) -> objects in S3-compatible storage, answered with URLs instead of data URIs.

The configuration (parsed by runtime.settings.bucket) is the RunPod SDK uploader's
(runpod.serverless.utils.rp_upload, which worker-sdxl calls), so an endpoint configured for
worker-sdxl uploads here unchanged: ``BUCKET_ENDPOINT_URL``, ``BUCKET_ACCESS_KEY_ID``,
``BUCKET_SECRET_ACCESS_KEY``; the bucket is ``BUCKET_NAME``, else the SDK's default, the
current month as ``MM-YY``; keys are ``<job id>/<8 hex>.<ext>``; the reply carries a presigned
GET URL valid for 7 days (``UIW_UPLOAD_URL_EXPIRES`` seconds); the region is read from
AWS/Backblaze (``.s3.<region>.``) and DigitalOcean Spaces endpoint URLs. A job's ``s3Config``
(RunPod's per-job bucket) replaces the environment's bucket for that job (runtime.outputs).

Where the SDK falls back silently (no endpoint or no keys: it writes the image to a local folder
and returns that path, useless to a remote client), this module refuses: a half-configured bucket
is an error reply, before any model work, and a failed upload is an error reply, never a data URI.
We call boto3 directly rather than rp_upload: its import configures the root logger and its
helpers return local paths on failure.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import urlsplit

from runtime.settings import BUCKET_ENV, ENDPOINT_ENV, Bucket, url_expires


class Blob(Protocol):
    """An encoded file to upload: runtime.encode.Encoded (an image) or runtime.video.EncodedVideo."""

    @property
    def data(self) -> bytes: ...

    @property
    def mime(self) -> str: ...

    @property
    def extension(self) -> str: ...


class UploadError(Exception):
    """A bucket that is configured wrongly or failed; the message says what and ends with a hint."""


@lru_cache(maxsize=4)
def _client(bucket: Bucket) -> Any:
    """One boto3 client per configuration (thread-safe, and creating one costs ~50 ms)."""
    import boto3
    from botocore.config import Config

    # Checksums only when an operation requires one: botocore >= 1.36 adds CRC32 checksum headers
    # to every PutObject by default, which Cloudflare R2, Backblaze B2 and older MinIO refuse.
    # Path-style addressing (endpoint/bucket/key) everywhere but AWS: MinIO and most self-hosted
    # endpoints have no per-bucket host names; R2, B2 and Spaces accept both.
    config = Config(
        signature_version="s3v4",
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": addressing_style(bucket.endpoint_url)},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=bucket.endpoint_url,
        aws_access_key_id=bucket.access_key_id,
        aws_secret_access_key=bucket.secret_access_key,
        region_name=bucket.region,
        config=config,
    )


def upload(bucket: Bucket, job_id: str, images: Sequence[Blob]) -> list[str]:
    """Put every image under ``<job id>/`` (in parallel) and return their presigned URLs, in order.
    Raises UploadError naming the bucket and key of the first failure."""
    client = _client(bucket)
    expires = url_expires()
    name = bucket.bucket_name()
    prefix = _safe_prefix(job_id)

    def put(image: Blob) -> str:
        key = f"{prefix}/{uuid.uuid4().hex[:8]}{image.extension}"
        try:
            client.put_object(Bucket=name, Key=key, Body=image.data, ContentType=image.mime)
            url: str = client.generate_presigned_url(
                "get_object", Params={"Bucket": name, "Key": key}, ExpiresIn=expires
            )
        except Exception as e:  # botocore's ClientError, connection and credential errors alike
            raise UploadError(
                f"upload of s3://{name}/{key} to {bucket.endpoint_url} failed: {type(e).__name__}: {e}. "
                f"hint: check that the bucket exists ({BUCKET_ENV}, default MM-YY), that the keys may write to "
                f"it and that {ENDPOINT_ENV} is reachable from the worker"
            ) from e
        return url

    if len(images) == 1:
        return [put(images[0])]
    with ThreadPoolExecutor(max_workers=min(len(images), 8), thread_name_prefix="upload") as pool:
        return list(pool.map(put, images))


def addressing_style(endpoint_url: str) -> str:
    """``virtual`` (bucket.host) for AWS, ``path`` (host/bucket) for every other endpoint."""
    host = (urlsplit(endpoint_url).hostname or "").lower()
    return "virtual" if host == "amazonaws.com" or host.endswith(".amazonaws.com") else "path"


def _safe_prefix(job_id: str) -> str:
    """The job id as one key segment: RunPod ids are [A-Za-z0-9-]; anything else is replaced so a
    client-chosen id (local test server) cannot reach outside its folder."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id).strip(".")
    return cleaned or "job"

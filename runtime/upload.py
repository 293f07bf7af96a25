"""Encoded images -> objects in S3-compatible storage, answered with URLs instead of data URIs.

The configuration is the RunPod SDK uploader's (runpod.serverless.utils.rp_upload, which
worker-sdxl calls), so an endpoint configured for worker-sdxl uploads here unchanged:
``BUCKET_ENDPOINT_URL``, ``BUCKET_ACCESS_KEY_ID``, ``BUCKET_SECRET_ACCESS_KEY``; the bucket is
``BUCKET_NAME``, else the SDK's default, the current month as ``MM-YY``; keys are
``<job id>/<8 hex>.<ext>``; the reply carries a presigned GET URL valid for 7 days; the region is
read from AWS/Backblaze (``.s3.<region>.``) and DigitalOcean Spaces endpoint URLs.

Where the SDK falls back silently (no endpoint or no keys: it writes the image to a local folder
and returns that path, useless to a remote client), this module refuses: a half-configured bucket
is an error reply, before any model work, and a failed upload is an error reply, never a data URI.
We call boto3 directly rather than rp_upload: its import configures the root logger and its
helpers return local paths on failure.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from runtime.encode import Encoded

ENDPOINT_ENV = "BUCKET_ENDPOINT_URL"
KEY_ID_ENV = "BUCKET_ACCESS_KEY_ID"
SECRET_ENV = "BUCKET_SECRET_ACCESS_KEY"
BUCKET_ENV = "BUCKET_NAME"
URL_EXPIRES_S = 7 * 24 * 3600  # the SDK's presigned URL lifetime (604800 s)


class UploadError(Exception):
    """A bucket that is configured wrongly or failed; the message says what and ends with a hint."""


@dataclass(frozen=True)
class Bucket:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    name: str | None  # None: the SDK's default, chosen per upload (the month changes)
    region: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Bucket | None:
        """The bucket to upload to, or None when none is configured (replies carry data URIs).
        Raises UploadError for a partial configuration: never a silent fallback."""
        env = os.environ if env is None else env
        endpoint = env.get(ENDPOINT_ENV, "").strip()
        key_id, secret = env.get(KEY_ID_ENV, "").strip(), env.get(SECRET_ENV, "").strip()
        if not endpoint:
            if key_id or secret:
                raise UploadError(
                    f"{KEY_ID_ENV}/{SECRET_ENV} are set but {ENDPOINT_ENV} is not, so images cannot be uploaded. "
                    f"hint: set {ENDPOINT_ENV} (e.g. https://s3.us-east-1.amazonaws.com), or unset the keys to "
                    "receive images as data URIs."
                )
            return None
        missing = [name for name, value in ((KEY_ID_ENV, key_id), (SECRET_ENV, secret)) if not value]
        if missing:
            raise UploadError(
                f"{ENDPOINT_ENV} is set ({endpoint}) but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not, so images cannot be uploaded. "
                f"hint: set {KEY_ID_ENV} and {SECRET_ENV} to the bucket's keys, "
                f"or unset {ENDPOINT_ENV} to receive images as data URIs."
            )
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UploadError(
                f"{ENDPOINT_ENV}: {endpoint!r} is not an http(s) URL. hint: give the S3 endpoint, e.g. "
                "https://s3.us-east-1.amazonaws.com or https://<account>.r2.cloudflarestorage.com"
            )
        name = env.get(BUCKET_ENV, "").strip() or None
        return cls(endpoint.rstrip("/"), key_id, secret, name, region_of(endpoint))

    def bucket_name(self) -> str:
        return self.name or time.strftime("%m-%y")  # the SDK's default bucket


def region_of(endpoint_url: str) -> str | None:
    """The region in an endpoint URL, as the SDK reads it (rp_upload.extract_region_from_url) for
    AWS/Backblaze (``[bucket.]s3.<region>.…``) and DigitalOcean Spaces (``<region>.digitaloceanspaces.com``);
    None otherwise (boto3 then takes AWS_DEFAULT_REGION, else signs for us-east-1)."""
    labels = (urlsplit(endpoint_url).hostname or "").split(".")
    if "s3" in labels[:-2]:
        region = labels[labels.index("s3") + 1]
        return None if region == "amazonaws" else region
    if labels[-2:] == ["digitaloceanspaces", "com"] and len(labels) >= 3:
        return labels[-3]
    return None


@lru_cache(maxsize=4)
def _client(bucket: Bucket) -> Any:
    """One boto3 client per configuration (thread-safe, and creating one costs ~50 ms)."""
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=bucket.endpoint_url,
        aws_access_key_id=bucket.access_key_id,
        aws_secret_access_key=bucket.secret_access_key,
        region_name=bucket.region,
        config=config,
    )


def upload(bucket: Bucket, job_id: str, images: Sequence[Encoded]) -> list[str]:
    """Put every image under ``<job id>/`` (in parallel) and return their presigned URLs, in order.
    Raises UploadError naming the bucket and key of the first failure."""
    client = _client(bucket)
    name = bucket.bucket_name()
    prefix = _safe_prefix(job_id)

    def put(image: Encoded) -> str:
        key = f"{prefix}/{uuid.uuid4().hex[:8]}{image.extension}"
        try:
            client.put_object(Bucket=name, Key=key, Body=image.data, ContentType=image.mime)
            url: str = client.generate_presigned_url(
                "get_object", Params={"Bucket": name, "Key": key}, ExpiresIn=URL_EXPIRES_S
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


def _safe_prefix(job_id: str) -> str:
    """The job id as one key segment: RunPod ids are [A-Za-z0-9-]; anything else is replaced so a
    client-chosen id (local test server) cannot reach outside its folder."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id).strip(".")
    return cleaned or "job"

"""A job's ``s3Config`` (RunPod's per-job bucket: accessId, accessSecret, bucketName, endpointUrl)
through the real handler, against a local S3 server (moto): it wins over the environment's bucket,
a bad one is an error reply naming the bucket, uploads carry no optional checksums (R2, B2 and
older MinIO refuse them) and the presigned URLs live ``UIW_UPLOAD_URL_EXPIRES`` seconds."""

from __future__ import annotations

import asyncio
import base64
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest

from tests.conftest import REQ

BUCKET_VARS = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "BUCKET_NAME")


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3(s3_endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    )


@pytest.fixture()
def bucket(s3: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    for var in (*BUCKET_VARS, "UIW_UPLOAD_URL_EXPIRES"):
        monkeypatch.delenv(var, raising=False)
    name = f"job-{time.monotonic_ns()}"
    s3.create_bucket(Bucket=name)
    return name


def job(s3_endpoint: str, bucket: str, **extra: Any) -> dict[str, Any]:
    config = {"accessId": "job-key", "accessSecret": "job-secret", "bucketName": bucket, "endpointUrl": s3_endpoint}
    return {"id": "job-s3", "input": REQ, "s3Config": {**config, **extra}}


def handle(service_env: Any, body: dict[str, Any]) -> dict[str, Any]:
    from runtime.handler import handler

    return asyncio.run(handler(body))


def key_of(url: str, bucket: str) -> str:
    path = urllib.parse.urlsplit(url).path
    assert path.startswith(f"/{bucket}/job-s3/"), url  # path-style on a non-AWS endpoint
    return path[len(bucket) + 2 :]


def test_s3config_wins_over_the_environment(service_env, s3, s3_endpoint, bucket, monkeypatch):
    reference = handle(service_env, {"id": "ref", "input": REQ})["images"][0]
    env_bucket = f"env-{bucket}"
    s3.create_bucket(Bucket=env_bucket)
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("BUCKET_NAME", env_bucket)
    monkeypatch.setenv("UIW_UPLOAD_URL_EXPIRES", "3600")
    reply = handle(service_env, job(s3_endpoint, bucket))
    assert "error" not in reply, reply
    url = reply["image_url"]
    assert "X-Amz-Expires=3600" in url and "X-Amz-Credential=job-key" in url
    key = key_of(url, bucket)
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = resp.read()
    assert body == base64.b64decode(reference.partition(",")[2])  # the same PNG a data URI carries
    assert s3.list_objects_v2(Bucket=env_bucket)["KeyCount"] == 0  # nothing went to the environment's
    # No optional checksum was sent with the upload (botocore would add CRC32 by default).
    head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert not [k for k in head if k.startswith("Checksum")], head


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"bucketName": "no-such-bucket"}, ["s3://no-such-bucket/job-s3/", "NoSuchBucket"]),
        ({"accessSecret": ""}, ["s3Config (bucket", "accessSecret", "hint:"]),
        ({"endpointUrl": "ftp://127.0.0.1:1"}, ["s3Config (bucket", "not an http(s) URL"]),
        ({"region": "x"}, ["s3Config (bucket", "unknown fields region"]),
    ],
)
def test_a_bad_s3config_is_an_error_reply_naming_the_bucket(service_env, s3_endpoint, bucket, change, words):
    body = job(s3_endpoint, bucket, **change)
    reply = handle(service_env, body)
    assert "error" in reply and not {"images", "image_url"} & set(reply), reply
    assert body["s3Config"]["bucketName"] in reply["error"]
    for word in words:
        assert word in reply["error"], reply["error"]

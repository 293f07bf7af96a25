"""Uploads to S3-compatible storage: a moto server on 127.0.0.1 stands for the bucket. Images land
under <job id>/ with their MIME type, the reply's URLs fetch them (urllib) and boto3 reads them,
and their bytes equal the images the same request returns as data URIs without a bucket. A
half-configured bucket and a failed upload are error replies, never a data URI or a local path."""

from __future__ import annotations

import base64
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, REQ
from tests.helpers.devserver import dev_server, post

KEYS = {"BUCKET_ACCESS_KEY_ID": "testing", "BUCKET_SECRET_ACCESS_KEY": "testing-secret"}
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
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=KEYS["BUCKET_ACCESS_KEY_ID"],
        aws_secret_access_key=KEYS["BUCKET_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


@pytest.fixture(scope="module")
def svc(home: Path, demo_artifact: Path) -> Any:
    from runtime.service import Service, Settings

    return Service(Settings(artifacts=(str(demo_artifact),), home=home))


@pytest.fixture()
def bucket_env(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str, s3: Any) -> str:
    for var in BUCKET_VARS:
        monkeypatch.delenv(var, raising=False)
    name = f"uiw-{time.monotonic_ns()}"
    s3.create_bucket(Bucket=name)
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", s3_endpoint)
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BUCKET_NAME", name)
    return name


def run(svc: Any, job: dict[str, Any], job_id: str) -> dict[str, Any]:
    from runtime.execute import RunContext

    return svc.run(job, RunContext(request_id=job_id))


def without_bucket(svc: Any, job: dict[str, Any]) -> list[bytes]:
    saved = {v: os.environ.pop(v) for v in BUCKET_VARS if v in os.environ}
    try:
        reply = run(svc, job, "reference")
    finally:
        os.environ.update(saved)
    return [base64.b64decode(u.partition(",")[2]) for u in reply["images"]]


def fetch(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read(), resp.headers["Content-Type"]


def key_of(url: str, bucket: str) -> str:
    path = urllib.request.urlparse(url).path
    assert path.startswith(f"/{bucket}/"), url  # path-style on an IP endpoint
    return path[len(bucket) + 2 :]


@pytest.mark.parametrize(("fmt", "ext", "mime"), [("png", "png", "image/png"), ("jpeg", "jpg", "image/jpeg")])
def test_images_land_in_the_bucket_and_the_urls_fetch_them(svc, s3, bucket_env, fmt, ext, mime):
    job = {**REQ, "num_images": 2, "image_format": fmt}
    reply = run(svc, job, "job-42")
    assert "error" not in reply, reply
    assert len(reply["images"]) == 2 and reply["image_url"] == reply["images"][0]
    expected = without_bucket(svc, job)
    for url, want in zip(reply["images"], expected, strict=True):
        assert url.startswith("http://127.0.0.1:") and "X-Amz-Signature=" in url and "X-Amz-Expires=604800" in url
        key = key_of(url, bucket_env)
        assert re.fullmatch(rf"job-42/[0-9a-f]{{8}}\.{ext}", key), key  # the SDK's layout
        body, content_type = fetch(url)
        assert body == want and content_type == mime
        obj = s3.get_object(Bucket=bucket_env, Key=key)
        assert obj["Body"].read() == want and obj["ContentType"] == mime
    listed = s3.list_objects_v2(Bucket=bucket_env, Prefix="job-42/")["KeyCount"]
    assert listed == 2


def test_default_bucket_is_the_sdks_month_bucket(svc, s3, bucket_env, monkeypatch):
    monkeypatch.delenv("BUCKET_NAME")
    month = time.strftime("%m-%y")
    s3.create_bucket(Bucket=month)
    reply = run(svc, REQ, "job-month")
    assert "error" not in reply, reply
    assert (
        s3.get_object(Bucket=month, Key=key_of(reply["image_url"], month))["Body"].read() == without_bucket(svc, REQ)[0]
    )


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("BUCKET_ACCESS_KEY_ID", "BUCKET_ACCESS_KEY_ID is not"),
        ("BUCKET_SECRET_ACCESS_KEY", "BUCKET_SECRET_ACCESS_KEY is not"),
        ("BUCKET_ENDPOINT_URL", "BUCKET_ENDPOINT_URL is not"),
    ],
)
def test_a_half_configured_bucket_is_an_error_not_a_fallback(svc, bucket_env, monkeypatch, drop, message):
    monkeypatch.delenv(drop)
    reply = run(svc, REQ, "job-nokeys")
    assert "error" in reply and not {"images", "image_url"} & set(reply), reply  # no data URI, no local path
    assert message in reply["error"] and "hint:" in reply["error"]
    assert not Path("simulated_uploaded").exists() and not (REPO / "simulated_uploaded").exists()


def test_a_failed_upload_is_an_error_reply(svc, bucket_env, monkeypatch):
    monkeypatch.setenv("BUCKET_NAME", "no-such-bucket")
    reply = run(svc, REQ, "job-fail")
    assert "error" in reply and not {"images", "image_url"} & set(reply), reply
    assert "s3://no-such-bucket/job-fail/" in reply["error"] and "NoSuchBucket" in reply["error"]
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "ftp://127.0.0.1:1")
    assert "not an http(s) URL" in run(svc, REQ, "job-fail")["error"]


def test_through_the_sdk_dev_server(home, demo_artifact, svc, s3, s3_endpoint, tmp_path):
    """The worker as RunPod runs it (--rp_serve_api), over real HTTP: the job's id names the folder."""
    name = "uiw-devserver"
    s3.create_bucket(Bucket=name)
    env = {"UIW_HOME": str(home), "UIW_ARTIFACTS": str(demo_artifact), "BUCKET_ENDPOINT_URL": s3_endpoint}
    env |= KEYS | {"BUCKET_NAME": name}
    with dev_server(env, tmp_path, drop=BUCKET_VARS) as server:
        out = post(f"{server.url}/runsync", {"input": REQ})
        assert out["status"] == "COMPLETED", out
        image_url = out["output"]["image_url"]
        assert key_of(image_url, name).startswith(f"{out['id']}/")
        assert fetch(image_url)[0] == without_bucket(svc, REQ)[0]

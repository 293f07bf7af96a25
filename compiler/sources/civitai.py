"""civitai:// sources (and AIR URNs, civitai.com URLs) through CivitAI's public REST API.

``CIVITAI_BASE_URL`` is the site root (default https://civitai.com): metadata comes from
``/api/v1/model-versions/{id}`` (and ``/api/v1/models/{id}`` to pin a model's latest version),
downloads from ``/api/download/models/{versionId}``, which redirects to storage. The lock keeps the
download path relative to the site root, so a mirror set through the env var serves the same lock.
``CIVITAI_TOKEN`` goes in an Authorization header, never in a URL, a lock or a log line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from compiler import uri
from compiler.errors import UserError
from compiler.lockfile import LockedFile, LockEntry
from compiler.sources.base import Context, Fetched
from compiler.sources.blobs import fetch_pinned
from compiler.sources.download import HttpStatusError, TransferError, get_json

log = logging.getLogger(__name__)

TOKEN_ENV = "CIVITAI_TOKEN"
WEIGHT_TYPES = ("Model", "Pruned Model")


def _headers() -> dict[str, str]:
    token = os.environ.get(TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _api(ctx: Context, path: str) -> Any:
    return get_json(f"{ctx.civitai_base}/api/v1/{path}", _headers(), ctx.policy)


def _status_error(e: HttpStatusError, where: str, what: str) -> UserError:
    if e.status in (401, 403):
        has = "is set but was refused" if os.environ.get(TOKEN_ENV) else "is not set"
        return UserError.one(
            where,
            f"CivitAI answered HTTP {e.status} for {what}: it needs an API token ({TOKEN_ENV} {has})",
            f"create a token under Account settings > API keys on civitai.com and export {TOKEN_ENV}=…",
        )
    if e.status == 404:
        return UserError.one(where, f"CivitAI has no {what} (HTTP 404)", "check the id on the model's page")
    return UserError.one(where, f"CivitAI answered HTTP {e.status} for {what}", "retry later; the site may be down")


def version_meta(version: dict[str, Any]) -> dict[str, Any]:
    """What the lock records of a CivitAI version (detection cross-checks `base_model`)."""
    model = version.get("model") or {}
    return {
        "model_id": version.get("modelId"),
        "version_id": version.get("id"),
        "base_model": version.get("baseModel"),
        "model_type": model.get("type"),
        "air": version.get("air"),
        "name": f"{model.get('name', '')} {version.get('name', '')}".strip(),
    }


def lookup_by_hash(ctx: Context, sha256_hex: str) -> dict[str, Any] | None:
    """CivitAI's record of a file found elsewhere (a URL, a local disk), by its SHA256. Opt-in
    (UIW_CIVITAI_LOOKUP=1): it tells CivitAI the hash of your file. None when CivitAI does not know
    it or cannot be reached; a lookup never fails a compile."""
    if os.environ.get("UIW_CIVITAI_LOOKUP") != "1":
        return None
    try:
        version = _api(ctx, f"model-versions/by-hash/{sha256_hex.upper()}")
    except (HttpStatusError, TransferError) as e:
        if not (isinstance(e, HttpStatusError) and e.status == 404):
            log.warning("CivitAI lookup of %s failed: %s", sha256_hex[:12], e)
        return None
    return version_meta(version)


def choose_file(files: list[dict[str, Any]], where: str, what: str) -> dict[str, Any]:
    """The version's primary weights in safetensors form. Pure. A pickled primary with a
    safetensors sibling yields the sibling; pickles alone are refused."""

    def is_st(f: dict[str, Any]) -> bool:
        fmt = (f.get("metadata") or {}).get("format")
        return fmt == "SafeTensor" or (fmt is None and str(f.get("name", "")).endswith(".safetensors"))

    weights = [f for f in files if f.get("type") in WEIGHT_TYPES] or files
    safetensors = [f for f in weights if is_st(f)]
    for pick in (
        [f for f in safetensors if f.get("primary")],
        [f for f in safetensors if f.get("type") == "Model"],
        safetensors,
    ):
        if pick:
            return pick[0]
    names = ", ".join(f"{f.get('name')} ({(f.get('metadata') or {}).get('format')})" for f in files) or "none"
    raise UserError.one(
        where,
        f"{what} has no safetensors weights (files: {names})",
        "pickled checkpoints can run code when loaded; pick a version that offers a SafeTensor file",
    )


@contextmanager
def _failures(where: str, what: str, failed: str, hint: str) -> Iterator[None]:
    """A CivitAI call's HTTP status (``what`` was asked for) and transfer failures (``failed``:
    the message's start) as UserErrors with a hint."""
    try:
        yield
    except HttpStatusError as e:
        raise _status_error(e, where, what) from None
    except TransferError as e:
        raise UserError.one(where, f"{failed}: {e}", hint) from None


def inventory(src: uri.CivitaiSource, where: str, ctx: Context) -> LockEntry:
    what = f"model {src.model_id or '?'} version {src.version_id or 'latest'}"
    unreachable = f"cannot reach CivitAI at {ctx.civitai_base}"
    with _failures(where, what, unreachable, "check CIVITAI_BASE_URL and the network"):
        version_id, version = _version(src, where, ctx)
    chosen = _weights(src, version, version_id, where)
    sha = str((chosen.get("hashes") or {}).get("SHA256", "")).lower()
    if len(sha) != 64:
        raise UserError.one(
            where,
            f"CivitAI lists no SHA256 for {chosen.get('name')}",
            "pick another version or use its download URL with #sha256=",
        )
    meta = {**version_meta(version), "file_id": chosen.get("id"), "size_kb": chosen.get("sizeKB")}
    download = str(chosen.get("downloadUrl") or f"{ctx.civitai_base}/api/download/models/{version_id}")
    parts = urlsplit(download)
    relative = parts._replace(scheme="", netloc="").geturl()  # the site is a setting, not part of the pin
    return LockEntry(
        source=str(src),
        kind="file",
        pin=f"civitai-version:{version_id}",
        files=(
            LockedFile(
                path=str(chosen.get("name") or f"{version_id}.safetensors"),
                sha256=f"sha256:{sha}",
                size=None,
                url=relative,
            ),
        ),
        meta=meta,
    )


def _version(src: uri.CivitaiSource, where: str, ctx: Context) -> tuple[int, dict[str, Any]]:
    """The version the source names (its model's newest when it names none) and its record."""
    version_id = src.version_id
    if version_id is None:  # pin the newest version (the API lists newest first)
        model = _api(ctx, f"models/{src.model_id}")
        versions = model.get("modelVersions") or []
        if not versions:
            raise UserError.one(where, f"CivitAI model {src.model_id} has no versions", "check the model id")
        version_id = int(versions[0]["id"])
    try:
        version = _api(ctx, f"model-versions/{version_id}")
    except HttpStatusError as e:
        if e.status == 404 and src.model_id is not None:
            raise _missing_version(ctx, where, src.model_id, version_id) from None
        raise
    if src.model_id is not None and version.get("modelId") not in (None, src.model_id):
        raise UserError.one(
            where,
            f"CivitAI version {version_id} belongs to model {version.get('modelId')}, not {src.model_id}",
            f"write civitai://models/{version.get('modelId')}@{version_id}",
        )
    return version_id, version


def _weights(src: uri.CivitaiSource, version: dict[str, Any], version_id: int, where: str) -> dict[str, Any]:
    """The file to pin: the one the source names, else the version's safetensors weights."""
    files = version.get("files") or []
    if src.file_id is not None:
        files = [f for f in files if f.get("id") == src.file_id]
        if not files:
            listed = ", ".join(f"{f.get('id')} ({f.get('name')})" for f in version.get("files") or [])
            raise UserError.one(
                where, f"CivitAI version {version_id} has no file {src.file_id}", f"its files: {listed}"
            )
    return choose_file(files, where, f"CivitAI version {version_id}")


def _missing_version(ctx: Context, where: str, model_id: int, version_id: int) -> UserError:
    try:
        model = _api(ctx, f"models/{model_id}")
        listed = ", ".join(f"{v['id']} ({v.get('name')})" for v in (model.get("modelVersions") or [])[:10])
    except (HttpStatusError, TransferError):
        listed = ""
    return UserError.one(
        where,
        f"CivitAI model {model_id} has no version {version_id}",
        f"versions of model {model_id}: {listed}" if listed else "check the version id on the model's page",
    )


def fetch(entry: LockEntry, where: str, ctx: Context, paths: tuple[str, ...]) -> Fetched:
    (f,) = entry.files
    url = f.url or ""
    if not urlsplit(url).netloc:
        url = ctx.civitai_base + url
    version = entry.meta.get("version_id")
    failed, hint = "download from CivitAI failed", "retry; the partial download is kept and resumes"
    with _failures(where, f"the download of version {version}", failed, hint):
        blob = fetch_pinned(ctx, f, url, _headers(), f"civitai {version}: {f.path}")
    return Fetched(source=entry.source, kind=entry.kind, files={f.path: blob})

"""A loopback HTTP server that speaks the HuggingFace Hub and CivitAI APIs, with fault injection.

The real clients talk to it: ``huggingface_hub`` through ``HF_ENDPOINT``, the compiler's CivitAI
client through ``CIVITAI_BASE_URL``. Shapes follow the services' public documentation and clients:

HuggingFace Hub (huggingface_hub 2.x source: ``hf_api.py`` ``model_info`` / ``ModelInfo`` /
``RepoSibling`` / ``BlobLfsInfo``; ``file_download.py`` ``hf_hub_url``; ``utils/_http.py``
``hf_raise_for_status``; https://huggingface.co/docs/hub/api):
- ``GET /api/models/{repo}/revision/{rev}?blobs=true`` -> ``{"id", "sha", "siblings": [{"rfilename",
  "blobId", "size", "lfs": {"sha256", "size", "pointerSize"}}]}`` (lfs only for LFS files).
- ``GET|HEAD /{repo}/resolve/{rev}/{path}`` -> the bytes, with ``X-Repo-Commit``, ``ETag`` (git blob
  sha1 for plain files) and, for LFS files, ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``.
- Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``,
  ``GatedRepo``) and ``X-Error-Message``; the client classifies by those headers.

CivitAI (https://developer.civitai.com/docs/api/public-rest, github.com/civitai/civitai
``src/pages/api/v1/model-versions/[id].ts``, ``src/pages/api/download/models/[modelVersionId].ts``):
- ``GET /api/v1/model-versions/{id}`` (and ``/by-hash/{hash}``) -> ``{"id", "modelId", "name",
  "baseModel", "air", "model": {"name", "type"}, "files": [{"id", "name", "type", "sizeKB",
  "primary", "metadata": {"format", "size", "fp"}, "hashes": {"SHA256" (upper-case hex), "AutoV2"},
  "downloadUrl"}], "downloadUrl"}``.
- ``GET /api/v1/models/{id}`` -> ``{"id", "name", "type", "modelVersions": [newest first]}``; 404
  ``{"error": "No model with id N"}``.
- ``GET /api/download/models/{versionId}`` -> 307 to storage (here ``/storage/...``), which answers
  with ``Content-Disposition: attachment; filename="…"``; 401 ``{"error": "Unauthorized"}`` when the
  version needs a token and ``Authorization: Bearer`` is missing or wrong.

Faults: ``hub.fault(path_substring, kind, ...)`` queues one fault for the next matching request:
``drop`` (send N bytes of the body, then close), ``status`` (answer a code once), ``corrupt``
(flip one byte), ``stall`` (send headers, then nothing for S seconds). Every request is logged with
its Range header and whether it carried an Authorization header (never the header itself).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin", ".ckpt", ".pt"))


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> bytes
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit
    token: str | None = None  # set: private, needs this token
    gated: bool = False  # gated: 403 GatedRepo without the token

    def push(self, files: dict[str, bytes], branch: str = "main") -> str:
        commit = hashlib.sha1(
            json.dumps(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items())).encode()
            + str(len(self.commits)).encode()
        ).hexdigest()
        self.commits[commit] = dict(files)
        self.refs[branch] = commit
        return commit


@dataclass
class Version:
    id: int
    model_id: int
    name: str
    base_model: str
    files: list[dict[str, Any]]  # API file records; "_bytes" holds the content
    needs_token: bool = False


@dataclass
class Fault:
    match: str
    kind: str
    arg: float = 0
    times: int = 1


@dataclass
class LoggedRequest:
    method: str
    path: str
    range: str | None
    authorized: bool


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.models: dict[int, dict[str, Any]] = {}  # model id -> {"name", "type", "versions": [ids]}
        self.versions: dict[int, Version] = {}
        self.files: dict[str, bytes] = {}  # plain URL files: /files/<name>
        self.civitai_token = "civitai-secret-token-123"
        self.faults: list[Fault] = []
        self.log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- setup -----------------------------------------------------------------------------
    def repo(self, name: str) -> Repo:
        return self.repos.setdefault(name, Repo())

    def add_civitai(
        self,
        model_id: int,
        version_id: int,
        data: bytes,
        filename: str,
        base_model: str = "SD 1.5",
        model_type: str = "Checkpoint",
        needs_token: bool = False,
        extra_files: list[dict[str, Any]] | None = None,
    ) -> None:
        sha = hashlib.sha256(data).hexdigest().upper()
        primary = {
            "id": version_id * 10,
            "name": filename,
            "type": "Model",
            "sizeKB": len(data) / 1024,
            "primary": True,
            "metadata": {"format": "SafeTensor", "size": "pruned", "fp": "fp32"},
            "hashes": {"SHA256": sha, "AutoV2": sha[:10]},
            "downloadUrl": f"{self.url}/api/download/models/{version_id}",
            "_bytes": data,
        }
        self.versions[version_id] = Version(
            version_id, model_id, f"v{version_id}", base_model, [primary, *(extra_files or [])], needs_token
        )
        model = self.models.setdefault(model_id, {"name": f"model {model_id}", "type": model_type, "versions": []})
        model["versions"].insert(0, version_id)  # newest first, as the API lists them

    def fault(self, match: str, kind: str, arg: float = 0, times: int = 1) -> None:
        with self._lock:
            self.faults.append(Fault(match, kind, arg, times))

    def take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.match in path:
                    f.times -= 1
                    if f.times <= 0:
                        self.faults.remove(f)
                    return f
        return None

    def requests(self, contains: str = "") -> list[LoggedRequest]:
        return [r for r in self.log if contains in r.path]

    # --- API shapes ------------------------------------------------------------------------
    def version_json(self, v: Version) -> dict[str, Any]:
        model = self.models[v.model_id]
        return {
            "id": v.id,
            "modelId": v.model_id,
            "name": v.name,
            "baseModel": v.base_model,
            "air": f"urn:air:sd1:checkpoint:civitai:{v.model_id}@{v.id}",
            "model": {"name": model["name"], "type": model["type"], "nsfw": False},
            "files": [{k: val for k, val in f.items() if k != "_bytes"} for f in v.files],
            "downloadUrl": f"{self.url}/api/download/models/{v.id}",
        }


class _HubHandler(BaseHTTPRequestHandler):
    """Answers one request from a fake Hub's state (`_handler` makes the subclass that names which hub)."""

    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # --- plumbing ----------------------------------------------------------------------
    def _json(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not self.head:
            self.wfile.write(data)

    def _hf_error(self, code: int, error_code: str, message: str) -> None:
        self._json(code, {"error": message}, {"X-Error-Code": error_code, "X-Error-Message": message})

    def _bytes(self, data: bytes, headers: dict[str, str], fault: Fault | None) -> None:
        start = 0
        rng = self.headers.get("Range")
        if rng and (m := re.match(r"bytes=(\d+)-$", rng)):
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        if fault is not None and fault.kind == "corrupt":
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.head:
            return
        if fault is not None and fault.kind == "drop":
            self.wfile.write(body[: int(fault.arg)])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault is not None and fault.kind == "stall":
            self.wfile.write(body[:1])
            self.wfile.flush()
            time.sleep(fault.arg)
            self.close_connection = True
            return
        self.wfile.write(body)

    def _route(self, head: bool) -> None:
        self.head = head
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        self.hub.log.append(
            LoggedRequest(
                self.command, path, self.headers.get("Range"), "authorization" in {k.lower() for k in self.headers}
            )
        )
        fault = self.hub.take_fault(path)
        if fault is not None and fault.kind == "status":
            self._json(int(fault.arg), {"error": f"injected {int(fault.arg)}"})
            return
        try:
            if m := re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>.+))?$", path):
                return self._model_info(m.group("repo"), m.group("rev") or "main")
            if m := re.match(r"^/api/v1/model-versions/by-hash/(?P<h>[0-9A-Fa-f]+)$", path):
                return self._by_hash(m.group("h"))
            if m := re.match(r"^/api/v1/model-versions/(?P<id>\d+)$", path):
                return self._version(int(m.group("id")))
            if m := re.match(r"^/api/v1/models/(?P<id>\d+)$", path):
                return self._model(int(m.group("id")))
            if m := re.match(r"^/api/download/models/(?P<id>\d+)$", path):
                return self._civitai_download(int(m.group("id")), parse_qs(parts.query))
            if m := re.match(r"^/storage/(?P<vid>\d+)/(?P<fid>\d+)/(?P<name>[^/]+)$", path):
                return self._storage(int(m.group("vid")), int(m.group("fid")), fault)
            if m := re.match(r"^/files/(?P<name>.+)$", path):
                data = self.hub.files.get(m.group("name"))
                if data is None:
                    return self._json(404, {"error": "not found"})
                return self._bytes(data, {}, fault)
            if m := re.match(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", path):
                return self._resolve(m.group("repo"), m.group("rev"), m.group("file"), fault)
            self._json(404, {"error": f"no route {path}"})
        except (BrokenPipeError, ConnectionResetError):
            pass

    # --- HuggingFace -------------------------------------------------------------------
    def _repo_access(self, name: str) -> Repo | None:
        repo = self.hub.repos.get(name)
        auth = self.headers.get("Authorization", "")
        if repo is None or (repo.token and not repo.gated and auth != f"Bearer {repo.token}"):
            self._hf_error(401, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and auth != f"Bearer {repo.token}":
            self._hf_error(403 if auth else 401, "GatedRepo", f"Access to model {name} is restricted.")
            return None
        return repo

    def _commit(self, repo: Repo, rev: str) -> str | None:
        commit = repo.refs.get(rev, rev if rev in repo.commits else None)
        if commit is None:
            self._hf_error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    def _model_info(self, name: str, rev: str) -> None:
        repo = self._repo_access(name)
        if repo is None or (commit := self._commit(repo, rev)) is None:
            return
        siblings = []
        for p, data in sorted(repo.commits[commit].items()):
            s: dict[str, Any] = {"rfilename": p, "blobId": git_blob_id(data), "size": len(data)}
            if is_lfs(p):
                s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        self._json(
            200,
            {
                "id": name,
                "sha": commit,
                "private": bool(repo.token),
                "gated": repo.gated,
                "lastModified": "2026-11-01T00:00:00.000Z",
                "siblings": siblings,
            },
        )

    def _resolve(self, name: str, rev: str, file: str, fault: Fault | None) -> None:
        repo = self._repo_access(name)
        if repo is None or (commit := self._commit(repo, rev)) is None:
            return
        data = repo.commits[commit].get(file)
        if data is None:
            self._json(
                404,
                {"error": "Entry not found"},
                {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": commit},
            )
            return
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"'}
        if is_lfs(file):
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        self._bytes(data, headers, fault)

    # --- CivitAI -----------------------------------------------------------------------
    def _version(self, vid: int) -> None:
        v = self.hub.versions.get(vid)
        if v is None:
            return self._json(404, {"error": "Model not found"})
        self._json(200, self.hub.version_json(v))

    def _by_hash(self, h: str) -> None:
        for v in self.hub.versions.values():
            if any(h.upper() in (f["hashes"].get("SHA256"), f["hashes"].get("AutoV2")) for f in v.files):
                return self._json(200, self.hub.version_json(v))
        self._json(404, {"error": "Model not found"})

    def _model(self, mid: int) -> None:
        m = self.hub.models.get(mid)
        if m is None:
            return self._json(404, {"error": f"No model with id {mid}"})
        versions = [
            {k: val for k, val in self.hub.version_json(self.hub.versions[v]).items() if k != "model"}
            for v in m["versions"]
        ]
        self._json(200, {"id": mid, "name": m["name"], "type": m["type"], "modelVersions": versions})

    def _civitai_download(self, vid: int, query: dict[str, list[str]]) -> None:
        v = self.hub.versions.get(vid)
        if v is None:
            return self._json(404, {"error": "File not found"})
        if v.needs_token and self.headers.get("Authorization") != f"Bearer {self.hub.civitai_token}":
            return self._json(
                401, {"error": "Unauthorized", "message": "The creator of this asset requires you to be logged in"}
            )
        fid = int(query["fileId"][0]) if "fileId" in query else v.files[0]["id"]
        f = next((f for f in v.files if f["id"] == fid), None)
        if f is None:
            return self._json(404, {"error": "File not found"})
        self.send_response(307)
        self.send_header("Location", f"/storage/{vid}/{fid}/{quote(f['name'])}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _storage(self, vid: int, fid: int, fault: Fault | None) -> None:
        f = next(f for f in self.hub.versions[vid].files if f["id"] == fid)
        self._bytes(f["_bytes"], {"Content-Disposition": f'attachment; filename="{f["name"]}"'}, fault)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    """The request handler class for one hub (the server instantiates it per request, so the hub rides on the class)."""
    return type("Handler", (_HubHandler,), {"hub": hub})


def tree(folder: Path) -> dict[str, bytes]:
    """A folder's files as a repo tree."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

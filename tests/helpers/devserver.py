"""The RunPod SDK's local dev server (`python -m runtime --rp_serve_api`) on 127.0.0.1, as a
context manager: real HTTP, the worker's own JSON log lines (stderr) kept in a file to read."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LEAKY, PY, REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict[str, Any] | None = None, timeout: float = 300) -> Any:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class DevServer:
    url: str
    log_path: Path
    proc: subprocess.Popen[str]

    def log_lines(self) -> list[dict[str, Any]]:
        """The worker's JSON log lines so far (the SDK's own lines, not JSON, are skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def requests_done(self) -> list[dict[str, Any]]:
        return [r for r in self.log_lines() if r.get("logger") == "runtime.request"]


def refused_start(env: dict[str, str], setting: str) -> subprocess.CompletedProcess[str]:
    """Start the worker as RunPod does with exactly `env`, expecting it to refuse `setting` at start:
    exit code 2 and a hint, within a minute (a worker that starts serving instead fails the test)."""
    try:
        proc = subprocess.run(
            [PY, "-m", "runtime", "--rp_serve_api", "--rp_api_port", "1"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{setting}: the worker started instead of stopping")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hint:" in proc.stderr, proc.stderr[-2000:]
    return proc


def wait_up(url: str, proc: subprocess.Popen[str], log_path: Path, startup_s: float) -> None:
    """Until the dev server at ``url`` answers (the worker process must stay alive meanwhile)."""
    deadline = time.monotonic() + startup_s
    while True:
        try:
            urllib.request.urlopen(f"{url}/docs", timeout=2)
            return
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the dev server did not come up: " + log_path.read_text()[-3000:]
            time.sleep(0.25)


@contextmanager
def dev_server(
    env: dict[str, str],
    tmp_path: Path,
    startup_s: float = 180,
    log_path: Path | None = None,
    drop: tuple[str, ...] = (),
) -> Iterator[DevServer]:
    """The worker sees this process's environment less conftest.LEAKY (the session's own store
    and artifacts) and less `drop`, plus `env`; its log lines go to `log_path` (default: a file in
    tmp_path)."""
    port = free_port()
    log_path = log_path or tmp_path / f"worker-{port}.log"
    # Two files: the SDK prints to stdout, our log lines go to stderr; one file for both could
    # interleave a block-buffered stdout chunk inside one of our lines.
    with open(log_path, "w") as log_file, open(tmp_path / f"sdk-{port}.log", "w") as sdk_file:
        proc = subprocess.Popen(
            [PY, "-m", "runtime", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
            cwd=REPO,
            env={**{k: v for k, v in os.environ.items() if k not in (*LEAKY, *drop)}, "UIW_LOG_FORMAT": "json", **env},
            stdout=sdk_file,
            stderr=log_file,
            text=True,
        )
    server = DevServer(f"http://127.0.0.1:{port}", log_path, proc)
    try:
        wait_up(server.url, proc, log_path, startup_s)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)

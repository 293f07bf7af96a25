"""The worker as RunPod's SDK runs it: `python -m runtime --rp_serve_api` on 127.0.0.1 and
`python -m runtime --test_input ...`, over real HTTP / a real subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from tests.conftest import PY, REPO, decode_image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _env(home: Path, artifact: str) -> dict[str, str]:
    return {**os.environ, "UIW_HOME": str(home), "UIW_ARTIFACTS": artifact}


def test_local_dev_server_answers_runsync(home: Path, demo_artifact: Path, call):
    port = _free_port()
    proc = subprocess.Popen(
        [PY, "-m", "runtime", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
        cwd=REPO,
        env=_env(home, str(demo_artifact)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/docs", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "the dev server did not come up"
                time.sleep(0.25)
        body = {"input": {"prompt": "a red fox in the snow", "seed": 7}}
        out = _post(f"{url}/runsync", body)
        assert out["status"] == "COMPLETED", out
        # Over HTTP the image is the same as from the in-process handler.
        assert np.array_equal(decode_image(out["output"]["images"][0]), decode_image(call(body["input"])["images"][0]))
        bad = _post(f"{url}/runsync", {"input": {"prompt": "x", "width": 100}})
        assert bad["status"] == "FAILED" and "multiple of 8" in bad["error"]
        # The worker survived the bad request.
        assert _post(f"{url}/runsync", body)["status"] == "COMPLETED"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()

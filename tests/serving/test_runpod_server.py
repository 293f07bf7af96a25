"""The worker as RunPod's SDK runs it: `python -m runtime --rp_serve_api` on 127.0.0.1, over real
HTTP: the same pixels as the in-process handler, a bad request refused, the worker still serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import decode_image
from tests.helpers.devserver import dev_server, post


def test_local_dev_server_answers_runsync(home: Path, demo_artifact: Path, call, tmp_path: Path):
    env = {"UIW_HOME": str(home), "UIW_ARTIFACTS": str(demo_artifact)}
    with dev_server(env, tmp_path, startup_s=120) as server:
        url = server.url
        body = {"input": {"prompt": "a red fox in the snow", "seed": 7}}
        out = post(f"{url}/runsync", body)
        assert out["status"] == "COMPLETED", out
        # Over HTTP the image is the same as from the in-process handler.
        assert np.array_equal(decode_image(out["output"]["images"][0]), decode_image(call(body["input"])["images"][0]))
        bad = post(f"{url}/runsync", {"input": {"prompt": "x", "width": 100}})
        assert bad["status"] == "FAILED" and "multiple of 8" in bad["error"]
        # The worker survived the bad request.
        assert post(f"{url}/runsync", body)["status"] == "COMPLETED"

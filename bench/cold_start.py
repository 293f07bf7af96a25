"""Cold start of the RunPod worker on the paths a template takes: process start -> first image,
over the SDK's local HTTP server (``python -m runtime --rp_serve_api``), one fresh process each.

    .venv/bin/python -m bench.cold_start                                   # builtin:tiny-sd15
    .venv/bin/python -m bench.cold_start --recipe recipes/sdxl.yaml --size 1024 --steps 25   # a GPU

Scenarios, in order, on one scratch folder standing for the network volume (``UIW_VOLUME``):
- ``volume-build``: the first worker of an endpoint, ``UIW_MODEL``/``UIW_RECIPE`` named and the
  volume empty: the child compiler builds the model onto the volume while the job waits;
- ``volume-built``: the next worker: the artifact is on the volume, it loads it;
- ``image``: the artifact baked into the image's store (``UIW_IMAGE_HOME``, here the volume's
  store itself stands for it) and named by ``UIW_ARTIFACTS``, no volume, no model variable.
Each row: seconds from the fork to the HTTP server's first answer (``ready_s``) and to the first
image's reply (``first_image_s``), and the 1-minute load average when it started.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any], timeout: float) -> Any:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def measure(env: dict[str, str], job: dict[str, Any], log: Path, timeout: float = 3600) -> dict[str, Any]:
    """One fresh worker: fork -> server up -> first image."""
    port = _port()
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    argv = [sys.executable, "-m", "runtime", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                urllib.request.urlopen(f"{url}/docs", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"the worker did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.1)
        ready = time.monotonic() - t0
        reply = _post(f"{url}/runsync", {"input": job}, timeout)
        first = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if reply.get("status") != "COMPLETED":
        raise RuntimeError(f"first job failed: {str(reply)[:2000]}")
    return {"ready_s": round(ready, 2), "first_image_s": round(first, 2), "load_avg_1m": round(load, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:tiny-sd15", help="UIW_MODEL (when --recipe is not given)")
    ap.add_argument("--recipe", help="UIW_RECIPE: a recipe file")
    ap.add_argument("--size", type=int, default=0, help="width and height of the request (0: the model's)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workdir", type=Path, help="the scratch volume (default: a temporary folder)")
    args = ap.parse_args(argv)
    job: dict[str, Any] = {"prompt": "a red fox in the snow", "seed": 1, "num_inference_steps": args.steps}
    if args.size:
        job |= {"width": args.size, "height": args.size}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("UIW_", "BUCKET_")) and k != "HF_HUB_OFFLINE"}
    base |= {"UIW_LOG_FORMAT": "text", "UIW_RECIPE_NAME": "cold"}
    model = {"UIW_RECIPE": str(Path(args.recipe).resolve())} if args.recipe else {"UIW_MODEL": args.model}
    with tempfile.TemporaryDirectory(prefix="uiw-cold-") as tmp:
        volume = args.workdir or Path(tmp)
        volume.mkdir(parents=True, exist_ok=True)
        scenarios = {
            "volume-build": {**base, **model, "UIW_VOLUME": str(volume)},
            "volume-built": {**base, **model, "UIW_VOLUME": str(volume)},
            "image": {**base, "UIW_IMAGE_HOME": str(volume / "uiw"), "UIW_ARTIFACTS": "cold"},
        }
        for name, env in scenarios.items():
            row = {"scenario": name, "model": args.recipe or args.model, **measure(env, job, volume / f"{name}.log")}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

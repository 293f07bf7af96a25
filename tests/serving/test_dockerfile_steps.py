"""The image, tested by what it runs: the Dockerfile's steps (parsed from it, tests/helpers/dockerfile)
in a fresh virtual environment with a non-editable install, then the image's CMD started as RunPod
starts it, with tests.json's environment, answering tests.json's requests over the SDK's local
HTTP server. RECIPES=demo stands for the default SDXL (no download here); the Hub's tests serve
the tiny model through UIW_MODEL, compiled at start, beside the baked artifact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers.devserver import free_port
from tests.helpers.dockerfile import Build, venv_env

TORCH = "torch==2.13.0"  # the base image's torch, here the CPU wheel of this machine


@pytest.mark.slow  # minutes: a fresh venv with every dependency, two compiles, a worker
@pytest.mark.timeout(1800)
def test_dockerfile_steps_build_an_image_that_answers_the_hub_tests(tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = venv_env(venv, tmp_path / "home")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", TORCH]
    subprocess.run(pip, check=True, env=env, timeout=600)
    build = Build(REPO, tmp_path / "docker", env, build_args={"RECIPES": "demo"})
    image = build.run(REPO / "Dockerfile")
    assert image.cmd == ["python", "-m", "runtime"]

    # Installed, not editable: the packages live in the venv's site-packages.
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import compiler, runtime; print(runtime.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "site-packages" in where and str(REPO) not in where, where
    # Only artifacts and names were copied into the image: no blobs, no HF cache.
    baked = Path(image.env["UIW_IMAGE_HOME"])
    assert sorted(p.name for p in baked.iterdir()) == ["artifacts", "names"]
    assert (baked / "names" / "demo.json").is_file()

    hub_tests = json.loads((REPO / ".runpod" / "tests.json").read_text())
    worker_env = {**env, **image.env, **{e["key"]: e["value"] for e in hub_tests["config"]["env"]}}
    worker_env |= {"UIW_LOG_FORMAT": "json", "UIW_VOLUME": str(tmp_path / "no-volume")}
    run_image(image.cmd, image.path("."), worker_env, hub_tests["tests"], tmp_path / "worker.log")


def run_image(cmd: list[str], cwd: Path, env: dict[str, str], tests: list[dict], log: Path) -> None:
    from tests.helpers.devserver import post, wait_up

    port = free_port()
    argv = [*cmd, "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_up(url, proc, log, 300)
        for test in tests:
            reply = post(f"{url}/runsync", {"input": test["input"]}, timeout=test["timeout"] / 1000)
            assert reply["status"] == "COMPLETED", (test["name"], reply, log.read_text()[-3000:])
            output = reply["output"]
            if "describe" in test["input"]:
                names = [m["name"] for m in output["models"]]
                assert names == ["tiny", "demo"], names  # the environment's model first, then the baked one
            else:
                assert len(output["images"]) == test["input"].get("num_images", 1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

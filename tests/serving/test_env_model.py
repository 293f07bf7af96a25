"""A model chosen by the environment, no image build: workers started with ``UIW_MODEL`` (a test
Hub repo) on one network volume (two views of one folder, as two machines mount it) compile it
once, answer their first jobs (streaming ``building`` events meanwhile) and serve the same
pixels; a bad ``UIW_MODEL`` answers every job with the compiler's error and the worker stays up;
a worker killed mid-build leaves nothing that looks finished, and the next worker builds it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import decode_image
from tests.helpers.devserver import DevServer, dev_server, post
from tests.helpers.fakehub import FakeHub, tree

REPO_ID = "uiw-test/env-tiny"
REQ = {"prompt": "a red fox in the snow", "seed": 7, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    from compiler.tiny_models import BUILTINS

    folder = tmp_path_factory.mktemp("env-tiny")
    BUILTINS["tiny-sd15"].build().save_pretrained(folder)
    h = FakeHub().start()
    h.repo(REPO_ID).push(tree(folder))
    yield h
    h.stop()


def worker_env(hub: FakeHub, volume: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "UIW_VOLUME": str(volume),
        "UIW_MODEL": f"hf://{REPO_ID}",
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "UIW_PROGRESS_INTERVAL": "0.5",
        **extra,
    }


def compiler_lines(server: DevServer) -> list[str]:
    return [r["message"] for r in server.log_lines() if r.get("logger") == "runtime.build"]


def finished(store: Path) -> list[Path]:
    return [p.parent for p in (store / "artifacts" / "v1").glob("*/READY")]


@pytest.mark.slow  # ~70 s here: two workers, one compile, two loads
def test_two_workers_on_one_volume_build_once(hub: FakeHub, tmp_path: Path):
    volume = tmp_path / "volume"
    volume.mkdir()
    view = tmp_path / "other-machine"
    view.symlink_to(volume)  # a second path to the same folder, as another machine's mount
    env_a = worker_env(hub, volume, tmp_path, UIW_STREAM="1")
    env_b = worker_env(hub, view, tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with dev_server(env_a, tmp_path / "a") as a, dev_server(env_b, tmp_path / "b") as b:
        with ThreadPoolExecutor(2) as pool:
            got_a, got_b = pool.map(lambda s: post(f"{s.url}/runsync", {"input": REQ}), (a, b))
        assert got_a["status"] == "COMPLETED" and got_b["status"] == "COMPLETED", (got_a, got_b)
        # The streaming worker's first job heard the build, then got its reply.
        events: list[dict[str, Any]] = got_a["output"]
        building = [e for e in events if e.get("status") == "building"]
        assert building and building[0]["model"] == "model" and "stage" in building[0], events[:3]
        image_a, image_b = events[-1]["images"][0], got_b["output"]["images"][0]
        assert np.array_equal(decode_image(image_a), decode_image(image_b))
        logs = compiler_lines(a) + compiler_lines(b)
    # One build, on the volume, seen by both; the other worker found it (after the build lock).
    assert len([m for m in logs if " building " in m]) == 1, logs
    (artifact,) = finished(volume / "uiw")
    serving = [m for m in logs if m.startswith("serving model from ")]
    assert len(serving) == 2 and all(artifact.name in m for m in serving), logs


def test_a_bad_model_answers_every_job_and_the_worker_stays(hub: FakeHub, tmp_path: Path):
    env = worker_env(hub, tmp_path, tmp_path, UIW_MODEL=f"hf://{REPO_ID}-missing")
    with dev_server(env, tmp_path) as server:
        for _ in range(2):
            out = post(f"{server.url}/runsync", {"input": REQ})
            assert out["status"] == "FAILED", out
            assert "could not be built" in out["error"] and f"{REPO_ID}-missing" in out["error"], out["error"]
            assert "hint:" in out["error"]
        assert server.proc.poll() is None


@pytest.mark.slow  # ~80 s here: a compile killed, then a whole one
def test_a_worker_killed_mid_build_leaves_nothing_finished(hub: FakeHub, tmp_path: Path):
    volume = tmp_path / "volume"
    volume.mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    env = worker_env(hub, volume, tmp_path)
    with dev_server(env, tmp_path / "a") as a:
        deadline = time.monotonic() + 120
        while not any(" building " in m for m in compiler_lines(a)):
            assert time.monotonic() < deadline, compiler_lines(a)
            time.sleep(0.1)
        os.kill(a.proc.pid, signal.SIGKILL)  # the compiler child dies with it (PR_SET_PDEATHSIG)
        a.proc.wait(timeout=30)
    store = volume / "uiw"
    time.sleep(1)
    assert finished(store) == [] and not list((store / "names").glob("*.json"))
    with dev_server(env, tmp_path / "b") as b:
        out = post(f"{b.url}/runsync", {"input": REQ})
        assert out["status"] == "COMPLETED", out
        assert len([m for m in compiler_lines(b) if " building " in m]) == 1
    assert len(finished(store)) == 1
    assert not list((store / "artifacts" / "v1").glob(".staging-*"))  # the killed build's folder removed

"""Progress while a job runs: the streaming worker (UIW_STREAM=1) over the SDK's local dev server -
POST /run then /stream/ID and /status/ID: per-step events in order with the right step counts,
the normal reply last (the same image as the in-process handler); /runsync answers with the list;
previews on request. The default handler's progress goes through runpod's progress_update."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
from pathlib import Path

import numpy as np

from tests.conftest import REQ, decode_image
from tests.helpers.devserver import dev_server, post


def _check_events(items: list, steps: int) -> dict:
    *events, reply = items
    assert [e["status"] for e in events] == ["progress"] * steps, items
    assert [e["step"] for e in events] == list(range(1, steps + 1)), "in order, one per step"
    assert {e["steps"] for e in events} == {steps}
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in itertools.pairwise(events))
    assert "images" in reply and "status" not in reply, reply
    return reply


def test_streaming_worker_sends_steps_in_order_then_the_reply(home: Path, demo_artifact: Path, call, tmp_path: Path):
    want = decode_image(call(REQ)["images"][0])  # the plain handler, in process
    env = {"UIW_HOME": str(home), "UIW_ARTIFACTS": str(demo_artifact), "UIW_STREAM": "1"}
    with dev_server(env, tmp_path) as server:
        job = post(f"{server.url}/run", {"input": {**REQ, "num_inference_steps": 5}})
        assert job["status"] == "IN_PROGRESS"
        streamed = post(f"{server.url}/stream/{job['id']}")
        assert streamed["status"] == "COMPLETED", streamed
        reply = _check_events([item["output"] for item in streamed["stream"]], 5)
        assert reply["seed"] == REQ["seed"]

        # /status of a streaming worker: the aggregated list, the reply last.
        job = post(f"{server.url}/run", {"input": REQ})
        status = post(f"{server.url}/status/{job['id']}")
        assert status["status"] == "COMPLETED", status
        reply = _check_events(status["output"], 4)  # the demo's default steps
        assert np.array_equal(decode_image(reply["images"][0]), want), "the same image as the plain handler"

        # /runsync too answers with the list (documented in docs/operations.md).
        out = post(f"{server.url}/runsync", {"input": {**REQ, "num_inference_steps": 2, "preview": True}})
        assert out["status"] == "COMPLETED" and isinstance(out["output"], list), out
        _check_events(out["output"], 2)
        from PIL import Image

        for event in out["output"][:-1]:
            header, _, data = event["preview"].partition(",")
            assert header == "data:image/jpeg;base64"
            assert Image.open(io.BytesIO(base64.b64decode(data))).size == (8, 8)  # the 64x64 image's latent grid

        # A bad request streams just its error, and the worker goes on.
        bad = post(f"{server.url}/runsync", {"input": {"prompt": "x", "width": 100}})
        assert bad["status"] == "COMPLETED" and "multiple of 8" in bad["output"][-1]["error"], bad
        assert post(f"{server.url}/runsync", {"input": REQ})["status"] == "COMPLETED"
        lines = server.requests_done()
    assert [r["outcome"] for r in lines] == ["ok", "ok", "ok", "error:invalid", "ok"]


def test_default_handler_reports_progress_through_progress_update(service_env, monkeypatch):
    """Off RunPod the SDK's progress_update can reach nothing (it posts to RunPod's job-done URL
    and logs an error), so the handler sends progress only where that URL is configured; here it
    is set and the SDK function is replaced by a recorder to see what the handler sends."""
    import runpod.serverless

    from runtime.handler import handler

    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(runpod.serverless, "progress_update", lambda job, p: sent.append((job["id"], p)))
    monkeypatch.setenv("RUNPOD_WEBHOOK_POST_OUTPUT", "https://api.runpod.example/v2/$ID/done")
    monkeypatch.setenv("UIW_PROGRESS_INTERVAL", "0")
    reply = asyncio.run(handler({"id": "job-1", "input": {**REQ, "num_inference_steps": 3}}))
    assert "images" in reply and isinstance(reply["images"], list)
    assert [(i, p["step"], p["steps"]) for i, p in sent] == [("job-1", 1, 3), ("job-1", 2, 3), ("job-1", 3, 3)]

    # Throttled: with a long interval only the first and the last step go out.
    sent.clear()
    monkeypatch.setenv("UIW_PROGRESS_INTERVAL", "3600")
    asyncio.run(handler({"id": "job-2", "input": {**REQ, "num_inference_steps": 4}}))
    assert [p["step"] for _, p in sent] == [1, 4]

    # Not on RunPod: nothing is sent.
    sent.clear()
    monkeypatch.delenv("RUNPOD_WEBHOOK_POST_OUTPUT")
    asyncio.run(handler({"id": "job-3", "input": REQ}))
    assert sent == []


def test_previews_of_packed_flux_latents():
    """FLUX packs 2x2 latent patches (16 channels): the preview unpacks them and shows three
    channels; one event per step, each a JPEG of the latent grid's size."""
    from PIL import Image

    from compiler.tiny_models import BUILTINS
    from runtime.generate import generate
    from runtime.progress import Progress, StepWatch
    from tests.helpers.generation import tiny_request

    pipe = BUILTINS["tiny-flux"].build()
    pipe.set_progress_bar_config(disable=True)
    request = tiny_request(prompt="a red fox", steps=3, guidance_scale=3.5, scheduler="FLOW_MATCH_EULER")
    events: list[Progress] = []
    images = generate(pipe, request, StepWatch(events.append, None, preview=True, size=(64, 64)))
    assert len(images) == 1 and [e.step for e in events] == [1, 2, 3] and {e.steps for e in events} == {3}
    grid = 64 // pipe.vae_scale_factor
    for e in events:
        assert e.preview is not None
        im = Image.open(io.BytesIO(base64.b64decode(e.preview.partition(",")[2])))
        assert im.format == "JPEG" and im.size == (grid, grid)


def test_streamed_device_error_refreshes_the_worker(service_env, monkeypatch):
    """The SDK turns a streamed error into {"error": str}, dropping refresh_worker; the handler
    sets it in the start config instead, which the SDK reads after the job: the job's result
    asks RunPod to stop the pod. Run through the SDK's own rp_job.handle_job."""
    import runpod.serverless.modules.rp_job as rp_job

    import runtime.handler as h

    monkeypatch.setattr(h, "_config", None)
    monkeypatch.setattr(h, "_concurrency", h._concurrency)
    monkeypatch.setenv("UIW_STREAM", "1")
    config = h.start_config()
    assert config["handler"] is h.stream_handler and h._config is config

    def cuda_error(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr("runtime.generate.generate", cuda_error)
    streamed: list[dict] = []
    results: list[dict] = []

    async def stream_result(session, output, job):
        streamed.append(output)

    async def send_result(session, result, job, is_stream=False):
        results.append(result)

    monkeypatch.setattr(rp_job, "stream_result", stream_result)
    monkeypatch.setattr(rp_job, "send_result", send_result)
    asyncio.run(rp_job.handle_job(None, config, {"id": "job-cuda", "input": REQ}))
    [result] = results
    assert "CUDA error" in result["error"] and "refresh_worker" not in result, result
    assert result.get("stopPod") is True, "the SDK stops the pod after the job"
    assert config["refresh_worker"] is True  # rp_scale.JobScaler.handle_job then kills the worker


def test_bad_progress_interval_is_a_setting_error(monkeypatch):
    """UIW_PROGRESS_INTERVAL used to fall back silently on a bad value."""
    import pytest

    from runtime.handler import start_config
    from runtime.settings import SettingError, progress_interval

    for bad in ("often", "-1", "inf", "nan"):
        monkeypatch.setenv("UIW_PROGRESS_INTERVAL", bad)
        with pytest.raises(SettingError, match=r"UIW_PROGRESS_INTERVAL.*hint:"):
            start_config()
    monkeypatch.setenv("UIW_PROGRESS_INTERVAL", "0.5")
    assert progress_interval() == 0.5

"""The runtime as RunPod calls it: runtime.handler.handler(job) on the compiled demo artifact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import decode_image

REQ = {"prompt": "a red fox in the snow", "seed": 7}


def test_txt2img_end_to_end(call):
    reply = call(REQ)
    assert set(reply) == {"images", "image_url", "seed", "model"}
    assert reply["model"]["name"] == reply["model"]["recipe"] == "demo"  # what served it
    assert reply["seed"] == 7 and reply["image_url"] == reply["images"][0]
    img = decode_image(reply["images"][0])
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert img.std() > 1  # not a blank image


@pytest.mark.parametrize("scheduler", [None, "DDIM", "DPMSolverMultistep"])
def test_parity_with_plain_diffusers(call, tmp_path: Path, scheduler: str | None):
    """The artifact's image equals, pixel for pixel, plain diffusers on the builtin saved as a
    diffusers folder, called directly (not through our generate code)."""
    import diffusers
    from diffusers import DiffusionPipeline

    from compiler.tiny_models import BUILTINS
    from tests.helpers.generation import reference_image

    folder = tmp_path / "plain"
    BUILTINS["tiny-sd15"].build().save_pretrained(folder)
    ref = DiffusionPipeline.from_pretrained(folder)
    cls = {None: "EulerDiscreteScheduler", "DDIM": "DDIMScheduler", "DPMSolverMultistep": "DPMSolverMultistepScheduler"}
    ref.scheduler = getattr(diffusers, cls[scheduler]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expected = reference_image(ref, "a red fox in the snow", "blurry, low quality", seed=7)
    req = dict(REQ) | ({"scheduler": scheduler} if scheduler else {})
    got = decode_image(call(req)["images"][0])
    assert np.array_equal(got, np.array(expected))


def test_same_seed_same_bytes_other_seed_other_image(call):
    a, b, c = call(REQ), call(REQ), call({**REQ, "seed": 8})
    assert a["images"][0] == b["images"][0]
    assert not np.array_equal(decode_image(a["images"][0]), decode_image(c["images"][0]))
    # No seed: a random one is chosen and returned, and it reproduces the image.
    d = call({"prompt": REQ["prompt"]})
    assert isinstance(d["seed"], int)
    assert call({"prompt": REQ["prompt"], "seed": d["seed"]})["images"] == d["images"]


def test_request_fields_are_honoured(call):
    reply = call(
        {
            **REQ,
            "width": 128,
            "height": 72,
            "num_images": 2,
            "num_inference_steps": 2,
            "guidance_scale": 3,
            "negative_prompt": None,
        }
    )
    imgs = [decode_image(u) for u in reply["images"]]
    assert [i.shape for i in imgs] == [(72, 128, 3)] * 2
    assert not np.array_equal(imgs[0], imgs[1])


def test_aliases_give_the_same_result_as_canonical_names(call):
    canonical = call({**REQ, "num_images": 2, "guidance_scale": 5.0})
    aliased = call({**REQ, "num_outputs": 2, "guidance": 5.0})
    assert aliased["images"] == canonical["images"]
    warned = call({**REQ, "prompt_strength": 0.5})
    assert any("strength" in w for w in warned["warnings"])
    assert "image_url" in call({**REQ, "init_image": "data:image/png;base64,AAAA"})["error"]
    assert "mask_url" in call({**REQ, "mask": "data:image/png;base64,AAAA"})["error"]


def test_worker_sdxl_test_input_is_accepted_unchanged(call):
    job = json.loads((Path(__file__).parents[1] / "data" / "worker_sdxl_test_input.json").read_text())
    reply = call(job["input"])
    assert "error" not in reply, reply
    assert reply["seed"] == 42
    assert decode_image(reply["image_url"]).shape == (1024, 1024, 3)
    assert sorted(w.split(":")[0] for w in reply["warnings"]) == [
        "high_noise_frac",
        "refiner_inference_steps",
        "strength",
    ]


DROP = object()  # a field left out of the request
BAD = [
    ({"prompt": DROP}, "prompt: Field required"),
    ({"prompt": 3}, "prompt: Input should be a valid string"),
    ({"prompt": ""}, "prompt: String should have at least 1 character"),
    ({"prompt": "x" * 10_001}, "prompt: String should have at most 10000 characters"),
    ({"negative_prompt": 5}, "negative_prompt: Input should be a valid string"),
    ({"width": 100}, "width: Input should be a multiple of 8"),
    ({"width": 2048}, "width: Input should be less than or equal to 1024"),
    ({"width": 32}, "width: Input should be greater than or equal to 64"),
    ({"width": "512"}, "width: Input should be a valid integer"),
    ({"height": 1001}, "height: Input should be a multiple of 8"),
    ({"height": 64.0}, "height: Input should be a valid integer"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"seed": 2**64}, "seed: Input should be less than or equal to"),
    ({"seed": True}, "seed: Input should be a valid integer"),
    ({"scheduler": "EULER"}, "scheduler: unknown scheduler; expected one of PNDM, KLMS, DDIM, K_EULER"),
    ({"num_inference_steps": 0}, "num_inference_steps: Input should be greater than or equal to 1"),
    ({"num_inference_steps": 101}, "num_inference_steps: Input should be less than or equal to 100"),
    ({"num_inference_steps": 2.5}, "num_inference_steps: Input should be a valid integer"),
    ({"refiner_inference_steps": 0}, "refiner_inference_steps: Input should be greater than or equal to 1"),
    ({"guidance_scale": -1}, "guidance_scale: Input should be greater than or equal to 0"),
    ({"guidance_scale": 51}, "guidance_scale: Input should be less than or equal to 50"),
    ({"guidance_scale": "7"}, "guidance_scale: Input should be a valid number"),
    ({"strength": 1.5}, "strength: Input should be less than or equal to 1"),
    ({"num_images": 0}, "num_images: Input should be greater than or equal to 1"),
    ({"num_images": 5}, "num_images: Input should be less than or equal to 4"),
    ({"num_outputs": 5}, "num_images: Input should be less than or equal to 4"),
    ({"high_noise_frac": 2}, "high_noise_frac: Input should be less than or equal to 1"),
    # (an artifact without the img2img task: tests/runtime/test_img2img.py)
    ({"image_url": "ftp://example.com/a.png"}, "image_url: unsupported scheme 'ftp'"),
    ({"image_url": 5}, "image_url: Input should be a valid string"),
    ({"foo": 1}, "Unexpected input. foo is not a valid input option."),
    ({"num_outputs": 1, "num_images": 1}, "num_outputs: both 'num_outputs' and its canonical name 'num_images' given"),
]


@pytest.mark.parametrize(
    ("patch", "message"), BAD, ids=[m.split(":")[0] + "-" + str(i) for i, (_, m) in enumerate(BAD)]
)
def test_bad_values_are_rejected_with_a_message(call, patch: dict, message: str):
    req = {k: v for k, v in {"prompt": "x", **patch}.items() if v is not DROP}
    reply = call(req)
    assert set(reply) == {"error", "errors"}, reply
    assert isinstance(reply["error"], str) and isinstance(reply["errors"], list)
    assert any(message in e for e in reply["errors"]), reply["errors"]


def test_every_problem_is_reported_at_once(call):
    reply = call({"prompt": "x", "width": 100, "height": 4000, "scheduler": "nope", "bogus": 1})
    assert len(reply["errors"]) == 4
    assert reply["error"] == "; ".join(reply["errors"])


def test_non_object_inputs_are_errors_not_crashes(call):
    assert "expected a JSON object" in call(None)["error"]
    assert "expected a JSON object" in call(["prompt"])["error"]
    import asyncio

    from runtime.handler import handler

    assert "error" in asyncio.run(handler("not a job"))  # type: ignore[arg-type]


def test_generation_failure_answers_refresh_worker(call, service_env, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("CUDA error: device lost")

    monkeypatch.setattr("runtime.generate.generate", boom)
    reply = call(REQ)
    assert reply["refresh_worker"] is True and "device lost" in reply["error"]
    monkeypatch.undo()
    assert "images" in call(REQ)  # the worker still serves


def test_missing_artifacts_configuration_is_an_error_reply(monkeypatch, tmp_path: Path):
    import asyncio

    import runtime.service as service
    from runtime.handler import handler

    saved = service._service
    try:
        service._service = None
        monkeypatch.setenv("UIW_ARTIFACTS", "nosuchrecipe")
        monkeypatch.setenv("UIW_HOME", str(tmp_path))
        reply = asyncio.run(handler({"input": REQ}))
        assert "nosuchrecipe" in reply["error"] and "hint:" in reply["error"]
        monkeypatch.setenv("UIW_ARTIFACTS", "")
        assert "UIW_ARTIFACTS is empty" in asyncio.run(handler({"input": REQ}))["error"]
    finally:
        service._service = saved


def _error_counts() -> dict:
    from runtime.metrics import METRICS

    return dict(METRICS.snapshot()["errors"])


def test_encoding_failure_is_internal_not_a_load_failure(call, monkeypatch):
    """A failure after generation (encoding the images) is a bug of ours: the reply does not
    blame loading, the device is fine (no refresh), and it is counted as `internal`."""

    def broken(*args, **kwargs):
        raise ValueError("encoder broke")

    before = _error_counts().get("internal", 0)
    monkeypatch.setattr("runtime.service.deliver", broken)
    reply = call(REQ)
    assert "loading" not in reply["error"] and "encoder broke" in reply["error"], reply
    assert reply["error"].startswith("internal error") and "refresh_worker" not in reply
    assert _error_counts().get("internal", 0) == before + 1
    monkeypatch.undo()
    assert "images" in call(REQ)


def test_unclassified_generation_failure_is_not_a_load_failure(call, service_env, monkeypatch):
    """An exception the executor did not classify, raised under the lease: a generation failure
    (no device error: no refresh), not "loading the model failed"."""

    def broken(*args, **kwargs):
        raise KeyError("scheduler state")

    before = _error_counts().get("generation", 0)
    monkeypatch.setattr(service_env.executor, "generate", broken)
    reply = call(REQ)
    assert "loading" not in reply["error"] and reply["error"].startswith("generation failed"), reply
    assert "refresh_worker" not in reply
    assert _error_counts().get("generation", 0) == before + 1


@pytest.mark.parametrize(
    ("name", "value"),
    [("UIW_MEMORY_BUDGET", "lots"), ("UIW_PROGRESS_INTERVAL", "often"), ("UIW_REQUEST_TIMEOUT", "-3")],
)
def test_a_bad_setting_stops_the_worker_at_start(demo_artifact: Path, home: Path, tmp_path: Path, name, value):
    """Every UIW_* setting is parsed at start: a bad one exits with code 2 and a hint before any
    model is loaded (it used to start and answer every job with the error)."""
    import time

    from tests.conftest import LEAKY
    from tests.helpers.devserver import refused_start

    env = {k: v for k, v in os.environ.items() if k not in LEAKY and not k.startswith("UIW_")}
    env.update({"UIW_HOME": str(home), "UIW_ARTIFACTS": str(demo_artifact), name: value})
    t0 = time.monotonic()
    proc = refused_start(env, f"{name}={value!r}")
    assert name in proc.stderr and "hint:" in proc.stderr, proc.stderr[-2000:]
    assert "pool: loaded" not in proc.stderr  # it failed before loading
    assert time.monotonic() - t0 < 60

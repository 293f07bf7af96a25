"""Hostile and unlucky requests: no request can make the worker ask to be replaced
(refresh_worker, which makes RunPod's SDK stop the pod), and no error reply echoes a huge value.

- A scheduler that does not fit the model (flow matching on an SD 1.5 UNet) is refused at
  validation, and describe's schema does not offer it.
- An exception while running a request that is not a device error is `error:generation`
  without a refresh; only a device error refreshes.
- Non-finite latents (NaN) come back as an error, not as a black image.
- Error messages quote at most a short prefix of any value, and list a bounded number of problems.

Faults are injected into the real UNet's forward (hooks), as in tests/runtime/test_failures.py."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REQ

MAX_REPLY_BYTES = 10_000


def _error_counts() -> dict:
    from runtime.metrics import METRICS

    return dict(METRICS.snapshot()["errors"])


def _size(reply: dict) -> int:
    return len(json.dumps(reply).encode())


# --- schedulers: only those that fit the model --------------------------------------------------


def test_scheduler_groups_agree_with_diffusers_compatibles():
    """The literal table validation uses (no diffusers import) against diffusers' own
    `compatibles`: two of our schedulers share a group exactly when diffusers says they are
    interchangeable."""
    import diffusers

    from runtime.artifact import SCHEDULERS
    from runtime.schema import SCHEDULER_GROUPS

    assert set(SCHEDULER_GROUPS) == set(SCHEDULERS.values())
    for a in SCHEDULERS.values():
        # `compatibles` is a property of a scheduler instance (default config: instant).
        compatible = {c.__name__ for c in getattr(diffusers, a)().compatibles}
        for b in SCHEDULERS.values():
            assert (SCHEDULER_GROUPS[a] == SCHEDULER_GROUPS[b]) == (b in compatible), (a, b)


def _manifest(family: str, base_scheduler: str | None, default: str):
    from tests.runtime.test_describe_schema import manifest

    m = manifest()
    components = {"scheduler": base_scheduler} if base_scheduler else {}
    return m.model_copy(
        update={
            "family": family,
            "components": components,
            "serving": m.serving.model_copy(update={"scheduler": default}),
        }
    )


@pytest.mark.parametrize(
    ("family", "base", "default", "expected"),
    [
        ("sd15", "PNDMScheduler", "K_EULER", "noise"),
        ("sdxl", "EulerDiscreteScheduler", "K_EULER", "noise"),
        ("flux-dev", "FlowMatchEulerDiscreteScheduler", "FLOW_MATCH_EULER", "flow"),
        # an older manifest without the component, and a base scheduler outside our table: the default's kind
        ("sd15", None, "DDIM", "noise"),
        ("sd15", "UniPCMultistepScheduler", "K_EULER", "noise"),
        ("sd3", None, "FLOW_MATCH_EULER", "flow"),
    ],
)
def test_requests_may_only_name_schedulers_of_the_models_kind(family, base, default, expected):
    from runtime.artifact import SCHEDULERS
    from runtime.request_schema import request_json_schema
    from runtime.schema import RequestError, validate

    m = _manifest(family, base, default)
    flow = {"FLOW_MATCH_EULER"}
    allowed = flow if expected == "flow" else set(SCHEDULERS) - flow
    schema_enum = request_json_schema(m)["properties"]["scheduler"]["anyOf"][0]["enum"]
    assert set(schema_enum) == allowed  # describe publishes what validation takes
    for name in SCHEDULERS:
        if name in allowed:
            assert validate({"prompt": "x", "scheduler": name}, m)[0].scheduler == name
        else:
            with pytest.raises(RequestError) as e:
                validate({"prompt": "x", "scheduler": name}, m)
            [message] = e.value.errors
            assert message.startswith(f"scheduler: {name!r} does not fit this model") and "hint:" in message


def test_flow_matching_scheduler_on_sd15_is_a_request_error_not_a_dead_worker(call, service_env):
    """worker-sdxl's enum offered FLOW_MATCH_EULER to every model; on SD 1.5 diffusers then fails
    (no init_noise_sigma) and the reply asked for a new worker: anyone could stop pods at will."""
    before = _error_counts()
    reply = call({**REQ, "scheduler": "FLOW_MATCH_EULER"})
    assert set(reply) == {"error", "errors"}, reply
    assert reply["errors"][0].startswith("scheduler: 'FLOW_MATCH_EULER' does not fit this model")
    after = _error_counts()
    assert after.get("invalid", 0) == before.get("invalid", 0) + 1
    assert after.get("generation", 0) == before.get("generation", 0)
    described = call({"describe": True})
    [artifact] = described["artifacts"].values()
    assert "FLOW_MATCH_EULER" not in artifact["schema"]["properties"]["scheduler"]["anyOf"][0]["enum"]
    assert "images" in call(REQ)


# --- classification: only the device may ask for a new worker -----------------------------------


def _hook(service, fault):
    """fault(module, args) before each UNet forward of the service's default artifact."""
    return service.default.pipeline.unet.register_forward_pre_hook(fault)


@pytest.mark.parametrize(
    "error",
    [
        AttributeError("'FlowMatchEulerDiscreteScheduler' object has no attribute 'init_noise_sigma'"),
        ValueError("a shape the pipeline did not expect"),
        # An exception quoting a request's own text that says "CUDA error" is still not the device's.
        ValueError("prompt 'CUDA error: device-side assert' is odd"),
        KeyError("scheduler state"),
    ],
    ids=["attribute", "value", "quoted-cuda-text", "key"],
)
def test_an_exception_while_generating_is_not_a_device_failure(call, service_env, error):
    def fault(module, args):
        raise error

    before = _error_counts()
    handle = _hook(service_env, fault)
    try:
        reply = call(REQ)
    finally:
        handle.remove()
    assert reply["error"].startswith(f"generation failed: {type(error).__name__}"), reply
    assert "refresh_worker" not in reply, "a request-triggered exception must not stop the worker"
    after = _error_counts()
    assert after.get("generation", 0) == before.get("generation", 0) + 1
    assert after.get("device", 0) == before.get("device", 0)
    assert "images" in call(REQ)


def test_a_device_error_still_asks_for_a_new_worker(call, service_env):
    import torch

    errors = [RuntimeError("CUDA error: an illegal memory access was encountered")]
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None:
        errors.append(accelerator("device lost"))
    for error in errors:

        def fault(module, args, error=error):
            raise error

        handle = _hook(service_env, fault)
        try:
            reply = call(REQ)
        finally:
            handle.remove()
        assert reply["refresh_worker"] is True and reply["error"].startswith("the device failed"), reply


# --- non-finite latents ---------------------------------------------------------------------


def test_nan_latents_are_an_error_not_a_black_image(call, service_env):
    """A UNet that outputs NaN (what an fp16 overflow does) used to come back as a black PNG."""
    import torch

    def nan_output(module, args, output):
        first = output[0] if isinstance(output, tuple) else output.sample
        poisoned = torch.full_like(first, float("nan"))
        return (poisoned, *output[1:]) if isinstance(output, tuple) else type(output)(sample=poisoned)

    before = _error_counts()
    handle = service_env.default.pipeline.unet.register_forward_hook(nan_output)
    try:
        reply = call(REQ)
    finally:
        handle.remove()
    assert "images" not in reply, "non-finite latents must not be decoded into an image"
    assert reply["error"].startswith("generation failed: the model produced non-finite latents"), reply
    assert "hint:" in reply["error"] and "refresh_worker" not in reply
    assert _error_counts().get("generation", 0) == before.get("generation", 0) + 1
    assert "images" in call(REQ)


def test_check_finite_looks_at_every_value():
    import torch

    from runtime.generate import NonFiniteLatents, check_finite
    from runtime.schema import validate
    from tests.runtime.test_describe_schema import manifest

    request, _ = validate({"prompt": "x", "seed": 3}, manifest())
    check_finite(torch.zeros(2, 4, 8, 8), request)
    for bad in (float("nan"), float("inf"), float("-inf")):
        latents = torch.zeros(2, 4, 8, 8)
        latents[1, 3, 7, 7] = bad
        with pytest.raises(NonFiniteLatents, match="seed 3"):
            check_finite(latents, request)


# --- bounded error replies --------------------------------------------------------------------

HUGE = "x" * 1_000_000


@pytest.mark.parametrize(
    "job_input",
    [
        {"prompt": HUGE},
        {"prompt": "x", "negative_prompt": HUGE},
        {"prompt": "x", "scheduler": HUGE},
        {"prompt": "x", HUGE: 1},
        {"prompt": "x", "width": HUGE},
        {"prompt": "x", "model": HUGE},
        {"prompt": "x", "timeout": HUGE},
        {"prompt": "x", "preview": HUGE},
        {"prompt": "x", "loras": [{"name": HUGE}]},
        {"prompt": "x", "loras": [{"name": "a", HUGE: 1}]},
        {"prompt": "x", "controlnets": [{"name": HUGE, "image": HUGE}]},
        {"prompt": "x", "seed": [HUGE] * 100},
        {"describe": True, "model": HUGE},
    ],
    ids=[
        "prompt",
        "negative_prompt",
        "scheduler",
        "unknown-key",
        "width",
        "model",
        "timeout",
        "preview",
        "lora-name",
        "lora-key",
        "controlnet",
        "seed-list",
        "describe-model",
    ],
)
def test_an_error_reply_quotes_a_short_prefix_of_a_huge_value(call, job_input):
    reply = call(job_input)
    assert "error" in reply and "images" not in reply, reply.keys()
    assert _size(reply) < MAX_REPLY_BYTES, _size(reply)
    assert "x" * 200 not in json.dumps(reply)
    assert "refresh_worker" not in reply


def test_quote_keeps_a_prefix_and_says_it_cut():
    from runtime.schema import MAX_QUOTE_CHARS, quote

    assert quote("short") == "'short'"
    assert quote(7) == "7" and quote(None) == "None"
    cut = quote("y" * 1000)
    assert cut.startswith("'yyyy") and cut.endswith("…") and len(cut) == MAX_QUOTE_CHARS + 1
    nested: list = []
    for _ in range(10_000):  # deeper than the recursion limit: never rendered whole
        nested = [nested]
    assert len(quote(nested)) <= MAX_QUOTE_CHARS + 1
    assert len(quote(10**5000)) <= MAX_QUOTE_CHARS + 1  # past Python's int-to-str digit limit


def test_thousands_of_problems_are_listed_up_to_a_bound(call):
    from runtime.schema import MAX_ERRORS

    reply = call({"prompt": "x", **{f"k{i}": i for i in range(20_000)}})
    assert len(reply["errors"]) == MAX_ERRORS + 1
    assert reply["errors"][-1] == f"... and {20_000 - MAX_ERRORS} more problems (fix these first)"
    assert reply["error"] == "; ".join(reply["errors"]) and _size(reply) < MAX_REPLY_BYTES

"""The request-level rule, over the whole schema: no request can make the worker ask to be
replaced (refresh_worker), and every request ends as images or as a structured error reply.

- Valid requests (hypothesis), across every scheduler name, the tasks (txt2img, img2img,
  inpaint: small data-URI images) and the tiny builtin families (tiny-sd15, tiny-sdxl,
  tiny-flux), are served or refused with a request error: never `error:generation`, never a
  refresh. A scheduler name the model cannot use is one of these refusals.
- Hostile inputs (wrong types, huge strings, deep nesting, unicode, NaN and infinities, negative
  and huge numbers, unknown keys, huge lists), through the real handler: each one a structured
  error reply under 10 kB, no exception escaping, no refresh. A bounded run is in the default
  suite; a longer one is marked slow.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import run_compiler

MAX_REPLY_BYTES = 10_000
# Outcomes a request must never cause: a failure classified as the model's or ours, not the request's.
NOT_THE_REQUESTS = ("generation", "device", "internal", "model")
FAMILY_RECIPES = {
    "tiny-sdxl": "base: builtin:tiny-sdxl\nprecision: fp32\ndefaults:\n  steps: 2\n",
    "tiny-flux": "base: builtin:tiny-flux\nprecision: fp32\ndefaults:\n  steps: 2\n",
}


def _counts() -> dict[str, int]:
    from runtime.metrics import METRICS

    return dict(METRICS.snapshot()["errors"])


def _data_uri(mode: str, color: Any, size: tuple[int, int]) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def families(home: Path, demo_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One service per tiny builtin family, each artifact compiled once for this module (the
    demo artifact is tiny-sd15)."""
    from runtime.service import Service, Settings

    tmp = tmp_path_factory.mktemp("families")
    (tmp / "recipes").mkdir()
    services = {"tiny-sd15": Service(Settings(artifacts=(str(demo_artifact),), home=home))}
    for name, text in FAMILY_RECIPES.items():
        (tmp / "recipes" / f"{name}.yaml").write_text(text)
        proc = run_compiler(f"recipe={name}", f"recipes_dir={tmp / 'recipes'}", home=tmp / "home")
        assert proc.returncode == 0, proc.stderr[-2000:]
        services[name] = Service(Settings(artifacts=(proc.stdout.strip(),), home=tmp / "home"))
    return services


# --- valid requests: served, or refused as the request's fault ------------------------------------


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request every field of which is within its own rules, at tiny sizes and 1-2 steps, for
    any scheduler name and task; the rules between fields (steps x strength) may still refuse it."""
    from runtime.artifact import SCHEDULERS

    task = draw(st.sampled_from(["txt2img", "img2img", "inpaint"]))
    width, height = draw(st.sampled_from([(None, None), (64, 64), (72, 64), (64, 80)]))
    req: dict[str, Any] = {
        "prompt": draw(st.one_of(st.text(min_size=1, max_size=40), st.just("a photo of a cat " * 600))),
        "scheduler": draw(st.one_of(st.none(), st.sampled_from(list(SCHEDULERS)))),
        "num_inference_steps": draw(st.sampled_from([1, 2])),
        "seed": draw(st.integers(0, 2**64 - 1)),
        "num_images": draw(st.sampled_from([1, 1, 2])),
        "guidance_scale": draw(st.one_of(st.floats(0, 50), st.sampled_from([0, 1, 50]))),
        "negative_prompt": draw(st.one_of(st.none(), st.text(max_size=20))),
        "image_format": draw(st.sampled_from(["png", "jpeg", "webp", None])),
    }
    if width is not None:
        req |= {"width": width, "height": height}
    if task != "txt2img":
        size = draw(st.sampled_from([(64, 64), (80, 72), (8, 8)]))
        req["image_url"] = _data_uri("RGB", (200, 30, 30), size)
        req["strength"] = draw(st.one_of(st.floats(0, 1), st.sampled_from([0.5, 1.0])))
        if task == "inpaint":
            req["mask_url"] = _data_uri("L", 255, size)
    return {k: v for k, v in req.items() if v is not None or draw(st.booleans())}


def _served_or_refused(service: Any, req: dict[str, Any]) -> bool:
    """Runs one valid request; True when it was served (images), False when refused."""
    before = _counts()
    reply = service.run(req)
    assert "refresh_worker" not in reply, reply
    if "images" not in reply:
        # Refused as the request's own fault: a structured request error, counted as invalid.
        assert set(reply) >= {"error", "errors"} and reply["errors"], reply
    else:
        assert len(reply["images"]) == req.get("num_images", 1)
    after = _counts()
    for kind in NOT_THE_REQUESTS:
        assert after.get(kind, 0) == before.get(kind, 0), (kind, reply.get("error"))
    return "images" in reply


@pytest.mark.parametrize("family", ["tiny-sd15", "tiny-sdxl", "tiny-flux"])
def test_valid_requests_are_served_or_refused_never_a_worker_failure(families, family):
    service = families[family]
    served = []

    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(valid_requests())
    def check(req: dict[str, Any]) -> None:
        served.append(_served_or_refused(service, req))

    check()
    assert any(served) and not all(served), "the examples reach both outcomes"


def test_every_scheduler_and_task_on_every_family(families):
    """The whole product the property samples from, once each, 1 step: no scheduler name on any
    family can make a worker fail (a flow scheduler on SD is refused, a noise one on FLUX too)."""
    from runtime.artifact import SCHEDULERS

    image, mask = _data_uri("RGB", (10, 200, 30), (64, 64)), _data_uri("L", 255, (64, 64))
    tasks = {"txt2img": {}, "img2img": {"image_url": image}, "inpaint": {"image_url": image, "mask_url": mask}}
    for family, service in families.items():
        for scheduler in SCHEDULERS:
            fits = (scheduler == "FLOW_MATCH_EULER") == (family == "tiny-flux")
            for task, inputs in tasks.items():
                req = {"prompt": "a cat", "scheduler": scheduler, "num_inference_steps": 1, "seed": 1, **inputs}
                if task != "txt2img":
                    req["strength"] = 1.0
                served = _served_or_refused(service, req)
                if task == "txt2img":
                    assert served == fits, (family, scheduler)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny-sd15", "tiny-sdxl", "tiny-flux"])
def test_valid_requests_long_run(families, family):
    service = families[family]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(valid_requests())
    def check(req: dict[str, Any]) -> None:
        _served_or_refused(service, req)

    check()


# --- hostile inputs: structured errors, bounded -------------------------------------------------


def _deep(depth: int, kind: type) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value] if kind is list else {"a": value}
    return value


HUGE = "€" * 1_000_000
HOSTILE_CONSTANTS = [
    HUGE,
    "",
    " ",
    "\x00",
    "\ud800",  # a lone surrogate: valid in JSON (\ud800), not encodable as UTF-8
    "👩\u200d👩\u200d👧" * 3,
    "\u202eevil",
    "<script>",
    "../../etc/passwd",
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    1e308,
    -1,
    0,
    2**63,
    2**64,
    -(2**63),
    10**30,
    True,
    False,
    None,
    [],
    {},
    [0] * 100_000,
    ["x"] * 10_000,
    {f"k{i}": i for i in range(10_000)},
    _deep(10_000, list),
    _deep(10_000, dict),
]
FIELDS = [
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "seed",
    "scheduler",
    "num_inference_steps",
    "refiner_inference_steps",
    "guidance_scale",
    "strength",
    "image_url",
    "mask_url",
    "num_images",
    "high_noise_frac",
    "loras",
    "controlnets",
    "image_format",
    "quality",
    "num_outputs",
    "prompt_strength",
    "init_image",
    "guidance",
    "mask",
    "model",
    "recipe",
    "timeout",
    "preview",
    "describe",
]


def _json(rng: random.Random, depth: int = 3) -> Any:
    """A random JSON value (NaN and infinities included: RunPod's JSON parser takes them)."""
    kind = rng.randrange(8 if depth > 0 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([rng.randint(-(2**70), 2**70), rng.randint(-10, 1100)])
    if kind == 3:
        return rng.choice([rng.uniform(-1e6, 1e6), rng.uniform(-2, 60), math.nan, math.inf, -math.inf])
    if kind in (4, 5):
        return "".join(
            chr(rng.choice([rng.randint(32, 126), rng.randint(0, 0x10FFFF)])) for _ in range(rng.randint(0, 12))
        )
    if kind == 6:
        return [_json(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    return {str(_json(rng, 0)): _json(rng, depth - 1) for _ in range(rng.randint(0, 4))}


def _hostile(rng: random.Random) -> Any:
    return rng.choice(HOSTILE_CONSTANTS) if rng.random() < 0.5 else _json(rng)


def _adapters(rng: random.Random) -> Any:
    if rng.random() < 0.1:
        return rng.choice([[{"name": HUGE}] * 50, [{}] * 10_000, _hostile(rng)])
    keys = ["name", "scale", "image", "extra"]
    return [{k: _hostile(rng) for k in rng.sample(keys, rng.randint(0, 4))} for _ in range(rng.randint(0, 12))]


def hostile_input(rng: random.Random, poisoned: bool = True) -> Any:
    """A job input: mostly a dict of real field names with hostile values (the adapters' lists
    with hostile entries), sometimes unknown keys, sometimes no object at all. `poisoned` adds
    one unknown key, so the request is always invalid however its other fields come out (every
    field is still validated: all problems are collected)."""
    if rng.random() < 0.05:
        return _hostile(rng)
    doc: dict[str, Any] = {}
    if rng.random() < 0.75:
        doc["prompt"] = rng.choice(["a cat", _hostile(rng)])
    for key in rng.sample(FIELDS, rng.randint(0, 6)):
        doc[key] = _adapters(rng) if key in ("loras", "controlnets") else _hostile(rng)
    for _ in range(rng.randint(0, 2)):
        doc[str(_json(rng, 0))] = _hostile(rng)
    if rng.random() < 0.1:
        doc[HUGE] = 1
    if poisoned:
        doc["\x00not-a-field"] = _hostile(rng)
    return doc


def _check_hostile(job_input: Any) -> dict[str, Any]:
    from runtime.handler import handler

    reply = asyncio.run(handler({"id": "fuzz", "input": job_input}))
    assert isinstance(reply, dict) and "refresh_worker" not in reply, reply
    if "images" not in reply:  # an error reply: bounded (a served one carries its images)
        size = len(json.dumps(reply).encode())
        assert size < MAX_REPLY_BYTES, size
        assert isinstance(reply.get("error"), str) and reply["error"], reply
        if "errors" in reply:
            assert reply["errors"] and all(isinstance(e, str) for e in reply["errors"])
            assert reply["error"] == "; ".join(reply["errors"])
    return reply


def _fuzz(count: int, poisoned: bool, seed: int) -> None:
    """`count` hostile inputs from a seeded generator (a plain one: hypothesis's engine costs
    ~20 ms an example here, the handler ~1 ms), through the real handler."""
    from runtime.schema import quote

    rng = random.Random(seed)
    before = _counts()
    for i in range(count):
        job_input = hostile_input(rng, poisoned)
        try:
            reply = _check_hostile(job_input)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}, input #{i}: {quote(job_input)}: {e}") from None
        if poisoned:
            assert "images" not in reply, (seed, i)
    after = _counts()
    for kind in NOT_THE_REQUESTS:
        assert after.get(kind, 0) == before.get(kind, 0), kind


def test_hostile_inputs_get_bounded_structured_errors(service_env):
    _fuzz(1000, poisoned=True, seed=0)


@pytest.mark.slow
def test_hostile_inputs_long_run(service_env):
    """Unpoisoned too: an input that happens to be valid is served (tiny model), never a failure."""
    _fuzz(50_000, poisoned=False, seed=random.randrange(2**32))

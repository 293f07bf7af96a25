"""describe's JSON Schema (runtime.request_schema.request_json_schema) accepts and rejects exactly what the
handler's own validation (runtime.schema.validate) does, on generated requests, judged by the
independent `jsonschema` package (Draft202012Validator).

One documented exception, checked as such rather than skipped: a float with no fractional part
(``64.0``) where an integer is expected. JSON Schema counts it as an integer (draft 2020-12: "any
number with a zero fractional part"); the handler, strict like worker-sdxl's pydantic types,
refuses it. The test asserts that this is the only way the two may differ: with such floats made
ints, they agree again.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from runtime.artifact import SCHEDULERS, Manifest
from runtime.request_schema import min_steps, min_strength, request_json_schema
from runtime.schema import RequestError, validate


def manifest(
    *,
    tasks: tuple[str, ...] = ("txt2img",),
    steps: int = 4,
    max_steps: int = 100,
    loras: tuple[tuple[str, bool], ...] = (),
    controlnets: tuple[str, ...] = (),
    tokens: tuple[str, ...] = (),
) -> Manifest:
    return Manifest.model_validate(
        {
            "format_version": 1,
            "cache_key": "c" * 64,
            "content_digest": "d" * 64,
            "recipe": "test",
            "family": "sd15",
            "pipeline_class": "StableDiffusionPipeline",
            "components": {},
            "serving": {
                "scheduler": "K_EULER",
                "defaults": {"width": 64, "height": 64, "steps": steps, "guidance_scale": 7.5},
                "limits": {"max_width": 1024, "max_height": 768, "max_steps": max_steps, "max_images": 4},
            },
            "capabilities": {"tasks": list(tasks), "pipelines": {}},
            "loras": [
                {"name": n, "scale": 0.8, "fused": fused, "file": None if fused else f"loras/{n}.safetensors"}
                for n, fused in loras
            ],
            "controlnets": [{"name": n, "scale": 1.0, "path": f"controlnets/{n}"} for n in controlnets],
            "embeddings": [{"token": t, "vectors": 1, "text_encoders": ["text_encoder"]} for t in tokens],
            "runtime": {"dtype": "fp32"},
            "environment": {},
            "provenance": {},
            "files": [],
            "created_at": "2026-01-01T00:00:00Z",
        }
    )


MANIFESTS = {
    # the demo's shape: text-to-image only, one fused LoRA (no switchable ones: the name enum is empty)
    "txt2img": manifest(loras=(("style", True),)),
    # everything, with a default step count too small for img2img's default strength (3 x 0.3 < 1)
    "all-tasks": manifest(
        tasks=("txt2img", "img2img", "inpaint", "controlnet"),
        steps=3,
        max_steps=30,
        loras=(("a", False), ("b", False), ("c", True)),
        controlnets=("edges", "depth"),
        tokens=("<cat-toy>",),
    ),
    # an image-only artifact (no text-to-image), default steps enough for img2img's default
    "image-only": manifest(tasks=("img2img", "inpaint"), steps=10, max_steps=50),
}

INT_FIELDS = ("width", "height", "seed", "num_inference_steps", "refiner_inference_steps", "num_images", "quality")


def handler_accepts(doc: dict[str, Any], m: Manifest) -> bool:
    try:
        validate(doc, m)
    except RequestError:
        return False
    return True


def ints_for_integral_floats(value: Any) -> Any:
    """The documented exception undone: 64.0 -> 64 (JSON Schema's reading of it)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: ints_for_integral_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [ints_for_integral_floats(v) for v in value]
    return value


# --- generated requests -------------------------------------------------------------------------

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
)
json_any = st.recursive(
    json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
)


def ints(lo: int, hi: int, *edges: Any) -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(lo, hi), st.sampled_from([None, *edges]))


def fractions(lo: float, hi: float, *edges: Any) -> st.SearchStrategy[Any]:
    return st.one_of(st.floats(lo, hi), st.integers(math.floor(lo), math.ceil(hi)), st.sampled_from([None, *edges]))


def strengths(max_steps: int) -> st.SearchStrategy[Any]:
    """Strengths right at and just below each step count's least strength (the hard cases)."""
    at = st.integers(1, max_steps + 1).map(min_strength)
    below = at.map(lambda x: math.nextafter(x, 0.0))
    return st.one_of(fractions(-0.2, 1.2, True, "0.5", 0.3, 1 / 3), at, below)


def image_values() -> st.SearchStrategy[Any]:
    return st.sampled_from([None, "", "https://example.com/a.png", "data:image/png;base64,AAAA", 5, []])


def adapters(names: list[Any], with_image: bool) -> st.SearchStrategy[Any]:
    item: dict[str, st.SearchStrategy[Any]] = {"name": st.sampled_from(names)}
    optional: dict[str, st.SearchStrategy[Any]] = {"scale": fractions(-5, 5, "1")}
    if with_image:
        item["image"] = st.sampled_from(["https://example.com/c.png", "", 3])
    else:
        optional["bogus"] = json_scalar
    entry = st.fixed_dictionaries(item, optional=optional)
    return st.one_of(st.lists(entry, max_size=3), st.lists(entry, min_size=9, max_size=10), json_scalar)


def field_values(m: Manifest) -> dict[str, st.SearchStrategy[Any]]:
    """Per field: anything near its rules, valid or not (wrong types, off-by-one bounds)."""
    lim = m.serving.limits
    lora_names = [lo.name for lo in m.loras] + ["zz", 7]
    cn_names = [c.name for c in m.controlnets] + ["zz"]
    steps = ints(-1, lim.max_steps + 2, 2.5, 4.0, "4", True, lim.max_steps)
    prob = fractions(-0.5, 1.5, "0.5")
    return {
        "negative_prompt": st.one_of(st.none(), st.text(max_size=3), st.just(7)),
        "width": ints(0, 1100, 56, 64, 1024, 1032, 64.0, "64", True),
        "height": ints(0, 800, 64, 768, 776, 1001),
        "seed": ints(-2, 2**64 + 2, 2**64 - 1, 2**64, True, 1.5),
        "scheduler": st.sampled_from([*SCHEDULERS, None, "EULER", 1, "k_euler"]),
        "num_inference_steps": steps,
        "refiner_inference_steps": steps,
        "guidance_scale": fractions(-1, 52, "7", True, 50.0),
        "guidance": fractions(-1, 52),
        "strength": strengths(lim.max_steps),
        "prompt_strength": strengths(lim.max_steps),
        "image_url": image_values(),
        "init_image": image_values(),
        "mask_url": image_values(),
        "mask": image_values(),
        "num_images": ints(-1, 6, 1.0),
        "num_outputs": ints(-1, 6),
        "high_noise_frac": prob,
        "loras": adapters(lora_names, with_image=False),
        "controlnets": adapters(cn_names, with_image=True),
        "image_format": st.sampled_from(["png", "jpeg", "webp", None, "gif", "PNG", 1]),
        "quality": ints(-1, 102, 1, 100, 50.0, "90"),
        "foo": json_any,  # not a field: refused by both
    }


def valid_values(m: Manifest) -> dict[str, st.SearchStrategy[Any]]:
    """Per field: values its own rules accept (the cross-field rules may still refuse them), so
    that accepted requests are common and the rules between fields get exercised."""
    lim = m.serving.limits
    steps = st.one_of(st.none(), st.integers(1, lim.max_steps))
    lora = st.fixed_dictionaries(
        {"name": st.sampled_from([lo.name for lo in m.loras if not lo.fused] or ["none"])},
        optional={"scale": st.one_of(st.none(), st.floats(-4, 4))},
    )
    cn = st.fixed_dictionaries(
        {"name": st.sampled_from([c.name for c in m.controlnets] or ["none"]), "image": st.just("https://e.com/c.png")},
        optional={"scale": st.one_of(st.none(), st.floats(0, 4))},
    )
    image = st.sampled_from(["https://example.com/a.png"] * 4 + ["", None])
    unit = st.one_of(st.none(), st.floats(0, 1), st.sampled_from([0, 1]))
    return {
        "negative_prompt": st.one_of(st.none(), st.text(max_size=3)),
        "width": st.integers(8, lim.max_width // 8).map(lambda n: n * 8),
        "height": st.integers(8, lim.max_height // 8).map(lambda n: n * 8),
        "seed": st.one_of(st.none(), st.integers(0, 2**64 - 1)),
        "scheduler": st.sampled_from([*SCHEDULERS, None]),
        "num_inference_steps": steps,
        "refiner_inference_steps": steps,
        "guidance_scale": st.one_of(st.none(), st.floats(0, 50), st.integers(0, 50)),
        "guidance": st.floats(0, 50),
        "strength": st.one_of(unit, strengths(lim.max_steps).filter(lambda x: isinstance(x, float) and 0 <= x <= 1)),
        "prompt_strength": unit,
        "image_url": image,
        "init_image": image,
        "mask_url": image,
        "mask": image,
        "num_images": st.integers(1, lim.max_images),
        "num_outputs": st.integers(1, lim.max_images),
        "high_noise_frac": unit,
        "loras": st.lists(lora, max_size=3),
        "controlnets": st.lists(cn, max_size=2),
        "image_format": st.sampled_from(["png", "jpeg", "webp", None]),
        "quality": st.one_of(st.none(), st.integers(1, 100)),
    }


SCENARIOS = ("txt2img", "img2img", "inpaint", "controlnet", "controlnet+image", "mask only")


@st.composite
def requests(draw: st.DrawFn, m: Manifest) -> dict[str, Any]:
    """A third each: a request built for a task (every field within its own rules, so the rules
    between fields decide); the same with one field replaced by anything near its rules; and
    random fields with random values."""
    mode = draw(st.sampled_from(["task", "task, one field off", "anything"]))
    values = field_values(m) if mode == "anything" else valid_values(m)
    doc: dict[str, Any] = {}
    if mode != "anything":
        doc["prompt"] = draw(st.text(min_size=1, max_size=5))
    elif draw(st.integers(0, 9)):
        doc["prompt"] = draw(st.one_of(st.text(min_size=1, max_size=5), st.sampled_from(["", 3, "x" * 10_001])))
    if mode == "anything":
        for key in draw(st.lists(st.sampled_from(sorted(values)), max_size=5, unique=True)):
            doc[key] = draw(values[key])
        return doc
    plain = sorted(
        set(values)
        - {
            "image_url",
            "init_image",
            "mask_url",
            "mask",
            "controlnets",
            "strength",
            "prompt_strength",
            "num_inference_steps",
        }
    )
    for key in draw(st.lists(st.sampled_from(plain), max_size=3, unique=True)):
        doc[key] = draw(values[key])
    offered = [t for t in SCENARIOS if t in m.capabilities.tasks]  # mostly what the artifact does
    scenario = draw(st.one_of(st.sampled_from(offered), st.sampled_from(offered), st.sampled_from(SCENARIOS)))
    url = "https://example.com/a.png"
    if scenario in ("img2img", "inpaint", "controlnet+image"):
        doc[draw(st.sampled_from(["image_url", "init_image"]))] = url
    if scenario in ("inpaint", "mask only"):
        doc[draw(st.sampled_from(["mask_url", "mask"]))] = url
    if scenario.startswith("controlnet"):
        doc["controlnets"] = draw(values["controlnets"])
    # steps and strength together: right at, just below, or anywhere near the least strength
    # and step counts where 1/steps is not the least strength (49: 49 * (1/49) < 1)
    top = m.serving.limits.max_steps
    odd = [n for n in range(1, top + 1) if n * (1 / n) < 1]
    steps = draw(st.one_of(st.none(), st.integers(1, top), st.sampled_from(odd or [top])))
    if steps is not None or draw(st.booleans()):
        doc["num_inference_steps"] = steps
    least = min_strength(steps or m.serving.defaults.steps)
    strength = draw(st.sampled_from([None, least, math.nextafter(least, 0.0), "random"]))
    if strength == "random":
        strength = draw(values["strength"])
    if strength is not None or draw(st.booleans()):
        doc[draw(st.sampled_from(["strength", "prompt_strength"]))] = strength
    if mode == "task, one field off":
        key = draw(st.sampled_from(sorted(field_values(m))))
        doc[key] = draw(field_values(m)[key])
    return doc


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_schema_and_validation_agree_on_generated_requests(name: str):
    m = MANIFESTS[name]
    schema = request_json_schema(m)
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    seen = {"accepted": 0, "rejected": 0, "integral-float exception": 0}

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(requests(m))
    def check(doc: dict[str, Any]) -> None:
        doc = json.loads(json.dumps(doc))  # exactly what a client can send
        by_schema, by_handler = validator.is_valid(doc), handler_accepts(doc, m)
        normalized = ints_for_integral_floats(doc)
        assert validator.is_valid(normalized) == by_schema
        if by_schema != by_handler:
            # The one documented difference: the schema accepts, the handler refuses, and only
            # because of an integral float; made an int it is the same verdict.
            assert by_schema and not by_handler, (doc, list(validator.iter_errors(doc)))
            assert json.dumps(normalized) != json.dumps(doc) and handler_accepts(normalized, m), doc
            seen["integral-float exception"] += 1
        seen["accepted" if by_handler else "rejected"] += 1

    check()
    # Both verdicts were exercised, many times each (the generator is not trivially one-sided).
    assert seen["accepted"] >= 50 and seen["rejected"] >= 50, seen


CASES = [
    # (manifest, request, accepted)
    ("txt2img", {"prompt": "x"}, True),
    ("txt2img", {"prompt": "x", "num_outputs": 2, "num_images": 2}, False),  # a name given twice
    ("txt2img", {"prompt": "x", "image_url": "https://e.com/a.png"}, False),  # no img2img task
    ("txt2img", {"prompt": "x", "image_url": ""}, True),  # empty: absent, as worker-sdxl reads it
    ("txt2img", {"prompt": "x", "loras": [{"name": "style"}]}, False),  # fused, not switchable
    ("txt2img", {"prompt": "x", "image_format": "webp", "quality": 80}, True),
    ("txt2img", {"prompt": "x", "quality": 101}, False),
    ("all-tasks", {"prompt": "x", "loras": [{"name": "a"}, {"name": "b", "scale": 0.5}]}, True),
    ("all-tasks", {"prompt": "x", "loras": [{"name": "a"}, {"name": "a", "scale": 0.5}]}, False),  # twice
    (
        "all-tasks",
        {"prompt": "x", "controlnets": [{"name": "edges", "image": "u"}, {"name": "edges", "image": "v"}]},
        False,
    ),
    ("all-tasks", {"prompt": "x", "controlnets": [{"name": "edges", "image": "u"}], "init_image": "i"}, False),
    ("all-tasks", {"prompt": "x", "mask": "m"}, False),  # a mask needs its image
    ("all-tasks", {"prompt": "x", "mask": "m", "init_image": "i"}, True),  # inpaint: default strength 1
    ("all-tasks", {"prompt": "x", "image_url": "i"}, False),  # 3 default steps x 0.3 < 1
    ("all-tasks", {"prompt": "x", "image_url": "i", "num_inference_steps": 4}, True),
    ("all-tasks", {"prompt": "x", "image_url": "i", "strength": 1 / 3}, True),  # 3 x (1/3) == 1.0
    ("all-tasks", {"prompt": "x", "image_url": "i", "num_inference_steps": 29, "strength": 1 / 29}, True),
    ("image-only", {"prompt": "x"}, False),  # no text-to-image
    ("image-only", {"prompt": "x", "image_url": "i", "num_inference_steps": 49, "strength": 1 / 49}, False),
    ("image-only", {"prompt": "x", "image_url": "i", "num_inference_steps": 49, "strength": min_strength(49)}, True),
    ("image-only", {"prompt": "x", "image_url": "i", "prompt_strength": 0.1}, True),  # 10 x 0.1 == 1.0
    ("image-only", {"prompt": "x", "image_url": "i", "prompt_strength": 0.09}, False),
]


@pytest.mark.parametrize(("name", "doc", "accepted"), CASES)
def test_known_cases(name: str, doc: dict[str, Any], accepted: bool):
    m = MANIFESTS[name]
    assert handler_accepts(doc, m) is accepted
    assert Draft202012Validator(request_json_schema(m)).is_valid(doc) is accepted


def test_float_edges_of_the_denoise_rule():
    # 49 * (1/49) rounds below 1: diffusers would run int(0.999…) = 0 steps; both refuse it.
    assert 49 * (1 / 49) < 1 and min_strength(49) > 1 / 49 and 49 * min_strength(49) >= 1
    for s in range(1, 200):
        x = min_strength(s)
        assert s * x >= 1 > s * math.nextafter(x, 0.0)
    assert min_steps(0.3) == 4 and min_steps(1.0) == 1 and min_steps(0.1) == 10


def test_the_schema_names_what_the_artifact_offers():
    schema = request_json_schema(MANIFESTS["all-tasks"])
    defs, props = schema["$defs"], schema["properties"]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert defs["LoraChoice"]["properties"]["name"]["enum"] == ["a", "b"]  # switchable only
    assert defs["ControlNetChoice"]["properties"]["name"]["enum"] == ["depth", "edges"]
    assert schema["x-fused-loras"] == {"c": 0.8} and schema["x-embedding-tokens"] == ["<cat-toy>"]
    assert schema["x-tasks"] == ["txt2img", "img2img", "inpaint", "controlnet"]
    assert "<cat-toy>" in props["prompt"]["description"]
    # A noise-prediction model (K_EULER): every scheduler but the flow-matching one.
    assert props["scheduler"]["anyOf"][0]["enum"] == [s for s in SCHEDULERS if s != "FLOW_MATCH_EULER"]
    assert props["image_format"]["anyOf"][0]["enum"] == ["png", "jpeg", "webp"]
    assert props["quality"]["anyOf"][0] | {} == {"type": "integer", "minimum": 1, "maximum": 100}
    assert props["num_inference_steps"]["default"] == 3 and props["height"]["anyOf"][0]["maximum"] == 768
    assert props["num_outputs"]["anyOf"] == props["num_images"]["anyOf"]  # aliases: same rules
    assert schema["dependentSchemas"]["num_outputs"] == {"not": {"required": ["num_images"]}}
    assert request_json_schema(MANIFESTS["all-tasks"]) is not request_json_schema(MANIFESTS["all-tasks"])


def test_the_demo_artifact_schema_takes_worker_sdxl_test_input(demo_artifact):
    from pathlib import Path

    from runtime.artifact import read_manifest

    m = read_manifest(demo_artifact)
    job = json.loads((Path(__file__).parents[1] / "data" / "worker_sdxl_test_input.json").read_text())
    validator = Draft202012Validator(request_json_schema(m))
    assert validator.is_valid(job["input"]) and handler_accepts(job["input"], m)


def test_describe_publishes_the_schema_of_the_whole_worker_input(service_env):
    """describe's per-artifact schema covers what the worker takes beside the generation fields:
    `model`/`recipe` (popped by Service.select) and the serving options (runtime.execute's
    OPTION_FIELDS). What it accepts, the service accepts, and the other way round; the
    generation schema itself (request_json_schema) stays validate's."""
    from runtime.execute import OPTION_FIELDS
    from runtime.service import MODEL_FIELDS

    svc = service_env
    described = svc.run({"describe": True})
    [art] = described["artifacts"].values()
    schema = art["schema"]
    Draft202012Validator.check_schema(schema)
    assert set(MODEL_FIELDS) | set(OPTION_FIELDS) <= set(schema["properties"])
    assert not set(MODEL_FIELDS) & set(request_json_schema(svc.manifests.get(svc.default.path))["properties"])
    validator = Draft202012Validator(schema)
    base = {"prompt": "a red fox", "seed": 3, "num_inference_steps": 1}
    limit = svc.executor.settings.request_timeout_s
    cases = [
        ({**base, "model": "demo", "timeout": 30, "preview": True}, True),
        ({**base, "recipe": "demo", "timeout": 120.5, "preview": False}, True),
        ({**base, "timeout": None, "preview": None}, True),
        ({**base, "model": "demo", "recipe": "demo"}, False),
        ({**base, "model": "nope"}, False),
        ({**base, "model": None}, False),
        ({**base, "timeout": 0}, False),
        ({**base, "timeout": limit + 1}, False),
        ({**base, "timeout": True}, False),
        ({**base, "preview": "yes"}, False),
        ({**base, "model": "demo", "bogus": 1}, False),
    ]
    for doc, accepted in cases:
        assert validator.is_valid(doc) is accepted, doc
        reply = svc.run(doc)
        assert ("images" in reply) is accepted, (doc, reply)
    # describe takes `recipe` too, as requests do (and not both).
    by_recipe = svc.run({"describe": True, "recipe": "demo"})
    assert [m["name"] for m in by_recipe["models"]] == ["demo"] and by_recipe["artifacts"] == described["artifacts"]
    assert "error" in svc.run({"describe": True, "model": "demo", "recipe": "demo"})
    assert "unknown model" in svc.run({"describe": True, "recipe": "nope"})["error"]


def test_worker_input_schema_requires_a_model_where_the_default_does_not_route():
    from runtime.service import worker_input_schema
    from runtime.settings import ExecSettings

    m = MANIFESTS["txt2img"]
    off_default = Draft202012Validator(worker_input_schema(m, ["b", "fox"], False, ExecSettings()))
    assert not off_default.is_valid({"prompt": "x"})  # without a model the default's artifact serves it
    assert off_default.is_valid({"prompt": "x", "model": "fox"}) and off_default.is_valid(
        {"prompt": "x", "recipe": "b"}
    )
    assert not off_default.is_valid({"prompt": "x", "model": "a"})  # a served name that routes elsewhere
    no_limit = Draft202012Validator(worker_input_schema(m, ["a"], True, ExecSettings(request_timeout_s=None)))
    assert no_limit.is_valid({"prompt": "x", "timeout": 10**6}) and not no_limit.is_valid(
        {"prompt": "x", "timeout": -1}
    )

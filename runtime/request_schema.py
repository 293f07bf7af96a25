"""The JSON Schema (draft 2020-12) of one artifact's requests, as ``describe`` publishes it: the
request model's own schema (runtime.schema.request_model) plus the aliases and every rule between
fields that runtime.schema.validate applies, written as JSON Schema. Change both together:
tests/runtime/test_describe_schema.py checks, with the independent ``jsonschema`` validator on
generated inputs, that they accept and reject exactly the same requests."""

from __future__ import annotations

import copy
import json
import math
from functools import lru_cache
from typing import Any

from runtime.artifact import Manifest
from runtime.schema import ALIASES, DEFAULT_STRENGTH, RequestSpec, request_model

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def request_json_schema(manifest: Manifest) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one artifact's requests: the request model's own schema
    (fields, ranges, enums of scheduler, LoRA and ControlNet names), the aliases, and every rule
    between fields that runtime.schema.validate applies. A fresh dict on every call (callers may change it)."""
    return json.loads(_schema_text(RequestSpec.of(manifest)))


@lru_cache(maxsize=64)
def _schema_text(spec: RequestSpec) -> str:
    schema = request_model(spec).model_json_schema()
    props = schema["properties"]
    # What the server fills in when a field is absent (pydantic would say null).
    aliases = {alias: name for alias, name in ALIASES.items() if name in props}  # a generic pipeline may lack some
    for alias, name in aliases.items():
        props[alias] = copy.deepcopy(props[name]) | {"title": alias, "description": f"alias of {name}"}
    for kind, names in (("loras", spec.loras), ("controlnets", spec.controlnets)):
        # Each name at most once in the list: with names from a closed enum, "unique by name" is
        # expressible in plain JSON Schema (one maxContains per name).
        if names:
            props[kind]["allOf"] = [
                {
                    "contains": {"required": ["name"], "properties": {"name": {"const": n}}},
                    "minContains": 0,
                    "maxContains": 1,
                }
                for n in names
            ]
    schema = {
        "$schema": JSON_SCHEMA_DIALECT,
        **schema,
        "description": (
            f"worker-sdxl compatible request to {spec.title}; tasks: {', '.join(spec.tasks)}. "
            "The x- keywords are annotations (no validation)."
        ),
        # An alias and its canonical name are one field: giving both is refused.
        "dependentSchemas": {alias: {"not": {"required": [name]}} for alias, name in aliases.items()},
        "allOf": _rules(spec),
        "x-tasks": list(spec.tasks),
        "x-embedding-tokens": list(spec.embedding_tokens),
        "x-fused-loras": dict(spec.fused_loras),
    }
    return json.dumps(schema, sort_keys=False)


def _given(field: str) -> dict[str, Any]:
    """A string field given and not empty under its name or any alias (worker-sdxl: `if image_url:`)."""
    names = [field, *(a for a, n in ALIASES.items() if n == field)]
    return {"anyOf": [{"required": [k], "properties": {k: {"type": "string", "minLength": 1}}} for k in names]}


def min_strength(steps: int) -> float:
    """The least float x with ``steps * x >= 1`` in float arithmetic, as validate (and diffusers'
    int(steps * strength)) computes it: 1/steps, or the float next to it where the product rounds
    the other way (49 * (1/49) < 1)."""
    x = 1.0 / steps
    while steps * x < 1:
        x = math.nextafter(x, 2.0)
    while steps * (y := math.nextafter(x, 0.0)) >= 1:
        x = y
    return x


def min_steps(strength: float) -> int:
    """The least step count s >= 1 with ``s * strength >= 1`` (strength > 0)."""
    s = max(1, math.ceil(1 / strength) - 1)
    while s * strength < 1:
        s += 1
    return s


def _rules(spec: RequestSpec) -> list[dict[str, Any]]:
    """validate()'s rules between fields, as JSON Schema, in its order."""
    image, mask = _given("image_url"), _given("mask_url")
    control = {"required": ["controlnets"], "properties": {"controlnets": {"type": "array", "minItems": 1}}}
    rules: list[dict[str, Any]] = [
        {"$comment": "controlnets only with text-to-image", "if": control, "then": {"not": image}},
        {"$comment": "mask_url needs image_url", "if": mask, "then": image},
    ]
    # The task follows from the inputs: mask -> inpaint, image -> img2img, controlnets -> controlnet.
    refused: dict[str, dict[str, Any]] = {
        "txt2img": {"$comment": "no text-to-image: an input image is required", "anyOf": [image, mask, control]},
        "img2img": {"$comment": "no img2img", "not": {"allOf": [image, {"not": mask}]}},
        "inpaint": {"$comment": "no inpainting", "not": {"allOf": [image, mask]}},
        "controlnet": {"$comment": "no ControlNets", "not": control},
    }
    rules += [rule for task, rule in refused.items() if task not in spec.tasks]
    rules += [_denoise_rule(spec, image, mask)]
    return rules


def _denoise_rule(spec: RequestSpec, image: dict[str, Any], mask: dict[str, Any]) -> dict[str, Any]:
    """img2img/inpaint run int(steps x strength) steps, so steps x strength >= 1. No arithmetic in
    JSON Schema, but steps is a bounded integer: one minimum strength per step count (exact, from
    min_strength), and for an absent strength the task's default gives a minimum step count."""
    d = spec.defaults.steps

    def steps_are(s: int) -> dict[str, Any]:
        if s == d:  # absent and null mean the default
            return {"properties": {"num_inference_steps": {"enum": [None, s]}}}
        return {"required": ["num_inference_steps"], "properties": {"num_inference_steps": {"const": s}}}

    strength_names = ["strength", *(a for a, n in ALIASES.items() if n == "strength")]
    clauses: list[dict[str, Any]] = [
        {
            "if": steps_are(s),
            "then": {"properties": {k: {"minimum": min_strength(s)} for k in strength_names}},
        }
        for s in sorted({*range(1, spec.limits.max_steps + 1), d})
    ]
    no_strength = {"properties": {k: {"type": "null"} for k in strength_names}}  # absent or null
    for task, default in DEFAULT_STRENGTH.items():
        least = min_steps(default)
        if least <= 1:
            continue
        steps_rule: dict[str, Any] = {"properties": {"num_inference_steps": {"minimum": least}}}
        if d < least:  # the default step count is too few: the request must name enough
            steps_rule = {
                "required": ["num_inference_steps"],
                "properties": {"num_inference_steps": {"type": "integer", "minimum": least}},
            }
        is_task = mask if task == "inpaint" else {"not": mask}
        clauses.append({"if": {"allOf": [no_strength, is_task]}, "then": steps_rule})
    return {"$comment": "img2img/inpaint: num_inference_steps x strength >= 1", "if": image, "then": {"allOf": clauses}}

"""The RunPod template as the Hub reads it: ``.runpod/hub.json`` and ``tests.json`` against the
structure RunPod's publishing guide documents (https://docs.runpod.io/hub/publishing-guide), the
values in them against what the worker and the Dockerfile actually do, and tests.json's requests
through the real handler on the tiny model they are written for."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.conftest import REPO

HUB = json.loads((REPO / ".runpod" / "hub.json").read_text())
TESTS = json.loads((REPO / ".runpod" / "tests.json").read_text())

CUDA = {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": r"^\d+\.\d+$"}}
ENV_INPUT = {
    "type": "object",
    "required": ["name", "type", "description"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "type": {"enum": ["string", "number", "boolean", "huggingface"]},
        "description": {"type": "string", "minLength": 1},
        "default": {"type": ["string", "number", "boolean", "null"]},
        "advanced": {"type": "boolean"},
        "required": {"type": "boolean"},
        "options": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["label", "value"],
                "additionalProperties": False,
                "properties": {"label": {"type": "string"}, "value": {"type": ["string", "number", "boolean"]}},
            },
        },
    },
}
# hub.json: general metadata, then the endpoint's config (publishing guide, "hub.json reference").
HUB_SCHEMA = {
    "type": "object",
    "required": ["title", "description", "type", "category", "config"],
    "additionalProperties": False,
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "description": {"type": "string", "minLength": 1},
        "type": {"const": "serverless"},
        "category": {"enum": ["audio", "embedding", "language", "video", "image"]},
        "iconUrl": {"type": "string", "pattern": "^https://"},
        "config": {
            "type": "object",
            "required": ["runsOn", "containerDiskInGb"],
            "additionalProperties": False,
            "properties": {
                "runsOn": {"enum": ["GPU", "CPU"]},
                "containerDiskInGb": {"type": "integer", "minimum": 1},
                "gpuIds": {"type": "string", "pattern": r"^[A-Z0-9_]+(,[A-Z0-9_]+)*$"},
                "gpuCount": {"type": "integer", "minimum": 1},
                "allowedCudaVersions": CUDA,
                "presets": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "defaults"],
                        "additionalProperties": False,
                        "properties": {"name": {"type": "string"}, "defaults": {"type": "object"}},
                    },
                },
                "env": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["key"],
                        "additionalProperties": False,
                        "properties": {"key": {"type": "string", "pattern": "^[A-Z_][A-Z0-9_]*$"}, "input": ENV_INPUT},
                    },
                },
            },
        },
    },
}
# tests.json: the requests the Hub's test build sends, and the machine it runs them on.
TESTS_SCHEMA = {
    "type": "object",
    "required": ["tests", "config"],
    "additionalProperties": False,
    "properties": {
        "tests": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "input", "timeout"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z0-9_]+$"},
                    "input": {"type": "object"},
                    "timeout": {"type": "integer", "minimum": 1000},  # milliseconds
                },
            },
        },
        "config": {
            "type": "object",
            "required": ["gpuTypeId", "gpuCount"],
            "additionalProperties": False,
            "properties": {
                "gpuTypeId": {"type": "string"},
                "gpuCount": {"type": "integer", "minimum": 1},
                "allowedCudaVersions": CUDA,
                "env": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["key", "value"],
                        "additionalProperties": False,
                        "properties": {"key": {"type": "string"}, "value": {"type": "string"}},
                    },
                },
            },
        },
    },
}


def test_hub_and_tests_json_have_runpods_structure():
    jsonschema.validate(HUB, HUB_SCHEMA)
    jsonschema.validate(TESTS, TESTS_SCHEMA)
    keys = [e["key"] for e in HUB["config"]["env"]]
    assert len(keys) == len(set(keys))
    for preset in HUB["config"]["presets"]:
        assert set(preset["defaults"]) <= set(keys), preset
    for e in HUB["config"]["env"]:
        options = [o["value"] for o in e["input"].get("options", [])]
        assert not options or e["input"].get("default") in options, e


def base_cuda() -> tuple[int, int]:
    """The CUDA version of the Dockerfile's base image (its FROM tag)."""
    first = next(line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("FROM "))
    m = re.search(r"cuda(\d+)\.(\d+)", first)
    assert m, first
    return int(m.group(1)), int(m.group(2))


def test_cuda_filters_match_the_base_image_and_the_guide():
    need = base_cuda()
    for versions in (HUB["config"]["allowedCudaVersions"], TESTS["config"]["allowedCudaVersions"]):
        assert all(tuple(map(int, v.split("."))) >= need for v in versions), (versions, need)
    guide = (REPO / "docs" / "deploy-runpod.md").read_text()
    assert f"CUDA {need[0]}.{need[1]}" in guide


def test_every_hub_variable_is_read_and_its_default_starts_a_worker():
    from runtime.settings import WorkerSettings
    from runtime.threads import usable_cores

    code = "\n".join(p.read_text() for d in ("runtime", "compiler") for p in (REPO / d).rglob("*.py"))
    env: dict[str, str] = {}
    for e in HUB["config"]["env"]:
        assert f'"{e["key"]}"' in code or f"{e['key']}=" in code or e["key"] in code, f"{e['key']} is read nowhere"
        default = e["input"].get("default")
        env[e["key"]] = str(default).lower() if isinstance(default, bool) else "" if default is None else str(default)
    settings = WorkerSettings.from_env(usable_cores(), env)  # the template's defaults: no SettingError
    assert settings.model is None  # no model named: the image's own serve
    for preset in HUB["config"]["presets"]:
        assert WorkerSettings.from_env(usable_cores(), {**env, **preset["defaults"]}) is not None


@pytest.mark.parametrize("test", TESTS["tests"], ids=[t["name"] for t in TESTS["tests"]])
def test_tests_json_requests_run_on_the_tiny_model(call, test: dict[str, Any]):
    """The Hub's test env serves builtin:tiny-sd15 (UIW_MODEL); the demo artifact is that model."""
    assert {"key": "UIW_MODEL", "value": "builtin:tiny-sd15"} in TESTS["config"]["env"]
    reply = call(test["input"])
    assert "error" not in reply, reply
    if "describe" not in test["input"]:
        assert len(reply["images"]) == test["input"].get("num_images", 1)


def test_the_root_test_input_is_worker_sdxls():
    ours = json.loads((REPO / "test_input.json").read_text())
    theirs = json.loads((Path(__file__).parents[1] / "data" / "worker_sdxl_test_input.json").read_text())
    assert ours == theirs

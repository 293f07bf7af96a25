"""The performance options are one type, the artifact contract's RuntimeOptions, from the recipe
through the plan into the manifest; folding them into it changed no cache key (the digests below
were computed by the compiler from before, when each field was declared and copied on its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ENV = {"torch": "2.0", "diffusers": "0.30"}
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "plain": ({"base": "builtin:tiny-sd15"}, "a123085d2820e4748c458fbd04c9004a4a500c6e960eb4355dabe2343012b015"),
    "perf": (
        {
            "base": "builtin:tiny-sd15",
            "offload": "model",
            "compile": {"scope": "regional", "mode": "max-autotune"},
            "channels_last": True,
            "fused_qkv": True,
            "attention": "native",
            "precision": "bf16",
        },
        "0c51b8ada0161b98841865e306356e7aabf714a7678ac1e4877fadaa961a1871",
    ),
    "quant": (
        {
            "checkpoint": "./m.safetensors",
            "quantize": "int8",
            "compile": "full",
            "scheduler": "DDIM",
            "loras": [{"source": "./a.safetensors", "scale": 0.5}],
            "embeddings": [{"source": "./e.safetensors"}],
            "defaults": {"width": 128, "steps": 4},
            "limits": {"max_images": 2},
        },
        "303f98f1d875c8a57d293e1247b738c630f74e90c07f986fb7e85fca6a73ada3",
    ),
}


def _plan(fields: dict[str, Any]) -> Any:
    from compiler.detect import Detection
    from compiler.plan import make_plan
    from compiler.recipe import parse_recipe
    from compiler.sources.base import Pinned, Resolved

    r = parse_recipe("r", Path("/r/r.yaml"), fields)
    base = Resolved(
        pin="builtin:tiny-sd15 sha256:00", inputs=(("unet/x", "sha256:11"),), family="sd15", native_size=(64, 64)
    )
    ckpt = Pinned(pin="file sha256:22", inputs=(("m.safetensors", "sha256:22"),)) if r.checkpoint else None
    return make_plan(
        r,
        base,
        checkpoint=ckpt,
        detected=Detection("checkpoint", "sd15", "ldm") if ckpt else None,
        loras=tuple(Pinned(pin=f"l{i}", inputs=((f"l{i}", "sha256:33"),)) for i, _ in enumerate(r.loras)),
        embeddings=tuple(Pinned(pin=f"e{i}", inputs=((f"e{i}", "sha256:44"),)) for i, _ in enumerate(r.embeddings)),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_cache_keys_are_those_of_the_field_by_field_plan(case: str) -> None:
    from compiler.plan import cache_key

    fields, key = CASES[case]
    assert cache_key(_plan(fields), ENV) == key


def test_the_recipe_the_plan_and_the_manifest_share_one_options_type() -> None:
    from compiler.recipe import Recipe
    from runtime.artifact import CompileOptions, Manifest, RuntimeOptions

    plan = _plan(CASES["perf"][0])
    assert Recipe.model_fields["runtime"].annotation is RuntimeOptions
    assert Manifest.model_fields["runtime"].annotation is RuntimeOptions
    assert type(plan.runtime) is RuntimeOptions and plan.precision == plan.runtime.dtype == "bf16"
    # the plan's copy is normalised: compile on warms the default size when the recipe names none
    assert plan.runtime.compile == CompileOptions(scope="regional", mode="max-autotune", shapes=((64, 64),))
    canonical = plan.canonical()
    assert "runtime" not in canonical and canonical["precision"] == "bf16" and canonical["offload"] == "model"


def test_a_manifest_is_read_leniently_a_recipe_strictly() -> None:
    from compiler.errors import UserError
    from compiler.recipe import parse_recipe
    from runtime.artifact import RuntimeOptions

    # JSON has lists where the type has tuples: a manifest reads them
    read = RuntimeOptions.model_validate({"dtype": "fp16", "compile": {"scope": "full", "shapes": [[64, 128]]}})
    assert read.compile.shapes == ((64, 128),)
    with pytest.raises(UserError) as e:
        parse_recipe("r", Path("/r/r.yaml"), {"base": "builtin:tiny-sd15", "fused_qkv": "true", "precision": "fp64"})
    text = str(e.value)
    assert "/r/r.yaml: fused_qkv:" in text and "/r/r.yaml: precision:" in text

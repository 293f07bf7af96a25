"""Performance options: offload, compile, channels_last, fused QKV, attention backend and
quantize. Each one parses, enters the plan and the cache key, lands in the manifest, and is
applied at load; the pictures match the plain artifact's (exactly up to float rounding for the
layout options, within a stated tolerance for quantized weights); the combinations that cannot
work fail before anything is built, with a hint."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import DEMO_SETTINGS, REQ, compile_text, serve

TINY = "base: builtin:tiny-sd15\n" + DEMO_SETTINGS


def _recipe(fields: dict[str, Any]) -> Any:
    from compiler.recipe import parse_recipe

    return parse_recipe("r", Path("/r/r.yaml"), {"base": "builtin:tiny-sd15", **fields})


def _problems(fields: dict[str, Any]) -> list[str]:
    from compiler.errors import UserError

    with pytest.raises(UserError) as e:
        _recipe(fields)
    return [str(p) for p in e.value.problems]


# --- recipe, plan, cache key (pure: nothing is built) ------------------------------------------


def test_options_parse_with_defaults_and_shorthands() -> None:
    plain = _recipe({})
    assert (
        plain.runtime.offload,
        plain.runtime.compile.scope,
        plain.runtime.channels_last,
        plain.runtime.fused_qkv,
        plain.runtime.attention,
    ) == (
        "none",
        "off",
        False,
        False,
        None,
    )
    assert plain.runtime.quantize == "none"
    assert _recipe({"compile": False}).runtime.compile.scope == "off", "YAML's bare `off` is false"
    assert _recipe({"compile": "regional"}).runtime.compile.scope == "regional"
    full = _recipe({"compile": {"scope": "full", "mode": "max-autotune", "dynamic": True, "shapes": [[1024, 768]]}})
    assert full.runtime.compile.shapes == ((1024, 768),) and full.runtime.compile.mode == "max-autotune"
    assert full.runtime.compile.dynamic
    r = _recipe({"offload": "group", "channels_last": True, "attention": "native", "quantize": "fp8"})
    assert (r.runtime.offload, r.runtime.channels_last, r.runtime.attention, r.runtime.quantize) == (
        "group",
        True,
        "native",
        "fp8",
    )


def test_bad_values_are_all_reported_with_hints() -> None:
    problems = _problems(
        {
            "offload": "cpu",
            "compile": {"scope": "fast", "shapes": [[1000, 3]], "fullgraph": True},
            "attention": "flash_attn_9",
            "quantize": "int4",
            "channels_last": "yes",
        }
    )
    text = "\n".join(problems)
    for where in ("offload", "compile.scope", "compile.shapes", "compile.fullgraph", "attention", "quantize"):
        assert f"r.yaml: {where}:" in text, (where, text)
    assert "valid keys here: scope, mode, dynamic, shapes" in text
    assert "native" in text and "xformers" in text, "the attention hint lists the backends"
    assert "channels_last" in text
    assert all("hint:" in p for p in problems)


def test_the_command_line_shorthand_compiles_a_sweep_value(tmp_path: Path) -> None:
    from compiler.compose import compose
    from compiler.recipe import parse_recipe

    (tmp_path / "r.yaml").write_text("base: builtin:tiny-sd15\ncompile: off\n")
    for value, scope in (("regional", "regional"), ("off", "off"), ("full", "full")):
        c = compose(["recipe=r", f"recipes_dir={tmp_path}", f"compile={value}"])
        assert parse_recipe(c.name, c.path, c.fields).runtime.compile.scope == scope
    c = compose(["recipe=r", f"recipes_dir={tmp_path}"])
    assert parse_recipe(c.name, c.path, c.fields).runtime.compile.scope == "off", "bare YAML off"


@pytest.mark.parametrize(
    ("fields", "where", "says"),
    [
        ({"compile": "regional", "offload": "sequential"}, "compile", "offload: model"),
        ({"compile": "full", "offload": "group"}, "compile", "offload: model"),
        ({"quantize": "int8", "offload": "sequential"}, "quantize", "offload: model"),
        ({"quantize": "int8", "fused_qkv": True}, "fused_qkv", "choose one"),
        ({"quantize": "fp8", "loras": [{"source": "./a.safetensors", "fuse": False}]}, "quantize", "fuse them"),
        ({"fused_qkv": True, "loras": [{"source": "./a.safetensors", "fuse": False}]}, "fused_qkv", "fuse the LoRAs"),
        ({"compile": {"scope": "full", "shapes": [[4096, 64]]}}, "compile.shapes.0", "limits"),
    ],
)
def test_combinations_that_cannot_work_fail_with_a_hint(fields: dict[str, Any], where: str, says: str) -> None:
    from compiler.families import FAMILIES
    from compiler.validate import check_performance

    max_w, max_h = FAMILIES["sd15"].max_size
    problems = [str(p) for p in check_performance(_recipe(fields), (max_w, max_h))]
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"/r/r.yaml: {where}: ") and "hint:" in problems[0] and says in problems[0]


def test_bad_combinations_fail_on_the_command_line_before_anything_is_built(tmp_path: Path) -> None:
    proc = compile_text(tmp_path, "bad", TINY, "quantize=int8", "fused_qkv=true", "offload=group", "compile=full")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert "compile: compile full with offload group" in proc.stderr
    assert "quantize: quantize int8 with offload group" in proc.stderr
    assert "fused_qkv: fused_qkv with quantize" in proc.stderr
    assert proc.stderr.count("hint:") == 3
    assert not (tmp_path / "home" / "artifacts").exists() or not any((tmp_path / "home" / "artifacts").rglob("READY"))


def test_every_option_enters_the_plan_and_the_cache_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compiler.build import prepare

    monkeypatch.setenv("UIW_HOME", str(tmp_path / "home"))
    (tmp_path / "r.yaml").write_text(TINY)
    base = ["recipe=r", f"recipes_dir={tmp_path}"]
    variants = [
        [],
        ["offload=model"],
        ["offload=group"],
        ["compile=regional"],
        ["compile=full"],
        ["compile.scope=full", "compile.mode=max-autotune"],
        ["compile.scope=full", "compile.dynamic=true"],
        ["compile.scope=full", "compile.shapes=[[64,64],[128,128]]"],
        ["channels_last=true"],
        ["fused_qkv=true"],
        ["attention=native"],
        ["quantize=int8"],
        ["quantize=fp8"],
        ["precision=bf16"],
    ]
    keys = {}
    for v in variants:
        p = prepare([*base, *v])
        keys[" ".join(v)] = p.key
        assert p.plan.runtime.dtype == p.plan.precision
    assert len(set(keys.values())) == len(variants), keys
    # compile off means off: its mode and shapes do not split the cache
    off = prepare([*base, "compile.scope=off", "compile.mode=max-autotune", "compile.shapes=[[128,128]]"])
    assert off.key == keys[""]
    # an empty shapes list is the default size, written out
    assert prepare([*base, "compile=full"]).plan.runtime.compile.shapes == ((64, 64),)
    q = prepare([*base, "quantize=int8", "compile=regional"]).plan
    assert q.steps[-3:] == ("save", "quantize-int8", "compile-cache-regional")
    assert json.dumps(q.canonical())  # plain JSON: hashed canonically
    # a compiling recipe's key names the machine kind whose compile cache it would carry
    assert prepare([*base, "compile=regional"]).environment["compile_target"] == "none", "no GPU, no opt-in"
    monkeypatch.setenv("UIW_COMPILE_CACHE_CPU", "1")
    on_cpu = prepare([*base, "compile=regional"])
    assert on_cpu.environment["compile_target"].startswith("cpu-") and on_cpu.key != keys["compile=regional"]
    assert prepare(base).key == keys[""] and "compile_target" not in prepare(base).environment


def test_the_attention_backends_are_this_diffusers_names() -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    from runtime.artifact import ATTENTION_BACKENDS, CPU_ATTENTION_BACKENDS

    known = {b.value for b in AttentionBackendName}
    assert set(ATTENTION_BACKENDS) <= known
    assert set(CPU_ATTENTION_BACKENDS) <= set(ATTENTION_BACKENDS)
    assert not any(b.endswith("_hub") for b in ATTENTION_BACKENDS), "a hub backend downloads at serve time"


def test_manifests_from_before_the_options_stay_readable() -> None:
    from runtime.artifact import RuntimeOptions

    old = RuntimeOptions.model_validate({"dtype": "fp16", "offload": "none", "compile": "off"})
    assert old.compile.scope == "off" and not old.channels_last and old.quantize == "none"
    assert RuntimeOptions.model_validate({"dtype": "fp32"}) == RuntimeOptions(dtype="fp32")


# --- built, loaded, drawn ---------------------------------------------------------------------


def _draw(pipe: Any, seed: int = 7) -> np.ndarray:
    import torch

    out = pipe(
        "a red fox", num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(seed)
    )
    return np.asarray(out.images[0], dtype=np.float64)  # PIL, 0..255


def _build(tmp_path: Path, name: str, extra: str) -> Path:
    proc = compile_text(tmp_path, name, TINY + extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip())


def _attn1(pipe: Any) -> Any:
    return pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1


def test_layout_options_are_recorded_applied_and_draw_the_same_picture(
    tmp_path: Path, demo_artifact: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    from runtime.loader import load

    artifact = _build(tmp_path, "layout", "channels_last: true\nfused_qkv: true\nattention: native\noffload: model\n")
    runtime = json.loads((artifact / "manifest.json").read_text())["runtime"]
    assert runtime | {"compile": None} == {
        "dtype": "fp32",
        "offload": "model",
        "compile": None,
        "channels_last": True,
        "fused_qkv": True,
        "attention": "native",
        "quantize": "none",
        "generator": "cpu",
    }
    assert runtime["compile"]["scope"] == "off"
    with caplog.at_level(logging.INFO, logger="runtime.optimize"):
        loaded = load(artifact, device="cpu")
    plain = load(demo_artifact, device="cpu")
    pipe = loaded.pipeline
    for name in ("unet", "vae"):
        convs = [m for m in getattr(pipe, name).modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs), name
    assert not plain.pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    attn = _attn1(pipe)
    assert attn.fused_projections and hasattr(attn, "to_qkv") and isinstance(attn.processor, FusedAttnProcessor2_0)
    assert not hasattr(_attn1(plain.pipeline), "to_qkv")
    assert not hasattr(pipe.unet, "_hf_hook"), "no offload hooks on a CPU"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("runtime options applied"))
    assert "channels_last (unet, vae)" in line and "fused_qkv (unet, vae)" in line
    assert "offload: model offload is moot on cpu" in line and "attention: native set, but" in line
    # the same modules serve the derived task pipelines
    assert loaded.pipelines["img2img"].unet is pipe.unet

    got, want = _draw(loaded.pipelines["txt2img"]), _draw(plain.pipelines["txt2img"])
    assert np.abs(got - want).max() <= 1, "NHWC and one fused matmul: float rounding only"


def test_compile_is_recorded_and_applied_at_load_without_running(
    tmp_path: Path, demo_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiling runs for minutes here (tests/bench/test_compile_cache.py, slow): this checks the plan's
    record and that the loader wraps the right modules, lazily (nothing traced until a call)."""
    from compiler.build import prepare
    from runtime.artifact import CompileOptions
    from runtime.loader import load
    from runtime.optimize import apply

    monkeypatch.setenv("UIW_HOME", str(tmp_path / "home"))
    (tmp_path / "c.yaml").write_text(TINY + "compile: {scope: regional, mode: max-autotune}\n")
    options = prepare(["recipe=c", f"recipes_dir={tmp_path}"]).plan.runtime
    assert options.compile == CompileOptions(scope="regional", mode="max-autotune", shapes=((64, 64),))

    regional = load(demo_artifact, device="cpu").pipeline
    done = apply(regional, options, "cpu", demo_artifact)
    blocks = [m for m in regional.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert regional.unet._compiled_call_impl is None, "regional: the blocks, not the whole UNet"
    assert done.applied["compile"].startswith("regional (BasicTransformerBlock")
    assert "the artifact has none" in done.skipped["compile_cache"]

    full = load(demo_artifact, device="cpu").pipeline
    apply(full, options.model_copy(update={"compile": CompileOptions(scope="full")}), "cpu")
    assert full.unet._compiled_call_impl is not None and type(full.unet).__name__ == "UNet2DConditionModel"


@pytest.mark.parametrize(("quantize", "tolerance"), [("int8", 3), ("fp8", 8)])
def test_quantized_weights_are_baked_smaller_and_loaded_without_converting(
    tmp_path: Path,
    demo_artifact: Path,
    demo_image: np.ndarray,
    quantize: str,
    tolerance: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import optimum.quanto.nn.qmodule as qmodule
    from optimum.quanto import QLinear
    from safetensors import safe_open

    from runtime.loader import load

    artifact = _build(tmp_path, f"q-{quantize}", f"quantize: {quantize}\n")
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["runtime"]["quantize"] == quantize
    weights = "pipeline/unet/diffusion_pytorch_model.safetensors"
    size = {f["path"]: f["size"] for f in manifest["files"]}
    plain_size = (demo_artifact / weights).stat().st_size
    assert size[weights] < 0.85 * plain_size, (size[weights], plain_size)
    assert all(p.endswith((".json", ".txt", ".safetensors")) for p in size), "safetensors only"
    config = json.loads((artifact / "pipeline/unet/config.json").read_text())
    assert config["quantization_config"]["weights_dtype"] == {"int8": "int8", "fp8": "float8"}[quantize]

    # A load converts nothing: quanto's quantize_weight may only see the meta placeholders that
    # give the layers their structure; the stored quantized tensors land as they are.
    real: list[str] = []
    original = qmodule.quantize_weight

    def spy(t: Any, *a: Any, **k: Any) -> Any:
        if t.device.type != "meta":
            real.append(str(t.shape))
        return original(t, *a, **k)

    monkeypatch.setattr(qmodule, "quantize_weight", spy)
    loaded = load(artifact, device="cpu")
    assert real == [], f"quantized at load: {real[:3]}"
    to_q = _attn1(loaded.pipeline).to_q
    assert isinstance(to_q, QLinear)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight._data"
    with safe_open(str(artifact / weights), "pt") as f:
        stored = f.get_tensor(key)
    assert stored.element_size() == 1 and bool((to_q.weight._data == stored).all()), "the bytes on disk, as loaded"
    assert loaded.pipelines["img2img"].unet is loaded.pipeline.unet, "task pipelines share the quantized UNet"

    plain = load(demo_artifact, device="cpu")
    got, want = _draw(loaded.pipelines["txt2img"]), _draw(plain.pipelines["txt2img"])
    diff = np.abs(got - want)
    assert diff.max() <= tolerance, f"{quantize}: max {diff.max()}/255, mean {diff.mean():.3f}"
    # and through the service (pool, request validation, PNG): the demo's picture, within the same bound
    served = serve(tmp_path / "home", artifact, REQ).astype(int)
    assert np.abs(served - demo_image.astype(int)).max() <= tolerance


@pytest.mark.gpu
def test_offload_hooks_on_cuda(tmp_path: Path) -> None:
    import torch

    from runtime.loader import load

    assert torch.cuda.is_available()
    for kind in ("model", "sequential", "group"):
        artifact = _build(tmp_path, f"off-{kind}", f"offload: {kind}\n")
        pipe = load(artifact, device="cuda").pipeline
        hooked = [m for m in pipe.unet.modules() if hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook")]
        assert hooked, kind

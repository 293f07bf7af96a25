"""Switchable LoRAs (fuse: false): stored in the artifact, applied to the requests that name them,
reset after every request. A request with LoRA A at scale s draws what the artifact with A fused
at s draws; the next request without a LoRA draws the base image exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.compiler.test_lora import _compile, _factors, base, kohya_file  # noqa: F401  (fixture)
from tests.conftest import REQ, decode_image


def test_a_switchable_lora_matches_the_fused_one_and_leaves_no_trace(tmp_path, base, demo_image):  # noqa: F811
    from runtime.service import Service, Settings

    kohya_file(tmp_path / "style-a.safetensors", _factors(base, 1), alpha=2.0)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "style-a.safetensors").write_bytes((tmp_path / "style-a.safetensors").read_bytes())
    fused = _compile(tmp_path, "  - source: ./style-a.safetensors\n    scale: 0.8", name="fused")
    switch = _compile(
        tmp_path, "  - source: ./style-a.safetensors\n    scale: 0.8\n    fuse: false\n    name: a", name="switch"
    )
    assert fused.returncode == 0 and switch.returncode == 0, fused.stderr[-2000:] + switch.stderr[-2000:]
    artifact = Path(switch.stdout.strip())
    assert (artifact / "loras" / "a.safetensors").read_bytes() == (tmp_path / "style-a.safetensors").read_bytes()

    home = tmp_path / "home"
    svc = Service(Settings(artifacts=(str(artifact),), home=home))
    ref = Service(Settings(artifacts=(fused.stdout.strip(),), home=home)).run(REQ)
    want = decode_image(ref["images"][0]).astype(int)

    with_a = svc.run({**REQ, "loras": [{"name": "a", "scale": 0.8}]})
    assert "images" in with_a, with_a
    assert np.abs(decode_image(with_a["images"][0]).astype(int) - want).max() <= 2  # fp32: fused vs unfused math
    plain = svc.run(REQ)
    assert np.array_equal(decode_image(plain["images"][0]), demo_image), "nothing leaks into the next request"
    default_scale = svc.run({**REQ, "loras": [{"name": "a"}]})  # the recipe's scale
    assert default_scale["images"] == with_a["images"]
    half = svc.run({**REQ, "loras": [{"name": "a", "scale": 0.4}]})
    assert half["images"] != with_a["images"]

    unknown = svc.run({**REQ, "loras": [{"name": "b"}]})
    assert "error" in unknown and "b" in unknown["error"] and "'a'" in unknown["error"], unknown
    none_here = Service(Settings(artifacts=(fused.stdout.strip(),), home=home)).run(
        {**REQ, "loras": [{"name": "style-a"}]}
    )
    assert "error" in none_here and "fused" in none_here["error"], none_here

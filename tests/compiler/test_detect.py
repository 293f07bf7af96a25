"""Detection from real key layouts (tests/fixtures/model-keys, sd-mecha's model configs):
full-shape safetensors headers over sparse files, and variants derived from them."""

from __future__ import annotations

import json
import subprocess

import pytest

from compiler.detect import detect, detect_file
from tests.conftest import PY, REPO
from tests.helpers.detect_cases import CASES, as_dtype, keys_of, write


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_detection_case(case):
    found = detect(case.keys(), case.metadata)
    assert (found.kind, found.family, found.format, found.variant, found.prediction) == case.expected, found
    assert found.candidates == case.candidates, found
    assert found.evidence, "every answer says why"


def test_full_size_files_are_read_from_their_header_only(tmp_path):
    for case in CASES[:1] + tuple(c for c in CASES if c.name in ("sdxl-sgm", "sd3-comfyui", "flux-dev")):
        path = write(tmp_path / f"{case.name}.safetensors", case.keys())
        found = detect_file(path)
        assert (found.kind, found.family) == case.expected[:2], case.name
    assert (tmp_path / "sd15-ldm.safetensors").stat().st_size > 2 * 10**9  # full shapes, fp32
    assert (tmp_path / "sd15-ldm.safetensors").stat().st_blocks * 512 < 10**6  # and sparse


def test_evidence_names_what_decided():
    assert any("CLIP-L + OpenCLIP-G" in e for e in detect(keys_of("sdxl-sgm")).evidence), "widths and layout agree"
    refiner = next(c for c in CASES if c.name == "sdxl-refiner").keys()
    assert any("OpenCLIP-G text encoder alone" in e for e in detect(refiner).evidence)
    # An SDXL base UNet (2048, ADM 2816) with the refiner's text-encoder layout: no guess.
    base_unet = {k: v for k, v in keys_of("sdxl-sgm").items() if not k.startswith("conditioner.")}
    clash = detect({**base_unet, **{k: v for k, v in refiner.items() if k.startswith("conditioner.")}})
    assert (clash.kind, clash.family, clash.candidates) == ("unknown", None, ("sdxl", "sdxl-refiner"))
    schnell = next(c for c in CASES if c.name == "flux-schnell").keys()
    assert any("no guidance_in" in e for e in detect(schnell).evidence)
    assert detect(as_dtype(keys_of("sd1-ldm", "diffuser"), "float16")).family == "sd15"
    controlnets = (
        (
            {
                "control_model.input_hint_block.0.weight": ((16, 3, 3, 3), "float16"),
                "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ((320, 768), "float16"),
            },
            ("controlnet", "sd15", "ldm"),
        ),
        (
            {
                "controlnet_cond_embedding.conv_in.weight": ((16, 3, 3, 3), "float16"),
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": ((640, 2048), "float16"),
            },
            ("controlnet", "sdxl", "diffusers"),
        ),
    )
    for keys, expected in controlnets:
        found = detect(keys)
        assert (found.kind, found.family, found.format) == expected


def test_compatibility_doc_is_generated_from_these_cases():
    from scripts.compatibility import render

    doc = REPO / "docs" / "compatibility.md"
    assert doc.read_text() == render(), "regenerate: .venv/bin/python -m scripts.compatibility"


def test_cli_prints_one_json_line_per_file_and_fails_on_unknown(tmp_path):
    good = write(tmp_path / "good.safetensors", keys_of("sd1-ldm"))
    vae = write(tmp_path / "vae.safetensors", keys_of("sdxl-sgm", "vae"))
    write(tmp_path / "odd.safetensors", {"some.tensor": ((3,), "float32")})
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"PK\x03\x04 never read")
    args = [str(good), str(vae), "odd.safetensors", str(pickle)]
    proc = subprocess.run(
        [PY, "-m", "compiler.detect", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [x["path"] for x in lines] == args, "paths exactly as given"
    assert (lines[0]["kind"], lines[0]["family"]) == ("checkpoint", "sd15")
    assert (lines[1]["kind"], lines[1]["format"], lines[1]["family"]) == ("vae", "ldm", None)
    assert lines[1]["candidates"] == ["sd15", "sd2", "sdxl"]
    assert lines[2]["kind"] == "unknown" and lines[3]["kind"] == "unknown"
    assert "pickle" in lines[3]["evidence"][0]
    assert proc.returncode == 1
    ok = subprocess.run([PY, "-m", "compiler.detect", str(good)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0

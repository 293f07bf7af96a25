"""EMA-only UNet files (LDM's model_ema.<name without dots>) on a base: the average is used as the
UNet, as A1111 and diffusers' extract_ema use it. The names are restored (compiler.ema), the real
SD 1.5 layout's EMA names read back exactly, and the served image is plain diffusers' with the
same UNet weights."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers.detect_cases import fixture_path
from tests.helpers.singlefile_serving import JOB, assert_close, compiled, reference, served, write_weights


def test_the_real_sd15_ema_names_read_back_as_its_unet_names():
    from compiler.ema import restore_names

    components = yaml.safe_load(fixture_path("sd1-ldm").read_text())["components"]
    mapping, unreadable = restore_names(list(components["ema"]))
    assert unreadable == [] and set(mapping.values()) == set(components["diffuser"])


@pytest.mark.slow  # a compile and a serve: ~40 s on a loaded machine
def test_ema_only_unet_replaces_the_base_unet(tmp_path, monkeypatch):
    import torch
    from diffusers import UNet2DConditionModel

    from compiler.tiny_models import BUILTINS
    from tests.helpers.fakehub import FakeHub
    from tests.helpers.ldm_sd2 import ema_only_unet

    pipe = BUILTINS["tiny-sd15"].build()
    torch.manual_seed(77)  # other weights than the base's, so the replacement shows
    ema = UNet2DConditionModel.from_config(pipe.unet.config).eval()
    write_weights(tmp_path, "ema.safetensors", ema_only_unet(ema))
    hub = FakeHub().start()
    try:
        artifact = compiled(
            tmp_path,
            hub,
            "base: builtin:tiny-sd15\ncheckpoint: ./weights/ema.safetensors\nfamily: sd15\nscheduler: K_EULER",
        )
    finally:
        hub.stop()
    base_image = reference(BUILTINS["tiny-sd15"].build(), JOB, "EulerDiscreteScheduler")
    pipe.unet = ema
    image = served(artifact, tmp_path / "serve", JOB, monkeypatch)
    assert_close(image, reference(pipe, JOB, "EulerDiscreteScheduler"))
    assert abs(image.astype(int) - base_image.astype(int)).max() > 8, "the EMA weights were not used"

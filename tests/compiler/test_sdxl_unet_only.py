"""SDXL UNet-only files on `base:`, in diffusers naming and in SGM (LDM) naming: the file's UNet
replaces the base's, and the served image is plain diffusers' with the same UNet weights."""

from __future__ import annotations

import pytest

from tests.helpers.singlefile_serving import JOB, assert_close, compiled, reference, served, write_weights


@pytest.mark.parametrize("naming", ["diffusers", "sgm"])
def test_sdxl_unet_only_file_replaces_the_base_unet(naming, tmp_path, monkeypatch):
    import torch
    from diffusers import UNet2DConditionModel

    from compiler.tiny_models import BUILTINS
    from tests.helpers.fakehub import FakeHub
    from tests.helpers.ldm import unet_to_ldm

    pipe = BUILTINS["tiny-sdxl"].build()
    torch.manual_seed(78)  # other weights than the base's, so the replacement shows
    unet = UNet2DConditionModel.from_config(pipe.unet.config).eval()
    state = unet.state_dict() if naming == "diffusers" else unet_to_ldm(unet.state_dict(), dict(unet.config))
    write_weights(tmp_path, "unet.safetensors", {k: v.contiguous() for k, v in state.items()})
    hub = FakeHub().start()
    try:
        fields = "base: builtin:tiny-sdxl\ncheckpoint: ./weights/unet.safetensors\nfamily: sdxl\nscheduler: K_EULER"
        artifact = compiled(tmp_path, hub, fields)
    finally:
        hub.stop()
    pipe.unet = unet
    assert_close(served(artifact, tmp_path / "serve", JOB, monkeypatch), reference(pipe, JOB, "EulerDiscreteScheduler"))
